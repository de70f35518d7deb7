#!/usr/bin/env node
// Generates parley's crypto test vectors with Node's own `crypto` module.
//
//   node gen_vectors.js [--out FILE]      (default: stdout)
//
// Every value written comes out of Node's crypto (DiffieHellman objects and
// AES-256-GCM ciphers).  BigInt arithmetic is only used to *search* for
// private keys with rare properties (leading zero bytes in a secret or in a
// public key) and to cross-check what Node returned.  No npm dependencies.
'use strict';

const crypto = require('crypto');
const fs = require('fs');

const GROUP = 'modp14';
const group = crypto.getDiffieHellman(GROUP);
const PRIME = group.getPrime();
const PRIME_HEX = group.getPrime('hex');
const P = BigInt('0x' + PRIME_HEX);
const PRIME_BYTES = PRIME.length; // 256
const BITS = BigInt(PRIME_BYTES * 8); // 2048

function fail(msg) {
  throw new Error('gen_vectors: ' + msg);
}

function check(cond, msg) {
  if (!cond) fail(msg);
}

function toBig(hex) {
  return hex.length === 0 ? 0n : BigInt('0x' + hex);
}

// Minimal big-endian hex, even length, at least one byte.
function toHex(n) {
  let h = n.toString(16);
  if (h.length % 2) h = '0' + h;
  return h;
}

function modpow(base, exp, mod) {
  let result = 1n;
  base %= mod;
  while (exp > 0n) {
    if (exp & 1n) result = (result * base) % mod;
    base = (base * base) % mod;
    exp >>= 1n;
  }
  return result;
}

function randomBig(bytes) {
  return toBig(crypto.randomBytes(bytes).toString('hex'));
}

// A fresh random key pair from the named group, the way the legacy client makes one.
function randomPair() {
  const dh = crypto.getDiffieHellman(GROUP);
  dh.generateKeys();
  return dh;
}

// A key pair with a chosen private key, computed by Node.
function pairFromPrivate(priv) {
  const dh = crypto.createDiffieHellman(PRIME, 2);
  dh.setPrivateKey(Buffer.from(toHex(priv), 'hex'));
  dh.generateKeys();
  check(toBig(dh.getPrivateKey('hex')) === priv, 'Node changed a private key set with setPrivateKey');
  return dh;
}

function leadingZeroBytes(hex) {
  let n = 0;
  while (hex.startsWith('00'.repeat(n + 1))) n += 1;
  return n;
}

// Build one DH vector from two Node objects, checking everything twice.
function dhCase(name, a, b, note) {
  const aPriv = a.getPrivateKey('hex');
  const aPub = a.getPublicKey('hex');
  const bPriv = b.getPrivateKey('hex');
  const bPub = b.getPublicKey('hex');
  for (const [label, h] of [['a_public', aPub], ['b_public', bPub], ['a_private', aPriv], ['b_private', bPriv]]) {
    check(/^([0-9a-f]{2})+$/.test(h), `${name}: ${label} is not lowercase even-length hex`);
    check(!h.startsWith('00'), `${name}: ${label} is not minimal (leading zero byte)`);
  }
  check(modpow(2n, toBig(aPriv), P) === toBig(aPub), `${name}: a_public != 2^a_private mod p`);
  check(modpow(2n, toBig(bPriv), P) === toBig(bPub), `${name}: b_public != 2^b_private mod p`);
  const sa = a.computeSecret(bPub, 'hex');
  const sb = b.computeSecret(aPub, 'hex');
  check(sa.equals(sb), `${name}: the two directions disagree`);
  check(sa.length === PRIME_BYTES, `${name}: computeSecret returned ${sa.length} bytes, not ${PRIME_BYTES}`);
  const secret = sa.toString('hex');
  check(toBig(secret) === modpow(toBig(bPub), toBig(aPriv), P), `${name}: secret != b_public^a_private mod p`);
  return {
    name,
    a_private: aPriv,
    a_public: aPub,
    b_private: bPriv,
    b_public: bPub,
    secret,
    session_key: sa.subarray(0, 32).toString('hex'),
    note,
  };
}

// Walk private keys x, x+d, x+2d, ... of side A (against a fixed B) keeping
// 2^x and B^x up to date with one multiplication each, until `want(pub, secret)`.
function search(want, opts) {
  const limit = opts.limit || 4000000;
  for (let attempt = 0; attempt < 4; attempt++) {
    const a0 = randomPair();
    const b = randomPair();
    const bPub = toBig(b.getPublicKey('hex'));
    const d = opts.randomStep ? randomBig(8) | 1n : 1n;
    const stepPub = modpow(2n, d, P);
    const stepSecret = modpow(bPub, d, P);
    let x = toBig(a0.getPrivateKey('hex'));
    let pub = toBig(a0.getPublicKey('hex'));
    let secret = toBig(a0.computeSecret(b.getPublicKey()).toString('hex'));
    for (let i = 0; i < limit; i++) {
      if (want(pub, secret)) return { a: pairFromPrivate(x), b };
      x += d;
      if (opts.trackPub) pub = (pub * stepPub) % P;
      if (opts.trackSecret) secret = (secret * stepSecret) % P;
    }
  }
  return fail('search gave up (astronomically unlikely)');
}

// Value below 2^(bits-8k) but not below 2^(bits-8(k+1)): exactly k leading zero bytes of a 256-byte field.
function hasZeroBytes(v, k) {
  const hi = 1n << (BITS - 8n * BigInt(k));
  const lo = 1n << (BITS - 8n * BigInt(k + 1));
  return v < hi && v >= lo;
}

function buildDh() {
  const out = [];
  for (let i = 1; i <= 14; i++) {
    const c = dhCase(`random_${String(i).padStart(2, '0')}`, randomPair(), randomPair(),
      'random pair from getDiffieHellman("modp14")');
    const extra = [];
    if (c.a_public.length < 2 * PRIME_BYTES) extra.push(`a_public is ${c.a_public.length} hex chars`);
    if (c.b_public.length < 2 * PRIME_BYTES) extra.push(`b_public is ${c.b_public.length} hex chars`);
    if (c.secret.startsWith('00')) extra.push(`secret has ${leadingZeroBytes(c.secret)} leading zero byte(s)`);
    if (extra.length) c.note += ` (by chance: ${extra.join(', ')})`;
    out.push(c);
  }
  for (const k of [1, 2]) {
    const label = k === 1 ? 'one' : 'two';
    for (let i = 1; i <= 2; i++) {
      const { a, b } = search((pub, s) => hasZeroBytes(s, k), { trackSecret: true });
      const c = dhCase(`secret_${label}_zero_byte${k > 1 ? 's' : ''}_${i}`, a, b,
        `secret starts with exactly ${k} zero byte${k > 1 ? 's' : ''}; Node's computeSecret returns it ` +
        `left-padded to ${PRIME_BYTES} bytes, so the session key starts with ${'00'.repeat(k)}`);
      check(leadingZeroBytes(c.secret) === k && c.secret.length === 2 * PRIME_BYTES, `${c.name}: wrong shape`);
      out.push(c);
    }
  }
  const shortCases = [
    ['short_a_public_1', 1, false],
    ['short_a_public_2', 1, false],
    ['short_b_public_1', 1, true],
    ['short_a_public_two_bytes', 2, false],
  ];
  for (const [name, k, swap] of shortCases) {
    const found = search((pub) => hasZeroBytes(pub, k), { trackPub: true, randomStep: true });
    const [a, b] = swap ? [found.b, found.a] : [found.a, found.b];
    const c = dhCase(name, a, b,
      `${swap ? 'b' : 'a'}_public is ${PRIME_BYTES - k} bytes (${2 * (PRIME_BYTES - k)} hex chars): ` +
      'getPublicKey("hex") is minimal big-endian, not padded to 512 chars');
    const short = swap ? c.b_public : c.a_public;
    check(short.length === 2 * (PRIME_BYTES - k), `${name}: expected a ${PRIME_BYTES - k}-byte public key`);
    out.push(c);
  }
  return out;
}

function encrypt(keyHex, text, iv) {
  const key = Buffer.from(keyHex, 'hex');
  const cipher = crypto.createCipheriv('aes-256-gcm', key, iv);
  const ct = Buffer.concat([cipher.update(text, 'utf8'), cipher.final()]);
  return Buffer.concat([iv, cipher.getAuthTag(), ct]).toString('hex');
}

// What the legacy client's receive path does with a payload: Buffer.from(hex),
// IV = bytes 0..12, tag = 12..28, ciphertext = the rest.
function nodeDecrypt(keyHex, payloadHex) {
  const buf = Buffer.from(payloadHex, 'hex');
  const decipher = crypto.createDecipheriv('aes-256-gcm', Buffer.from(keyHex, 'hex'), buf.subarray(0, 12));
  decipher.setAuthTag(buf.subarray(12, 28));
  return Buffer.concat([decipher.update(buf.subarray(28)), decipher.final()]).toString('utf8');
}

function nodeOutcome(fn) {
  try {
    fn();
    return 'accepted';
  } catch (e) {
    return 'throws: ' + (e.code || e.message);
  }
}

function buildAes(dh) {
  const texts = [
    ['empty', ''],
    ['ascii', 'hello from parley'],
    ['emoji', 'ok \u{1F44D}\u{1F3FD} party \u{1F389} flag \u{1F1F3}\u{1F1F1} family \u{1F468}\u200D\u{1F469}\u200D\u{1F467}'],
    ['cjk', '\u4f60\u597d\uff0c\u4e16\u754c\u3002\u3053\u3093\u306b\u3061\u306f \uc548\ub155\ud558\uc138\uc694'],
    ['combining_marks', 'e\u0301 vs \u00e9, a\u0308o\u0308u\u0308, n\u0303, Z\u0324\u0354\u0367\u0311'],
    ['json_and_html_specials', '{"t":"MSG","sid":"x"} <b>&amp;</b> \'single\' "double" back\\slash /slash'],
    ['control_chars', 'line1\nline2\r\n\ttab \u0000 nul \u001f unit-sep \u007f del'],
    ['line_separators', 'before\u2028between\u2029after'],
    ['block_16_bytes', '0123456789abcdef'],
    ['block_17_bytes', '0123456789abcdefg'],
    ['one_byte', 'x'],
    ['text_64_kib', 'parley 64 KiB block. '.repeat(3120) + 'x'.repeat(65536 - 21 * 3120)],
  ];
  const out = [];
  texts.forEach(([name, text], i) => {
    const key = i % 3 === 2 ? crypto.randomBytes(32).toString('hex') : dh[i % dh.length].session_key;
    const iv = crypto.randomBytes(12);
    const payload = encrypt(key, text, iv);
    check(nodeDecrypt(key, payload) === text, `${name}: round trip failed`);
    out.push({ name, key, iv: iv.toString('hex'), plaintext: text, payload });
  });
  // Deterministic corners: all-zero IV, and a key with leading zero bytes from the DH search.
  const zeroIv = Buffer.alloc(12);
  const zk = dh.find((c) => c.session_key.startsWith('0000')) || dh[0];
  out.push({ name: 'zero_iv', key: zk.session_key, iv: zeroIv.toString('hex'), plaintext: 'zero iv',
    payload: encrypt(zk.session_key, 'zero iv', zeroIv) });
  check(out.find((c) => c.name === 'text_64_kib').plaintext.length === 65536, '64 KiB text has the wrong size');
  return out;
}

function buildInvalidKeys(dh) {
  const victim = pairFromPrivate(toBig(dh[0].a_private));
  let nonResidue = 2n;
  while (modpow(nonResidue, (P - 1n) / 2n, P) !== P - 1n) nonResidue += 1n;
  const cases = [
    ['zero', 0n],
    ['one', 1n],
    ['two', 2n],
    ['p_minus_2', P - 2n],
    ['p_minus_1', P - 1n],
    ['p', P],
    ['p_plus_1', P + 1n],
    ['p_plus_2', P + 2n],
    ['two_pow_2048', 1n << 2048n],
    [`quadratic_non_residue_${nonResidue}`, nonResidue],
  ];
  return cases.map(([name, y]) => {
    const pub = toHex(y);
    return { name, public: pub, node: nodeOutcome(() => victim.computeSecret(pub, 'hex')) };
  });
}

function flipNibble(hex, pos) {
  const c = parseInt(hex[pos], 16) ^ 0x1;
  return hex.slice(0, pos) + c.toString(16) + hex.slice(pos + 1);
}

function buildMalformed(dh) {
  const key = dh[0].session_key;
  const otherKey = dh[1].session_key;
  const good = encrypt(key, 'malformed payload base text', crypto.randomBytes(12));
  const emptyText = encrypt(key, '', crypto.randomBytes(12));
  const cases = [
    ['empty', key, '', 'no bytes at all (shorter than IV + tag)'],
    ['27_bytes', key, emptyText.slice(0, 54),
      '27 bytes: one short of IV + tag; cut from an empty-text payload, so Node verifies a 15-byte tag and accepts it'],
    ['16_bytes_4_byte_tag', key, emptyText.slice(0, 32),
      '16 bytes: IV + first 4 tag bytes of an empty-text payload; Node accepts 4-byte GCM tags'],
    ['27_bytes_nonempty', key, good.slice(0, 54), '27 bytes cut from a non-empty payload'],
    ['only_iv_and_tag', key, good.slice(0, 56), '28 bytes: IV and tag of a non-empty message, ciphertext missing'],
    ['odd_length_extra_nibble', key, good + 'a',
      'odd-length hex (a valid payload plus one hex digit); Buffer.from drops the last nibble'],
    ['odd_length_missing_nibble', key, good.slice(0, -1), 'odd-length hex (a valid payload minus its last hex digit)'],
    ['non_hex_inside', key, good.slice(0, 70) + 'zz' + good.slice(72), 'non-hex characters inside the ciphertext'],
    ['non_hex_trailing', key, good + 'zz',
      'a valid payload followed by non-hex characters; Buffer.from stops at the first one'],
    ['trailing_newline', key, good + '\n', 'a valid payload followed by a newline'],
    ['embedded_space', key, good.slice(0, 40) + ' ' + good.slice(40), 'a space inside the hex'],
    ['tag_flipped', key, flipNibble(good, 24 + 5), 'one bit of the tag flipped'],
    ['ciphertext_flipped', key, flipNibble(good, 56 + 3), 'one bit of the ciphertext flipped'],
    ['ciphertext_truncated', key, good.slice(0, -2), 'last ciphertext byte removed'],
    ['iv_flipped', key, flipNibble(good, 7), 'one bit of the IV flipped'],
    ['wrong_key', otherKey, good, 'a valid payload under a different session key'],
  ];
  return cases.map(([name, k, payload, why]) => ({
    name, key: k, payload, why, node: nodeOutcome(() => nodeDecrypt(k, payload)),
  }));
}

function main(argv) {
  let out = null;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--out' && i + 1 < argv.length) out = argv[++i];
    else if (argv[i].startsWith('--out=')) out = argv[i].slice(6);
    else fail(`unknown argument ${argv[i]} (usage: gen_vectors.js [--out FILE])`);
  }
  check(group.getGenerator('hex') === '02', 'modp14 generator is not 2');
  check(PRIME_BYTES === 256, 'modp14 prime is not 256 bytes');
  const dh = buildDh();
  const doc = {
    format: 1,
    node: process.version,
    group: GROUP,
    dh,
    aes: buildAes(dh),
    invalid_public_keys: buildInvalidKeys(dh),
    malformed_payloads: buildMalformed(dh),
  };
  const text = JSON.stringify(doc, null, 2) + '\n';
  if (out) fs.writeFileSync(out, text);
  else process.stdout.write(text);
}

try {
  main(process.argv.slice(2));
} catch (e) {
  process.stderr.write(`${e.message}\n`);
  process.exit(1);
}
