"""Issued tokens, kept while they are valid, asked for once per client at a time.

Level one is a bounded in-process LRU; level two, optionally, the Redis store
shared by every node (``store.RedisStore``: values sealed with AES-GCM). An
entry is named by a keyed hash (HMAC-SHA256) of the client credentials and
what the token is asked for: the store never sees a credential, and without
the key nobody can test a guessed secret against it.

A token is kept until ``margin`` seconds before its ``exp`` (a quarter of its
lifetime, at most ``MARGIN_MAX``), so the upstream never gets one about to
expire. Only a token that passed verification is kept; failures never are.

Single flight: within a process the first caller asks and the others wait for
its answer; across processes and nodes a Redis lease lets one caller ask while
the others poll the store.
"""

import hashlib
import hmac
import secrets
import threading
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from cachetools import TLRUCache

from ..concurrency import Deadline
from .authserver import Credentials, ServerError

MARGIN_MAX = 30.0
_POLL_INTERVAL = 0.02


class Token(NamedTuple):
    value: str
    claims: Dict[str, Any]
    refresh_at: float    # wall clock


def refresh_at(claims: Dict[str, Any], now: float) -> float:
    """When a token stops being served: shortly before its ``exp``."""
    exp = float(claims["exp"])
    iat = claims.get("iat")
    start = float(iat) if isinstance(iat, (int, float)) and not isinstance(iat, bool) \
        and iat <= now else now
    return exp - min(MARGIN_MAX, max(0.0, exp - start) / 4)


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.token: Optional[Token] = None
        self.error: Optional[BaseException] = None


# fetch(creds, deadline) asks the server and verifies: a Token or an exception.
Fetch = Callable[[Credentials, Optional[Deadline]], Token]
# check(value, deadline) verifies a token read from the store: a Token or an exception.
Check = Callable[[str, Optional[Deadline]], Token]


class TokenCache:
    def __init__(self, *, hmac_key: Optional[bytes], context: str, fetch: Fetch, check: Check,
                 store: Any = None, wait: float = 30.0, maxsize: int = 10000,
                 clock: Callable[[], float] = time.time):
        # No shared secret (no store): a random key, good for this process only.
        self._key = hashlib.sha256(b"oauth2-client-credentials/key\0"
                                   + (hmac_key or secrets.token_bytes(32))).digest()
        self._context = context.encode()
        self.fetch = fetch
        self.check = check
        self.store = store
        self.wait = wait
        self.clock = clock
        self._local: TLRUCache = TLRUCache(maxsize=maxsize, ttu=lambda _k, t, _n: t.refresh_at,
                                           timer=clock)
        self._lock = threading.Lock()
        self._flights: Dict[str, _Flight] = {}

    def key(self, creds: Credentials) -> str:
        msg = self._context + b"\0" + creds.basic.encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def cached(self, key: str) -> Optional[Token]:
        """The token held in this process, if still fresh: no I/O, no waiting."""
        with self._lock:
            token = self._local.get(key)
        return token if token is not None and token.refresh_at > self.clock() else None

    def obtain(self, key: str, creds: Credentials, deadline: Optional[Deadline]) -> Token:
        """A fresh token for ``creds``: cached, or asked for (blocks; run it off the loop)."""
        with self._lock:
            token = self._local.get(key)
            if token is not None and token.refresh_at > self.clock():
                return token
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if not flight.done.wait(self._wait_for(deadline)):
                raise ServerError("gave up waiting for a concurrent token request")
            if flight.error is not None:
                raise flight.error
            assert flight.token is not None
            return flight.token
        try:
            flight.token = self._lead(key, creds, deadline)
            return flight.token
        except BaseException as err:
            flight.error = err
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    def _wait_for(self, deadline: Optional[Deadline]) -> float:
        return min(self.wait, deadline.remaining()) if deadline is not None else self.wait

    def _lead(self, key: str, creds: Credentials, deadline: Optional[Deadline]) -> Token:
        store, leased = self.store, False
        if store is not None:
            token = self._from_store(key, deadline)
            if token is not None:
                return token
            leased = store.lease(key, self._lease_ms(deadline))
            if leased:   # look once more: the previous holder may have just written it
                token = self._from_store(key, deadline)
            else:        # another process is asking: wait for what it writes
                token, leased = self._await_store(key, deadline)
            if token is not None:
                if leased:
                    store.release(key)
                return token
        try:
            token = self.fetch(creds, deadline)
            now = self.clock()
            if token.refresh_at > now:
                with self._lock:
                    self._local[key] = token
                if store is not None:
                    store.set(key, token.value.encode(), token.refresh_at - now)
            return token
        finally:
            if leased:
                store.release(key)

    def _from_store(self, key: str, deadline: Optional[Deadline]) -> Optional[Token]:
        blob = self.store.get(key)
        if not blob:
            return None
        try:
            # Verified again: keys rotate, and a value is only as good as its signature.
            token = self.check(blob.decode(), deadline)
        except Exception:   # noqa: BLE001 - unusable: ask the server instead
            return None
        if token.refresh_at <= self.clock():
            return None
        with self._lock:
            self._local[key] = token
        return token

    def _lease_ms(self, deadline: Optional[Deadline]) -> int:
        return max(1, int(self._wait_for(deadline) * 1000))

    def _await_store(self, key: str, deadline: Optional[Deadline]
                     ) -> Tuple[Optional[Token], bool]:
        """(the token another process wrote, False), or (None, True) once the lease
        is ours: its holder gave up without a token (a refused client, a failing
        server), and nobody else is asking."""
        until = time.monotonic() + self._wait_for(deadline)
        while time.monotonic() < until:
            time.sleep(_POLL_INTERVAL)
            token = self._from_store(key, deadline)
            if token is not None:
                return token, False
            if self.store.lease(key, self._lease_ms(deadline)):
                return self._from_store(key, deadline), True
        return None, False

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
