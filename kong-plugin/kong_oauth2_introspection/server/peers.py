"""Steps that reach the wrong process, carried to the one that holds the event.

Kong (mp_rpc.lua ``Rpc:call``) takes a connection from its per-worker pool for
every call and puts it back after the answer, so the ``plugin.Step`` that
continues an event may arrive on a connection another process accepted. The
event (a greenlet, parked at its PDK call) lives in one process only; an event
id names that process (``id % EVENT_SLOTS``, see listener.py). A Step for
another process's event is sent, unchanged, over that process's private socket
in the node directory (the same MessagePack-RPC, a request id of our own), and
its answer is written back to Kong on the connection the Step came in on.

Fail closed: when the owner cannot be reached (it died: its events are lost) or
does not answer within the deadline, the Step is answered with the same
``kong.response.exit(500)`` a Step for an unknown event gets, never left for
Kong to time out and pass on.
"""

import asyncio
import itertools
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack

from ..ops.log import Log

Refuse = Callable[[Any, Any, Any], None]   # (connection, Kong's msgid, event id)


class Peers:
    def __init__(self, loop: asyncio.AbstractEventLoop, path_of: Callable[[int], str],
                 refuse: Refuse, timeout: float, log: Log):
        self.loop = loop
        self.path_of = path_of
        self.refuse = refuse
        self.timeout = timeout
        self.log = log
        self._links: Dict[int, _Link] = {}
        self._warned: Dict[int, float] = {}
        self.forwarded = 0

    def warn(self, slot: int, msg: str) -> None:
        """At most one line a second per slot: a dead process's Steps come by the hundred."""
        now = self.loop.time()
        if now - self._warned.get(slot, -1e9) >= 1.0:
            self._warned[slot] = now
            self.log.warn(msg)

    def forward(self, slot: int, method: str, arg: Any, conn: Any, msgid: Any,
                event_id: Any) -> None:
        link = self._links.get(slot)
        if link is None or link.closed:
            link = self._links[slot] = _Link(self, slot)
        self.forwarded += 1
        link.send(method, arg, conn, msgid, event_id)

    def close(self) -> None:
        for link in list(self._links.values()):
            link.close()
        self._links.clear()


class _Link(asyncio.Protocol):
    """One connection to one other process, many Steps in flight on it."""

    def __init__(self, peers: Peers, slot: int):
        self.peers = peers
        self.slot = slot
        self.closed = False
        self.transport: Optional[asyncio.Transport] = None
        self._ids = itertools.count(1)
        self._pending: Dict[int, Tuple[Any, Any, Any, asyncio.TimerHandle]] = {}
        self._backlog: List[bytes] = []
        self._pack = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape").pack
        self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape",
                                          strict_map_key=False,
                                          max_buffer_size=64 * 1024 * 1024)
        task = peers.loop.create_task(
            peers.loop.create_unix_connection(lambda: self, peers.path_of(slot)))
        task.add_done_callback(self._connected)

    def _connected(self, task: "asyncio.Task[Any]") -> None:
        err = None if task.cancelled() else task.exception()
        if task.cancelled() or err is not None:
            self.peers.warn(self.slot, "process slot %d unreachable (%s); Steps for its events "
                            "refused" % (self.slot, type(err).__name__ if err else "cancelled"))
            self._fail_all()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        for data in self._backlog:
            transport.write(data)
        self._backlog.clear()

    def send(self, method: str, arg: Any, conn: Any, msgid: Any, event_id: Any) -> None:
        fid = next(self._ids)
        try:
            data = self._pack([0, fid, method, [arg]])
        except (TypeError, ValueError, OverflowError):
            self.peers.refuse(conn, msgid, event_id)
            return
        timer = self.peers.loop.call_later(self.peers.timeout, self._expire, fid)
        self._pending[fid] = (conn, msgid, event_id, timer)
        if self.transport is not None:
            self.transport.write(data)
        else:
            self._backlog.append(data)

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        try:
            for message in self._unpacker:
                if not (isinstance(message, list) and len(message) == 4 and message[0] == 1):
                    continue
                entry = self._pending.pop(message[1], None)
                if entry is None:
                    continue   # answered after we gave up on it
                conn, msgid, _, timer = entry
                timer.cancel()
                if not conn.reply(msgid, message[2], message[3]):
                    self.peers.refuse(conn, msgid, entry[2])
        except (ValueError, msgpack.UnpackException):
            self.close()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.transport = None
        self._fail_all()

    def _expire(self, fid: int) -> None:
        entry = self._pending.pop(fid, None)
        if entry is not None:
            self.peers.warn(self.slot, "process slot %d did not answer a Step in %g s; refused"
                            % (self.slot, self.peers.timeout))
            self.peers.refuse(entry[0], entry[1], entry[2])

    def _fail_all(self) -> None:
        self.closed = True
        self._backlog.clear()
        pending, self._pending = self._pending, {}
        for conn, msgid, event_id, timer in pending.values():
            timer.cancel()
            self.peers.refuse(conn, msgid, event_id)

    def close(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.close()
        self._fail_all()
