"""Kong's MessagePack-RPC client for plugin servers and its bridge loop.

Mirrors kong/runloop/plugin_servers/rpc/mp_rpc.lua (Kong 3.9):
* ``Rpc:call``: one request ``[0, id, method, [arg]]`` on a pooled Unix-socket
  connection (nginx keepalive), answers ``[1, id, err, result]``, notifications
  ``[2, label, args]`` handled on the way. A failed connect is ``trying to connect``,
  a connection the server closes or drops is ``no data``, and so is silence longer
  than the cosocket timeout (60 s by default; Kong sets none), after which the
  connection goes BACK to the pool (observed on 3.9.1: the next call on it waits
  another timeout; an answer arriving while it sits idle makes nginx reset it);
* lua-MessagePack packing: every Lua string is a msgpack *str* holding whatever
  bytes it holds (non-UTF-8 bytes included), only raw bodies (``fix_raw``) are *bin*;
  multi-maps go through ``fix_mmap`` (every value a list, empty map when empty);
  ``fix_raw`` wraps even a nil raw body, which then fails to pack: a Lua error,
  so ``get_raw_body()`` on a body nginx spooled to a file answers 500 on Kong 3.x
  (read from mp_rpc.lua and lua-MessagePack, not observed);
* ``bridge_loop``: ``plugin.HandleEvent``, then one ``plugin.Step*`` per PDK call
  until ``"ret"``. Kong 3.x keeps only a PDK function's first return value
  (``ret = method(unpack(args))``), so ``nil, err`` reaches the plugin as nil;
  Kong 2.8 answered ``plugin.StepError`` with the error text.
"""

import itertools
import select
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import msgpack

from .lua import LuaError, LuaNil, Multi, from_wire, to_wire
from .pdk import MULTI_MAP, PDK, RAW, STEP_METHODS

__all__ = ["Rpc", "RpcError", "bridge_loop", "fix_mmap"]


class RpcError(Exception):
    """An RPC that failed: Kong logs the text and goes on (fails open)."""


def _pack(obj: Any) -> bytes:
    # str with surrogate-escaped bytes -> msgpack str holding the raw bytes
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")


def fix_mmap(t: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """mp_rpc.lua's fix_mmap: every value a list (a bare flag -> [])."""
    out: Dict[str, Any] = {}
    for k, v in (t or {}).items():
        if v is True:
            out[k] = []
        elif isinstance(v, str):
            out[k] = [v]
        else:
            out[k] = v
    return out   # an empty result is an empty MAP (mp_empty_map)


class Rpc(object):
    def __init__(self, socket_path: str, timeout: float,
                 on_notification: Optional[Callable[[str, Any], None]] = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.on_notification = on_notification
        self._pool: List[socket.socket] = []
        # pooled connections put back after a read timeout (a late answer may come)
        self._timed_out: List[socket.socket] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def reset(self) -> None:
        """Close every pooled connection (as nginx does to idle ones after
        lua_socket_keepalive_timeout, 60 s): the next call connects anew."""
        with self._lock:
            pool, self._pool = self._pool, []
            self._timed_out = []
        for c in pool:
            try:
                c.close()
            except OSError:
                pass

    def await_late_answers(self, timeout: float) -> int:
        """Wait (at most ``timeout``) until every connection that went back to the
        pool after a read timeout has bytes or EOF on it, and reset those, as
        nginx's handler for an idle pooled connection does the moment they arrive
        (observed: fail_late_answer, after_late_answer_next_request). How many
        were reset."""
        deadline = time.monotonic() + timeout
        with self._lock:
            waiting = [c for c in self._timed_out if c in self._pool]
            self._timed_out = []
        reset = 0
        for c in waiting:
            left = max(0.0, deadline - time.monotonic())
            try:
                readable, _, _ = select.select([c], [], [], left)
            except (OSError, ValueError):
                readable = [c]
            if not readable:
                with self._lock:
                    self._timed_out.append(c)
                continue
            with self._lock:
                if c not in self._pool:
                    continue
                self._pool.remove(c)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            reset += 1
        return reset

    def _get(self) -> socket.socket:
        while True:
            with self._lock:
                c = self._pool.pop() if self._pool else None
            if c is None:
                break
            # nginx closes a pooled connection the peer closed while it sat idle;
            # one non-blocking peek finds those (EOF) without changing the socket
            try:
                if c.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    c.close()
                    continue
            except BlockingIOError:
                return c
            except OSError:
                c.close()
                continue
            # bytes on an idle pooled connection (a late answer after a timeout):
            # nginx resets it (observed: the server gets ECONNRESET) and connects anew
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The cosocket timeout, per operation, kept by the kernel (SO_RCVTIMEO and
        # SO_SNDTIMEO, the latter also bounding connect) on a blocking socket: no
        # poll() before every read and write.
        tv = struct.pack("ll", int(self.timeout), int((self.timeout % 1) * 1e6))
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        try:
            c.connect(self.socket_path)
        except BlockingIOError:
            c.close()
            raise RpcError("trying to connect: timeout")
        except OSError as e:
            c.close()
            # nginx's cosocket words it in lower case ("connection refused")
            raise RpcError("trying to connect: %s" % str(e.strerror or e).lower())
        return c

    def call(self, method: str, arg: Any) -> Any:
        msg_id = next(self._ids)
        c: Optional[socket.socket] = self._get()
        assert c is not None
        try:
            try:
                c.sendall(_pack([0, msg_id, method, [arg]]))
            except BlockingIOError:   # SO_SNDTIMEO passed
                raise RpcError("timeout")
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                        unicode_errors="surrogateescape")
            while True:
                try:
                    chunk = c.recv(65536)
                except BlockingIOError:   # SO_RCVTIMEO passed
                    # Kong logs "no data" and puts the connection back in its pool
                    # (observed on 3.9.1): the next call on it waits again, and a
                    # late answer makes nginx reset it (see _get)
                    with self._lock:
                        self._pool.append(c)
                        self._timed_out.append(c)
                    c = None
                    raise RpcError("no data")
                if not chunk:
                    raise RpcError("no data")
                unpacker.feed(chunk)
                try:
                    msgs = list(unpacker)
                except ValueError as e:   # lua-MessagePack error()s on bytes it cannot decode
                    raise LuaError("msgpack: %s" % e)
                for msg in msgs:
                    if not isinstance(msg, (list, tuple)) or len(msg) < 3:
                        raise LuaError("RPC response expected from Go plugin server")
                    if msg[0] == 2:
                        if self.on_notification is not None:
                            self.on_notification(msg[1], msg[2])
                        continue
                    # Rpc:call assert()s these: a Lua error, hence 500, not a fail-open
                    if msg[0] != 1 or len(msg) < 4:
                        raise LuaError("RPC response expected from Go plugin server")
                    if msg[1] != msg_id:
                        raise LuaError("unexpected RPC response ID from Go plugin server")
                    with self._lock:
                        self._pool.append(c)
                    c = None
                    if msg[2] is not None:
                        raise RpcError(str(msg[2]))
                    return msg[3]
        except OSError as e:
            raise RpcError(str(e))
        finally:
            if c is not None:
                c.close()


def bridge_loop(rpc: Rpc, instance_id: Any, phase: str, pdk: PDK, step_errors: bool) -> None:
    """Runs one event to its end; raises RpcError (Kong logs it, the request goes
    on), LuaError (500) or Exited (kong.response.exit). ``step_errors``: answer
    ``nil, err`` with plugin.StepError, as Kong 2.8 did."""
    r = pdk.s.result
    r.plugin_ran = True
    step_in = rpc.call("plugin.HandleEvent", {"InstanceId": instance_id, "EventName": phase})
    event_id = step_in.get("EventId") if isinstance(step_in, dict) else None
    while True:
        data = step_in.get("Data") if isinstance(step_in, dict) else None
        if data == "ret":
            return
        if not isinstance(data, dict):
            # bridge_loop indexes step_in.Data.Method: a Lua error, hence 500
            raise LuaError("attempt to index field 'Data' (unexpected answer %r)" % (data,))
        method = str(data.get("Method"))
        raw_args = from_wire(data.get("Args"))
        args = raw_args if isinstance(raw_args, list) else ([] if raw_args is None else [raw_args])
        r.pdk_calls.append(method)
        r.pdk_trace.append((method, args))
        res = pdk.call(method, args)
        err = None
        if res is LuaNil:
            r.kong_logs.append(("err", "could not find pdk method: %s" % method))
            res = None
        elif isinstance(res, Multi):
            res, err = res.value, res.err
        if res is None and err is not None and step_errors:
            step_method, packed = "plugin.StepError", err
        else:
            step_method = STEP_METHODS.get(method, "plugin.Step")
            if method in MULTI_MAP:
                packed = fix_mmap(res) if res is not None else None
            elif method in RAW:
                if res is None:
                    # fix_raw(nil) packs nil as binary: lua-MessagePack's
                    # packers['binary'] takes #str of nil, a Lua error (500)
                    raise LuaError("attempt to get length of local 'str' (a nil value)")
                packed = res if isinstance(res, bytes) else \
                    str(res).encode("utf-8", "surrogateescape")
            else:
                packed = to_wire(res)
        step: Dict[str, Any] = {"EventId": event_id}
        if packed is not None:
            step["Data"] = packed
        step_in = rpc.call(step_method, step)
