"""What a purge leaves behind, so that replaying old values restores nothing.

A purge deletes entries, but whoever can write to Redis may have recorded a
sealed value (or the announcement carrying it) and set it again afterwards: it
still opens, because the seal binds a value to its key, not to a time. So a
purge also writes a *tombstone*: a sealed record ``{"s": scope, "at": ms, "x":
ms}`` saying "nothing under this scope fetched before ``at`` (Redis's clock) is
to be believed; keep this until ``x``". Scopes are ``key:<cache key>``,
``sub:<tag>``, ``client_id:<tag>`` (the index tags of ``store.py``, HMACs: no
token or claim in Redis) and ``all``.

Every process keeps the tombstones it learned (``Tombstones``) and refuses any
value from outside itself (a Redis read, an announcement, a node-local cache)
fetched before a tombstone covering its key or claims: it is a miss and is
introspected again. A tombstone must outlive what it covers; rather than trust
its lifetime, an expired tombstone (or the oldest, past ``MAX_TOMBSTONES``) is
*folded* into the watermark, an ``all`` tombstone at its time: precision is lost
(older values of other keys are refused too, once), protection is not. So the
set is bounded in count and bytes and a purge is never undone by time passing.

Values are compared with a margin (``SKEW``): ``fetched_at`` is the fetching
node's clock, ``at`` Redis's. A value fetched up to ``SKEW`` seconds after a
tombstone of its scope is refused as well; that costs a re-introspection, never
an answer from before the purge.
"""

import json
import math
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

SKEW = 5.0                 # seconds between node clocks and Redis's we allow for
MAX_TOMBSTONES = 10000     # beyond this the oldest are folded into the watermark
ALL = "all"
TAG_KINDS = ("sub", "client_id")


def record(scope: str, at_ms: int, expires_ms: int) -> bytes:
    return json.dumps({"s": scope, "at": at_ms, "x": expires_ms},
                      separators=(",", ":")).encode()


def parse(blob: Optional[bytes]) -> Optional[Tuple[str, float, float]]:
    """(scope, at, expires) in seconds, or None for anything malformed."""
    if not blob:
        return None
    try:
        data = json.loads(blob)
        scope, at, expires = data["s"], float(data["at"]) / 1000, float(data["x"]) / 1000
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(scope, str) or not (math.isfinite(at) and math.isfinite(expires)):
        return None
    return scope, at, expires


def fold(records: Iterable[Tuple[str, float, float]], now: float,
         limit: Optional[int] = None) -> Tuple[float, Dict[str, Tuple[float, float]]]:
    """(watermark, {scope: (at, expires)}) of ``records`` once expired ones, those a
    watermark already covers, and the oldest past ``limit`` (``MAX_TOMBSTONES``)
    are folded in."""
    if limit is None:
        limit = MAX_TOMBSTONES
    mark = -math.inf
    live: Dict[str, Tuple[float, float]] = {}
    for scope, at, expires in records:
        if scope == ALL or expires <= now:
            mark = max(mark, at)
        else:
            old = live.get(scope)
            live[scope] = (at, expires) if old is None else (max(old[0], at),
                                                             max(old[1], expires))
    live = {s: v for s, v in live.items() if v[0] > mark}
    if len(live) > limit:
        ordered = sorted(live.items(), key=lambda item: item[1][0])
        cut = len(live) - limit
        mark = max(mark, ordered[cut - 1][1][0])
        live = dict(ordered[cut:])
    return mark, live


class Tombstones:
    """The tombstones one process knows, for one store (key prefix)."""

    def __init__(self, tag: Callable[[str, str], str], clock: Callable[[], float]):
        self._tag = tag
        self._clock = clock
        self._lock = threading.Lock()
        self.watermark = -math.inf
        self._live: Dict[str, Tuple[float, float]] = {}
        self._kinds: Dict[str, int] = {}      # tag tombstones per kind: skip HMACs when 0
        self.loaded = False                   # False: nothing from outside is believed
        self.generation = 0                   # bumped whenever something is learned
        self.seen_ms = 0                      # highest Redis score loaded so far
        self._listeners: List[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after new tombstones were learned (to drop what a
        process holds that they cover)."""
        self._listeners.append(listener)

    def learn(self, records: Iterable[Tuple[str, float, float]], *, loaded: bool = False) -> bool:
        """Add ``records``; True when that changed anything (listeners were told)."""
        with self._lock:
            before = (self.watermark, dict(self._live))
            mine = [(ALL, self.watermark, math.inf)] if self.watermark > -math.inf else []
            mine += [(s, at, x) for s, (at, x) in self._live.items()]
            self.watermark, self._live = fold(mine + list(records), self._clock())
            self._kinds = {k: sum(1 for s in self._live if s.startswith(k + ":"))
                           for k in TAG_KINDS}
            changed = (self.watermark, self._live) != before
            if changed:
                self.generation += 1
            if loaded:
                self.loaded = True
        if changed:
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:  # noqa: BLE001 - a listener must not stop learning
                    pass
        return changed

    def covers(self, key: str, claims: Dict[str, Any], fetched_at: float) -> bool:
        """Must a value of ``key`` with these claims, fetched at ``fetched_at``
        (wall clock), be refused? Also True while no tombstones were loaded yet."""
        if not self.loaded:
            return True
        if not isinstance(fetched_at, (int, float)) or not math.isfinite(fetched_at):
            return True
        cutoff = fetched_at - SKEW
        if cutoff < self.watermark:
            return True
        live = self._live
        if not live:
            return False
        hit = live.get("key:" + key)
        if hit is not None and cutoff < hit[0]:
            return True
        for kind in TAG_KINDS:
            value = claims.get(kind) if self._kinds.get(kind) else None
            if isinstance(value, str) and value:
                hit = live.get(kind + ":" + self._tag(kind, value))
                if hit is not None and cutoff < hit[0]:
                    return True
        return False

    def size(self) -> int:
        return len(self._live) + (self.watermark > -math.inf)
