"""The official `anthropic` and `openai` SDKs through sluice to upstreams of another API
(mocks speaking OpenAI, Anthropic and Gemini natively): plain, streamed, tools (streamed
and parallel), images, errors (401, 429 with Retry-After, 500, a stream cut midway), and
usage and cost in the log. Also Claude Code's requests to an Anthropic upstream."""

import base64
import time

import anthropic
import openai
import pytest

from conftest import Mock, admin_get, start_gateway

KEY = "fk-e2e-translate-0001"
ADMIN = "admin-e2e-translate-0001"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
KINDS = {"openai": "gpt-4o", "anthropic": "claude-sonnet", "gemini": "gemini-flash"}
FAULTS = ("500", "429", "cut")


@pytest.fixture(scope="module")
def translating(tmp_path_factory):
    mocks = {
        kind: Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--protocol", kind,
                    "--keys", f"up-{kind}-0001", "--chunks", "4", "--name", kind])
        for kind in KINDS
    }
    upstreams = []
    for kind, model in KINDS.items():
        base = f"http://{mocks[kind].address}"
        upstreams.append(f"  - {{name: {kind}, kind: {kind}, base_url: '{base}', keys: [up-{kind}-0001], models: [{model}]}}")
        # One upstream per fault, so a rested key or upstream never touches another test.
        for fault in FAULTS:
            upstreams.append(
                f"  - {{name: {kind}-{fault}, kind: {kind}, base_url: '{base}', keys: [up-{kind}-0001], "
                f"models: [{model}-{fault}], model_map: {{{model}-{fault}: {model}}}}}"
            )
    config = f"""
access:
  keys:
    - {{name: alice, key: {KEY}}}
admin: {{key: {ADMIN}}}
routing: {{retries: 0}}
pricing:
  gpt-4o: {{input: 2.5, output: 10}}
  claude-sonnet: {{input: 3, output: 15}}
  gemini-flash: {{input: 1, output: 4}}
upstreams:
""" + "\n".join(upstreams) + "\n"
    gateway = start_gateway(tmp_path_factory.mktemp("translate"), config)
    yield gateway, mocks
    gateway.stop()
    for mock in mocks.values():
        mock.stop()
    log = "".join(gateway.log)
    for secret in (KEY, ADMIN, *(f"up-{k}-0001" for k in KINDS)):
        assert secret not in log


@pytest.fixture()
def claude(translating):
    gateway, _ = translating
    return anthropic.Anthropic(base_url=f"http://{gateway.address}", api_key=KEY, max_retries=0)


@pytest.fixture()
def gpt(translating):
    gateway, _ = translating
    return openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=KEY, max_retries=0)


def logged(translating, path):
    """How many requests on `path` the log holds."""
    gateway, _ = translating
    return admin_get(gateway.address, f"/api/requests?path={path}", ADMIN)["total"]


def last_logged(translating, path, total):
    """The newest log row for `path` once the log holds `total` of them (it is written off
    the request path, a moment after the answer), with its detail."""
    gateway, _ = translating
    for _ in range(100):
        listed = admin_get(gateway.address, f"/api/requests?path={path}", ADMIN)
        if listed["total"] >= total:
            row = listed["data"][0]
            return row, admin_get(gateway.address, f"/api/requests/{row['id']}", ADMIN)
        time.sleep(0.05)
    raise AssertionError(f"the log holds fewer than {total} requests on {path}")


ANTHROPIC_TOOLS = [
    {"name": "weather", "description": "the weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "time", "input_schema": {"type": "object"}},
]
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize("model", ["gpt-4o", "gemini-flash"])
def test_anthropic_sdk_plain_streamed_and_image(claude, translating, model):
    before = logged(translating, "/v1/messages")
    message = claude.messages.create(
        model=model, max_tokens=64, system="be brief",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is in this picture?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        ]}],
    )
    assert message.type == "message"
    assert message.model == model
    assert message.content[0].text == "word0 word1 word2 word3 "
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 4
    _, mocks = translating
    seen = mocks["openai" if model == "gpt-4o" else "gemini"].last()
    assert PNG in seen["body"]

    with claude.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 4, "the stream arrives in pieces, not at once"
    assert "".join(pieces) == "word0 word1 word2 word3 "
    assert final.usage.output_tokens == 4
    row, detail = last_logged(translating, "/v1/messages", before + 2)
    assert row["model"] == model
    assert row["completion_tokens"] == 4
    assert row["cost"] > 0
    assert detail["reply_text"] == "word0 word1 word2 word3 "


@pytest.mark.parametrize("model", ["gpt-4o", "gemini-flash"])
def test_anthropic_sdk_parallel_tools_streamed(claude, translating, model):
    before = logged(translating, "/v1/messages")
    with claude.messages.stream(model=model, max_tokens=64, tools=ANTHROPIC_TOOLS,
                                messages=[{"role": "user", "content": "weather and time"}]) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["weather", "time"]
    assert all(u.input == {"query": "mock"} for u in uses)
    assert final.stop_reason == "tool_use"
    # The tool results go back, and the conversation goes on.
    reply = claude.messages.create(model=model, max_tokens=64, tools=ANTHROPIC_TOOLS, tool_choice={"type": "none"}, messages=[
        {"role": "user", "content": "weather and time"},
        {"role": "assistant", "content": [u.model_dump(exclude_none=True) for u in uses]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "fine"} for u in uses]},
    ])
    assert reply.content[0].text.startswith("word0")
    _, detail = last_logged(translating, "/v1/messages", before + 2)
    assert detail["reply_text"].startswith("word0")


@pytest.mark.parametrize("model", ["claude-sonnet", "gemini-flash"])
def test_openai_sdk_plain_streamed_and_image(gpt, translating, model):
    before = logged(translating, "/v1/chat/completions")
    reply = gpt.chat.completions.create(model=model, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
    ])
    assert reply.model == model
    assert reply.choices[0].message.content == "word0 word1 word2 word3 "
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 4
    stream = gpt.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "word0 word1 word2 word3 "
    assert chunks[-1].usage.completion_tokens == 4
    row, _ = last_logged(translating, "/v1/chat/completions", before + 2)
    assert row["model"] == model
    assert row["completion_tokens"] == 4
    assert row["cost"] > 0


@pytest.mark.parametrize("model", ["claude-sonnet", "gemini-flash"])
def test_openai_sdk_parallel_tools_streamed(gpt, translating, model):
    before = logged(translating, "/v1/chat/completions")
    stream = gpt.chat.completions.create(model=model, stream=True, tools=OPENAI_TOOLS,
                                         messages=[{"role": "user", "content": "weather and time"}])
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me look that up. ", "text before the calls is kept"
    assert [calls[i]["name"] for i in sorted(calls)] == ["weather", "time"]
    assert all(c["arguments"] == '{"query":"mock"}' for c in calls.values())
    assert finish == "tool_calls"
    _, detail = last_logged(translating, "/v1/chat/completions", before + 1)
    assert [c["function"]["name"] for c in detail["reply_tool_calls"]] == ["weather", "time"]


def test_errors_reach_the_anthropic_sdk_as_its_own(claude):
    bad = anthropic.Anthropic(base_url=claude.base_url, api_key="fk-wrong-key-0001", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    for model in ("gpt-4o", "gemini-flash"):
        with pytest.raises(anthropic.RateLimitError) as limited:
            claude.messages.create(model=f"{model}-429", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                   extra_headers={"x-mock-fault": "429:7"})
        assert limited.value.response.headers["retry-after"] == "7"
        assert limited.value.body["error"]["type"] == "rate_limit_error"
        with pytest.raises(anthropic.InternalServerError):
            claude.messages.create(model=f"{model}-500", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                   extra_headers={"x-mock-fault": "500"})
        with pytest.raises(anthropic.APIError):
            with claude.messages.stream(model=f"{model}-cut", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                        extra_headers={"x-mock-fault": "cut", "x-mock-interval-ms": "20"}) as stream:
                for _ in stream:
                    pass


def test_errors_reach_the_openai_sdk_as_its_own(gpt, translating):
    for model in ("claude-sonnet", "gemini-flash"):
        with pytest.raises(openai.RateLimitError) as limited:
            gpt.chat.completions.create(model=f"{model}-429", messages=[{"role": "user", "content": "x"}],
                                        extra_headers={"x-mock-fault": "429:7"})
        assert limited.value.response.headers["retry-after"] == "7"
        with pytest.raises(openai.InternalServerError):
            gpt.chat.completions.create(model=f"{model}-500", messages=[{"role": "user", "content": "x"}],
                                        extra_headers={"x-mock-fault": "500"})
        with pytest.raises(openai.APIError):
            for _ in gpt.chat.completions.create(model=f"{model}-cut", stream=True, messages=[{"role": "user", "content": "x"}],
                                                 extra_headers={"x-mock-fault": "cut", "x-mock-interval-ms": "20"}):
                pass
    with pytest.raises(openai.BadRequestError) as refused:
        gpt.chat.completions.create(model="claude-sonnet", logprobs=True, messages=[{"role": "user", "content": "x"}])
    assert "`logprobs`" in refused.value.message


def test_claude_code_requests_reach_an_anthropic_upstream_unharmed(claude, translating):
    before = logged(translating, "/v1/messages")
    _, mocks = translating
    tools = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}]
    with claude.beta.messages.stream(
        model="claude-sonnet", max_tokens=2048, tools=tools,
        thinking={"type": "enabled", "budget_tokens": 1024},
        betas=["interleaved-thinking-2025-05-14", "fine-grained-tool-streaming-2025-05-14"],
        system=[{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "list the files"}],
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].signature == "sig"
    seen = mocks["anthropic"].last()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
    assert seen["headers"]["x-api-key"] == "up-anthropic-0001"
    assert '"cache_control"' in seen["body"] and '"budget_tokens":1024' in seen["body"].replace(" ", "")
    row, _ = last_logged(translating, "/v1/messages", before + 1)
    assert row["upstream"] == "anthropic"
    # The cache read (3 tokens in the mock) counts as input.
    assert row["prompt_tokens"] == final.usage.input_tokens + 3
    count = claude.messages.count_tokens(model="claude-sonnet", messages=[{"role": "user", "content": "hello"}])
    assert count.input_tokens > 0
    local = claude.messages.count_tokens(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    assert local.input_tokens > 0
