"""OpenTelemetry spans around the IdP and Redis calls (optional, off by default).

``serve --otlp-endpoint URL`` (or Kong's start_cmd run with
``env OTEL_EXPORTER_OTLP_ENDPOINT=...`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
exports spans over OTLP/HTTP; it needs the ``tracing`` extra
(``pip install 'kong-oauth2-introspection[tracing]'``).

A cache miss gets one span, ``oauth2-introspection lookup``, whose parent is
the request's W3C ``traceparent`` (and ``tracestate``) header, taken from the
headers the handler already read: no PDK call. The IdP attempts and the Redis
commands of that lookup are its children; outside a lookup nothing is traced.
A cache hit makes no span: it does no I/O worth tracing, and spans on the hot
path would cost what a hit costs.

Attributes never hold a token or a secret: the endpoint is
``scheme://host:port/path``, Redis spans name the command, never the key.
While off, ``bind`` returns the function it is given and ``span`` is a shared
null context.
"""

import contextlib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

from .. import VERSION

T = TypeVar("T")
ENABLED = False
SERVICE = "kong-oauth2-introspection"

_tracer: Any = None
_provider: Any = None
_propagator: Any = None
_NULL = contextlib.nullcontext(None)


class _HeaderGetter:
    """Reads Kong's multi-map of headers (lower-case names, list values)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> Optional[List[str]]:
        value = carrier.get(key.lower())
        if value is None:
            return None
        return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]

    def keys(self, carrier: Mapping[str, Any]) -> List[str]:
        return list(carrier)


_GETTER = _HeaderGetter()


def configured_endpoint(flag: Optional[str]) -> Optional[str]:
    """The OTLP endpoint the flag or the standard environment asks for, if any."""
    if flag:
        return flag
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:  # the OTLP spec: the base endpoint plus the signal's path
        return base.rstrip("/") + "/v1/traces"
    return None


def enable(endpoint: Optional[str] = None, exporter: Any = None, *,
           simple: bool = False) -> None:
    """Start tracing to ``exporter`` (default: OTLP/HTTP to ``endpoint``).

    ``simple`` exports each span as it ends (tests); by default spans go out in
    batches from a background thread, so a request never waits for the collector.
    Raises ImportError when the OpenTelemetry SDK is not installed.
    """
    global ENABLED, _tracer, _provider, _propagator
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=endpoint)
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE),
                                "service.version": VERSION})
    provider = TracerProvider(resource=resource)   # sampler: OTEL_TRACES_SAMPLER, else
    processor = SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)         # parent-based always-on
    # Our own provider, not the global one: nothing else in the process is traced.
    _provider, _tracer = provider, provider.get_tracer("kong_oauth2_introspection", VERSION)
    _propagator = TraceContextTextMapPropagator()
    ENABLED = True


def shutdown() -> None:
    """Flush and stop (the server is exiting)."""
    global ENABLED, _provider, _tracer
    ENABLED = False
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def bind(headers: Mapping[str, Any], fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, run under a lookup span whose parent is the request's traceparent.

    Called in the request's greenlet; the returned function runs on a worker
    thread, where the context is attached for the duration of the call."""
    if not ENABLED:
        return fn
    parent = _propagator.extract(headers, getter=_GETTER)

    def traced(*args: Any, **kwargs: Any) -> T:
        tracer = _tracer
        if tracer is None:
            return fn(*args, **kwargs)
        # No exception text in a span: a Redis error may name hosts or users.
        with tracer.start_as_current_span("oauth2-introspection lookup", context=parent,
                                          record_exception=False,
                                          set_status_on_exception=False) as lookup:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                set_error(lookup, type(err).__name__)
                raise
    return traced


def span(name: str, attributes: Optional[Dict[str, Any]] = None) -> Any:
    """A child span of the current lookup, or a null context while off or outside
    one (health probes, the client-credentials plugin's Redis calls): a root span
    per Redis command would only be noise."""
    tracer = _tracer
    if not ENABLED or tracer is None:
        return _NULL
    from opentelemetry import trace
    if not trace.get_current_span().get_span_context().is_valid:
        return _NULL
    return tracer.start_as_current_span(name, attributes=attributes or {},
                                        record_exception=False,
                                        set_status_on_exception=False)


def http_attributes(method: str, endpoint: str) -> Dict[str, Any]:
    from urllib.parse import urlsplit
    parts = urlsplit(endpoint)
    return {"http.request.method": method, "url.full": endpoint,
            "server.address": parts.hostname or "", "server.port": parts.port or 0}


def set_attribute(span_: Any, key: str, value: Any) -> None:
    if span_ is not None:
        span_.set_attribute(key, value)


def set_error(span_: Any, kind: str) -> None:
    """Mark a span failed with a kind from a fixed list (never an error's text)."""
    if span_ is None:
        return
    from opentelemetry.trace import Status, StatusCode
    span_.set_attribute("error.type", kind)
    span_.set_status(Status(StatusCode.ERROR))

