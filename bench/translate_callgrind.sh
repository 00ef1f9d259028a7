#!/usr/bin/env bash
# Instructions sluice spends per request, an OpenAI client against an Anthropic one
# (translated), through the bare config to the OpenAI mock: repeatable on a noisy machine,
# where CPU time is not. sluice runs under callgrind; counters are zeroed after a warm-up
# and dumped after N sequential requests, so start-up does not count.
#
#   bench/translate_callgrind.sh [N]      # default 2000 requests per client
#   SLUICE_BIN=/path/to/sluice bench/translate_callgrind.sh   # another build (A/B)
#
# Prints `openai_ir_per_request=… anthropic_ir_per_request=… difference=…` and leaves
# the profiles in target/bench/callgrind.{openai,anthropic}.out.requests for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
cargo build --release --quiet -p sluice --bin sluice
cargo build --release --quiet -p sluice-bench
sluice=${SLUICE_BIN:-$PWD/target/release/sluice}
client=$PWD/target/release/sluice-bench
out=$PWD/target/bench
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2; return 1
}

"$sluice" mock-upstream --listen 127.0.0.1:19000 --workers 1 >/dev/null 2>&1 & pids+=($!)
wait_port 19000
. bench/configs.sh
write_bench_configs "$work" 18000 19000

openai_body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
anthropic_body='{"model":"gpt-4o-mini","max_tokens":256,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'

# profile NAME PATH BODY: instructions per request, all of sluice's threads.
profile() {
  local name=$1 path=$2 body=$3 file=$out/callgrind.$1.out
  rm -f "$file"*
  valgrind --tool=callgrind --callgrind-out-file="$file" --dump-instr=no \
    "$sluice" serve --workers 1 --config "$work/bare.yaml" >"$work/$name.log" 2>&1 &
  local pid=$!
  wait_port 18000
  "$client" latency --url "http://127.0.0.1:18000$path" --requests 200 --warmup 0 --body "$body" --key fk-bench-key-0001 >/dev/null
  callgrind_control --zero "$pid" >/dev/null
  "$client" latency --url "http://127.0.0.1:18000$path" --requests "$n" --warmup 0 --body "$body" --key fk-bench-key-0001 >/dev/null
  callgrind_control --dump "$pid" >/dev/null
  # The dump just taken: the newest profile file.
  local dump; dump=$(ls -t "$file"* | head -1)
  cp "$dump" "$file.requests"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local total; total=$(sed -n 's/^summary: *//p; s/^totals: *//p' "$file.requests" | head -1)
  awk -v t="$total" -v n="$n" 'BEGIN {printf "%.0f", t / n}'
}

openai=$(profile openai /v1/chat/completions "$openai_body")
anthropic=$(profile anthropic /v1/messages "$anthropic_body")
echo "openai_ir_per_request=$openai anthropic_ir_per_request=$anthropic difference=$((anthropic - openai))"
