"""The fault matrix (issue 9 item 7): every fault real Kong, the IdP or Redis can
produce, each row under concurrent load through the stand-in with the Kong-side
guard, counting requests passed unauthenticated (must be 0), 500s, guard 503s and
lost requests (no answer at all: must be 0). Then a fuzz of raw bytes through
every part of a request, and a soak.

The table prints at the end of the run (``-rA`` or the terminal summary) and is
the one in docs/fault-matrix.md."""

import collections
import itertools
import os
import socket
import ssl
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs import make_ca_and_certs
from conftest import plugin_command
from idp_double import IdPDouble, Reply, active
from kong import KongStandIn
from kong_oauth2_introspection.ops.guard import render

SECRET = "Basic bWF0cml4Om1hdHJpeC1zZWNyZXQ="
DEADLINE = 3.0
PER_ROW = 60
CONCURRENCY = 12
TABLE = []


def config(url, **extra):
    return dict({"introspection_url": url, "authorization_value": SECRET, "timeout": 2000},
                **extra)


@pytest.fixture(scope="module")
def kong():
    with KongStandIn(plugin_command() + ["serve", "--deadline", str(DEADLINE)],
                     post_function=[render(True)], fail_open="record", rpc_timeout=8.0,
                     respawn=True) as standin:
        yield standin


def load(kong, inst_of, n=PER_ROW, during=None, token=lambda i: "tok-m-%d" % i):
    """``n`` requests, CONCURRENCY at a time; ``during`` runs alongside, and the
    load goes on until it is over (however fast the requests are)."""
    results, lost = [], []
    lock = threading.Lock()
    counter = itertools.count()
    fault_over = threading.Event()
    if during is None:
        fault_over.set()

    def worker():
        while True:
            with lock:
                i = next(counter)
            if i >= n and fault_over.is_set():
                return
            try:
                r = kong.request(inst_of(), headers=[("X-Consumer-ID", "evil"),
                                                      ("Authorization", "Bearer " + token(i))])
                results.append(r)
            except Exception as err:  # noqa: BLE001 - counted: a lost request
                lost.append(err)
    workers = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    started = time.monotonic()
    for t in workers:
        t.start()
    if during is not None:
        try:
            during()
        finally:
            fault_over.set()
    for t in workers:
        t.join()
    return results, lost, time.monotonic() - started


def record(row, results, lost, took, *, allow_200=False):
    counts = collections.Counter(r.status for r in results)
    unauth = sum(1 for r in results if r.passed_unauthenticated)
    spoofed = sum(1 for r in results if r.proxied and
                  "evil" in r.upstream.headers.getall("X-Consumer-ID"))
    TABLE.append((row, len(results) + len(lost), unauth + spoofed, counts.get(500, 0),
                  counts.get(503, 0), counts.get(200, 0), len(lost), took))
    assert unauth == 0 and spoofed == 0, row
    assert not lost, (row, lost[:2])
    if not allow_200:
        assert counts.get(200, 0) == 0, row
    return counts


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


IDP_FAULTS = {
    "IdP down (connection refused)": None,
    "IdP refusing (HTTP 401 to the plugin)": Reply(401, {"error": "invalid_client"}),
    "IdP slow beyond the deadline": Reply(200, {"active": True}, delay=DEADLINE + 3),
    "IdP slow drip": Reply(200, {"active": True, "pad": "y" * 300}, drip=0.03),
    "IdP 5xx": Reply(502, "bad gateway"),
    "IdP garbage": Reply(200, "<html>not json</html>"),
    "IdP huge answer (50 MB)": Reply(200, size=50 * 1024 * 1024),
}


@pytest.mark.parametrize("row", list(IDP_FAULTS))
def test_idp_faults(kong, row):
    reply = IDP_FAULTS[row]
    if reply is None:
        inst = kong.configure(config("http://127.0.0.1:%d/introspect" % closed_port()))
        record(row, *load(kong, lambda: inst))
        return
    with IdPDouble(lambda f, h: reply) as idp:
        inst = kong.configure(config(idp.url, timeout=30000 if "slow" in row else 2000))
        results, lost, took = load(kong, lambda: inst)
    counts = record(row, results, lost, took)
    assert counts[500] == len(results), counts   # the documented failure answer, every time


def test_idp_tls_failure(kong, tmp_path):
    pems = make_ca_and_certs(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pems["server_cert_path"], pems["server_key_path"])
    with IdPDouble(lambda f, h: active(client_id="c"), tls=ctx) as idp:
        inst = kong.configure(config(idp.url))   # our trust store does not know its CA
        counts = record("IdP TLS failure (unknown CA)", *load(kong, lambda: inst))
    assert counts[500] == PER_ROW


def _dripping_redis():
    """A 'Redis' that accepts and answers one byte a second: a slow drip."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue

            def drip(c=conn):
                try:
                    while not stop.is_set():
                        c.send(b"+")
                        time.sleep(1.0)
                except OSError:
                    pass
            threading.Thread(target=drip, daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], lambda: (stop.set(), server.close())


@pytest.mark.parametrize("row", ["Redis down", "Redis slow drip"])
def test_redis_faults_never_fail_a_request(kong, row):
    stop = None
    if row == "Redis down":
        port = closed_port()
    else:
        port, stop = _dripping_redis()
    try:
        with IdPDouble(lambda f, h: active(client_id="c")) as idp:
            inst = kong.configure(config(idp.url, store={
                "secret": "0123456789abcdef0123456789abcdef",
                "redis": {"endpoints": ["127.0.0.1:%d" % port], "timeout_ms": 200}}))
            counts = record(row, *load(kong, lambda: inst), allow_200=True)
    finally:
        if stop:
            stop()
    assert counts[200] == PER_ROW   # the store is an optimisation: the IdP still answers


def test_plugin_server_killed_and_respawned_under_load(kong):
    with IdPDouble(lambda f, h: active(client_id="c")) as idp:
        inst = kong.configure(config(idp.url))

        def kill_twice():
            time.sleep(0.3)
            kong.kill_server()
            time.sleep(1.5)
            kong.kill_server()
        results, lost, took = load(kong, lambda: inst, n=300, during=kill_twice,
                                   token=lambda i: "tok-k-%d" % (i % 20))
        counts = record("plugin server killed twice, respawned (guard)", results, lost, took,
                        allow_200=True)
        deadline = time.monotonic() + 15
        while kong.request(inst, headers={"Authorization": "Bearer tok-k-0"}).status != 200:
            assert time.monotonic() < deadline, "the respawned server never answered"
            time.sleep(0.2)
    assert counts[503] > 0 and counts[200] > 0   # the guard held, and service came back


def test_config_changed_under_load(kong):
    with IdPDouble(lambda f, h: active(client_id="c")) as idp:
        box = [kong.configure(config(idp.url), plugin_id="changing")]

        def change():
            for i in range(200):
                box[0] = kong.configure(config(idp.url, ttl=5 + i), plugin_id="changing")
        results, lost, took = load(kong, lambda: box[0], n=400, during=change,
                                   token=lambda i: "tok-c-%d" % (i % 10))
        counts = record("config changed 200 times under load", results, lost, took,
                        allow_200=True)
    assert counts[200] == 400, {m for r in results for _, m in r.logs}


# -- raw bytes anywhere: every event answered ---------------------------------------------

_raw = st.binary(max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=_raw, value=_raw, query=_raw, cookie=_raw, body=_raw,
       content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json",
                                     "multipart/form-data; boundary=b", "text/plain", None]),
       token=st.one_of(st.none(), _raw))
def test_raw_bytes_anywhere_are_always_answered(fuzz_kong, header, value, query, cookie, body,
                                                 content_type, token):
    kong, inst = fuzz_kong
    name = b"X-F" + bytes(c for c in header if 0x21 <= c < 0x7f and c not in b":_")[:20]
    headers = [(name, value), ("Cookie", b"sid=" + cookie), ("X-Consumer-ID", "evil")]
    if content_type:
        headers.append(("Content-Type", content_type))
    if token is not None:
        headers.append(("Authorization", b"Bearer " + token))
    r = kong.request(inst, "POST", "/", headers=headers, query=query, body=body)
    assert not r.failed_open and r.kong_error is None, r
    assert r.status in (200, 400, 401), r
    if r.proxied:
        assert "evil" not in r.upstream.headers.getall("X-Consumer-ID")


@pytest.fixture(scope="module")
def fuzz_kong():
    with IdPDouble(lambda f, h: active(client_id="c")) as idp:
        with KongStandIn(plugin_command()) as standin:
            yield standin, standin.configure(config(idp.url, token_source={
                "header": "Authorization", "header_auth_scheme": "Bearer", "query": "access_token",
                "cookie": "sid"}))


# -- soak: memory stays bounded ------------------------------------------------------------

def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.soak
def test_soak_100k_requests_over_10k_tokens_memory_bounded():
    n, tokens = int(os.environ.get("SOAK_REQUESTS", 100000)), 10000
    with IdPDouble(lambda f, h: active(client_id="c", exp=int(time.time()) + 3600)) as idp, \
            KongStandIn(plugin_command()) as kong:
        inst = kong.configure(config(idp.url))
        marks = {}
        results, lost, took = [], [], 0.0
        for part in range(4):
            res, los, t = load(kong, lambda: inst, n=n // 4,
                               token=lambda i, p=part: "tok-s-%d" % ((p * n // 4 + i) % tokens))
            results.extend(r.status for r in res)
            lost.extend(los)
            took += t
            marks[part] = rss_kib(kong.pid)
        TABLE.append(("soak: %d requests over %d tokens" % (n, tokens), n, 0,
                      results.count(500), 0, results.count(200), len(lost), took))
    assert not lost and results.count(200) == n
    # After the first quarter every token is cached: memory must level off.
    assert marks[3] - marks[1] < 30 * 1024, marks


def pytest_table():
    lines = ["| fault (each under concurrent load, guard on) | requests | passed "
             "unauthenticated or spoofed | 500 | guard 503 | 200 | lost | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in TABLE:
        lines.append("| %s | %d | %d | %d | %d | %d | %d | %.1f |" % row)
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    if TABLE:
        text = pytest_table()
        out = os.environ.get("FAULT_MATRIX_OUT")
        if out:
            with open(out, "w") as f:
                f.write(text + "\n")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(text)
