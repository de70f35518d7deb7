#!/usr/bin/env bash
# Interleaved A/B of two parley relays (two venvs, e.g. two commits) under the same relayload
# throughput loads, so that a busy or noisy machine hits both alike:
#
#   OLD_VENV=/path/to/old/.venv NEW_VENV=.venv RELAYLOAD=/path/to/relayload bench/ab_throughput.sh [REPS] [LOADS]
#
# LOADS is a list of S:W pairs (default "100:1 100:16"). Each repetition runs every load against
# OLD then NEW (a fresh relay each time, pinned to CPU 0, relayload on CPU 1, 8 s each, loopback
# only) and appends relayload's JSON line to $OUT (default ab.jsonl); the end prints msgs/s per run,
# the medians and the median of the paired NEW/OLD ratios. Build relayload as bench/run does.
set -euo pipefail
REPS="${1:-3}"
LOADS="${2:-100:1 100:16}"
: "${OLD_VENV:?set OLD_VENV}" "${NEW_VENV:?set NEW_VENV}" "${RELAYLOAD:?set RELAYLOAD}"
OUT="${OUT:-ab.jsonl}"
PORT="${PORT:-19811}"
: >"$OUT"
one() { # $1 label $2 venv $3 sessions $4 window
  # all load comes from 127.0.0.1: the per-address limits off, as in bench/run
  env PARLEY_RELAY_STORE=:memory: PARLEY_RELAY_LOG_LEVEL=warning PARLEY_RELAY_JOINS_PER_ADDRESS=1000000 \
    PARLEY_RELAY_CONNS_PER_ADDRESS=1000000 PARLEY_RELAY_HANDSHAKES_PER_ADDRESS=1000000 \
    PARLEY_RELAY_MAX_HANDSHAKES=1000000 PARLEY_RELAY_CONNS_PER_PREFIX=1000000 \
    PARLEY_RELAY_HANDSHAKES_PER_PREFIX=1000000 PARLEY_RELAY_OUT_BYTES_PER_ADDRESS=0 \
    PARLEY_RELAY_OUT_BYTES_PER_PREFIX=0 PARLEY_RELAY_ADDRESS_SHARE=100 PARLEY_RELAY_PREFIX_SHARE=100 \
    PARLEY_RELAY_RESERVE=0 PARLEY_RELAY_JOINS_PER_PREFIX=1000000 PARLEY_RELAY_FAILED_JOINS=1000000000 \
    ADDR="127.0.0.1:$PORT" taskset -c 0 "$2/bin/python" -m parley.relay >/dev/null 2>&1 &
  local pid=$! i
  for i in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  taskset -c 1 "$RELAYLOAD" throughput -url "ws://127.0.0.1:$PORT/" -pid "$pid" -sessions "$3" -window "$4" \
    -duration 8s -label "$1 $3 $4" -out "$OUT" >/dev/null 2>&1 || true
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
}
for rep in $(seq "$REPS"); do
  for load in $LOADS; do
    one old "$OLD_VENV" "${load%:*}" "${load#*:}"
    one new "$NEW_VENV" "${load%:*}" "${load#*:}"
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    version, s, w = r["label"].split()
    runs[(int(s), int(w), version)].append(r["relayed_per_s"])
for s, w in sorted({(s, w) for s, w, _ in runs}):
    old, new = runs[(s, w, "old")], runs[(s, w, "new")]
    ratios = [n / o for n, o in zip(new, old) if o]
    print(f"S={s} W={w}: old {[round(x) for x in old]} median {statistics.median(old):,.0f}; "
          f"new {[round(x) for x in new]} median {statistics.median(new):,.0f}; "
          f"paired new/old median {statistics.median(ratios):.3f} (range {min(ratios):.2f}-{max(ratios):.2f})")
PY
