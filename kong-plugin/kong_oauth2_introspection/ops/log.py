"""Log lines of the plugin server, outside any request.

Kong copies the plugin server's stderr into its error log. Nothing here ever
formats a request, an RPC message or a config: callers pass finished sentences
that hold no token or secret.
"""

import sys
import threading
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from .. import NAME

LEVELS = {"debug": 10, "info": 20, "warn": 30, "err": 40}


class Log:
    def __init__(self, level: str = "info", stream=None):
        self.threshold = LEVELS[level]
        self.stream = stream
        self._lock = threading.Lock()

    def _write(self, level: str, msg: str) -> None:
        if LEVELS[level] < self.threshold:
            return
        line = f"[{NAME}] {level}: {msg}\n"
        with self._lock:
            stream = self.stream or sys.stderr
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass  # Kong closed our stderr: nowhere left to tell

    def debug(self, msg: str) -> None:
        self._write("debug", msg)

    def info(self, msg: str) -> None:
        self._write("info", msg)

    def warn(self, msg: str) -> None:
        self._write("warn", msg)

    def err(self, msg: str) -> None:
        self._write("err", msg)


# The process-wide log; ``serve`` sets its threshold from -v.
LOG = Log()


@lru_cache(maxsize=256)
def endpoint_label(url: str) -> str:
    """``scheme://host:port/path`` of a URL: no user info, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = "[%s]" % host
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
        return urlunsplit((parts.scheme, "%s:%d" % (host, port), parts.path, "", ""))
    except ValueError:
        return "unparsable"
