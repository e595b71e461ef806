#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target for a while each; CI runs `fuzz/run.sh 20`.
#
#   fuzz/run.sh [seconds per target, default 20]
#
# Environment:
#   FUZZ_SANITIZER  none (default; works on the stable toolchain as it is) or address (ASan,
#                   a nightly flag: RUSTC_BOOTSTRAP=1 is set for it on a stable compiler)
#   FUZZ_TARGETS    space-separated targets to run (default: every target in fuzz/Cargo.toml)
#   FUZZ_JOBS       fuzzing processes per target, sharing its corpus (libFuzzer's -jobs=N
#                   -workers=N; default 1). Use the machine's core count for long runs.
#
# Installs cargo-fuzz if it is missing. Each target starts from the committed seeds
# (fuzz/corpus/<target>) and every saved regression input (fuzz/regressions/<target>), uses
# the dictionary fuzz/dict/<target>.dict if there is one, grows a working corpus in
# fuzz/corpus-work/<target> (not committed) and writes any failing input to
# fuzz/artifacts/<target>/. Logs go to fuzz/target/fuzz-logs/. Prints one line per target
# and exits non-zero if any target crashed, hung (10 s per input), ran out of memory (2 GiB)
# or did not build. docs/fuzzing.md has the rest.
set -euo pipefail
cd "$(dirname "$0")"
fuzz_dir="$PWD"

seconds="${1:-20}"
jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-none}"
case "$seconds$jobs" in '' | *[!0-9]*) echo "usage: [FUZZ_JOBS=n] fuzz/run.sh [seconds per target]" >&2; exit 2 ;; esac
cargo_fuzz_version="0.13.2"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

# The targets link only the wire-format modules (fuzz/wire), none of the database clients.

if [ "$sanitizer" != none ] && ! rustc --version | grep -q -- '-nightly'; then
  # -Zsanitizer is a nightly flag; RUSTC_BOOTSTRAP=1 lets the stable compiler accept it.
  export RUSTC_BOOTSTRAP=1
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
logs="$fuzz_dir/target/fuzz-logs"
mkdir -p "$logs"

start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "build (sanitizer: $sanitizer): $(($(date +%s) - start)) s"

failed=0
summary=()
for target in $targets; do
  mkdir -p "corpus-work/$target" "corpus/$target"
  corpora=("$fuzz_dir/corpus-work/$target" "$fuzz_dir/corpus/$target")
  if [ -d "regressions/$target" ]; then corpora+=("$fuzz_dir/regressions/$target"); fi
  flags=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  if [ -f "dict/$target.dict" ]; then flags+=(-dict="$fuzz_dir/dict/$target.dict"); fi
  if [ "$jobs" -gt 1 ]; then flags+=(-jobs="$jobs" -workers="$jobs"); fi
  log="$logs/$target.log"
  # libFuzzer's -jobs writes fuzz-<job>.log into the working directory: give it one per target.
  work="$logs/$target.jobs"
  rm -rf "$work" && mkdir -p "$work"
  status=0
  (cd "$work" && cargo fuzz run --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer" "$target" "${corpora[@]}" \
    -- "${flags[@]}") >"$log" 2>&1 || status=$?
  for job_log in "$work"/fuzz-*.log; do
    if [ -f "$job_log" ]; then printf '\n---- %s\n' "${job_log##*/}" >>"$log" && cat "$job_log" >>"$log"; fi
  done
  # Summed over the jobs: one process without FUZZ_JOBS.
  runs=$(awk '/^stat::number_of_executed_units:/ { n += $2; seen = 1 } END { if (seen) print n }' "$log")
  rate=$(awk '/^stat::average_exec_per_sec:/ { n += $2; seen = 1 } END { if (seen) print n }' "$log")
  corpus=$(find "corpus-work/$target" -type f | wc -l)
  if [ "$status" -eq 0 ]; then
    summary+=("$target: ok, ${runs:-?} runs in $seconds s (${rate:-?} exec/s), working corpus ${corpus// /} inputs")
  else
    failed=1
    artifact=$(grep -o "Test unit written to .*" "$log" | tail -n 1 | sed 's/^Test unit written to //')
    summary+=("$target: FAILED (exit $status) after ${runs:-?} runs; input: ${artifact:-none saved}; log: $log")
    {
      echo "---- $target failed (full log: $log):"
      # The panic message (up to its backtrace), libFuzzer's verdict (timeout, out of memory,
      # deadly signal) and where the input was written, with the reproduce/minimise commands.
      awk '/panicked at/ { p = 1 } /^stack backtrace:|^note: / { p = 0 } p' "$log" | head -n 30
      grep -E '^==[0-9]+== ERROR|^SUMMARY|Test unit written to|^[[:space:]]+cargo fuzz ' "$log" || true
    } >&2
  fi
done

echo
echo "fuzz summary ($seconds s per target, sanitizer: $sanitizer, jobs: $jobs):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
