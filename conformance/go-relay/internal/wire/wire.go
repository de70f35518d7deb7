// Package wire holds the frame type and the byte-level read/write paths of the
// reference relay. The relay (../../main.go) and the re-encoder (../../reencode)
// both call these functions, so the re-encoder shows the exact bytes the relay
// puts on the wire.
//
// Reading mirrors gorilla's Conn.ReadJSON: a fresh json.Decoder over one
// message's reader, decoding the first JSON value into a fresh Frame. That
// gives Go's parsing rules: case-insensitive key match, last duplicate wins,
// bytes after the first value ignored, null leaving the struct empty.
//
// Writing mirrors gorilla's Conn.WriteJSON: json.NewEncoder(w).Encode(frame)
// into the message writer, which is then closed. The Encoder writes compact
// JSON, escapes <, >, & and U+2028/9, and appends one '\n'. If encoding fails
// it writes nothing, and closing the writer then sends an empty text message.
package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
)

// Frame is the envelope. Field order gives the output key order t, sid, data.
// sid is omitted when empty, data when absent (nil or zero length). Data is
// kept as the client's raw JSON text; the Encoder compacts and HTML-escapes it
// when writing but does not re-encode it.
type Frame struct {
	T    string          `json:"t"`
	SID  string          `json:"sid,omitempty"`
	Data json.RawMessage `json:"data,omitempty"`
}

// Decode reads one frame from one WebSocket message, as ReadJSON does.
// An empty message yields io.ErrUnexpectedEOF.
func Decode(r io.Reader) (Frame, error) {
	var f Frame
	err := json.NewDecoder(r).Decode(&f)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return f, err
}

// Write encodes f into w as WriteJSON does. The caller closes the message
// writer afterwards whatever the result, so an encoding error still produces
// an (empty) message. noNewline drops the Encoder's trailing '\n'; it exists
// only for the relay's -fault no-newline mode.
func Write(w io.Writer, f Frame, noNewline bool) error {
	if !noNewline {
		return json.NewEncoder(w).Encode(f)
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(f); err != nil {
		return err
	}
	_, err := w.Write(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
	return err
}

// JoinData is the part of a JOIN frame's data the relay reads. Decoding
// errors are ignored by the relay: whatever fields decoded are used.
type JoinData struct {
	Code      string `json:"code"`
	PublicKey string `json:"publicKey"`
}

// ParseJoin extracts code and publicKey from a JOIN frame's data the way the
// relay does (json.Unmarshal, error ignored).
func ParseJoin(data json.RawMessage) JoinData {
	var jd JoinData
	_ = json.Unmarshal(data, &jd)
	return jd
}

// JoinRequest builds the JOIN_REQUEST frame sent to the creator. Like the
// legacy relay, the key is pasted into JSON text without escaping; a key
// holding '"' or '\' therefore makes the data invalid JSON, the Encoder fails
// and the creator receives an empty text message.
func JoinRequest(sid, publicKey string) Frame {
	return Frame{T: "JOIN_REQUEST", SID: sid, Data: json.RawMessage(fmt.Sprintf(`{"publicKey":"%s"}`, publicKey))}
}

// InviteCode builds the reply to CREATE_SESSION.
func InviteCode(sid, code string) Frame {
	return Frame{T: "INVITE_CODE", SID: sid, Data: json.RawMessage(fmt.Sprintf(`{"code":"%s"}`, code))}
}

// BadCode is the reply to a JOIN with an unknown code (no sid).
func BadCode() Frame {
	return Frame{T: "ERROR", Data: json.RawMessage(`{"message":"Invalid or expired code"}`)}
}

// Bare builds a frame with only t and sid (PEER_ONLINE, DELIVERED, PING, ...).
func Bare(t, sid string) Frame {
	return Frame{T: t, SID: sid}
}
