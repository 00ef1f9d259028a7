#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time and prints one summary line
# per target. Usage: scripts/fuzz.sh [seconds per target, default 60] [target ...]
#
# Stable Rust is enough: `cargo fuzz build -s none` passes only stable codegen flags
# (sanitizer-coverage passes, `--cfg fuzzing`), and libFuzzer itself is C++ built by
# libfuzzer-sys with the system's g++. No nightly, no RUSTC_BOOTSTRAP. What `-s none` gives up
# is AddressSanitizer, which needs nightly (-Zsanitizer); the code fuzzed here is safe Rust.
#
# Each target first replays fuzz/regressions/<target>/ (inputs that once failed), then
# fuzzes from its in-repo seeds (fuzz/seeds/<target>/, read only) into a scratch corpus
# under fuzz/corpus/. A failing input is kept under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all_targets=(shape_sse rewrite usage config admin_query multipart translate)
targets=("${@:-${all_targets[@]}}")

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi

echo "== building the fuzz targets (stable, no sanitizer, fuzz/target)"
started=$(date +%s)
(cd fuzz && cargo fuzz build -s none -O)
echo "== built in $(( $(date +%s) - started ))s"

host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="fuzz/target/$host/release"
summary=()
failed=0
for target in "${targets[@]}"; do
  bin="$bin_dir/$target"
  log="fuzz/artifacts/$target/last.log"
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"

  regressions=(fuzz/regressions/"$target"/*)
  regression_failures=()
  if [ -e "${regressions[0]}" ]; then
    for input in "${regressions[@]}"; do
      if ! "$bin" "$input" >"$log.regression" 2>&1; then
        regression_failures+=("$(basename "$input")")
        grep -m1 -A1 'panicked at' "$log.regression" | sed 's/^/    /' || true
      fi
    done
  else
    regressions=()
  fi

  status=ok
  if ! "$bin" "fuzz/corpus/$target" "fuzz/seeds/$target" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 >"$log" 2>&1; then
    status=failed
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
  line="fuzz $target: $status, ${runs:-?} runs in ${seconds}s, corpus $corpus"
  if [ "$status" = failed ]; then
    failed=1
    artifact=$(sed -n "s/.*Test unit written to \(.*\)$/\1/p" "$log" | tail -1)
    line+=", input ${artifact:-?}"
    grep -m1 -A1 'panicked at\|ERROR: libFuzzer' "$log" | sed 's/^/    /' || true
  fi
  line+=", regressions $(( ${#regressions[@]} - ${#regression_failures[@]} ))/${#regressions[@]} pass"
  if [ ${#regression_failures[@]} -gt 0 ]; then
    failed=1
    line+=" (failing: ${regression_failures[*]})"
  fi
  summary+=("$line")
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
