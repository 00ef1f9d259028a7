"""The OpenAI SDK streaming through a failover and through a model alias, and files through a pool."""

import openai

from conftest import Mock, start_gateway


def sdk(gateway):
    return openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="sk-anything", max_retries=0)


def test_streaming_through_a_failover(failover_gateway):
    gateway, bad, good = failover_gateway
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert raw.headers["x-sluice-upstream"] == "good"
    assert raw.headers["x-sluice-tries"] == "2", "the first try went to `bad` and got a 500"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    assert text == "".join(f"word{i} " for i in range(8))
    assert len(bad.requests()) == 1


def test_streaming_through_an_alias(failover_gateway):
    gateway, _bad, good = failover_gateway
    stream = sdk(gateway).chat.completions.create(
        model="my-alias", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    assert chunks and all(chunk.model == "my-alias" for chunk in chunks)
    assert '"model":"gpt-4o-mini"' in good.last()["body"]
    reply = sdk(gateway).chat.completions.create(model="my-alias", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "my-alias"
    assert "my-alias" in [m.id for m in sdk(gateway).models.list()]


def test_a_file_is_read_back_from_the_upstream_it_was_uploaded_to(tmp_path_factory):
    """Two upstreams in turn: the file's content comes from the one holding the file."""
    one = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "one"])
    two = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "two"])
    config = f"""
routing: {{strategy: round_robin, retries: 0}}
upstreams:
  - {{name: one, base_url: 'http://{one.address}'}}
  - {{name: two, base_url: 'http://{two.address}'}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("files"), config)
    try:
        client = sdk(gateway)
        raw = client.files.with_raw_response.create(file=("in.jsonl", b'{"custom_id": "1"}\n'), purpose="batch")
        home = raw.headers["x-sluice-upstream"]
        uploaded = raw.parse()
        for _ in range(3):
            content = client.files.with_raw_response.content(uploaded.id)
            assert content.headers["x-sluice-upstream"] == home
            assert content.content == b'{"custom_id": "1"}\n'
            assert client.files.retrieve(uploaded.id).id == uploaded.id
    finally:
        gateway.stop()
        one.stop()
        two.stop()
