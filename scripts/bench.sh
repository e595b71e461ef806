#!/usr/bin/env bash
# Runs the benchmarks of issue #7 in one command and writes docs/benchmarks.md with its plot
# (docs/benchmarks.png), then the read benchmark from Django (python_client/benchmarks/read_latency.py)
# and the spread of ingest over a Redis Cluster's nodes (examples/ingest_redis_cpu.rs) into
# sections of their own of that file. `--quick` is a smoke run that writes target/bench/ instead;
# `--cluster` runs the cluster section alone (about 1 minute; other arguments are then ignored).
# Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (as scripts/test.sh), python3,
# and redis-server and redis-cli on the PATH.
# Other arguments go to the bench: see `target/release/examples/bench --help`.
set -euo pipefail
cd "$(dirname "$0")/.."

out=docs
only_cluster=
for arg in "$@"; do
  [ "$arg" = "--quick" ] && out=target/bench
  [ "$arg" = "--cluster" ] && only_cluster=1
done
mkdir -p "$out" target/bench

# Writes FILE's text into docs/benchmarks.md between the markers of SECTION, or appends the
# section under HEADING with INTRO the first time.
write_section() {
  python3 - "$out/benchmarks.md" "$@" <<'PY'
import os, sys
doc_path, section, result_path, heading, intro = sys.argv[1:]
begin = f"<!-- bench:{section}:begin (written by scripts/bench.sh) -->"
end = f"<!-- bench:{section}:end -->"
doc = open(doc_path).read() if os.path.exists(doc_path) else ""
block = f"{begin}\n\n```\n{open(result_path).read().rstrip()}\n```\n\n{end}"
if begin in doc and end in doc:
    doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
else:
    doc += f"\n## {heading}\n\n{intro}\n\n{block}\n"
open(doc_path, "w").write(doc)
PY
}

# On a Redis Cluster of its own (3 masters, 3 replicas; needs redis-cli): each node's Redis CPU per
# event and keys, 1,000,000 events in calls of 100 (100,000 with --quick); issue #16: the busiest
# master's share of the Redis CPU.
cluster_section() {
  cargo build --locked --release --example ingest_redis_cpu
  local result=target/bench/cluster_spread.txt events=1000000
  [ "$out" = docs ] || events=100000
  {
    echo "commit $(git rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'), $(redis-server --version | cut -d' ' -f3)"
    COUNTERSINK_BENCH_CLUSTER=1 target/release/examples/ingest_redis_cpu "$events"
  } | tee "$result"
  write_section cluster-spread "$result" "Ingest on a Redis Cluster: the load per node" \
    "\`COUNTERSINK_BENCH_CLUSTER=1 target/release/examples/ingest_redis_cpu 1000000\`, run by \`scripts/bench.sh\` (\`--cluster\` alone):"
}

if [ -n "$only_cluster" ]; then
  cluster_section
  exit 0
fi

cargo build --locked --release --bin countersink --example bench

# matplotlib for the plot, in a virtualenv of the bench's own.
venv=target/bench/venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet matplotlib
fi

target/release/examples/bench --command "scripts/bench.sh${*:+ $*}" --out "$out/benchmarks.md" --json target/bench/results.json "$@"
"$venv/bin/python" scripts/bench_plot.py target/bench/results.json "$out/benchmarks.png"

# From Django (python_client/benchmarks/read_latency.py): unread_count() against the ORM reads it
# replaces, on the release sidecar; its output goes into docs/benchmarks.md between its markers.
"$venv/bin/pip" install --quiet "./python_client[test]"
django_out=target/bench/django_reads.txt
COUNTERSINK_BIN="$PWD/target/release/countersink" "$venv/bin/python" python_client/benchmarks/read_latency.py | tee "$django_out"
write_section django-reads "$django_out" "Reads from Django" \
  "\`python_client/benchmarks/read_latency.py\`, run by \`scripts/bench.sh\` on the release sidecar:"

cluster_section
