"""Prometheus metrics of the plugin server, and the hooks the request path calls.

Off by default. ``serve --metrics-port N`` turns them on and serves them, with
``/health`` (health.py), on 127.0.0.1:N. The hooks below are what the handler,
the cache, the IdP client, the Redis store and the listener call; while metrics
and tracing are both off each one is a function call and one test of a global
(tens of nanoseconds: tests/test_metrics.py measures it), and none of them ever
makes a PDK call, so a cache hit costs what it cost before.

With one process (``serve --processes 1``) the default collectors are right.
With several, ``serve`` sets PROMETHEUS_MULTIPROC_DIR (under the node directory)
before this module is imported: every process counts into its own files and the
first process's /metrics serves prometheus_client's sums over all of them
(counters and histograms summed, dead processes' counts kept; events in flight
summed over the live ones; instances labelled per pid). What only one process
can read (its CPU, memory, GC, circuit breakers, replay store) is left out
there: prometheus_client's multiprocess mode cannot aggregate it.

Labels never carry a token, a secret or an unbounded value: endpoints are
``scheme://host:port/path`` (no user info, no query), reasons and kinds come from
fixed lists, and Redis failures are named by their exception class.
"""

import ipaddress
import json
import os
import time
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .. import VERSION
from . import loopback_http, tracing
from ..concurrency import DeadlineExceeded
from ..idp.httpclient import HTTPFailure
from .log import endpoint_label

T = TypeVar("T")
PREFIX = "kong_oauth2_introspection_"

ENABLED = False   # set by enable(); the hooks test it first

# Decisions: outcome x reason, both from these fixed lists.
ALLOWED, REFUSED, ANONYMOUS, ERROR, PASSED = "allowed", "refused", "anonymous", "error", "passed"
OUTCOMES = (ALLOWED, REFUSED, ANONYMOUS, ERROR, PASSED)
REASONS = ("active_token", "missing_token", "invalid_token", "malformed_request",
           "insufficient_scope", "idp_unavailable", "consumer_lookup", "anonymous_not_found",
           "unusable_config", "deadline", "internal", "preflight", "other_credential",
           "resource_metadata")
# Cache lookups: where the answer came from.
CACHE_RESULTS = ("hit", "shared_hit", "coalesced", "miss", "stale")
IDP_FAILURES = ("connect", "tls", "timeout", "too_large", "deadline", "http_5xx",
                "http_status", "invalid_answer")

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
REGISTRY = CollectorRegistry(auto_describe=True)
_IDP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

INFO = Gauge(PREFIX + "info", "The plugin server's version (always 1)", ["version"],
             registry=REGISTRY, multiprocess_mode="max")
DECISIONS = Counter(PREFIX + "decisions", "Requests decided, by outcome and reason",
                    ["outcome", "reason"], registry=REGISTRY)
CACHE = Counter(PREFIX + "cache_lookups", "Token lookups by where the answer came from: "
                "hit (this process), shared_hit (Redis), coalesced (waited for another "
                "caller's introspection), miss (asked the IdP), stale (stale_if_error)",
                ["result"], registry=REGISTRY)
IDP_SECONDS = Histogram(PREFIX + "idp_request_duration_seconds",
                        "Introspection HTTP attempts (retries each count), failed ones too",
                        ["endpoint"], buckets=_IDP_BUCKETS, registry=REGISTRY)
IDP_FAILURES_TOTAL = Counter(PREFIX + "idp_failures", "Failed introspection attempts by kind",
                             ["endpoint", "kind"], registry=REGISTRY)
REDIS_SECONDS = Histogram(PREFIX + "redis_command_duration_seconds",
                          "Redis commands of the shared cache", ["operation"],
                          buckets=_REDIS_BUCKETS, registry=REGISTRY)
REDIS_FAILURES = Counter(PREFIX + "redis_failures", "Failed Redis commands by exception class",
                         ["operation", "kind"], registry=REGISTRY)
DEADLINES = Counter(PREFIX + "deadline_expired", "Events answered at or past their request "
                    "deadline (the IdP, Redis or the Admin API took the whole budget)",
                    registry=REGISTRY)
EVENTS = Counter(PREFIX + "events", "Kong events (one per request and phase) handled",
                 registry=REGISTRY)
PDK_CALLS = Counter(PREFIX + "pdk_calls", "PDK round trips to Kong (divide by events for "
                    "round trips per request)", registry=REGISTRY)
IN_FLIGHT = Gauge(PREFIX + "events_in_flight", "Kong events being handled now",
                  registry=REGISTRY, multiprocess_mode="livesum")
INSTANCES = Gauge(PREFIX + "plugin_instances", "Plugin instances Kong started (with several "
                  "processes: those each process has built, by pid)",
                  registry=REGISTRY, multiprocess_mode="liveall")
REPLAY_FULL = Counter(PREFIX + "replay_store_full", "Proofs refused because the in-process "
                      "replay store was full (it never evicts an unexpired proof)",
                      registry=REGISTRY)
REPLAY_SIZE = Gauge(PREFIX + "replay_store_entries", "Unexpired proofs the in-process replay "
                    "store remembers", registry=REGISTRY)


class _BreakerCollector:
    """Circuit breaker state per endpoint, read at scrape time (no hook needed)."""

    def collect(self):
        from ..idp.breaker import process_breakers
        family = GaugeMetricFamily(PREFIX + "circuit_breaker_state",
                                   "1 for the state each endpoint's circuit breaker is in",
                                   labels=["endpoint", "state"])
        breakers = process_breakers()
        for endpoint, state in sorted((breakers.states() if breakers else {}).items()):
            for name in ("closed", "open", "half_open"):
                family.add_metric([endpoint, name], 1.0 if state == name else 0.0)
        yield family

    def describe(self):
        return []


REGISTRY.register(_BreakerCollector())
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
INFO.labels(VERSION).set(1)
if MULTIPROCESS:
    from prometheus_client import multiprocess
    SERVED = CollectorRegistry()
    multiprocess.MultiProcessCollector(SERVED)
else:
    SERVED = REGISTRY


# -- hooks (cheap no-ops while off) ------------------------------------------------

def decision(outcome: str, reason: str) -> None:
    if ENABLED:
        DECISIONS.labels(outcome, reason).inc()


def refusal_reason(refusal: Any) -> str:
    """The reason label of one of kong/responses.py's refusals."""
    status = getattr(refusal, "status", 500)
    error = getattr(refusal, "body", {}).get("error")
    if status == 400:
        return "malformed_request"
    if status == 403:
        return "insufficient_scope"
    if status == 401:
        return "invalid_token" if error == "invalid_token" else "missing_token"
    return "internal"


def replay_store_full() -> None:
    if ENABLED:
        REPLAY_FULL.inc()


def replay_store_size(read: Callable[[], int]) -> None:
    """The replay store's size, read at scrape time (the store exists before ``enable``)."""
    REPLAY_SIZE.set_function(read)


def cache(result: str) -> None:
    if ENABLED:
        CACHE.labels(result).inc()


def event_done(deadline: Any) -> None:
    """An event was answered; counted as expired when that was at or past its deadline."""
    if ENABLED:
        if MULTIPROCESS:    # no read-at-scrape gauge across processes: count it
            IN_FLIGHT.dec()
        if deadline.expired:
            DEADLINES.inc()


def event() -> None:
    if ENABLED:
        EVENTS.inc()
        if MULTIPROCESS:
            IN_FLIGHT.inc()


def instances(count: int) -> None:
    """The instances this process holds now (read at scrape time with one process)."""
    if ENABLED and MULTIPROCESS:
        INSTANCES.set(count)


def pdk_call() -> None:
    if ENABLED:
        PDK_CALLS.inc()


def _failure_kind(err: BaseException) -> str:
    if isinstance(err, DeadlineExceeded):
        return "deadline"
    text = str(err)
    if text.startswith("answer larger"):
        return "too_large"
    if "timed out" in text or "Timeout" in text:
        return "timeout"
    if "SSL" in text:
        return "tls"
    return "connect"


def idp_request(call: Callable[..., T], method: str, url: str, **kwargs: Any) -> T:
    """``call(method, url, **kwargs)``: one HTTP attempt to the IdP, timed and traced."""
    if not (ENABLED or tracing.ENABLED):
        return call(method, url, **kwargs)
    endpoint = endpoint_label(url)
    with tracing.span("oauth2-introspection introspect", tracing.http_attributes(
            method, endpoint)) as span:
        start = time.perf_counter()
        try:
            reply = call(method, url, **kwargs)
        except (HTTPFailure, DeadlineExceeded) as err:
            _idp_failed(endpoint, _failure_kind(err), span)
            raise
        finally:
            if ENABLED:
                IDP_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
        status = getattr(reply, "status", 0)
        tracing.set_attribute(span, "http.response.status_code", status)
        if status >= 500:
            _idp_failed(endpoint, "http_5xx", span)
        return reply


def idp_answer(url: str, parse: Callable[[Any], T], reply: Any) -> T:
    """``parse(reply)``, counting an answer the IdP gave but we cannot use."""
    try:
        return parse(reply)
    except Exception:
        if ENABLED:
            kind = "http_status" if getattr(reply, "status", 200) != 200 else "invalid_answer"
            IDP_FAILURES_TOTAL.labels(endpoint_label(url), kind).inc()
        raise


def _idp_failed(endpoint: str, kind: str, span: Any) -> None:
    if ENABLED:
        IDP_FAILURES_TOTAL.labels(endpoint, kind).inc()
    tracing.set_error(span, kind)


@lru_cache(maxsize=128)
def _operation(qualname: str) -> str:
    # The store passes lambdas made inside its methods: "RedisStore.get.<locals>.<lambda>".
    parts = qualname.split(".")
    if len(parts) >= 3 and parts[-2] == "<locals>":
        return parts[-3]
    return "other"


def redis_call(op: Callable[[Any], T], client: Any) -> T:
    """``op(client)``: one Redis command of the store, timed and traced."""
    if not (ENABLED or tracing.ENABLED):
        return op(client)
    name = _operation(getattr(op, "__qualname__", ""))
    with tracing.span("redis " + name, {"db.system.name": "redis",
                                        "db.operation.name": name}) as span:
        start = time.perf_counter()
        try:
            return op(client)
        except Exception as err:
            if ENABLED:
                REDIS_FAILURES.labels(name, type(err).__name__).inc()
            tracing.set_error(span, type(err).__name__)
            raise
        finally:
            if ENABLED:
                REDIS_SECONDS.labels(name).observe(time.perf_counter() - start)


# -- turning on, and the loopback endpoint ------------------------------------------

def loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def enable(server: Any = None) -> None:
    """Count from now on; gauges that read ``server`` (a listener.PluginServer)."""
    global ENABLED
    if server is not None and not MULTIPROCESS:
        IN_FLIGHT.set_function(lambda: len(server.events))
        INSTANCES.set_function(lambda: len(server.instances))
    ENABLED = True


def disable() -> None:
    global ENABLED
    ENABLED = False


def exposition() -> bytes:
    return generate_latest(SERVED)


def _route(plugin_server: Any) -> Callable[[str], Tuple[int, str, bytes]]:
    def answer(path: str) -> Tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, exposition()
        if path == "/health":
            from . import health
            report = health.report(plugin_server)
            return (200 if report["healthy"] else 503, "application/json",
                    json.dumps(report, indent=1, sort_keys=True).encode())
        return 404, "text/plain; charset=utf-8", b"not found: /metrics or /health\n"
    return answer


def serve_http(address: str, port: int, server: Any = None) -> Tuple[Any, int]:
    """Serve /metrics and /health on ``address:port`` (loopback only) from a daemon
    thread, with fixed bounds on connections and threads (loopback_http.py); returns
    the HTTP server and the port it got (``port`` 0: any free one)."""
    if not loopback(address):
        raise ValueError("metrics address %r is not a loopback address" % address)
    httpd = loopback_http.start(address, port, _route(server), "kong-oauth2-introspection",
                                thread_name="oauth2-introspection-metrics")
    return httpd, httpd.port


def snapshot() -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """Every sample as {(name, labels): value}: for tests and the health report."""
    out: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(name: str, **labels: str) -> Optional[float]:
    return snapshot().get((name, tuple(sorted(labels.items()))))
