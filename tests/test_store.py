"""The shared token store (RedisStore) against real Redis servers: standalone with
password and ACL user, Sentinel with failover, Cluster, TLS, and a Redis that
dies, stalls and comes back."""

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from certs import make_ca_and_certs
from kong_oauth2_introspection.cache.sealing import NONCE_SIZE, Sealer
from kong_oauth2_introspection.cache.store import RedisStore
from redis_servers import (ACL_PASSWORD, ACL_USER, MASTER_SET, PASSWORD,  # noqa: F401
                           SENTINEL_PASSWORD, free_port, redis_cluster, redis_cluster_tls,
                           redis_disposable, redis_sentinel, redis_standalone, redis_tls,
                           tls_certs)

SECRET = "0123456789abcdef0123456789abcdef"   # 32 bytes
TOKEN = "eyJhbGciOiJSUzI1NiJ9.secret-token-value-4f1e"


class RecordingLog:
    def __init__(self):
        self.lines = []
        self._lock = threading.Lock()

    def _add(self, level, msg):
        assert isinstance(msg, str)
        with self._lock:
            self.lines.append((level, msg))

    def warn(self, msg):
        self._add("warn", msg)

    def err(self, msg):
        self._add("err", msg)

    def info(self, msg):
        self._add("info", msg)

    def problems(self):
        return [m for lvl, m in self.lines if lvl != "info"]

    def text(self):
        return "\n".join(m for _, m in self.lines)


def conf(endpoints, *, key_prefix="", secret=None, username=None, password=None,
         database=0, cluster=False, timeout_ms=500, tls=None, sentinel=None):
    """A ``store`` record shaped exactly like the schema's, unset fields None."""
    tls_rec = {"enabled": False, "ca": None, "cert": None, "key": None,
               "insecure_skip_verify": False}
    tls_rec.update(tls or {})
    sentinel_rec = {"master_set": None, "username": None, "password": None}
    sentinel_rec.update(sentinel or {})
    return {"key_prefix": key_prefix, "secret": secret,
            "redis": {"endpoints": list(endpoints), "username": username,
                      "password": password, "database": database, "cluster": cluster,
                      "timeout_ms": timeout_ms, "tls": tls_rec, "sentinel": sentinel_rec}}


def make(store_conf, log=None):
    log = log or RecordingLog()
    store = RedisStore.from_config(store_conf, log)
    assert store is not None, log.lines
    return store, log


def unique(name):
    return f"{name}-{os.urandom(6).hex()}"


# -- Sealer and configuration ------------------------------------------------------------

def test_sealer_round_trip_and_refusals():
    sealer = Sealer(SECRET)
    blob = sealer.seal(b"claims", b"key-a")
    assert len(blob) == NONCE_SIZE + len(b"claims") + 16
    assert sealer.seal(b"claims", b"key-a") != blob          # fresh nonce each time
    assert sealer.open(blob, b"key-a") == b"claims"
    assert sealer.open(blob, b"key-b") is None                # bound to its key
    assert Sealer("x" * 16).open(blob, b"key-a") is None      # wrong key
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    assert sealer.open(bytes(tampered), b"key-a") is None
    assert sealer.open(b"short", b"key-a") is None
    for size in (16, 24, 32):
        assert Sealer("k" * size).open(Sealer("k" * size).seal(b"v", b""), b"") == b"v"
    with pytest.raises(ValueError):
        Sealer("too short")


def test_no_endpoints_means_no_store():
    log = RecordingLog()
    assert RedisStore.from_config(None, log) is None
    assert RedisStore.from_config({"redis": None}, log) is None
    assert RedisStore.from_config(conf([]), log) is None
    assert RedisStore.from_config(conf([None]), log) is None
    assert log.problems() == []


def test_bad_secret_or_endpoint_disables_the_store_with_an_error():
    log = RecordingLog()
    assert RedisStore.from_config(conf(["127.0.0.1:1"], secret="not 16 bytes"), log) is None
    assert RedisStore.from_config(conf(["no-port"]), log) is None
    assert len([1 for lvl, _ in log.lines if lvl == "err"]) == 2
    assert "not 16 bytes" not in log.text()


# -- standalone -------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["acl-user", "default-user"])
def test_round_trip(redis_standalone, who):
    creds = ({"username": ACL_USER, "password": ACL_PASSWORD} if who == "acl-user"
             else {"password": PASSWORD})
    store, log = make(conf([redis_standalone.address], **creds))
    try:
        key = unique("rt")
        assert store.get(key) is None
        store.set(key, b'{"active":true}', 30)
        assert store.get(key) == b'{"active":true}'
        assert log.problems() == []
        assert redis_standalone.client().get(key) == b'{"active":true}'  # no secret: plaintext
    finally:
        store.close()


def test_wrong_password_is_a_quiet_miss(redis_standalone):
    wrong = "wrong-password-a81c"
    store, log = make(conf([redis_standalone.address], username=ACL_USER, password=wrong,
                           secret=SECRET))
    try:
        start = time.monotonic()
        assert store.get("k") is None
        store.set("k", b"v", 10)
        assert store.lease("k", 1000) is True    # cannot coordinate: the caller goes ahead
        store.release("k")
        store._backoff.until = 0                 # end the backoff: fail once more, not logged
        assert store.get("k") is None
        assert time.monotonic() - start < 2
        problems = log.problems()
        assert len(problems) == 1, problems
        assert "AuthenticationError" in problems[0] or "WRONGPASS" in problems[0]
        for secret in (wrong, SECRET, ACL_PASSWORD, PASSWORD):
            assert secret not in log.text()
    finally:
        store.close()


def test_values_are_encrypted_at_rest(redis_standalone):
    store, log = make(conf([redis_standalone.address], password=PASSWORD, secret=SECRET,
                           key_prefix="kong:"))
    raw = redis_standalone.client()
    try:
        key = unique("enc")
        value = json.dumps({"active": True, "token": TOKEN, "sub": "alice"}).encode()
        store.set(key, value, 30)
        assert store.get(key) == value
        blob = raw.get("kong:" + key)
        assert blob is not None and raw.get(key) is None           # the prefix is applied
        assert TOKEN.encode() not in blob and b"alice" not in blob and b"active" not in blob
        assert len(blob) == NONCE_SIZE + len(value) + 16
        assert Sealer("another-key-0123").open(blob, ("kong:" + key).encode()) is None
        assert Sealer(SECRET).open(blob, ("kong:" + key).encode()) == value
        # Bound to its key: copied under another key it does not open.
        other = unique("enc-copy")
        raw.set("kong:" + other, blob, px=30000)
        assert store.get(other) is None
        # Tampered: a miss. Plaintext left by a store without secret: a miss too.
        raw.set("kong:" + key, blob[:-1] + bytes([blob[-1] ^ 1]), px=30000)
        assert store.get(key) is None
        raw.set("kong:" + key, value, px=30000)
        assert store.get(key) is None
        # Another node with another secret reads nothing.
        store.set(key, value, 30)
        other_store, _ = make(conf([redis_standalone.address], password=PASSWORD,
                                   secret="ffffffffffffffff", key_prefix="kong:"))
        assert other_store.get(key) is None
        other_store.close()
        assert log.problems() == []
    finally:
        store.close()


def test_ttls_are_applied(redis_standalone):
    store, _ = make(conf([redis_standalone.address], password=PASSWORD, key_prefix="t:"))
    raw = redis_standalone.client()
    try:
        key = unique("ttl")
        store.set(key, b"v", 30)
        assert 29000 <= raw.pttl("t:" + key) <= 30000
        store.set(key, b"v", 2.5)
        assert 2000 <= raw.pttl("t:" + key) <= 2500
        store.set(key, b"v", 1e12)                    # capped, not an error
        assert 0 < raw.pttl("t:" + key) <= 366 * 86400 * 1000
        store.set(key, b"v", 0)                       # at least 1 ms: gone right away
        time.sleep(0.01)
        assert raw.exists("t:" + key) == 0
        assert store.lease(key, 5000) is True
        assert 4000 <= raw.pttl("t:" + key + ":lease") <= 5000
        store.release(key)
        assert raw.exists("t:" + key + ":lease") == 0
    finally:
        store.close()


def test_lease_one_winner_among_threads(redis_standalone):
    store, log = make(conf([redis_standalone.address], username=ACL_USER,
                           password=ACL_PASSWORD))
    try:
        key = unique("lease")
        barrier = threading.Barrier(20)
        results = []

        def race():
            barrier.wait()
            results.append(store.lease(key, 5000))
        threads = [threading.Thread(target=race) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 19 + [True]
        assert store.lease(key, 5000) is False
        store.release(key)
        assert store.lease(key, 5000) is True
        store.release(key)
        assert log.problems() == []
    finally:
        store.close()


def test_release_deletes_only_our_own_lease(redis_standalone):
    a, _ = make(conf([redis_standalone.address], password=PASSWORD))
    b, _ = make(conf([redis_standalone.address], password=PASSWORD))
    try:
        key = unique("own")
        b.release(key)                      # never leased: nothing happens
        assert a.lease(key, 50) is True
        time.sleep(0.1)                     # a's lease expires ...
        assert b.lease(key, 5000) is True   # ... b takes it
        a.release(key)                      # a must not delete b's lease
        assert redis_standalone.client().exists(key + ":lease") == 1
        assert a.lease(key, 5000) is False
        b.release(key)
        assert a.lease(key, 5000) is True
        a.release(key)
    finally:
        a.close()
        b.close()


_RACER = r"""
import json, sys, threading
from kong_oauth2_introspection.cache.store import RedisStore
class Log:
    def warn(self, m): print("LOG", m, file=sys.stderr)
    err = info = warn
store = RedisStore.from_config(json.loads(sys.argv[1]), Log())
store.get("warm-up")                       # connected before the race
barrier = threading.Barrier(5)
wins = []
def race():
    barrier.wait()
    wins.append(store.lease(sys.argv[2], 10000))
print("ready", flush=True)
sys.stdin.readline()
threads = [threading.Thread(target=race) for _ in range(5)]
[t.start() for t in threads]
[t.join() for t in threads]
print(sum(wins), flush=True)
"""


def test_lease_one_winner_among_processes(redis_standalone):
    store_conf = json.dumps(conf([redis_standalone.address], password=PASSWORD))
    key = unique("plock")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, store_conf, key],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        wins = [int(p.stdout.readline()) for p in procs]
        assert sum(wins) == 1, wins           # 4 processes x 5 threads, one winner
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_database_is_used(redis_standalone):
    store, _ = make(conf([redis_standalone.address], password=PASSWORD, database=5))
    try:
        key = unique("db")
        store.set(key, b"v", 30)
        assert redis_standalone.client(db=5).get(key) == b"v"
        assert redis_standalone.client(db=0).get(key) is None
    finally:
        store.close()


def test_threads_share_one_store(redis_standalone):
    store, log = make(conf([redis_standalone.address], password=PASSWORD, secret=SECRET))
    errors = []

    def work(n):
        try:
            for i in range(50):
                k = f"th-{n}-{i}"
                store.set(k, f"{n}:{i}".encode(), 30)
                assert store.get(k) == f"{n}:{i}".encode()
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and log.problems() == []
    finally:
        store.close()


def test_closed_store_is_inert(redis_standalone):
    store, log = make(conf([redis_standalone.address], password=PASSWORD))
    store.set("c", b"v", 10)
    store.close()
    assert store.get("c") is None
    store.set("c", b"v", 10)
    store.release("c")
    store.close()
    assert log.problems() == []


# -- a Redis that dies, stalls and comes back ------------------------------------------------

def test_unreachable_at_start_costs_nothing():
    port = free_port()  # nothing listens there
    store, log = make(conf([f"127.0.0.1:{port}"], timeout_ms=200))
    try:
        start = time.monotonic()
        assert store.get("k") is None
        first = time.monotonic() - start
        start = time.monotonic()
        for _ in range(1000):
            assert store.get("k") is None
            store.set("k", b"v", 1)
        assert first < 1.0
        assert time.monotonic() - start < 0.1          # 2000 calls skipped during backoff
        assert len(log.problems()) == 1
    finally:
        store.close()


def test_unreachable_cluster_at_start_is_a_miss():
    store, log = make(conf([f"127.0.0.1:{free_port()}"], cluster=True, timeout_ms=200))
    try:
        assert store.get("k") is None
        assert store.lease("k", 100) is True
        assert len(log.problems()) == 1
    finally:
        store.close()


def test_killed_then_restarted_redis(redis_disposable):
    server = redis_disposable
    store, log = make(conf([server.address], password=PASSWORD, timeout_ms=300,
                           secret=SECRET))
    try:
        store.set("k", b"v", 60)
        assert store.get("k") == b"v"
        server.kill()
        start = time.monotonic()
        assert store.get("k") is None                  # the failing call
        first = time.monotonic() - start
        durations = []
        for _ in range(200):
            t0 = time.perf_counter()
            assert store.get("k") is None
            store.set("k", b"v", 60)
            assert store.lease("k", 100) is True
            durations.append(time.perf_counter() - t0)
        assert first < 1.0, first
        assert max(durations) < 0.005, max(durations)  # three calls, skipped
        assert len(log.problems()) == 1

        server.start()                                 # same port, empty
        deadline = time.monotonic() + 5
        while True:
            store.set("k2", b"back", 60)
            if store.get("k2") == b"back":
                break
            assert time.monotonic() < deadline, "store did not come back"
            time.sleep(0.05)
        recovered = time.monotonic() - start
        assert recovered < 3.5, recovered              # first backoff window is 1 s
        assert any("answers again" in m for _, m in log.lines)
        assert PASSWORD not in log.text()
    finally:
        store.close()


def test_slow_redis_is_bounded_by_timeout(redis_disposable):
    server = redis_disposable
    store, log = make(conf([server.address], password=PASSWORD, timeout_ms=150))
    try:
        store.set("k", b"v", 60)
        assert store.get("k") == b"v"
        sleeper = threading.Thread(
            target=lambda: server.client().execute_command("DEBUG", "SLEEP", "1.5"))
        sleeper.start()
        time.sleep(0.1)
        start = time.monotonic()
        assert store.get("k") is None
        assert time.monotonic() - start < 0.6          # timeout, no retry on a timeout
        start = time.monotonic()
        for _ in range(100):
            assert store.get("k") is None
        assert time.monotonic() - start < 0.05
        sleeper.join()
        assert len(log.problems()) == 1 and "Timeout" in log.problems()[0]
    finally:
        store.close()


# -- Sentinel ------------------------------------------------------------------------------

def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)
    return True


def test_sentinel_follows_failovers(redis_sentinel):
    sset = redis_sentinel
    store, log = make(conf(sset.endpoints, password=PASSWORD, secret=SECRET, timeout_ms=300,
                           sentinel={"master_set": MASTER_SET, "password": SENTINEL_PASSWORD}))
    try:
        store.set("before", b"1", 60)
        assert store.get("before") == b"1"
        first_master = sset.master_port()
        master = next(s for s in sset.servers if s.port == first_master)
        # Replication is asynchronous: WAIT until the write has reached the replica.
        assert master.client().wait(1, 5000) >= 1

        def lands_on(server):
            # Writes sent while the old master is being demoted are lost (Redis
            # replication is asynchronous): wait for one that reaches ``server``.
            def check():
                name = unique("probe")
                store.set(name, b"ok", 60)
                return store.get(name) == b"ok" and server.client().exists(name) == 1
            return check

        # 1. A failover the sentinels are asked for: the old master becomes a replica.
        start = time.monotonic()
        new = sset.failover(kill=False)
        assert new.port != first_master
        wait_until(lands_on(new), 10, "store on the new master")
        t_command = time.monotonic() - start
        sset.wait_replicas_in_sync()

        # 2. The master dies.
        start = time.monotonic()
        newer = sset.failover(kill=True)
        assert newer.port == first_master
        wait_until(lands_on(newer), 10, "store on the promoted replica")
        t_kill = time.monotonic() - start
        assert store.get("before") == b"1"             # replicated, still readable
        assert t_command < 12 and t_kill < 12
        assert PASSWORD not in log.text() and SENTINEL_PASSWORD not in log.text()
    finally:
        store.close()


def test_sentinel_wrong_sentinel_password(redis_sentinel):
    store, log = make(conf(redis_sentinel.endpoints, password=PASSWORD, timeout_ms=300,
                           sentinel={"master_set": MASTER_SET, "password": "nope-nope"}))
    try:
        assert store.get("k") is None
        assert len(log.problems()) == 1 and "nope-nope" not in log.text()
    finally:
        store.close()


# -- Cluster -----------------------------------------------------------------------------

def test_cluster(redis_cluster):
    store, log = make(conf(redis_cluster.endpoints, password=PASSWORD, cluster=True,
                           database=3, secret=SECRET, key_prefix="kc:"))
    try:
        warnings = [m for lvl, m in log.lines if lvl == "warn"]
        assert len(warnings) == 1 and "database" in warnings[0]
        keys = [unique("ck") for _ in range(60)]
        for k in keys:
            store.set(k, k.encode(), 60)
        assert all(store.get(k) == k.encode() for k in keys)
        counts = [n.client().dbsize() for n in redis_cluster.nodes]
        assert all(c > 0 for c in counts), counts       # spread over the three masters
        lease_key = unique("clease")
        results = []
        barrier = threading.Barrier(10)

        def race():
            barrier.wait()
            results.append(store.lease(lease_key, 5000))
        threads = [threading.Thread(target=race) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 9 + [True]
        store.release(lease_key)
        assert store.lease(lease_key, 5000) is True
        store.release(lease_key)
        assert log.problems() == warnings
    finally:
        store.close()


# -- TLS -------------------------------------------------------------------------------

def tls_conf(server, certs, **tls):
    rec = {"enabled": True, "ca": certs["ca"], "cert": certs["client_cert"],
           "key": certs["client_key"]}
    rec.update(tls)
    return conf([server.address], password=PASSWORD, timeout_ms=1000, tls=rec)


def test_tls_with_client_certificate(redis_tls, tls_certs):
    store, log = make(tls_conf(redis_tls, tls_certs))
    try:
        files = [store_file for store_file in _tls_temp_files(store)]
        assert len(files) == 2
        for f in files:
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        store.set("k", b"over tls", 30)
        assert store.get("k") == b"over tls"
        assert redis_tls.client().get("k") == b"over tls"
        assert log.problems() == []
    finally:
        store.close()
    assert not any(os.path.exists(f) for f in files)   # removed by close()


def _tls_temp_files(store):
    # The kwargs the factory closes over name the temp files.
    cells = [c.cell_contents for c in (store._factory.__closure__ or ())]
    tls = next(c for c in cells if isinstance(c, dict) and c.get("ssl"))
    return [tls[k] for k in ("ssl_certfile", "ssl_keyfile") if k in tls]


def test_tls_wrong_ca_fails_quietly(redis_tls, tls_certs, tmp_path):
    other = make_ca_and_certs(tmp_path, ca_name="Some Other CA")
    store, log = make(tls_conf(redis_tls, tls_certs, ca=other["ca"]))
    try:
        assert store.get("k") is None
        problems = log.problems()
        assert len(problems) == 1 and "certificate" in problems[0].lower(), problems
        assert tls_certs["client_key"] not in log.text()
    finally:
        store.close()


def test_tls_without_client_certificate_is_refused(redis_tls, tls_certs):
    store, log = make(tls_conf(redis_tls, tls_certs, cert=None, key=None))
    try:
        assert store.get("k") is None
        assert len(log.problems()) == 1
    finally:
        store.close()


def test_tls_insecure_skip_verify(redis_tls, tls_certs, tmp_path):
    other = make_ca_and_certs(tmp_path, ca_name="Some Other CA")
    store, log = make(tls_conf(redis_tls, tls_certs, ca=other["ca"],
                               insecure_skip_verify=True))
    try:
        assert any("NOT verified" in m for lvl, m in log.lines if lvl == "warn")
        store.set("k2", b"unverified", 30)
        assert store.get("k2") == b"unverified"
    finally:
        store.close()


def test_cluster_over_tls(redis_cluster_tls, tls_certs):
    store_conf = conf(redis_cluster_tls.endpoints, password=PASSWORD, cluster=True,
                      timeout_ms=1000, tls={"enabled": True, "ca": tls_certs["ca"],
                                            "cert": tls_certs["client_cert"],
                                            "key": tls_certs["client_key"]})
    store, log = make(store_conf)
    try:
        keys = [unique("ctls") for _ in range(30)]
        for k in keys:
            store.set(k, b"v", 60)
        assert all(store.get(k) == b"v" for k in keys)
        assert all(n.client().dbsize() > 0 for n in redis_cluster_tls.nodes)
        assert store.lease(keys[0], 1000) is True and store.lease(keys[0], 1000) is False
        store.release(keys[0])
        assert log.problems() == []
    finally:
        store.close()


def test_odd_arguments_never_raise(redis_standalone):
    store, log = make(conf([redis_standalone.address], password=PASSWORD, secret=SECRET))
    try:
        store.set("k", "not bytes", 10)
        store.set("k", b"v", float("nan"))
        store.set("k", b"v", None)
        assert store.lease("k", None) is True
        assert store.get(None) is None
        assert SECRET not in log.text()
    finally:
        store.close()


# -- the wait protocol's pieces, and the request deadline -----------------------------

def test_try_lease_says_how_long_the_holder_may_keep_it(redis_standalone):
    store, _ = make(conf([redis_standalone.address], password=PASSWORD))
    other, _ = make(conf([redis_standalone.address], password=PASSWORD))
    try:
        key = unique("lease")
        assert store.try_lease(key, 2000) == 0.0
        held = other.try_lease(key, 2000)
        assert 1.5 < held <= 2.0
        store.release(key)
        assert other.try_lease(key, 2000) == 0.0
    finally:
        store.close()
        other.close()


def test_redis_calls_spend_from_the_request_deadline(redis_disposable):
    from kong_oauth2_introspection.concurrency import Deadline, DeadlineExceeded, deadline_scope
    server = redis_disposable
    store, log = make(conf([server.address], password=PASSWORD, timeout_ms=1000))
    try:
        store.set("k", b"v", 60)
        sleeper = threading.Thread(
            target=lambda: server.client().execute_command("DEBUG", "SLEEP", "1.5"))
        sleeper.start()
        time.sleep(0.1)
        start = time.monotonic()
        with deadline_scope(Deadline(0.5)):
            # Less time left than the 1 s socket timeout: the call is not started.
            assert store.get("k") is None
            assert store.try_lease("k", 1000) == 0.0      # nobody to wait for
        assert time.monotonic() - start < 0.05
        with deadline_scope(Deadline(0.0)):
            with pytest.raises(DeadlineExceeded):
                store.get("k")
        sleeper.join()
        with deadline_scope(Deadline(5)):
            assert store.get("k") == b"v"
        assert log.problems() == []                       # skipping is not a failure
    finally:
        store.close()


def test_channel_delivers_messages_and_reports_a_lost_subscription(redis_disposable):
    server = redis_disposable
    store, _ = make(conf([server.address], password=PASSWORD, key_prefix="ch:"))
    other, _ = make(conf([server.address], password=PASSWORD, key_prefix="ch:"))
    elsewhere, _ = make(conf([server.address], password=PASSWORD, key_prefix="xx:"))
    got, foreign = [], []
    try:
        store.add_listener(got.append)
        elsewhere.add_listener(foreign.append)
        wait_until(lambda: store.subscribed and elsewhere.subscribed, 5, "subscribed")
        assert got == [None]                    # (re)subscribed: anything before was missed
        assert other.publish({"v": 1, "op": "test", "n": 1})
        wait_until(lambda: len(got) == 2, 2, "message")
        assert got[1] == {"v": 1, "op": "test", "n": 1}
        assert foreign == [None]                # another prefix, another channel
        server.stop()
        wait_until(lambda: not store.subscribed, 5, "subscription lost")
        assert got[-1] is None
        server.restart()
        wait_until(lambda: store.subscribed, 10, "subscribed again")
        thread = store._listen_thread
        store.close()            # a replaced config: its listener thread ends
        wait_until(lambda: not thread.is_alive(), 3, "listener thread stopped")
    finally:
        store.close()
        other.close()
        elsewhere.close()


def test_index_names_hold_no_claim_and_depend_on_the_secret(redis_standalone):
    a, _ = make(conf([redis_standalone.address], password=PASSWORD, secret=SECRET,
                     key_prefix="ix:"))
    b, _ = make(conf([redis_standalone.address], password=PASSWORD,
                     secret="another-secret-of-32-bytes-xxxxx", key_prefix="ix:"))
    try:
        assert a.tag("sub", "alice") != b.tag("sub", "alice") != b.tag("client_id", "alice")
        a.index("k1", [("sub", "alice")], 60)
        names = redis_standalone.client().keys("ix:*")
        assert names and all(b"alice" not in n for n in names)
        tag, keys, deleted = a.purge_tag("sub", "alice")
        assert tag == a.tag("sub", "alice") and keys == ["k1"] and deleted == 0
        assert redis_standalone.client().keys("ix:*") == []
    finally:
        a.close()
        b.close()
