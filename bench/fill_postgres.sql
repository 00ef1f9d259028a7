-- Fills a sluice PostgreSQL request log with :rows synthetic requests spread over the last
-- 30 days (the shape `sluice-bench log` writes through the store), and the hourly rollups
-- the dashboard's statistics read. Server-side, so ten million rows take minutes rather
-- than the hour the row-by-row writer would. Replaces whatever the log held. Every row's
-- search text goes straight into `requests` and the trigram index (the search indexer's
-- backlog is left empty).
--   psql URL -v rows=10000000 -f bench/fill_postgres.sql      (bench/log_postgres.sh runs it)
\set ON_ERROR_STOP on
SET maintenance_work_mem = '1GB';
SET synchronous_commit = off;
TRUNCATE requests, search_backlog, rollup_hourly, rollup_latency;
-- Maintaining the trigram index row by row is the slow part; it is rebuilt at the end.
DROP INDEX IF EXISTS requests_search_trgm;

INSERT INTO requests (id, ts, client_ip, key_name, method, path, model, upstream_model, upstream,
    upstream_key, status, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, total_tokens, cost,
    usage_source, stream, error, tries, attempts, request_headers, response_headers, request_body,
    response_body, reply_text, reply_tool_calls, search_text)
SELECT id, ts, client_ip, key_name, 'POST', '/v1/chat/completions', model, model, upstream,
    'sk-…a1b2', status, latency, random() * 800, prompt, completion, prompt + completion,
    (prompt * 2.5 + completion * 10.0) / 1e6, 'upstream', i % 2,
    CASE WHEN status <> 200 THEN 'upstream said no' END, 1, '[]',
    '{"content-type":"application/json","authorization":"Bearer fk-…0001"}',
    '{"content-type":"application/json"}', request_body, response_body, reply_text, NULL,
    lower(concat_ws(E'\n', id, '/v1/chat/completions', model, model, key_name, upstream,
        CASE WHEN status <> 200 THEN 'upstream said no' END, request_body, response_body, reply_text))
FROM (
    SELECT i,
        'req_' || lpad(to_hex(i), 16, '0') || lpad(to_hex((random() * 4294967295)::bigint), 8, '0') AS id,
        (extract(epoch FROM now()) * 1000)::bigint - (random() * 30 * 86400000)::bigint AS ts,
        '10.0.' || (i % 250) || '.' || (i % 200) AS client_ip,
        'key-' || (i % 10) AS key_name,
        (ARRAY['gpt-4o', 'gpt-4o-mini', 'text-embedding-3-small', 'claude-3-5-sonnet', 'llama-3.1-70b'])[i % 5 + 1] AS model,
        (ARRAY['openai', 'azure', 'local'])[i % 3 + 1] AS upstream,
        CASE WHEN r < 95 THEN 200 WHEN r < 98 THEN 429 ELSE 500 END AS status,
        random() * 3000 AS latency,
        prompt, completion,
        '{"model":"' || (ARRAY['gpt-4o', 'gpt-4o-mini', 'text-embedding-3-small', 'claude-3-5-sonnet', 'llama-3.1-70b'])[i % 5 + 1]
            || '","messages":[{"role":"user","content":"question number ' || i || ' about lighthouses and harbours"}]}' AS request_body,
        '{"choices":[{"message":{"content":"answer number ' || i || ': the keeper lights the lamp at dusk"}}]}' AS response_body,
        'answer number ' || i || ': the keeper lights the lamp at dusk' AS reply_text
    FROM (
        SELECT i, floor(random() * 100) AS r, 10 + floor(random() * 1990)::bigint AS prompt,
            1 + floor(random() * 799)::bigint AS completion
        FROM generate_series(0, :rows - 1) AS i
    ) AS draws
) AS rows;

INSERT INTO rollup_hourly (hour_ms, model, upstream, key_name, requests, succeeded, latency_sum,
    prompt_tokens, completion_tokens, total_tokens, cost)
SELECT (ts / 3600000) * 3600000, COALESCE(model, ''), COALESCE(upstream, ''), key_name, COUNT(*),
    COUNT(*) FILTER (WHERE status >= 200 AND status < 400), SUM(latency_ms),
    COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),
    COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cost), 0)
FROM requests GROUP BY 1, 2, 3, 4;

INSERT INTO rollup_latency (hour_ms, bucket, count)
SELECT (ts / 3600000) * 3600000,
    LEAST(GREATEST(floor(ln(GREATEST(latency_ms, 0.001) / 0.001) / ln(1.05)), 0), 1000)::bigint, COUNT(*)
FROM requests GROUP BY 1, 2;

CREATE INDEX requests_search_trgm ON requests USING gin (search_text gin_trgm_ops);
ANALYZE requests;
ANALYZE rollup_hourly;
ANALYZE rollup_latency;
