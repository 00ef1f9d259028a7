"""The official OpenAI SDK over HTTP/2 and TLS to sluice with `server.tls`, in front of a
mock spoken to over h2c. The SDK's own httpx client with `http2=True` (which needs the
`h2` package) trusts the test CA."""

import ssl

import openai
import pytest

from conftest import GATEWAY_KEY, ROOT, UPSTREAM_KEY, Mock, start_gateway

FIXTURES = ROOT / "tests" / "fixtures" / "tls"


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory):
    mock = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--keys", UPSTREAM_KEY])
    config = f"""
server:
  tls: {{cert: '{FIXTURES / "a.pem"}', key: '{FIXTURES / "a.key"}'}}
access:
  keys:
    - {{name: alice, key: {GATEWAY_KEY}}}
upstreams:
  - name: mock
    base_url: http://{mock.address}
    http2: h2c
    keys: [{UPSTREAM_KEY}]
"""
    process = start_gateway(tmp_path_factory.mktemp("tls"), config)
    yield process, mock
    process.stop()
    mock.stop()


@pytest.fixture()
def h2_client(tls_gateway):
    process, _ = tls_gateway
    port = process.address.rsplit(":", 1)[1]
    context = ssl.create_default_context(cafile=str(FIXTURES / "ca.pem"))
    http_client = openai.DefaultHttpxClient(http2=True, verify=context)
    client = openai.OpenAI(
        base_url=f"https://localhost:{port}/v1", api_key=GATEWAY_KEY, max_retries=0, http_client=http_client
    )
    yield client
    http_client.close()


def test_a_chat_completion_over_h2_and_tls(h2_client, tls_gateway):
    _, mock = tls_gateway
    raw = h2_client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.http_response.http_version == "HTTP/2"
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.total_tokens > 0
    # The upstream got the upstream key, over HTTP/2 as well (h2c), never the gateway's.
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_a_stream_over_h2_and_tls(h2_client):
    stream = h2_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None


def test_a_bad_key_gets_the_sdk_error_over_h2(tls_gateway):
    process, _ = tls_gateway
    port = process.address.rsplit(":", 1)[1]
    context = ssl.create_default_context(cafile=str(FIXTURES / "ca.pem"))
    with openai.DefaultHttpxClient(http2=True, verify=context) as http_client:
        client = openai.OpenAI(
            base_url=f"https://localhost:{port}/v1", api_key="fk-wrong", max_retries=0, http_client=http_client
        )
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
