#!/usr/bin/env bash
# Runs schemathesis against the real service and its own OpenAPI document: every operation,
# generated requests; fails on any 5xx or any response the document does not describe.
#   scripts/schemathesis.sh [max-examples]      (default 30; the binary: target/debug/countersink)
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-30}"
bin="${COUNTERSINK_BIN:-$PWD/target/debug/countersink}"
venv=target/schemathesis-venv
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
fi

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
prefix="schemathesis_$$"
COUNTERSINK_LOG=warn "$bin" --database-url "sqlite://$work/counts.sqlite3" --redis-prefix "$prefix" \
  serve --listen "127.0.0.1:$port" --flush-cron off --insecure-no-auth >"$work/serve.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  # Deleted inside Redis: generated requests put quotes and newlines into key names (a webhook-id),
  # which a shell pipe of key names would mangle.
  redis-cli -h 127.0.0.1 eval "for _, key in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', key) end" \
    0 "{$prefix}:*" >/dev/null || echo "schemathesis.sh: could not delete the test's Redis keys {$prefix}:*" >&2
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
# The live stream never ends by design (Server-Sent Events); tests/integration/live.rs covers it.
"$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" \
  --exclude-path '/v1/users/{user_id}/unread-count/stream' \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
  --max-examples "$examples" --no-color
