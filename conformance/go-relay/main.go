// Command go-relay is parley's reference copy of the legacy Go WebSocket chat
// relay, written from the behaviour described in PROTOCOL.md Part 1 (1.1-1.3).
// It exists so the relay conformance suite can be checked against a relay
// that behaves like the legacy one, and so Python's codec can be compared with
// the bytes Go really writes. It is a test peer, not a product.
//
// Faults of the original that are deliberately NOT reproduced:
//   - the crash under connect/disconnect churn (unsynchronised map access):
//     here every shared map is guarded by a mutex, and each connection has its
//     own write mutex, so concurrent writers never race on one socket;
//   - logging of invite codes, full SIDs and payloads: this relay logs frame
//     types, short SID suffixes and connection ids only.
//
// Faults that ARE kept, because they are observable wire behaviour the suite
// checks: sessions and codes are never freed, codes never expire, no size or
// rate limit, JOIN_REQUEST's publicKey is pasted into JSON unescaped, a bad
// frame drops the TCP connection without a close frame, a stalled receiver
// delays its session's senders by up to 2 s per frame.
//
// Unknown details and what was assumed are listed in ASSUMPTIONS.md.
package main

import (
	"flag"
	"fmt"
	"log"
	"math/rand"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"parley.local/conformance/gorelay/internal/wire"
)

const writeWait = 2 * time.Second

var (
	pingEvery      = 10 * time.Second
	faultNoNL      bool // -fault no-newline
	faultSkipDeliv bool // -fault skip-delivered
	logger         = log.New(os.Stderr, "go-relay ", log.LstdFlags|log.Lmicroseconds)
)

// newID returns "<unix-ms>_<8 lowercase hex>" from math/rand (not crypto).
func newID() string {
	return fmt.Sprintf("%d_%08x", time.Now().UnixMilli(), rand.Uint32())
}

// short returns a log-safe tail of a SID.
func short(sid string) string {
	if len(sid) <= 4 {
		return "…"
	}
	return "…" + sid[len(sid)-4:]
}

// ---------------------------------------------------------------- connections

type client struct {
	id  string
	ws  *websocket.Conn
	wmu sync.Mutex // one writer at a time on this socket

	smu      sync.Mutex
	sessions map[*session]struct{}

	done chan struct{}
}

// send writes one frame the way WriteJSON does, with a 2 s write deadline.
func (c *client) send(f wire.Frame) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.ws.SetWriteDeadline(time.Now().Add(writeWait))
	w, err := c.ws.NextWriter(websocket.TextMessage)
	if err != nil {
		return err
	}
	err1 := wire.Write(w, f, faultNoNL)
	err2 := w.Close()
	if err1 != nil {
		return err1
	}
	return err2
}

func (c *client) pingLoop() {
	t := time.NewTicker(pingEvery)
	defer t.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
			if err := c.send(wire.Bare("PING", "")); err != nil {
				return
			}
		}
	}
}

// ------------------------------------------------------------------- sessions

type session struct {
	id string
	mu sync.Mutex // held for membership changes and for every write to the session
	// members in the order they joined; a connection appears at most once.
	members []*client
}

// addLocked adds c if it is not yet a member. Caller holds s.mu.
func (s *session) addLocked(c *client) {
	for _, m := range s.members {
		if m == c {
			return
		}
	}
	s.members = append(s.members, c)
	c.smu.Lock()
	c.sessions[s] = struct{}{}
	c.smu.Unlock()
}

// removeLocked drops c from the member list. Caller holds s.mu.
func (s *session) removeLocked(c *client) {
	for i, m := range s.members {
		if m == c {
			s.members = append(s.members[:i:i], s.members[i+1:]...)
			return
		}
	}
}

type hub struct {
	mu       sync.Mutex
	sessions map[string]*session
	codes    map[string]*session // invite code -> session; single use, never expire
}

var relay = &hub{sessions: map[string]*session{}, codes: map[string]*session{}}

func (h *hub) get(sid string) *session {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sessions[sid]
}

func (h *hub) getOrCreate(sid string) *session {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.sessions[sid]
	if s == nil {
		s = &session{id: sid}
		h.sessions[sid] = s
	}
	return s
}

// create makes a new session and a code for it. A new code silently replaces
// an older live code with the same digits.
func (h *hub) create() (*session, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := &session{id: newID()}
	h.sessions[s.id] = s
	code := fmt.Sprintf("%06d", rand.Intn(1000000))
	h.codes[code] = s
	return s, code
}

// consume looks a code up and deletes it.
func (h *hub) consume(code string) *session {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.codes[code]
	if s != nil {
		delete(h.codes, code)
	}
	return s
}

// ------------------------------------------------------------------- dispatch

func (c *client) handle(f wire.Frame) {
	switch f.T {
	case "CREATE_SESSION":
		s, code := relay.create()
		s.mu.Lock()
		s.addLocked(c)
		_ = c.send(wire.InviteCode(s.id, code))
		s.mu.Unlock()
		logger.Printf("conn %s CREATE_SESSION sid=%s", c.id, short(s.id))

	case "JOIN":
		jd := wire.ParseJoin(f.Data)
		s := relay.consume(jd.Code)
		if s == nil {
			_ = c.send(wire.BadCode())
			logger.Printf("conn %s JOIN with unknown code", c.id)
			return
		}
		s.mu.Lock()
		s.addLocked(c)
		// JOIN_REQUEST goes to one other member: the earliest-joined one
		// still connected (normally the creator).
		told := false
		for _, m := range s.members {
			if m != c {
				_ = m.send(wire.JoinRequest(s.id, jd.PublicKey))
				told = true
				break
			}
		}
		s.mu.Unlock()
		logger.Printf("conn %s JOIN sid=%s creator told=%v", c.id, short(s.id), told)

	case "JOIN_ACCEPT":
		// Forwarded verbatim to every other member; the sender need not be one.
		n := c.toOthers(f.SID, f)
		logger.Printf("conn %s JOIN_ACCEPT sid=%s to %d", c.id, short(f.SID), n)

	case "JOIN_DENY":
		n := c.toOthers(f.SID, wire.Bare("JOIN_DENIED", f.SID))
		logger.Printf("conn %s JOIN_DENY sid=%s to %d", c.id, short(f.SID), n)

	case "REATTACH":
		s := relay.getOrCreate(f.SID)
		s.mu.Lock()
		s.addLocked(c)
		others := 0
		for _, m := range s.members {
			if m == c {
				continue
			}
			others++
			_ = m.send(wire.Bare("PEER_ONLINE", s.id))
			_ = c.send(wire.Bare("PEER_ONLINE", s.id))
		}
		s.mu.Unlock()
		logger.Printf("conn %s REATTACH sid=%s others=%d", c.id, short(s.id), others)

	case "MSG":
		s := relay.getOrCreate(f.SID)
		s.mu.Lock()
		s.addLocked(c)
		ok, tried := 0, 0
		for _, m := range s.members {
			if m == c {
				continue
			}
			tried++
			if m.send(f) == nil {
				ok++
			}
		}
		if ok > 0 {
			if !faultSkipDeliv {
				_ = c.send(wire.Bare("DELIVERED", s.id))
			}
		} else {
			_ = c.send(wire.Bare("DELIVERED_FAILED", s.id))
		}
		s.mu.Unlock()
		logger.Printf("conn %s MSG sid=%s %d bytes delivered %d/%d", c.id, short(s.id), len(f.Data), ok, tried)

	default:
		// PONG, INVITE_CREATE, empty or unknown t: ignored. The type string is
		// client-controlled, so only its length is logged.
		logger.Printf("conn %s ignored frame type (%d bytes)", c.id, len(f.T))
	}
}

// toOthers sends f to every member of session sid except c, if the session
// exists. It returns how many writes succeeded.
func (c *client) toOthers(sid string, f wire.Frame) int {
	s := relay.get(sid)
	if s == nil {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, m := range s.members {
		if m != c && m.send(f) == nil {
			n++
		}
	}
	return n
}

// leave removes c from each of its sessions and tells the remaining members.
// Sessions themselves are never deleted.
func (c *client) leave() {
	c.smu.Lock()
	list := make([]*session, 0, len(c.sessions))
	for s := range c.sessions {
		list = append(list, s)
	}
	c.sessions = map[*session]struct{}{}
	c.smu.Unlock()
	for _, s := range list {
		s.mu.Lock()
		s.removeLocked(c)
		for _, m := range s.members {
			_ = m.send(wire.Bare("PEER_OFFLINE", s.id))
		}
		s.mu.Unlock()
	}
}

// ----------------------------------------------------------------------- HTTP

var upgrader = websocket.Upgrader{
	// Any Origin; no subprotocols; compression off (the zero value).
	CheckOrigin: func(*http.Request) bool { return true },
}

func serveWS(w http.ResponseWriter, r *http.Request) {
	ws, err := upgrader.Upgrade(w, r, nil) // a non-upgrade request gets 400 from gorilla
	if err != nil {
		logger.Printf("upgrade refused: %v", err)
		return
	}
	c := &client{id: newID(), ws: ws, sessions: map[*session]struct{}{}, done: make(chan struct{})}
	logger.Printf("conn %s open", c.id)
	go c.pingLoop()
	for {
		_, rd, err := ws.NextReader()
		if err != nil {
			// Includes a client close frame, which gorilla's default close
			// handler has already answered with the same code, empty reason.
			break
		}
		f, err := wire.Decode(rd)
		if err != nil {
			logger.Printf("conn %s undecodable frame, dropping connection", c.id)
			break
		}
		c.handle(f)
	}
	close(c.done)
	_ = ws.Close() // TCP close, no close frame
	c.leave()
	logger.Printf("conn %s closed", c.id)
}

func main() {
	defAddr := os.Getenv("ADDR")
	if defAddr == "" {
		defAddr = "127.0.0.1:9000"
	}
	addr := flag.String("addr", defAddr, "listen address host:port (port 0 = any free port)")
	flag.DurationVar(&pingEvery, "ping", pingEvery, "interval of the PING frame sent to every connection")
	fault := flag.String("fault", "none", "deliberate fault for suite self-tests: none, no-newline, skip-delivered")
	flag.Parse()

	switch *fault {
	case "", "none":
	case "no-newline":
		faultNoNL = true
	case "skip-delivered":
		faultSkipDeliv = true
	default:
		fmt.Fprintf(os.Stderr, "go-relay: unknown -fault %q\n", *fault)
		os.Exit(2)
	}
	if pingEvery <= 0 {
		fmt.Fprintln(os.Stderr, "go-relay: -ping must be positive")
		os.Exit(2)
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-relay: %v\n", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stdout, "listening on %s\n", ln.Addr().String())
	logger.Printf("ping every %s, fault %s", pingEvery, *fault)
	if err := http.Serve(ln, http.HandlerFunc(serveWS)); err != nil {
		fmt.Fprintf(os.Stderr, "go-relay: %v\n", err)
		os.Exit(1)
	}
}
