"""How plugin code waits: one deadline per request, and blocking work off the loop.

The plugin server (``server/``) runs every Kong event as a greenlet on one event
loop. Code that blocks (HTTP to the IdP, Redis, Kong's Admin API) goes through
:func:`blocking`, which runs it on a worker thread while the loop serves other
events, and gives up when the request's deadline passes. Outside the server (unit
tests, a plain thread) :func:`blocking` simply calls the function.

Every wait spends from one :class:`Deadline` per request, so the sum of the IdP
call, its retries, Redis and the consumer lookup can never outlast it.
"""

import threading
import time
from typing import Any, Callable, Optional, TypeVar

import greenlet

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The request's time budget ran out; the client gets the failure answer."""


class Deadline:
    __slots__ = ("at",)

    def __init__(self, seconds: float, now: Optional[float] = None):
        self.at = (time.monotonic() if now is None else now) + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def timeout(self, cap: Optional[float] = None) -> float:
        """Seconds the next wait may take: ``cap`` at most, never past the deadline.

        Raises DeadlineExceeded when nothing is left."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("request deadline exceeded")
        return left if cap is None else min(cap, left)


_thread = threading.local()


def current_deadline() -> Optional[Deadline]:
    """The deadline of the request this code runs for, if any."""
    deadline = getattr(greenlet.getcurrent(), "deadline", None)
    if deadline is None:
        deadline = getattr(_thread, "deadline", None)
    return deadline


class deadline_scope:
    """Make ``deadline`` current on this thread (worker threads, tests)."""

    def __init__(self, deadline: Optional[Deadline]):
        self.deadline = deadline

    def __enter__(self):
        self._saved = getattr(_thread, "deadline", None)
        _thread.deadline = self.deadline
        return self.deadline

    def __exit__(self, *exc):
        _thread.deadline = self._saved


def blocking(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, run where it cannot stall other requests.

    In a server event this parks the event's greenlet until a worker thread has
    run ``fn`` (raising DeadlineExceeded if the deadline passes first); anywhere
    else it is a plain call.
    """
    run = getattr(greenlet.getcurrent(), "run_blocking", None)
    if run is None:
        return fn(*args)
    return run(fn, args)


# The plugin server's default per-request deadline (server/listener.py).
REQUEST_DEADLINE = 30.0
