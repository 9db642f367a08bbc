"""Issue 19 item 4: the metrics/health port has fixed bounds. 2,000 idle and 2,000
slow connections (real sockets on 127.0.0.1) to ``serve --metrics-port`` leave the
plugin server's threads, descriptors and memory where they were (read from /proc),
and Kong's requests through the stand-in are still answered from the cache, even
with the server started at a 1,024 open-files limit (where 1,014 idle connections
used to lock everyone out)."""

import os
import resource
import socket
import time

import pytest
import requests

from conftest import plugin_command
from idp_double import IdPDouble, active
from kong import KongStandIn
from kong_oauth2_introspection.ops import loopback_http
from test_metrics import metrics_url

FLOOD = 2000


def proc_status(pid):
    status = dict(line.split(":", 1) for line in open("/proc/%d/status" % pid))
    return {"threads": int(status["Threads"]), "rss_kb": int(status["VmRSS"].split()[0]),
            "fds": len(os.listdir("/proc/%d/fd" % pid))}


def nofile(pid):
    for line in open("/proc/%d/limits" % pid):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


@pytest.fixture
def idp():
    """An IdP whose answers may be cached (the real one says no-store), counting calls."""
    with IdPDouble(lambda form, headers: active(client_id="alice-app",
                                                exp=int(time.time()) + 600)) as double:
        yield double


@pytest.fixture
def enough_files():
    """This test process holds 4,000 sockets at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * FLOOD + 200:
        pytest.skip("the open-files hard limit (%d) is below what the flood needs" % hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def conf(idp):
    return {"introspection_url": idp.url, "authorization_value": "Basic a29uZzpzZWNyZXQ="}


def connect_many(port, n, first_bytes=b""):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    if first_bytes:
        for s in socks:
            try:
                s.send(first_bytes)
            except OSError:
                pass   # not connected yet, or already pushed out: as an attacker sees it
    return socks


def test_idle_and_slow_connections_cost_a_fixed_amount(idp, enough_files):
    cmd = ["prlimit", "--nofile=1024:1024", "--"] + plugin_command() + \
        ["serve", "--metrics-port", "0"]
    with KongStandIn(cmd) as kong:
        base = metrics_url(kong)
        port = int(base.rsplit(":", 1)[1])
        pid = kong._proc.pid
        inst = kong.configure(conf(idp))
        auth = {"Authorization": "Bearer flood-test-token"}
        assert kong.request(inst, "GET", "/", headers=auth).status == 200   # cached now
        assert requests.get(base + "/metrics", timeout=10).status_code == 200
        before = proc_status(pid)

        idle = connect_many(port, FLOOD)
        slow = connect_many(port, FLOOD, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(3):   # the slow ones keep trickling header bytes
                for s in slow:
                    try:
                        s.send(b"X: y\r\n")
                    except OSError:
                        pass
                assert kong.request(inst, "GET", "/", headers=auth).status == 200
                during = proc_status(pid)
                assert during["threads"] <= before["threads"] + loopback_http.WORKERS, \
                    (before, during)
                assert during["fds"] <= before["fds"] + loopback_http.MAX_CONNECTIONS + 2, \
                    (before, during)
                assert during["rss_kb"] <= before["rss_kb"] + 16 * 1024, (before, during)
                time.sleep(0.5)
            # the port itself still answers a real scrape in the middle of the flood
            assert requests.get(base + "/metrics", timeout=10).status_code == 200
        finally:
            for s in idle + slow:
                s.close()
        print("metrics port flood (%d idle + %d slow): before %s, during %s"
              % (FLOOD, FLOOD, before, during))
        assert kong.request(inst, "GET", "/", headers=auth).status == 200
        assert len(idp.calls) == 1   # every request after the first: a cache hit


def test_serve_raises_the_open_files_limit_to_the_hard_one(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip("needs a finite hard open-files limit above 512")
    cmd = ["prlimit", "--nofile=512:%d" % hard, "--"] + plugin_command()
    with KongStandIn(cmd) as kong:
        assert nofile(kong._proc.pid) == (hard, hard)
        assert "%d open files" % hard in kong.server_log()


def _raw(port, data, read=True):
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        return s.recv(65536) if read else b""


def test_the_port_answers_get_and_head_and_refuses_the_rest():
    httpd = loopback_http.start("127.0.0.1", 0, lambda path: (200, "text/plain", path.encode()),
                                "test")
    try:
        get = _raw(httpd.port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert get.startswith(b"HTTP/1.1 200 OK\r\n") and get.endswith(b"\r\n\r\n/metrics")
        assert b"Connection: close" in get
        head = _raw(httpd.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert _raw(httpd.port, b"POST / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert _raw(httpd.port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
        # a head larger than MAX_HEAD: the connection is closed without an answer
        assert _raw(httpd.port, b"GET /" + b"a" * (loopback_http.MAX_HEAD + 10)) == b""
    finally:
        httpd.shutdown()


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(monkeypatch):
    monkeypatch.setattr(loopback_http, "IDLE_TIMEOUT", 0.3)
    httpd = loopback_http.start("127.0.0.1", 0, lambda path: (200, "text/plain", b""), "test")
    try:
        with socket.create_connection(("127.0.0.1", httpd.port), timeout=15) as s:
            assert s.recv(1) == b""   # closed by the server, not by our timeout
    finally:
        httpd.shutdown()
