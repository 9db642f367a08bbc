"""A circuit breaker for the introspection endpoint, one per URL and process.

Without it every request calls an IdP that is failing, each one spending its
whole timeout (and retries) before it can be answered: the IdP gets no rest and
clients wait for nothing. The breaker has three states:

- ``closed``: calls go through. ``FAILURES`` (5) failures in a row, all within
  ``WINDOW`` (10 s), open it.
- ``open``: for ``OPEN_FIRST`` (5 s) no call is made; the cache answers from
  ``stale_if_error`` when the config allows it, else with the failure answer at
  once. Each time a probe fails the period doubles, up to ``OPEN_MAX`` (30 s).
- ``half_open``: the period is over; exactly one request probes the IdP. Success
  closes the breaker (and resets the period); failure opens it again.

One log line per state change, naming the endpoint without its query string or
credentials. ``state`` and ``on_change`` are there for metrics.
"""

import threading
import time
from typing import Callable, Dict, List, Optional
from urllib.parse import urlsplit, urlunsplit

FAILURES = 5
WINDOW = 10.0
OPEN_FIRST = 5.0
OPEN_MAX = 30.0

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

Listener = Callable[[str, str], None]   # (endpoint, new state)


def _safe_endpoint(url: str) -> str:
    """The URL without user info, query or fragment: safe to log."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = "%s:%d" % (host, parts.port)
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "(unparsable URL)"


class Breaker:
    def __init__(self, endpoint: str, *, failures: int = FAILURES, window: float = WINDOW,
                 open_first: float = OPEN_FIRST, open_max: float = OPEN_MAX, log=None,
                 clock: Callable[[], float] = time.monotonic,
                 listeners: Optional[List[Listener]] = None):
        self.endpoint = _safe_endpoint(endpoint)
        self.failures_to_open = max(1, failures)
        self.window = window
        self.open_first = open_first
        self.open_max = max(open_max, open_first)
        self.log = log
        self.clock = clock
        self.listeners: List[Listener] = listeners if listeners is not None else []
        self._lock = threading.Lock()
        self.state = CLOSED
        self._failures = 0
        self._first_failure = 0.0
        self._open_for = open_first
        self._open_until = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May this caller ask the IdP now? In half-open state only one may."""
        if self.state == CLOSED:
            return True
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN:
                if self.clock() < self._open_until:
                    return False
                self._change(HALF_OPEN)
            if self._probing:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        if self.state == CLOSED and self._failures == 0:
            return
        with self._lock:
            self._failures = 0
            self._probing = False
            self._open_for = self.open_first
            if self.state != CLOSED:
                self._change(CLOSED)

    def release(self) -> None:
        """The call ``allow`` let through was never made (the request could not be
        sent): neither a success nor a failure; in half-open state the next caller
        probes instead."""
        if self.state == CLOSED:
            return
        with self._lock:
            self._probing = False

    def failed(self) -> None:
        with self._lock:
            now = self.clock()
            if self.state == HALF_OPEN:
                # The probe failed: stay away longer this time.
                self._probing = False
                self._open_for = min(self._open_for * 2, self.open_max)
                self._open(now)
                return
            if self.state == OPEN:
                return   # a call let through before the breaker opened
            if self._failures == 0 or now - self._first_failure > self.window:
                self._failures, self._first_failure = 0, now
            self._failures += 1
            if self._failures >= self.failures_to_open:
                self._open(now)

    def _open(self, now: float) -> None:
        self._open_until = now + self._open_for
        self._failures = 0
        self._change(OPEN)

    def _change(self, state: str) -> None:
        # Called with the lock held.
        self.state = state
        if self.log is not None:
            detail = " for %g s" % self._open_for if state == OPEN else ""
            try:
                (self.log.warn if state == OPEN else self.log.info)(
                    "circuit breaker for %s: %s%s" % (self.endpoint, state, detail))
            except Exception:  # noqa: BLE001 - logging must not break a request
                pass
        for listener in list(self.listeners):
            try:
                listener(self.endpoint, state)
            except Exception:  # noqa: BLE001 - a metrics hook must not break a request
                pass


class Breakers:
    """Every breaker of this process, one per introspection endpoint."""

    def __init__(self, log=None, **settings):
        self.log = log
        self.settings = settings
        self.listeners: List[Listener] = []
        self._lock = threading.Lock()
        self._by_url: Dict[str, Breaker] = {}

    def for_endpoint(self, url: str) -> Breaker:
        breaker = self._by_url.get(url)
        if breaker is None:
            with self._lock:
                breaker = self._by_url.get(url)
                if breaker is None:
                    breaker = Breaker(url, log=self.log, listeners=self.listeners,
                                      **self.settings)
                    self._by_url[url] = breaker
        return breaker

    def states(self) -> Dict[str, str]:
        """Endpoint (safe to show) -> state, for metrics."""
        return {b.endpoint: b.state for b in list(self._by_url.values())}


_PROCESS: Optional[Breakers] = None
_PROCESS_LOCK = threading.Lock()


def for_endpoint(url: str, log=None) -> Breaker:
    """The breaker of ``url`` in this process (made with the documented defaults)."""
    global _PROCESS
    if _PROCESS is None:
        with _PROCESS_LOCK:
            if _PROCESS is None:
                _PROCESS = Breakers(log)
    return _PROCESS.for_endpoint(url)


def process_breakers() -> Optional[Breakers]:
    return _PROCESS
