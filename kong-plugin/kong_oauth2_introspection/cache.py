"""The introspection answers the plugin remembers.

Two levels: a bounded in-process LRU, and optionally a Redis store shared by
every Kong node. Only the IdP's answer is kept, never a decision: whatever a
config checks is checked again on every request.

A concurrent miss is asked once: within a process the first caller asks and
the others wait for its answer (single flight); across processes and nodes a
short Redis lease lets one caller ask while the others poll the store.
"""

import hashlib
import hmac
import json
import math
import threading
import time
import uuid
from typing import Any, Callable, Dict, NamedTuple, Optional

from cachetools import TLRUCache

from .introspection import Answer, IntrospectionError

_POLL_INTERVAL = 0.01
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
    """One outstanding fetch that other callers wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.entry: Optional[Entry] = None
        self.error: Optional[Exception] = None


class TokenCache:
    """Shared by every config that asks the same IdP as the same client."""

    def __init__(self, *, key_material: bytes, store=None, maxsize: int = 10000,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        # HMAC key: a key reveals nothing about the token to whoever reads the store.
        self._hmac_key = hashlib.sha256(b"oauth2-introspection/cache\0" + key_material).digest()
        self._local = TLRUCache(maxsize=maxsize, ttu=lambda _k, e, _now: e.evict_at,
                                timer=clock)
        self._lock = threading.Lock()
        self._flights: Dict[str, Flight] = {}

    def key(self, token: str, context: str = "") -> str:
        """The cache key of a token (and of what else the IdP was told, if anything)."""
        msg = token.encode() + b"\0" + context.encode()
        return hmac.new(self._hmac_key, msg, hashlib.sha256).hexdigest()

    def credential_id(self, key: str) -> str:
        """A stable, UUID-shaped id for the credential behind a token."""
        return str(uuid.UUID(bytes=hashlib.sha256(b"credential\0" + key.encode()).digest()[:16]))

    def get(self, key: str, fetch: Callable[[], Answer], policy: Policy) -> Entry:
        """The entry for ``key``, asking ``fetch`` (the IdP) only when needed.

        Raises IntrospectionError when the IdP fails and nothing may be served.
        """
        now = self.clock()
        with self._lock:
            entry = self._local.get(key)
            if entry is not None and policy.fresh_until(entry) > now:
                return entry
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = Flight()
        if not leader:
            if not flight.done.wait(policy.wait):
                raise IntrospectionError("gave up waiting for a concurrent introspection")
            if flight.error is not None:
                raise flight.error
            return flight.entry
        try:
            flight.entry = self._lead(key, fetch, policy, entry)
            return flight.entry
        except Exception as err:
            flight.error = err
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    def _lead(self, key: str, fetch, policy: Policy, stale: Optional[Entry]) -> Entry:
        store = self.store
        leased = False
        if store is not None:
            shared = self._from_store(key, policy)
            if shared is not None:
                return shared
            leased = store.lease(key, max(1, int(policy.wait * 1000)))
            # Check again once leased: the previous holder may have written the entry
            # and released the lease between our first look and our lease.
            shared = self._from_store(key, policy) if leased else self._await_store(key, policy)
            if shared is not None:
                if leased:
                    store.release(key)
                return shared
        try:
            try:
                answer = fetch()
            except IntrospectionError:
                if stale is not None and policy.stale_until(stale) > self.clock():
                    return stale
                raise
            now = self.clock()
            entry = Entry(answer.claims, now, now)
            entry = entry._replace(evict_at=policy.stale_until(entry))
            if answer.cacheable and entry.evict_at > now:
                with self._lock:
                    self._local[key] = entry
                if store is not None:
                    store.set(key, entry.encode(), min(entry.evict_at - now, _MAX_STORE_TTL))
            return entry
        finally:
            if leased:
                store.release(key)

    def _from_store(self, key: str, policy: Policy) -> Optional[Entry]:
        blob = self.store.get(key)
        entry = Entry.decode(blob) if blob else None
        if entry is None or policy.fresh_until(entry) <= self.clock():
            return None
        with self._lock:
            self._local[key] = entry
        return entry

    def _await_store(self, key: str, policy: Policy) -> Optional[Entry]:
        # Another process holds the lease and is asking the IdP: wait for its entry.
        deadline = time.monotonic() + policy.wait
        while time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL)
            entry = self._from_store(key, policy)
            if entry is not None:
                return entry
        return None
