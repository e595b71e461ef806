#!/usr/bin/env bash
# Runs the benchmarks of issue #7 in one command and writes docs/benchmarks.md with its plot
# (docs/benchmarks.png), then the read benchmark from Django (python_client/benchmarks/read_latency.py)
# into its own section of that file. `--quick` is a smoke run that writes target/bench/ instead.
# Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (as scripts/test.sh), python3.
# Other arguments go to the bench: see `target/release/examples/bench --help`.
set -euo pipefail
cd "$(dirname "$0")/.."

out=docs
for arg in "$@"; do
  [ "$arg" = "--quick" ] && out=target/bench
done
mkdir -p "$out" target/bench

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
"$venv/bin/python" - "$out/benchmarks.md" "$django_out" <<'PY'
import sys
doc_path, result_path = sys.argv[1], sys.argv[2]
begin = "<!-- bench:django-reads:begin (written by scripts/bench.sh) -->"
end = "<!-- bench:django-reads:end -->"
doc = open(doc_path).read()
section = f"{begin}\n\n```\n{open(result_path).read().rstrip()}\n```\n\n{end}"
if begin in doc and end in doc:
    doc = doc[: doc.index(begin)] + section + doc[doc.index(end) + len(end) :]
else:
    doc += f"\n## Reads from Django\n\n`python_client/benchmarks/read_latency.py`, run by `scripts/bench.sh` on the release sidecar:\n\n{section}\n"
open(doc_path, "w").write(doc)
PY
