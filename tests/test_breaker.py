"""The circuit breaker: its states, and what a client of a failing IdP notices
through the cache (no call to the IdP while open, stale answers, one probe)."""

import threading
import time

import pytest

from idp_double import IdPDouble, Reply
from kong_oauth2_introspection.idp.breaker import (CLOSED, HALF_OPEN, OPEN, Breaker, Breakers,
                                               for_endpoint)
from kong_oauth2_introspection.cache.tokens import Policy, TokenCache
from kong_oauth2_introspection.introspection.config import Config
from kong_oauth2_introspection.introspection.exchange import IntrospectionError, Introspector
from test_plugin_kong import SECRET


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Log:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(("info", msg))

    def warn(self, msg):
        self.lines.append(("warn", msg))

    err = warn


def test_opens_after_consecutive_failures_then_probes_once_and_closes():
    clock, log, seen = Clock(), Log(), []
    b = Breaker("https://user:pw@idp.example:8443/introspect?client_secret=s3", log=log,
                clock=clock, listeners=[lambda e, s: seen.append(s)])
    for _ in range(4):
        assert b.allow()
        b.failed()
    assert b.state == CLOSED
    b.failed()
    assert b.state == OPEN and not b.allow()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow() and b.state == HALF_OPEN
    assert not b.allow()          # one probe at a time
    b.succeeded()
    assert b.state == CLOSED and b.allow()
    assert seen == [OPEN, HALF_OPEN, CLOSED]
    assert len(log.lines) == 3    # one line per change
    text = " ".join(m for _, m in log.lines)
    assert "pw" not in text and "s3" not in text and "idp.example:8443/introspect" in text


def test_failures_spread_beyond_the_window_do_not_open():
    clock = Clock()
    b = Breaker("http://idp/i", clock=clock)
    for _ in range(4):
        b.failed()
    clock.now += 11          # the fifth comes after the 10 s window: counting restarts
    b.failed()
    assert b.state == CLOSED
    for _ in range(4):
        b.failed()
    assert b.state == OPEN   # five within one window


def test_success_resets_the_count():
    b = Breaker("http://idp/i", clock=Clock())
    for _ in range(4):
        b.failed()
    b.succeeded()
    for _ in range(4):
        b.failed()
    assert b.state == CLOSED


def test_failed_probe_doubles_the_open_period_up_to_the_cap():
    clock = Clock()
    b = Breaker("http://idp/i", clock=clock)
    for _ in range(5):
        b.failed()
    periods = []
    for _ in range(5):
        start = clock.now
        while not b.allow():
            clock.now += 0.5
        periods.append(clock.now - start)
        b.failed()
    assert periods[0] == pytest.approx(5.0, abs=0.5)
    assert periods[1] == pytest.approx(10.0, abs=0.5)
    assert periods[2] == pytest.approx(20.0, abs=0.5)
    assert periods[3] == pytest.approx(30.0, abs=0.5)
    assert periods[4] == pytest.approx(30.0, abs=0.5)


def test_one_breaker_per_endpoint_and_states_for_metrics():
    reg = Breakers()
    assert reg.for_endpoint("http://a/i") is reg.for_endpoint("http://a/i")
    assert reg.for_endpoint("http://a/i") is not reg.for_endpoint("http://b/i")
    reg.for_endpoint("http://b/i").failed()
    assert reg.states() == {"http://a/i": CLOSED, "http://b/i": CLOSED}
    assert for_endpoint("http://c/i") is for_endpoint("http://c/i")


def test_concurrent_probes_only_one_goes_through():
    clock = Clock()
    b = Breaker("http://idp/i", clock=clock, failures=1)
    b.failed()
    clock.now += 6
    allowed = []
    threads = [threading.Thread(target=lambda: allowed.append(b.allow())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 1


# -- through the cache, against an IdP double that fails -----------------------------

def setup(idp, open_first=0.3, stale_if_error=0):
    conf = Config.parse({"introspection_url": idp.url, "authorization_value": SECRET,
                         "timeout": 500})
    intro = Introspector(conf)
    cache = TokenCache(key_material=b"idp")
    policy = Policy(ttl=0.2, negative_ttl=5, stale_if_error=stale_if_error, wait=1)
    log = Log()
    breaker = Breaker(idp.url, open_first=open_first, log=log)

    def get(token):
        return cache.get(cache.key(token), lambda: intro.introspect(token), policy,
                         breaker=breaker)
    return get, breaker, log


def test_open_breaker_spares_the_idp_and_answers_at_once():
    state = {"up": False}
    with IdPDouble(lambda f, h: Reply(200, {"active": True}) if state["up"]
                   else Reply(503, delay=0.1)) as idp:
        get, breaker, log = setup(idp)
        for i in range(5):
            with pytest.raises(IntrospectionError):
                get(f"t{i}")
        assert len(idp.calls) == 5 and breaker.state == OPEN
        start = time.monotonic()
        for i in range(20):
            with pytest.raises(IntrospectionError):
                get(f"u{i}")
        assert len(idp.calls) == 5                        # the IdP was left alone
        assert time.monotonic() - start < 0.1             # and nobody waited for it
        state["up"] = True
        time.sleep(0.35)
        assert get("probe").active and breaker.state == CLOSED
        assert get("after").active and len(idp.calls) == 7
        assert [m.split(": ")[1].split(" ")[0] for _, m in log.lines] == [
            OPEN, HALF_OPEN, CLOSED]


def test_open_breaker_serves_stale_answers_when_allowed():
    state = {"up": True}
    with IdPDouble(lambda f, h: Reply(200, {"active": True, "sub": "s"}) if state["up"]
                   else Reply(503)) as idp:
        get, breaker, _ = setup(idp, open_first=5, stale_if_error=60)
        assert get("known").active
        state["up"] = False
        time.sleep(0.25)                     # past ttl: stale
        for i in range(5):
            with pytest.raises(IntrospectionError):
                get(f"new{i}")
        assert breaker.state == OPEN
        calls = len(idp.calls)
        assert get("known").active           # stale, without asking
        assert len(idp.calls) == calls


# -- through the Kong stand-in and the real plugin server ------------------------------

def test_plugin_server_stops_calling_a_failing_idp(kong):
    from test_plugin_kong import bearer, config
    with IdPDouble(lambda f, h: Reply(503)) as idp:
        inst = kong.configure(config(idp, timeout=2000))
        for i in range(5):
            assert kong.request(inst, "GET", "/", headers=bearer(f"tok-brk-{i}")).status == 500
        assert len(idp.calls) == 5
        for i in range(20):
            r = kong.request(inst, "GET", "/", headers=bearer(f"tok-brk-open-{i}"))
            assert r.status == 500 and not r.proxied
        assert len(idp.calls) == 5           # open: the IdP is left alone
    log = kong.server_log()
    assert log.count("circuit breaker for %s: open" % idp.url) == 1
    assert "tok-brk" not in log
