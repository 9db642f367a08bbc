"""The bounded HTTP server behind ``serve --metrics-port`` (/metrics, /health).

http.server's ThreadingHTTPServer starts a thread per connection and waits on
each for as long as the client likes: 2,000 idle connections were 2,000 threads,
and they took the file descriptors the plugin socket needs to accept Kong. Here
the cost is fixed whatever connects:

- one thread reads requests, for at most ``MAX_CONNECTIONS`` connections at once;
  a new connection pushes out the oldest one still sending its request (a real
  scraper sends its request as soon as it connects, so it gets through);
- a request head must arrive within ``READ_DEADLINE`` seconds, with no pause
  longer than ``IDLE_TIMEOUT``, and within ``MAX_HEAD`` bytes;
- ``WORKERS`` threads answer complete requests, each write bounded by
  ``WRITE_TIMEOUT``; every connection is closed after its answer.
"""

import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Callable, Dict, Optional, Tuple

MAX_CONNECTIONS = 32
WORKERS = 2
READ_DEADLINE = 10.0
IDLE_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_HEAD = 8192
ACCEPT_PAUSE = 1.0   # after accept() failed for lack of descriptors

# An answer: status, content type, body. A route maps a request path to one.
Answer = Tuple[int, str, bytes]
Route = Callable[[str], Answer]


class _Reading:
    __slots__ = ("sock", "opened", "last", "head")

    def __init__(self, sock: socket.socket, now: float):
        self.sock, self.opened, self.last, self.head = sock, now, now, b""


class LoopbackHTTPServer:
    """``route(path)`` answers GET and HEAD requests; see the module doc for the bounds."""

    def __init__(self, address: str, port: int, route: Route, server_name: str):
        self.route = route
        self.server_name = server_name
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.socket = socket.create_server((address, port), family=family,
                                           backlog=MAX_CONNECTIONS)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._reading: Dict[socket.socket, _Reading] = {}   # oldest first
        self._answering = 0
        self._lock = threading.Lock()
        self._listening = False
        self._paused_until = 0.0
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="oauth2-introspection-http")

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    # -- the reading thread -----------------------------------------------------------

    def serve_forever(self) -> None:
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                self._listen(now)
                for key, _ in self._selector.select(self._next_timeout(now)):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        self._read(key.data)
                self._expire(time.monotonic())
        finally:
            self._close_all()

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake()

    def _open(self) -> int:
        with self._lock:
            return len(self._reading) + self._answering

    def _listen(self, now: float) -> None:
        """Accept while there is room (or an old request to push out), else leave new
        connections in the kernel's backlog, costing us nothing."""
        want = now >= self._paused_until and (self._open() < MAX_CONNECTIONS
                                              or bool(self._reading))
        if want and not self._listening:
            self._selector.register(self.socket, selectors.EVENT_READ)
        elif not want and self._listening:
            self._selector.unregister(self.socket)
        self._listening = want

    def _next_timeout(self, now: float) -> float:
        timeout = 0.5
        for conn in self._reading.values():
            due = min(conn.opened + READ_DEADLINE, conn.last + IDLE_TIMEOUT)
            timeout = min(timeout, max(0.0, due - now))
        return timeout

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            if self._open() >= MAX_CONNECTIONS:
                if not self._reading:
                    return
                self._drop(next(iter(self._reading.values())))
            try:
                sock, _ = self.socket.accept()
            except BlockingIOError:
                return
            except OSError:   # EMFILE and the like: let the plugin socket have them
                self._paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            sock.setblocking(False)
            conn = _Reading(sock, time.monotonic())
            with self._lock:
                self._reading[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Reading) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.head += data
        conn.last = time.monotonic()
        if b"\r\n\r\n" in conn.head or b"\n\n" in conn.head:
            self._selector.unregister(conn.sock)
            with self._lock:
                del self._reading[conn.sock]
                self._answering += 1
            self._pool.submit(self._answer, conn.sock, conn.head)
        elif len(conn.head) > MAX_HEAD:
            self._drop(conn)

    def _expire(self, now: float) -> None:
        late = [c for c in self._reading.values()
                if now - c.opened > READ_DEADLINE or now - c.last > IDLE_TIMEOUT]
        for conn in late:
            self._drop(conn)

    def _drop(self, conn: _Reading) -> None:
        with self._lock:
            self._reading.pop(conn.sock, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass   # already awake (buffer full) or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except OSError:
            pass

    def _close_all(self) -> None:
        for conn in list(self._reading.values()):
            self._drop(conn)
        if self._listening:
            self._selector.unregister(self.socket)
        self.socket.close()
        self._pool.shutdown(wait=False)

    # -- the answering threads --------------------------------------------------------

    def _answer(self, sock: socket.socket, head: bytes) -> None:
        try:
            status, content_type, body = self._respond(head)
            reply = ("HTTP/1.1 %d %s\r\nServer: %s\r\nContent-Type: %s\r\n"
                     "Content-Length: %d\r\nConnection: close\r\n\r\n"
                     % (status, HTTPStatus(status).phrase, self.server_name, content_type,
                        len(body))).encode("latin-1")
            if not head.startswith(b"HEAD "):
                reply += body
            sock.setblocking(True)
            sock.settimeout(WRITE_TIMEOUT)
            sock.sendall(reply)
        except OSError:
            pass   # the client hung up or stopped reading: nothing to tell Kong's log
        finally:
            sock.close()
            with self._lock:
                self._answering -= 1
            self._wake()

    def _respond(self, head: bytes) -> Answer:
        parts = head.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "text/plain; charset=utf-8", b"bad request\n"
        if parts[0] not in (b"GET", b"HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET and HEAD\n"
        try:
            path = parts[1].decode("ascii").split("?", 1)[0]
        except UnicodeDecodeError:
            return 400, "text/plain; charset=utf-8", b"bad request\n"
        try:
            return self.route(path)
        except Exception:  # noqa: BLE001 - a broken report must not kill the port
            return 500, "text/plain; charset=utf-8", b"internal error\n"


def start(address: str, port: int, route: Route, server_name: str,
          thread_name: Optional[str] = None) -> LoopbackHTTPServer:
    """A LoopbackHTTPServer serving from its own daemon thread."""
    httpd = LoopbackHTTPServer(address, port, route, server_name)
    threading.Thread(target=httpd.serve_forever, daemon=True,
                     name=thread_name or "oauth2-introspection-http-reader").start()
    return httpd
