#!/usr/bin/env bash
# The dashboard's queries on a PostgreSQL log of many rows (default ten million):
#   bench/log_postgres.sh [postgres://postgres@127.0.0.1:5432] [rows]
# Creates (or replaces) the database `sluice_log_bench`, lets sluice apply its schema, fills
# it server-side (bench/fill_postgres.sql) and times every query the dashboard makes.
set -euo pipefail
cd "$(dirname "$0")/.."
server=${1:-postgres://postgres@127.0.0.1:5432}
rows=${2:-10000000}
url="$server/sluice_log_bench"
cargo build --release -p sluice-bench
psql "$server/postgres" -qc "DROP DATABASE IF EXISTS sluice_log_bench" -c "CREATE DATABASE sluice_log_bench"
target/release/sluice-bench log --db "$url" --rows 0 >/dev/null   # the schema
started=$(date +%s)
psql "$url" -q -v rows="$rows" -f bench/fill_postgres.sql
echo "filled $rows rows in $(( $(date +%s) - started ))s (server-side)"
psql "$url" -Atc "SELECT 'database size: ' || pg_size_pretty(pg_database_size(current_database()))"
target/release/sluice-bench log --db "$url" --rows "$rows"
