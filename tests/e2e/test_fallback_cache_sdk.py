"""The OpenAI SDK through a model fallback and the response cache (issue 17)."""

import time

import openai

from conftest import Mock, start_gateway


def sdk(gateway):
    return openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="sk-anything", max_retries=0)


def test_a_fallback_model_answers_when_the_first_fails(tmp_path_factory):
    """gpt-4o's only upstream answers 500: gpt-4o-mini's answers, and says so."""
    big = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--fault", "500", "--name", "big"])
    small = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "small"])
    config = f"""
routing: {{retries: 0, fallbacks: {{gpt-4o: [gpt-4o-mini]}}}}
upstreams:
  - {{name: big, base_url: 'http://{big.address}', models: [gpt-4o]}}
  - {{name: small, base_url: 'http://{small.address}', models: [gpt-4o-mini]}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("fallback"), config)
    try:
        raw = sdk(gateway).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-sluice-model"] == "gpt-4o-mini"
        assert raw.headers["x-sluice-upstream"] == "small"
        reply = raw.parse()
        assert reply.model == "gpt-4o-mini"
        assert reply.choices[0].message.content
        assert len(big.requests()) == 1
        assert '"model":"gpt-4o-mini"' in small.last()["body"]
    finally:
        gateway.stop()
        big.stop()
        small.stop()


def test_a_cached_stream_replays_the_same_chunks(tmp_path_factory):
    upstream = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "up"])
    config = f"""
upstreams:
  - {{name: up, base_url: 'http://{upstream.address}'}}
cache: {{enabled: true, ttl: 1m}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("cache"), config)
    try:
        client = sdk(gateway)

        def ask(headers=None):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "cache me"}],
                temperature=0,
                stream=True,
                extra_headers=headers,
            )
            return raw.headers["x-sluice-cache"], [chunk.model_dump() for chunk in raw.parse()]

        state, first = ask()
        assert state == "miss"
        # The answer is stored off the hot path, just after it ended; until then a repeat
        # is a miss (kept out of the cache with no-store, so the first answer stays).
        misses = 1
        for _ in range(100):
            state, again = ask({"Cache-Control": "no-store"})
            if state == "hit":
                break
            misses += 1
            time.sleep(0.02)
        assert state == "hit"
        assert again == first, "the same chunks, ids included"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in again if c["choices"])
        assert text == "".join(f"word{i} " for i in range(8))
        assert len(upstream.requests()) == misses
    finally:
        gateway.stop()
        upstream.stop()
