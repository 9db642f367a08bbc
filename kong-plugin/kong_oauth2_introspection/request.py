"""The request being checked, read through Kong's PDK only as far as needed.

Every PDK call is a round trip to Kong, so the headers are read once and every
other part (method, path, query, body, client IP) only when something asks.
"""

from typing import Any, Dict, List, Optional

_UNSET = object()


class IncomingRequest:
    def __init__(self, kong):
        self.kong = kong
        # Kong sends a multi-map: lower-case names, every value a list.
        self.headers: Dict[str, List[str]] = kong.request.get_headers() or {}
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

    def _pdk(self, name, call):
        value = self._memo.get(name, _UNSET)
        if value is _UNSET:
            value = self._memo[name] = call()
        return value

    @property
    def method(self) -> str:
        return self._pdk("method", self.kong.request.get_method) or "GET"

    @property
    def path(self) -> str:
        return self._pdk("path", self.kong.request.get_path) or "/"

    @property
    def host(self) -> str:
        return self._pdk("host", self.kong.request.get_host) or ""

    @property
    def client_ip(self) -> str:
        return self._pdk("client_ip", self.kong.client.get_forwarded_ip) or ""

    @property
    def query(self) -> Dict[str, Any]:
        return self._pdk("query", self.kong.request.get_query) or {}

    @property
    def body(self) -> Dict[str, Any]:
        """The parsed body (form, multipart or JSON), {} when there is none."""
        def read():
            body = self.kong.request.get_body()
            return body if isinstance(body, dict) else {}
        return self._pdk("body", read)
