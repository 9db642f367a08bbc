"""The instance table the processes of one plugin server share.

Kong keeps instance ids per nginx worker and sends ``plugin.HandleEvent`` on
whichever pooled connection it picks, and with ``serve --processes N`` each
connection belongs to one of N processes. So the ids ``StartInstance`` hands out
are node-wide: the table maps id -> (plugin name, Kong's config JSON, start time)
in LMDB under the node directory, and a process that gets an event for an id it
has not seen builds that instance's runtime from the table on first use instead
of answering "no plugin instance" (which would cost Kong a StartInstance round
trip, and an instance it never closes).

LMDB because it is what Kong itself uses for its node-local state, it is a
memory map (a read is a few microseconds and takes no lock), and its write lock
is a robust mutex: a process killed inside a write does not wedge the others.
Each process opens the table after the fork (an LMDB environment must not cross
one). The parent empties it before starting the children: a new plugin server
starts with no instances, as Kong expects after a restart (it gets "no plugin
instance" and starts them again), and ids start again from 0.
"""

import json
import os
import struct
import time
from typing import Any, Dict, List, NamedTuple, Optional

import lmdb

MAX_ENTRIES = 4096            # as listener.MAX_INSTANCES: Kong never closes some ids
MAP_SIZE = 256 * 1024 * 1024  # address space, not disk: the file grows with the data
_NEXT = b"next"               # the next id, in the meta database
_KEY = struct.Struct(">Q")    # big-endian: LMDB's order is the ids' order, oldest first


class Record(NamedTuple):
    id: int
    name: str
    config: str               # Kong's JSON text, as StartInstance carried it
    started: float


def path(directory: str) -> str:
    return os.path.join(directory, "instances")


def _open(directory: str) -> lmdb.Environment:
    os.makedirs(path(directory), mode=0o700, exist_ok=True)   # lmdb would give it 0600
    return lmdb.open(path(directory), map_size=MAP_SIZE, max_dbs=2, subdir=True,
                     max_readers=512, lock=True, sync=False, metasync=False,
                     readahead=False, mode=0o600)


def reset(directory: str) -> None:
    """Empty the table (the parent, before any child opens it)."""
    env = _open(directory)
    try:
        with env.begin(write=True) as txn:
            for name in (b"instances", b"meta"):
                txn.drop(env.open_db(name, txn=txn), delete=False)
    finally:
        env.close()


class InstanceTable:
    """One process's handle on the shared table. Every method may raise
    ``lmdb.Error``; the listener turns that into an answer Kong retries."""

    def __init__(self, directory: str, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._env = _open(directory)
        self._rows = self._env.open_db(b"instances")
        self._meta = self._env.open_db(b"meta")

    def add(self, name: str, config: str, started: Optional[float] = None) -> int:
        """Store an instance and return its id, unique on this node for the life of
        the plugin server (one write transaction: the processes never collide)."""
        value = json.dumps({"n": name, "c": config,
                            "t": time.time() if started is None else started}).encode()
        with self._env.begin(write=True) as txn:
            raw = txn.get(_NEXT, db=self._meta)
            iid = int(raw) if raw is not None else 0
            txn.put(_NEXT, str(iid + 1).encode(), db=self._meta)
            txn.put(_KEY.pack(iid), value, db=self._rows)
            excess = txn.stat(self._rows)["entries"] - self.max_entries
            if excess > 0:   # the oldest go first, as the listener's own cap does
                cursor = txn.cursor(db=self._rows)
                cursor.first()
                for _ in range(excess):
                    if not cursor.delete():
                        break
        return iid

    def get(self, iid: Any) -> Optional[Record]:
        key = _key(iid)
        if key is None:
            return None
        with self._env.begin(db=self._rows, buffers=False) as txn:
            raw = txn.get(key)
        return _record(iid, raw) if raw is not None else None

    def remove(self, iid: Any) -> Optional[Record]:
        key = _key(iid)
        if key is None:
            return None
        with self._env.begin(write=True, db=self._rows) as txn:
            raw = txn.pop(key)
        return _record(iid, raw) if raw is not None else None

    def records(self) -> List[Record]:
        with self._env.begin(db=self._rows) as txn:
            return [_record(_KEY.unpack(k)[0], v) for k, v in txn.cursor()]

    def ids(self) -> set:
        with self._env.begin(db=self._rows) as txn:
            return {_KEY.unpack(k)[0] for k in txn.cursor().iternext(values=False)}

    def sweep(self) -> int:
        """Free the reader slots of processes that died (killed inside a read)."""
        return self._env.reader_check()

    def close(self) -> None:
        self._env.close()


def _key(iid: Any) -> Optional[bytes]:
    if type(iid) is not int or not 0 <= iid < 2 ** 63:
        return None
    return _KEY.pack(iid)


def _record(iid: int, raw: bytes) -> Record:
    row: Dict[str, Any] = json.loads(raw)
    return Record(iid, row["n"], row["c"], float(row["t"]))
