#!/usr/bin/env bash
# Single-user reads against the same process's /healthz, measured with wrk (32 connections, one wrk
# thread, two rounds of 8 s each): the hand check behind docs/design.md, *Merged reads*.
#
#   scripts/reads_wrk.sh [BINARY] [VARIABLE=VALUE ...]
#
# BINARY defaults to target/release/countersink; VARIABLE=VALUE settings go to the sidecar (for
# example COUNTERSINK_READ_CALLS_IN_FLIGHT=4). Starts a Redis of its own on REDIS_PORT (6395) and the
# sidecar on SIDECAR_PORT (18099), in a PostgreSQL schema of its own on 127.0.0.1:5432 (database
# test), holds the counts of 100,000 users (read once in bulk), then prints per round the
# requests/s of /healthz and of reads, their ratio and the reads' p99. Needs wrk, redis-server, psql.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/countersink}
shift || true
redis_port=${REDIS_PORT:-6395}
port=${SIDECAR_PORT:-18099}
for tool in wrk redis-server psql curl; do
  command -v "$tool" >/dev/null || { echo "reads_wrk.sh: $tool is not installed" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "reads_wrk.sh: no sidecar at $bin (cargo build --release --bin countersink)" >&2; exit 2; }
work=$(mktemp -d)
schema=reads_wrk_$$
sidecar=
cleanup() {
  [ -n "$sidecar" ] && kill "$sidecar" 2>/dev/null && wait "$sidecar" 2>/dev/null
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --dir "$work" >/dev/null
psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA $schema"
env "$@" COUNTERSINK_LISTEN="127.0.0.1:$port" COUNTERSINK_REDIS_URL="redis://127.0.0.1:$redis_port" \
  COUNTERSINK_REDIS_PREFIX="$schema" \
  COUNTERSINK_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3D$schema" \
  COUNTERSINK_WEBHOOK_SECRET="whsec_$(head -c32 /dev/urandom | base64)" \
  COUNTERSINK_ADMIN_TOKEN="reads-wrk-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
  COUNTERSINK_FLUSH_CRON=off RUST_LOG=warn "$bin" serve >"$work/sidecar.log" 2>&1 &
sidecar=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
for b in $(seq 0 99); do
  curl -sf "http://127.0.0.1:$port/v1/unread-counts?user_ids=$(seq -s, $((b * 1000 + 1)) $((b * 1000 + 1000)))" >/dev/null
done
cat >"$work/read.lua" <<'LUA'
math.randomseed(os.time())
request = function() return wrk.format("GET", "/v1/users/" .. math.random(1, 100000) .. "/unread-count") end
LUA
wrk -t1 -c32 -d3s "http://127.0.0.1:$port/healthz" >/dev/null
for round in 1 2; do
  healthz=$(wrk -t1 -c32 -d8s "http://127.0.0.1:$port/healthz" | awk '/Requests\/sec/ {print $2}')
  wrk -t1 -c32 -d8s --latency -s "$work/read.lua" "http://127.0.0.1:$port/" >"$work/reads.txt"
  reads=$(awk '/Requests\/sec/ {print $2}' "$work/reads.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/reads.txt")
  errors=$(awk '/Non-2xx/ {print $NF}' "$work/reads.txt")
  echo "round $round: /healthz $healthz req/s, reads $reads req/s = $(awk "BEGIN {printf \"%.0f\", 100 * $reads / $healthz}")%, p99 $p99, non-2xx ${errors:-0}"
done
