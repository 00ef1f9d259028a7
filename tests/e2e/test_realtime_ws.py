"""Realtime sessions with the `websockets` client through the sluice binary to the mock's
realtime endpoint: events both ways in order, either side's disconnect closing the other,
a session over the key's rpm refused, and the session's log record."""

import json
import time
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import Mock, admin_get, start_gateway

UPSTREAM_KEY = "sk-e2e-rt-upstream-0001"
ALICE = "fk-e2e-rt-alice-0001"
BOB = "fk-e2e-rt-bob-00001"
ADMIN = "admin-e2e-rt-0001"
MODEL = "gpt-4o-realtime-preview"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mock = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--keys", UPSTREAM_KEY])
    config = f"""
server: {{max_body: 64KiB}}
admin: {{key: {ADMIN}}}
access:
  keys:
    - {{name: alice, key: {ALICE}}}
    - {{name: bob, key: {BOB}, rpm: 1}}
upstreams:
  - name: mock
    base_url: http://{mock.address}
    keys: [{UPSTREAM_KEY}]
"""
    gateway = start_gateway(tmp_path_factory.mktemp("realtime"), config)
    yield gateway, mock
    gateway.stop()
    mock.stop()
    log = "".join(gateway.log)
    for secret in (ALICE, BOB, UPSTREAM_KEY):
        assert secret not in log, f"{secret} appeared in the gateway log"


def url(gateway):
    return f"ws://{gateway.address}/v1/realtime?model={MODEL}"


def event(socket):
    return json.loads(socket.recv(timeout=5))


def stats(mock):
    with urllib.request.urlopen(f"http://{mock.address}/_mock/stats") as response:
        return json.load(response)


def wait_for(check, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def sessions_logged(gateway):
    return admin_get(gateway.address, "/api/requests?path=/v1/realtime", ADMIN)["data"]


def test_events_cross_both_ways_in_order_and_the_session_is_logged(setup):
    gateway, mock = setup
    before = len(sessions_logged(gateway))
    with connect(url(gateway), additional_headers={"Authorization": f"Bearer {ALICE}"}) as socket:
        assert event(socket)["type"] == "session.created"
        socket.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}))
        socket.send(json.dumps({"type": "response.create"}))
        kinds = []
        while not kinds or kinds[-1] != "response.done":
            kinds.append(event(socket)["type"])
        assert kinds == ["conversation.item.created", "response.created"] + ["response.output_text.delta"] * 8 + [
            "response.done"
        ]
    seen = [r for r in mock.requests() if r["path"] == "/v1/realtime"][-1]
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert wait_for(lambda: len(sessions_logged(gateway)) > before), "the session was logged"
    row = sessions_logged(gateway)[0]
    assert row["status"] == 101
    assert row["key_name"] == "alice"
    assert row["model"] == MODEL
    assert row["total_tokens"] == 12 + 8
    detail = admin_get(gateway.address, f"/api/requests/{row['id']}", ADMIN)
    summary = json.loads(detail["response_body"])
    assert summary["events"] == {"client": 2, "upstream": 12}
    assert summary["closed_by"] == "client"


def test_the_browser_subprotocol_carries_the_key(setup):
    gateway, mock = setup
    protocols = ["realtime", f"openai-insecure-api-key.{ALICE}", "openai-beta.realtime-v1"]
    with connect(url(gateway), subprotocols=protocols) as socket:
        assert socket.subprotocol == "realtime"
        assert event(socket)["type"] == "session.created"
    seen = [r for r in mock.requests() if r["path"] == "/v1/realtime"][-1]
    assert ALICE not in json.dumps(seen["headers"])


def test_a_client_disconnect_closes_the_upstream_session(setup):
    gateway, mock = setup
    # Earlier sessions have ended, so the count below moves for this one alone.
    assert wait_for(lambda: (lambda s: s["realtime_opened"] == s["realtime_closed"])(stats(mock)))
    closed = stats(mock)["realtime_closed"]
    with connect(url(gateway), additional_headers={"Authorization": f"Bearer {ALICE}"}) as socket:
        assert event(socket)["type"] == "session.created"
        assert stats(mock)["realtime_closed"] == closed
    assert wait_for(lambda: stats(mock)["realtime_closed"] > closed)


def test_an_upstream_disconnect_closes_the_client(setup):
    gateway, _ = setup
    with connect(url(gateway), additional_headers={"Authorization": f"Bearer {ALICE}"}) as socket:
        assert event(socket)["type"] == "session.created"
        socket.send(json.dumps({"type": "mock.close"}))
        with pytest.raises(ConnectionClosed):
            socket.recv(timeout=5)


def test_a_session_over_the_keys_rpm_is_refused(setup):
    gateway, _ = setup
    second = time.gmtime().tm_sec
    if second > 50:
        time.sleep(61 - second)
    with connect(url(gateway), additional_headers={"Authorization": f"Bearer {BOB}"}) as socket:
        assert event(socket)["type"] == "session.created"
        with pytest.raises(InvalidStatus) as refused:
            connect(url(gateway), additional_headers={"Authorization": f"Bearer {BOB}"})
        assert refused.value.response.status_code == 429
