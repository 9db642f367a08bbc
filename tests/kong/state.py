"""The per-request state Kong's PDK reads and writes: ngx.var, ngx.ctx,
kong.ctx.shared, the authenticated consumer/credential, and the request the
upstream will get (ngx.req.set_header & co. change it in place).

Mirrors lua-nginx-module's variables (``$http_NAME`` joins repeated lines with
``, `` -- ``; `` for Cookie -- since nginx 1.23, as OpenResty 1.25 in Kong 3.9 does)
and Kong's request body handling (``client_body_buffer_size``, 8 KB by default)."""

import time
import uuid
from typing import Any, Dict, Optional

from .lua import LuaError, lua_str
from .nginx import CIMultiDict, Pairs, parse_args
from .result import Result

__all__ = ["RequestState"]


class RequestState(object):
    client_cert: Optional[str] = None   # PEM chain of a client certificate (mTLS)

    def __init__(self, *, standin: Any, instance: Any, method: str, path: str, pairs: Pairs,
                 raw_query: str, body: bytes, client_ip: str, credential: Any, consumer: Any,
                 phase: str, body_buffer: int) -> None:
        self.standin = standin
        self.instance = instance
        self.phase = phase
        self.method = method.upper()
        self.path = path
        self.headers = CIMultiDict(pairs)
        self.orig_headers = CIMultiDict(pairs)
        self.http_version = "HTTP/1.1"
        self.body = body
        # nginx spooled a body larger than client_body_buffer_size to a file:
        # ngx.req.get_body_data() is then nil
        self.body_in_file = len(body) > body_buffer
        self.raw_query = raw_query
        self.orig_raw_query = raw_query
        self.client_ip = client_ip
        self.credential = credential
        self.consumer = consumer
        self.upstream_path = path
        self.upstream_method = self.method
        self.upstream_scheme = "http"
        self.ctx_shared: Dict[str, Any] = {}
        self.ngx_ctx: Dict[str, Any] = {}
        self.response_headers = CIMultiDict()
        self.result = Result()
        self.request_id = uuid.uuid4().hex
        self.start_time = time.time()

    def host(self) -> str:
        h = self.headers.get("host", "")
        return h.rsplit(":", 1)[0].lower() if not h.startswith("[") else h.split("]")[0] + "]"

    def content_type(self) -> Optional[str]:
        return self.http_var("content-type")

    def http_var(self, name: str) -> Optional[str]:
        """``$http_NAME``: every line of that header, joined."""
        want = name.lower().replace("-", "_")
        vals = [v for k, v in self.headers.items_all() if k.lower().replace("-", "_") == want]
        if not vals:
            return None
        return ("; " if want == "cookie" else ", ").join(vals)

    def get_header(self, name: str) -> Optional[str]:
        """kong.request.get_header (kong/tools/http.lua get_header, Kong 3.9):
        ``$http_NAME``; when that holds ", " (repeated lines, or one value with a
        comma) the first value from ngx.req.get_headers() -- which reads only the
        first 100 lines, so such a header past them reads as nil."""
        value = self.http_var(name)
        if value is None or ", " not in value:
            return value
        want = name.lower().replace("_", "-")
        for k, v in self.headers.items_all()[:100]:
            if k.lower() == want:
                return v
        return None

    def ngx_var(self, name: Any) -> Optional[str]:
        if not isinstance(name, str):
            raise LuaError("bad argument #1 to 'get_var' (string expected)")
        if name.startswith("http_"):
            return self.http_var(name[5:])
        if name.startswith("arg_"):
            v = parse_args(self.raw_query).get(name[4:])
            return v[0] if isinstance(v, list) else (None if v is True else v)
        q = ("?" + self.raw_query) if self.raw_query else ""
        table = {
            "remote_addr": self.client_ip, "realip_remote_addr": self.client_ip,
            "remote_port": "54321", "server_port": str(self.standin.proxy_port), "server_addr": "127.0.0.1",
            "host": self.host(), "scheme": "http", "request_method": self.method,
            "request_uri": self.path + q, "uri": self.path,
            "args": self.raw_query or None, "is_args": "?" if self.raw_query else "",
            "query_string": self.raw_query or None, "content_type": self.content_type(),
            "content_length": self.headers.get("content-length"),
            "request_id": self.request_id, "upstream_uri": self.upstream_path + q,
            "upstream_scheme": self.upstream_scheme, "https": "",
            "server_protocol": "HTTP/1.1", "request_length": str(len(self.body)),
        }
        v = table.get(name)
        return lua_str(v) if isinstance(v, bytes) else v
