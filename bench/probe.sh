#!/usr/bin/env bash
# One quick tail probe, for A/B work between builds (what the fifth round's figures in
# BENCHMARKS.md, "Tail latency", came from): the mock upstream on core 1, sluice on core 0
# with one worker, a warm-up of 1,000 req/s for 1 s, then one of:
#
#   bench/probe.sh CONFIG RATE SECS           # open-loop RATE for SECS s, then c=1 (2,000)
#   C1=1 bench/probe.sh CONFIG 0 0            # six c=1 runs of 3,000 requests: their p99s
#   SAT=1 bench/probe.sh CONFIG 0 0           # wrk -c64 for 5 s, then the log's status
#   PERF=1 [PERFG=-g] bench/probe.sh CONFIG 0 0   # perf sched record -a over 6,000 c=1
#                                             # requests into target/probe/sched.data
#
# CONFIG: bare, full (bench/run.sh's), nolog (full without the request log), noacc (nolog
# without the access log), nobody (full without bodies). STATUS=1 prints /v1/status's log
# figures for 10 s after the run. SLUICE_BIN / SLUICE_BENCH_BIN pick other builds;
# SL_PRELOAD sets LD_PRELOAD for sluice alone. Run it under the CPU lock with nothing else
# on the machine; ports 18100 and 19100.
# probe.sh CONFIG(full|bare) RATE SECS : one sluice (core 0, 1 worker) against the mock (core 1)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/target/probe
mkdir -p "$out"
cfg=$1; rate=$2; secs=$3
S=${SLUICE_BIN:-$root/target/release/sluice}
B=${SLUICE_BENCH_BIN:-$root/target/release/sluice-bench}
w=$(mktemp -d)
. "$root/bench/configs.sh"
write_bench_configs "$w" 18100 19100
sed -e "s|storage: .*|storage: {url: none}|" $w/full.yaml > $w/nolog.yaml
( cat $w/nolog.yaml; echo "log: {access: false}" ) > $w/noacc.yaml
sed -e "s|log_bodies: true|log_bodies: false|" $w/full.yaml > $w/nobody.yaml
taskset -c 1 $S mock-upstream --listen 127.0.0.1:19100 --workers 1 >/dev/null 2>&1 & m=$!
env ${SL_PRELOAD:+LD_PRELOAD=$SL_PRELOAD} taskset -c 0 $S serve --workers 1 --config $w/$cfg.yaml >$w/s.log 2>&1 & s=$!
trap 'kill $m $s 2>/dev/null; sleep 0.3; rm -rf $w' EXIT
for p in 19100 18100; do for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.05; done; done
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
url=http://127.0.0.1:18100/v1/chat/completions
taskset -c 1 $B rate --url $url --rate 1000 --seconds 1 --connections 32 --body "$body" --key fk-bench-key-0001 >/dev/null
sleep 0.5
if [ "${SAT:-0}" = 1 ]; then
  o=$(BENCH_BODY="$body" BENCH_KEY=fk-bench-key-0001 taskset -c 1 wrk -t1 -c64 -d5s -s $root/bench/post.lua $url)
  echo "$o" | grep -E "Requests/sec|requests in|Non-2xx"
  for i in $(seq 1 20); do st=$(curl -s http://127.0.0.1:18100/v1/status | grep -o '"log":{[^}]*}'); echo "$st" | grep -q '"queued":0,' && break; sleep 0.5; done; echo "$st"
  exit 0
fi
if [ "${PERFREC:-0}" = 1 ]; then
  ps -T -p $s -o tid,comm > $out/threads.txt
  wt=$(awk 'NR>1 && $2 ~ /tokio/ {print $1; exit}' $out/threads.txt)
  perf record -e sched:sched_switch --call-graph dwarf,32768 $( [ "${ALLT:-0}" = 1 ] && echo "-p $s" || echo "-t $wt") -o $out/rec.data 2>/dev/null & pp=$!
  sleep 0.5
  taskset -c 1 $B latency --url $url --requests 3000 --body "$body" --key fk-bench-key-0001
  kill -INT $pp; wait $pp 2>/dev/null; exit 0
fi
if [ "${PERF:-0}" = 1 ]; then
  ps -T -p $s -o tid,comm > $w/threads.txt; cp $w/threads.txt $out/threads.txt
  perf sched record -a -k CLOCK_MONOTONIC ${PERFG:-} -o $out/sched.data -- taskset -c 1 $B latency --url $url --requests 6000 --body "$body" --key fk-bench-key-0001 > $out/lat.txt 2>/dev/null
  echo "$(cat $out/lat.txt)"; exit 0
fi
if [ "${C1:-0}" = 1 ]; then
  r=""; for i in 1 2 3 4 5 6; do r="$r $(taskset -c 1 $B latency --url $url --requests 3000 --body "$body" --key fk-bench-key-0001 | grep -o 'p99_us=[0-9]*' | cut -d= -f2)"; done
  echo "$cfg c1 p99s:$r"; exit 0
fi
t0=$(awk '{print $14+$15}' /proc/$s/stat)
line=$(taskset -c 1 $B rate --url $url --rate $rate --seconds $secs --connections 32 --body "$body" --key fk-bench-key-0001 --dump $w/dump.csv)
t1=$(awk '{print $14+$15}' /proc/$s/stat)
if [ "${STATUS:-0}" = 1 ]; then for i in 1 2 3 4 5 6 7 8 9 10; do curl -s http://127.0.0.1:18100/v1/status | grep -o '"log":{[^}]*}' ; sleep 1; done; fi
over=$(echo "$line" | grep -o "over_1ms=[0-9]*")
sleep 1
lat=$(taskset -c 1 $B latency --url $url --requests 2000 --body "$body" --key fk-bench-key-0001)
echo "$cfg r=$rate: $(echo $line | grep -o 'p50_us=[0-9.]* \|p99_us=[0-9.]*\|achieved_rps=[0-9.]*' | tr '\n' ' ') $over cpu_ticks=$((t1-t0)) | c1: $(echo $lat | grep -o 'p50_us=[0-9.]*\|p99_us=[0-9.]*' | tr '\n' ' ')"
