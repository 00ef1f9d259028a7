#!/usr/bin/env bash
# The soak run: sluice with the full configuration (request log with bodies, access log,
# limits) in front of the mock upstream, under a fixed moderate rate of mixed requests
# (plain answers, streams, upstream errors, streams broken off by the upstream, streams
# the client leaves) for N minutes. Each minute it prints the requests so far, sluice's
# resident memory, its open files and the log queue; at the end the growth from the end
# of minute 5 to the end, and a verdict:
#
#   soak: growth X KiB after minute 5 (target < 1024 KiB): PASS|FAIL
#
#   bench/soak.sh                 # 30 minutes at 200 req/s
#   bench/soak.sh --minutes 3     # a short check (growth from minute 2)
#   bench/soak.sh --rate 100      # another rate
#   SLUICE_BIN=/tmp/sluice-before bench/soak.sh --minutes 12   # another build
#
# Everything listens on 127.0.0.1 (ports 18000 and 19000, as bench/run.sh: run it under
# the CPU lock). sluice is pinned to core 0 with one worker, the mock and the client to
# core 1. The output is also written to target/bench/soak.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

minutes=30
rate=200
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    *) echo "unknown option $1 (--minutes N, --rate R)" >&2; exit 2 ;;
  esac
done
case "$minutes$rate" in *[!0-9]*) echo "--minutes and --rate take whole numbers" >&2; exit 2 ;; esac
[ "$minutes" -ge 2 ] || { echo "--minutes must be at least 2" >&2; exit 2; }
warmup=5
[ "$minutes" -gt "$warmup" ] || warmup=$((minutes - 1))

ulimit -n "$(ulimit -Hn)"
# Another build for an A/B: SLUICE_BIN=… [SLUICE_BENCH_BIN=…] bench/soak.sh … (the release
# build is then left as it is).
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

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "port $1 did not open" >&2; return 1
}

# Streams of 16 chunks 20 ms apart (about a third of a second each).
taskset -c "$core_load" "$sluice" mock-upstream --listen 127.0.0.1:19000 --workers 1 --chunks 16 --interval 20ms \
  >"$work/soak-mock.log" 2>&1 & pids+=($!)
wait_port 19000

# The full configuration of bench/run.sh, with the access log on (its default) and a
# second upstream for `gpt-4o`, which the client asks to fail.
cat > "$work/soak.yaml" <<YAML
server: {listen: 127.0.0.1:18000, max_connections_per_ip: 0}
access:
  keys: [{name: soak, key: fk-soak-key-0001, rpm: 100000000, rpd: 1000000000, tpm: 100000000000}]
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:19000', keys: [sk-soak-upstream-1], models: [gpt-4o-mini], rpm: 100000000}
  - {name: failing, base_url: 'http://127.0.0.1:19000', keys: [sk-soak-upstream-2], models: [gpt-4o], rpm: 100000000}
storage: {url: 'sqlite://$work/soak.db', log_bodies: true}
pricing: {gpt-4o-mini: {input: 0.15, output: 0.6}}
YAML
taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/soak.yaml" >"$work/soak.log" 2>&1 & pid=$!
pids+=("$pid")
wait_port 18000

echo "== soak: $minutes minutes at $rate req/s, sluice pid $pid (growth measured after minute $warmup)"
{
  echo "sluice soak — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; full config (SQLite log with bodies, access log), $rate req/s for $minutes minutes."
  echo "Mix per 20 requests: 10 plain, 4 streams (16 chunks 20 ms apart), 2 upstream 500s, 1 upstream 400, 1 stream cut by the upstream, 2 streams left by the client."
  echo
  taskset -c "$core_load" "$client" soak --url http://127.0.0.1:18000 --key fk-soak-key-0001 \
    --rate "$rate" --minutes "$minutes" --pid "$pid" --warmup-minutes "$warmup" --limit-kib 1024
} | tee "$out/soak.md"
if ! kill -0 "$pid" 2>/dev/null; then
  echo "sluice exited during the soak run (see target/bench/soak.log)" >&2
  exit 1
fi
grep -q ': PASS$' "$out/soak.md"
