#!/usr/bin/env bash
# sluice's benchmark: the mock upstream directly and sluice in front of it, side by side,
# in two configurations (bare and full). Prints a table; writes it to target/bench/latest.md.
#
#   bench/run.sh            # everything (about 8 minutes)
#   bench/run.sh --quick    # shorter runs, no 5k/10k stream steps
#   bench/run.sh --peers    # also measure crabllm, openai-forward and LiteLLM (installed
#                           # into bench/peers/, git-ignored)
#   bench/run.sh --cache    # only the response cache: a hit against pass-through (about
#                           # 1 minute; its own table in target/bench/cache.md)
#   bench/run.sh --anthropic  # also an Anthropic client (/v1/messages) through the bare
#                           # config to the OpenAI mock: what translation adds
#   bench/run.sh --held     # only the held streams (memory per stream), bare and full:
#                           # 1k, 5k and 10k steps (--quick: 1k); target/bench/held.md
#   bench/run.sh --anthropic-only  # only that comparison: bare with an OpenAI client and
#                           # an Anthropic one, and translation in process (about 2 minutes
#                           # with --quick; no direct, full, busy-poll or held-stream runs)
#   bench/run.sh --tail     # only the tail figures (about 3 minutes): latency at c=1 and
#                           # the open-loop rate sweep, direct, bare and full; its own
#                           # table in target/bench/tail.md
#   bench/run.sh --http2    # only HTTP/2: held streams to an upstream over HTTP/1.1 and
#                           # h2c (and h2c to a mock allowing 100 streams per connection,
#                           # on 19003), and the listener over HTTP/1.1, h2c, TLS and h2
#                           # (about 4 minutes; its own table in target/bench/http2.md)
#
# sluice runs pinned to core 0 with one worker thread; the mock upstream and the load
# generators share core 1, so the figures mean something on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

quick=0
peers=0
cache=0
anthropic=0
held_only=0
anthropic_only=0
tail=0
http2=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --peers) peers=1 ;;
    --cache) cache=1 ;;
    --anthropic) anthropic=1 ;;
    --held) held_only=1 ;;
    --anthropic-only) anthropic=1; anthropic_only=1 ;;
    --tail) tail=1 ;;
    --http2) http2=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if ! command -v wrk >/dev/null; then
  echo "== installing wrk"
  apt_get="apt-get"; [ "$(id -u)" = 0 ] || apt_get="sudo apt-get"
  $apt_get update -qq && DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq wrk >/dev/null
fi
# Another build for an A/B in one session: SLUICE_BIN=… [SLUICE_BENCH_BIN=…] bench/run.sh …
# (the release build is then left as it is).
if [ -z "${SLUICE_BIN:-}" ]; then
  echo "== building (release)"
  cargo build --release --quiet -p sluice --bin sluice && cargo build --release --quiet -p sluice-bench
fi
sluice=${SLUICE_BIN:-$root/target/release/sluice}
client=${SLUICE_BENCH_BIN:-$root/target/release/sluice-bench}
out=$root/target/bench
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  cp "$work"/*.log "$out/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

core_gw=0
core_load=1
if [ "$(nproc)" -lt 2 ]; then core_load=0; fi
load() { taskset -c "$core_load" "$@"; }

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 did not open" >&2; return 1
}

# Mock upstreams on the load core: plain answers, TTFT streams, long-held streams.
# Started with taskset itself in the background (not through `load`, whose subshell's pid
# `$!` would be), so `cleanup` stops the mocks and no earlier run's mock holds a port.
taskset -c "$core_load" "$sluice" mock-upstream --listen 127.0.0.1:19000 --workers 1 >/dev/null 2>&1 & pids+=($!)
taskset -c "$core_load" "$sluice" mock-upstream --listen 127.0.0.1:19001 --workers 1 --chunks 64 --interval 20ms >/dev/null 2>&1 & pids+=($!)
taskset -c "$core_load" "$sluice" mock-upstream --listen 127.0.0.1:19002 --workers 1 --chunks 16 --interval 1s >/dev/null 2>&1 & pids+=($!)
wait_port 19000; wait_port 19001; wait_port 19002

body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
stream_body='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
# The same request as an Anthropic client sends it (--anthropic), translated by sluice.
anthropic_body='{"model":"gpt-4o-mini","max_tokens":256,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
anthropic_stream_body='{"model":"gpt-4o-mini","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
api_path=/v1/chat/completions
# as_anthropic CMD...: runs CMD with the Anthropic path and bodies.
as_anthropic() {
  local saved_body=$body saved_stream=$stream_body
  api_path=/v1/messages; body=$anthropic_body; stream_body=$anthropic_stream_body
  "$@"
  api_path=/v1/chat/completions; body=$saved_body; stream_body=$saved_stream
}

busy_poll=${BENCH_BUSY_POLL:-0}
poll_window=300us
# bare and full (bench/configs.sh), the same port numbers for each mock.
. "$root/bench/configs.sh"
write_bench_configs "$work" 18000 19000 ", busy_poll: $busy_poll"

declare -A R
kv() { sed -n "s/.*\b$2=\([^ ]*\).*/\1/p" <<<"$1"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_sec=$(getconf CLK_TCK)

latency_n=5000; wrk_secs=5; rate_secs=2; ttft_streams=30
[ "$quick" = 1 ] && { latency_n=2000; wrk_secs=3; rate_secs=1; ttft_streams=10; }

# measure NAME URL KEY PID(or empty): fills R[NAME.*]
measure() {
  local name=$1 base=$2 key=$3 pid=${4:-}
  local url="$base$api_path"
  echo "== $name: latency at concurrency 1"
  local line; line=$(load "$client" latency --url "$url" --requests "$latency_n" --body "$body" ${key:+--key "$key"})
  R[$name.p50]=$(kv "$line" p50_us); R[$name.p99]=$(kv "$line" p99_us)
  echo "   $line"

  [ "$tail" = 1 ] || saturation "$name" "$url" "$key" "$base" "$pid"
  sweep "$name" "$url" "$key"
}

# saturation NAME URL KEY BASE PID(or empty): wrk at 64 connections, and CPU per request.
saturation() {
  local name=$1 url=$2 key=$3 base=$4 pid=$5
  echo "== $name: throughput at saturation (wrk, 64 connections, ${wrk_secs}s)"
  local before=0; [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  local written0; written0=$(log_figure "$base" written)
  local wrk_out; wrk_out=$(BENCH_BODY="$body" BENCH_KEY="$key" load wrk -t1 -c64 -d"${wrk_secs}s" -s bench/post.lua "$url")
  local rps; rps=$(awk '/Requests\/sec/ {print $2}' <<<"$wrk_out")
  local total; total=$(awk '/requests in/ {print $1}' <<<"$wrk_out")
  local non2xx; non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$wrk_out"); non2xx=${non2xx:-0}
  R[$name.rps]=${rps%.*}
  echo "   ${rps} req/s, ${total} requests, non-2xx: ${non2xx}"
  local written1; written1=$(log_figure "$base" written)
  [ -n "$written0" ] && R[$name.log_rps]=$(( (written1 - written0) / wrk_secs ))
  if [ -n "$pid" ]; then
    # The log writer may still be busy with the burst: its work counts too.
    for _ in $(seq 1 600); do
      local queued; queued=$(curl -s "$base/v1/status" | sed -n 's/.*"queued":\([0-9]*\).*/\1/p')
      [ -z "$queued" ] || [ "$queued" = 0 ] && break
      sleep 0.1
    done
    local after; after=$(cpu_ticks "$pid")
    R[$name.cpu]=$(awk -v t=$((after - before)) -v hz="$ticks_per_sec" -v n="$total" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    echo "   CPU per request: ${R[$name.cpu]} µs"
    if [ -n "$written0" ]; then log_kept "$name" "$base" burst; fi
  fi
}

# The open-loop sweep, lowest rate first; each step sends at least 1,000 requests, so its
# p99 is not one unlucky request. A failed step does not end the sweep, two in a row do:
# on a VM a low step can fail on a handful of wake-ups of a halted vCPU (bare and direct
# too) while every step above it passes. The failed steps below the highest passing one
# are reported beside it, not hidden.
rates="250 500 1000 2000 4000 6000 8000 10000 12000 15000 20000 25000 30000 40000"
lowest_rate=${rates%% *}
# sweep NAME URL KEY: fills R[NAME.rate], the highest rate whose p99 stays under 1 ms, and
# R[NAME.below], the failed steps under it ("rate: n over 1 ms", comma-separated).
sweep() {
  local name=$1 url=$2 key=$3 line
  echo "== $name: highest rate with p99 under 1 ms"
  local best=0 failed=0 below="" pending=""
  for rate in $rates; do
    local secs; secs=$(awk -v s="$rate_secs" -v r="$rate" 'BEGIN {m = 1000 / r; print (s > m ? s : m)}')
    line=$(load "$client" rate --url "$url" --rate "$rate" --seconds "$secs" --connections 32 --body "$body" ${key:+--key "$key"})
    local p99 achieved; p99=$(kv "$line" p99_us); achieved=$(kv "$line" achieved_rps)
    echo "   $line"
    if awk -v p="$p99" -v a="$achieved" -v r="$rate" 'BEGIN {exit !(p < 1000 && a >= 0.95 * r)}'; then
      best=$rate; failed=0; below="$below${below:+${pending:+, }}$pending"; pending=""
    else
      failed=$((failed + 1)); pending="$pending${pending:+, }$rate: $(kv "$line" over_1ms) over 1 ms"
      [ "$failed" -ge 2 ] && break
    fi
  done
  R[$name.rate]=$best
  R[$name.below]=${below#, }
}
# rate_cell NAME: the sweep's figure with the failed steps below it, if any.
rate_cell() { echo "${R[$1.rate]}${R[$1.below]:+ (failed below: ${R[$1.below]})}"; }

# The request log's figures from /v1/status (empty without a log).
log_figure() { curl -s "$1/v1/status" | sed -n "s/.*\"log\":{[^}]*\"$2\":\([0-9]*\).*/\1/p"; }
# log_kept NAME BASE STEP: R[NAME.STEP_kept] = "written / answered (lost)", once drained;
# every answered request is written, shed (storage.overflow) or dropped (refused).
log_kept() {
  local written dropped shed
  written=$(log_figure "$2" written); dropped=$(log_figure "$2" dropped); shed=$(log_figure "$2" shed)
  R[$1.$3_kept]="$written / $((written + dropped + shed)) ($((dropped + shed)) lost)"
  echo "   request log after the $3: written / answered (lost): ${R[$1.$3_kept]}"
}
# log_half NAME BASE KEY: an open-loop run at half the measured saturation rate; the log
# must lose nothing of it.
log_half() {
  local name=$1 base=$2 key=$3 secs=$((wrk_secs * 2))
  local rate=$(( ${R[$name.rps]} / 2 )) lost0 written0
  lost0=$(( $(log_figure "$base" dropped) + $(log_figure "$base" shed) )); written0=$(log_figure "$base" written)
  echo "== $name: the request log at half of saturation ($rate req/s, ${secs}s)"
  local line; line=$(load "$client" rate --url "$base$api_path" --rate "$rate" --seconds "$secs" --connections 32 --body "$body" ${key:+--key "$key"})
  echo "   $line"
  for _ in $(seq 1 600); do
    [ "$(log_figure "$base" queued)" = 0 ] && break
    sleep 0.1
  done
  local lost; lost=$(( $(log_figure "$base" dropped) + $(log_figure "$base" shed) - lost0 ))
  R[$name.half]="$rate req/s: $(( $(log_figure "$base" written) - written0 )) written, $lost lost"
  echo "   ${R[$name.half]}"
}

# ttft NAME BASE KEY: TTFT and chunk gaps on 64-chunk streams, 20 ms apart.
ttft() {
  local name=$1 base=$2 key=$3
  echo "== $name: time to first token, $ttft_streams streams of 64 chunks 20 ms apart"
  local line; line=$(load "$client" streams --url "$base$api_path" --count "$ttft_streams" --chunks 64 --ramp 1 --body "$stream_body" ${key:+--key "$key"})
  echo "   $line"
  R[$name.ttft50]=$(kv "$line" ttft_p50_us); R[$name.ttft99]=$(kv "$line" ttft_p99_us); R[$name.gap]=$(kv "$line" gap_mean_us)
}

# held NAME PID COUNT IDLE_KIB: COUNT concurrent 16-chunk streams (1 s apart) through
# sluice; the peak RSS, the memory per stream ((peak - idle) / count) and the RSS 2 s
# after the last stream closed.
held() {
  local name=$1 pid=$2 count=$3 idle=$4
  echo "== $name: $count concurrent streams"
  local peak=0
  ( while kill -0 "$pid" 2>/dev/null; do rss_kib "$pid"; sleep 0.2; done ) > "$work/rss.$count" & local sampler=$!
  local ramp; ramp=$(awk -v n="$count" 'BEGIN {printf "%.1f", n / 1000 + 1}')
  local line; line=$(load "$client" streams --url "http://127.0.0.1:18000/v1/chat/completions" --count "$count" --chunks 16 --ramp "$ramp" --body "$stream_body" --key fk-bench-key-0001 || true)
  kill "$sampler" 2>/dev/null || true
  peak=$(sort -n "$work/rss.$count" | tail -1)
  sleep 2
  local after; after=$(rss_kib "$pid")
  local per; per=$(awk -v p="$peak" -v i="$idle" -v n="$count" 'BEGIN {printf "%.1f", (p - i) / n}')
  echo "   $line idle_rss_kib=$idle peak_rss_kib=$peak per_stream_kib=$per after_2s_rss_kib=$after"
  R[$name.streams$count]="$(kv "$line" lost_frames)/$(kv "$line" reordered_frames)/$(kv "$line" failed)"
  R[$name.peak$count]=$((peak / 1024))
  R[$name.per$count]=$per
  R[$name.after$count]=$(awk -v a="$after" 'BEGIN {printf "%.1f", a / 1024}')
  R[$name.ratio$count]=$(awk -v a="$after" -v i="$idle" 'BEGIN {printf "%.2f", a / i}')
  R[$name.idlek]=$(awk -v a="$idle" 'BEGIN {printf "%.1f", a / 1024}')
}

# held_steps CONFIG: a gateway on the held mock, through each step of streams.
held_steps() {
  local config=$1
  sed "s/19000/19002/g; s/full.db/full-held.db/" "$work/$config.yaml" > "$work/$config-held.yaml"
  taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/$config-held.yaml" >"$work/$config-held.log" 2>&1 & local pid=$!
  pids+=("$pid")
  wait_port 18000
  sleep 0.5
  # Idle is taken after a few streams went through and settled: the first requests fault
  # in the request path's code (1–1.5 MiB of the binary, file-backed) and the allocator's
  # first arenas, once for the process's life. The RSS before any request is printed too.
  R[$config.coldk]=$(awk -v a="$(rss_kib "$pid")" 'BEGIN {printf "%.1f", a / 1024}')
  load "$client" streams --url "http://127.0.0.1:18000/v1/chat/completions" --count 20 --chunks 16 --ramp 0.5 --body "$stream_body" --key fk-bench-key-0001 >/dev/null || true
  sleep 2
  local idle; idle=$(rss_kib "$pid")
  local steps="1000 5000 10000"; [ "$quick" = 1 ] && steps="1000"
  for count in $steps; do
    held "$config" "$pid" "$count" "$idle"
    if [ "$count" = 1000 ]; then R[$config.after]=$(( $(rss_kib "$pid") / 1024 )); fi
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

if [ "$held_only" = 1 ]; then
  held_steps bare
  held_steps full
  {
    echo "sluice held streams — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; sluice on core $core_gw (--workers 1); 16 chunks 1 s apart."
    echo
    echo "| figure | bare | full |"
    echo "|---|---|---|"
    echo "| RSS before any request (MiB) | ${R[bare.coldk]} | ${R[full.coldk]} |"
    echo "| RSS idle: after 20 streams, settled (MiB) | ${R[bare.idlek]} | ${R[full.idlek]} |"
    for count in 1000 5000 10000; do
      [ -n "${R[bare.per$count]:-}" ] || continue
      echo "| $count streams: lost / reordered frames / failed streams | ${R[bare.streams$count]} | ${R[full.streams$count]} |"
      echo "| $count streams: RSS peak (MiB), per stream (KiB) | ${R[bare.peak$count]}, ${R[bare.per$count]} | ${R[full.peak$count]}, ${R[full.per$count]} |"
      echo "| $count streams: RSS 2 s after they closed (MiB), × idle | ${R[bare.after$count]}, ${R[bare.ratio$count]} | ${R[full.after$count]}, ${R[full.ratio$count]} |"
    done
  } | tee "$out/held.md"
  exit 0
fi

# The response cache: the same gateway answering a deterministic request from its cache
# (a hit) and a request it passes through (not cacheable: no temperature 0, no seed).
if [ "$cache" = 1 ]; then
  cat > "$work/cache.yaml" <<YAML
server: {listen: 127.0.0.1:18000, max_connections_per_ip: 0, busy_poll: $busy_poll}
access: {keys: [{name: bench, key: fk-bench-key-0001, rpm: 100000000}]}
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:19000', keys: [sk-bench-upstream-1]}
storage: {url: 'sqlite://$work/cache.db', log_bodies: true}
cache: {enabled: true, ttl: 1h, max_bytes: 16MiB}
YAML
  hit_body='{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
  taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/cache.yaml" >"$work/cache.log" 2>&1 & pid=$!
  pids+=("$pid")
  wait_port 18000
  url=http://127.0.0.1:18000/v1/chat/completions
  for mode in pass hit; do
    request=$body; [ "$mode" = hit ] && request=$hit_body
    echo "== cache $mode: latency at concurrency 1"
    line=$(load "$client" latency --url "$url" --requests "$latency_n" --body "$request" --key fk-bench-key-0001)
    echo "   $line"
    R[cache.$mode.p50]=$(kv "$line" p50_us); R[cache.$mode.p99]=$(kv "$line" p99_us)
    echo "== cache $mode: throughput at saturation (wrk, 64 connections, ${wrk_secs}s)"
    wrk_out=$(BENCH_BODY="$request" BENCH_KEY=fk-bench-key-0001 load wrk -t1 -c64 -d"${wrk_secs}s" -s bench/post.lua "$url")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$wrk_out"); R[cache.$mode.rps]=${rps%.*}
    echo "   ${rps} req/s"
  done
  R[cache.rss]=$(( $(rss_kib "$pid") / 1024 ))
  kill "$pid"; wait "$pid" 2>/dev/null || true
  {
    echo "sluice response cache — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; sluice on core $core_gw (--workers 1), log on (SQLite)."
    echo
    echo "| figure | pass-through | cache hit |"
    echo "|---|---|---|"
    echo "| latency at c=1, p50 / p99 (µs) | ${R[cache.pass.p50]} / ${R[cache.pass.p99]} | ${R[cache.hit.p50]} / ${R[cache.hit.p99]} |"
    echo "| throughput at saturation, req/s | ${R[cache.pass.rps]} | ${R[cache.hit.rps]} |"
    echo "| RSS after both runs (MiB) | ${R[cache.rss]} | |"
  } | tee "$out/cache.md"
  exit 0
fi

# anthropic_table: the OpenAI client against the Anthropic client through bare (--anthropic
# and --anthropic-only print the same rows).
anthropic_table() {
  echo "| figure | OpenAI client | Anthropic client (translated) | translation adds |"
  echo "|---|---|---|---|"
  echo "| latency at c=1, p50 / p99 (µs) | ${R[bare.p50]} / ${R[bare.p99]} | ${R[anthropic.p50]} / ${R[anthropic.p99]} | $(sub "${R[anthropic.p50]}" "${R[bare.p50]}") / $(sub "${R[anthropic.p99]}" "${R[bare.p99]}") |"
  echo "| sluice CPU per request (µs) | ${R[bare.cpu]} | ${R[anthropic.cpu]} | $(sub "${R[anthropic.cpu]}" "${R[bare.cpu]}") |"
  echo "| req/s at saturation | ${R[bare.rps]} | ${R[anthropic.rps]} | — |"
  echo "| TTFT p50 / p99 (µs), 64-chunk streams | ${R[bare.ttft50]} / ${R[bare.ttft99]} | ${R[anthropic.ttft50]} / ${R[anthropic.ttft99]} | $(sub "${R[anthropic.ttft50]}" "${R[bare.ttft50]}") / $(sub "${R[anthropic.ttft99]}" "${R[bare.ttft99]}") |"
}

# Only the translation comparison: bare with each client, then translation in process.
if [ "$anthropic_only" = 1 ]; then
  sed "s/19000/19001/g" "$work/bare.yaml" > "$work/bare-ttft.yaml"
  taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/bare.yaml" >"$work/bare.log" 2>&1 & pid=$!
  pids+=("$pid")
  wait_port 18000
  sleep 0.5
  measure bare http://127.0.0.1:18000 fk-bench-key-0001 "$pid"
  as_anthropic measure anthropic http://127.0.0.1:18000 fk-bench-key-0001 "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/bare-ttft.yaml" >"$work/bare-ttft.log" 2>&1 & pid=$!
  pids+=("$pid")
  wait_port 18000
  ttft bare http://127.0.0.1:18000 fk-bench-key-0001
  as_anthropic ttft anthropic http://127.0.0.1:18000 fk-bench-key-0001
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", a - b}'; }
  translate_line=$(taskset -c "$core_gw" "$client" translate)
  {
    echo "sluice translation benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; sluice on core $core_gw (--workers 1), bare config."
    echo
    anthropic_table
    echo
    echo "Translation in process, ns (Anthropic request to OpenAI / plain answer back / 18-event stream back): $translate_line"
  } | tee "$out/anthropic.md"
  exit 0
fi
sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", a - b}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }
# The tail rows: the sweep's result with its ratios, and the added p99 at c=1 of full
# against bare's (issue 18's targets).
tail_rows() {
  local added_bare added_full
  added_bare=$(sub "${R[bare.p99]}" "${R[direct.p99]}"); added_full=$(sub "${R[full.p99]}" "${R[direct.p99]}")
  echo "| highest rate with p99 < 1 ms, req/s (lowest rate tried: $lowest_rate) | $(rate_cell direct) | $(rate_cell bare) | $(rate_cell full) |"
  echo "| … its ratios: bare / direct, full / bare | — | $(ratio "${R[bare.rate]}" "${R[direct.rate]}") | $(ratio "${R[full.rate]}" "${R[bare.rate]}") |"
  echo "| added p99 at c=1, full / bare | — | — | $(ratio "$added_full" "$added_bare") |"
}
# HTTP/2: (a) streams held through sluice to an upstream spoken to over HTTP/1.1 and over
# h2c (upstream connections, open files, RSS, lost frames); (b) the listener over HTTP/1.1
# and h2c, then with TLS over HTTP/1.1 and h2 (latency at c=1, req/s at 32 concurrent).
if [ "$http2" = 1 ]; then
  # A provider that allows 100 streams per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS):
  # sluice must open more connections rather than queue streams. SLUICE_MOCK_BIN runs it
  # from another build (an older sluice has no --max-streams).
  taskset -c "$core_load" "${SLUICE_MOCK_BIN:-$sluice}" mock-upstream --listen 127.0.0.1:19003 --workers 1 --chunks 16 --interval 1s --max-streams 100 >/dev/null 2>&1 & pids+=($!)
  wait_port 19003
  mock_port=19002
  mock_stat() { curl -s "http://127.0.0.1:$mock_port/_mock/stats" | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
  steps="1000 5000"; [ "$quick" = 1 ] && steps="1000"
  modes="off h2c h2c-limited"
  for mode in $modes; do
    mock_port=19002; upstream_http2=$mode
    [ "$mode" = h2c-limited ] && { mock_port=19003; upstream_http2=h2c; }
    cat > "$work/h2-$mode.yaml" <<YAML
server: {listen: 127.0.0.1:18000, max_connections_per_ip: 0}
access: {keys: [{name: bench, key: fk-bench-key-0001}]}
upstreams:
  - {name: held, base_url: 'http://127.0.0.1:$mock_port', keys: [sk-bench-upstream-1], http2: '$upstream_http2'}
storage: {url: none}
log: {access: false}
YAML
    taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/h2-$mode.yaml" >"$work/h2-$mode.log" 2>&1 & pid=$!
    pids+=("$pid")
    wait_port 18000
    for count in $steps; do
      echo "== upstream http2: $mode, $count concurrent streams"
      before=$(mock_stat connections)
      ( while kill -0 "$pid" 2>/dev/null; do
          echo "$(rss_kib "$pid") $(ls "/proc/$pid/fd" | wc -l) $(mock_stat connections_open)"; sleep 0.3
        done ) > "$work/h2-sample.$mode.$count" & sampler=$!
      ramp=$(awk -v n="$count" 'BEGIN {printf "%.1f", n / 1000 + 1}')
      line=$(load "$client" streams --url http://127.0.0.1:18000/v1/chat/completions --count "$count" --chunks 16 --ramp "$ramp" --body "$stream_body" --key fk-bench-key-0001 || true)
      kill "$sampler" 2>/dev/null || true
      after=$(mock_stat connections)
      R[h2.$mode.$count.rss]=$(( $(sort -n -k1 "$work/h2-sample.$mode.$count" | tail -1 | cut -d' ' -f1) / 1024 ))
      R[h2.$mode.$count.fds]=$(sort -n -k2 "$work/h2-sample.$mode.$count" | tail -1 | cut -d' ' -f2)
      # Less the stats request's own connection, open while it is answered.
      R[h2.$mode.$count.open]=$(( $(sort -n -k3 "$work/h2-sample.$mode.$count" | tail -1 | cut -d' ' -f3) - 1 ))
      # The mock counts every connection, its stats requests' too: the sampler's (one per
      # line) and the one that read `after` are not sluice's.
      R[h2.$mode.$count.conns]=$((after - before - 1 - $(wc -l < "$work/h2-sample.$mode.$count")))
      R[h2.$mode.$count.frames]="$(kv "$line" lost_frames)/$(kv "$line" reordered_frames)/$(kv "$line" failed)"
      R[h2.$mode.$count.ttft]=$(awk -v us="$(kv "$line" ttft_p99_us)" 'BEGIN {printf "%.0f", us / 1000}')
      echo "   $line upstream_connections=${R[h2.$mode.$count.conns]} peak_open_upstream=${R[h2.$mode.$count.open]} peak_fds=${R[h2.$mode.$count.fds]} peak_rss_mib=${R[h2.$mode.$count.rss]}"
      sleep 2
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done

  fixtures=$root/tests/fixtures/tls
  sed "s#^server: {\(.*\)}\$#server: {\1, tls: {cert: '$fixtures/a.pem', key: '$fixtures/a.key'}}#" "$work/bare.yaml" > "$work/bare-tls.yaml"
  for listener in plain tls; do
    config=$work/bare.yaml; base=http://127.0.0.1:18000
    [ "$listener" = tls ] && { config=$work/bare-tls.yaml; base=https://localhost:18000; }
    taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$config" >"$work/h2-$listener.log" 2>&1 & pid=$!
    pids+=("$pid")
    wait_port 18000
    for version in 1 2; do
      echo "== listener $listener, HTTP/$version"
      line=$(load "$client" http --url "$base/v1/chat/completions" --http "$version" --ca "$fixtures/ca.pem" --requests "$latency_n" --body "$body" --key fk-bench-key-0001)
      echo "   $line"
      R[h2.$listener.$version]="$(kv "$line" p50_us) / $(kv "$line" p99_us) | $(kv "$line" rps) | $(kv "$line" errors)"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
  {
    echo "sluice HTTP/2 — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; sluice on core $core_gw (--workers 1, log off), mocks and load on core $core_load."
    echo
    echo "Held streams (16 chunks 1 s apart; clients on HTTP/1.1, one connection each) through sluice to the mock, by upstream \`http2\` (h2c-limited: the mock allows 100 streams per connection, sluice's \`http2_streams\` is its default 100):"
    echo
    echo "| streams | upstream http2 | upstream connections opened / peak open | sluice open files (peak) | sluice RSS peak (MiB) | first chunk p99 (ms) | lost / reordered frames / failed streams |"
    echo "|---|---|---|---|---|---|---|"
    for count in $steps; do
      for mode in $modes; do
        echo "| $count | $mode | ${R[h2.$mode.$count.conns]} / ${R[h2.$mode.$count.open]} | ${R[h2.$mode.$count.fds]} | ${R[h2.$mode.$count.rss]} | ${R[h2.$mode.$count.ttft]} | ${R[h2.$mode.$count.frames]} |"
      done
    done
    echo
    echo "Listener (non-streamed chat completion; req/s: 32 concurrent requests, on 32 HTTP/1.1 connections or 1 HTTP/2 connection):"
    echo
    echo "| listener | protocol | latency at c=1, p50 / p99 (µs) | req/s | errors |"
    echo "|---|---|---|---|---|"
    echo "| plain | HTTP/1.1 | ${R[h2.plain.1]} |"
    echo "| plain | h2c | ${R[h2.plain.2]} |"
    echo "| TLS | HTTP/1.1 | ${R[h2.tls.1]} |"
    echo "| TLS | h2 (ALPN) | ${R[h2.tls.2]} |"
  } | tee "$out/http2.md"
  exit 0
fi

measure direct http://127.0.0.1:19000 "" ""

# Only the tail figures: latency at c=1 and the rate sweep of each configuration.
if [ "$tail" = 1 ]; then
  for config in bare full; do
    taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/$config.yaml" >"$work/$config.log" 2>&1 & pid=$!
    pids+=("$pid")
    wait_port 18000
    measure "$config" http://127.0.0.1:18000 fk-bench-key-0001 "$pid"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
  {
    echo "sluice tail latency — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; sluice on core $core_gw (--workers 1, server.busy_poll: $busy_poll), mock and client on core $core_load."
    echo
    echo "| figure | direct | bare | full |"
    echo "|---|---|---|---|"
    echo "| latency at c=1, p50 / p99 (µs) | ${R[direct.p50]} / ${R[direct.p99]} | ${R[bare.p50]} / ${R[bare.p99]} | ${R[full.p50]} / ${R[full.p99]} |"
    echo "| **added** at c=1, p50 / p99 (µs) | — | $(sub "${R[bare.p50]}" "${R[direct.p50]}") / $(sub "${R[bare.p99]}" "${R[direct.p99]}") | $(sub "${R[full.p50]}" "${R[direct.p50]}") / $(sub "${R[full.p99]}" "${R[direct.p99]}") |"
    tail_rows
  } | tee "$out/tail.md"
  exit 0
fi
ttft direct http://127.0.0.1:19001 ""

for config in bare full; do
  # The TTFT runs need the 64-chunk mock: same config, other upstream port.
  sed "s/19000/19001/g; s/full.db/full-ttft.db/" "$work/$config.yaml" > "$work/$config-ttft.yaml"

  taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/$config.yaml" >"$work/$config.log" 2>&1 & pid=$!
  wait_port 18000
  sleep 0.5
  R[$config.idle]=$(( $(rss_kib "$pid") / 1024 ))
  measure "$config" http://127.0.0.1:18000 fk-bench-key-0001 "$pid"
  [ "$config" = full ] && log_half full http://127.0.0.1:18000 fk-bench-key-0001
  if [ "$config" = bare ] && [ "$anthropic" = 1 ]; then
    as_anthropic measure anthropic http://127.0.0.1:18000 fk-bench-key-0001 "$pid"
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true

  # The same latency with busy polling on: what an idle core's wake-up costs.
  sed "s/busy_poll: [^}]*}/busy_poll: $poll_window}/" "$work/$config.yaml" > "$work/$config-nopoll.yaml"
  taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/$config-nopoll.yaml" >"$work/$config-nopoll.log" 2>&1 & pid=$!
  wait_port 18000
  line=$(load "$client" latency --url http://127.0.0.1:18000/v1/chat/completions --requests "$latency_n" --body "$body" --key fk-bench-key-0001)
  echo "== $config with busy_poll $poll_window: $line"
  R[$config.nopoll50]=$(kv "$line" p50_us); R[$config.nopoll99]=$(kv "$line" p99_us)
  kill "$pid"; wait "$pid" 2>/dev/null || true

  taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/$config-ttft.yaml" >"$work/$config-ttft.log" 2>&1 & pid=$!
  wait_port 18000
  ttft "$config" http://127.0.0.1:18000 fk-bench-key-0001
  if [ "$config" = bare ] && [ "$anthropic" = 1 ]; then
    as_anthropic ttft anthropic http://127.0.0.1:18000 fk-bench-key-0001
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true

  held_steps "$config"
done

{
  echo "sluice benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'))"
  echo "sluice pinned to core $core_gw (--workers 1, server.busy_poll: $busy_poll); mock upstream and load generators on core $core_load."
  echo "Request: non-streamed chat completion; streams: 64 chunks 20 ms apart (TTFT), 16 chunks 1 s apart (held)."
  echo
  echo "| figure | direct | bare | full |"
  echo "|---|---|---|---|"
  echo "| latency at c=1, p50 / p99 (µs) | ${R[direct.p50]} / ${R[direct.p99]} | ${R[bare.p50]} / ${R[bare.p99]} | ${R[full.p50]} / ${R[full.p99]} |"
  echo "| **added** at c=1, p50 / p99 (µs) | — | $(sub "${R[bare.p50]}" "${R[direct.p50]}") / $(sub "${R[bare.p99]}" "${R[direct.p99]}") | $(sub "${R[full.p50]}" "${R[direct.p50]}") / $(sub "${R[full.p99]}" "${R[direct.p99]}") |"
  echo "| added at c=1 with busy_poll $poll_window, p50 / p99 (µs) | — | $(sub "${R[bare.nopoll50]}" "${R[direct.p50]}") / $(sub "${R[bare.nopoll99]}" "${R[direct.p99]}") | $(sub "${R[full.nopoll50]}" "${R[direct.p50]}") / $(sub "${R[full.nopoll99]}" "${R[direct.p99]}") |"
  echo "| throughput at saturation, req/s (× direct) | ${R[direct.rps]} (1.00) | ${R[bare.rps]} ($(ratio "${R[bare.rps]}" "${R[direct.rps]}")) | ${R[full.rps]} ($(ratio "${R[full.rps]}" "${R[direct.rps]}")) |"
  tail_rows
  echo "| sluice CPU per request (µs) | — | ${R[bare.cpu]} | ${R[full.cpu]} |"
  echo "| request log: writer rows/s during the saturation burst | — | — | ${R[full.log_rps]:-—} |"
  echo "| request log: records written / requests answered (lost), burst drained | — | — | ${R[full.burst_kept]:-—} |"
  echo "| request log at half of saturation: rows written, lost | — | — | ${R[full.half]:-—} |"
  echo "| TTFT p50 / p99 (µs) | ${R[direct.ttft50]} / ${R[direct.ttft99]} | ${R[bare.ttft50]} / ${R[bare.ttft99]} | ${R[full.ttft50]} / ${R[full.ttft99]} |"
  echo "| **added** TTFT p50 / p99 (µs) | — | $(sub "${R[bare.ttft50]}" "${R[direct.ttft50]}") / $(sub "${R[bare.ttft99]}" "${R[direct.ttft99]}") | $(sub "${R[full.ttft50]}" "${R[direct.ttft50]}") / $(sub "${R[full.ttft99]}" "${R[direct.ttft99]}") |"
  echo "| mean chunk gap (µs; 20,000 sent) | ${R[direct.gap]} | ${R[bare.gap]} | ${R[full.gap]} |"
  for count in 1000 5000 10000; do
    [ -n "${R[bare.streams$count]:-}" ] || continue
    echo "| $count concurrent streams: lost / reordered frames / failed streams | — | ${R[bare.streams$count]} | ${R[full.streams$count]} |"
  done
  echo "| RSS idle / peak with 1k streams / after (MiB) | — | ${R[bare.idle]} / ${R[bare.peak1000]} / ${R[bare.after]} | ${R[full.idle]} / ${R[full.peak1000]} / ${R[full.after]} |"
  echo "| RSS per held stream at 1k streams, (peak − idle) / count (KiB) | — | ${R[bare.per1000]} | ${R[full.per1000]} |"
  for count in 5000 10000; do
    [ -n "${R[bare.peak$count]:-}" ] || continue
    echo "| RSS peak with $count streams (MiB), per stream (KiB) | — | ${R[bare.peak$count]}, ${R[bare.per$count]} | ${R[full.peak$count]}, ${R[full.per$count]} |"
  done
  [ -n "${R[bare.after10000]:-}" ] && echo "| RSS 2 s after 10k streams closed (MiB) | — | ${R[bare.after10000]} | ${R[full.after10000]} |"
  if [ "$anthropic" = 1 ]; then
    echo
    echo "Anthropic client (/v1/messages) through bare to the OpenAI mock, translated both ways:"
    echo
    anthropic_table
  fi
} | tee "$out/latest.md"

# Authentication alone: a config key against a runtime key with 10,000 runtime keys loaded.
auth_line=$(taskset -c "$core_gw" "$client" auth --keys 10000)
# Translation alone: an Anthropic client's request to OpenAI Chat and the answer back.
translate_line=$(taskset -c "$core_gw" "$client" translate)
{
  echo
  echo "Authentication in process, ns per request (config key / runtime key among 10,000 / unknown key): $auth_line"
  echo
  echo "Translation in process, ns (Anthropic request to OpenAI / plain answer back / 18-event stream back): $translate_line"
} | tee -a "$out/latest.md"

# Peers users would pick instead, installed from their own registries into bench/peers/
# (git-ignored), each forwarding the same request to the same mock, pinned like sluice.
if [ "$peers" = 1 ]; then
  peers_dir=$root/bench/peers
  venv=$peers_dir/venv
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai-forward pyyaml 'litellm[proxy]' || echo "pip could not install every Python peer"
  [ -x "$peers_dir/bin/crabllm" ] || cargo install -q crabllm --root "$peers_dir" --no-default-features --features hyper,sonic,http2,rustls \
    || echo "cargo could not install crabllm"
  peer_rows=()
  peer() {
    local name=$1 port=$2 key=$3; shift 3
    if ! command -v "$1" >/dev/null && [ ! -x "$1" ]; then peer_rows+=("| $name | not installed | | | | |"); return; fi
    taskset -c "$core_gw" "$@" >"$work/$name.log" 2>&1 & local pid=$!
    if ! wait_port "$port"; then peer_rows+=("| $name | did not start (see target/bench/$name.log) | | | | |"); kill "$pid" 2>/dev/null; return; fi
    sleep 2
    local idle=$(( $(rss_kib "$pid") / 1024 ))
    measure "$name" "http://127.0.0.1:$port" "$key" "$pid"
    local peak=$(( $(hwm_kib "$pid") / 1024 ))
    kill "$pid"; wait "$pid" 2>/dev/null || true
    peer_rows+=("| $name | $(sub "${R[$name.p50]}" "${R[direct.p50]}") / $(sub "${R[$name.p99]}" "${R[direct.p99]}") | ${R[$name.rps]} ($(ratio "${R[$name.rps]}" "${R[direct.rps]}")) | ${R[$name.rate]} | ${R[$name.cpu]} | $idle / $peak |")
  }
  export FORWARD_CONFIG='[{"base_url":"http://127.0.0.1:19000","route":"/","type":"openai"}]'
  peer openai-forward 18100 sk-bench-upstream-1 "$venv/bin/aifd" run --port 18100 --workers 1
  export OPENAI_API_KEY=sk-bench-upstream-1 LITELLM_MASTER_KEY=sk-litellm-bench-master-0001
  peer litellm 18200 sk-litellm-bench-master-0001 \
    "$venv/bin/litellm" --model openai/gpt-4o-mini --api_base http://127.0.0.1:19000/v1 --port 18200 --num_workers 1
  cat > "$work/crabllm.toml" <<TOML
listen = "127.0.0.1:18300"
[providers.mock]
kind = "openai"
api_key = "sk-bench-upstream-1"
base_url = "http://127.0.0.1:19000/v1"
models = ["gpt-4o-mini"]
TOML
  peer crabllm 18300 "" "$peers_dir/bin/crabllm" serve --config "$work/crabllm.toml"
  {
    echo
    echo "Peers, same rig, same request, same mock (sluice rows above):"
    echo
    echo "| peer | added at c=1, p50 / p99 (µs) | req/s at saturation (× direct) | highest rate with p99 < 1 ms | CPU µs per request | RSS idle / peak (MiB) |"
    echo "|---|---|---|---|---|---|"
    echo "| sluice bare | $(sub "${R[bare.p50]}" "${R[direct.p50]}") / $(sub "${R[bare.p99]}" "${R[direct.p99]}") | ${R[bare.rps]} ($(ratio "${R[bare.rps]}" "${R[direct.rps]}")) | ${R[bare.rate]} | ${R[bare.cpu]} | ${R[bare.idle]} / — |"
    echo "| sluice full | $(sub "${R[full.p50]}" "${R[direct.p50]}") / $(sub "${R[full.p99]}" "${R[direct.p99]}") | ${R[full.rps]} ($(ratio "${R[full.rps]}" "${R[direct.rps]}")) | ${R[full.rate]} | ${R[full.cpu]} | ${R[full.idle]} / — |"
    printf '%s\n' "${peer_rows[@]}"
  } | tee -a "$out/latest.md"
fi
