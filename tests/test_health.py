"""Health: ``/health`` on the metrics port of the real plugin server (run by the
Kong stand-in), and the ``health`` subcommand through its real entry point, with
the real authorization server and a real Redis (and a dead port for each)."""

import contextlib
import json
import re
import subprocess
import time

import pytest
import requests

from conftest import plugin_command
from kong import KongStandIn
from redis_servers import ACL_PASSWORD, ACL_USER, free_port, redis_standalone  # noqa: F401

from kong_oauth2_introspection import VERSION
from kong_oauth2_introspection.ops import health
from kong_oauth2_introspection.ops import metrics

STORE_SECRET = "health-secret-0123456789abcdef01"
WRONG_AUTH = "Basic a29uZzp3cm9uZy1oZWFsdGgtcHc="   # kong:wrong-health-pw


def run_health(*args):
    return subprocess.run(plugin_command() + ["health"] + list(args), capture_output=True,
                          text=True, timeout=60)


@contextlib.contextmanager
def _server_with_health(*plugin):
    with KongStandIn(plugin_command() + ["serve", *plugin, "--metrics-port", "0"]) as standin:
        until = time.monotonic() + 10
        while time.monotonic() < until:
            found = re.search(r"metrics: (http://127\.0\.0\.1:\d+)/metrics", standin.server_log())
            if found:
                standin.health_url = found.group(1) + "/health"
                break
            time.sleep(0.05)
        else:
            raise AssertionError(standin.server_log())
        yield standin


@pytest.fixture(scope="module")
def server():
    with _server_with_health() as standin:
        yield standin


@pytest.fixture(scope="module")
def cc_server():
    # one plugin per plugin server: the client-credentials plugin has its own
    with _server_with_health("--plugin", "oauth2-client-credentials") as standin:
        yield standin


def store(endpoint):
    return {"key_prefix": "h:", "secret": STORE_SECRET,
            "redis": {"endpoints": [endpoint], "username": ACL_USER, "password": ACL_PASSWORD,
                      "timeout_ms": 300}}


def fresh(_standin):
    """Reports are kept MIN_INTERVAL seconds: wait until the next one is new."""
    time.sleep(health.MIN_INTERVAL + 0.1)


def test_healthy_with_no_config_loaded(server):
    r = requests.get(server.health_url, timeout=10)
    assert r.status_code == 200
    assert r.json()["healthy"] is True and r.json()["configs"] == []
    assert r.json()["version"] == VERSION
    out = run_health("--url", server.health_url)
    assert out.returncode == 0 and "healthy (0 config(s))" in out.stdout


def test_idp_and_redis_of_a_loaded_config_answer(server, auth_server, redis_standalone):
    inst = server.configure({"introspection_url": auth_server.introspection_url,
                             "authorization_value": auth_server.introspector_authorization,
                             "store": store(redis_standalone.address)})
    token = auth_server.issue_token("alice-app")
    # Kong starts an instance on the first request that needs it
    assert server.request(inst, headers={"Authorization": "Bearer " + token}).status == 200
    fresh(server)
    out = run_health("--url", server.health_url, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    [conf] = report["configs"]
    assert conf["plugin"] == "oauth2-introspection" and conf["plugin_ids"] == [inst.plugin_id]
    assert conf["healthy"] is True
    assert conf["idp"]["ok"] is True and conf["idp"]["breaker"] == "closed"
    assert conf["idp"]["endpoint"].endswith("/token/introspection")
    assert conf["redis"]["ok"] is True
    summary = run_health("--url", server.health_url)
    assert summary.returncode == 0 and inst.plugin_id in summary.stdout
    assert "idp http://127.0.0.1:" in summary.stdout and "redis" in summary.stdout


def test_failing_idp_and_redis_make_it_unhealthy(server, auth_server):
    dead_redis = "127.0.0.1:%d" % free_port()
    inst = server.configure({"introspection_url": auth_server.introspection_url,
                             "authorization_value": WRONG_AUTH, "store": store(dead_redis)})
    token = auth_server.issue_token("bob-app")
    assert server.request(inst, headers={"Authorization": "Bearer " + token}).status == 500
    fresh(server)
    r = requests.get(server.health_url, timeout=20)
    assert r.status_code == 503 and r.json()["healthy"] is False
    bad = [c for c in r.json()["configs"] if c["plugin_ids"] == [inst.plugin_id]][0]
    assert bad["healthy"] is False
    assert bad["idp"]["ok"] is False and "HTTP 401" in bad["idp"]["error"]
    assert bad["redis"]["ok"] is False and bad["redis"]["error"] == "ConnectionError"
    # what failed is named (issue 19.8): the endpoint and the store, not only the error
    assert bad["idp"]["endpoint"] == metrics.endpoint_label(auth_server.introspection_url)
    assert bad["redis"]["store"] == "Redis " + dead_redis
    good = [c for c in r.json()["configs"] if c["plugin_ids"] != [inst.plugin_id]]
    assert good and all(c["healthy"] for c in good)   # the other config still answers
    out = run_health("--url", server.health_url)
    assert out.returncode == 1 and "UNHEALTHY" in out.stdout
    assert "FAILED" in out.stdout
    assert "redis Redis %s FAILED (ConnectionError)" % dead_redis in out.stdout, out.stdout
    for secret in (WRONG_AUTH.split(" ")[1], "wrong-health-pw", ACL_PASSWORD, STORE_SECRET,
                   token):
        assert secret not in r.text and secret not in out.stdout


def test_idp_down_is_unhealthy(server):
    inst = server.configure({"introspection_url": "http://127.0.0.1:%d/i" % free_port(),
                             "authorization_value": WRONG_AUTH, "max_retries": 0})
    assert server.request(inst, headers={"Authorization": "Bearer t-1"}).status == 500
    fresh(server)
    report = requests.get(server.health_url, timeout=20).json()
    down = [c for c in report["configs"] if c["plugin_ids"] == [inst.plugin_id]][0]
    assert down["idp"]["ok"] is False and "could not connect" in down["idp"]["error"]
    assert down["idp"]["endpoint"].startswith("http://127.0.0.1:")
    assert down["redis"] is None


def test_client_credentials_configs(cc_server, auth_server):
    server = cc_server
    cc = "oauth2-client-credentials"
    usable = server.configure({"url": auth_server.token_url, "audience": "https://api.test"},
                              name=cc)
    unusable = server.configure({"url": auth_server.token_url, "audience": "https://api.test",
                                 # a claims expression that does not parse: the
                                 # schema (hence Kong) cannot judge it
                                 "claims": "Equals(`grp`"}, name=cc)
    assert server.request(usable).status == 401        # no client credentials sent
    assert server.request(unusable).status == 500
    fresh(server)
    report = requests.get(server.health_url, timeout=20).json()
    by_id = {c["plugin_ids"][0]: c for c in report["configs"] if c["plugin"] == cc}
    ok, bad = by_id[usable.plugin_id], by_id[unusable.plugin_id]
    assert ok["healthy"] is True and ok["idp"]["ok"] is True
    assert ok["idp"]["endpoint"] == auth_server.token_url   # already host:port/path
    assert bad["healthy"] is False and bad["error"].startswith("unusable config: ")


def test_cannot_ask(server):
    out = run_health("--url", "http://127.0.0.1:%d/health" % free_port())
    assert out.returncode == 2 and out.stderr.startswith("oauth2-introspection: cannot ask")
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    metrics_url = server.health_url.replace("/health", "/metrics")
    out = run_health("--url", metrics_url)
    assert out.returncode == 2 and "did not answer with a health report" in out.stderr
    assert run_health("--url", "127.0.0.1:1").returncode == 2
    assert run_health().returncode == 2          # --url is required
    helped = run_health("--help")
    assert helped.returncode == 0 and "--url" in helped.stdout
