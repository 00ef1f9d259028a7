"""The official OpenAI Python SDK through sluice to an upstream of each kind in
UPSTREAM_KINDS: plain, streamed, tools (streamed and parallel), errors (401, 429 with
Retry-After, 500, a stream cut midway) and usage in the log. A new kind is one entry:
the mock's arguments and the YAML of an upstream of that kind."""

import time

import openai
import pytest

from conftest import Mock, admin_get, start_gateway

UPSTREAM_KEY = "sk-e2e-kinds-upstream-0001"
GATEWAY_KEY = "fk-e2e-kinds-alice-0001"
ADMIN = "admin-e2e-kinds-0001"
MODEL = "gpt-4o"
MESSAGES = [{"role": "user", "content": "hello"}]
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
    for name in ("lookup", "weather")
]

UPSTREAM_KINDS = {
    "azure": {
        "mock": ["--protocol", "azure"],
        "upstream": lambda address: f"""
  - name: azure
    kind: azure
    base_url: http://{address}
    api_version: '2024-10-21'
    keys: [{UPSTREAM_KEY}]
    deployments: {{{MODEL}: gpt-4o}}""",
    },
    "anthropic": {
        "mock": ["--protocol", "anthropic"],
        "upstream": lambda address: f"""
  - name: anthropic
    kind: anthropic
    base_url: http://{address}
    keys: [{UPSTREAM_KEY}]""",
    },
    "gemini": {
        "mock": ["--protocol", "gemini"],
        "upstream": lambda address: f"""
  - name: gemini
    kind: gemini
    base_url: http://{address}
    keys: [{UPSTREAM_KEY}]""",
    },
}


@pytest.fixture(scope="module", params=sorted(UPSTREAM_KINDS))
def setup(request, tmp_path_factory):
    kind = UPSTREAM_KINDS[request.param]
    mock = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--keys", UPSTREAM_KEY, *kind["mock"]])
    config = f"""
admin: {{key: {ADMIN}}}
routing: {{retries: 0}}
access:
  keys:
    - {{name: alice, key: {GATEWAY_KEY}}}
upstreams:{kind["upstream"](mock.address)}
"""
    gateway = start_gateway(tmp_path_factory.mktemp(request.param), config)
    client = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=GATEWAY_KEY, max_retries=0)
    yield request.param, gateway, client
    gateway.stop()
    mock.stop()
    log = "".join(gateway.log)
    for secret in (GATEWAY_KEY, UPSTREAM_KEY):
        assert secret not in log, f"{secret} appeared in the gateway log"


def test_plain(setup):
    _, _, client = setup
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.model == MODEL
    assert reply.choices[0].message.content.startswith("word0")
    assert reply.usage.total_tokens > 0


def test_streamed(setup):
    _, _, client = setup
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {MODEL}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"word{i} " for i in range(8))


def test_parallel_tool_calls_plain_and_streamed(setup):
    _, _, client = setup
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["lookup", "weather"]
    assert all(c.function.arguments == '{"query":"mock"}' for c in calls)

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True)
    names, arguments = {}, {}
    for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.function.name:
                names[call.index] = call.function.name
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
    assert names == {0: "lookup", 1: "weather"}
    assert arguments == {0: '{"query":"mock"}', 1: '{"query":"mock"}'}


def test_errors(setup):
    _, gateway, client = setup
    stranger = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="fk-nobody-000001", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-mock-fault": "429:7"})
    assert limited.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-mock-fault": "500"})
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-fault": "cut", "x-mock-chunks": "20", "x-mock-interval-ms": "10"},
    )
    received = 0
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received += len(chunk.choices)
    assert received > 0, "the stream had begun before it broke"


def test_usage_in_the_log(setup):
    name, gateway, client = setup
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    deadline = time.monotonic() + 5
    while True:
        rows = admin_get(gateway.address, "/api/requests?status=200&per_page=100", ADMIN)["data"]
        if sum(1 for r in rows if r["path"] == "/v1/chat/completions") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    answered = [r for r in rows if r["path"] == "/v1/chat/completions"]
    assert len(answered) >= 2
    for row in answered:
        assert row["upstream"] == name
        assert row["model"] == MODEL
        assert row["total_tokens"] > 0
    assert any(row["stream"] for row in answered)
