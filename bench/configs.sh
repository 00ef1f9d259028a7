# The benchmark's two gateway configurations, shared by bench/run.sh, bench/probe.sh,
# bench/rss_after.sh and bench/translate_callgrind.sh, so each measures the same bare and
# full. Source it, then:
#
#   write_bench_configs DIR LISTEN_PORT UPSTREAM_PORT [SERVER_EXTRA]
#
# writes DIR/bare.yaml (a bare proxy: no request log, no access log) and DIR/full.yaml
# (gateway key with rpm/rpd/tpm limits, routing by model over two upstreams with their own
# limits, the SQLite request log in DIR/full.db with bodies, the access log on as by
# default). SERVER_EXTRA is appended inside `server: {…}` (e.g. ", busy_poll: 0").
write_bench_configs() {
  local dir=$1 listen=$2 upstream=$3 extra=${4:-}
  cat > "$dir/bare.yaml" <<YAML
server: {listen: 127.0.0.1:$listen, max_connections_per_ip: 0$extra}
access: {keys: [{name: bench, key: fk-bench-key-0001}]}
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:$upstream', keys: [sk-bench-upstream-1]}
storage: {url: none}
log: {access: false}
YAML
  cat > "$dir/full.yaml" <<YAML
server: {listen: 127.0.0.1:$listen, max_connections_per_ip: 0$extra}
access:
  keys: [{name: bench, key: fk-bench-key-0001, rpm: 100000000, rpd: 1000000000, tpm: 100000000000}]
upstreams:
  - {name: plain, base_url: 'http://127.0.0.1:$upstream', keys: [sk-bench-upstream-1], models: [gpt-4o-mini], rpm: 100000000}
  - {name: other, base_url: 'http://127.0.0.1:$upstream', keys: [sk-bench-upstream-2], models: [gpt-4o], rpm: 100000000}
storage: {url: 'sqlite://$dir/full.db', log_bodies: true}
pricing: {gpt-4o-mini: {input: 0.15, output: 0.6}}
YAML
}
