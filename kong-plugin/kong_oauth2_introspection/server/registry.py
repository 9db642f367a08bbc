"""Shared, bounded, closed: the objects built once per config.

Kong starts one plugin instance per config and nginx worker, and closes it when
the config changes; configs that are equal share what was built for them (a
runtime, a cache, a Redis pool). ``Registry`` hands out one object per key with a
reference count; an object nobody holds any more stays in a small idle LRU (Kong
often restarts the same config) and is closed when evicted from it, so a config
changed a thousand times leaves no sockets, files or threads behind.
"""

import collections
import threading
from typing import Any, Callable, Dict, Generic, Hashable, Tuple, TypeVar

T = TypeVar("T")


def close_quietly(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - closing must never fail a request
            pass


class Registry(Generic[T]):
    def __init__(self, idle: int = 16):
        self.idle_max = idle
        self._lock = threading.RLock()
        self._held: Dict[Hashable, Tuple[T, int]] = {}
        self._idle: "collections.OrderedDict[Hashable, T]" = collections.OrderedDict()

    def acquire(self, key: Hashable, build: Callable[[], T]) -> T:
        """The object for ``key`` (built by ``build`` if none exists); release it once."""
        with self._lock:
            if key in self._held:
                obj, refs = self._held[key]
                self._held[key] = (obj, refs + 1)
                return obj
            obj = self._idle.pop(key) if key in self._idle else build()
            self._held[key] = (obj, 1)
            return obj

    def release(self, key: Hashable) -> None:
        evicted = []
        with self._lock:
            if key not in self._held:
                return
            obj, refs = self._held[key]
            if refs > 1:
                self._held[key] = (obj, refs - 1)
                return
            del self._held[key]
            self._idle[key] = obj
            while len(self._idle) > self.idle_max:
                evicted.append(self._idle.popitem(last=False)[1])
        for obj in evicted:
            close_quietly(obj)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held) + len(self._idle)

    def close(self) -> None:
        with self._lock:
            objs = [o for o, _ in self._held.values()] + list(self._idle.values())
            self._held.clear()
            self._idle.clear()
        for obj in objs:
            close_quietly(obj)
