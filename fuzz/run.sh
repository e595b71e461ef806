#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target for a while each; CI runs `fuzz/run.sh 20`.
#
#   fuzz/run.sh [seconds per target, default 20]
#
# Environment:
#   FUZZ_SANITIZER  none (default: works on the stable toolchain as it is) or address (ASan:
#                   needs nightly flags, so RUSTC_BOOTSTRAP=1 is set for it on stable)
#   FUZZ_TARGETS    space-separated targets to run (default: every target in fuzz/Cargo.toml)
#
# Installs cargo-fuzz if it is missing. Each target starts from the committed seeds
# (fuzz/corpus/<target>) and every saved regression input (fuzz/regressions/<target>), uses the
# dictionary fuzz/dict/<target>.dict, grows a
# working corpus in fuzz/corpus-work/<target> (not committed), and writes any crash to
# fuzz/artifacts/<target>/. Prints one line per target; exits non-zero if any target crashed,
# timed out or failed to build. docs/fuzzing.md has the rest.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-20}"
case "$seconds" in '' | *[!0-9]*) echo "usage: fuzz/run.sh [seconds per target]" >&2; exit 2 ;; esac
sanitizer="${FUZZ_SANITIZER:-none}"
cargo_fuzz_version="0.13.2"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

# The countersink library links libpq (diesel's postgres backend), as scripts/test.sh knows.
if command -v dpkg >/dev/null 2>&1 && ! dpkg -s libpq-dev >/dev/null 2>&1; then
  echo "installing libpq-dev"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpq-dev >/dev/null
fi

if [ "$sanitizer" != none ] && ! rustc --version | grep -q -- '-nightly'; then
  # -Zsanitizer is a nightly flag; RUSTC_BOOTSTRAP=1 lets the stable compiler accept it.
  export RUSTC_BOOTSTRAP=1
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
logs="target/fuzz-logs"
mkdir -p "$logs"

start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "build (sanitizer: $sanitizer): $(($(date +%s) - start)) s"

failed=0
summary=()
for target in $targets; do
  mkdir -p "corpus-work/$target" "corpus/$target"
  corpora=("corpus-work/$target" "corpus/$target")
  if [ -d "regressions/$target" ]; then corpora+=("regressions/$target"); fi
  flags=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
  if [ -f "dict/$target.dict" ]; then flags+=(-dict="dict/$target.dict"); fi
  log="$logs/$target.log"
  status=0
  cargo fuzz run --sanitizer "$sanitizer" "$target" "${corpora[@]}" -- "${flags[@]}" >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  corpus=$(find "corpus-work/$target" -type f | wc -l)
  if [ "$status" -eq 0 ]; then
    summary+=("$target: ok, ${runs:-?} runs in ${seconds} s (${rate:-?} exec/s), working corpus ${corpus// /} inputs")
  else
    failed=1
    artifact=$(grep -o "Test unit written to .*" "$log" | tail -n 1 | sed 's/^Test unit written to //')
    summary+=("$target: FAILED (exit $status) after ${runs:-?} runs; input: ${artifact:-none saved}; log: fuzz/$log")
    {
      echo "---- $target failed (full log: fuzz/$log):"
      # The panic message (up to its backtrace), libFuzzer's verdict (timeout, leak, deadly
      # signal) and where the input was written, with cargo-fuzz's reproduce/minimise commands.
      awk '/panicked at/ { p = 1 } /^stack backtrace:|^note: / { p = 0 } p' "$log" | head -n 30
      grep -E '^==[0-9]+== ERROR|^SUMMARY|Test unit written to|^[[:space:]]+cargo fuzz ' "$log" || true
    } >&2
  fi
done

echo
echo "fuzz summary ($seconds s per target, sanitizer: $sanitizer):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
