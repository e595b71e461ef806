#!/usr/bin/env bash
# Runs the benchmarks of issue #7 in one command and writes docs/benchmarks.md with its plot
# (docs/benchmarks.png). `--quick` is a smoke run that writes target/bench/ instead.
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
