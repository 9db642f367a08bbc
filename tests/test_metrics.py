"""Prometheus metrics, scraped over HTTP from the real plugin server run by the
Kong stand-in (``serve --metrics-port 0``), with the real authorization server,
a real Redis, and the IdP double only for faults the real one cannot produce
(5xx, slow answers). Also: the hooks cost nothing measurable while off, a cache
hit makes the same PDK calls with metrics on as off, and the Grafana dashboard
only asks for metrics the server exports."""

import json
import re
import threading
import time
import timeit
from pathlib import Path

import promql_parser
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import plugin_command
from idp_double import IdPDouble, Reply, active
from kong import KongStandIn
from redis_servers import ACL_PASSWORD, ACL_USER, free_port, redis_standalone  # noqa: F401

from kong_oauth2_introspection.ops import metrics
from kong_oauth2_introspection.concurrency import Deadline

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "oauth2-introspection.json"
P = "kong_oauth2_introspection_"
STORE_SECRET = "metrics-secret-0123456789abcdef0"
DEADLINE = 2


def metrics_url(standin, timeout=10.0):
    """The URL the server logged when it opened its metrics port."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        found = re.search(r"metrics: (http://127\.0\.0\.1:\d+)/metrics", standin.server_log())
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError("no metrics line in the server log:\n" + standin.server_log())


@pytest.fixture(scope="module")
def observed():
    cmd = plugin_command() + ["serve", "--metrics-port", "0", "--deadline", str(DEADLINE)]
    with KongStandIn(cmd) as standin:
        standin.base = metrics_url(standin)
        yield standin


def scrape(standin):
    """{(name, frozenset(labels)): value} and the raw text, from GET /metrics."""
    reply = requests.get(standin.base + "/metrics", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, reply.text


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name, **labels):
    """Sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def bearer(token):
    return {"Authorization": "Bearer " + token}


def introspection(auth_server, **extra):
    return dict({"introspection_url": auth_server.introspection_url,
                 "authorization_value": auth_server.introspector_authorization}, **extra)


def store_conf(endpoint, **extra):
    return dict({"key_prefix": "m:", "secret": STORE_SECRET,
                 "redis": {"endpoints": [endpoint], "username": ACL_USER,
                           "password": ACL_PASSWORD, "timeout_ms": 200}}, **extra)


def delta(before, after, name, **labels):
    return total(after, name, **labels) - total(before, name, **labels)


# -- decisions, cache, IdP, Redis ------------------------------------------------------

def test_decisions_cache_idp_and_redis_counted(observed, auth_server, redis_standalone):
    inst = observed.configure(introspection(auth_server,
                                            store=store_conf(redis_standalone.address)))
    token = auth_server.issue_token("alice-app")
    before, _ = scrape(observed)
    results = [observed.request(inst, headers=bearer(token)),
               observed.request(inst, headers=bearer(token)),
               observed.request(inst),                                  # no token
               observed.request(inst, headers=bearer("no-such-token-xyz"))]
    assert [r.status for r in results] == [200, 200, 401, 401]
    after, text = scrape(observed)

    assert delta(before, after, P + "decisions_total") == 4   # each request once
    assert delta(before, after, P + "decisions_total", outcome="allowed",
                 reason="active_token") == 2
    assert delta(before, after, P + "decisions_total", outcome="refused",
                 reason="missing_token") == 1
    assert delta(before, after, P + "decisions_total", outcome="refused",
                 reason="invalid_token") == 1
    # oidc-provider answers every introspection with Cache-Control: no-store, so
    # each token request is a miss: the metrics show what the cache could not do
    assert delta(before, after, P + "cache_lookups_total", result="miss") == 3
    assert delta(before, after, P + "cache_lookups_total", result="hit") == 0
    endpoint = metrics.endpoint_label(auth_server.introspection_url)
    assert delta(before, after, P + "idp_request_duration_seconds_count",
                 endpoint=endpoint) == 3
    assert delta(before, after, P + "idp_request_duration_seconds_sum", endpoint=endpoint) > 0
    # the shared cache was looked up in Redis (and its lease taken) before each ask
    assert delta(before, after, P + "redis_command_duration_seconds_count",
                 operation="get") >= 3
    assert delta(before, after, P + "redis_command_duration_seconds_count",
                 operation="try_lease") >= 3
    assert delta(before, after, P + "events_total") == 4
    assert delta(before, after, P + "pdk_calls_total") == sum(
        len(r.pdk_calls) - r.pdk_calls.count("kong.response.exit") for r in results)
    assert value(after, P + "circuit_breaker_state", endpoint=endpoint, state="closed") == 1
    assert value(after, P + "events_in_flight") == 0
    assert value(after, P + "info", version=metrics.VERSION) == 1
    for secret in (token, ACL_PASSWORD, STORE_SECRET,
                   auth_server.introspector_authorization.split(" ", 1)[1]):
        assert secret not in text


def test_anonymous_and_preflight_decisions(observed, auth_server):
    anon = observed.add_consumer(username="anonymous-metrics")
    inst = observed.configure(introspection(auth_server, anonymous=anon["id"],
                                            run_on_preflight=False))
    before, _ = scrape(observed)
    assert observed.request(inst).status == 200
    assert observed.request(inst, headers=bearer("no-such-token-abc")).status == 200
    assert observed.request(inst, "OPTIONS", headers={"Origin": "https://app.test"}).status == 200
    after, _ = scrape(observed)
    assert delta(before, after, P + "decisions_total", outcome="anonymous",
                 reason="missing_token") == 1
    assert delta(before, after, P + "decisions_total", outcome="anonymous",
                 reason="invalid_token") == 1
    assert delta(before, after, P + "decisions_total", outcome="passed", reason="preflight") == 1
    assert delta(before, after, P + "decisions_total") == 3


def cacheable_idp():
    """An IdP whose answers may be cached (the real one always says no-store)."""
    return IdPDouble(lambda f, h: active(client_id="app-%s" % f["token"][-4:],
                                         exp=int(time.time()) + 600))


def test_hits_and_redis_writes_counted(observed, redis_standalone):
    with cacheable_idp() as idp:
        inst = observed.configure({"introspection_url": idp.url,
                                   "authorization_value": "Basic bWV0cmljczpzZWNyZXQ=",
                                   "store": store_conf(redis_standalone.address)})
        before, _ = scrape(observed)
        for _ in range(3):
            assert observed.request(inst, headers=bearer("t-cached-0001")).status == 200
        after, _ = scrape(observed)
        assert len(idp.calls) == 1
    assert delta(before, after, P + "cache_lookups_total", result="miss") == 1
    # Served without the IdP: from this process, or from Redis when the store's
    # subscription (re)started in between and emptied the process's copy.
    assert delta(before, after, P + "cache_lookups_total", result="hit") \
        + delta(before, after, P + "cache_lookups_total", result="shared_hit") == 2
    assert delta(before, after, P + "redis_command_duration_seconds_count", operation="set") == 1
    assert delta(before, after, P + "redis_command_duration_seconds_count", operation="get") >= 1


def test_redis_failures_counted_and_requests_still_served(observed, auth_server):
    dead = "127.0.0.1:%d" % free_port()
    inst = observed.configure(introspection(auth_server, store=store_conf(dead)))
    before, _ = scrape(observed)
    r = observed.request(inst, headers=bearer(auth_server.issue_token("bob-app")))
    assert r.status == 200
    after, text = scrape(observed)
    assert delta(before, after, P + "redis_failures_total", kind="ConnectionError") >= 1
    assert dead not in text   # Redis failures are labelled by command and class only


def test_idp_failures_breaker_state_and_error_decisions(observed):
    with IdPDouble(lambda f, h: Reply(503, {"error": "down"})) as idp:
        inst = observed.configure({"introspection_url": idp.url + "?client_secret=q1",
                                   "authorization_value": "Basic bWV0cmljczpzZWNyZXQ=",
                                   "max_retries": 0})
        before, _ = scrape(observed)
        for i in range(6):
            assert observed.request(inst, headers=bearer("t-%d" % i)).status == 500
        after, text = scrape(observed)
    endpoint = metrics.endpoint_label(idp.url)
    assert delta(before, after, P + "idp_failures_total", endpoint=endpoint,
                 kind="http_5xx") == 5   # the sixth found the breaker open
    assert delta(before, after, P + "decisions_total", outcome="error",
                 reason="idp_unavailable") == 6
    assert value(after, P + "circuit_breaker_state", endpoint=endpoint, state="open") == 1
    assert "client_secret" not in text and "q1" not in text and "bWV0cmljcz" not in text


def test_unusable_answer_counted_as_invalid_answer(observed):
    with IdPDouble(lambda f, h: Reply(200, "<html>not json</html>")) as idp:
        inst = observed.configure({"introspection_url": idp.url,
                                   "authorization_value": "Basic bWV0cmljczpzZWNyZXQ=",
                                   "max_retries": 0})
        before, _ = scrape(observed)
        assert observed.request(inst, headers=bearer("t-garbage")).status == 500
        after, _ = scrape(observed)
    assert delta(before, after, P + "idp_failures_total", endpoint=metrics.endpoint_label(
        idp.url), kind="invalid_answer") == 1


def test_concurrent_misses_coalesce(observed):
    with IdPDouble(lambda f, h: Reply(200, {"active": True, "client_id": "c"},
                                      delay=0.5)) as idp:
        inst = observed.configure({"introspection_url": idp.url,
                                   "authorization_value": "Basic bWV0cmljczpzZWNyZXQ="})
        before, _ = scrape(observed)
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(
            observed.request(inst, headers=bearer("t-herd")).status)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after, _ = scrape(observed)
        assert statuses == [200] * 5 and len(idp.calls) == 1
    assert delta(before, after, P + "cache_lookups_total", result="miss") == 1
    # the others waited for that one ask (a thread started late finds the answer kept)
    coalesced = delta(before, after, P + "cache_lookups_total", result="coalesced")
    assert coalesced >= 1
    assert coalesced + delta(before, after, P + "cache_lookups_total", result="hit") == 4


def test_stale_answer_counted(observed):
    answers = [active(client_id="c", exp=int(time.time()) + 600)]
    with IdPDouble(lambda f, h: answers[-1]) as idp:
        inst = observed.configure({"introspection_url": idp.url,
                                   "authorization_value": "Basic bWV0cmljczpzZWNyZXQ=",
                                   "ttl": 1, "stale_if_error": 60, "max_retries": 0})
        assert observed.request(inst, headers=bearer("t-stale")).status == 200
        time.sleep(1.1)
        answers.append(Reply(503, {"error": "down"}))
        before, _ = scrape(observed)
        assert observed.request(inst, headers=bearer("t-stale")).status == 200
        after, _ = scrape(observed)
    assert delta(before, after, P + "cache_lookups_total", result="stale") == 1


def test_deadline_expiry_counted(observed):
    with IdPDouble(lambda f, h: Reply(200, {"active": True}, delay=DEADLINE + 2)) as idp:
        inst = observed.configure({"introspection_url": idp.url,
                                   "authorization_value": "Basic bWV0cmljczpzZWNyZXQ=",
                                   "timeout": 10000, "max_retries": 0})
        before, _ = scrape(observed)
        started = time.monotonic()
        assert observed.request(inst, headers=bearer("t-slow")).status == 500
        assert time.monotonic() - started < DEADLINE + 1
        after, _ = scrape(observed)
    assert delta(before, after, P + "deadline_expired_total") == 1


# -- the cost of the hooks -------------------------------------------------------------

def test_hit_makes_the_same_pdk_calls_with_metrics_on_and_off(observed, kong):
    calls = []
    with cacheable_idp() as idp:
        for standin in (kong, observed):
            inst = standin.configure({"introspection_url": idp.url,
                                      "authorization_value": "Basic bWV0cmljczpzZWNyZXQ="})
            assert standin.request(inst, headers=bearer("t-same-calls")).status == 200
            hit = standin.request(inst, headers=bearer("t-same-calls"))
            assert hit.status == 200
            calls.append(hit.pdk_calls)
        assert len(idp.calls) == 2   # one miss per server, then hits
    assert calls[0] == calls[1] == ["kong.request.get_headers",
                                    "kong.service.request.set_headers",
                                    "kong.client.authenticate"]


def test_hooks_cost_nothing_measurable_while_off():
    """The hooks a cache hit runs (event, PDK calls, cache hit, decision, event end),
    timed against an empty function: well under a microsecond each, where the
    hit itself costs ~900 us through Kong (design page)."""
    assert not metrics.ENABLED

    def empty(*_):
        pass

    deadline = Deadline(30)

    def hit_hooks():
        metrics.event()
        metrics.pdk_call()
        metrics.pdk_call()
        metrics.pdk_call()
        metrics.cache("hit")
        metrics.decision(metrics.ALLOWED, "active_token")
        metrics.event_done(deadline)

    def baseline():
        empty()
        empty()
        empty()
        empty()
        empty("hit")
        empty(metrics.ALLOWED, "active_token")
        empty(deadline)

    n = 20000
    hooks = min(timeit.repeat(hit_hooks, number=n, repeat=5)) / n
    base = min(timeit.repeat(baseline, number=n, repeat=5)) / n
    print("hit-path hooks while off: %.0f ns per request (7 empty calls: %.0f ns)"
          % (hooks * 1e9, base * 1e9))
    assert hooks < 5e-6              # < 0.6 % of a 900 us hit, even on a loaded CI core
    assert hooks < base * 3 + 1e-6   # a call and a test of a global, nothing more


def test_metrics_port_refuses_other_addresses(tmp_path):
    import subprocess
    out = subprocess.run(plugin_command() + ["serve", "--metrics-port", "0",
                                             "--metrics-address", "0.0.0.0",
                                             "-kong-prefix", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "not a loopback address" in out.stderr and "Traceback" not in out.stderr
    assert metrics.loopback("127.0.0.1") and metrics.loopback("::1")
    assert not metrics.loopback("10.0.0.1") and not metrics.loopback("example.com")


def test_endpoint_label_has_no_credentials_or_query():
    assert metrics.endpoint_label("https://u:pw@idp.test:8443/introspect?k=v#f") == \
        "https://idp.test:8443/introspect"
    assert metrics.endpoint_label("http://idp.test/i") == "http://idp.test:80/i"


def test_other_paths_are_not_found(observed):
    assert requests.get(observed.base + "/", timeout=5).status_code == 404


# -- the Grafana dashboard ---------------------------------------------------------------

# What Grafana substitutes before sending a query to Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$instance": ".*"}


def promql_metric_names(expr):
    """The metric names an expression selects, from its syntax tree as parsed by
    promql-parser (the Rust PromQL parser's Python binding); ValueError when the
    expression is not valid PromQL."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            by_matcher = [m.value for m in node.matchers.matchers if m.name == "__name__"]
            names.update([node.name] if node.name else by_matcher)
    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_exprs():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = []
    for panel in panels:
        for inner in [panel] + panel.get("panels", []):
            exprs += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return exprs


def test_promql_names_found():
    assert promql_metric_names(
        'sum by (reason) (rate(a_total{outcome="refused"}[5m])) / ignoring(x) b > 0') == \
        {"a_total", "b"}
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(c_bucket{instance=~"$instance"}'
        '[$__rate_interval])))') == {"c_bucket"}
    with pytest.raises(ValueError):
        promql_metric_names("sum(rate(a_total[5m])")


SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
          "summary": ("", "_count", "_sum"), "gauge": ("",), "unknown": ("",)}


def exported_names(text):
    """Every series name the exposition declares (# TYPE), samples or not yet."""
    return {family.name + suffix for family in text_string_to_metric_families(text)
            for suffix in SERIES.get(family.type, ("",))}


def test_dashboard_asks_only_for_exported_metrics(observed):
    _, text = scrape(observed)
    exported = exported_names(text)
    assert P + "idp_failures_total" in exported and P + "cache_lookups_total" in exported
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        missing = names - exported
        assert not missing, "%s: not exported: %s" % (expr, sorted(missing))
        used |= names
    # every family of ours is on the dashboard
    ours = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in exported
            if n.startswith(P)}
    shown = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in used}
    assert ours - shown <= {P + "info"}, sorted(ours - shown)


def test_one_version_everywhere(observed):
    """--version, dump (Kong's query command), the metrics' info and pyproject agree."""
    import subprocess
    printed = subprocess.run(plugin_command() + ["--version"], capture_output=True, text=True,
                             timeout=30).stdout.split()
    dumped = {p["Version"] for p in json.loads(subprocess.run(
        plugin_command() + ["dump"], capture_output=True, text=True, timeout=60).stdout)}
    declared = re.search(r'(?m)^version = "([^"]+)"',
                         (ROOT / "pyproject.toml").read_text()).group(1)
    samples, _ = scrape(observed)
    assert printed == ["kong-oauth2-introspection", declared]
    assert dumped == {declared} and value(samples, P + "info", version=declared) == 1
    assert "## [%s]" % declared in (ROOT / "CHANGELOG.md").read_text()
