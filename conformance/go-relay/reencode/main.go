// Command reencode runs frames through the reference relay's own read and
// write code (package internal/wire), so other implementations can compare
// their codec with the bytes the relay really writes.
//
// Protocol, one request per input line, one answer line per request, flushed
// after every answer (so a caller may drive it interactively or in a batch):
//
//	<base64 of one message's raw bytes>
//	    decode as the relay reads a frame, encode as the relay writes it.
//	JOIN_REQUEST <base64 of a JOIN message's raw bytes>
//	    decode as the relay reads it, take data.code/data.publicKey the way
//	    the relay does, and encode the JOIN_REQUEST the relay would send the
//	    creator. The JOIN frame's own sid stands in for the session's SID.
//
// Answers:
//
//	OK <base64 of the exact bytes written>   (base64 may be empty: the relay
//	                                          writes an empty text message)
//	ERR <short reason>                        (the relay drops the connection)
//
// Base64 is the standard alphabet with padding. A blank line is an empty
// message (ERR). Frames with an empty t are re-encoded too, although the
// relay ignores them instead of writing anything.
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"strings"

	"parley.local/conformance/gorelay/internal/wire"
)

func answer(line string) string {
	joinReq := false
	if rest, ok := strings.CutPrefix(line, "JOIN_REQUEST "); ok {
		joinReq = true
		line = rest
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(line))
	if err != nil {
		return "ERR bad base64"
	}
	f, err := wire.Decode(bytes.NewReader(raw))
	if err != nil {
		return "ERR decode: " + clip(err.Error())
	}
	if joinReq {
		if f.T != "JOIN" {
			return "ERR not a JOIN frame"
		}
		f = wire.JoinRequest(f.SID, wire.ParseJoin(f.Data).PublicKey)
	}
	var out bytes.Buffer
	// An encode error leaves out empty, which is exactly what the relay
	// sends in that case (the message writer is closed with nothing in it).
	_ = wire.Write(&out, f, false)
	return "OK " + base64.StdEncoding.EncodeToString(out.Bytes())
}

func clip(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 80 {
		s = s[:80]
	}
	return s
}

func main() {
	in := bufio.NewReaderSize(os.Stdin, 1<<16)
	out := bufio.NewWriter(os.Stdout)
	for {
		line, err := in.ReadString('\n')
		if len(line) > 0 || err == nil {
			line = strings.TrimRight(line, "\r\n")
			fmt.Fprintln(out, answer(line))
			if ferr := out.Flush(); ferr != nil {
				os.Exit(1)
			}
		}
		if err == io.EOF {
			return
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "reencode:", err)
			os.Exit(1)
		}
	}
}
