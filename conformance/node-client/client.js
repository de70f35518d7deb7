#!/usr/bin/env node
// Reference Node client for parley's conformance tests.
//
// It behaves like the legacy Node chat client described in PROTOCOL.md 1.4
// (ws + crypto, DH modp14, AES-256-GCM, state-<Name>.json), but it is driven
// by flags and by JSON lines on stdin, and it reports what happens as JSON
// lines on stdout so a test harness can follow it.
//
//   node client.js --relay URL [--name NAME] [--state-dir DIR] [--reconnect-ms N] ROLE
//   ROLE: create | join CODE | resume | send TEXT
//
// stdin, one JSON object per line:  {"send": "text", "sid": "<optional>"}  or  {"quit": true}
// EOF on stdin does not stop the client; SIGTERM / SIGINT do.
//
// stdout events (one JSON object per line), e.g.
//   {"event":"connected"}  {"event":"session_created","sid":...}
//   {"event":"invite_code","sid":...,"code":...}
//   {"event":"key_established","sid":...,"fingerprint":<first 16 hex of sha256(key bytes)>}
//   {"event":"sent","sid":...,"msgID":...}   {"event":"message","sid":...,"text":...}
//   {"event":"decrypt_error","sid":...}      {"event":"frame","t":...}  (frames it ignores)
//   {"event":"disconnected"}
// Keys are never printed, only fingerprints.  Diagnostics go to stderr.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const readline = require('readline');
const WebSocket = require('ws');

const USAGE =
  'usage: client.js --relay URL [--name NAME] [--state-dir DIR] [--reconnect-ms N] ' +
  '(create | join CODE | resume | send TEXT)';

function die(msg, code = 2) {
  process.stderr.write(`client: ${msg}\n${USAGE}\n`);
  process.exit(code);
}

function parseArgs(argv) {
  const opts = { relay: null, name: 'node', stateDir: process.cwd(), reconnectMs: 3000, role: null, arg: null };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) die(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--relay') opts.relay = value();
    else if (a === '--name') opts.name = value();
    else if (a === '--state-dir') opts.stateDir = value();
    else if (a === '--reconnect-ms') opts.reconnectMs = Number(value());
    else if (a === '--') {
      rest.push(...argv.slice(i + 1));
      break;
    }
    else if (a.startsWith('--')) die(`unknown option ${a}`);
    else rest.push(a);
  }
  if (!opts.relay) die('--relay is required');
  if (!Number.isFinite(opts.reconnectMs) || opts.reconnectMs < 0) die('--reconnect-ms must be a number >= 0');
  const [role, ...args] = rest;
  if (role === 'create' || role === 'resume') {
    if (args.length) die(`${role} takes no argument`);
  } else if (role === 'join' || role === 'send') {
    if (args.length !== 1) die(`${role} takes exactly one argument`);
    opts.arg = args[0];
  } else {
    die(role ? `unknown role ${role}` : 'a role is required');
  }
  opts.role = role;
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const statePath = path.join(opts.stateDir, `state-${opts.name}.json`);

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function warn(msg) {
  process.stderr.write(`client: ${msg}\n`);
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

// ---------------------------------------------------------------- state file
// Same format and the same habits as the legacy client: a JSON object keyed by
// SID, written with JSON.stringify(state, null, 2), no trailing newline, not
// atomically; a file that cannot be read or parsed is silently replaced by {}.
function loadState() {
  try {
    const v = JSON.parse(fs.readFileSync(statePath, 'utf8'));
    if (isObject(v)) return v;
  } catch (e) {
    // legacy quirk: fall through to an empty state, no message
  }
  return {};
}

let state = loadState();

function saveState() {
  fs.writeFileSync(statePath, JSON.stringify(state, null, 2));
}

function usableSid(sid) {
  return typeof sid === 'string' && sid !== '' && sid !== '__proto__';
}

// The session entry for sid, created as {"outbox": []} when unknown.
function entry(sid) {
  if (!Object.prototype.hasOwnProperty.call(state, sid) || !isObject(state[sid])) {
    state[sid] = { outbox: [] };
    saveState();
  }
  const e = state[sid];
  if (!Array.isArray(e.outbox)) e.outbox = [];
  return e;
}

function keyOf(sid) {
  if (!Object.prototype.hasOwnProperty.call(state, sid) || !isObject(state[sid])) return null;
  const k = state[sid].key;
  return typeof k === 'string' && /^[0-9a-fA-F]{64}$/.test(k) ? k : null;
}

function keyedSids() {
  return Object.keys(state).filter((sid) => usableSid(sid) && keyOf(sid));
}

function fingerprint(keyHex) {
  return crypto.createHash('sha256').update(Buffer.from(keyHex, 'hex')).digest('hex').slice(0, 16);
}

// ---------------------------------------------------------------- crypto
function newKeyPair() {
  const dh = crypto.getDiffieHellman('modp14');
  dh.generateKeys();
  return dh;
}

// One key pair per start of the role; replaced on every INVITE_CODE.
let dh = newKeyPair();

function encrypt(keyHex, text) {
  const iv = crypto.randomBytes(12);
  const cipher = crypto.createCipheriv('aes-256-gcm', Buffer.from(keyHex, 'hex'), iv);
  const ct = Buffer.concat([cipher.update(text, 'utf8'), cipher.final()]);
  return Buffer.concat([iv, cipher.getAuthTag(), ct]).toString('hex');
}

function decrypt(keyHex, payloadHex) {
  const buf = Buffer.from(payloadHex, 'hex');
  const decipher = crypto.createDecipheriv('aes-256-gcm', Buffer.from(keyHex, 'hex'), buf.subarray(0, 12));
  decipher.setAuthTag(buf.subarray(12, 28));
  return Buffer.concat([decipher.update(buf.subarray(28)), decipher.final()]).toString('utf8');
}

// Computes and stores the session key from the peer's public key.  Returns false on failure.
function establishKey(sid, peerPublicHex) {
  if (typeof peerPublicHex !== 'string') {
    warn(`no peer public key for session ${sid}`);
    emit({ event: 'key_error', sid });
    return false;
  }
  let secret;
  try {
    secret = dh.computeSecret(peerPublicHex, 'hex');
  } catch (e) {
    warn(`computeSecret failed for session ${sid}: ${e.code || e.message}`);
    emit({ event: 'key_error', sid });
    return false;
  }
  const key = secret.subarray(0, 32).toString('hex');
  entry(sid).key = key;
  saveState();
  emit({ event: 'key_established', sid, fingerprint: fingerprint(key) });
  return true;
}

// ---------------------------------------------------------------- connection
let ws = null;
let roleDone = false;
let quitting = false;
let reconnectTimer = null;
let currentSid = null; // the session typed text goes to when no sid is given
const unplaced = []; // text typed before any session exists

function isOpen() {
  return ws !== null && ws.readyState === WebSocket.OPEN;
}

function sendFrame(frame) {
  if (!isOpen()) {
    warn(`not connected; ${frame.t} not sent`);
    return false;
  }
  ws.send(JSON.stringify(frame));
  return true;
}

function sendEncrypted(sid, text) {
  const msgID = crypto.randomBytes(4).toString('hex');
  const payload = encrypt(keyOf(sid), text);
  if (sendFrame({ t: 'MSG', sid, data: { payload, msgID } })) {
    emit({ event: 'sent', sid, msgID });
    return true;
  }
  return false;
}

// Sends text now when the session has a key and the socket is open; otherwise
// keeps it as plaintext in the session's outbox in the state file.
function sendText(sid, text) {
  const e = entry(sid);
  if (keyOf(sid) && isOpen()) {
    sendEncrypted(sid, text);
    return;
  }
  e.outbox.push(text);
  saveState();
  emit({ event: 'outboxed', sid });
}

function flushOutbox(sid) {
  if (!keyOf(sid) || !isOpen()) return;
  const e = entry(sid);
  while (e.outbox.length && isOpen()) {
    const text = e.outbox[0];
    if (typeof text === 'string') sendEncrypted(sid, text);
    e.outbox.shift();
    saveState();
  }
}

function setCurrent(sid) {
  currentSid = sid;
  if (unplaced.length) {
    entry(sid).outbox.push(...unplaced.splice(0));
    saveState();
  }
}

function roleAction() {
  if (opts.role === 'create') {
    sendFrame({ t: 'CREATE_SESSION' });
  } else if (opts.role === 'join') {
    sendFrame({ t: 'JOIN', data: { code: opts.arg, publicKey: dh.getPublicKey('hex') } });
  } else if (opts.role === 'send') {
    const sid = keyedSids()[0];
    if (!sid) {
      warn(`no session with a key in ${statePath}; nothing sent`);
      return;
    }
    sendText(sid, opts.arg);
  }
}

function onOpen() {
  emit({ event: 'connected' });
  const keyed = keyedSids();
  for (const sid of keyed) {
    sendFrame({ t: 'REATTACH', sid });
    emit({ event: 'reattach', sid });
  }
  if (currentSid === null && keyed.length) currentSid = keyed[0];
  if (!roleDone) {
    roleDone = true;
    roleAction();
  }
  for (const sid of keyed) flushOutbox(sid);
}

function onFrame(raw) {
  let f;
  try {
    f = JSON.parse(raw.toString('utf8'));
  } catch (e) {
    warn(`frame is not JSON (${raw.length} bytes), ignored`);
    return;
  }
  if (!isObject(f)) return;
  const t = f.t;
  const sid = usableSid(f.sid) ? f.sid : undefined;
  const data = isObject(f.data) ? f.data : {};
  if (sid !== undefined) entry(sid); // any frame with an unknown SID adds {"outbox": []}

  switch (t) {
    case 'SESSION_CREATED':
      if (!sid) break;
      setCurrent(sid);
      emit({ event: 'session_created', sid });
      sendFrame({ t: 'INVITE_CREATE', sid });
      return;
    case 'INVITE_CODE':
      if (!sid) break;
      setCurrent(sid);
      emit({ event: 'invite_code', sid, code: data.code });
      dh = newKeyPair();
      sendFrame({
        t: 'INVITE_CREATE',
        sid,
        data: { prime: dh.getPrime('hex'), generator: dh.getGenerator('hex'), publicKey: dh.getPublicKey('hex') },
      });
      return;
    case 'JOIN_REQUEST':
      if (!sid) break;
      if (keyOf(sid)) {
        emit({ event: 'frame', t, sid, ignored: 'session already has a key' });
        return;
      }
      if (establishKey(sid, data.publicKey || data.bobPubKey)) {
        sendFrame({ t: 'JOIN_ACCEPT', sid, data: { clientID: data.clientID, publicKey: dh.getPublicKey('hex') } });
        flushOutbox(sid);
      }
      return;
    case 'JOINED':
      if (!sid) break;
      if (keyOf(sid)) {
        emit({ event: 'frame', t, sid, ignored: 'session already has a key' });
        return;
      }
      setCurrent(sid);
      if (establishKey(sid, data.publicKey || data.alicePubKey)) flushOutbox(sid);
      return;
    case 'MSG': {
      if (!sid) break;
      const key = keyOf(sid);
      if (!key || typeof data.payload !== 'string') {
        emit({ event: 'decrypt_error', sid, reason: key ? 'no payload' : 'no key' });
        return;
      }
      let text;
      try {
        text = decrypt(key, data.payload);
      } catch (e) {
        emit({ event: 'decrypt_error', sid });
        return;
      }
      const ev = { event: 'message', sid, text };
      if (typeof data.msgID === 'string') ev.msgID = data.msgID;
      emit(ev);
      return;
    }
    case 'PING':
      sendFrame({ t: 'PONG' });
      emit({ event: 'ping' });
      return;
    default:
      break;
  }
  // JOIN_ACCEPT, DELIVERED, DELIVERED_FAILED, PEER_ONLINE, PEER_OFFLINE, ERROR,
  // JOIN_DENIED and anything else: ignored, reported for the tests.
  const ev = { event: 'frame', t };
  if (sid !== undefined) ev.sid = sid;
  if (t === 'ERROR' && typeof data.message === 'string') ev.message = data.message;
  if (t === 'ERROR' && typeof data.code === 'string') ev.code = data.code;
  emit(ev);
}

function connect() {
  reconnectTimer = null;
  const sock = new WebSocket(opts.relay);
  ws = sock;
  sock.on('open', onOpen);
  sock.on('message', (raw) => onFrame(raw));
  sock.on('error', (e) => warn(`websocket error: ${e.code || e.message}`));
  sock.on('close', (code) => {
    if (ws === sock) ws = null;
    emit({ event: 'disconnected', code });
    if (quitting) {
      process.exit(0);
    } else if (reconnectTimer === null) {
      reconnectTimer = setTimeout(connect, opts.reconnectMs);
    }
  });
}

function quit() {
  if (quitting) return;
  quitting = true;
  if (reconnectTimer !== null) clearTimeout(reconnectTimer);
  if (ws !== null && (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING)) {
    try {
      ws.close(1000);
    } catch (e) {
      // CONNECTING sockets throw on close in some versions; exiting anyway
    }
    setTimeout(() => process.exit(0), 500).unref();
  } else {
    process.exit(0);
  }
}

// ---------------------------------------------------------------- stdin
const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on('line', (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    warn('stdin line is not JSON, ignored');
    return;
  }
  if (!isObject(cmd)) return;
  if (cmd.quit) {
    quit();
    return;
  }
  if (typeof cmd.send === 'string') {
    const sid = usableSid(cmd.sid) ? cmd.sid : currentSid || keyedSids()[0] || null;
    if (sid === null) {
      unplaced.push(cmd.send);
      emit({ event: 'outboxed', sid: null });
      return;
    }
    sendText(sid, cmd.send);
  }
});
rl.on('close', () => {
  // EOF on stdin: keep running (tests may close stdin).
});

process.on('SIGTERM', quit);
process.on('SIGINT', quit);

connect();
