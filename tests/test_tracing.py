"""OpenTelemetry spans around the IdP and Redis calls.

In process: the hooks the request path calls, with opentelemetry-sdk's
InMemorySpanExporter. End to end: the real plugin server run by the Kong
stand-in with ``serve --otlp-endpoint``, exporting over OTLP/HTTP to a small
collector in this test, for a request carrying a W3C ``traceparent``; the IdP is
the real authorization server and the cache a real Redis."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from conftest import plugin_command
from kong import KongStandIn
from redis_servers import ACL_PASSWORD, ACL_USER, redis_standalone  # noqa: F401

from kong_oauth2_introspection.ops import metrics
from kong_oauth2_introspection.ops import tracing
from kong_oauth2_introspection.idp.httpclient import HTTPFailure

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = "00-%s-%s-01" % (TRACE_ID, PARENT_ID)
STORE_SECRET = "tracing-secret-0123456789abcdef0"


class Reply:
    def __init__(self, status):
        self.status = status


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.enable(exporter=exporter, simple=True)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def test_off_by_default_and_free():
    assert not tracing.ENABLED

    def fn():
        return 1
    assert tracing.bind({"traceparent": [TRACEPARENT]}, fn) is fn
    with tracing.span("x") as span:
        assert span is None


def test_lookup_span_continues_the_requests_trace(spans):
    headers = {"traceparent": [TRACEPARENT], "authorization": ["Bearer tok-secret-123456"]}
    url = "https://user:pw@idp.test:8443/introspect?client_secret=q"

    def lookup():
        reply = metrics.idp_request(lambda m, u, **kw: Reply(200), "POST", url, data={})
        assert reply.status == 200
        return metrics.redis_call(lambda client: client, "client")

    # the lookup runs on a worker thread, as under the server
    result = []
    worker = threading.Thread(target=lambda: result.append(tracing.bind(headers, lookup)()))
    worker.start()
    worker.join()
    assert result == ["client"]
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert set(by_name) >= {"oauth2-introspection lookup", "oauth2-introspection introspect"}
    lookup_span = by_name["oauth2-introspection lookup"]
    assert format(lookup_span.context.trace_id, "032x") == TRACE_ID
    assert format(lookup_span.parent.span_id, "016x") == PARENT_ID
    idp = by_name["oauth2-introspection introspect"]
    assert idp.parent.span_id == lookup_span.context.span_id
    assert idp.context.trace_id == lookup_span.context.trace_id
    assert idp.attributes["url.full"] == "https://idp.test:8443/introspect"
    assert idp.attributes["http.response.status_code"] == 200
    assert idp.attributes["server.port"] == 8443
    redis = [s for s in spans.get_finished_spans() if s.name.startswith("redis ")]
    assert len(redis) == 1 and redis[0].parent.span_id == lookup_span.context.span_id
    everything = repr([(s.name, dict(s.attributes), s.status.description)
                       for s in spans.get_finished_spans()])
    for secret in ("pw", "client_secret", "tok-secret"):
        assert secret not in everything


def test_failures_marked_without_their_text(spans):
    def failing(method, url, **kwargs):
        raise HTTPFailure("could not connect (ConnectionError) to 10.1.2.3 user=admin")

    with pytest.raises(HTTPFailure):
        tracing.bind({}, lambda: metrics.idp_request(failing, "POST", "http://idp.test/i"))()
    idp = [s for s in spans.get_finished_spans()
           if s.name == "oauth2-introspection introspect"][0]
    assert idp.status.status_code == StatusCode.ERROR
    assert idp.attributes["error.type"] == "connect"
    assert "10.1.2.3" not in repr([(s.attributes, s.status.description, s.events)
                                   for s in spans.get_finished_spans()])
    # no traceparent: a trace of its own
    lookup = [s for s in spans.get_finished_spans() if s.name == "oauth2-introspection lookup"][0]
    assert lookup.parent is None and lookup.status.status_code == StatusCode.ERROR


def test_nothing_traced_outside_a_lookup(spans):
    # health probes and the client-credentials plugin's Redis calls: no root spans
    metrics.idp_request(lambda m, u, **kw: Reply(200), "POST", "http://idp.test/i")
    metrics.redis_call(lambda client: client, "client")
    assert spans.get_finished_spans() == ()


def test_endpoint_from_flag_or_standard_environment(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.configured_endpoint(None) is None
    assert tracing.configured_endpoint("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")
    assert tracing.configured_endpoint(None) == "http://c:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/x")
    assert tracing.configured_endpoint(None) == "http://t:4318/x"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configured_endpoint(None) is None


# -- end to end ------------------------------------------------------------------------

class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (protobuf bodies on /v1/traces)."""

    def __init__(self):
        self.spans = []
        self.paths = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with collector._lock:
                    collector.paths.append(self.path)
                    for rs in request.resource_spans:
                        service = {a.key: a.value.string_value
                                   for a in rs.resource.attributes}.get("service.name")
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                collector.spans.append((service, span))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d/v1/traces" % self.httpd.server_address[1]

    def wait_for(self, predicate, timeout=10.0):
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            with self._lock:
                found = [s for s in self.spans if predicate(s[1])]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError("no such span; got %r" % [s.name for _, s in self.spans])

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def traced(collector):
    cmd = plugin_command() + ["serve", "--otlp-endpoint", collector.url]
    with KongStandIn(cmd, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as standin:
        yield standin


def test_spans_exported_over_otlp_under_the_callers_trace(traced, collector, auth_server,
                                                          redis_standalone):
    inst = traced.configure({
        "introspection_url": auth_server.introspection_url,
        "authorization_value": auth_server.introspector_authorization,
        "store": {"key_prefix": "tr:", "secret": STORE_SECRET,
                  "redis": {"endpoints": [redis_standalone.address], "username": ACL_USER,
                            "password": ACL_PASSWORD}}})
    token = auth_server.issue_token("alice-app")
    r = traced.request(inst, headers={"Authorization": "Bearer " + token,
                                      "traceparent": TRACEPARENT})
    assert r.status == 200
    ours = bytes.fromhex(TRACE_ID)
    lookups = collector.wait_for(lambda s: s.trace_id == ours
                                 and s.name == "oauth2-introspection lookup")
    service, lookup = lookups[0]
    assert service == "kong-oauth2-introspection"
    assert lookup.parent_span_id == bytes.fromhex(PARENT_ID)
    idp = collector.wait_for(lambda s: s.trace_id == ours
                             and s.name == "oauth2-introspection introspect")[0][1]
    assert idp.parent_span_id == lookup.span_id
    attrs = {a.key: a for a in idp.attributes}
    assert attrs["url.full"].value.string_value == metrics.endpoint_label(
        auth_server.introspection_url)
    assert attrs["http.response.status_code"].value.int_value == 200
    redis_ops = {s.name for _, s in collector.wait_for(
        lambda s: s.trace_id == ours and s.name.startswith("redis "))}
    assert {"redis get", "redis try_lease"} <= redis_ops
    assert set(collector.paths) == {"/v1/traces"}
    with collector._lock:
        exported = repr([(s.name, list(s.attributes)) for _, s in collector.spans])
    assert token not in exported and ACL_PASSWORD not in exported
    assert auth_server.introspector_authorization.split(" ")[1] not in exported
