#!/usr/bin/env bash
# Does steady load reconnect to the upstream? wrk (64 connections, 5 s, twice) through
# the bare config with `idle_connections: IDLE` (or `default`): req/s and the upstream
# connections the mock accepted in each round.
#
#   bench/pool.sh target/release/sluice default
#
# Run it under the CPU lock (ports 18000 and 19000).
set -u
bin=$1; idle=$2
work=$(mktemp -d)
cat > $work/bare.yaml <<YAML
server: {listen: 127.0.0.1:18000, max_connections_per_ip: 0, busy_poll: 0}
access: {keys: [{name: bench, key: fk-bench-key-0001}]}
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:19000', keys: [sk-bench-upstream-1]$( [ "$idle" != default ] && echo ", idle_connections: $idle")}
storage: {url: none}
log: {access: false}
YAML
taskset -c 1 $bin mock-upstream --listen 127.0.0.1:19000 --workers 1 >/dev/null 2>&1 & mock=$!
taskset -c 0 $bin serve --workers 1 --config $work/bare.yaml > $work/log 2>&1 & gw=$!
for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18000) 2>/dev/null && break; sleep 0.05; done
sleep 0.5
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
for round in 1 2; do
  c0=$(curl -s 127.0.0.1:19000/_mock/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])')
  out=$(BENCH_BODY="$body" BENCH_KEY=fk-bench-key-0001 taskset -c 1 wrk -t1 -c64 -d5s -s "$(dirname "$0")/post.lua" http://127.0.0.1:18000/v1/chat/completions)
  c1=$(curl -s 127.0.0.1:19000/_mock/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])')
  echo "idle=$idle round=$round rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out") upstream_connections_opened=$((c1-c0)) $(awk '/Latency/ {print "latency_avg="$2" stdev="$3" max="$4}' <<<"$out")"
done
kill $gw $mock; wait 2>/dev/null
rm -rf $work
