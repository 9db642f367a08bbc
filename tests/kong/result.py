"""What a test sees of one request: Kong's answer, what the upstream received,
and what happened on the way (PDK calls, Kong's own log lines, fail-open)."""

from typing import Any, Dict, List, Optional, Tuple

from .nginx import CIMultiDict, parse_args
from .proxy import kong_response_head, proxied_response_head

__all__ = ["Upstream", "Result", "FailedOpen"]


class Upstream(object):
    """Everything the upstream service would receive: every header line (also
    those past the 100 a PDK read returns), the raw query and the raw body."""

    def __init__(self, method: str, path: str, headers: CIMultiDict, raw_query: str,
                 raw_body: bytes, target: Optional[str] = None,
                 wire: Optional[List[Tuple[str, str]]] = None) -> None:
        self.method = method
        self.target = target if target is not None else \
            path + ("?" + raw_query if raw_query else "")
        self._wire = wire
        self.path = path
        self.headers = headers
        self.raw_query = raw_query
        self.query = parse_args(raw_query, max_args=10 ** 6)
        self.raw_body = raw_body
        self.body = raw_body.decode("utf-8", "surrogateescape")

    def wire_headers(self, volatile: Optional[str] = None) -> List[Tuple[str, str]]:
        """Every header line as nginx sends it upstream, in order (``volatile``
        stands in for the request id)."""
        wire = self._wire if self._wire is not None else self.headers.items_all()
        return [(k, volatile if volatile is not None and k == "X-Kong-Request-Id" else v)
                for k, v in wire]

    def __repr__(self) -> str:
        return "Upstream(%s %s?%s headers=%r)" % (self.method, self.path, self.raw_query,
                                                  self.headers)


class Result(object):
    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.json: Any = None
        self.response_headers = CIMultiDict()
        self.upstream: Optional[Upstream] = None   # set even when Kong answered itself
        self.proxied = True                        # the request reached the upstream
        self.consumer: Any = None
        self.credential: Any = None
        self.serialize: Dict[str, Any] = {}
        self.pdk_calls: List[str] = []
        self.pdk_trace: List[Tuple[str, List[Any]]] = []
        self.logs: List[Tuple[str, str]] = []       # kong.log.* from the plugin and the guard
        self.kong_logs: List[Tuple[str, str]] = []  # what Kong itself logs
        self.kong_error: Optional[str] = None
        self.plugin_ran = False                    # the plugin server got an event
        self.failed_open = False                   # Kong logged an RPC failure and went on
        self.passed_unauthenticated = False        # ... and the request reached the upstream
        self.guard_exit: Optional[int] = None      # status the post-function guard exited with
        self.ctx_shared: Dict[str, Any] = {}
        self.kong_version = "3.9"
        self.http_version = "HTTP/1.1"
        self.kong_exit = False                     # kong.response.exit/error answered
        self.connection_close = False              # nginx closes the client connection
        self.upstream_response_headers: List[Tuple[str, str]] = []

    def wire_headers(self, volatile: str = "<volatile>") -> List[Tuple[str, str]]:
        """The response head the client gets, in order, as Kong writes it
        (``volatile`` stands in for dates, latencies and the request id)."""
        if self.proxied:
            return proxied_response_head(kong_version=self.kong_version,
                                         version=self.http_version,
                                         upstream=self.upstream_response_headers,
                                         set_by_plugin=self.response_headers.items_all(),
                                         volatile=volatile)
        return kong_response_head(kong_version=self.kong_version,
                                  headers=self.response_headers.items_all(),
                                  close=self.connection_close or self.http_version == "HTTP/1.0",
                                  volatile=volatile)

    def __repr__(self) -> str:
        return ("Result(status=%r, kong_error=%r, failed_open=%r, guard_exit=%r, body=%r, "
                "pdk_calls=%r)" % (self.status, self.kong_error, self.failed_open,
                                   self.guard_exit, self.body[:200], self.pdk_calls))


class FailedOpen(AssertionError):
    """Kong passed this request to the upstream WITHOUT the plugin (its RPC failed,
    as Kong OSS 3.9 does): the plugin must never let that happen."""

    def __init__(self, result: Result) -> None:
        super().__init__("Kong failed open, the request reached the upstream without the "
                         "plugin: %s" % result.kong_error)
        self.result = result
