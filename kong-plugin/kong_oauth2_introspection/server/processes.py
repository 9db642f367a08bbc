"""``serve --processes N``: N event loops on the one socket Kong connects to.

Kong runs one nginx worker per core, and every worker's RPCs go to the socket of
one plugin server; one Python process uses one core. So the parent binds and
listens on that socket (with every check a single-process ``serve`` makes) and
forks N children that accept on it, each with its own loop, threads and
runtimes, as a single process has. What they must agree on lives in the node
directory (node.py): the instance table (table.py) and each child's private
socket for the Steps Kong sends on another child's connection (peers.py).

The parent only supervises: a child that dies is replaced in its slot (one log
line; at most once a second per slot, so a child that cannot start does not
spin), the children die with the parent (PR_SET_PDEATHSIG, and each one's
housekeeping checks its parent), SIGTERM or SIGINT stops them all, and the
socket file is removed as a single process removes it. A child's death loses
only the events it held: Kong fails those open, which the guard turns into 503s.
"""

import ctypes
import errno
import os
import shutil
import signal
import socket
import time
from typing import Callable, Dict, List, Optional

from .. import node
from ..ops.log import Log
from . import table
from .sizing import MAX_PROCESSES
from .listener import (EVENT_SLOTS, MAX_SOCKET_PATH, PluginServer, StartError, _take_socket_path,
                       listen_error, raise_nofile, serve_child)

RESPAWN_INTERVAL = 1.0   # per slot
STOP_GRACE = 5.0         # SIGTERM, then SIGKILL
_PR_SET_PDEATHSIG = 1
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
assert MAX_PROCESSES == EVENT_SLOTS


def node_directory(prefix: str, plugin: str) -> str:
    return os.path.join(prefix, plugin + ".node")


def peer_path(directory: str, slot: int) -> str:
    return os.path.join(directory, "p%d.sock" % slot)


class Supervisor:
    def __init__(self, socket_path: str, directory: str, processes: int,
                 make_server: Callable[[int, table.InstanceTable], PluginServer], log: Log, *,
                 backlog: int = 4096):
        self.socket_path = socket_path
        self.directory = directory
        self.processes = processes
        self.make_server = make_server
        self.log = log
        self.backlog = backlog
        self.children: Dict[int, int] = {}        # pid -> slot
        self._started: Dict[int, float] = {}      # slot -> when its child last started
        self._sock: Optional[socket.socket] = None
        self._parent = os.getppid()
        self._pid = os.getpid()
        self.nofile = -1

    # -- start -----------------------------------------------------------------

    def start(self) -> None:
        """Everything that can refuse to start, before any child exists: raises
        StartError with the one line ``serve`` prints."""
        _take_socket_path(self.socket_path)
        longest = peer_path(self.directory, self.processes - 1)
        if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
            raise StartError("socket path %s is %d bytes, longer than the %d a Unix socket "
                             "path may have: use a shorter -kong-prefix"
                             % (longest, len(os.fsencode(longest)), MAX_SOCKET_PATH))
        try:
            node.set_directory(self.directory)
            table.reset(self.directory)
            _forget_old_metrics()
        except Exception as err:  # noqa: BLE001 - OSError, lmdb.Error: one line, no traceback
            raise StartError("cannot use the node directory %s: %s"
                             % (self.directory, getattr(err, "strerror", None) or err)) from None
        self.nofile = raise_nofile(self.log)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.socket_path)
            sock.listen(self.backlog)
        except OSError as err:
            sock.close()
            raise listen_error(self.socket_path, err) from None
        self._sock = sock

    # -- run -------------------------------------------------------------------

    def run(self) -> None:
        """Fork the children and supervise them until told to stop or Kong is gone."""
        assert self._sock is not None, "start() first"
        self._pid = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for slot in range(self.processes):
                self._spawn(slot)
            self.log.info("serving %s with %d processes (pids %s, %d open files each)"
                          % (self.socket_path, self.processes,
                             " ".join(str(p) for p in sorted(self.children)), self.nofile))
            self._supervise()
        finally:
            self._stop()

    def _supervise(self) -> None:
        vacant: List[int] = []
        while True:
            info = signal.sigtimedwait(_SIGNALS, RESPAWN_INTERVAL / 2)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return
            vacant.extend(self._reap())
            now = time.monotonic()
            for slot in list(vacant):
                if now - self._started.get(slot, 0.0) >= RESPAWN_INTERVAL:
                    vacant.remove(slot)
                    self._spawn(slot)
            if os.getppid() != self._parent:
                self.log.info("Kong is gone; stopping %d processes" % len(self.children))
                return

    def _reap(self) -> List[int]:
        slots: List[int] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return slots
            if pid == 0:
                return slots
            slot = self.children.pop(pid, None)
            if slot is None:
                continue
            _metrics_gone(pid)
            self.log.warn("process %d (slot %d) %s; starting another in its place"
                          % (pid, slot, _how(status)))
            slots.append(slot)

    def _spawn(self, slot: int) -> None:
        self._started[slot] = time.monotonic()
        pid = os.fork()
        if pid:
            self.children[pid] = slot
            return
        code = 1
        try:
            code = self._child(slot)
        except BaseException as err:  # noqa: BLE001 - never return into the parent's code
            try:
                self.log.err("process slot %d failed (%s)" % (slot, type(err).__name__))
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(code)

    def _child(self, slot: int) -> int:
        _die_with_parent()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if os.getppid() != self._pid:   # the parent died between fork() and prctl()
            return 0
        assert self._sock is not None
        server = self.make_server(slot, table.InstanceTable(self.directory))
        serve_child(self._sock, peer_path(self.directory, slot),
                    lambda other: peer_path(self.directory, other), server,
                    backlog=self.backlog)
        return 0

    # -- stop ------------------------------------------------------------------

    def _stop(self) -> None:
        for pid in list(self.children):
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.children and time.monotonic() < deadline:
            self._reap_quietly()
            time.sleep(0.02)
        for pid in list(self.children):
            _kill(pid, signal.SIGKILL)
        while self.children:
            if not self._reap_quietly(block=True):
                break
        if self._sock is not None:
            self._sock.close()
        # Kong's configs (secrets included) stay on disk no longer than the server
        shutil.rmtree(table.path(self.directory), ignore_errors=True)
        for path in [self.socket_path] + [peer_path(self.directory, s)
                                          for s in range(self.processes)]:
            try:
                os.unlink(path)
            except OSError:
                pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def _reap_quietly(self, block: bool = False) -> bool:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.children.clear()
            return False
        if pid:
            self.children.pop(pid, None)
        return True


def _forget_old_metrics() -> None:
    """Remove the metrics files of earlier runs on this prefix (ours is cli's fresh
    PROMETHEUS_MULTIPROC_DIR): the counts are this plugin server's, as with one process."""
    ours = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not ours:
        return
    parent = os.path.dirname(ours)
    for name in os.listdir(parent):
        if os.path.join(parent, name) != ours:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _metrics_gone(pid: int) -> None:
    """Drop a dead process's live gauges (prometheus_client's multiprocess mode);
    its counters stay in the sums, as counters must."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            from prometheus_client import multiprocess
            multiprocess.mark_process_dead(pid)
        except Exception:  # noqa: BLE001 - metrics never stop the supervisor
            pass


def _die_with_parent() -> None:
    """SIGTERM this process when the parent dies (Linux); elsewhere the child's
    housekeeping notices the new parent within a sweep."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as err:
        if err.errno != errno.ESRCH:
            raise


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return "was killed by %s" % signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            return "was killed by signal %d" % os.WTERMSIG(status)
    return "exited with %d" % os.waitstatus_to_exitcode(status)
