"""The introspection answers the plugin remembers.

Two levels: a bounded in-process LRU, and optionally a Redis store shared by
every Kong node. Only the IdP's answer is kept, never a decision: whatever a
config checks is checked again on every request.

A concurrent miss is asked once, by one leader, and every other caller (in
this process or another sharing the Redis) waits for it on one protocol:

- in a process, the first caller of a key leads and the others wait on its
  ``Flight``;
- across processes, that leader takes a Redis lease (``store.try_lease``); a
  process that finds the lease taken waits until the holder announces how it
  ended, at most as long as the lease has left, and is woken by the
  announcement (Redis pub/sub, see ``store.py``), never by polling;
- how it ended decides what a waiter does: an answer that was stored is
  returned (it travels in the announcement, so no extra read); an inactive
  answer is returned as inactive; a ``no-store`` answer is not shared, so the
  waiter asks the IdP itself; a failure is shared (the waiter serves its own
  ``stale_if_error`` entry if its config allows, else fails as the leader
  did); a lease that expires unannounced (the leader died) is taken over.

When ``serve`` runs several processes, the in-process level is instead the
node level of ``node.py``, shared by them, and without Redis its node
locks give the same single flight across the processes.

Every wait spends from the request's deadline (``concurrency.current_deadline``;
without one, from ``Policy.wait``), and DeadlineExceeded is raised when it runs
out. A waiter never fails for having waited: when the wait bound (not the
deadline) runs out it asks the IdP itself.

Announcements also carry stored answers to every process, which keep them in
their in-process level: an answer fetched on one node is a local hit on every
other. Purges (``ops/purge.py``) travel on the same channel. While the channel is
down a process cannot hear purges, so it empties its in-process level whenever
the subscription is lost or made again.

A purge also leaves tombstones (``tombstones.py``): a value fetched before a
purge of its key or claims is refused wherever it comes from (a Redis read, an
announcement), so setting or announcing a recorded value again restores
nothing; what this process holds that a new tombstone covers is dropped, and an
answer whose fetch a purge overtook is neither kept nor shared.

Announcement format, on channel ``<key_prefix>oauth2-introspection``, JSON:
``{"v": 1, "op": "done", "from": <process id>, "key": <cache key>,
"outcome": "stored" | "inactive" | "nostore" | "failed", "value": <base64 of the
value as stored in Redis, "stored" only>}``.
"""

import base64
import hashlib
import hmac
import json
import math
import os
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from cachetools import TLRUCache

from ..ops import metrics
from . import node as nodecache
from ..concurrency import Deadline, current_deadline, deadline_scope
from ..idp.httpclient import Unsendable
from ..idp.answer import Answer, IntrospectionError
from ..kong.headers import uuid_shaped

STORED, INACTIVE, NOSTORE, FAILED = "stored", "inactive", "nostore", "failed"
_LEASE_MARGIN = 0.5   # a lease outlives its holder's own bound by this much
_UNSUBSCRIBED_LOOK = 0.05
_MAX_STORE_TTL = 366 * 86400  # ttl 0 and no exp: keep, but not forever


class Entry(NamedTuple):
    claims: Dict[str, Any]
    fetched_at: float    # wall clock; shared through the store, so every node agrees
    evict_at: float      # when no config may use it any more

    @property
    def active(self) -> bool:
        return self.claims.get("active") is True

    def encode(self) -> bytes:
        return json.dumps({"c": self.claims, "t": self.fetched_at, "e": self.evict_at},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, blob: bytes) -> Optional["Entry"]:
        try:
            data = json.loads(blob)
            entry = cls(data["c"], float(data["t"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return entry if isinstance(entry.claims, dict) else None


class Policy(NamedTuple):
    """How long one config may use an entry; configs sharing a cache differ here."""
    ttl: float
    negative_ttl: float
    stale_if_error: float
    wait: float           # longest wait for a concurrent introspection
    breaker: Any = None   # breaker.Breaker of the config's endpoint, if any

    def fresh_until(self, entry: Entry) -> float:
        if not entry.active:
            return entry.fetched_at + self.negative_ttl
        until = entry.fetched_at + self.ttl if self.ttl > 0 else math.inf
        exp = _expiry(entry.claims)
        return until if exp is None else min(until, exp)

    def stale_until(self, entry: Entry) -> float:
        if not entry.active or self.stale_if_error <= 0:
            return self.fresh_until(entry)
        until = self.fresh_until(entry) + self.stale_if_error
        exp = _expiry(entry.claims)
        return until if exp is None else min(until, exp)


def _expiry(claims) -> Optional[float]:
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and not isinstance(exp, bool) and math.isfinite(exp):
        return float(exp)
    return None


class Flight:
    """One outstanding fetch in this process that other callers wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.entry: Optional[Entry] = None        # shareable result
        self.error: Optional[Exception] = None    # the leader's failure


class _Waiter:
    """A process waiting for another process's announcement about one key."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Optional[str] = None
        self.entry: Optional[Entry] = None


def _wait_bound(policy: Policy, deadline: Optional[Deadline]) -> float:
    """Seconds a wait may take now; raises DeadlineExceeded when none are left."""
    if deadline is None:
        return policy.wait
    return deadline.timeout(policy.wait)


class TokenCache:
    """Shared by every config that asks the same IdP as the same client."""

    def __init__(self, *, key_material: bytes, store=None, maxsize: int = 10000,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        # HMAC key: a key reveals nothing about the token to whoever reads the store.
        self._hmac_key = hashlib.sha256(b"oauth2-introspection/cache\0" + key_material).digest()
        # With several processes on one node, the first level is theirs together
        # (node.py); alone, an in-process LRU.
        self._node = nodecache.level_for(self._hmac_key, encode=Entry.encode, decode=Entry.decode,
                                         evict_at=lambda e: e.evict_at, clock=clock,
                                         front_size=maxsize)
        self._local: Any = self._node if self._node is not None else TLRUCache(
            maxsize=maxsize, ttu=lambda _k, e, _now: e.evict_at, timer=clock)
        self._lock = threading.Lock()
        self._flights: Dict[str, Flight] = {}
        self._waiters: Dict[str, List[_Waiter]] = {}
        self._id = os.urandom(8).hex()   # tells our own announcements apart
        if store is not None and hasattr(store, "add_listener"):
            store.add_listener(self._on_message)
        self._tombstones = getattr(store, "tombstones", None)
        if self._tombstones is not None:
            self._tombstones.subscribe(self._sweep)

    def key(self, token: str, context: str = "") -> str:
        """The cache key of a token (and of what else the IdP was told, if anything)."""
        msg = token.encode() + b"\0" + context.encode()
        return hmac.digest(self._hmac_key, msg, "sha256").hex()   # one-shot: OpenSSL's

    def credential_id(self, key: str) -> str:
        """A stable, UUID-shaped id for the credential behind a token."""
        return uuid_shaped(hashlib.sha256(b"credential\0" + key.encode()).digest())

    def peek(self, key: str, policy: Policy) -> Optional[Entry]:
        """The in-process entry for ``key`` if it is fresh for ``policy``; no I/O, no waits."""
        with self._lock:
            entry = self._local.get(key)
        if entry is not None and policy.fresh_until(entry) > self.clock():
            metrics.cache("hit")
            return entry
        return None

    def get(self, key: str, fetch: Callable[[], Answer], policy: Policy, *,
            breaker=None, deadline: Optional[Deadline] = None) -> Entry:
        """The entry for ``key``, asking ``fetch`` (the IdP) only when needed.

        Raises IntrospectionError when the IdP fails (or ``breaker``, by default
        the policy's, is open) and nothing may be served, DeadlineExceeded when the
        request's time is up.
        """
        if breaker is None:
            breaker = policy.breaker
        if deadline is not None and deadline is not current_deadline():
            with deadline_scope(deadline):
                return self._get(key, fetch, policy, breaker, deadline)
        return self._get(key, fetch, policy, breaker, current_deadline())

    def _get(self, key, fetch, policy, breaker, deadline) -> Entry:
        now = self.clock()
        with self._lock:
            entry = self._local.get(key)
            if entry is not None and policy.fresh_until(entry) > now:
                metrics.cache("hit")
                return entry
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = Flight()
        assert flight is not None
        if not leader:
            if flight.done.wait(_wait_bound(policy, deadline)):
                if flight.entry is not None:
                    metrics.cache("coalesced")
                    return flight.entry
                if flight.error is not None:
                    return self._failed(flight.error, entry, policy)
            elif deadline is not None:
                deadline.timeout()  # raises when the deadline (not the bound) ran out
            # A no-store answer, or a leader slower than its own bound: ask ourselves.
            return self._fetch(key, fetch, policy, entry, breaker, leased=False)[0]
        try:
            result, shareable = self._lead(key, fetch, policy, entry, breaker, deadline)
            if shareable:
                flight.entry = result
            return result
        except Exception as err:
            # Waiters share the failure, whatever it was (a leader out of time
            # included): asking again at once would only pile onto a failing IdP.
            flight.error = err if isinstance(err, IntrospectionError) else IntrospectionError(
                "a concurrent introspection failed (%s)" % type(err).__name__)
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    def _lead(self, key, fetch, policy, stale, breaker, deadline) -> Tuple[Entry, bool]:
        store = self.store
        if store is None:
            if self._node is not None:
                return self._node_lead(key, fetch, policy, stale, breaker, deadline)
            return self._fetch(key, fetch, policy, stale, breaker, leased=False)
        shared = self._from_store(key, policy)
        if shared is not None:
            return shared, True
        waiter = _Waiter()
        with self._lock:
            self._waiters.setdefault(key, []).append(waiter)
        try:
            # Registered before trying the lease: an announcement sent after our try
            # reaches us, and a holder that finished before it has released the lease.
            bound = time.monotonic() + _wait_bound(policy, deadline)
            while True:
                lease_s = policy.wait if deadline is None else min(policy.wait,
                                                                   deadline.remaining())
                held = store.try_lease(key, int((lease_s + _LEASE_MARGIN) * 1000))
                if held == 0.0:
                    break
                left = bound - time.monotonic()
                if left <= 0:
                    if deadline is not None:
                        deadline.timeout()
                    return self._fetch(key, fetch, policy, stale, breaker, leased=False)
                if deadline is not None:
                    left = deadline.timeout(left)
                if not getattr(store, "subscribed", True):
                    # No announcement can reach us (the subscription is being made
                    # again): look at the lease often instead of sleeping it out.
                    held = min(held, _UNSUBSCRIBED_LOOK)
                if not waiter.done.wait(min(held, left)):
                    continue    # lease expired unannounced (holder died): take it over
                outcome, entry = waiter.outcome, waiter.entry
                if outcome in (STORED, INACTIVE) and entry is not None:
                    metrics.cache("coalesced")
                    return entry, True
                if outcome == FAILED:
                    return self._failed(IntrospectionError(
                        "introspection failed in another process"), stale, policy), False
                if outcome == NOSTORE:
                    return self._fetch(key, fetch, policy, stale, breaker, leased=False)
                # An announcement we could not use: wait again for a fresh one.
                waiter.done.clear()
                waiter.outcome = waiter.entry = None
        finally:
            with self._lock:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting.remove(waiter)
                    if not waiting:
                        del self._waiters[key]
        # We hold the lease. The previous holder may have written the entry and
        # released the lease between our first look and our lease.
        shared = self._from_store(key, policy)
        if shared is not None:
            store.release(key)
            return shared, True
        return self._fetch(key, fetch, policy, stale, breaker, leased=True)

    def _node_lead(self, key, fetch, policy, stale, breaker, deadline) -> Tuple[Entry, bool]:
        """Without Redis, across the node's processes: the one holding the key's
        node lock asks; the others wait for it and use what it left."""
        assert self._node is not None
        flight = self._node.flight(key, _wait_bound(policy, deadline), deadline)
        try:
            # Another process may have written it since our look, waited or not.
            with self._lock:
                entry = self._local.get(key)
            if entry is not None and policy.fresh_until(entry) > self.clock():
                metrics.cache("coalesced")
                return entry, True
            if flight.seen == INACTIVE:
                now = self.clock()
                return Entry({"active": False}, now, now), True
            if flight.seen == FAILED:
                return self._failed(IntrospectionError(
                    "introspection failed in another process"), stale, policy), False
            # No-store, a leader that died, or another key's stripe: ask ourselves.
            return self._fetch(key, fetch, policy, stale, breaker, leased=False,
                               tell=flight.ended if flight.held else None)
        finally:
            flight.release()

    def _fetch(self, key, fetch, policy, stale, breaker, *, leased,
               tell=None) -> Tuple[Entry, bool]:
        """Ask the IdP; keep and (when leading across processes) announce the result
        (through Redis when ``leased``, else to ``tell``). Returns the entry and
        whether waiters may share it."""
        store = self.store
        metrics.cache("miss")
        outcome, blob = FAILED, None
        known = self._tombstones
        generation = known.generation if known is not None else 0
        try:
            try:
                answer = self._ask(fetch, breaker)
            except IntrospectionError as err:
                return self._failed(err, stale, policy), False
            now = self.clock()
            entry = Entry(answer.claims, now, now)
            entry = entry._replace(evict_at=policy.stale_until(entry))
            # A purge heard while the IdP was answering may postdate the answer: use
            # it for this request only.
            overtaken = known is not None and known.generation != generation \
                and known.covers(key, entry.claims, now)
            if answer.cacheable and entry.evict_at > now and not overtaken:
                outcome = STORED
                with self._lock:
                    self._local[key] = entry
                if store is not None:
                    ttl = min(entry.evict_at - now, _MAX_STORE_TTL)
                    value = entry.encode()
                    store.set(key, value, ttl)
                    tags = _tags(entry)
                    if tags:
                        store.index(key, tags, ttl)
                    if leased:
                        blob = store.seal(key, value)
            else:
                outcome = INACTIVE if not entry.active else NOSTORE
            return entry, outcome != NOSTORE
        finally:
            if leased:
                # Clean-up, not waiting: followers depend on it even past our deadline.
                with deadline_scope(None):
                    self._announce(key, outcome, blob)
            elif tell is not None:
                tell(key, outcome)

    def _announce(self, key: str, outcome: str, blob: Optional[bytes]) -> None:
        """Release the lease, then tell every process how the fetch ended (in this
        order: a follower that registers after the message finds the lease free)."""
        store = self.store
        store.release(key)
        message: Dict[str, Any] = {"v": 1, "op": "done", "from": self._id,
                                   "key": key, "outcome": outcome}
        if blob is not None:
            message["value"] = base64.b64encode(blob).decode()
        store.publish(message)

    @staticmethod
    def _ask(fetch, breaker) -> Answer:
        if breaker is None:
            return fetch()
        if not breaker.allow():
            raise IntrospectionError("circuit breaker open: introspection endpoint not asked",
                                     "idp_circuit_open")
        try:
            answer = fetch()
        except Unsendable:
            breaker.release()   # nothing was sent: it says nothing about the IdP
            raise
        except BaseException:
            breaker.failed()
            raise
        breaker.succeeded()
        return answer

    def _failed(self, err: Exception, stale: Optional[Entry], policy: Policy) -> Entry:
        if stale is not None and policy.stale_until(stale) > self.clock():
            metrics.cache("stale")
            return stale
        raise err

    def _from_store(self, key: str, policy: Policy) -> Optional[Entry]:
        blob = self.store.get(key)
        entry = Entry.decode(blob) if blob else None
        if entry is None or policy.fresh_until(entry) <= self.clock():
            return None
        if self._refused(key, entry):
            return None
        with self._lock:
            self._local[key] = entry
        metrics.cache("shared_hit")
        return entry

    # -- announcements from other processes (on the store's listener thread) -------

    def _on_message(self, message: Optional[dict]) -> None:
        if message is None:
            # Subscription made or lost: purges may have been missed.
            with self._lock:
                self._local.clear()
            return
        op = message.get("op")
        if op == "done":
            self._on_done(message)
        elif op == "purge":
            self._on_purge(message)

    def _on_done(self, message: dict) -> None:
        key, outcome = message.get("key"), message.get("outcome")
        if not isinstance(key, str) or message.get("from") == self._id:
            return
        entry: Optional[Entry] = None
        now = self.clock()
        if outcome == STORED:
            try:
                blob = self.store.unseal(key, base64.b64decode(message.get("value", "")))
            except (ValueError, TypeError):
                blob = None
            entry = Entry.decode(blob) if blob else None
            if entry is not None and entry.evict_at > now and not self._refused(key, entry):
                with self._lock:
                    self._local[key] = entry
            else:
                entry, outcome = None, None
        elif outcome == INACTIVE:
            entry = Entry({"active": False}, now, now)
        with self._lock:
            waiting = list(self._waiters.get(key, ()))
        for waiter in waiting:
            waiter.outcome, waiter.entry = outcome, entry
            waiter.done.set()

    def _on_purge(self, message: dict) -> None:
        by, ids = message.get("by"), message.get("ids")
        keys = message.get("keys")
        ids = [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []
        keys = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
        with self._lock:
            if by == "all":
                self._local.clear()
                return
            for k in keys + (ids if by == "key" else []):
                self._local.pop(k, None)
            if by in ("sub", "client_id") and ids:
                wanted = set(ids)
                items = list(self._local.items()) if self._node is None else []
        if by in ("sub", "client_id") and ids:
            if self._node is not None:
                items = self._node.items()   # a scan of the node: not under our lock
            # Entries only this process holds (its Redis write failed) are found by claim.
            doomed = [k for k, e in items
                      if isinstance(e.claims.get(by), str)
                      and self.store.tag(by, e.claims[by]) in wanted]
            with self._lock:
                for k in doomed:
                    self._local.pop(k, None)

    def _refused(self, key: str, entry: Entry) -> bool:
        """A value from outside this process, fetched before a purge covering it."""
        refused = getattr(self.store, "refused", None)
        return refused is not None and refused(key, entry.claims, entry.fetched_at)

    def _sweep(self) -> None:
        """New tombstones: forget what this process holds that they cover."""
        known = self._tombstones
        if known is None:
            return
        with self._lock:
            items = list(self._local.items())
        doomed = [k for k, e in items if known.covers(k, e.claims, e.fetched_at)]
        if doomed:
            with self._lock:
                for k in doomed:
                    self._local.pop(k, None)

    def drop(self, keys) -> None:
        """Forget these keys in this process (a purge from this process)."""
        with self._lock:
            for k in keys:
                self._local.pop(k, None)


def _tags(entry: Entry) -> List[Tuple[str, str]]:
    """The claims an entry is indexed under, for purges by sub or client_id."""
    if not entry.active:
        return []
    return [(kind, entry.claims[kind]) for kind in ("sub", "client_id")
            if isinstance(entry.claims.get(kind), str) and entry.claims[kind]]
