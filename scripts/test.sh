#!/usr/bin/env bash
# Runs the whole test suite: Rust unit and integration tests, then the end-to-end tests that
# drive sluice with the official OpenAI Python SDK. Installs what it needs on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real outbound proxies for the proxy tests, and a real browser for the dashboard tests,
# from Debian's packages.
missing=()
for tool in tinyproxy microsocks; do command -v "$tool" >/dev/null || missing+=("$tool"); done
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  $apt_get update -qq
  DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
venv=.venv
if [ ! -x "$venv/bin/pytest" ] || ! "$venv/bin/python" -c "import openai, selenium" 2>/dev/null; then
  echo "== setting up the Python test environment in $venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -r tests/e2e/requirements.txt
fi

echo "== cargo test"
cargo test --workspace --all-targets

echo "== OpenAI SDK end-to-end tests"
cargo build --quiet --bin sluice
SLUICE_TEST_BIN="$PWD/target/debug/sluice" "$venv/bin/pytest" -q tests/e2e
