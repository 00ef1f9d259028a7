#!/usr/bin/env bash
# Where a held stream's memory goes: heaptrack of sluice (BIN) holding COUNT streams of
# 16 chunks 1 s apart through the bare or full config of bench/run.sh --held.
#
#   bench/heap.sh target/release/sluice bare 1000 /tmp/heap-bare
#   heaptrack_print -f /tmp/heap-bare.zst --flamegraph-cost-type peak -F stacks.txt
#
# Run it under the CPU lock (ports 18000 and 19002). SLUICE_BENCH_BIN: the load client;
# H2=h2c: sluice speaks h2c to the mock (what an HTTP/2 upstream leaves per stream).
set -u
bin=$1; config=$2; count=$3; out=$4
bench=${SLUICE_BENCH_BIN:-$(dirname "$0")/../target/release/sluice-bench}
work=$(mktemp -d)
cat > $work/bare.yaml <<YAML
server: {listen: 127.0.0.1:18000, max_connections_per_ip: 0, busy_poll: 0}
access: {keys: [{name: bench, key: fk-bench-key-0001}]}
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:19002', keys: [sk-bench-upstream-1]${H2:+, http2: $H2}}
storage: {url: none}
log: {access: false}
YAML
cat > $work/full.yaml <<YAML
server: {listen: 127.0.0.1:18000, max_connections_per_ip: 0, busy_poll: 0}
access:
  keys: [{name: bench, key: fk-bench-key-0001, rpm: 100000000, rpd: 1000000000, tpm: 100000000000}]
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:19002', keys: [sk-bench-upstream-1], models: [gpt-4o-mini], rpm: 100000000${H2:+, http2: $H2}}
  - {name: other, base_url: 'http://127.0.0.1:19002', keys: [sk-bench-upstream-2], models: [gpt-4o], rpm: 100000000}
storage: {url: 'sqlite://$work/full.db', log_bodies: true}
pricing: {gpt-4o-mini: {input: 0.15, output: 0.6}}
YAML
ulimit -n 20000
taskset -c 1 $bin mock-upstream --listen 127.0.0.1:19002 --workers 1 --chunks 16 --interval 1s >/dev/null 2>&1 & mock=$!
sleep 0.5
taskset -c 0 heaptrack -o $out $bin serve --workers 1 --config $work/$config.yaml > $work/sluice.log 2>&1 & ht=$!
for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18000) 2>/dev/null && break; sleep 0.1; done
sleep 1
sp=$(pgrep -n -f "^$bin serve")
echo "sluice pid $sp idle rss $(awk '/VmRSS/{print $2}' /proc/$sp/status)"
stream_body='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
taskset -c 1 $bench streams --url http://127.0.0.1:18000/v1/chat/completions --count $count --chunks 16 --ramp 2 --body "$stream_body" --key fk-bench-key-0001
sleep 2
echo "after rss $(awk '/VmRSS/{print $2}' /proc/$sp/status)"
kill -INT $sp; sleep 2; kill $mock; wait $ht 2>/dev/null
rm -rf $work
