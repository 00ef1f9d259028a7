"""Fixtures that run the real `sluice` binary and its mock upstream for the SDK tests."""

import json
import os
import pathlib
import subprocess
import threading
import urllib.request

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("SLUICE_TEST_BIN", str(ROOT / "target" / "debug" / "sluice"))

GATEWAY_KEY = "fk-e2e-alice-0001"
UPSTREAM_KEY = "sk-e2e-upstream-0001"


class Process:
    """A child process whose announced address is read from its log."""

    def __init__(self, args, env=None, cwd=None):
        full_env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "SLUICE_CONFIG")}
        full_env.update(env or {})
        full_env.setdefault("SLUICE_LOG", "info")
        self.proc = subprocess.Popen(
            [BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=cwd
        )
        self.address = None
        self.log = []
        for line in self.proc.stdout:
            self.log.append(line)
            # `https://` when the gateway terminates TLS (server.tls).
            if "listening on http://" in line or "listening on https://" in line:
                self.address = line.split("listening on http", 1)[1].split("://", 1)[1].split("/")[0].split()[0]
                break
        if self.address is None:
            raise RuntimeError("process did not start:\n" + "".join(self.log))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def admin_get(address, path, admin_key):
    """GET an admin endpoint of the gateway at `address` with `admin_key`; its JSON."""
    request = urllib.request.Request(f"http://{address}{path}", headers={"Authorization": f"Bearer {admin_key}"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


class Mock(Process):
    def requests(self):
        with urllib.request.urlopen(f"http://{self.address}/_mock/requests") as response:
            return json.load(response)["requests"]

    def last(self):
        return self.requests()[-1]


@pytest.fixture(scope="session")
def mock():
    process = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--keys", UPSTREAM_KEY])
    yield process
    process.stop()


def start_gateway(tmp_path, config):
    path = tmp_path / "sluice.yaml"
    path.write_text(config)
    return Process(["serve", "--config", str(path), "--listen", "127.0.0.1:0"], cwd=tmp_path)


@pytest.fixture(scope="session")
def gateway(mock, tmp_path_factory):
    config = f"""
server:
  max_body: 64KiB
access:
  keys:
    - {{name: alice, key: {GATEWAY_KEY}}}
upstreams:
  - name: mock
    base_url: http://{mock.address}
    keys: [{UPSTREAM_KEY}]
"""
    process = start_gateway(tmp_path_factory.mktemp("gw"), config)
    yield process
    process.stop()
    log = "".join(process.log)
    for secret in (GATEWAY_KEY, UPSTREAM_KEY):
        assert secret not in log, f"{secret} appeared in the gateway log"


@pytest.fixture()
def client(gateway):
    return openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=GATEWAY_KEY, max_retries=0)


@pytest.fixture(scope="module")
def failover_gateway(tmp_path_factory):
    """Two upstreams: `bad` answers 500 to everything, `good` answers; both serve the
    alias `my-alias` as `gpt-4o-mini`."""
    bad = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--fault", "500", "--name", "bad"])
    good = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "good"])
    config = f"""
routing: {{strategy: round_robin, retries: 2, backoff: 1ms}}
upstreams:
  - {{name: bad, base_url: 'http://{bad.address}', model_map: {{my-alias: gpt-4o-mini}}}}
  - {{name: good, base_url: 'http://{good.address}', model_map: {{my-alias: gpt-4o-mini}}}}
"""
    process = start_gateway(tmp_path_factory.mktemp("failover"), config)
    yield process, bad, good
    process.stop()
    bad.stop()
    good.stop()
