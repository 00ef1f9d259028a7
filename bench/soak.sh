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
#   SOAK_PORT_GW=28000 SOAK_PORT_MOCK=29000 SOAK_OUT=/tmp/soak-a bench/soak.sh   # beside run.sh
#
# Everything listens on 127.0.0.1: ports 18000 (sluice) and 19000 (the mock) by default,
# as bench/run.sh, so run it under the ports lock then; SOAK_PORT_GW and SOAK_PORT_MOCK
# choose others. sluice is pinned to core 0 with one worker, the mock and the client to
# core 1. The output is also written to $SOAK_OUT/soak.md (default target/bench), and each
# minute sluice's /proc/PID/status and smaps to $SOAK_OUT/soak-proc/; at the end the
# mappings whose resident size grew after the warm-up are listed (which one stepped: the
# heap, a thread's malloc arena, a stack, a file SQLite maps).
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
out=${SOAK_OUT:-$root/target/bench}
port_gw=${SOAK_PORT_GW:-18000}
port_mock=${SOAK_PORT_MOCK:-19000}
case "$port_gw$port_mock" in *[!0-9]*) echo "SOAK_PORT_GW and SOAK_PORT_MOCK take port numbers" >&2; exit 2 ;; esac
mkdir -p "$out"
proc_dir=$out/soak-proc
rm -rf "$proc_dir"
mkdir -p "$proc_dir"
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
taskset -c "$core_load" "$sluice" mock-upstream --listen 127.0.0.1:$port_mock --workers 1 --chunks 16 --interval 20ms \
  >"$work/soak-mock.log" 2>&1 & pids+=($!)
wait_port $port_mock

# The full configuration of bench/run.sh, with the access log on (its default) and a
# second upstream for `gpt-4o`, which the client asks to fail.
cat > "$work/soak.yaml" <<YAML
server: {listen: 127.0.0.1:$port_gw, max_connections_per_ip: 0}
access:
  keys: [{name: soak, key: fk-soak-key-0001, rpm: 100000000, rpd: 1000000000, tpm: 100000000000}]
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:$port_mock', keys: [sk-soak-upstream-1], models: [gpt-4o-mini], rpm: 100000000}
  - {name: failing, base_url: 'http://127.0.0.1:$port_mock', keys: [sk-soak-upstream-2], models: [gpt-4o], rpm: 100000000}
storage: {url: 'sqlite://$work/soak.db', log_bodies: true}
pricing: {gpt-4o-mini: {input: 0.15, output: 0.6}}
YAML
taskset -c "$core_gw" "$sluice" serve --workers 1 --config "$work/soak.yaml" >"$work/soak.log" 2>&1 & pid=$!
pids+=("$pid")
wait_port $port_gw

# Each minute (a little before the client's reading): where sluice's memory is, by mapping.
(
  minute=0
  while kill -0 "$pid" 2>/dev/null; do
    name=$(printf '%02d' "$minute")
    cp "/proc/$pid/status" "$proc_dir/status-$name" 2>/dev/null || true
    cp "/proc/$pid/smaps" "$proc_dir/smaps-$name" 2>/dev/null || true
    minute=$((minute + 1))
    sleep 60
  done
) & pids+=($!)

echo "== soak: $minutes minutes at $rate req/s, sluice pid $pid (growth measured after minute $warmup)"
{
  echo "sluice soak — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; full config (SQLite log with bodies, access log), $rate req/s for $minutes minutes."
  echo "Mix per 20 requests: 10 plain, 4 streams (16 chunks 20 ms apart), 2 upstream 500s, 1 upstream 400, 1 stream cut by the upstream, 2 streams left by the client."
  echo
  taskset -c "$core_load" "$client" soak --url http://127.0.0.1:$port_gw --key fk-soak-key-0001 \
    --rate "$rate" --minutes "$minutes" --pid "$pid" --warmup-minutes "$warmup" --limit-kib 1024
} | tee "$out/soak.md"
# Resident KiB per mapping (start address, as the end moves when it grows; name) at the warm-up's end and at the end, and the
# mappings that grew by 64 KiB or more.
rss_by_mapping() {
  awk '/^[0-9a-f]+-[0-9a-f]+ / { split($1, range, "-"); key = range[1] " " ($6 == "" ? "[anon]" : $6) }
       /^Rss:/ { print key, $2 }' "$1"
}
last=$(ls "$proc_dir"/smaps-* 2>/dev/null | tail -1)
first=$proc_dir/smaps-$(printf '%02d' "$warmup")
if [ -n "$last" ] && [ -f "$first" ]; then
  echo "resident growth by mapping from minute $warmup to ${last##*-} (KiB, >= 64):" | tee -a "$out/soak.md"
  join -a 2 -e 0 -o 0,1.2,2.2 <(rss_by_mapping "$first" | awk '{print $1 "|" $2, $3}' | sort) \
    <(rss_by_mapping "$last" | awk '{print $1 "|" $2, $3}' | sort) |
    awk '$3 - $2 >= 64 { printf "  %s %d -> %d (+%d)\n", $1, $2, $3, $3 - $2 }' | tee -a "$out/soak.md"
fi
if ! kill -0 "$pid" 2>/dev/null; then
  echo "sluice exited during the soak run (see $out/soak.log)" >&2
  exit 1
fi
grep -q ': PASS$' "$out/soak.md"
