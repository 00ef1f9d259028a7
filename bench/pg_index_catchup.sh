#!/usr/bin/env bash
# How fast the PostgreSQL search indexer empties the backlog the writer left: runs the
# indexer's own statements (src/store/postgres.rs: `index_some`, then
# `clean_pending_list`) in a loop on the database `sluice-bench logwrite --store postgres`
# wrote, and prints rows per second.
#   target/release/sluice-bench logwrite --store postgres --rows 50000 && bench/pg_index_catchup.sh
set -euo pipefail
url=${1:-postgres://postgres@127.0.0.1:5432/sluice_logwrite_bench}
left=$(psql "$url" -Atc "SELECT COUNT(*) FROM search_backlog")
started=$(date +%s.%N)
while :; do
  n=$(psql "$url" -Atq -c "SET synchronous_commit = off" -c "WITH taken AS (DELETE FROM search_backlog \
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM search_backlog LIMIT 2000 FOR UPDATE SKIP LOCKED)) \
    RETURNING id, search_text), moved AS (UPDATE requests SET search_text = taken.search_text \
    FROM taken WHERE requests.id = taken.id) SELECT COUNT(*) FROM taken")
  if [ "$n" -gt 0 ]; then
    psql "$url" -Atqc "SELECT gin_clean_pending_list('requests_search_trgm'::regclass)" >/dev/null
  fi
  [ "$n" -lt 2000 ] && break
done
ended=$(date +%s.%N)
echo "backlog after the writer: $left rows; emptied in $(echo "$ended - $started" | bc) s = $(echo "$left / ($ended - $started)" | bc) rows/s"
psql "$url" -Atc "SELECT 'rows left unindexed: ' || COUNT(*) FROM requests WHERE search_text = ''"
