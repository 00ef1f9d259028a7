#!/usr/bin/env bash
# Where the RSS left after a burst of held streams is, by owner: sluice (core 0, one
# worker) on the held mock (core 1, 16 chunks 1 s apart); idle is taken after 20 streams
# settled, then COUNT streams; prints idle, peak and per stream as `bench/run.sh --held`
# does, the RSS 2 s after each of REPEAT bursts (a leak grows with each, a high-water mark
# does not), and the growth from idle of each kind of mapping: mimalloc's arenas (Rust's
# heap), glibc's heap and arenas (SQLite's), the binary's pages, the rest.
#
#   bench/rss_after.sh CONFIG [COUNT] [REPEAT]    # CONFIG: bare or full (bench/configs.sh); 10000 1
#
# SLUICE_BIN / SLUICE_BENCH_BIN pick other builds; GDB=1 also prints glibc's
# malloc_stats() (in use against kept per arena) at idle and after, through gdb. Run it
# under the CPU lock with nothing else on the machine; ports 18100 and 19102.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cfg=$1; count=${2:-10000}; repeat=${3:-1}
S=${SLUICE_BIN:-$root/target/release/sluice}
B=${SLUICE_BENCH_BIN:-$root/target/release/sluice-bench}
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
w=$(mktemp -d)
. "$root/bench/configs.sh"
write_bench_configs "$w" 18100 19102
taskset -c 1 "$S" mock-upstream --listen 127.0.0.1:19102 --workers 1 --chunks 16 --interval 1s >/dev/null 2>&1 & mock=$!
taskset -c 0 "$S" serve --workers 1 --config "$w/$cfg.yaml" >"$w/sluice.log" 2>&1 & gw=$!
trap 'kill $mock $gw 2>/dev/null; sleep 0.3; rm -rf "$w"' EXIT
for port in 19102 18100; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done
rss() { awk '/VmRSS/ {print $2}' "/proc/$gw/status"; }
malloc_stats() {
  [ "${GDB:-0}" = 1 ] || return 0
  echo "-- malloc_stats $1" >> "$w/sluice.log"
  gdb -p "$gw" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1 || true
}
body='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
streams() {
  taskset -c 1 "$B" streams --url http://127.0.0.1:18100/v1/chat/completions --count "$1" --chunks 16 \
    --ramp "$(awk -v n="$1" 'BEGIN {printf "%.1f", n / 1000 + 1}')" --body "$body" --key fk-bench-key-0001
}
sleep 0.5
streams 20 >/dev/null
sleep 2
idle=$(rss); cp "/proc/$gw/smaps" "$w/idle.smaps"; malloc_stats idle
( while kill -0 "$gw" 2>/dev/null; do rss; sleep 0.2; done ) > "$w/samples" & sampler=$!
streams "$count"
kill "$sampler"
peak=$(sort -n "$w/samples" | tail -1)
sleep 2
after=$(rss); cp "/proc/$gw/smaps" "$w/after.smaps"; malloc_stats after
echo "idle_kib=$idle peak_kib=$peak per_stream_kib=$(awk -v p="$peak" -v i="$idle" -v n="$count" 'BEGIN {printf "%.1f", (p - i) / n}') after_2s_kib=$after ratio=$(awk -v a="$after" -v i="$idle" 'BEGIN {printf "%.3f", a / i}')"
for round in $(seq 2 "$repeat"); do
  streams "$count" >/dev/null
  sleep 2
  echo "after burst $round: $(rss) KiB"
done
# Growth from idle by kind of mapping (a growing mapping changes its address range, so
# mappings are summed by kind, not matched one by one).
python3 - "$w/idle.smaps" "$w/after.smaps" <<'PY'
import re, sys
def kinds(path):
    sums, kind = {}, None
    for line in open(path):
        m = re.match(r'^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$', line)
        if m:
            start, end, name = int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip()
            if 0x20000000000 <= start < 0x30000000000:
                kind = 'mimalloc arenas (Rust heap)'  # mimalloc reserves from 2 TiB up
            elif name == '[heap]':
                kind = 'glibc main heap (C: SQLite)'
            elif not name and start % (64 << 20) == 0 and end - start <= (64 << 20):
                kind = 'glibc thread arenas (C: SQLite)'
            elif not name:
                kind = 'other anonymous (stacks, mmaps)'
            elif 'sluice' in name:
                kind = 'the binary'
            else:
                kind = name.split('/')[-1]
            sums.setdefault(kind, 0)
        elif line.startswith('Rss:'):
            sums[kind] += int(line.split()[1])
    return sums
idle, after = kinds(sys.argv[1]), kinds(sys.argv[2])
for kind in sorted(set(idle) | set(after), key=lambda k: idle.get(k, 0) - after.get(k, 0)):
    grew = after.get(kind, 0) - idle.get(kind, 0)
    if grew:
        print(f"{grew:+8d} KiB  {kind} (idle {idle.get(kind, 0)}, after {after.get(kind, 0)})")
PY
if [ "${GDB:-0}" = 1 ]; then grep -E "^(--|Arena|system|in use|Total)" "$w/sluice.log"; fi
