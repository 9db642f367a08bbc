"""One token cache for every process of a plugin server (issue 21 item 2).

The cross-process tests run real separate processes (``redis_servers.CacheNode``:
the plugin's Config, Introspector and TokenCache) that share one node directory
as the processes of ``serve --processes N`` do, against an IdP double on
127.0.0.1 that counts its calls. No Redis unless the test says so.
"""

import os
import time

import pytest

from idp_double import IdPDouble, Reply
from redis_servers import ACL_PASSWORD, CacheNode, redis_disposable  # noqa: F401
from test_plugin_kong import SECRET, config
from test_purge import STORE_SECRET, dropped_everywhere, held_everywhere, run_purge, \
    standalone_store

from kong_oauth2_introspection import node
from kong_oauth2_introspection.cache import node as nodecache
from kong_oauth2_introspection.cache.tokens import Entry, Policy, TokenCache
from kong_oauth2_introspection.introspection.exchange import Answer, IntrospectionError

N = 4


@pytest.fixture
def processes(tmp_path):
    """Start cache processes; ``shared=True`` (the default) puts them on one node
    directory. All stopped afterwards; their logs hold no token or secret."""
    started = []

    def start(idp, count=1, shared=True, store=None, **conf):
        plugin = config(idp, store=store, **conf) if store else config(idp, **conf)
        made = [CacheNode(plugin, node_dir=tmp_path / "node" if shared else None)
                for _ in range(count)]
        started.extend(made)
        for proc in made:
            if store:
                proc.wait_subscribed()
            else:
                proc.call("status")   # up and its cache opened
        return made
    yield start
    for proc in started:
        proc.stop()
    for proc in started:
        log = proc.log()
        assert "tok-" not in log and SECRET not in log and STORE_SECRET not in log, log


def claims_idp(delay=0.0, **claims):
    body = dict({"active": True, "sub": "alice-sub", "client_id": "shared-app",
                 "exp": int(time.time()) + 3600}, **claims)
    return IdPDouble(lambda f, h: Reply(200, body, delay=delay))


def herd(procs, tokens, rounds=4):
    """Every process asks for every token, ``rounds`` times, all at once."""
    futures = [p.submit("get", token=t) for _ in range(rounds) for p in procs for t in tokens]
    return [f.result(60) for f in futures]


def test_herd_on_n_processes_asks_the_idp_once_per_token(processes):
    tokens = [f"tok-node-herd-{i}" for i in range(8)]
    with claims_idp(delay=0.3) as idp:
        results = herd(processes(idp, N), tokens)
        assert all(r.get("active") for r in results), results
        assert sorted(idp.tokens) == sorted(tokens)       # one call per token, not N
        # Afterwards every process answers them without the IdP.
        assert herd(processes(idp, 1), tokens, rounds=1)[0]["active"]
        assert len(idp.calls) == len(tokens)


def test_without_a_node_directory_each_process_asks_alone(processes):
    """The baseline the node cache removes: N processes, N calls per token."""
    tokens = [f"tok-alone-{i}" for i in range(3)]
    with claims_idp(delay=0.3) as idp:
        results = herd(processes(idp, N, shared=False), tokens)
        assert all(r.get("active") for r in results)
        assert sorted(idp.tokens) == sorted(tokens * N)


def race(procs, token, after=0.2, deadline=None):
    """The first process asks; the others ask while it is still at the IdP."""
    first = procs[0].submit("get", token=token, deadline=deadline)
    time.sleep(after)
    others = [p.submit("get", token=token, deadline=deadline) for p in procs[1:]]
    return [first.result(30)] + [f.result(30) for f in others]


def test_the_leaders_failure_is_shared_not_repeated(processes):
    with IdPDouble(lambda f, h: Reply(503, delay=0.6)) as idp:
        results = race(processes(idp, N), "tok-node-fail")
        assert [r.get("error") for r in results] == ["IntrospectionError"] * N
        assert len(idp.calls) == 1


def test_stale_if_error_serves_each_process_its_stale_entry(processes):
    answers = {"n": 0}

    def behaviour(form, headers):
        answers["n"] += 1
        if answers["n"] == 1:
            return Reply(200, {"active": True, "sub": "u", "exp": int(time.time()) + 3600})
        return Reply(503, delay=0.3)
    with IdPDouble(behaviour) as idp:
        procs = processes(idp, N, ttl=1, stale_if_error=600)
        assert procs[0].get("tok-node-stale")["active"]
        time.sleep(1.1)                         # fresh for 1 s, then stale for 600
        results = race(procs, "tok-node-stale", after=0.1)
        assert all(r.get("active") for r in results), results
        assert len(idp.calls) == 2              # one refresh attempt for the node


def test_an_inactive_answer_is_shared_even_when_not_cached(processes):
    with IdPDouble(lambda f, h: Reply(200, {"active": False}, delay=0.6)) as idp:
        results = race(processes(idp, N, negative_ttl=0), "tok-node-inactive")
        assert [r.get("active") for r in results] == [False] * N
        assert len(idp.calls) == 1
        # Not cached (negative_ttl 0): the next request asks again.
        assert processes(idp)[0].get("tok-node-inactive")["active"] is False
        assert len(idp.calls) == 2


def test_a_no_store_answer_is_not_shared(processes):
    with IdPDouble(lambda f, h: Reply(200, {"active": True, "sub": "u"},
                                      {"Cache-Control": "no-store"}, delay=0.3)) as idp:
        results = race(processes(idp, 2), "tok-node-nostore")
        assert all(r.get("active") for r in results)
        assert len(idp.calls) == 2              # each process asked for itself


def test_a_killed_leader_does_not_wedge_the_others(processes):
    first = {"slow": True}

    def behaviour(form, headers):
        delay = 5.0 if first.pop("slow", False) else 0.0
        return Reply(200, {"active": True, "sub": "u"}, delay=delay)
    with IdPDouble(behaviour) as idp:
        # wait bound 30 s (timeout 10 s x 3 attempts): only the dead lock can end B's wait.
        a, b = processes(idp, 2, timeout=10000, max_retries=2)
        a.submit("get", token="tok-node-dead")
        while not idp.calls:
            time.sleep(0.01)                    # A is at the IdP, holding the key's lock
        waiting = b.submit("get", token="tok-node-dead")
        time.sleep(0.2)
        a.kill()
        rb = waiting.result(30)
        assert rb["active"] and len(idp.calls) == 2
        assert rb["s"] < 5.0                    # not A's 5 s, nor the 30 s bound


def test_a_waiter_gives_up_at_its_deadline(processes):
    with claims_idp(delay=2.0) as idp:
        a, b = processes(idp, 2, timeout=5000)
        first = a.submit("get", token="tok-node-deadline")
        time.sleep(0.2)
        rb = b.get("tok-node-deadline", deadline=0.4)
        assert rb["error"] == "DeadlineExceeded" and rb["s"] < 1.5
        assert first.result(10)["active"] and len(idp.calls) == 1


def test_a_restarted_plugin_server_starts_cold(processes):
    with claims_idp() as idp:
        a, = processes(idp)
        assert a.get("tok-node-cold")["active"]
        b, = processes(idp)
        assert b.peek("tok-node-cold") is not None    # shared while A lives
        a.stop()
        b.stop()
        c, = processes(idp)                           # nobody alive: a new run
        assert c.peek("tok-node-cold") is None


def test_entries_are_sealed_and_keys_hold_no_token(processes, tmp_path):
    with claims_idp(sub="sub-written-nowhere") as idp:
        a, b = processes(idp, 2)
        assert a.get("tok-node-sealed-0123456789")["active"]
        assert b.peek("tok-node-sealed-0123456789")["sub"] == "sub-written-nowhere"
        data = (tmp_path / "node" / "cache" / "data.mdb").read_bytes()
        for secret in (b"tok-node-sealed", b"sub-written-nowhere", b"shared-app",
                       SECRET.encode()):
            assert secret not in data
        assert oct(os.stat(tmp_path / "node" / "cache" / "data.mdb").st_mode & 0o777) == "0o600"


def test_with_redis_the_node_cache_is_purged(processes, redis_disposable):
    store = standalone_store(redis_disposable, prefix="nc:")
    with claims_idp(sub="purged-sub") as idp:
        procs = processes(idp, 2, store=store, ttl=300)
        assert procs[0].get("tok-node-purge-1")["active"]
        held_everywhere(procs, "tok-node-purge-1")
        conf = config(idp, store=store, ttl=300)
        done = run_purge(conf, "--sub", "purged-sub")
        assert done.returncode == 0, done.stderr
        dropped_everywhere(procs, "tok-node-purge-1")
        # A process that joins now does not find it in the node cache either.
        assert processes(idp, store=store, ttl=300)[0].peek("tok-node-purge-1") is None
        assert procs[1].get("tok-node-purge-1")["active"] and len(idp.calls) == 2


# -- one process, two caches on one node directory (what each process's level does) --

@pytest.fixture
def node_dir(tmp_path):
    node.set_directory(str(tmp_path / "node"))
    yield tmp_path / "node"
    node.set_directory(None)


POLICY = Policy(ttl=300, negative_ttl=5, stale_if_error=0, wait=2.0)


def answer(**claims):
    return lambda: Answer(dict({"active": True}, **claims), True)


def test_a_copy_in_one_process_is_not_served_once_another_drops_it(node_dir):
    mine, theirs = TokenCache(key_material=b"idp"), TokenCache(key_material=b"idp")
    key = mine.key("tok")
    mine.get(key, answer(sub="v1"), POLICY)
    assert theirs.peek(key, POLICY).claims["sub"] == "v1"   # now in their front LRU
    mine.drop([key])
    assert theirs.peek(key, POLICY) is None
    mine.get(key, answer(sub="v2"), POLICY)
    assert theirs.peek(key, POLICY).claims["sub"] == "v2"   # a rewrite is seen too


def test_caches_of_other_idps_share_nothing(node_dir):
    one, other = TokenCache(key_material=b"idp-1"), TokenCache(key_material=b"idp-2")
    key = one.key("tok")
    one.get(key, answer(sub="x"), POLICY)
    assert other.peek(key, POLICY) is None
    other._local.clear()
    assert one.peek(key, POLICY) is not None


def test_the_node_cache_is_bounded_by_entries_and_bytes(node_dir):
    level = nodecache.NodeLevel(str(node_dir), b"bounded", encode=Entry.encode,
                                decode=Entry.decode, evict_at=lambda e: e.evict_at,
                                map_size=4 * 1024 * 1024, max_entries=50)
    now = time.time()
    for i in range(500):
        level["%064x" % i] = Entry({"active": True, "n": i}, now, now + 300)
    assert len(level) <= 50
    assert level.get("%064x" % 499).claims["n"] == 499
    # Entries far larger than the map fits: evicted to make room, never an error.
    big = Entry({"active": True, "pad": "x" * 200_000}, now, now + 300)
    for i in range(100):
        level["%064x" % (1000 + i)] = big
    assert level.get("%064x" % 1099) is not None
    assert len(level) <= 50


def test_expired_entries_are_not_served(node_dir):
    clock = [1_000_000.0]
    cache = TokenCache(key_material=b"idp", clock=lambda: clock[0])
    key = cache.key("tok")
    cache.get(key, answer(), POLICY)
    clock[0] += 301
    assert cache.peek(key, POLICY) is None and cache._local.get(key) is None


def test_a_node_cache_that_cannot_open_falls_back_to_the_process(tmp_path, capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the node directory should be")
    nodecache._warned = False
    node._directory = str(blocked)   # what set_directory itself would refuse to create
    try:
        cache = TokenCache(key_material=b"k")
        assert cache._node is None
        key = cache.key("tok")
        assert cache.get(key, answer(), POLICY).active
        assert cache.peek(key, POLICY) is not None      # cached in the process
        err = capsys.readouterr().err
        assert "node cache unavailable" in err and "each process keeps its own" in err
    finally:
        node.set_directory(None)


def test_a_failure_is_not_cached(node_dir):
    cache = TokenCache(key_material=b"idp")
    key = cache.key("tok")

    def failing():
        raise IntrospectionError("idp down")
    with pytest.raises(IntrospectionError):
        cache.get(key, failing, POLICY)
    assert cache.get(key, answer(sub="ok"), POLICY).claims["sub"] == "ok"


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, int(sys.argv[2]), os.SEEK_SET)
print("held", flush=True)
time.sleep(60)
"""


def test_a_waiter_out_of_time_leaves_the_key_usable(node_dir):
    """Another process holds the key's lock; our wait ends at our deadline, and the
    next request for the key (once that process is gone) leads at once."""
    import subprocess
    import sys
    from kong_oauth2_introspection.concurrency import Deadline, DeadlineExceeded
    level = TokenCache(key_material=b"idp")._node
    key = "ab" * 32
    holder = subprocess.Popen([sys.executable, "-c", HOLD,
                               str(node_dir / "cache" / "flights.lock"), str(level.stripe(key))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DeadlineExceeded):
            level.flight(key, 5.0, Deadline(0.2))
        gave_up = level.flight(key, 0.1, None)      # the bound, not a deadline: ask alone
        assert not gave_up.held and gave_up.waited
        gave_up.release()
    finally:
        holder.kill()
        holder.wait()
    flight = level.flight(key, 0.5, None)
    try:
        assert flight.held and not flight.waited
    finally:
        flight.release()


def test_a_purge_by_claim_finds_entries_redis_never_got(node_dir):
    """A process whose Redis write failed holds the only copy, in the node cache:
    the purge message (by sub) heard by any process of the node removes it."""
    from kong_oauth2_introspection.cache.store import RedisStore
    store_conf = {"secret": STORE_SECRET, "redis": {"endpoints": ["127.0.0.1:1"],
                                                    "timeout_ms": 50}}
    writer = TokenCache(key_material=b"idp", store=RedisStore.from_config(store_conf, None))
    hearer = TokenCache(key_material=b"idp", store=RedisStore.from_config(store_conf, None))
    try:
        kept, doomed = writer.key("tok-kept"), writer.key("tok-doomed")
        writer.get(kept, answer(sub="other"), POLICY)
        writer.get(doomed, answer(sub="revoked"), POLICY)
        assert hearer.peek(doomed, POLICY) is not None
        hearer._on_message({"v": 1, "op": "purge", "by": "sub", "keys": [],
                            "ids": [hearer.store.tag("sub", "revoked")]})
        assert writer.peek(doomed, POLICY) is None and hearer.peek(doomed, POLICY) is None
        assert writer.peek(kept, POLICY) is not None
    finally:
        writer.store.close()
        hearer.store.close()


def test_old_flight_records_are_swept_with_the_entries(node_dir, monkeypatch):
    level = nodecache.NodeLevel(str(node_dir), b"records", encode=Entry.encode,
                                decode=Entry.decode, evict_at=lambda e: e.evict_at,
                                max_entries=10)
    for i in range(200):
        level.record("%064x" % i, "failed")
    monkeypatch.setattr(nodecache, "FLIGHT_RECORD_S", -1.0)   # every record is old now

    def records():
        with level.env.env.begin(db=level.env.flights) as txn:
            return txn.stat(level.env.flights)["entries"]
    now = time.time()
    for i in range(100):                                      # every write past the cap sweeps
        level["%064x" % (1000 + i)] = Entry({"active": True}, now, now + 300)
    assert records() < 200 and len(level) <= 10
    assert level.get("%064x" % 1099) is not None
