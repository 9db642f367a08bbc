"""HTTP for the plugin's own calls (the IdP, Kong's Admin API), bounded in total time.

urllib3 (pooled keep-alive connections) is used directly: ``requests`` on top of
it cost more CPU per call than the rest of a cache miss together (request and
cookie preparation, setting merges, hooks), for nothing this client needs.

urllib3 bounds each socket operation, not a whole exchange: a server that drips
one byte per second keeps a read alive for ever. Here every exchange has one end
time (``min(now + timeout, request deadline)``); a single reaper thread shuts
down the sockets of any exchange still running at its end time, which wakes the
blocked read at once. Answers are read up to a size cap, so a huge answer costs
at most that much memory.
"""

import atexit
import heapq
import itertools
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import urlencode

import certifi
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import NewConnectionError, TimeoutError as _Urllib3Timeout
from urllib3.util import parse_url

from .. import VERSION
from ..concurrency import DeadlineExceeded, current_deadline


@dataclass(frozen=True)
class TLS:
    """A config's TLS record for a server the plugin calls (both plugins use it)."""
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = field(default=None, repr=False)
    insecure_skip_verify: bool = False


class HTTPFailure(Exception):
    """No usable exchange; the message is safe to log (no URL, body or secret).

    ``kind``: ``refused``, ``timed_out``, ``unreachable`` (no connection, TLS or a
    broken exchange) or ``too_large``."""

    def __init__(self, message: str, kind: str = "unreachable"):
        super().__init__(message)
        self.kind = kind


class Unsendable(Exception):
    """The request cannot be put on the wire (a header value HTTP cannot carry):
    nothing was sent, so it says nothing about the server. Safe to log."""


class Reply(NamedTuple):
    status: int
    headers: Dict[str, str]
    body: bytes


class _Watch:
    __slots__ = ("at", "sockets", "fired", "done")

    def __init__(self, at: float):
        self.at = at
        self.sockets: List[socket.socket] = []
        self.fired = False
        self.done = False


# The reaper wakes on multiples of this (seconds): at most this late past an end time,
# and a handful of wake-ups a second however many exchanges run, instead of one
# wake-up (a thread switch) per exchange.
REAPER_TICK = 0.02


def _tick(at: float) -> float:
    return math.ceil(at / REAPER_TICK) * REAPER_TICK


class _Reaper:
    """One thread for the whole process: ends exchanges that outlive their end time."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._local = threading.local()
        self._wakes_at = math.inf   # when the reaper thread wakes next

    def watch(self, at: float) -> _Watch:
        watch = _Watch(at)
        with self._cond:
            heapq.heappush(self._heap, (at, next(self._seq), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="oauth2-introspection-http-reaper")
                self._thread.start()
            if _tick(at) < self._wakes_at:
                self._cond.notify()   # only an earlier end time needs the thread now
        self._local.watch = watch
        return watch

    def forget(self, watch: _Watch) -> None:
        watch.done = True  # popped lazily; nothing to shut down any more
        self._local.watch = None

    def add_socket(self, sock) -> None:
        watch = getattr(self._local, "watch", None)
        if watch is not None and sock is not None:
            watch.sockets.append(sock)
            if watch.fired:
                _shutdown(sock)

    def _run(self):
        while True:
            with self._cond:
                while not self._heap:
                    self._wakes_at = math.inf
                    self._cond.wait()
                now = time.monotonic()
                due: List[_Watch] = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
                if not due:
                    self._wakes_at = _tick(self._heap[0][0])
                    self._cond.wait(max(self._wakes_at - now, 0.0))
                    continue
            for watch in due:
                if not watch.done:
                    watch.fired = True
                    for sock in list(watch.sockets):
                        _shutdown(sock)


def _shutdown(sock) -> None:
    try:
        if sock.fileno() != -1:
            # The plain socket's shutdown, also for an SSLSocket: it wakes a blocked
            # read in the other thread without touching the TLS state it uses.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


_REAPER = _Reaper()


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self):
        sock = super()._new_conn()
        _REAPER.add_socket(sock)
        return sock

    def connect(self):
        super().connect()
        _REAPER.add_socket(self.sock)

    def request(self, *args, **kwargs):
        if self.sock is not None:  # a pooled connection: watch it for this exchange
            _REAPER.add_socket(self.sock)
        return super().request(*args, **kwargs)


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_FAILURES = (urllib3.exceptions.HTTPError, OSError, ValueError)
# Sent unless the caller says otherwise (what requests sent, with our own name).
_DEFAULT_HEADERS = {"User-Agent": "kong-oauth2-introspection/" + VERSION,
                    "Accept-Encoding": "gzip, deflate", "Accept": "*/*"}
_FORM = "application/x-www-form-urlencoded"
_MAX_ROUTES = 64


def check_sendable(headers: Optional[Dict[str, Any]]) -> None:
    """What http.client would refuse only while sending (after the
    connection is made): a value that is not Latin-1, holds CR, LF or NUL, or
    starts with a blank. Refused here, before anything is sent."""
    for name, value in (headers or {}).items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise Unsendable("header %s holds a character outside Latin-1" % name) from None
        if any(c in value for c in "\r\n\x00") or value[:1] in (" ", "\t"):
            raise Unsendable("header %s holds a control character or a leading blank"
                             % name)


def _caused_by(err: BaseException, kind: type) -> bool:
    """Whether ``kind`` is in ``err``'s chain (urllib3 wraps OSError, possibly twice)."""
    seen: List[BaseException] = []
    todo: List[BaseException] = [err]
    while todo and len(seen) < 16:
        current = todo.pop()
        if isinstance(current, kind):
            return True
        seen.append(current)
        todo.extend(a for a in (current.__cause__, current.__context__,
                                *getattr(current, "args", ()), getattr(current, "reason", None))
                    if isinstance(a, BaseException) and a not in seen)
    return False


def _private_files(tls: Any, prefix: str) -> Dict[str, str]:
    """The PEM strings of ``tls`` (ca, cert, key) as files only this process can read:
    urllib3 takes CA bundles and client certificates only as paths."""
    folder = tempfile.mkdtemp(prefix=prefix)  # mode 0700
    atexit.register(shutil.rmtree, folder, True)
    paths = {"folder": folder}
    for name in ("ca", "cert", "key"):
        pem = getattr(tls, name, None)
        if pem:
            path = os.path.join(folder, name + ".pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(pem)
            paths[name] = path
    return paths


def _encode(kwargs: Dict[str, Any]) -> Tuple[Optional[bytes], Dict[str, str]]:
    """The body and headers of ``data=`` (a form dict, str or bytes) and ``headers=``,
    as requests would have sent them."""
    data = kwargs.pop("data", None)
    given = kwargs.pop("headers", None) or {}
    if kwargs:
        raise TypeError("unsupported arguments: " + ", ".join(sorted(kwargs)))
    headers = dict(_DEFAULT_HEADERS)
    lowered = {name.lower() for name in given}
    if "accept" in lowered or "user-agent" in lowered or "accept-encoding" in lowered:
        headers = {n: v for n, v in headers.items() if n.lower() not in lowered}
    headers.update(given)
    if data is None:
        return None, headers
    if isinstance(data, Mapping):
        if "content-type" not in lowered:
            headers["Content-Type"] = _FORM
        # as requests did: a field whose value is None is left out
        return urlencode([(k, v) for k, v in data.items() if v is not None],
                         doseq=True).encode(), headers
    return (data.encode() if isinstance(data, str) else bytes(data)), headers


class HTTPClient:
    """One pooled connection manager; owns its connections (and TLS files) and closes them in
    ``close``."""

    @classmethod
    def for_tls(cls, tls: TLS, *, prefix: str, option: str, what: str, log: Any = None,
                pool_maxsize: int = 64) -> "HTTPClient":
        """A client for a config's TLS record (``ca``, ``cert``, ``key``,
        ``insecure_skip_verify``): a CA replaces the system's, a certificate is sent."""
        files = _private_files(tls, prefix) if (tls.ca or tls.cert) else {}
        verify: Any = True
        if tls.insecure_skip_verify:
            verify = False
            if log is not None:
                log.warn("%s.insecure_skip_verify is on: %s's certificate is not verified"
                         % (option, what))
        elif "ca" in files:
            verify = files["ca"]
        cert = (files["cert"], files["key"]) if "cert" in files else None
        client = cls(pool_maxsize=pool_maxsize, verify=verify, cert=cert)
        client._folder = files.get("folder")
        return client

    def __init__(self, *, pool_maxsize: int = 64, verify: Any = True,
                 cert: Optional[Tuple[str, str]] = None):
        self._folder: Optional[str] = None
        # verify: True (certifi's bundle, as requests used), a CA file, or False (no
        # certificate or host name check). No proxy or netrc: urllib3 reads no
        # environment. Never retried or redirected here (retries=False).
        tls: Dict[str, Any] = {"cert_reqs": "CERT_NONE"} if verify is False else {
            "cert_reqs": "CERT_REQUIRED",
            "ca_certs": verify if isinstance(verify, str) else certifi.where()}
        if cert is not None:
            tls["cert_file"], tls["key_file"] = cert
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=pool_maxsize, block=False,
                                        retries=False, **tls)
        self.pool.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        # URL -> (its origin's pool, the path and query sent): a config calls the same
        # few URLs again and again, and PoolManager parses and normalizes each one
        # on every call (a tenth of a cache miss's CPU).
        self._routes: Dict[str, Tuple[Any, str]] = {}

    def _route(self, url: str) -> Tuple[Any, str]:
        route = self._routes.get(url)
        if route is None or route[0].pool is None:   # new, or its pool was closed
            parsed = parse_url(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise ValueError("not an absolute http(s) URL")
            route = (self.pool.connection_from_host(parsed.host, port=parsed.port,
                                                    scheme=parsed.scheme),
                     parsed.request_uri)
            if len(self._routes) >= _MAX_ROUTES:   # e.g. one Admin API URL per consumer
                self._routes.clear()
            self._routes[url] = route
        return route

    def request(self, method: str, url: str, *, timeout: float, max_bytes: int,
                **kwargs: Any) -> Reply:
        """One exchange, done within ``timeout`` seconds and the request deadline.

        Raises DeadlineExceeded when the request's deadline ended it, HTTPFailure
        for anything else that gave no complete answer (``timed out``, refused,
        TLS, larger than ``max_bytes``)."""
        check_sendable(kwargs.get("headers"))
        now = time.monotonic()
        deadline = current_deadline()
        at = now + timeout
        if deadline is not None:
            if deadline.at <= now:
                raise DeadlineExceeded("request deadline exceeded")
            at = min(at, deadline.at)
        body, headers = _encode(kwargs)
        # "Connection: close" (keepalive 0): the server closes after its answer, so
        # the connection must not go back to the pool, where the next request could
        # meet it before its close arrives.
        closing = any(k.lower() == "connection" and str(v).lower() == "close"
                      for k, v in (headers or {}).items())
        per_op = max(at - now, 0.001)
        watch = _REAPER.watch(at)
        try:
            pool, target = self._route(url)
            response = pool.urlopen(method, target, body=body, headers=headers,
                                    redirect=False, assert_same_host=False,
                                    preload_content=False,
                                    timeout=urllib3.Timeout(connect=per_op, read=per_op))
            try:
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise HTTPFailure("answer larger than %d bytes" % max_bytes, "too_large")
                data = response.read(max_bytes + 1, decode_content=True) or b""
                if len(data) > max_bytes:
                    raise HTTPFailure("answer larger than %d bytes" % max_bytes, "too_large")
                # read to its end: urllib3 has put the connection back in the pool
                return Reply(response.status, dict(response.headers), data)
            finally:
                response.close()
                if closing:
                    self.drop_idle()
        except HTTPFailure:
            raise
        except _FAILURES as err:
            if watch.fired or time.monotonic() >= at or (
                    isinstance(err, _Urllib3Timeout) and not isinstance(err, NewConnectionError)):
                raise self._ended(watch, deadline) from None
            refused = _caused_by(err, ConnectionRefusedError)
            raise HTTPFailure("could not connect (%s)" % (
                "connection refused" if refused else type(err).__name__),
                "refused" if refused else "unreachable") from None
        finally:
            _REAPER.forget(watch)

    @staticmethod
    def _ended(watch: _Watch, deadline) -> Exception:
        if deadline is not None and deadline.expired:
            return DeadlineExceeded("request deadline exceeded")
        return HTTPFailure("timed out", "timed_out")

    def drop_idle(self) -> None:
        self.pool.clear()
        self._routes.clear()

    def close(self) -> None:
        self.pool.clear()
        self._routes.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
