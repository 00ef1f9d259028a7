"""The OpenAI SDK streaming through a failover and through a model alias."""

import openai


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
