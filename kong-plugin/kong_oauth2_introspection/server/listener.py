"""Kong's side of the wire: the plugin-server protocol, served fail-closed.

Kong (kong/runloop/plugin_servers/rpc/mp_rpc.lua) sends MessagePack-RPC requests
``[0, id, "plugin.X", [arg]]`` over a Unix socket and waits for ``[1, id, err,
result]``. This module replaces kong-pdk's listener and event machinery (kong-pdk
stays the dependency for its protocol constants, plugin contract and PDKException)
because for an authentication plugin three of their behaviours fail open:

- kong-pdk decodes strings strictly and drops the connection on a header byte that
  is not UTF-8; Kong then passes the request on unauthenticated. Here every string
  is decoded with ``surrogateescape`` and encoded back the same way, so any byte a
  client sent is carried, and answered.
- an exception escaping a handler leaves the event unanswered (and a lock held):
  Kong waits 60 s and passes the request. Here anything a handler raises becomes
  ``kong.response.exit(500)``, and a Step for an event we do not know is refused the
  same way instead of answered with an error Kong would shrug off.
- nothing bounds an event's time. Here each event has one deadline (30 s by
  default, well inside Kong's 60 s): blocking work runs on worker threads through
  ``concurrency.blocking`` and the event is answered when the deadline passes,
  whatever those threads are still doing.

Every event runs as a greenlet on one asyncio loop (uvloop when installed): a PDK
call switches back to the loop, which answers Kong's RPC with the call and
switches into the greenlet again when Kong's ``plugin.Step`` brings the result.
A cache hit therefore costs no thread and no lock, only the round trips.
"""

import asyncio
import collections
import json
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import greenlet
import msgpack
from kong_pdk.exception import PDKException

from ..ops import metrics
from ..concurrency import Deadline, DeadlineExceeded, deadline_scope
from ..concurrency import REQUEST_DEADLINE
from ..ops.log import LOG, Log
from .peers import Peers
from .table import InstanceTable, Record

RET = "ret"
TERMINAL = frozenset({"kong.response.exit", "kong.response.error"})
FAILURE_ANSWER = {"Method": "kong.response.exit",
                  "Args": [500, {"message": "An unexpected error occurred"}]}
DEFAULT_DEADLINE = REQUEST_DEADLINE
MAX_DEADLINE = 50.0        # Kong gives up (and fails open) after 60 s
DEFAULT_WORKERS = 256      # concurrent blocking calls (IdP misses, Redis, Admin API)
MAX_INSTANCES = 4096       # Kong never closes instances of a worker that died
INSTANCE_IDLE = 600.0      # ... nor those it lost in a race; Kong restarts a closed one
ABANDONED_AFTER = 70.0     # an event Kong stopped stepping is dropped after this
SWEEP_INTERVAL = 5.0
# With several processes an event id names its process: id % EVENT_SLOTS is the
# process's slot (so a Step on another process's connection finds its way,
# peers.py), and each process starts counting at the node's monotonic clock in
# 10 us units, so a replacement never reuses an id its dead predecessor handed
# Kong (no process starts 100,000 events a second). Lua numbers hold integers to
# 2**53: 45 years of uptime.
EVENT_SLOTS = 64

# What a greenlet hands the loop when it switches back.
_CALL, _EXIT, _PARK, _RET, _DONE = "call", "exit", "park", "ret", "done"
# How the loop resumes a parked greenlet.
_FINISHED, _EXPIRED = "finished", "expired"
_START = object()
STEP_METHODS = ("plugin.Step", "plugin.StepCredential", "plugin.StepMultiMap",
                "plugin.StepConsumer", "plugin.StepRoute", "plugin.StepService",
                "plugin.StepMemoryStats")


class PDKError(PDKException):
    """A PDK function failed (Kong 2.8's ``plugin.StepError``)."""


class ResponseExited(BaseException):
    """``kong.response.exit`` was sent: the handler must not go on (not an Exception,
    so a handler's ``except Exception`` cannot swallow it)."""


class _Method:
    """``kong.a.b(...)``: a PDK call on behalf of the event running it."""

    __slots__ = ("_name", "__dict__")

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> "_Method":
        child = _Method(self._name + "." + attr)
        self.__dict__[attr] = child  # next time a plain attribute lookup
        return child

    def __call__(self, *args: Any) -> Any:
        event = greenlet.getcurrent()
        call = getattr(event, "pdk_call", None)
        if call is None:
            raise RuntimeError("a PDK call outside a Kong event: " + self._name)
        return call(self._name, args)


KONG = _Method("kong")


class _Event(greenlet.greenlet):
    """One Kong event (a phase of one request) of one plugin instance."""

    def __init__(self, server: "PluginServer", event_id: int, handler: Callable[[Any], Any],
                 deadline: Deadline):
        super().__init__(self._body, parent=server.main)
        self.server = server
        self.id = event_id
        self.handler = handler
        self.deadline = deadline
        self.reply_to: Optional[Tuple["_Connection", int]] = None
        self.parked: Optional[Future] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.exited = False

    def _body(self):
        try:
            self.handler(KONG)
        except ResponseExited:
            return _RET, None
        except BaseException as err:  # noqa: BLE001 - never leave Kong without an answer
            if isinstance(err, greenlet.GreenletExit):
                raise
            self.server.log.err("handler raised %s; answering 500" % type(err).__name__)
            if self.exited:
                return _RET, None
            self.exited = True
            return _EXIT, FAILURE_ANSWER
        return _RET, None

    def pdk_call(self, method: str, args: Tuple[Any, ...]) -> Any:
        if self.exited:
            raise ResponseExited()
        if method in TERMINAL:
            self.exited = True
            self.parent.switch((_EXIT, {"Method": method, "Args": list(args)}))
            raise ResponseExited()
        metrics.pdk_call()
        data, err = self.parent.switch((_CALL, {"Method": method, "Args": list(args)}))
        if err is not None:
            raise PDKError("%s failed: %s" % (method, err))
        return data

    def run_blocking(self, fn: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
        if self.deadline.expired:
            raise DeadlineExceeded("request deadline exceeded")
        future = self.server.pool.submit(_in_worker, fn, args, self.deadline)
        how = self.parent.switch((_PARK, future))
        if how == _FINISHED:
            return future.result()
        raise DeadlineExceeded("request deadline exceeded")


def _in_worker(fn: Callable[..., Any], args: Tuple[Any, ...], deadline: Deadline) -> Any:
    if deadline.expired:  # queued behind other work for too long
        raise DeadlineExceeded("request deadline exceeded")
    with deadline_scope(deadline):
        return fn(*args)


class _Instance:
    __slots__ = ("id", "name", "plugin", "config", "started", "used")

    def __init__(self, iid: int, name: str, plugin: Any, config: Any,
                 started: Optional[float] = None):
        self.id = iid
        self.name = name
        self.plugin = plugin
        self.config = config
        self.started = time.time() if started is None else started
        self.used = time.monotonic()


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")


class _Connection(asyncio.Protocol):
    """One of Kong's pooled connections; any of them may carry any event's Step."""

    def __init__(self, server: "PluginServer", from_peer: bool = False):
        self.server = server
        self.from_peer = from_peer   # another process of ours forwarding a Step
        self.transport: Optional[asyncio.Transport] = None
        # Lenient: a header byte that is not UTF-8 becomes a lone surrogate, and
        # goes back to Kong as the same byte.
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape",
                                         strict_map_key=False, max_buffer_size=64 * 1024 * 1024)
        self.pack = _packer().pack

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        self.unpacker.feed(data)
        try:
            for message in self.unpacker:
                self.server.dispatch(self, message)
        except (ValueError, msgpack.UnpackException) as err:
            # Not MessagePack: there is no request id to answer. Dropping the
            # connection is all that is left; Kong logs it.
            self.server.log.err("unreadable RPC data (%s); connection dropped"
                                % type(err).__name__)
            if self.transport is not None:
                self.transport.close()

    def reply(self, msgid: Any, error: Optional[str], result: Any) -> bool:
        try:
            data = self.pack([1, msgid, error, result])
        except (TypeError, ValueError, OverflowError):
            return False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
        return True


class PluginServer:
    """The plugins' instances and events, and the loop that serves them."""

    def __init__(self, plugins: Iterable[type], *, deadline: float = DEFAULT_DEADLINE,
                 workers: int = DEFAULT_WORKERS, log: Log = LOG,
                 table: Optional[InstanceTable] = None, slot: Optional[int] = None):
        self.plugins: Dict[str, type] = {cls.NAME: cls for cls in plugins}  # type: ignore[attr-defined]
        self.deadline = min(float(deadline), MAX_DEADLINE)
        self.log = log
        self.pool = ThreadPoolExecutor(max_workers=workers,
                                       thread_name_prefix="oauth2-introspection-io")
        self.instances: "collections.OrderedDict[int, _Instance]" = collections.OrderedDict()
        self.events: Dict[int, _Event] = {}
        self._next_instance = 0
        # One process: ids from 0, as always. One of several: see EVENT_SLOTS.
        self.table = table
        self.slot = slot
        self.peers: Optional[Peers] = None
        self._event_step = 1 if slot is None else EVENT_SLOTS
        self._next_event = 0 if slot is None else \
            (time.monotonic_ns() // 10_000) * EVENT_SLOTS + slot
        self.main = greenlet.getcurrent()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._methods: Dict[str, Callable[["_Connection", Any, Any], None]] = {
            "plugin.HandleEvent": self._handle_event,
            "plugin.StepError": self._step_error,
            "plugin.StartInstance": self._start_instance,
            "plugin.CloseInstance": self._close_instance,
            "plugin.InstanceStatus": self._instance_status,
            "plugin.GetStatus": self._get_status,
            "plugin.GetPluginInfo": self._get_plugin_info,
            "plugin.SetPluginDir": self._set_plugin_dir,
        }
        # Kong's Step names (mp_rpc.lua get_step_method) found without a prefix test;
        # any other "plugin.Step*" still reaches _step through dispatch.
        for name in STEP_METHODS:
            self._methods[name] = self._step

    # -- dispatch ------------------------------------------------------------------

    def dispatch(self, conn: _Connection, message: Any) -> None:
        if not (isinstance(message, list) and len(message) == 4 and message[0] == 0):
            if isinstance(message, list) and len(message) >= 2 and message[0] == 0:
                conn.reply(message[1], "malformed RPC request", None)
            return  # a response or notification: nothing Kong waits for
        _, msgid, method, args = message
        arg = args[0] if isinstance(args, list) and args else None
        handler = self._methods.get(method) if isinstance(method, str) else None
        if handler is None:
            if isinstance(method, str) and method.startswith("plugin.Step"):
                handler = self._step  # Step, StepCredential, StepMultiMap, ...
            else:
                conn.reply(msgid, "RPC for %r is not supported" % (method,), None)
                return
        try:
            handler(conn, msgid, arg)
        except Exception as err:  # noqa: BLE001 - a bug here must still answer Kong
            self.log.err("RPC %s failed internally (%s)" % (method, type(err).__name__))
            if method in ("plugin.HandleEvent",) or str(method).startswith("plugin.Step"):
                conn.reply(msgid, None, {"Data": FAILURE_ANSWER, "EventId": -1})
            else:
                conn.reply(msgid, "internal error (%s)" % type(err).__name__, None)

    # -- events --------------------------------------------------------------------

    def _handle_event(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        iid = arg.get("InstanceId") if isinstance(arg, dict) else None
        instance = self.instances.get(iid)  # type: ignore[arg-type]
        if instance is None and self.table is not None:
            instance = self._adopt(iid)
        if instance is None:
            # Kong's cue to start the instance again and retry this request.
            conn.reply(msgid, "no plugin instance #%s" % (iid,), None)
            return
        self.instances.move_to_end(instance.id)
        instance.used = now = time.monotonic()
        handler = getattr(instance.plugin, str(arg.get("EventName")), None)
        event_id = self._next_event
        self._next_event += self._event_step
        if handler is None:
            conn.reply(msgid, None, {"Data": RET, "EventId": event_id})
            return
        metrics.event()
        event = _Event(self, event_id, handler, Deadline(self.deadline, now))
        event.reply_to = (conn, msgid)
        self.events[event_id] = event
        self._drive(event, _START)

    def _step(self, conn: _Connection, msgid: Any, arg: Any, failed: bool = False) -> None:
        eid = arg.get("EventId") if isinstance(arg, dict) else None
        event = self.events.get(eid)  # type: ignore[arg-type]
        if event is None and self.peers is not None and not conn.from_peer \
                and type(eid) is int and eid % EVENT_SLOTS != self.slot:
            # another process's event, on a connection Kong happened to pick
            self.peers.forward(eid % EVENT_SLOTS, "plugin.StepError" if failed
                               else "plugin.Step", arg, conn, msgid, eid)
            return
        if event is None or event.reply_to is not None or event.parked is not None:
            # A request we cannot finish (we restarted, or dropped it): refuse it
            # rather than let Kong pass it on.
            conn.reply(msgid, None, {"Data": FAILURE_ANSWER, "EventId": eid})
            return
        data = arg.get("Data")
        event.reply_to = (conn, msgid)
        if failed:
            self._drive(event, (None, data if data is not None else "PDK call failed"))
        else:
            self._drive(event, (data, None))

    def _step_error(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        self._step(conn, msgid, arg, True)

    def _drive(self, event: _Event, value: Any) -> None:
        """Run ``event`` until it needs Kong (a PDK call), a worker, or is done."""
        try:
            kind, payload = event.switch() if value is _START else event.switch(value)
        except BaseException as err:  # noqa: BLE001 - _body catches all; belt and braces
            self.log.err("event failed (%s); answering 500" % type(err).__name__)
            kind, payload = _EXIT, FAILURE_ANSWER
        if kind == _PARK:
            event.parked = payload
            loop = self.loop
            if loop is not None:
                if event.timer is None:
                    event.timer = loop.call_at(loop.time() + event.deadline.remaining(),
                                               self._expire, event)
                payload.add_done_callback(
                    lambda future: loop.call_soon_threadsafe(self._finished, event, future))
            return
        if kind == _CALL:
            self._answer(event, payload)
        elif kind == _EXIT:
            self._answer(event, payload)
            self._finish(event)
            if not event.dead:
                try:
                    event.switch(None)  # let the handler unwind (ResponseExited)
                except BaseException:  # noqa: BLE001
                    pass
        else:  # _RET
            self._answer(event, RET)
            self._finish(event)

    def _answer(self, event: _Event, data: Any) -> None:
        reply_to, event.reply_to = event.reply_to, None
        if reply_to is None:
            return
        conn, msgid = reply_to
        if not conn.reply(msgid, None, {"Data": data, "EventId": event.id}):
            # The handler passed something MessagePack cannot carry: refuse the
            # request instead, and end the event.
            self.log.err("unpackable PDK call from a handler; answering 500")
            conn.reply(msgid, None, {"Data": FAILURE_ANSWER, "EventId": event.id})
            self._finish(event)
            event.exited = True
            try:
                event.throw()
            except BaseException:  # noqa: BLE001
                pass

    def _finish(self, event: _Event) -> None:
        if self.events.pop(event.id, None) is not None:
            metrics.event_done(event.deadline)
        if event.timer is not None:
            event.timer.cancel()
            event.timer = None

    def _finished(self, event: _Event, future: Future) -> None:
        if event.parked is future:
            event.parked = None
            self._drive(event, _FINISHED)

    def _expire(self, event: _Event) -> None:
        event.timer = None
        if event.parked is not None:
            event.parked = None
            self._drive(event, _EXPIRED)

    def _sweep(self) -> None:
        """Drop events Kong stopped stepping (its request died), and close instances
        unused for INSTANCE_IDLE seconds (Kong loses some when it starts instances
        concurrently; a closed one it still uses gets "no plugin instance" and is
        started again): bounded memory, files and sockets."""
        now = time.monotonic()
        for instance in [i for i in self.instances.values() if now - i.used > INSTANCE_IDLE]:
            del self.instances[instance.id]
            self._close(instance)
        if self.table is not None:
            # Kong closed these through another process (or the table's cap dropped
            # them): free what this process built for them. An idle one closed above
            # stays in the table and is built again on its next event.
            try:
                live = self.table.ids()
                self.table.sweep()
            except Exception as err:  # noqa: BLE001 - lmdb.Error; try again next sweep
                self.log.warn("instance table unreadable (%s)" % type(err).__name__)
            else:
                for instance in [i for i in self.instances.values() if i.id not in live]:
                    del self.instances[instance.id]
                    self._close(instance)
        for event in [e for e in self.events.values()
                      if now > e.deadline.at + ABANDONED_AFTER and e.parked is None]:
            self._finish(event)
            try:
                event.throw()
            except BaseException:  # noqa: BLE001
                pass

    # -- instances -----------------------------------------------------------------

    def _start_instance(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        name = arg.get("Name") if isinstance(arg, dict) else None
        cls = self.plugins.get(name)  # type: ignore[arg-type]
        if cls is None:
            conn.reply(msgid, "%s not initialized" % (name,), None)
            return
        try:
            config = json.loads(arg.get("Config") or "{}")
        except (TypeError, ValueError):
            conn.reply(msgid, "config is not JSON", None)
            return
        started = time.time()
        if self.table is None:
            iid = self._next_instance
            self._next_instance += 1
        else:
            try:
                iid = self.table.add(name, arg.get("Config") or "{}", started)  # type: ignore[arg-type]
            except Exception as err:  # noqa: BLE001 - lmdb.Error: Kong answers 500, retries
                self.log.err("instance table unwritable (%s); StartInstance refused"
                             % type(err).__name__)
                conn.reply(msgid, "instance table unwritable", None)
                return
        plugin = cls(config)  # never raises: an unusable config answers 500 per request
        self._keep(_Instance(iid, name, plugin, config, started))  # type: ignore[arg-type]
        self.log.debug("instance #%d of %s started" % (iid, name))
        conn.reply(msgid, None, {"Name": name, "Id": iid, "Config": config,
                                 "StartTime": started})

    def _keep(self, instance: _Instance) -> None:
        self.instances[instance.id] = instance
        while len(self.instances) > MAX_INSTANCES:
            _, old = self.instances.popitem(last=False)
            self._close(old)
        metrics.instances(len(self.instances))

    def _record(self, iid: Any) -> Optional[Record]:
        if self.table is None:
            return None
        try:
            return self.table.get(iid)
        except Exception as err:  # noqa: BLE001 - lmdb.Error: as if unknown
            self.log.err("instance table unreadable (%s)" % type(err).__name__)
            return None

    def _adopt(self, iid: Any) -> Optional[_Instance]:
        """An instance another process started: built here on its first event."""
        record = self._record(iid)
        cls = self.plugins.get(record.name) if record is not None else None
        if record is None or cls is None:
            return None
        try:
            config = json.loads(record.config)
        except ValueError:
            return None
        instance = _Instance(record.id, record.name, cls(config), config, record.started)
        self._keep(instance)
        self.log.debug("instance #%d of %s built from the node's table"
                       % (record.id, record.name))
        return instance

    def adopt_all(self, timeout: float = 2.0) -> None:
        """Build here every instance in the node's table that this process has not
        seen yet, so that a report from this process (``/health``) covers the
        configs Kong started through the others. Called from another thread: the
        loop does the work; this waits for it at most ``timeout`` seconds."""
        loop = self.loop
        if self.table is None or loop is None or loop.is_closed():
            return
        done: Future = Future()

        def adopt() -> None:
            try:
                for iid in sorted(self.table.ids()):   # type: ignore[union-attr]
                    if iid not in self.instances:
                        self._adopt(iid)
            except Exception as err:  # noqa: BLE001 - a partial report beats none
                self.log.warn("health: cannot read the node's instances (%s)"
                              % type(err).__name__)
            finally:
                done.set_result(None)
        try:
            loop.call_soon_threadsafe(adopt)
            done.result(timeout)
        except Exception:  # noqa: BLE001 - the loop is stopping, or busy past timeout
            pass

    def _close(self, instance: _Instance) -> None:
        metrics.instances(len(self.instances))   # callers removed it already
        close = getattr(instance.plugin, "close", None)
        if close is not None:
            try:
                close()
            except Exception as err:  # noqa: BLE001
                self.log.warn("closing instance #%d failed (%s)" % (instance.id,
                                                                     type(err).__name__))

    def _close_instance(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        instance = self.instances.pop(arg, None)  # type: ignore[call-overload]
        record = None
        if self.table is not None:
            try:
                record = self.table.remove(arg)
            except Exception as err:  # noqa: BLE001 - lmdb.Error; the cap bounds the table
                self.log.err("instance table unwritable (%s)" % type(err).__name__)
        if instance is not None:
            self._close(instance)
            conn.reply(msgid, None, {"Name": instance.name, "Id": instance.id,
                                     "Config": instance.config})
        elif record is not None:
            conn.reply(msgid, None, {"Name": record.name, "Id": record.id,
                                     "Config": _json_or_none(record.config)})
        else:
            conn.reply(msgid, "no plugin instance #%s" % (arg,), None)

    def _instance_status(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        instance = None if self.table is not None else \
            self.instances.get(arg)  # type: ignore[call-overload]
        if instance is None:
            # the node's table, not this process's copy: Kong may have closed it
            # through another process
            record = self._record(arg)
            if record is None:
                conn.reply(msgid, "no plugin instance #%s" % (arg,), None)
                return
            conn.reply(msgid, None, {"Name": record.name, "Id": record.id,
                                     "Config": _json_or_none(record.config),
                                     "StartTime": record.started})
            return
        conn.reply(msgid, None, {"Name": instance.name, "Id": instance.id,
                                 "Config": instance.config, "StartTime": instance.started})

    def _get_status(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        rows: Iterable[Any] = self.instances.values()
        if self.table is not None:
            try:
                rows = self.table.records()   # the node's, not only this process's
            except Exception as err:  # noqa: BLE001 - lmdb.Error: this process's then
                self.log.err("instance table unreadable (%s)" % type(err).__name__)
        status = {name: {"Name": name, "Instances": [
            {"Name": i.name, "Id": i.id, "StartTime": i.started}
            for i in rows if i.name == name]} for name in self.plugins}
        conn.reply(msgid, None, {"Pid": os.getpid(), "Plugins": status})

    def _set_plugin_dir(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        conn.reply(msgid, None, "ok")  # nothing to load: the plugins are built in

    def _get_plugin_info(self, conn: _Connection, msgid: Any, arg: Any) -> None:
        cls = self.plugins.get(arg)  # type: ignore[call-overload]
        if cls is None:
            conn.reply(msgid, "%s not initialized" % (arg,), None)
            return
        conn.reply(msgid, None, plugin_info(cls))

    # -- running -------------------------------------------------------------------

    def refuse(self, conn: Any, msgid: Any, event_id: Any) -> None:
        """Answer a Step this server cannot carry on with: 500, never Kong's 60 s."""
        conn.reply(msgid, None, {"Data": FAILURE_ANSWER, "EventId": event_id})

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()
        for instance in list(self.instances.values()):
            self._close(instance)
        self.instances.clear()
        if self.table is not None:
            self.table.close()
            self.table = None
        self.pool.shutdown(wait=False, cancel_futures=True)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def plugin_info(cls: Any) -> Dict[str, Any]:
    """What Kong's query command reads for one plugin."""
    return {"Name": cls.NAME, "Priority": cls.PRIORITY, "Version": cls.VERSION,
            "Phases": list(cls.PHASES), "Schema": cls.kong_schema()}


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop is correct, only slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def raise_nofile(log: Log) -> int:
    """Raise the soft open-files limit to the hard one: every Kong worker's connection
    is a descriptor, and the metrics port keeps to a fixed few (ops/loopback_http.py), so
    the rest is the plugin socket's. Returns the soft limit now in force."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Linux refuses an infinite soft nofile: under an infinite hard one take the kernel's cap
        target = _nr_open(soft) if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        return int(soft)
    except (ImportError, ValueError, OSError) as err:
        log.warn("cannot raise the open-files limit (%s)" % err)
        return -1


def _nr_open(default: int) -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


class StartError(Exception):
    """The server cannot start; the text is one line for the operator, naming the path."""


# sun_path is 108 bytes on Linux (104 on the BSDs and macOS), its last one a NUL.
MAX_SOCKET_PATH = 107


def _take_socket_path(socket_path: str) -> None:
    """Make room for our socket, refusing to take it from a server that is answering
    on it (a second ``serve`` on the same prefix would otherwise cut Kong off the first
    one); a socket file nobody listens on is left over from a server that died."""
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise StartError("socket path %s is %d bytes, longer than the %d a Unix socket "
                         "path may have: use a shorter -kong-prefix"
                         % (socket_path, len(os.fsencode(socket_path)), MAX_SOCKET_PATH))
    if not os.path.lexists(socket_path):
        return
    import socket
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(socket_path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass   # stale: nobody listens
    except OSError as err:   # a full backlog, no permission: it may well be alive
        raise StartError("cannot tell whether a server answers on %s (%s); not starting"
                         % (socket_path, err.strerror or type(err).__name__)) from None
    else:
        raise StartError("another server is answering on %s; not starting (stop it, or "
                         "give this one another -kong-prefix)" % socket_path)
    finally:
        probe.close()
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StartError("cannot remove the stale socket %s: %s" % (socket_path, err.strerror))


def serve(socket_path: str, server: PluginServer, *, backlog: int = 4096) -> None:
    """Serve until SIGTERM/SIGINT or until Kong (our parent) is gone. Raises StartError
    when the socket cannot be had."""
    _take_socket_path(socket_path)
    nofile = raise_nofile(server.log)
    loop = _loop_for(server)
    try:
        listener = loop.run_until_complete(loop.create_unix_server(
            lambda: _Connection(server), path=socket_path, backlog=backlog))
    except OSError as err:
        loop.close()
        raise listen_error(socket_path, err) from None
    server.log.info("serving %s on %s (deadline %g s, %d worker threads, %d open files)"
                    % (", ".join(server.plugins), socket_path, server.deadline,
                       server.pool._max_workers, nofile))
    try:
        _run(loop, server, os.getppid())
    finally:
        listener.close()
        server.close()
        try:
            os.unlink(socket_path)
        except OSError:
            pass


def serve_child(sock: Any, peer_path: str, path_of: Callable[[int], str],
                server: PluginServer, *, backlog: int = 4096) -> None:
    """One of ``serve --processes N``'s processes (processes.py): accept on the
    socket the parent listens on, and on ``peer_path`` for Steps the other processes
    received for this one's events. Returns when told to stop or when the parent is
    gone; the parent owns (and removes) the socket file."""
    loop = _loop_for(server)
    try:
        os.unlink(peer_path)   # a predecessor in this slot died without removing it
    except FileNotFoundError:
        pass
    listener = loop.run_until_complete(loop.create_unix_server(
        lambda: _Connection(server), sock=sock, backlog=backlog))
    peer_listener = loop.run_until_complete(loop.create_unix_server(
        lambda: _Connection(server, from_peer=True), path=peer_path, backlog=backlog))
    server.peers = Peers(loop, path_of, server.refuse,
                         min(server.deadline + 5.0, MAX_DEADLINE + 5.0), server.log)
    try:
        _run(loop, server, os.getppid())
    finally:
        listener.close()
        peer_listener.close()
        server.close()
        try:
            os.unlink(peer_path)
        except OSError:
            pass


def listen_error(socket_path: str, err: OSError) -> StartError:
    hint = (" (the plugin server runs as uid %d: Kong's prefix must be writable by "
            "that user)" % os.getuid()) if isinstance(err, PermissionError) else ""
    return StartError("cannot listen on %s: %s%s" % (socket_path, err.strerror or err, hint))


def _loop_for(server: PluginServer) -> asyncio.AbstractEventLoop:
    loop = new_loop()
    asyncio.set_event_loop(loop)
    server.loop = loop
    server.main = greenlet.getcurrent()
    return loop


def _run(loop: asyncio.AbstractEventLoop, server: PluginServer, parent: int) -> None:
    """Run the loop until SIGTERM/SIGINT or until ``parent`` is gone."""
    def housekeeping():
        server._sweep()
        if os.getppid() != parent:  # Kong (or our supervisor) died: re-parented
            server.log.info("%s is gone; exiting"
                            % ("Kong" if server.slot is None else "the parent process"))
            loop.stop()
            return
        loop.call_later(SWEEP_INTERVAL, housekeeping)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    loop.call_later(SWEEP_INTERVAL, housekeeping)
    loop.run_forever()
