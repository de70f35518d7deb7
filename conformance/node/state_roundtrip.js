#!/usr/bin/env node
// Reads a state file the way the legacy Node client does and writes it back the
// way it does: JSON.parse, then JSON.stringify(obj, null, 2) with no trailing
// newline.  Used to check that files parley writes survive a Node round trip.
//
//   node state_roundtrip.js IN OUT
'use strict';

const fs = require('fs');

const [inPath, outPath] = process.argv.slice(2);
if (!inPath || !outPath) {
  process.stderr.write('usage: state_roundtrip.js IN OUT\n');
  process.exit(2);
}
let obj;
try {
  obj = JSON.parse(fs.readFileSync(inPath, 'utf8'));
} catch (e) {
  process.stderr.write(`state_roundtrip: cannot parse ${inPath}: ${e.message}\n`);
  process.exit(1);
}
fs.writeFileSync(outPath, JSON.stringify(obj, null, 2));
