"""The token cache every process of one plugin server shares: LMDB in the node directory.

When ``serve`` runs several processes (``node.directory()`` is set), the first
level of ``cache.TokenCache`` is a ``NodeLevel`` instead of a per-process LRU,
so an answer fetched by one process is a hit in all of them and a token costs
one IdP call per node, not one per process. Without a node directory nothing
here is used.

Layout, in ``<node directory>/cache/``:

- ``data.mdb``/``lock.mdb``: an LMDB environment (memory-mapped, the store Kong
  itself uses) with two databases. ``entries`` maps ``namespace (8 bytes) ||
  cache key (32 bytes)`` to ``write id (8 random bytes) || evict_at (float64)
  || sealed entry``; ``flights`` maps the same keys to how the last fetch of a
  key ended when it left no entry (``at`` on the system-wide monotonic clock,
  then the outcome).
- ``flights.lock``: byte-range locks. Byte 0 is held shared by every live
  process; one that can take it exclusively is alone and empties the cache
  first, so a restarted plugin server starts cold, as it always did. Bytes
  1..STRIPES are the single-flight locks of the keys hashing there.

Each ``TokenCache`` gets a namespace (a hash of its HMAC key) and seals its
entries with AES-GCM under a key derived from the same key material, with the
LMDB key as associated data: the file shows no token (keys are the cache's
HMACs) and no claim to whoever lacks the plugin's config.

Single flight across processes: the process that takes a key's stripe lock
asks the IdP; the others try the lock every few milliseconds (``fcntl`` has no
timed wait), within the wait bound and the request's deadline, then read what
the leader left: an entry (a hit), or a ``flights`` record saying the answer
was inactive, not to be stored, or a failure (shared, as within a process). A
leader that dies loses its lock with its file descriptors, and leaves no
record: the next process takes over.

Size: at most ``max_entries`` entries (and ``map_size`` bytes). A write past
the cap deletes a few entries from a random point of the key space (keys are
HMACs, so that is random eviction), the expired ones of that window first:
the cost of a write stays bounded, and reads never write (an LRU would make
every hit a write).

Hits: each process keeps the decoded entries it read in a small in-process
LRU tagged with their write id. A hit still reads the 8-byte write id from
LMDB (one read transaction, no decoding or decryption), and uses its copy only
while LMDB holds that same write: an entry deleted or replaced in another
process (a purge, a refresh) is never served from the copy.
"""

import fcntl
import hashlib
import os
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import lmdb
from cachetools import LRUCache

from .. import node
from ..concurrency import Deadline
from ..ops.log import LOG
from .store import Sealer

STRIPES = 1 << 16                 # distinct keys share a stripe rarely, and then wait
MAP_SIZE = 512 * 1024 * 1024      # address space only: the file grows as it fills
MAX_ENTRIES = 100_000
FRONT_SIZE = 10_000               # decoded entries one process keeps
FLIGHT_RECORD_S = 120.0           # a flights record older than this is garbage
_EVICT_WINDOW = 64
_POLL_FIRST, _POLL_MAX = 0.0005, 0.008
_HEAD = struct.Struct("<8sd")     # write id, evict_at
_RECORD = struct.Struct("<d")     # at (monotonic), then the outcome in ASCII
_NS = 8


class _Env:
    """One process's handle on the node's LMDB environment and lock file."""

    def __init__(self, path: str, map_size: int):
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.pid = os.getpid()
        self.lock_fd = os.open(os.path.join(path, "flights.lock"),
                               os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        alone = _try_lock(self.lock_fd, 0, exclusive=True)
        self.env = lmdb.open(path, map_size=map_size, max_dbs=2, max_readers=1024,
                             subdir=True, mode=0o600, sync=False, metasync=False,
                             readahead=False, meminit=False)
        self.entries = self.env.open_db(b"entries")
        self.flights = self.env.open_db(b"flights")
        if alone:
            # No other process of this plugin server lives: what the file holds is
            # from an earlier run, which purges may have passed by. Start cold.
            with self.env.begin(write=True) as txn:
                txn.drop(self.entries, delete=False)
                txn.drop(self.flights, delete=False)
        # Shared from now on (a downgrade, when we had it exclusively): we live.
        fcntl.lockf(self.lock_fd, fcntl.LOCK_SH, 1, 0, os.SEEK_SET)
        # POSIX locks belong to the process, not the thread: one thread per stripe.
        self._stripes: Dict[int, threading.Lock] = {}
        self._stripes_lock = threading.Lock()

    def stripe_lock(self, stripe: int) -> threading.Lock:
        with self._stripes_lock:
            lock = self._stripes.get(stripe)
            if lock is None:
                lock = self._stripes[stripe] = threading.Lock()
            return lock


def _try_lock(fd: int, offset: int, *, exclusive: bool) -> bool:
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB,
                    1, offset, os.SEEK_SET)
        return True
    except OSError:
        return False


_envs: Dict[str, _Env] = {}
_envs_lock = threading.Lock()


def _env(directory: str, map_size: int) -> _Env:
    """The environment of ``directory`` for this process (LMDB allows one per
    process; a forked child opens its own)."""
    path = os.path.join(directory, "cache")
    with _envs_lock:
        env = _envs.get(path)
        if env is None or env.pid != os.getpid():
            env = _envs[path] = _Env(path, map_size)
        return env


_warned = False


def level_for(key_material: bytes, **kwargs: Any) -> Optional["NodeLevel"]:
    """The node level of a cache keyed with ``key_material``, or None when this
    process runs alone or the node cache cannot be opened (then each process
    caches alone: more IdP calls, nothing less safe)."""
    global _warned
    directory = node.directory()
    if directory is None:
        return None
    try:
        return NodeLevel(directory, key_material, **kwargs)
    except (lmdb.Error, OSError) as err:
        if not _warned:
            _warned = True
            LOG.warn("node cache unavailable (%s): each process keeps its own cache"
                     % type(err).__name__)
        return None


class NodeFlight:
    """This process's part in one key's fetch across the node's processes."""

    __slots__ = ("_level", "_stripe", "_thread_lock", "held", "waited", "seen")

    def __init__(self, level: "NodeLevel", stripe: int, thread_lock: Optional[threading.Lock],
                 held: bool, waited: bool, seen: Optional[str]):
        self._level, self._stripe, self._thread_lock = level, stripe, thread_lock
        self.held = held        # we lead: the other processes wait for us
        self.waited = waited    # another fetch of this stripe ran while we waited
        self.seen = seen        # how a fetch of this key ended while we waited, if it left no entry

    def ended(self, key: str, outcome: str) -> None:
        """Record how our fetch ended, for the processes waiting on us (before release)."""
        if self.held and outcome != "stored":
            self._level.record(key, outcome)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                fcntl.lockf(self._level.env.lock_fd, fcntl.LOCK_UN, 1, self._stripe, os.SEEK_SET)
            except OSError:
                pass
        if self._thread_lock is not None:
            self._thread_lock.release()
            self._thread_lock = None


class NodeLevel:
    """The first level of one TokenCache, shared by the node's processes.

    Speaks the part of a mapping ``TokenCache`` uses of its LRU (``get``, item
    assignment, ``pop``, ``clear``, ``items``) over values of its own type, which
    ``encode``/``decode`` turn into bytes and ``evict_at`` says how long to keep.
    """

    def __init__(self, directory: str, key_material: bytes, *,
                 encode: Callable[[Any], bytes], decode: Callable[[bytes], Any],
                 evict_at: Callable[[Any], float], clock: Callable[[], float] = time.time,
                 map_size: int = MAP_SIZE, max_entries: int = MAX_ENTRIES,
                 front_size: int = FRONT_SIZE):
        self.env = _env(directory, map_size)
        self._ns = hashlib.sha256(b"oauth2-introspection/node-ns\0" + key_material).digest()[:_NS]
        self._sealer = Sealer(hashlib.sha256(b"oauth2-introspection/node-seal\0"
                                             + key_material).digest())
        self._encode, self._decode, self._evict_at = encode, decode, evict_at
        self.clock = clock
        self.max_entries = max_entries
        self._front: LRUCache = LRUCache(maxsize=front_size)
        self._front_lock = threading.Lock()

    def _k(self, key: str) -> bytes:
        try:
            return self._ns + bytes.fromhex(key)
        except ValueError:   # not one of our HMACs: still a key, never a crash
            return self._ns + hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    # -- the mapping TokenCache uses --------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self._get(key, default)
        except (lmdb.Error, struct.error):
            return default   # a miss: the IdP is asked, as without the node cache

    def _get(self, key: str, default: Any) -> Any:
        k = self._k(key)
        env = self.env
        with env.env.begin(db=env.entries, buffers=True) as txn:
            raw = txn.get(k)
            if raw is None:
                wid = None
            else:
                wid, evict_at = _HEAD.unpack_from(raw)
                if evict_at <= self.clock():
                    return default
                with self._front_lock:
                    mine = self._front.get(key)
                if mine is not None and mine[0] == wid:
                    return mine[1]
                sealed = bytes(raw[_HEAD.size:])
        if wid is None:
            with self._front_lock:
                self._front.pop(key, None)
            return default
        plain = self._sealer.open(sealed, k)
        value = self._decode(plain) if plain is not None else None
        if value is None:
            return default
        with self._front_lock:
            self._front[key] = (wid, value)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        k = self._k(key)
        wid = os.urandom(8)
        blob = _HEAD.pack(wid, self._evict_at(value)) + self._sealer.seal(self._encode(value), k)
        try:
            if not self._put(k, blob):
                self._evict(self.max_entries // 10 + 1)
                if not self._put(k, blob):
                    return   # larger than the map can hold: stays uncached
        except (lmdb.Error, struct.error):
            return           # uncached: the next request asks again
        with self._front_lock:
            self._front[key] = (wid, value)

    def pop(self, key: str, default: Any = None) -> Any:
        with self._front_lock:
            self._front.pop(key, None)
        with self.env.env.begin(write=True) as txn:
            txn.delete(self._k(key), db=self.env.entries)
        return default

    def clear(self) -> None:
        with self._front_lock:
            self._front.clear()
        with self.env.env.begin(write=True) as txn:
            for db in (self.env.entries, self.env.flights):
                cursor = txn.cursor(db)
                if cursor.set_range(self._ns):
                    while cursor.key()[:_NS] == self._ns:
                        if not cursor.delete():
                            break

    def items(self) -> List[Tuple[str, Any]]:
        """Every live entry of this namespace, decoded (for purges by claim: rare,
        and a scan; call it without holding locks the hit path takes)."""
        now, found = self.clock(), []
        with self.env.env.begin(db=self.env.entries) as txn:
            cursor = txn.cursor()
            if cursor.set_range(self._ns):
                for k, raw in cursor:
                    if k[:_NS] != self._ns:
                        break
                    wid, evict_at = _HEAD.unpack_from(raw)
                    if evict_at > now:
                        found.append((k, wid, raw))
        out = []
        for k, wid, raw in found:
            key = k[_NS:].hex()
            with self._front_lock:
                mine = self._front.get(key)
            if mine is not None and mine[0] == wid:
                out.append((key, mine[1]))
                continue
            plain = self._sealer.open(raw[_HEAD.size:], k)
            value = self._decode(plain) if plain is not None else None
            if value is not None:
                out.append((key, value))
        return out

    def __len__(self) -> int:
        return sum(1 for _ in self._keys())

    def _keys(self) -> Iterator[bytes]:
        with self.env.env.begin(db=self.env.entries) as txn:
            cursor = txn.cursor()
            if cursor.set_range(self._ns):
                for k in cursor.iternext(values=False):
                    if k[:_NS] != self._ns:
                        break
                    yield k

    # -- writes and eviction --------------------------------------------------------

    def _put(self, k: bytes, blob: bytes) -> bool:
        env = self.env
        try:
            with env.env.begin(write=True) as txn:
                txn.put(k, blob, db=env.entries)
                excess = txn.stat(env.entries)["entries"] - self.max_entries
                if excess > 0:
                    self._evict_in(txn, excess, keep=k)
            return True
        except lmdb.MapFullError:
            return False

    def _evict(self, count: int) -> None:
        try:
            with self.env.env.begin(write=True) as txn:
                self._evict_in(txn, count, keep=None)
        except lmdb.Error:
            pass

    def _evict_in(self, txn, count: int, keep: Optional[bytes]) -> None:
        """Delete ``count`` entries (and old flight records) near a random key."""
        env, now = self.env, self.clock()
        window: List[Tuple[bytes, bool]] = []
        cursor = txn.cursor(env.entries)
        if not cursor.set_range(os.urandom(_NS + 32)):
            cursor.first()
        for k, raw in cursor:
            window.append((bytes(k), _HEAD.unpack_from(raw)[1] <= now))
            if len(window) >= max(_EVICT_WINDOW, 2 * count):
                break
        if len(window) < count and cursor.first():   # wrapped round the key space
            for k, raw in cursor:
                if len(window) >= max(_EVICT_WINDOW, 2 * count):
                    break
                window.append((bytes(k), _HEAD.unpack_from(raw)[1] <= now))
        window.sort(key=lambda item: not item[1])   # expired first
        doomed = [k for k, _expired in window if k != keep][:max(count, sum(e for _k, e in window))]
        for k in doomed:
            txn.delete(k, db=env.entries)
        if doomed:
            with self._front_lock:
                for k in doomed:
                    if k[:_NS] == self._ns:
                        self._front.pop(k[_NS:].hex(), None)
        old = time.monotonic() - FLIGHT_RECORD_S
        cursor = txn.cursor(env.flights)
        if cursor.set_range(os.urandom(_NS + 32)) or cursor.first():
            for _ in range(_EVICT_WINDOW):
                k, raw = cursor.item()
                if not k:          # past the last record
                    break
                if len(raw) < _RECORD.size or _RECORD.unpack_from(raw)[0] < old:
                    if not cursor.delete():
                        break
                elif not cursor.next():
                    break

    # -- single flight across processes ---------------------------------------------

    def flight(self, key: str, bound: float, deadline: Optional[Deadline]) -> NodeFlight:
        """Lead the fetch of ``key`` on this node, or wait (at most ``bound`` seconds,
        and never past ``deadline``) for the process that does. The caller must
        ``release()`` what it gets, and reads ``seen`` and the entry afterwards.
        Raises DeadlineExceeded when the deadline runs out while waiting."""
        k = self._k(key)
        stripe = self.stripe(key)
        env = self.env
        started = time.monotonic()
        until = started + bound
        thread_lock = env.stripe_lock(stripe)
        waited = False
        if not thread_lock.acquire(blocking=False):
            waited = True
            if not thread_lock.acquire(timeout=max(0.0, _left(until, deadline))):
                _check(deadline)
                return NodeFlight(self, stripe, None, False, waited, None)
        delay = _POLL_FIRST
        while not _try_lock(env.lock_fd, stripe, exclusive=True):
            waited = True
            left = _left(until, deadline)
            if left <= 0:
                try:
                    _check(deadline)
                except BaseException:
                    thread_lock.release()
                    raise
                # Gave up on a slow leader: ask ourselves, without the lock.
                return NodeFlight(self, stripe, thread_lock, False, waited,
                                  self._seen(k, started))
            time.sleep(min(delay, left))
            delay = min(delay * 2, _POLL_MAX)
        return NodeFlight(self, stripe, thread_lock, True, waited,
                          self._seen(k, started) if waited else None)

    def stripe(self, key: str) -> int:
        """The byte of the lock file that is ``key``'s single-flight lock."""
        return 1 + int.from_bytes(hashlib.sha256(self._k(key)).digest()[:4], "big") % STRIPES

    def record(self, key: str, outcome: str) -> None:
        """Say how a fetch of ``key`` ended when it left no entry."""
        try:
            with self.env.env.begin(write=True) as txn:
                txn.put(self._k(key), _RECORD.pack(time.monotonic()) + outcome.encode(),
                        db=self.env.flights)
        except lmdb.Error:
            pass   # waiters then ask the IdP themselves: a duplicate call, nothing worse

    def _seen(self, k: bytes, since: float) -> Optional[str]:
        with self.env.env.begin(db=self.env.flights) as txn:
            raw = txn.get(k)
        if raw is None or _RECORD.unpack_from(raw)[0] < since:
            return None
        return bytes(raw[_RECORD.size:]).decode("ascii", "replace")


def _left(until: float, deadline: Optional[Deadline]) -> float:
    left = until - time.monotonic()
    return left if deadline is None else min(left, deadline.remaining())


def _check(deadline: Optional[Deadline]) -> None:
    if deadline is not None:
        deadline.timeout()   # raises DeadlineExceeded when the deadline (not the bound) ran out
