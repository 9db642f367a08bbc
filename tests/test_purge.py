"""``kong-oauth2-introspection purge``: answers dropped on every process within a
second, by token, sub, client_id or prefix; standalone, Sentinel and Cluster Redis.

Two processes run the plugin's cache (real Config, Introspector, RedisStore,
TokenCache) against one real Redis; the command runs as its own process."""

import json
import subprocess
import sys
import time

import pytest

from idp_double import IdPDouble, Reply
from redis_servers import (ACL_PASSWORD, ACL_USER, MASTER_SET, PASSWORD,  # noqa: F401
                           SENTINEL_PASSWORD, CacheNode, redis_cluster, redis_disposable,
                           redis_sentinel)
from test_plugin_kong import SECRET

STORE_SECRET = "fedcba9876543210fedcba9876543210"


def idp_by_token():
    """tok-<sub>-<client_id>-<n>: the claims are read from the token."""
    def behaviour(form, headers):
        _, sub, client, _n = form["token"].split("-")
        return Reply(200, {"active": True, "sub": sub, "client_id": client,
                           "exp": int(time.time()) + 3600})
    return IdPDouble(behaviour)


def plugin(idp, store):
    return {"introspection_url": idp.url, "authorization_value": SECRET, "ttl": 300,
            "store": store}


def run_purge(conf, *args, stdin=None):
    """The command users run: ``kong-oauth2-introspection purge --config JSON ...``."""
    from conftest import plugin_command
    return subprocess.run(plugin_command() + ["purge", "--config", json.dumps(conf), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def dropped_everywhere(nodes, token, within=1.0):
    """Seconds until no node holds ``token`` any more (fails past ``within``)."""
    start = time.monotonic()
    while any(n.peek(token) is not None for n in nodes):
        assert time.monotonic() - start < within, f"{token} still cached after {within} s"
        time.sleep(0.01)
    return time.monotonic() - start


def held_everywhere(nodes, token, within=2.0):
    start = time.monotonic()
    while any(n.peek(token) is None for n in nodes):
        assert time.monotonic() - start < within, f"{token} never reached every node"
        time.sleep(0.01)


@pytest.fixture
def two(request):
    started = []

    def start(conf):
        for _ in range(2):
            node = CacheNode(conf)
            started.append(node)
            node.wait_subscribed()
        return started[-2:]
    yield start
    for node in started:
        node.stop()
    for node in started:
        log = node.log()
        assert STORE_SECRET not in log and ACL_PASSWORD not in log and "tok-" not in log


def standalone_store(server, prefix="p:"):
    return {"key_prefix": prefix, "secret": STORE_SECRET,
            "redis": {"endpoints": [server.address], "username": ACL_USER,
                      "password": ACL_PASSWORD}}


def test_purge_by_sub_client_id_token_and_all(two, redis_disposable):
    raw = redis_disposable.client()
    raw.set("unrelated", "kept")
    with idp_by_token() as idp:
        conf = plugin(idp, standalone_store(redis_disposable))
        a, b = two(conf)
        tokens = ["tok-alice-app1-1", "tok-bob-app1-2", "tok-carol-app3-3", "tok-dave-app4-4"]
        for t in tokens:
            assert a.get(t)["active"]
        for t in tokens:
            held_everywhere([a, b], t)
        # The index does not show claims to whoever reads Redis.
        names = b" ".join(raw.keys("*"))
        for claim in (b"alice", b"bob", b"app1", b"carol"):
            assert claim not in names
        assert len(idp.calls) == 4

        out = run_purge(conf, "--sub", "alice")
        assert out.returncode == 0, out.stderr
        assert ": 1 cached entry removed from Redis" in out.stdout, out.stdout
        assert dropped_everywhere([a, b], tokens[0]) < 1.0
        assert all(n.peek(t) for n in (a, b) for t in tokens[1:])
        assert b.get(tokens[0])["active"] and len(idp.calls) == 5   # asked again

        out = run_purge(conf, "--client-id", "app1")
        assert out.returncode == 0, out.stderr
        dropped_everywhere([a, b], tokens[0])
        dropped_everywhere([a, b], tokens[1])
        assert all(n.peek(tokens[2]) for n in (a, b))

        out = run_purge(conf, "--token-stdin", stdin=tokens[2] + "\n")
        assert out.returncode == 0, out.stderr
        assert tokens[2] not in out.stdout + out.stderr
        dropped_everywhere([a, b], tokens[2])
        assert all(n.peek(tokens[3]) for n in (a, b))

        out = run_purge(conf, "--all")
        assert out.returncode == 0, out.stderr
        dropped_everywhere([a, b], tokens[3])
        # Left: the unrelated key, and the tombstones, folded into one watermark.
        assert sorted(raw.keys("*")) == [b"p:oauth2-introspection:tombstones", b"unrelated"]
        assert raw.zcard("p:oauth2-introspection:tombstones") == 1
        assert b.get(tokens[3])["active"] and len(idp.calls) == 6


def test_purge_reaches_a_process_that_never_asked(two, redis_disposable):
    """B got the answer pushed by A; a purge by token drops it there too."""
    with idp_by_token() as idp:
        conf = plugin(idp, standalone_store(redis_disposable, prefix=""))
        a, b = two(conf)
        assert a.get("tok-erin-app9-1")["active"]
        held_everywhere([a, b], "tok-erin-app9-1")
        assert run_purge(conf, "--token", "tok-erin-app9-1").returncode == 0
        dropped_everywhere([a, b], "tok-erin-app9-1")
        assert b.get("tok-erin-app9-1")["active"] and len(idp.calls) == 2


def test_purge_with_a_declarative_config(two, redis_disposable, tmp_path):
    import yaml
    from conftest import plugin_command
    with idp_by_token() as idp:
        conf = plugin(idp, standalone_store(redis_disposable, prefix="ky:"))
        a, b = two(conf)
        assert a.get("tok-ivy-app2-1")["active"] and a.get("tok-jack-app2-2")["active"]
        held_everywhere([a, b], "tok-jack-app2-2")
        kong_yml = tmp_path / "kong.yml"
        kong_yml.write_text(yaml.safe_dump({"_format_version": "3.0", "services": [{
            "name": "s", "url": "http://upstream", "routes": [{
                "name": "r", "paths": ["/"],
                "plugins": [{"name": "oauth2-introspection", "config": conf}]}]}]}))
        out = subprocess.run(plugin_command() + ["purge", "--kong-yml", str(kong_yml),
                                                 "--sub", "ivy"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        dropped_everywhere([a, b], "tok-ivy-app2-1")
        assert all(n.peek("tok-jack-app2-2") for n in (a, b))


def test_usage_errors_and_no_store():
    assert run_purge({"introspection_url": "http://x/i", "authorization_value": "v"},
                     "--all").returncode == 1
    out = subprocess.run([sys.executable, "-m", "kong_oauth2_introspection.ops.purge", "--all"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert run_purge({"introspection_url": "http://x/i", "authorization_value": "v"},
                     "--sub", "a", "--all").returncode == 2
    vaulted = run_purge({"introspection_url": "http://x/i",
                         "authorization_value": "{vault://env/idp-auth}",
                         "store": {"redis": {"endpoints": ["127.0.0.1:1"]}}}, "--all")
    assert vaulted.returncode == 2 and "vault" in vaulted.stderr


def test_purge_with_sentinel(two, redis_sentinel):
    store = {"key_prefix": "ps:", "secret": STORE_SECRET, "redis": {
        "endpoints": redis_sentinel.endpoints, "password": PASSWORD,
        "sentinel": {"master_set": MASTER_SET, "password": SENTINEL_PASSWORD}}}
    with idp_by_token() as idp:
        conf = plugin(idp, store)
        a, b = two(conf)
        assert a.get("tok-frank-app5-1")["active"]
        held_everywhere([a, b], "tok-frank-app5-1")
        assert run_purge(conf, "--client-id", "app5").returncode == 0
        dropped_everywhere([a, b], "tok-frank-app5-1")


def test_purge_with_cluster(two, redis_cluster):
    store = {"key_prefix": "pc:", "secret": STORE_SECRET,
             "redis": {"endpoints": redis_cluster.endpoints, "password": PASSWORD,
                       "cluster": True}}
    with idp_by_token() as idp:
        conf = plugin(idp, store)
        a, b = two(conf)
        tokens = [f"tok-gina-app{i}-{i}" for i in range(6)]
        for t in tokens:
            assert a.get(t)["active"]
        for t in tokens:
            held_everywhere([a, b], t)
        assert run_purge(conf, "--sub", "gina").returncode == 0
        for t in tokens:
            dropped_everywhere([a, b], t)
        assert a.get(tokens[0])["active"]
        assert run_purge(conf, "--all").returncode == 0
        dropped_everywhere([a, b], tokens[0])
        left = [k for n in redis_cluster.nodes for k in n.client().keys("pc:*")]
        assert left == [b"pc:oauth2-introspection:tombstones"]


# -- through the Kong stand-in: two real plugin-server processes -----------------------

@pytest.fixture(scope="module")
def two_servers():
    from conftest import plugin_command
    from kong_standin import KongStandIn
    with KongStandIn(plugin_command()) as a, KongStandIn(plugin_command()) as b:
        yield a, b


def test_revoked_token_refused_on_both_plugin_servers_after_a_purge(two_servers,
                                                                     redis_disposable):
    from test_plugin_kong import bearer, config
    a, b = two_servers
    revoked = set()

    def behaviour(form, headers):
        if form["token"] in revoked:
            return Reply(200, {"active": False})
        return Reply(200, {"active": True, "sub": "henry", "client_id": "app7",
                           "exp": int(time.time()) + 3600})
    with IdPDouble(behaviour) as idp:
        conf = config(idp, store=standalone_store(redis_disposable, prefix="ks:"), ttl=300)
        ia, ib = a.configure(conf), b.configure(conf)
        token = "tok-henry-app7-1"
        assert a.request(ia, "GET", "/", headers=bearer(token)).status == 200
        assert b.request(ib, "GET", "/", headers=bearer(token)).status == 200
        assert len(idp.calls) == 1
        revoked.add(token)
        # Still cached everywhere: the revocation is not noticed before ttl...
        assert b.request(ib, "GET", "/", headers=bearer(token)).status == 200
        out = run_purge(conf, "--token-stdin", stdin=token + "\n")
        assert out.returncode == 0, out.stderr
        # ...until the purge, which both servers obey within a second.
        start = time.monotonic()
        statuses = set()
        while time.monotonic() - start < 1.0:
            statuses = {a.request(ia, "GET", "/", headers=bearer(token)).status,
                        b.request(ib, "GET", "/", headers=bearer(token)).status}
            if statuses == {401}:
                break
            time.sleep(0.02)
        assert statuses == {401}
        assert token not in a.server_log() + b.server_log()


def test_no_store_and_failure_races_on_two_plugin_servers(two_servers, redis_disposable):
    import threading
    from test_plugin_kong import bearer, config
    a, b = two_servers
    mode = {"reply": Reply(200, {"active": True}, {"Cache-Control": "no-store"}, delay=0.6)}
    with IdPDouble(lambda f, h: mode["reply"]) as idp:
        conf = config(idp, store=standalone_store(redis_disposable, prefix="kr:"))
        ia, ib = a.configure(conf), b.configure(conf)

        def race(token):
            results = {}
            first = threading.Thread(target=lambda: results.__setitem__(
                "a", a.request(ia, "GET", "/", headers=bearer(token))))
            first.start()
            time.sleep(0.2)
            start = time.monotonic()
            results["b"] = b.request(ib, "GET", "/", headers=bearer(token))
            results["b_s"] = time.monotonic() - start
            first.join()
            return results
        r = race("tok-nostore-1")
        assert r["a"].status == 200 and r["b"].status == 200
        assert len(idp.calls) == 2 and r["b_s"] < 1.6       # woken, then asked itself
        mode["reply"] = Reply(503, delay=0.6)
        before = len(idp.calls)
        r = race("tok-failing-1")
        assert r["a"].status == 500 and r["b"].status == 500   # the same answer A got
        assert r["b"].kong_error is None and r["b_s"] < 1.0
        assert len(idp.calls) - before == 1


# -- issue 19.5: index sets hold the live entries only ------------------------------

def test_index_sets_shrink_as_their_entries_expire(redis_disposable):
    """Ten tokens of one client a round, each cached for 1 s (ttl scaled down from
    minutes): after six rounds the client's index holds the last round's ten, not
    sixty, lives no longer than they do, and a purge by client_id touches those ten."""
    raw = redis_disposable.client()
    with idp_by_token() as idp:
        conf = dict(plugin(idp, standalone_store(redis_disposable, prefix="ix:")), ttl=1)
        node = CacheNode(conf)
        try:
            node.wait_subscribed()
            sizes = []
            for round_ in range(6):
                for n in range(10):
                    assert node.get("tok-ivy-app9-%d%d" % (round_, n))["active"]
                (index,) = [k for k in raw.keys("ix:oauth2-introspection:idx:client_id:*")]
                sizes.append(raw.zcard(index))
                assert raw.pttl(index) <= 1000
                time.sleep(1.1)
            assert sizes == [10] * 6, sizes
            for n in range(10):   # one more round, live when purged
                assert node.get("tok-ivy-app9-9%d" % n)["active"]
            entries = [k for k in raw.keys("ix:*") if b"oauth2-introspection" not in k]
            assert len(entries) == 10
            # in this process: the command's own start would outlast the 1 s entries
            from kong_oauth2_introspection.ops.log import Log
            from kong_oauth2_introspection.ops.purge import purge
            from kong_oauth2_introspection.cache.store import RedisStore
            store = RedisStore.from_config(conf["store"], Log())
            try:
                message, removed = purge(store, None, client_id="app9")
            finally:
                store.close()
            assert removed == 10 and len(message["keys"]) == 10
            # left: the sub index, whose members now point at nothing and expire with
            # it, and the purge's tombstone
            assert [k for k in raw.keys("ix:*") if b":idx:sub:" not in k] == [
                b"ix:oauth2-introspection:tombstones"]
            # purging what is not cached says so: 0 is an answer
            out = run_purge(conf, "--client-id", "app9")
            assert out.returncode == 0 and "0 cached entries removed" in out.stdout, out.stdout
            out = run_purge(conf, "--token-stdin", stdin="tok-never-cached-1\n")
            assert out.returncode == 0 and "0 cached entries removed" in out.stdout, out.stdout
        finally:
            node.stop()


def test_an_index_left_by_an_older_version_is_converted(redis_disposable):
    from kong_oauth2_introspection.cache.store import INDEX, RedisStore
    from kong_oauth2_introspection.ops.log import Log
    store = RedisStore.from_config(standalone_store(redis_disposable, prefix="ox:"), Log())
    raw = redis_disposable.client()
    try:
        name = "ox:" + INDEX + "sub:" + store.tag("sub", "olga")
        raw.sadd(name, "old-key")
        raw.pexpire(name, 60000)
        store.index("new-key", [("sub", "olga")], 30)
        assert raw.type(name) == b"zset" and raw.zcard(name) == 2
        assert 29000 < raw.pttl(name) <= 60000
        assert store.purge_tag("sub", "olga")[1] == ["new-key", "old-key"]
    finally:
        store.close()


# -- issue 19.3: a purge is final; replaying recorded values or messages restores nothing --

class Recorder:
    """Whoever can write to Redis: records the entries and announcements of a
    prefix, and sets and publishes them again after a purge."""

    def __init__(self, client, prefix, listen_client=None, messages=True):
        self.client, self.prefix, self.want_messages = client, prefix, messages
        self.pubsub = (listen_client or client).pubsub()
        self.pubsub.subscribe(prefix + "oauth2-introspection")
        deadline = time.monotonic() + 5
        while (self.pubsub.get_message(timeout=0.5) or {}).get("type") != "subscribe":
            assert time.monotonic() < deadline, "the recorder never subscribed"
        self.values, self.messages = {}, []

    def record(self, nodes):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "message" and b'"op":"done"' in msg["data"]:
                self.messages.append(msg["data"])
            elif msg is None and self.messages:
                break
        for node in nodes:
            for name in node.keys(self.prefix + "*"):
                if len(name) == len(self.prefix) + 64:      # an entry (cache key)
                    self.values[name] = node.get(name)
        assert self.values and (self.messages or not self.want_messages), "nothing recorded"

    def replay(self):
        for name, value in self.values.items():
            self.client.set(name, value, px=300000)
        for data in self.messages:
            self.client.publish(self.prefix + "oauth2-introspection", data)

    def close(self):
        self.pubsub.close()


def revocable_idp(revoked):
    def behaviour(form, headers):
        if form["token"] in revoked:
            return Reply(200, {"active": False})
        _, sub, client, _n = form["token"].split("-")
        return Reply(200, {"active": True, "sub": sub, "client_id": client,
                           "exp": int(time.time()) + 3600})
    return IdPDouble(behaviour)


def _replay_refused(two, conf, recorder, raw_nodes, token, purge_args, idp, revoked):
    """Cache, record, revoke, purge, replay: no node (up, or started afterwards)
    serves the revoked token, and each asks the IdP again."""
    a, b = two(conf)
    assert a.get(token)["active"]
    held_everywhere([a, b], token)
    recorder.record(raw_nodes)
    revoked.add(token)
    out = run_purge(conf, *purge_args, stdin=token + "\n")
    assert out.returncode == 0, out.stderr
    dropped_everywhere([a, b], token)
    recorder.replay()
    time.sleep(0.3)                               # the replayed announcement arrives
    assert a.peek(token) is None and b.peek(token) is None
    before = len(idp.calls)
    assert a.get(token)["active"] is False and b.get(token)["active"] is False
    assert len(idp.calls) > before
    recorder.replay()                             # and once more, for a node that was down
    late = CacheNode(conf)
    try:
        late.wait_subscribed()
        before = len(idp.calls)
        assert late.get(token)["active"] is False and len(idp.calls) == before + 1
    finally:
        late.stop()


@pytest.mark.parametrize("by", ["--token-stdin", "--sub", "--client-id", "--all"])
def test_replayed_values_and_announcements_after_a_purge_restore_nothing(two, redis_disposable,
                                                                         by):
    revoked: set = set()
    token = "tok-mallory-appx-1"
    args = {"--token-stdin": ["--token-stdin"], "--sub": ["--sub", "mallory"],
            "--client-id": ["--client-id", "appx"], "--all": ["--all"]}[by]
    with revocable_idp(revoked) as idp:
        conf = dict(plugin(idp, standalone_store(redis_disposable, prefix="rp:")),
                    negative_ttl=0)
        raw = redis_disposable.client()
        recorder = Recorder(raw, "rp:")
        try:
            _replay_refused(two, conf, recorder, [raw], token, args, idp, revoked)
        finally:
            recorder.close()


def test_replay_refused_with_sentinel(two, redis_sentinel):
    revoked: set = set()
    store = {"key_prefix": "rs:", "secret": STORE_SECRET, "redis": {
        "endpoints": redis_sentinel.endpoints, "password": PASSWORD,
        "sentinel": {"master_set": MASTER_SET, "password": SENTINEL_PASSWORD}}}
    with revocable_idp(revoked) as idp:
        conf = dict(plugin(idp, store), negative_ttl=0)
        master = redis_sentinel.server_on(redis_sentinel.master_port()).client()
        recorder = Recorder(master, "rs:")
        try:
            _replay_refused(two, conf, recorder, [master], "tok-sybil-apps-1",
                            ["--token-stdin"], idp, revoked)
        finally:
            recorder.close()


def test_replay_refused_with_cluster(two, redis_cluster):
    import redis
    revoked: set = set()
    store = {"key_prefix": "rc:", "secret": STORE_SECRET,
             "redis": {"endpoints": redis_cluster.endpoints, "password": PASSWORD,
                       "cluster": True}}
    host, port = redis_cluster.endpoints[0].rsplit(":", 1)
    writer = redis.RedisCluster(host=host, port=int(port), password=PASSWORD)
    with revocable_idp(revoked) as idp:
        conf = dict(plugin(idp, store), negative_ttl=0)
        # The recorder hears no announcement on a Cluster node here: values only.
        recorder = Recorder(writer, "rc:", listen_client=redis_cluster.nodes[0].client(),
                            messages=False)
        try:
            _replay_refused(two, conf, recorder, [n.client() for n in redis_cluster.nodes],
                            "tok-trent-appc-1", ["--sub", "trent"], idp, revoked)
        finally:
            recorder.close()
            writer.close()


def test_tombstones_are_bounded_and_folding_keeps_a_purge_final(redis_disposable, monkeypatch):
    """1,000 purges by token leave 1,000 sealed tombstones (no token, no key in
    clear beyond the HMAC cache key); past the bound, or once expired, the oldest
    fold into one watermark that still refuses every value fetched before them."""
    from kong_oauth2_introspection.cache import tombstones
    from kong_oauth2_introspection.cache.tokens import TokenCache
    from kong_oauth2_introspection.ops.log import Log
    from kong_oauth2_introspection.ops.purge import purge
    from kong_oauth2_introspection.cache.store import TOMBSTONES, RedisStore
    conf = standalone_store(redis_disposable, prefix="tb:")
    raw = redis_disposable.client()
    name = "tb:" + TOMBSTONES
    store = RedisStore.from_config(conf, Log())
    try:
        fetched_before = time.time() - 10         # an answer from before every purge
        keys = [TokenCache(key_material=b"idp").key("tok-n-%d" % i) for i in range(1000)]
        for i in range(1000):
            purge(store, "idp", token="tok-n-%d" % i, lifetime=300)
        count, size = raw.zcard(name), raw.memory_usage(name)
        print("after 1000 purges: %d tombstones, %d bytes in Redis" % (count, size))
        assert count == 1000 and size < 300 * 1000    # measured: 244,224 bytes
        assert not any(k.encode() in m for m in raw.zrange(name, 0, -1) for k in keys[:5])

        monkeypatch.setattr(tombstones, "MAX_TOMBSTONES", 100)
        purge(store, "idp", token="tok-n-1000", lifetime=300)
        assert raw.zcard(name) == 101              # 100 newest + the watermark
        monkeypatch.setattr(tombstones, "MAX_TOMBSTONES", 10000)
        purge(store, "idp", token="tok-short", lifetime=1)
        time.sleep(1.2)
        purge(store, "idp", sub="someone", lifetime=1)
        # the expired one folded into the watermark, which now covers every older one
        assert raw.zcard(name) == 2

        # A process started now (it saw none of this) refuses a value of the first,
        # folded, purge and of the expired one, but not a fresh value.
        fresh = RedisStore.from_config(conf, Log())
        try:
            assert fresh.refused(keys[0], {"active": True}, fetched_before)
            short = TokenCache(key_material=b"idp").key("tok-short")
            assert fresh.refused(short, {"active": True}, fetched_before)
            assert fresh.refused(keys[999], {"active": True}, fetched_before)
            assert not fresh.refused(keys[999], {"active": True},
                                     time.time() + tombstones.SKEW + 1)
            assert fresh.tombstones.size() == 2
        finally:
            fresh.close()
    finally:
        store.close()


def test_replay_after_a_purge_through_two_plugin_servers(two_servers, redis_disposable):
    """Kong's protocol, real plugin servers: after the purge, the recorded value set
    again and the recorded announcement published again leave both servers, and
    a third started afterwards, answering 401 for the revoked token."""
    from conftest import plugin_command
    from kong_standin import KongStandIn
    from test_plugin_kong import bearer, config
    a, b = two_servers
    revoked: set = set()
    token = "tok-oscar-appk-1"
    with revocable_idp(revoked) as idp:
        conf = config(idp, store=standalone_store(redis_disposable, prefix="kp:"), ttl=300,
                      negative_ttl=0)
        raw = redis_disposable.client()
        recorder = Recorder(raw, "kp:")
        try:
            ia, ib = a.configure(conf), b.configure(conf)
            assert a.request(ia, "GET", "/", headers=bearer(token)).status == 200
            recorder.record([raw])
            assert b.request(ib, "GET", "/", headers=bearer(token)).status == 200
            assert len(idp.calls) == 1
            revoked.add(token)
            out = run_purge(conf, "--token-stdin", stdin=token + "\n")
            assert out.returncode == 0, out.stderr
            recorder.replay()
            time.sleep(0.3)
            before = len(idp.calls)
            for _ in range(3):
                assert a.request(ia, "GET", "/", headers=bearer(token)).status == 401
                assert b.request(ib, "GET", "/", headers=bearer(token)).status == 401
            assert len(idp.calls) - before == 6        # each asked the IdP: no replay served
            recorder.replay()
            with KongStandIn(plugin_command()) as late:
                il = late.configure(conf)
                assert late.request(il, "GET", "/", headers=bearer(token)).status == 401
                assert token not in late.server_log()
        finally:
            recorder.close()
    assert token not in a.server_log() + b.server_log()


def test_a_lagging_node_republishing_a_pre_purge_answer_is_refused(two, redis_disposable):
    """Node A's IdP call was sent before the purge and answers after it: A uses the
    answer for that request only; node B never serves it, from Redis or A's message."""
    from kong_oauth2_introspection.ops.log import Log
    from kong_oauth2_introspection.ops.purge import purge
    from kong_oauth2_introspection.cache.store import RedisStore
    revoked: set = set()
    slow = {"tok-lag-appl-1": 1.5}

    def behaviour(form, headers):
        token = form["token"]
        if token in revoked and token not in slow:
            return Reply(200, {"active": False})
        return Reply(200, {"active": True, "sub": "lag", "client_id": "appl",
                           "exp": int(time.time()) + 3600}, delay=slow.pop(token, 0.0))
    with IdPDouble(behaviour) as idp:
        conf = dict(plugin(idp, standalone_store(redis_disposable, prefix="lg:")),
                    negative_ttl=0)
        a, b = two(conf)
        token = "tok-lag-appl-1"
        pending = a.submit("get", token=token)
        time.sleep(0.5)                           # A's request is at the IdP
        revoked.add(token)
        store = RedisStore.from_config(conf["store"], Log())
        try:
            purge(store, None, sub="lag")
        finally:
            store.close()
        assert pending.result(10)["active"]       # the request already in flight
        time.sleep(0.3)
        assert a.peek(token) is None and b.peek(token) is None
        before = len(idp.calls)
        assert b.get(token)["active"] is False and a.get(token)["active"] is False
        assert len(idp.calls) - before == 2


def test_a_node_that_hears_no_announcement_learns_the_purge_on_its_next_read(two,
                                                                           redis_disposable):
    """A process whose Redis user may not use channels hears no purge; reading the
    replayed value from Redis, it looks at the tombstones first and refuses it."""
    admin = redis_disposable.client()
    admin.acl_setuser("deaf", enabled=True, passwords=["+deaf-pw"], keys=["*"],
                      commands=["+@all"], reset_channels=True)
    revoked: set = set()
    token = "tok-dora-appd-1"
    with revocable_idp(revoked) as idp:
        conf = dict(plugin(idp, standalone_store(redis_disposable, prefix="dn:")),
                    negative_ttl=0)
        deaf_conf = dict(conf, store=dict(conf["store"], redis=dict(
            conf["store"]["redis"], username="deaf", password="deaf-pw")))
        recorder = Recorder(admin, "dn:")
        deaf = CacheNode(deaf_conf)
        try:
            a, _b = two(conf)
            assert a.get(token)["active"]
            recorder.record([admin])
            revoked.add(token)
            assert run_purge(conf, "--token-stdin", stdin=token + "\n").returncode == 0
            recorder.replay()
            assert deaf.call("status")["subscribed"] is False
            before = len(idp.calls)
            assert deaf.get(token)["active"] is False and len(idp.calls) == before + 1
        finally:
            recorder.close()
            deaf.stop()
        assert "deaf-pw" not in deaf.log() and token not in deaf.log()
