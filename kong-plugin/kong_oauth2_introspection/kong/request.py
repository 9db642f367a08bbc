"""The request being checked, read through Kong's PDK only as far as needed.

Every PDK call is a round trip to Kong, so the headers are read once and every
other part (method, path, query, body, client IP) only when something asks.

Two rules from real Kong (../shared/design/kong-plugin-server.md):
- A PDK read that fails is "nothing there": Kong 3.x hands us ``None``, Kong 2.8
  raises a StepError (``PDKException``). Neither is a server error.
- Reads are capped: ``get_headers``/``get_query`` return 100 lines unless asked
  for more (1000 at most). We ask for the most and refuse a request that fills
  it: what we did not see, we cannot clear or judge.
"""

from typing import Any, Callable, Dict, List, Optional

from kong_pdk.exception import PDKException

from . import body as bodies

MAX_LINES = 1000  # the largest max Kong's get_headers/get_query accept
_UNSET = object()


class Uninspectable(Exception):
    """The request holds more than the plugin can read (or its headers cannot be read)."""


def _pdk(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except PDKException:
        return None


def _lines(table: Dict[str, Any]) -> int:
    return sum(len(v) if isinstance(v, list) else 1 for v in table.values())


class IncomingRequest:
    def __init__(self, kong):
        self.kong = kong
        headers = _pdk(kong.request.get_headers, MAX_LINES)
        if not isinstance(headers, dict):
            # An empty table arrives as an empty map; anything else is a failed read.
            if headers == []:
                headers = {}
            else:
                raise Uninspectable("headers could not be read")
        if _lines(headers) >= MAX_LINES:
            raise Uninspectable("more than %d header lines" % (MAX_LINES - 1))
        # Kong sends a multi-map: lower-case names, every value a list.
        self.headers: Dict[str, List[str]] = headers
        self._memo: Dict[str, Any] = {}

    def header(self, name: str) -> Optional[str]:
        """The header's value, or None when absent or sent more than once."""
        values = self.headers.get(name.lower())
        if isinstance(values, str):
            return values
        if values and len(values) == 1 and isinstance(values[0], str):
            return values[0]
        return None

    def header_count(self, name: str) -> int:
        values = self.headers.get(name.lower())
        if values is None:
            return 0
        return 1 if isinstance(values, str) else len(values)

    def _read(self, name, call, *args):
        value = self._memo.get(name, _UNSET)
        if value is _UNSET:
            value = self._memo[name] = _pdk(call, *args)
        return value

    @property
    def method(self) -> str:
        value = self._read("method", self.kong.request.get_method)
        return value if isinstance(value, str) else "GET"

    @property
    def path(self) -> str:
        value = self._read("path", self.kong.request.get_path)
        return value if isinstance(value, str) else "/"

    @property
    def host(self) -> str:
        value = self._read("host", self.kong.request.get_host)
        return value if isinstance(value, str) else ""

    @property
    def client_ip(self) -> str:
        value = self._read("client_ip", self.kong.client.get_forwarded_ip)
        return value if isinstance(value, str) else ""

    @property
    def query(self) -> Dict[str, Any]:
        value = self._read("query", self.kong.request.get_query, MAX_LINES)
        if not isinstance(value, dict):
            return {}
        if _lines(value) >= MAX_LINES:
            raise Uninspectable("more than %d query arguments" % (MAX_LINES - 1))
        return value

    @property
    def raw_body(self) -> Optional[bytes]:
        """The body's bytes, for cutting a field out of a body ``body_field`` read.

        Only after ``body_field`` found something: Kong 3.9's RPC cannot carry the
        ``nil`` that ``get_raw_body`` gives for a body nginx spooled to a file
        (mp_rpc.lua packs it as binary and raises: a 500), while ``get_body``
        answers such a body with a plain ``nil``."""
        if not isinstance(self._memo.get("body"), dict):
            return None
        value = self._read("raw_body", self.kong.request.get_raw_body)
        if isinstance(value, str):
            return value.encode("utf-8", "surrogateescape")
        return value if isinstance(value, bytes) else None

    def body_field(self, name: str) -> Optional[List[Any]]:
        """Every value of body field ``name`` (form, multipart or JSON); None if no body.

        Kong parses the body (``get_body``, asked for its largest form cap): a body
        it cannot read (no or an unsupported type, bad JSON, spooled to a file) is
        ``nil`` on Kong 3.x and a StepError on 2.8, both "no body" here."""
        if bodies.kind(self.header("content-type")) is None:
            return None  # not a body that can carry fields: do not even read it
        parsed = self._read("body", self.kong.request.get_body, None, MAX_LINES)
        if parsed == []:
            parsed = self._memo["body"] = {}  # an empty Lua table: JSON {} or no field
        if not isinstance(parsed, dict):
            return None
        if bodies.kind(self.header("content-type")) == bodies.FORM \
                and _lines(parsed) >= MAX_LINES:  # the one parse Kong caps
            raise Uninspectable("more than %d form fields" % (MAX_LINES - 1))
        if name not in parsed:
            return []
        value = parsed[name]
        return value if isinstance(value, list) else [value]
