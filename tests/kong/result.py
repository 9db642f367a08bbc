"""What a test sees of one request: Kong's answer, what the upstream received,
and what happened on the way (PDK calls, Kong's own log lines, fail-open)."""

from typing import Any, Dict, List, Optional, Tuple

from .nginx import CIMultiDict, parse_args

__all__ = ["Upstream", "Result", "FailedOpen"]


class Upstream(object):
    """Everything the upstream service would receive: every header line (also
    those past the 100 a PDK read returns), the raw query and the raw body."""

    def __init__(self, method: str, path: str, headers: CIMultiDict, raw_query: str,
                 raw_body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.raw_query = raw_query
        self.query = parse_args(raw_query, max_args=10 ** 6)
        self.raw_body = raw_body
        self.body = raw_body.decode("utf-8", "surrogateescape")

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
