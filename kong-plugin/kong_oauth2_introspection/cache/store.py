"""The token store shared by every Kong node: Redis, via redis-py.

``RedisStore`` is the second level of the plugin's cache (see ``tokens.py``).
It speaks to a standalone Redis, to the master of a Sentinel-managed set
(following failovers through redis-py's ``Sentinel.master_for``) or to a
Redis Cluster, optionally over TLS, and optionally encrypts every value with
AES-GCM (``Sealer``).

The store is an optimisation, never a dependency: no method raises, a failing
Redis turns every call into a miss (``get`` -> None, ``set``/``release`` do
nothing), and after a failure Redis is skipped for a backoff window (1 s,
doubling up to 10 s) so a dead or slow Redis costs nothing per request. When
the window ends one caller probes Redis again; when it answers the store is
used again, without a restart. Failures are logged at most once per
``LOG_INTERVAL`` seconds, without passwords, keys or values.

``lease`` answers "should I ask the IdP?": True when this caller won the lease
*or* when Redis cannot coordinate right now (nobody would ever fill the entry
the others wait for). ``release`` deletes the lease only while it still holds
our random token (a one-key Lua script, so it works on a Cluster too).

``try_lease`` also says how long the current holder may keep the lease, so a
follower waits exactly that long at most (see ``tokens.py`` for the protocol).

Every process subscribes to one channel per key prefix,
``<key_prefix>oauth2-introspection`` (``add_listener``): a leader announces there
how a fetch ended, and ``ops/purge.py`` announces purges. Messages are JSON objects
(version ``v`` 1); the formats are in ``tokens.py`` and ``ops/purge.py``. While the
subscription is down listeners get ``None``: messages may have been missed.

Each entry written with ``index`` is also listed in Redis sorted sets named
``<key_prefix>oauth2-introspection:idx:<kind>:<tag>`` (kind ``sub`` or
``client_id``), where ``tag`` is an HMAC of the claim under a key derived from
``store.secret``: whoever reads Redis learns no claim. Members are scored by
their entry's expiry (Redis's clock) and trimmed on every write, so an index
holds the live entries only.

A purge also leaves tombstones (``tombstones.py``) in one sorted set,
``<key_prefix>oauth2-introspection:tombstones``: sealed records scored by their
time (Redis's clock). A process loads them all when it (re)subscribes, takes the
new ones from each purge announcement, and, before believing a value read from
Redis, looks for newer ones when it is not subscribed or last looked more than
``TOMBSTONE_REFRESH`` seconds ago (a failover may lose a message): ``refused``.

Every call spends from the request's deadline (``concurrency.current_deadline``):
a call is only started when the time left covers its socket timeout (otherwise
it counts as a miss, never as a reason to wait), and raises DeadlineExceeded
when nothing is left.

In Sentinel mode a background thread asks the sentinels for the master every
second, because redis-py only asks them when a connection breaks, and a master
demoted by a failover keeps accepting connections until it is reconfigured.
Its parts live beside it: ``connection.py`` (endpoints, Sentinel and Cluster
records, TLS files), ``sealing.py`` (values encrypted at rest), ``backoff.py``
(after a failure), ``scripts.py`` (the Lua it runs) and ``tombstones.py``.
"""

import base64
import collections
import functools
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..concurrency import DeadlineExceeded, current_deadline
from ..ops import metrics
from . import tombstones as tombs
from .backoff import _Backoff
from .connection import (
    _close_client,
    _file_remover,
    _get,
    _log,
    _parse_endpoint,
    _tls_kwargs,
)
from .scripts import _INDEX_LUA, _LEASE_LUA, _RELEASE_LUA, _TAKE_INDEX_LUA, _TIME_LUA
from .sealing import Sealer

LOG_INTERVAL = 10.0
LEASE_SUFFIX = ":lease"
_MAX_TTL_MS = 366 * 86400 * 1000
_MAX_OWNED_LEASES = 10000
CHANNEL = "oauth2-introspection"          # after the key prefix
INDEX = "oauth2-introspection:idx:"       # after the key prefix
INDEX_KINDS = ("sub", "client_id")
TOMBSTONES = "oauth2-introspection:tombstones"   # after the key prefix
TOMBSTONE_REFRESH = 1.0
_RESUBSCRIBE_FIRST = 0.2
_RESUBSCRIBE_MAX = 5.0


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _never_raises(default):
    """The store is an optimisation: a bug or odd argument must not fail a request
    (only the request's deadline running out goes through)."""
    def wrap(method):
        @functools.wraps(method)
        def safe(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except DeadlineExceeded:
                raise
            except Exception as err:
                self._failed(err, trip=False)
                return default
        return safe
    return wrap


class RedisStore:
    """A key/value store in Redis shared by every node; see the module doc."""

    def __init__(self, factory: Callable[[], Any], *, mode: str, key_prefix: str = "",
                 sealer: Optional[Sealer] = None, log=None, timeout_s: float = 0.5,
                 redacted: Tuple[str, ...] = (), cleanup: Optional[Callable[[], None]] = None,
                 describe: str = "redis", watch: Optional[Callable[[Any], Any]] = None,
                 watch_interval: float = 1.0, tag_secret: Optional[bytes] = None):
        self.mode = mode
        self.key_prefix = key_prefix or ""
        self.channel = self.key_prefix + CHANNEL
        self.timeout_s = timeout_s
        # Index tags are keyed with the store secret, so Redis shows no claim.
        self._tag_key = hashlib.sha256(b"oauth2-introspection/index\0" + (tag_secret or b"")).digest()
        self._lease_script: Any = None
        self._index_script: Any = None
        self._take_index_script: Any = None
        self._time_script: Any = None
        self._tombstones_name = self.key_prefix + TOMBSTONES
        self.tombstones = tombs.Tombstones(self.tag, time.time)
        self._tombstones_at = -math.inf     # monotonic time of the last look
        self._tombstones_lock = threading.Lock()
        self._listeners: List[Callable[[Optional[dict]], None]] = []
        self._listen_thread: Optional[threading.Thread] = None
        self.subscribed = False
        self.sealer = sealer
        self.log = log
        self.describe = describe
        self._factory = factory
        self._client = None
        self._release_script: Any = None
        self._client_lock = threading.Lock()
        self._closed = False
        self._cleanup = cleanup
        self._redacted = tuple(s for s in redacted if s)
        self._backoff = _Backoff(probe_grace=max(2 * timeout_s, 0.05) + 0.5)
        self._log_lock = threading.Lock()
        self._last_log = -math.inf
        self._suppressed = 0
        self._leases_lock = threading.Lock()
        self._leases: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._watch = watch
        self._watch_interval = watch_interval
        self._stop = threading.Event()

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_config(cls, store_conf: Optional[dict], log) -> Optional["RedisStore"]:
        """The store ``store_conf`` (the schema's ``store`` record) describes, or None
        when it has no Redis endpoints or cannot be used (logged). Never raises and
        never connects: the first command does."""
        try:
            return cls._from_config(store_conf, log)
        except Exception as err:  # a bad config must not take the plugin down
            _log(log, "err", f"store: Redis disabled, bad configuration ({type(err).__name__})")
            return None

    @classmethod
    def _from_config(cls, store_conf, log):
        redis_conf = _get(store_conf, "redis", {})
        endpoints = [e for e in (_get(redis_conf, "endpoints", []) or []) if e]
        if not endpoints:
            return None
        import redis
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.retry import Retry

        try:
            addresses = [_parse_endpoint(e) for e in endpoints]
        except ValueError as err:
            _log(log, "err", f"store: Redis disabled: {err}")
            return None

        sealer = None
        secret = _get(store_conf, "secret")
        if secret:
            try:
                sealer = Sealer(secret)
            except ValueError as err:
                # Refuse to fall back to plaintext when encryption was asked for.
                _log(log, "err", f"store: Redis disabled: {err}")
                return None

        timeout_ms = _get(redis_conf, "timeout_ms", 500)
        timeout_s = max(float(timeout_ms), 1.0) / 1000.0
        username = _get(redis_conf, "username") or None
        password = _get(redis_conf, "password") or None
        database = int(_get(redis_conf, "database", 0) or 0)
        cluster = bool(_get(redis_conf, "cluster", False))
        sentinel_conf = _get(redis_conf, "sentinel", {})
        master_set = _get(sentinel_conf, "master_set") or None
        sentinel_password = _get(sentinel_conf, "password") or None

        common: Dict[str, Any] = {
            "socket_connect_timeout": timeout_s,
            "socket_timeout": timeout_s,
        }
        # One quick retry on a broken connection (a stale pooled socket, a master
        # that just became a replica), none on a timeout: a slow Redis must cost
        # at most about 2 x timeout_ms, and the backoff makes it free afterwards.
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))

        tls_kwargs, tls_files = _tls_kwargs(_get(redis_conf, "tls", {}), log)
        cleanup = _file_remover(tls_files)
        redacted = tuple(x for x in (password, sentinel_password,
                                     secret if isinstance(secret, str) else None) if x)
        key_prefix = _get(store_conf, "key_prefix", "") or ""

        if cluster and master_set:
            _log(log, "warn", "store: redis.cluster is set: sentinel.master_set is ignored")
        if cluster:
            if database:
                _log(log, "warn", f"store: Redis Cluster only has database 0; "
                                  f"database {database} is ignored")
            from redis.cluster import ClusterNode, RedisCluster

            def factory():
                return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in addresses],
                                    username=username, password=password, retry=retry,
                                    require_full_coverage=False, **common, **tls_kwargs)
            mode, describe = "cluster", f"Redis Cluster ({len(addresses)} seed nodes)"
            watch = None
        elif master_set:
            from redis.sentinel import Sentinel
            # No retries against a sentinel: discover_master already tries the next.
            sentinel_kwargs = dict(common, retry=Retry(NoBackoff(), 0), **tls_kwargs)
            if _get(sentinel_conf, "username"):
                sentinel_kwargs["username"] = _get(sentinel_conf, "username")
            if sentinel_password:
                sentinel_kwargs["password"] = sentinel_password

            def factory():
                sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)
                master = sentinel.master_for(master_set, username=username, password=password,
                                             db=database, retry=retry, **common, **tls_kwargs)
                master._kong_sentinel = sentinel  # closed with the master
                return master

            def watch(master):
                # redis-py asks the sentinels only when a connection breaks. A master
                # demoted by a failover stays up (and, until the sentinels reconfigure
                # it, writable) for up to ~10 s: ask every second, so idle connections
                # are dropped and new ones go to the new master.
                master.connection_pool.get_master_address()
            mode, describe = "sentinel", f"Redis Sentinel master set {master_set!r}"
        else:
            watch = None
            host, port = addresses[0]
            if len(addresses) > 1:
                _log(log, "warn", "store: several Redis endpoints without sentinel or "
                                  "cluster: only the first one is used")

            def factory():
                return redis.Redis(host=host, port=port, username=username, password=password,
                                   db=database, retry=retry, **common, **tls_kwargs)
            mode, describe = "standalone", f"Redis {host}:{port}"

        tag_secret = (secret.encode() if isinstance(secret, str) else bytes(secret)) \
            if secret else None
        store = cls(factory, mode=mode, key_prefix=key_prefix, sealer=sealer, log=log,
                    timeout_s=timeout_s, redacted=redacted, cleanup=cleanup, describe=describe,
                    watch=watch, tag_secret=tag_secret)
        if cleanup is not None:
            weakref.finalize(store, cleanup)
        _log(log, "info", f"store: {describe}{' over TLS' if tls_kwargs else ''}, values "
                          f"{'encrypted' if sealer else 'NOT encrypted (no store.secret)'}")
        return store

    # -- the API the cache uses ---------------------------------------------------

    @_never_raises(None)
    def get(self, key: str) -> Optional[bytes]:
        """The value stored under ``key``; None when absent, unreadable or Redis fails."""
        full = self.key_prefix + key
        blob = self._call(lambda c: c.get(full))
        if blob is None:
            return None
        if self.sealer is None:
            return bytes(blob)
        return self.sealer.open(blob, full.encode())

    @_never_raises(None)
    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds (at least 1 ms)."""
        try:
            ttl_f = float(ttl_s)
        except (TypeError, ValueError):
            return
        if math.isnan(ttl_f):
            return
        px = _MAX_TTL_MS if ttl_f >= _MAX_TTL_MS / 1000 else max(1, int(ttl_f * 1000))
        full = self.key_prefix + key
        blob = self.sealer.seal(value, full.encode()) if self.sealer else value
        self._call(lambda c: c.set(full, blob, px=px))

    def claim_once(self, key: str, ttl_s: float) -> Optional[bool]:
        """Set ``key`` only if absent (SET NX), for ``ttl_s`` seconds: True when this
        call set it, False when it was there, None when Redis cannot tell (a replay
        check must then refuse rather than guess)."""
        full = self.key_prefix + key
        px = min(max(1, int(ttl_s * 1000)), _MAX_TTL_MS)
        done = self._call(lambda c: c.set(full, b"1", nx=True, px=px), failed=_FAILED)
        return None if done is _FAILED else bool(done)

    def lease(self, key: str, ttl_ms: int) -> bool:
        """Try to become the one caller (across every process and node) that fetches
        ``key``, for ``ttl_ms`` milliseconds.

        True: go ahead and fetch (you won, or the store cannot coordinate right
        now, so nobody should wait for anybody). False: someone else holds it.
        """
        return self.try_lease(key, ttl_ms) == 0.0

    @_never_raises(0.0)
    def try_lease(self, key: str, ttl_ms: int) -> float:
        """Like ``lease``: 0.0 when this caller should fetch, else the seconds the
        current holder may still keep the lease."""
        full = self.key_prefix + key + LEASE_SUFFIX
        token = secrets.token_hex(16).encode()
        px = min(max(1, int(ttl_ms)), _MAX_TTL_MS)
        held = self._call(lambda c: self._lease_script(keys=[full], args=[token, px], client=c),
                          failed=_FAILED)
        if held is _FAILED:
            return 0.0  # Redis unavailable: waiting for a holder that cannot exist is useless
        held = int(held)
        if held >= 0:
            return max(held, 1) / 1000.0
        if held == -1:
            with self._leases_lock:
                self._leases[key] = token
                while len(self._leases) > _MAX_OWNED_LEASES:
                    self._leases.popitem(last=False)
            return 0.0
        return 0.001  # -2: expired between SET and PTTL; look again at once

    @_never_raises(None)
    def release(self, key: str) -> None:
        """Give up the lease on ``key`` if this store still holds it."""
        with self._leases_lock:
            token = self._leases.pop(key, None)
        if token is None:
            return
        full = self.key_prefix + key + LEASE_SUFFIX
        self._call(lambda c: self._release_script(keys=[full], args=[token], client=c))

    def seal(self, key: str, value: bytes) -> bytes:
        """``value`` as stored under ``key`` (sealed when there is a secret)."""
        return self.sealer.seal(value, (self.key_prefix + key).encode()) if self.sealer else value

    def unseal(self, key: str, blob: bytes) -> Optional[bytes]:
        if self.sealer is None:
            return bytes(blob)
        return self.sealer.open(blob, (self.key_prefix + key).encode())

    def tag(self, kind: str, value: str) -> str:
        """The index tag of a claim value: an HMAC, so Redis never shows the claim."""
        msg = kind.encode() + b"\0" + value.encode("utf-8", "surrogatepass")
        return hmac.new(self._tag_key, msg, hashlib.sha256).hexdigest()

    @_never_raises(None)
    def index(self, key: str, tags: List[Tuple[str, str]], ttl_s: float) -> None:
        """List ``key`` under each (kind, claim value) so it can be purged by claim."""
        px = min(max(1, int(ttl_s * 1000)), _MAX_TTL_MS)
        for kind, value in tags:
            name = self.key_prefix + INDEX + kind + ":" + self.tag(kind, value)
            self._call(lambda c: self._index_script(keys=[name], args=[key, px], client=c))

    @_never_raises(False)
    def publish(self, message: dict) -> bool:
        """Send ``message`` (JSON) to every process sharing this Redis and prefix."""
        data = json.dumps(message, separators=(",", ":"))
        return self._call(lambda c: c.publish(self.channel, data), failed=_FAILED) is not _FAILED

    def add_listener(self, listener: Callable[[Optional[dict]], None]) -> None:
        """Call ``listener(message)`` for each message on the channel (on a thread of
        the store), and ``listener(None)`` whenever the subscription is (re)made or
        lost: messages may have been missed."""
        self._listeners.append(listener)
        with self._client_lock:
            if self._listen_thread is None and not self._closed:
                self._listen_thread = threading.Thread(
                    target=self._listen_loop, daemon=True,
                    name="oauth2-introspection-store-listen")
                self._listen_thread.start()

    # -- tombstones (tombstones.py) -------------------------------------------------

    def refused(self, key: str, claims: Dict[str, Any], fetched_at: float) -> bool:
        """Must a value of ``key`` from outside this process (read from Redis, heard
        in an announcement, kept in a node-local cache) count as a miss? True when a
        purge came after it was fetched, and while the tombstones cannot be known.
        Looks for new tombstones first when due (see the module doc)."""
        try:
            self._refresh_tombstones()
            return self.tombstones.covers(key, claims, fetched_at)
        except DeadlineExceeded:
            raise
        except Exception as err:  # noqa: BLE001 - unknown means refused
            self._failed(err, trip=False)
            return True

    def _refresh_tombstones(self, full: bool = False) -> None:
        known = self.tombstones
        if not full and known.loaded and self.subscribed \
                and time.monotonic() - self._tombstones_at < TOMBSTONE_REFRESH:
            return
        # Another thread looking: what is known holds meanwhile, or, when nothing is
        # known yet, wait for its look (one socket timeout at most).
        was_loaded = known.loaded
        if was_loaded:
            if not self._tombstones_lock.acquire(blocking=False):
                return
        elif not self._tombstones_lock.acquire(timeout=self.timeout_s):
            return
        try:
            if not was_loaded and known.loaded and not full:
                return    # the other thread loaded them
            low: Any = "-inf" if full or not known.loaded else known.seen_ms
            got = self._call(lambda c: c.zrangebyscore(self._tombstones_name, low, "+inf",
                                                       withscores=True), failed=_FAILED)
            if got is _FAILED:
                return    # not loaded stays not loaded: values from outside are refused
            self._tombstones_at = time.monotonic()
            records = []
            for member, score in got:
                opened = self._open_tombstone(member)
                if opened is not None:
                    records.append(opened)
                known.seen_ms = max(known.seen_ms, int(score))
            known.learn(records, loaded=True)
        finally:
            self._tombstones_lock.release()

    def _learn_announced(self, sealed: Any) -> None:
        """Take the tombstones a purge announcement carries (each sealed: a replayed
        one is a real purge again); look in Redis when they are missing or odd."""
        records = []
        if isinstance(sealed, list):
            for item in sealed:
                try:
                    opened = self._open_tombstone(base64.b64decode(item, validate=True))
                except (ValueError, TypeError):
                    opened = None
                if opened is None:
                    break
                records.append(opened)
            else:
                if records:
                    self.tombstones.learn(records)
                    return
        self._refresh_tombstones(full=True)

    def _seal_tombstone(self, plain: bytes) -> bytes:
        return self.sealer.seal(plain, self._tombstones_name.encode()) if self.sealer else plain

    def _open_tombstone(self, blob: Any) -> Optional[Tuple[str, float, float]]:
        if not isinstance(blob, (bytes, bytearray)):
            return None
        if self.sealer is None:
            return tombs.parse(bytes(blob))
        return tombs.parse(self.sealer.open(bytes(blob), self._tombstones_name.encode()))

    def bury(self, scopes: List[str], lifetime_s: float) -> List[str]:
        """Leave a tombstone for each scope (``key:<key>``, ``<kind>:<tag>``, ``all``)
        at Redis's time, alive ``lifetime_s`` seconds, then fold the set; the sealed
        records (base64) for the announcement. Raises on a Redis failure."""
        client = self._require_client()
        name = self._tombstones_name
        now_ms = int(self._time_script(keys=[name], client=client))
        expires = now_ms + min(max(1, int(lifetime_s * 1000)), _MAX_TTL_MS)
        members = [self._seal_tombstone(tombs.record(s, now_ms, expires)) for s in scopes]
        if members:
            client.zadd(name, {m: now_ms for m in members})
        self._fold_tombstones(client, now_ms)
        return [base64.b64encode(m).decode() for m in members]

    def _fold_tombstones(self, client, now_ms: int) -> None:
        """Expired tombstones, those the watermark covers and the oldest past the
        bound become one watermark record; what it replaces is removed."""
        name = self._tombstones_name
        stored = [(m, self._open_tombstone(m)) for m, _ in
                  client.zrange(name, 0, -1, withscores=True)]
        mark, live = tombs.fold([r for _, r in stored if r is not None], now_ms / 1000)
        doomed, marks = [], []
        for member, rec in stored:
            if rec is not None and rec[0] == tombs.ALL:
                marks.append((member, rec))
            elif rec is None or rec[0] not in live or rec[1] < live[rec[0]][0]:
                doomed.append(member)
        if mark > -math.inf:
            kept = [m for m, r in marks if r[1] >= mark]
            if not kept:
                mark_ms = int(round(mark * 1000))
                member = self._seal_tombstone(tombs.record(tombs.ALL, mark_ms,
                                                           now_ms + _MAX_TTL_MS))
                client.zadd(name, {member: mark_ms})
                kept = [member]
            doomed += [m for m, _ in marks if m not in kept]
        if doomed:
            client.zrem(name, *doomed)
        client.pexpire(name, _MAX_TTL_MS)

    # -- purges (ops/purge.py) --------------------------------------------------------

    def purge_keys(self, keys: List[str]) -> int:
        """Delete these entries in Redis; raises on a Redis failure (the command reports it)."""
        client = self._require_client()
        names = [self.key_prefix + k for k in keys]
        return sum(int(client.delete(n)) for n in names)

    def purge_tag(self, kind: str, value: str) -> Tuple[str, List[str], int]:
        """Delete every live entry indexed under this claim; (tag, cache keys found,
        entries deleted). Costs what the live entries cost: the index holds no others."""
        client = self._require_client()
        tag = self.tag(kind, value)
        name = self.key_prefix + INDEX + kind + ":" + tag
        keys = sorted(m.decode() if isinstance(m, bytes) else str(m)
                      for m in self._take_index_script(keys=[name], client=client))
        return tag, keys, self.purge_keys(keys)

    def purge_all(self) -> int:
        """Delete every key this plugin wrote under the key prefix (entries, leases,
        indexes), leaving anything else in the database alone; the entries deleted."""
        client = self._require_client()
        pattern = _glob_escape(self.key_prefix) + "*"
        ours = re.compile(re.escape(self.key_prefix)
                          + r"(?:[0-9a-f]{64}(" + re.escape(LEASE_SUFFIX) + r")?|"
                          + re.escape(INDEX) + r"(.*))\Z", re.S)
        count = 0
        for name in client.scan_iter(match=pattern, count=1000):
            text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            found = ours.match(text)
            if found:
                deleted = int(client.delete(name))
                if found.group(1) is None and found.group(2) is None:   # an entry
                    count += deleted
        return count

    def announce(self, message: dict) -> int:
        """Like ``publish``, but raises on failure; the number of receivers."""
        data = json.dumps(message, separators=(",", ":"))
        return int(self._require_client().publish(self.channel, data))

    def _require_client(self):
        client = self._connect()
        if client is None:
            raise RuntimeError("store is closed")
        return client

    @_never_raises(None)
    def close(self) -> None:
        self._stop.set()
        with self._client_lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            _close_client(client)
        if self._cleanup is not None:
            self._cleanup()

    # -- plumbing -----------------------------------------------------------------

    def _connect(self):
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._closed:
                return None
            if self._client is None:
                client = self._factory()  # RedisCluster connects here; may raise
                self._release_script = client.register_script(_RELEASE_LUA)
                self._lease_script = client.register_script(_LEASE_LUA)
                self._index_script = client.register_script(_INDEX_LUA)
                self._take_index_script = client.register_script(_TAKE_INDEX_LUA)
                self._time_script = client.register_script(_TIME_LUA)
                self._client = client
                if self._watch is not None:
                    threading.Thread(target=self._watch_loop, args=(client,), daemon=True,
                                     name="oauth2-introspection-store-watch").start()
            return self._client

    def _watch_loop(self, client):
        while not self._stop.wait(self._watch_interval):
            if self._backoff.failures:
                continue  # the request path probes; no need to pile up
            try:
                self._watch(client)
            except Exception:
                pass  # the request path sees (and logs) real trouble

    def _listen_loop(self):
        delay = _RESUBSCRIBE_FIRST
        while not self._stop.is_set():
            pubsub = None
            try:
                client = self._connect()
                if client is None:
                    return
                pubsub = client.pubsub()
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    if msg.get("type") == "subscribe":
                        self.subscribed = True
                        delay = _RESUBSCRIBE_FIRST
                        # Subscribed first, then loaded: a purge after the load is heard.
                        self._refresh_tombstones(full=True)
                        self._tell(None)   # whatever was sent before now was missed
                    elif msg.get("type") == "message":
                        self._dispatch(msg.get("data"))
            except Exception as err:  # noqa: BLE001 - Redis down: retry later
                if self.subscribed:
                    self.subscribed = False
                    self._tell(None)
                    self._failed(err, trip=False)
            finally:
                self.subscribed = False
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass
            self._stop.wait(delay)
            delay = min(delay * 2, _RESUBSCRIBE_MAX)

    def _dispatch(self, data):
        try:
            message = json.loads(data)
        except (ValueError, TypeError):
            return
        if isinstance(message, dict) and message.get("v") == 1:
            if message.get("op") == "purge":
                self._learn_announced(message.get("tombs"))
            self._tell(message)

    def _tell(self, message: Optional[dict]):
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the listener
                pass

    def _call(self, op, failed=None):
        if self._closed or not self._backoff.allow():
            return failed
        deadline = current_deadline()
        if deadline is not None:
            left = deadline.remaining()
            if left <= 0:
                raise DeadlineExceeded("request deadline exceeded")
            if left < self.timeout_s:
                return failed  # a socket timeout could outlast the request: skip Redis
        try:
            client = self._connect()
            if client is None:
                return failed
            result = metrics.redis_call(op, client)
        except Exception as err:
            self._failed(err)
            return failed
        if self._backoff.succeeded():
            _log(self.log, "info", f"store: {self.describe} answers again")
        return result

    def _failed(self, err: BaseException, trip: bool = True):
        delay = self._backoff.failed() if trip else None
        now = time.monotonic()
        with self._log_lock:
            if now - self._last_log < LOG_INTERVAL:
                self._suppressed += 1
                return
            self._last_log = now
            suppressed, self._suppressed = self._suppressed, 0
        text = self._redact(f"{type(err).__name__}: {err}")
        parts = [f"store: {self.describe} failed ({text})"]
        if delay is not None:
            parts.append(f"skipping Redis for {delay:g} s")
        if suppressed:
            parts.append(f"{suppressed} more failure(s) not logged")
        _log(self.log, "warn", "; ".join(parts))

    def _redact(self, text: str) -> str:
        # MasterNotFoundError lists every sentinel client's repr: keep only the causes.
        cut = text.find("<redis.")
        if cut > 0:
            causes = re.findall(r">\s+-\s+([\w:.]+)", text)
            text = text[:cut].rstrip(" :,")
            if causes:
                text += " [sentinels: " + ", ".join(causes) + "]"
        text = text.replace("\n", " ")[:300]
        for secret in self._redacted:
            text = text.replace(secret, "***")
        return text


_FAILED = object()


