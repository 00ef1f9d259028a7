#!/usr/bin/env bash
# The dashboard's queries on a PostgreSQL log of many rows (default ten million):
#   bench/log_postgres.sh [postgres://postgres@127.0.0.1:5432] [rows] [backlog]
# Creates (or replaces) the database `sluice_log_bench`, lets sluice apply its schema, fills
# it server-side (bench/fill_postgres.sql) and times every query the dashboard makes.
# With `backlog` > 0 it then times them again with the newest `backlog` rows' search text
# waiting in `search_backlog`, as when the search indexer is behind the writer (the
# indexer is held back by a lock for the run, so the backlog stays whole).
set -euo pipefail
cd "$(dirname "$0")/.."
server=${1:-postgres://postgres@127.0.0.1:5432}
rows=${2:-10000000}
backlog=${3:-0}
url="$server/sluice_log_bench"
cargo build --release -p sluice-bench
psql "$server/postgres" -qc "DROP DATABASE IF EXISTS sluice_log_bench" -c "CREATE DATABASE sluice_log_bench"
target/release/sluice-bench log --db "$url" --rows 0 >/dev/null   # the schema
started=$(date +%s)
psql "$url" -q -v rows="$rows" -f bench/fill_postgres.sql
echo "filled $rows rows in $(( $(date +%s) - started ))s (server-side)"
psql "$url" -Atc "SELECT 'database size: ' || pg_size_pretty(pg_database_size(current_database()))"
target/release/sluice-bench log --db "$url" --rows "$rows"
if [ "$backlog" -gt 0 ]; then
  psql "$url" -q -v backlog="$backlog" <<'SQL'
INSERT INTO search_backlog SELECT id, ts, search_text FROM requests ORDER BY ts DESC LIMIT :backlog;
UPDATE requests SET search_text = '' WHERE id IN (SELECT id FROM search_backlog);
VACUUM (ANALYZE) requests;
VACUUM (ANALYZE) search_backlog;
SQL
  # The indexer's DELETE waits on this lock; searches only read the backlog and do not.
  PGAPPNAME=sluice_bench_hold psql "$url" -qc \
    "BEGIN; LOCK TABLE search_backlog IN SHARE MODE; SELECT pg_sleep(3600)" >/dev/null 2>&1 &
  sleep 1
  echo "with the newest $backlog rows' search text in the backlog:"
  target/release/sluice-bench log --db "$url" --rows "$rows" || true
  psql "$url" -qAtc "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'sluice_bench_hold'" >/dev/null
  wait || true   # psql ends with an error when its backend is terminated
  psql "$url" -Atc "SELECT 'rows still in the backlog: ' || COUNT(*) FROM search_backlog"
fi
