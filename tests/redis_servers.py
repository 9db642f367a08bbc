"""Real Redis servers for tests, from Debian's binaries, on 127.0.0.1.

Plain functions (``start_standalone``, ``start_sentinel_set``, ``start_cluster``,
``start_tls``) return objects with a ``stop()``; the pytest fixtures at the
bottom wrap them (module scope, plus a function-scoped ``redis_disposable`` for
tests that kill and restart their server). Every process is started in a temp
directory on free ports and killed by PID: by ``stop()``, by the fixture
finalizers, and as a last resort at interpreter exit.

Needs ``redis-server``, ``redis-sentinel`` and ``redis-cli``
(``apt-get install redis-server redis-sentinel redis-tools``).
"""

import atexit
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import redis

INSTALL_HINT = ("redis-server, redis-sentinel and redis-cli are needed: "
                "apt-get install -y redis-server redis-sentinel redis-tools")

PASSWORD = "default-user-pw-7f3a"        # requirepass (the default user)
ACL_USER = "kong"
ACL_PASSWORD = "kong-acl-pw-19c2"
SENTINEL_PASSWORD = "sentinel-pw-5be1"
MASTER_SET = "kongmaster"

_LIVE: Dict[int, subprocess.Popen] = {}
_LIVE_LOCK = threading.Lock()


def _kill_all_at_exit():
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for proc in procs:
        _kill(proc)


atexit.register(_kill_all_at_exit)


def _kill(proc: subprocess.Popen):
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with _LIVE_LOCK:
        _LIVE.pop(proc.pid, None)


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if not path:
        raise RuntimeError(f"{name} not found. {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """One redis-server (or redis-sentinel) process with its own config and directory."""

    def __init__(self, workdir, conf_lines: List[str], *, port: Optional[int] = None,
                 sentinel: bool = False, password: Optional[str] = None,
                 tls: Optional[dict] = None, name: str = "redis"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.sentinel = sentinel
        self.password = password
        self.tls = tls            # client-side ssl_* kwargs when the server only speaks TLS
        self.name = name
        self.extra = list(conf_lines)
        self.proc: Optional[subprocess.Popen] = None
        self.conf_path = self.workdir / ("sentinel.conf" if sentinel else "redis.conf")
        self.log_path = self.workdir / "server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_conf(self):
        port_line = "port 0" if self.tls else f"port {self.port}"
        lines = [port_line, "bind 127.0.0.1", f"dir {self.workdir}",
                 f"logfile {self.log_path}", "daemonize no"]
        if self.tls:
            lines.append(f"tls-port {self.port}")
        if not self.sentinel:
            lines += ['save ""', "appendonly no", "enable-debug-command local"]
        self.conf_path.write_text("\n".join(lines + self.extra) + "\n")

    def start(self, timeout: float = 10.0) -> "RedisProcess":
        # Sentinel rewrites its config file; keep it on a restart.
        if not (self.sentinel and self.conf_path.exists()):
            self._write_conf()
        cmd = [binary("redis-sentinel" if self.sentinel else "redis-server"), str(self.conf_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        with _LIVE_LOCK:
            _LIVE[self.proc.pid] = self.proc
        try:
            self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def client(self, **kwargs) -> redis.Redis:
        """An admin client (default user), not the store under test."""
        args = dict(host="127.0.0.1", port=self.port, password=self.password,
                    socket_timeout=5, socket_connect_timeout=5)
        if self.tls:
            args.update(self.tls)
        args.update(kwargs)
        return redis.Redis(**args)

    def wait_ready(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with self.client(socket_timeout=1, socket_connect_timeout=1) as c:
                    if c.ping():
                        return
            except redis.RedisError as err:
                last = err
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout} s ({last}): {self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self):
        """Kill the process (SIGKILL, by PID) and wait for it."""
        if self.proc is not None:
            _kill(self.proc)

    kill = stop

    def restart(self, timeout: float = 10.0) -> "RedisProcess":
        self.stop()
        return self.start(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _auth_lines(password: Optional[str]) -> List[str]:
    return [f"requirepass {password}", f"masterauth {password}"] if password else []


def start_standalone(workdir, *, password: str = PASSWORD, acl_user: str = ACL_USER,
                     acl_password: str = ACL_PASSWORD, port: Optional[int] = None) -> RedisProcess:
    """A standalone Redis with ``requirepass`` and an ACL user allowed everything."""
    binary("redis-server")
    conf = _auth_lines(password) + [f"user {acl_user} on >{acl_password} ~* &* +@all"]
    return RedisProcess(workdir, conf, port=port, password=password, name="redis").start()


class SentinelSet:
    """One master, one replica and three sentinels watching them."""

    def __init__(self, workdir, *, master_set=MASTER_SET, password=PASSWORD,
                 sentinel_password=SENTINEL_PASSWORD):
        self.workdir = Path(workdir)
        self.master_set = master_set
        self.password = password
        self.sentinel_password = sentinel_password
        self.servers: List[RedisProcess] = []
        self.sentinels: List[RedisProcess] = []

    def start(self) -> "SentinelSet":
        binary("redis-server"), binary("redis-sentinel")
        try:
            # Both may become master: no 5 s wait before a full sync.
            fast_sync = ["repl-diskless-sync-delay 0"]
            master = RedisProcess(self.workdir / "master", _auth_lines(self.password) + fast_sync,
                                  password=self.password, name="sentinel-set master").start()
            self.servers.append(master)
            replica = RedisProcess(self.workdir / "replica",
                                   _auth_lines(self.password) + fast_sync
                                   + [f"replicaof 127.0.0.1 {master.port}"],
                                   password=self.password, name="sentinel-set replica").start()
            self.servers.append(replica)
            self._wait(lambda: replica.client().info("replication").get(
                "master_link_status") == "up", 10, "replica in sync")
            # Pre-seeding ids, peers and the replica spares the sentinels ~10 s of
            # discovery (hello messages every 2 s, INFO every 10 s).
            ports = [free_port() for _ in range(3)]
            ids = [os.urandom(20).hex() for _ in range(3)]
            for i in range(3):
                peers = [f"sentinel known-sentinel {self.master_set} 127.0.0.1 {ports[j]} {ids[j]}"
                         for j in range(3) if j != i]
                conf = [f"sentinel myid {ids[i]}",
                        f"sentinel monitor {self.master_set} 127.0.0.1 {master.port} 2",
                        f"sentinel known-replica {self.master_set} 127.0.0.1 {replica.port}",
                        *peers,
                        f"sentinel auth-pass {self.master_set} {self.password}",
                        f"sentinel down-after-milliseconds {self.master_set} 1000",
                        f"sentinel failover-timeout {self.master_set} 3000",
                        f"sentinel parallel-syncs {self.master_set} 1",
                        f"requirepass {self.sentinel_password}",
                        f"sentinel sentinel-pass {self.sentinel_password}"]
                self.sentinels.append(RedisProcess(
                    self.workdir / f"sentinel{i}", conf, port=ports[i], sentinel=True,
                    password=self.sentinel_password, name=f"sentinel {i}").start())
            # Every sentinel knows the replica and the two other sentinels.
            self._wait(self._settled, 15, "sentinels discovering each other")
            # INFO every 500 ms instead of 10 s and hello messages every 500 ms
            # instead of 2 s: a demoted master becomes a replica in ~2 s, not ~10 s.
            for s in self.sentinels:
                s.client().execute_command("SENTINEL", "DEBUG", "info-period", "500",
                                           "publish-period", "500")
        except Exception:
            self.stop()
            raise
        return self

    def _settled(self) -> bool:
        for s in self.sentinels:
            c = s.client()
            info = c.sentinel_master(self.master_set)
            if int(info["num-other-sentinels"]) < 2 or "disconnected" in info["flags"]:
                return False
            # The pre-seeded replica is really reached (else no failover can pick it).
            replicas = c.sentinel_slaves(self.master_set)
            if not any(r.get("master-link-status") == "ok" and "disconnected" not in r["flags"]
                       for r in replicas):
                return False
        return True

    @staticmethod
    def _wait(cond, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    @property
    def endpoints(self) -> List[str]:
        return [s.address for s in self.sentinels]

    def master_port(self) -> int:
        """The master's port, as the sentinels see it."""
        for s in self.sentinels:
            if s.alive:
                try:
                    _host, port = s.client().sentinel_get_master_addr_by_name(
                        self.master_set)
                    return int(port)
                except redis.RedisError:
                    continue
        raise RuntimeError("no sentinel answers")

    def server_on(self, port: int) -> RedisProcess:
        return next(s for s in self.servers if s.port == port)

    def failover(self, *, kill: bool = True, timeout: float = 20.0) -> RedisProcess:
        """Make another server the master: kill the master (the sentinels notice
        after down-after-milliseconds) or, with ``kill=False``, ask a sentinel for
        ``SENTINEL FAILOVER``. Returns the new master once it is promoted."""
        old = self.master_port()
        if kill:
            self.server_on(old).stop()
        else:
            self.wait_replicas_in_sync()
            deadline = time.monotonic() + timeout
            while True:  # NOGOODREPLICA while the sentinels still check the replica
                try:
                    self.sentinels[0].client().sentinel_failover(self.master_set)
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        def promoted():
            port = self.master_port()
            if port == old:
                return False
            return self.server_on(port).client().info("replication")["role"] == "master"
        self._wait(promoted, timeout, "sentinel failover")
        return self.server_on(self.master_port())

    def wait_replicas_in_sync(self, timeout: float = 15.0):
        """Wait until every live server but the master replicates from it (after a
        ``failover(kill=False)`` the sentinels turn the old master into a replica)."""
        def synced():
            master = self.master_port()
            for s in self.servers:
                if s.alive and s.port != master:
                    info = s.client().info("replication")
                    if info.get("master_port") != master or info.get("master_link_status") != "up":
                        return False
            return True
        self._wait(synced, timeout, "replicas in sync")

    def stop(self):
        for p in self.sentinels + self.servers:
            p.stop()


def start_sentinel_set(workdir, **kwargs) -> SentinelSet:
    return SentinelSet(workdir, **kwargs).start()


class RedisClusterSet:
    """Three masters (no replicas) forming a Redis Cluster."""

    def __init__(self, workdir, *, nodes: int = 3, password: str = PASSWORD,
                 certs: Optional[dict] = None):
        self.workdir = Path(workdir)
        self.count = nodes
        self.password = password
        self.certs = certs        # TLS only (clients and cluster bus), when given
        self.nodes: List[RedisProcess] = []

    def start(self) -> "RedisClusterSet":
        cli = binary("redis-cli")
        try:
            for i in range(self.count):
                conf = _auth_lines(self.password) + [
                    "cluster-enabled yes", "cluster-config-file nodes.conf",
                    "cluster-node-timeout 2000", f"cluster-port {free_port()}"]
                tls = None
                if self.certs:
                    # The bus is mutual TLS: nodes present the client certificate.
                    conf += _tls_server_lines(self.certs, "yes") + [
                        "tls-cluster yes",
                        f"tls-client-cert-file {self.certs['client_cert_path']}",
                        f"tls-client-key-file {self.certs['client_key_path']}"]
                    tls = _tls_client_kwargs(self.certs)
                self.nodes.append(RedisProcess(self.workdir / f"node{i}", conf, tls=tls,
                                               password=self.password,
                                               name=f"cluster node {i}").start())
            env = dict(os.environ, REDISCLI_AUTH=self.password)
            tls_args = []
            if self.certs:
                tls_args = ["--tls", "--cacert", self.certs["ca_path"],
                            "--cert", self.certs["client_cert_path"],
                            "--key", self.certs["client_key_path"]]
            out = subprocess.run([cli, *tls_args, "--cluster", "create", *self.endpoints,
                                  "--cluster-replicas", "0", "--cluster-yes"],
                                 env=env, capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
            deadline = time.monotonic() + 20
            while not self._ok():
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster_state never became ok")
                time.sleep(0.1)
        except Exception:
            self.stop()
            raise
        return self

    def _ok(self) -> bool:
        for n in self.nodes:
            info = n.client().cluster("INFO")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != self.count:
                return False
        return True

    @property
    def endpoints(self) -> List[str]:
        return [n.address for n in self.nodes]

    def stop(self):
        for n in self.nodes:
            n.stop()


def start_cluster(workdir, **kwargs) -> RedisClusterSet:
    return RedisClusterSet(workdir, **kwargs).start()


def start_tls(workdir, certs: dict, *, password: str = PASSWORD,
              auth_clients: str = "yes") -> RedisProcess:
    """A Redis speaking only TLS, with the server certificate from ``certs``
    (``certs.make_ca_and_certs``) and client certificates required (``yes``) or
    ``optional``."""
    binary("redis-server")
    conf = _auth_lines(password) + _tls_server_lines(certs, auth_clients)
    return RedisProcess(workdir, conf, password=password, tls=_tls_client_kwargs(certs),
                        name="redis tls").start()


def _tls_server_lines(certs: dict, auth_clients: str) -> List[str]:
    return [f"tls-cert-file {certs['server_cert_path']}",
            f"tls-key-file {certs['server_key_path']}",
            f"tls-ca-cert-file {certs['ca_path']}",
            f"tls-auth-clients {auth_clients}"]


def _tls_client_kwargs(certs: dict) -> dict:
    """redis-py arguments of an admin client of a TLS-only server."""
    return dict(ssl=True, ssl_ca_certs=certs["ca_path"], ssl_certfile=certs["client_cert_path"],
                ssl_keyfile=certs["client_key_path"])


# -- pytest fixtures ------------------------------------------------------------------

def _require():
    for name in ("redis-server", "redis-sentinel", "redis-cli"):
        try:
            binary(name)
        except RuntimeError as err:
            pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="module")
def redis_standalone(tmp_path_factory):
    _require()
    server = start_standalone(tmp_path_factory.mktemp("redis-standalone"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_disposable(tmp_path_factory):
    """A standalone Redis of its own, for tests that kill or restart it."""
    _require()
    server = start_standalone(tmp_path_factory.mktemp("redis-disposable"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory):
    _require()
    sset = start_sentinel_set(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        yield sset
    finally:
        sset.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    _require()
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_cluster_tls(tmp_path_factory, tls_certs):
    """A Redis Cluster speaking only TLS, to clients and on its bus."""
    _require()
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster-tls"), certs=tls_certs)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory):
    from certs import make_ca_and_certs
    return make_ca_and_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory, tls_certs):
    _require()
    server = start_tls(tmp_path_factory.mktemp("redis-tls"), tls_certs)
    try:
        yield server
    finally:
        server.stop()


# -- a process running the plugin's cache against Redis -------------------------------
#
# What the plugin server does for a miss, without the server: the real Config,
# Introspector (HTTP to the IdP), RedisStore and TokenCache, driven over stdin/stdout
# with one JSON object per line. Two of these sharing one Redis are two Kong nodes as
# far as the cache is concerned.

class CacheNode:
    def __init__(self, plugin_conf: dict, *, breaker: bool = False, log_dir=None,
                 node_dir=None):
        """``node_dir``: the process is one of a plugin server's processes sharing
        that node directory (``node.set_directory``), as under ``serve``."""
        import tempfile
        self.log_path = Path(tempfile.mkstemp(prefix="cache-node-", suffix=".log",
                                              dir=log_dir)[1])
        spec = json.dumps({"plugin": plugin_conf, "breaker": breaker,
                           "node_dir": None if node_dir is None else str(node_dir)})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-u", __file__, "cache-node", spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log)
        with _LIVE_LOCK:
            _LIVE[self.proc.pid] = self.proc
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: Dict[int, Future] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self._lock:
                future = self._pending.pop(reply["id"], None)
            if future is not None:
                future.set_result(reply)
        with self._lock:
            for future in self._pending.values():
                future.set_exception(RuntimeError("cache node exited"))
            self._pending.clear()

    def submit(self, op: str, **args) -> Future:
        future: Future = Future()
        with self._lock:
            n = next(self._ids)
            self._pending[n] = future
            self.proc.stdin.write((json.dumps(dict(args, id=n, op=op)) + "\n").encode())
            self.proc.stdin.flush()
        return future

    def call(self, op: str, timeout: float = 30, **args) -> dict:
        return self.submit(op, **args).result(timeout)

    def get(self, token: str, deadline: Optional[float] = None, timeout: float = 30) -> dict:
        """{"active": bool, "claims": {...}, "s": seconds} or {"error": name, "s": ...}."""
        return self.call("get", timeout, token=token, deadline=deadline)

    def peek(self, token: str) -> Optional[dict]:
        return self.call("peek", token=token)["claims"]

    def wait_subscribed(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while not self.call("status")["subscribed"]:
            if time.monotonic() > deadline:
                raise RuntimeError("cache node never subscribed: " + self.log())
            time.sleep(0.02)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self):
        _kill(self.proc)

    def stop(self):
        self.kill()
        self._log.close()


def _cache_node_main(spec_json: str) -> None:
    from kong_oauth2_introspection.idp import breaker as breakers
    from kong_oauth2_introspection.cache.tokens import Policy, TokenCache
    from kong_oauth2_introspection.concurrency import Deadline, deadline_scope
    from kong_oauth2_introspection.introspection.config import Config
    from kong_oauth2_introspection.introspection.handler import idp_identity
    from kong_oauth2_introspection.introspection.exchange import Introspector
    from kong_oauth2_introspection.cache.store import RedisStore

    class Log:
        def __getattr__(self, level):
            return lambda msg: print(f"{level}: {msg}", file=sys.stderr, flush=True)

    spec = json.loads(spec_json)
    if spec.get("node_dir"):
        from kong_oauth2_introspection import node
        node.set_directory(spec["node_dir"])
    conf = Config.parse(spec["plugin"])
    log = Log()
    store = RedisStore.from_config(conf.store, log) if conf.store else None
    cache = TokenCache(key_material=idp_identity(conf, {}).encode(), store=store)
    introspector = Introspector(conf, log)
    policy = Policy(ttl=conf.ttl, negative_ttl=conf.negative_ttl,
                    stale_if_error=conf.stale_if_error,
                    wait=conf.timeout * (conf.max_retries + 1))
    brk = breakers.for_endpoint(conf.introspection_url, log) if spec.get("breaker") else None
    out = threading.Lock()

    def reply(cmd, **result):
        with out:
            sys.stdout.write(json.dumps(dict(result, id=cmd["id"])) + "\n")
            sys.stdout.flush()

    def run(cmd):
        op = cmd["op"]
        if op == "status":
            return reply(cmd, subscribed=bool(store and store.subscribed),
                         breaker=brk.state if brk else None)
        token = cmd["token"]
        key = cache.key(token)
        if op == "peek":
            entry = cache.peek(key, policy)
            return reply(cmd, claims=entry.claims if entry else None)
        start = time.monotonic()
        deadline = Deadline(cmd["deadline"]) if cmd.get("deadline") else None
        try:
            with deadline_scope(deadline):
                entry = cache.get(key, lambda: introspector.introspect(token), policy,
                                  breaker=brk)
        except Exception as err:  # noqa: BLE001 - reported to the test
            return reply(cmd, error=type(err).__name__, s=time.monotonic() - start)
        reply(cmd, active=entry.active, claims=entry.claims, s=time.monotonic() - start)

    for line in sys.stdin:
        threading.Thread(target=run, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:2] == ["cache-node"]:
        _cache_node_main(sys.argv[2])


def bench_redis_hit(n: int = 2000, redis_address: Optional[str] = None) -> Dict[str, float]:
    """µs per hit, same run: an in-process hit, a "Redis hit" (an answer another
    process fetched, which reached this one through the store's announcement), and
    a cold read from Redis (GET, AES-GCM open, JSON decode) for comparison.

    ``peek`` is the event-loop path (no I/O); ``get`` the full path. Starts its own
    redis-server unless ``redis_address`` ("host:port", no password) is given.
    """
    import tempfile
    from kong_oauth2_introspection.cache.tokens import Policy, TokenCache
    from kong_oauth2_introspection.introspection.exchange import Answer
    from kong_oauth2_introspection.cache.store import RedisStore

    server = None
    if redis_address is None:
        server = start_standalone(tempfile.mkdtemp(prefix="bench-redis-hit-"), password=None)
        redis_address = server.address
    store_conf = {"key_prefix": "bench:", "secret": "0123456789abcdef0123456789abcdef",
                  "redis": {"endpoints": [redis_address]}}
    policy = Policy(ttl=300, negative_ttl=5, stale_if_error=0, wait=10)
    caches = []
    try:
        def cache(listen=True):
            store = RedisStore.from_config(store_conf, None)
            c = TokenCache(key_material=b"bench-idp", store=store if listen else None)
            if not listen:
                c.store = store           # reads Redis, hears nothing: every read is cold
            caches.append(store)
            return c
        writer, reader, cold = cache(), cache(), cache(listen=False)
        for c in (writer, reader):
            deadline = time.monotonic() + 10
            while not c.store.subscribed and time.monotonic() < deadline:
                time.sleep(0.01)
        keys = [writer.key(f"token-{i}") for i in range(n)]
        claims = {"active": True, "sub": "user", "client_id": "app", "scope": "read write",
                  "exp": int(time.time()) + 3600}
        for k in keys:
            writer.get(k, lambda: Answer(dict(claims), True), policy)
        deadline = time.monotonic() + 10
        while reader.peek(keys[-1], policy) is None and time.monotonic() < deadline:
            time.sleep(0.01)

        def per_hit(fn) -> float:
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for k in keys:
                    fn(k)
                best = min(best, (time.perf_counter() - start) / n * 1e6)
            return best

        def never(_k=None):
            raise AssertionError("a hit asked the IdP")
        result = {
            "in_process_get_us": per_hit(lambda k: writer.get(k, never, policy)),
            "redis_get_us": per_hit(lambda k: reader.get(k, never, policy)),
            "in_process_peek_us": per_hit(lambda k: writer.peek(k, policy)),
            "redis_peek_us": per_hit(lambda k: reader.peek(k, policy)),
        }

        def cold_read(k):
            cold._local.clear()
            cold.get(k, never, policy)
        result["cold_redis_read_us"] = per_hit(cold_read)
        result["ratio_get"] = result["redis_get_us"] / result["in_process_get_us"]
        result["ratio_peek"] = result["redis_peek_us"] / result["in_process_peek_us"]
        return result
    finally:
        for store in caches:
            store.close()
        if server is not None:
            server.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["bench-redis-hit"]:
    print(json.dumps(bench_redis_hit(), indent=2))
