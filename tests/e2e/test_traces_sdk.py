"""Request traces (`traces.otlp_endpoint`): an SDK request carrying a W3C `traceparent`
shows up at the collector inside the caller's trace, and the upstream sees sluice's span
as its parent. Each export is checked against the official OTLP protobuf schema
(`opentelemetry-proto`), with trace and span ids decoded from hex as OTLP/JSON says."""

import base64
import http.server
import json
import threading
import time

import openai
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from conftest import GATEWAY_KEY, UPSTREAM_KEY, start_gateway

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver that keeps what it is sent."""

    def __init__(self):
        self.exports = []
        self.paths = []
        super().__init__(("127.0.0.1", 0), CollectorHandler)


class CollectorHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.paths.append((self.path, self.headers.get("Content-Type"), self.headers.get("X-Collector-Token")))
        self.server.exports.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def traced(mock, tmp_path_factory):
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    config = f"""
access:
  keys:
    - {{name: alice, key: {GATEWAY_KEY}}}
upstreams:
  - name: mock
    base_url: http://{mock.address}
    keys: [{UPSTREAM_KEY}]
traces:
  otlp_endpoint: http://127.0.0.1:{collector.server_address[1]}
  service_name: sluice-e2e
  headers: {{X-Collector-Token: secret-collector-token}}
"""
    process = start_gateway(tmp_path_factory.mktemp("traces"), config)
    yield process, collector
    process.stop()
    collector.shutdown()


def hex_ids_to_base64(value):
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    if isinstance(value, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode() if k in ("traceId", "spanId", "parentSpanId") else hex_ids_to_base64(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [hex_ids_to_base64(v) for v in value]
    return value


def attributes(span):
    return {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}


def test_a_request_joins_the_callers_trace_and_the_upstream_nests_under_sluice(traced, mock):
    process, collector = traced
    client = openai.OpenAI(base_url=f"http://{process.address}/v1", api_key=GATEWAY_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "trace me"}],
        stream=True,
        extra_headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    deadline = time.time() + 10
    spans = []
    while time.time() < deadline and len(spans) < 2:
        spans = [
            span
            for export in collector.exports
            for resource in export["resourceSpans"]
            for scope in resource["scopeSpans"]
            for span in scope["spans"]
            if span["traceId"] == CALLER_TRACE
        ]
        time.sleep(0.1)
    assert len(spans) == 2, collector.exports

    for export in collector.exports:
        parsed = json_format.Parse(json.dumps(hex_ids_to_base64(export)), ExportTraceServiceRequest())
        for resource in parsed.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            assert service["service.name"] == "sluice-e2e"
            for span in resource.scope_spans[0].spans:
                assert len(span.trace_id) == 16 and len(span.span_id) == 8
                assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    assert collector.paths[0] == ("/v1/traces", "application/json", "secret-collector-token")

    server = next(s for s in spans if s["kind"] == 2)
    upstream = next(s for s in spans if s["kind"] == 3)
    assert server["parentSpanId"] == CALLER_SPAN
    assert server["name"] == "POST /v1/chat/completions"
    seen = attributes(server)
    assert seen["gen_ai.request.model"] == "gpt-4o"
    assert seen["sluice.key"] == "alice"
    assert seen["sluice.upstream"] == "mock"
    assert seen["http.response.status_code"] == "200"
    assert int(seen["gen_ai.usage.output_tokens"]) > 0
    assert upstream["parentSpanId"] == server["spanId"]
    assert attributes(upstream)["sluice.upstream"] == "mock"

    # The upstream saw the same trace, with sluice's span as its parent.
    sent = mock.last()["headers"]["traceparent"]
    assert sent == f"00-{CALLER_TRACE}-{server['spanId']}-01"
    for secret in (GATEWAY_KEY, UPSTREAM_KEY):
        assert secret not in json.dumps(collector.exports)
