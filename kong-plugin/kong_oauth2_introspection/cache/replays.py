"""Keys seen once per node: the DPoP proofs and signed answers every process of
a plugin server has accepted, so that a proof replayed on another of Kong's
pooled connections (another process) is still refused without Redis.

LMDB in ``<node dir>/replays/``: one write transaction per key, which LMDB
serializes across processes, makes "seen?" and "remember it" one step. Keys
are the callers' digests, never a proof. Like the in-process store, it never
forgets a key before its expiry: when full, new keys are refused (None).
"""

import os
import struct
import threading
import time
from typing import Dict, Optional

import lmdb

from ..ops import metrics
from ..ops.log import LOG

MAP_SIZE = 1 << 30            # sparse: pages are used only as keys arrive
_EXPIRY = struct.Struct(">d")


class NodeReplays:
    """``add(key, ttl)`` -> True (new, remembered), False (seen), None (full)."""

    def __init__(self, directory: str, capacity: int, map_size: int = MAP_SIZE):
        path = os.path.join(directory, "replays")
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.capacity = capacity
        self.env = lmdb.open(path, map_size=map_size, max_dbs=2, subdir=True,
                             mode=0o600, metasync=False, sync=False, lock=True)
        self._keys = self.env.open_db(b"keys")       # key -> expiry
        self._order = self.env.open_db(b"order")     # expiry + key -> b"" (oldest first)
        self.pid = os.getpid()
        self._full = False   # logged once per episode of being full, per process

    def __len__(self) -> int:
        with self.env.begin(db=self._keys) as txn:
            return txn.stat(self._keys)["entries"]

    def add(self, key: bytes, ttl: float, now: Optional[float] = None) -> Optional[bool]:
        current = time.time() if now is None else now
        try:
            with self.env.begin(write=True) as txn:
                seen = txn.get(key, db=self._keys)
                if seen is not None and _EXPIRY.unpack(seen)[0] > current:
                    return False
                self._expire(txn, current)
                if txn.stat(self._keys)["entries"] >= self.capacity:
                    self._refuse()
                    return None
                expiry = _EXPIRY.pack(current + ttl)
                txn.put(key, expiry, db=self._keys)
                txn.put(expiry + key, b"", db=self._order)
        except lmdb.MapFullError:
            self._refuse()
            return None
        self._full = False
        return True

    def _refuse(self) -> None:
        if not self._full:
            self._full = True
            LOG.err("DPoP replay store full (%d proofs on this node): new proofs are "
                    "refused until older ones expire" % self.capacity)
        metrics.replay_store_full()

    def _expire(self, txn, now: float, most: int = 64) -> None:
        """Forget a few expired keys, oldest first (bounded work per add)."""
        cursor = txn.cursor(db=self._order)
        limit = _EXPIRY.pack(now)
        done = 0
        while done < most and cursor.first():
            mark = cursor.key()
            if mark[:8] > limit:
                break
            key = mark[8:]
            if txn.get(key, db=self._keys) == mark[:8]:
                txn.delete(key, db=self._keys)
            cursor.delete()
            done += 1

    def close(self) -> None:
        self.env.close()


_open: Dict[str, NodeReplays] = {}
_open_lock = threading.Lock()


def for_node(directory: str, capacity: int) -> NodeReplays:
    """The node's store, opened once per process (a forked child opens its own)."""
    with _open_lock:
        store = _open.get(directory)
        if store is None or store.pid != os.getpid():
            store = _open[directory] = NodeReplays(directory, capacity)
        return store
