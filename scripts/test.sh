#!/usr/bin/env bash
# Runs the whole test suite: Rust unit and integration tests, then the end-to-end tests that
# drive sluice with the official OpenAI Python SDK. Installs what it needs on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real outbound proxies for the proxy tests, a real browser for the dashboard tests, and
# the PostgreSQL and Redis clients and server the tests drive, from Debian's packages.
missing=()
for tool in tinyproxy microsocks; do command -v "$tool" >/dev/null || missing+=("$tool"); done
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# psql creates the SDK tests' PostgreSQL databases; redis-server runs the outage test.
command -v psql >/dev/null || missing+=(postgresql-client)
command -v redis-server >/dev/null || missing+=(redis-server)
# The openai Node SDK tests (tests/e2e-node) need Node 20 or newer and npm.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  $apt_get update -qq
  DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
venv=.venv
if [ ! -x "$venv/bin/pytest" ] || ! "$venv/bin/python" -c "import openai, anthropic, selenium, opentelemetry.proto, websockets" 2>/dev/null; then
  echo "== setting up the Python test environment in $venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -r tests/e2e/requirements.txt
fi

# The shared-limits tests use the Redis on 127.0.0.1:6379 (and redis-server for an outage).
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && command -v redis-server >/dev/null; then
  echo "== starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  sleep 0.5
fi

echo "== cargo test (request log on SQLite)"
cargo test --workspace --all-targets

# The same suites again with the request log on the local PostgreSQL (127.0.0.1:5432, trust
# auth, database `test`); a fresh database per test, leftovers of earlier runs dropped first.
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && [ -d /etc/postgresql ]; then
  echo "== starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if command -v psql >/dev/null; then
  psql -h 127.0.0.1 -U postgres -d test -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'sluice_test_%'" 2>/dev/null \
    | while read -r db; do psql -h 127.0.0.1 -U postgres -d test -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; done
fi
echo "== cargo test (request log on PostgreSQL)"
SLUICE_TEST_STORAGE=postgres cargo test --test accounting --test proxy --test routing --test admin --test affinity --test guards --test operator --test manage --test cache --test fallback --test realtime --test translate

echo "== OpenAI and Anthropic SDK end-to-end tests"
cargo build --quiet --bin sluice
SLUICE_TEST_BIN="$PWD/target/debug/sluice" "$venv/bin/pytest" -q tests/e2e

# The official openai Node SDK against every upstream kind (tests/e2e-node/harness.mjs),
# its packages pinned by the committed lockfile; a summary line of its own at the end.
echo "== openai Node SDK end-to-end tests"
(cd tests/e2e-node && npm ci --no-audit --no-fund --loglevel=error)
tap=$(mktemp)
node_status=0
(cd tests/e2e-node && SLUICE_TEST_BIN="$PWD/../../target/debug/sluice" node --test \
  --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination="$tap" sdk.test.mjs) || node_status=$?
node_passed=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$tap" | tail -1)
node_failed=$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$tap" | tail -1)
rm -f "$tap"
echo "node: ${node_passed:-0} passed, ${node_failed:-0} failed"
exit "$node_status"
