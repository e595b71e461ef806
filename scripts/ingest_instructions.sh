#!/usr/bin/env bash
# Redis instructions per event of the apply script: examples/ingest_redis_cpu.rs against a private
# redis-server run under valgrind's callgrind, which counts the instructions the server executes.
# Unlike CPU time, the count does not move with other load on the machine, so two builds of the
# script can be compared on a busy machine, one after the other.
#
#   scripts/ingest_instructions.sh EVENTS EVENTS_PER_CALL [BINARY...]
#   scripts/ingest_instructions.sh 5000 1                 # this tree's example (built if needed)
#   COUNTERSINK_REQUESTS_PER_CALL=16 scripts/ingest_instructions.sh 5000 1   # group commits of 16 requests
#   scripts/ingest_instructions.sh 50000 100 /tmp/before /tmp/after
#
# BINARY is an ingest_redis_cpu binary (default: target/debug/examples/ingest_redis_cpu, built
# here); give two, built from two commits, to compare them on the same server. The count covers
# all the server does from the example's start to its end: its script loads, its EVALSHA calls and
# its clean-up (SCAN and UNLINK of its keys), so compare runs of the same size only.
# Needs valgrind (callgrind_control) and redis-server. Port: COUNTERSINK_CALLGRIND_PORT (6396).
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
events=$1
per_call=$2
shift 2
binaries=("$@")
if [ ${#binaries[@]} -eq 0 ]; then
  cargo build --example ingest_redis_cpu
  binaries=(target/debug/examples/ingest_redis_cpu)
fi
port=${COUNTERSINK_CALLGRIND_PORT:-6396}
out=$(mktemp -d)
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$out"' EXIT

valgrind --tool=callgrind --callgrind-out-file="$out/cg.%p" \
  redis-server --port "$port" --save '' --appendonly no >"$out/valgrind.log" 2>&1 &
server=$!
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.2
done

for binary in "${binaries[@]}"; do
  callgrind_control -z "$server" >/dev/null
  COUNTERSINK_TEST_REDIS_URL="redis://127.0.0.1:$port" "$binary" "$events" "$per_call" "${COUNTERSINK_REQUESTS_PER_CALL:-1}" >"$out/run.txt"
  callgrind_control -d "$server" >/dev/null
  sleep 1
  dump=$(ls -t "$out"/cg.* | head -1)
  total=$(grep -E '^(summary|totals):' "$dump" | head -1 | awk '{print $2}')
  echo "$binary: $((total / events)) instructions per event ($events events, $per_call per request, ${COUNTERSINK_REQUESTS_PER_CALL:-1} requests per call)"
  rm -f "$dump"
done
