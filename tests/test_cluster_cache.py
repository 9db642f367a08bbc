"""One token cache for a whole Kong cluster: two real plugin-server processes
sharing a real Redis, driven through the Kong stand-in."""

import threading
import time

import pytest

from conftest import plugin_command
from idp_double import INACTIVE, IdPDouble, Reply, active
from kong import KongStandIn
from redis_servers import (ACL_PASSWORD, ACL_USER, MASTER_SET, PASSWORD,  # noqa: F401
                           SENTINEL_PASSWORD, CacheNode, redis_cluster, redis_disposable,
                           redis_sentinel, redis_tls, tls_certs)
from test_plugin_kong import SECRET, bearer, config

STORE_SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def two_nodes():
    with KongStandIn(plugin_command()) as a, KongStandIn(plugin_command()) as b:
        yield a, b


def store(server, **extra):
    return dict({"key_prefix": "t:", "secret": STORE_SECRET,
                 "redis": {"endpoints": [server.address], "username": ACL_USER,
                           "password": ACL_PASSWORD, "timeout_ms": 200}}, **extra)


def claims_idp(delay=0.0):
    return IdPDouble(lambda f, h: Reply(200, {"active": True, "username": "alice-claim",
                                              "client_id": "shared-app",
                                              "exp": int(time.time()) + 3600}, delay=delay))


def test_token_introspected_by_one_node_is_served_by_the_other(two_nodes, redis_disposable):
    a, b = two_nodes
    with claims_idp() as idp:
        conf = config(idp, store=store(redis_disposable))
        ia, ib = a.configure(conf), b.configure(conf)
        assert a.request(ia, "GET", "/", headers=bearer("tok-shared-1")).status == 200
        r = b.request(ib, "GET", "/", headers=bearer("tok-shared-1"))
        assert r.status == 200 and r.upstream.headers["X-Credential-Client-ID"] == "shared-app"
        assert len(idp.calls) == 1
        # Both nodes derive the same credential id, so per-credential limits agree.
        assert r.credential["id"] == a.request(ia, "GET", "/", headers=bearer("tok-shared-1")).credential["id"]


def test_values_in_redis_are_encrypted_and_hold_no_token(two_nodes, redis_disposable):
    a, _ = two_nodes
    token = "tok-secret-in-redis-9f8e7d"
    with claims_idp() as idp:
        inst = a.configure(config(idp, store=store(redis_disposable)))
        assert a.request(inst, "GET", "/", headers=bearer(token)).status == 200
    raw = redis_disposable.client()
    names = raw.keys("t:*")
    for name in names:   # entries, and the sub/client_id index: HMACs, no claim
        assert b"alice-claim" not in name and b"shared-app" not in name
    keys = [k for k in names if not k.endswith(b":lease") and raw.type(k) == b"string"]
    assert keys, "nothing was written to Redis"
    for key in keys:
        value = raw.get(key)
        assert token.encode() not in key and token.encode() not in value
        assert b"alice-claim" not in value and b"shared-app" not in value and b"active" not in value
    log = a.server_log()
    assert ACL_PASSWORD not in log and STORE_SECRET not in log and token not in log


def test_concurrent_misses_on_two_nodes_make_one_idp_call(two_nodes, redis_disposable):
    a, b = two_nodes
    with claims_idp(delay=0.3) as idp:
        conf = config(idp, store=store(redis_disposable))
        ia, ib = a.configure(conf), b.configure(conf)
        # Instances start lazily; start them before the race.
        a.request(ia, "GET", "/", headers=bearer("tok-warm-a"))
        b.request(ib, "GET", "/", headers=bearer("tok-warm-b"))
        before = len(idp.calls)
        barrier = threading.Barrier(40)
        results = []

        def one(node, inst):
            barrier.wait()
            results.append(node.request(inst, "GET", "/", headers=bearer("tok-herd")))
        threads = [threading.Thread(target=one, args=(a, ia) if i % 2 else (b, ib))
                   for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status for r in results] == [200] * 40
        assert len(idp.calls) - before == 1


def test_inactive_tokens_are_cached_briefly(two_nodes, redis_disposable):
    a, b = two_nodes
    with IdPDouble(lambda f, h: INACTIVE) as idp:
        conf = config(idp, store=store(redis_disposable), negative_ttl=30)
        ia, ib = a.configure(conf), b.configure(conf)
        for i in range(10):
            node, inst = (a, ia) if i % 2 else (b, ib)
            assert node.request(inst, "GET", "/", headers=bearer("tok-flood")).status == 401
        assert len(idp.calls) == 1


def test_redis_killed_mid_run_fails_no_request_and_is_used_again(two_nodes, redis_disposable):
    a, _ = two_nodes
    with claims_idp() as idp:
        inst = a.configure(config(idp, store=store(redis_disposable)))
        assert a.request(inst, "GET", "/", headers=bearer("tok-before")).status == 200
        redis_disposable.stop()
        for i in range(20):
            r = a.request(inst, "GET", "/", headers=bearer(f"tok-during-{i}"))
            assert r.status == 200 and r.kong_error is None
        redis_disposable.restart()
        raw = redis_disposable.client()
        deadline = time.monotonic() + 15
        written = False
        n = 0
        while time.monotonic() < deadline and not written:
            a.request(inst, "GET", "/", headers=bearer(f"tok-after-{n}"))
            n += 1
            written = any(not k.endswith(b":lease") for k in raw.keys("t:*"))
            time.sleep(0.2)
        assert written, "the store was not used again after Redis came back"
    assert ACL_PASSWORD not in a.server_log()


def test_stale_if_error_through_the_plugin(two_nodes):
    a, _ = two_nodes
    state = {"up": True}
    with IdPDouble(lambda f, h: active(exp=int(time.time()) + 3600) if state["up"] else Reply(503)) as idp:
        tolerant = a.configure(config(idp, ttl=1, stale_if_error=60))
        strict = a.configure(config(idp, ttl=1))
        assert a.request(tolerant, "GET", "/", headers=bearer("tok-stale")).status == 200
        assert a.request(strict, "GET", "/", headers=bearer("tok-stale")).status == 200
        state["up"] = False
        time.sleep(1.2)
        assert a.request(tolerant, "GET", "/", headers=bearer("tok-stale")).status == 200
        assert a.request(strict, "GET", "/", headers=bearer("tok-stale")).status == 500


def test_no_store_answers_are_asked_every_time(two_nodes):
    a, _ = two_nodes
    with IdPDouble(lambda f, h: Reply(200, {"active": True}, {"Cache-Control": "no-store"})) as idp:
        inst = a.configure(config(idp))
        for _ in range(3):
            assert a.request(inst, "GET", "/", headers=bearer("tok-nostore")).status == 200
        assert len(idp.calls) == 3


def _shared_by_both(two_nodes, store_conf, token):
    """A token asked on node A is served to node B from the store."""
    a, b = two_nodes
    with claims_idp() as idp:
        conf = config(idp, store=store_conf)
        ia, ib = a.configure(conf), b.configure(conf)
        assert a.request(ia, "GET", "/", headers=bearer(token)).status == 200
        assert b.request(ib, "GET", "/", headers=bearer(token)).status == 200
        return len(idp.calls)


def test_redis_cluster_mode(two_nodes, redis_cluster):
    conf = {"secret": STORE_SECRET, "redis": {"endpoints": redis_cluster.endpoints,
                                              "password": PASSWORD, "cluster": True}}
    assert _shared_by_both(two_nodes, conf, "tok-cluster") == 1


def test_redis_over_tls_with_a_client_certificate(two_nodes, redis_tls, tls_certs):
    conf = {"secret": STORE_SECRET, "redis": {
        "endpoints": [redis_tls.address], "password": PASSWORD,
        "tls": {"enabled": True, "ca": tls_certs["ca"], "cert": tls_certs["client_cert"],
                "key": tls_certs["client_key"]}}}
    assert _shared_by_both(two_nodes, conf, "tok-tls") == 1
    assert tls_certs["client_key"].splitlines()[1] not in two_nodes[0].server_log()


def test_plugin_follows_a_sentinel_failover(two_nodes, redis_sentinel):
    sset = redis_sentinel
    a, b = two_nodes
    conf_store = {"key_prefix": "s:", "secret": STORE_SECRET, "redis": {
        "endpoints": sset.endpoints, "password": PASSWORD, "timeout_ms": 300,
        "sentinel": {"master_set": MASTER_SET, "password": SENTINEL_PASSWORD}}}
    with claims_idp() as idp:
        conf = config(idp, store=conf_store)
        ia, ib = a.configure(conf), b.configure(conf)
        assert a.request(ia, "GET", "/", headers=bearer("tok-before-failover")).status == 200
        assert b.request(ib, "GET", "/", headers=bearer("tok-before-failover")).status == 200
        assert len(idp.calls) == 1
        new_master = sset.failover(kill=False)
        raw = new_master.client()

        def entries():
            return sum(1 for k in raw.keys("s:*") if not k.endswith(b":lease"))
        baseline = entries()   # what replication already brought over
        deadline = time.monotonic() + 15
        n, landed = 0, None
        while time.monotonic() < deadline and landed is None:
            token = f"tok-after-failover-{n}"
            n += 1
            r = a.request(ia, "GET", "/", headers=bearer(token))
            assert r.status == 200 and r.kong_error is None   # no request fails meanwhile
            if entries() > baseline:
                landed = token
            time.sleep(0.1)
        assert landed, "the plugin did not write to the new master"
        calls = len(idp.calls)
        assert b.request(ib, "GET", "/", headers=bearer(landed)).status == 200
        assert len(idp.calls) == calls     # node B read it from the new master


# -- the wait protocol across processes: two processes running the plugin's cache
#    (real Config, Introspector, RedisStore, TokenCache) against one real Redis ------

@pytest.fixture
def nodes(redis_disposable):
    """Start cache processes sharing ``redis_disposable``; all stopped afterwards."""
    started = []

    def start(idp, **conf):
        plugin = config(idp, store=store(redis_disposable), **conf)
        node = CacheNode(plugin)
        started.append(node)
        node.wait_subscribed()
        return node
    yield start
    for node in started:
        node.stop()
    for node in started:
        log = node.log()
        assert ACL_PASSWORD not in log and STORE_SECRET not in log and "tok-" not in log


def commands(server, name):
    stats = server.client().info("commandstats")
    return stats.get(f"cmdstat_{name}", {}).get("calls", 0)


def race(a, b, token, b_after=0.2, deadline=None):
    """A asks first; B asks the same token while A is still at the IdP."""
    first = a.submit("get", token=token, deadline=deadline)
    time.sleep(b_after)
    second = b.submit("get", token=token, deadline=deadline)
    return first.result(30), second.result(30)


def test_waiter_in_another_process_is_woken_with_the_stored_answer(nodes, redis_disposable):
    with claims_idp(delay=1.0) as idp:
        a, b = nodes(idp), nodes(idp)
        redis_disposable.client().config_resetstat()
        ra, rb = race(a, b, "tok-wake-stored")
        assert ra["active"] and rb["active"] and rb["claims"] == ra["claims"]
        assert len(idp.calls) == 1
        # Woken when A finished (about 0.8 s after B asked), not after a poll period.
        assert rb["s"] < 1.2
        # No polling: B read the store a handful of times, not every few ms.
        assert commands(redis_disposable, "get") <= 4


def test_stored_answer_reaches_the_other_process_without_a_request(nodes, redis_disposable):
    with claims_idp() as idp:
        a, b = nodes(idp), nodes(idp)
        assert a.get("tok-pushed")["active"]
        deadline = time.monotonic() + 1
        while b.peek("tok-pushed") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.peek("tok-pushed") is not None
        redis_disposable.client().config_resetstat()
        assert b.get("tok-pushed")["active"]
        assert commands(redis_disposable, "get") == 0 and len(idp.calls) == 1


def test_no_store_answer_is_not_shared_the_waiter_asks_itself(nodes):
    with IdPDouble(lambda f, h: Reply(200, {"active": True, "sub": "u"},
                                      {"Cache-Control": "no-store"}, delay=0.6)) as idp:
        a, b = nodes(idp), nodes(idp)
        ra, rb = race(a, b, "tok-nostore-race")
        assert ra["active"] and rb["active"]
        assert len(idp.calls) == 2
        # Woken by A's announcement (~0.4 s), then its own call (0.6 s): not 10 s.
        assert rb["s"] < 1.6


def test_leaders_failure_is_shared_at_once(nodes):
    with IdPDouble(lambda f, h: Reply(503, delay=0.6)) as idp:
        a, b = nodes(idp), nodes(idp)
        ra, rb = race(a, b, "tok-fail-race")
        assert ra["error"] == "IntrospectionError" and rb["error"] == "IntrospectionError"
        assert len(idp.calls) == 1 and rb["s"] < 1.0


def test_inactive_answer_shared_even_when_not_cached(nodes):
    with IdPDouble(lambda f, h: Reply(200, {"active": False}, delay=0.6)) as idp:
        a, b = nodes(idp, negative_ttl=0), nodes(idp, negative_ttl=0)
        ra, rb = race(a, b, "tok-inactive-race")
        assert ra["active"] is False and rb["active"] is False
        assert len(idp.calls) == 1 and rb["s"] < 1.0


def test_leader_killed_the_waiter_takes_over_when_the_lease_expires(nodes):
    slow = {"first": True}

    def behaviour(form, headers):
        delay = 5.0 if slow.pop("first", False) else 0.0
        return Reply(200, {"active": True, "sub": "u"}, delay=delay)
    with IdPDouble(behaviour) as idp:
        # timeout 1 s, no retries: a lease lasts 1.5 s at most.
        a, b = nodes(idp, timeout=1000), nodes(idp, timeout=1000)
        a.submit("get", token="tok-dead-leader")
        time.sleep(0.2)
        a.kill()
        rb = b.get("tok-dead-leader")
        assert rb["active"] and len(idp.calls) == 2
        assert 0.8 < rb["s"] < 2.5


def test_waiter_gives_up_at_its_deadline_not_later(nodes):
    with claims_idp(delay=2.0) as idp:
        a, b = nodes(idp, timeout=5000), nodes(idp, timeout=5000)
        first = a.submit("get", token="tok-deadline")
        time.sleep(0.2)
        rb = b.get("tok-deadline", deadline=0.4)
        assert rb["error"] == "DeadlineExceeded" and 0.35 < rb["s"] < 0.7
        assert first.result(10)["active"] and len(idp.calls) == 1


def test_herd_on_two_processes_asks_the_idp_once_per_token(nodes):
    with claims_idp(delay=0.3) as idp:
        a, b = nodes(idp), nodes(idp)
        tokens = [f"tok-herd-{i}" for i in range(10)]
        futures = [(a if i % 2 else b).submit("get", token=tokens[i % 10]) for i in range(100)]
        results = [f.result(30) for f in futures]
        assert all(r.get("active") for r in results), results
        assert sorted(idp.tokens) == sorted(tokens)


def test_without_pub_sub_rights_waiters_still_get_the_answer_quickly(redis_disposable):
    """An ACL user that may not use channels: no announcement ever arrives, yet a
    waiter is served soon after the leader finishes, with one IdP call."""
    admin = redis_disposable.client()
    admin.acl_setuser("nochannels", enabled=True, passwords=["+nochannels-pw"],
                      keys=["*"], commands=["+@all"], reset_channels=True)
    conf_store = {"key_prefix": "nc:", "secret": STORE_SECRET,
                  "redis": {"endpoints": [redis_disposable.address], "username": "nochannels",
                            "password": "nochannels-pw"}}
    with claims_idp(delay=0.6) as idp:
        a, b = (CacheNode(config(idp, store=conf_store)) for _ in range(2))
        try:
            assert a.call("status")["subscribed"] is False
            ra, rb = race(a, b, "tok-no-channels")
            assert ra["active"] and rb["active"] and len(idp.calls) == 1
            assert rb["s"] < 0.8
        finally:
            a.stop()
            b.stop()
        assert "nochannels-pw" not in a.log() + b.log()
