"""Two sluice processes behind one "load balancer" (the test alternates between them),
sharing limits through the local Redis and one request log in a fresh PostgreSQL database,
driven with the official OpenAI SDK."""

import secrets
import subprocess
import time

import openai
import pytest

from conftest import GATEWAY_KEY, UPSTREAM_KEY, admin_get, start_gateway

ADMIN_KEY = "admin-e2e-instances-0001"


def fresh_database():
    name = f"sluice_test_{secrets.token_hex(8)}"
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc", f"CREATE DATABASE {name}"],
        check=True,
    )
    return f"postgres://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="module")
def instances(mock, tmp_path_factory):
    config = f"""
access:
  keys:
    - {{name: alice, key: {GATEWAY_KEY}, rpm: 4}}
upstreams:
  - name: mock
    base_url: http://{mock.address}
    keys: [{UPSTREAM_KEY}]
shared_state: {{redis: 'redis://127.0.0.1:6379', prefix: 'sluice-e2e-{secrets.token_hex(6)}'}}
storage: {{url: '{fresh_database()}'}}
admin: {{key: {ADMIN_KEY}}}
"""
    pair = [start_gateway(tmp_path_factory.mktemp(f"instance{i}"), config) for i in range(2)]
    yield pair
    for process in pair:
        process.stop()



def test_a_key_limit_holds_across_instances_and_one_log_shows_both(instances):
    # Limits count in fixed minutes: start the burst early in one.
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    clients = [
        openai.OpenAI(base_url=f"http://{p.address}/v1", api_key=GATEWAY_KEY, max_retries=0) for p in instances
    ]
    answered, refused = 0, []
    for i in range(6):
        try:
            stream = clients[i % 2].chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"hello {i}"}], stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            answered += 1
        except openai.RateLimitError as error:
            refused.append(error)
    assert answered == 4, "rpm: 4 over both instances"
    assert len(refused) == 2
    assert refused[0].code == "rate_limit_exceeded"
    assert int(refused[0].response.headers["retry-after"]) >= 1

    # Either instance's status counts both instances' requests.
    status = admin_get(instances[1].address, "/v1/status", ADMIN_KEY)
    assert status["keys"][0]["usage"]["minute"]["requests"] == 4

    # One log: each instance's admin API lists the six requests of both.
    deadline = time.time() + 10
    while time.time() < deadline:
        listed = admin_get(instances[0].address, "/api/requests?key=alice", ADMIN_KEY)
        if listed["total"] == 6:
            break
        time.sleep(0.2)
    assert listed["total"] == 6
    assert sorted(r["status"] for r in listed["data"]) == [200] * 4 + [429] * 2
