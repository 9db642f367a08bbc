"""The Lua side of Kong's PDK, as mp_rpc.lua's bridge loop runs it for a plugin
server: each ``{Method, Args}`` the plugin sends is looked up here and called.

Mirrors kong/pdk/request.lua, client.lua, response.lua, service/request.lua,
log.lua, ctx.lua, private/checks.lua and kong/runloop/plugin_servers/plugin.lua's
``exposed_api`` (Kong 3.9). A function returns its value, or ``Multi(value, err)``
for Lua's ``nil, err`` (Kong 3.x keeps only the first value; Kong 2.8 answered
``plugin.StepError``: see rpc.py). Raising LuaError models a Lua ``error()``,
which fails the request with 500.
"""

import json
import re
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from .lua import LuaError, LuaNil, Multi, with_cjson_null, cjson_encode, cjson_str, is_uuid, lua_number, \
    lua_tostring, lua_type
from .nginx import encode_args, mmap_headers, parse_args, parse_multipart, search_remove
from .state import RequestState

__all__ = ["PDK", "Exited", "STEP_METHODS", "MULTI_MAP", "RAW", "ADDED", "available"]

# mp_rpc.lua get_step_method / must_fix
STEP_METHODS = {
    "kong.client.get_credential": "plugin.StepCredential",
    "kong.client.load_consumer": "plugin.StepConsumer",
    "kong.client.get_consumer": "plugin.StepConsumer",
    "kong.client.authenticate": "plugin.StepCredential",
    "kong.node.get_memory_stats": "plugin.StepMemoryStats",
    "kong.router.get_route": "plugin.StepRoute",
    "kong.router.get_service": "plugin.StepService",
    "kong.request.get_query": "plugin.StepMultiMap",
    "kong.request.get_headers": "plugin.StepMultiMap",
    "kong.response.get_headers": "plugin.StepMultiMap",
    "kong.service.response.get_headers": "plugin.StepMultiMap",
}
MULTI_MAP = ("kong.request.get_query", "kong.request.get_headers",
             "kong.response.get_headers", "kong.service.response.get_headers")
RAW = ("kong.request.get_raw_body", "kong.response.get_raw_body",
       "kong.service.response.get_raw_body")

LOG_LEVELS = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")
_SPOOLED = ("request body did not fit into client body buffer, consider raising "
            "'client_body_buffer_size'")
_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "MKCOL", "COPY", "MOVE",
            "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE")
_ERROR_MESSAGES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden",
                   404: "Not found", 405: "Method not allowed",
                   429: "API rate limit exceeded", 500: "An unexpected error occurred",
                   502: "An invalid response was received from the upstream server",
                   503: "The upstream server is currently unavailable"}


_RESERVED = frozenset(b":/?#[]@!$&'()*+,;=%")
_HEX2 = re.compile(rb"[0-9A-Fa-f]{2}")


def normalize_path(path: str) -> str:
    """kong.tools.uri.normalize as get_path uses it: %XX of a byte that is not
    reserved becomes the byte itself; reserved ones stay escaped (upper-case)."""
    raw = path.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and _HEX2.fullmatch(raw[i + 1:i + 3]):
            b = int(raw[i + 1:i + 3], 16)
            out += (b"%%%02X" % b) if b in _RESERVED else bytes([b])
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def escape_header_name(name: str) -> str:
    """lua-nginx-module escapes control bytes in a header name it sets
    (observed: ``x-bad\\r\\nx-injected`` goes upstream as ``x-bad%0D%0Ax-injected``)."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: "%%%02X" % ord(m.group()), name)


# PDK functions missing from older Kong lines: the first (major, minor) that has
# them. Kong 3.4.2 has no clear_query_arg (observed: "could not find pdk method",
# the event goes on, the argument reaches the upstream); Kong 3.9 has it.
ADDED = {"kong.service.request.clear_query_arg": (3, 5)}


def available(method: str, kong_version: str) -> bool:
    since = ADDED.get(method)
    if since is None:
        return True
    major, minor = (int(x) for x in (kong_version.split(".") + ["0"])[:2])
    return (major, minor) >= since


class Exited(Exception):
    """kong.response.exit/error ran: the plugin's event is never resumed."""


def header_values(name: Any, value: Any, multi: bool) -> List[str]:
    """checks.validate_header(s) + normalize_multi_header: the header's values,
    an empty list meaning 'clear it'; an empty string goes upstream as one space
    (observed on Kong 3.9.1), a number as its Lua string."""
    if not isinstance(name, str):
        raise LuaError("invalid header name %r: got %s, expected string" % (name, lua_type(name)))
    if isinstance(value, str):
        return [value if value != "" else " "]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (int, float)):
        return [lua_number(value)]
    if multi and isinstance(value, (list, dict)):
        out = []
        for vv in (value if isinstance(value, list) else []):   # ipairs: a map has no array part
            if not isinstance(vv, str):
                raise LuaError("invalid header value in array %r: got %s, expected string"
                               % (name, lua_type(vv)))
            out.append(vv if vv != "" else " ")
        return out
    if multi:
        raise LuaError("invalid header value for %r: got %s, expected string, number, "
                       "boolean or array of strings" % (name, lua_type(value)))
    raise LuaError("invalid header value for %r: got %s, expected string, number or boolean"
                   % (name, lua_type(value)))


def _headers_table(headers: Any, what: str) -> List[Tuple[Any, Any]]:
    """A Lua table of headers: a map's pairs. A non-empty sequence has number keys,
    which validate_headers refuses."""
    if not isinstance(headers, (dict, list)):
        raise LuaError("%s must be a table" % what)
    if isinstance(headers, list):
        return [(i + 1, v) for i, v in enumerate(headers)]
    return list(headers.items())


def _max(value: Any, what: str) -> int:
    """request.lua's max_headers / max_args checks: 1..1000, default 100."""
    if value is None:
        return 100
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise LuaError("%s must be a number" % what)
    if value < 1:
        raise LuaError("%s must be >= 1" % what)
    if value > 1000:
        raise LuaError("%s must be <= 1000" % what)
    return int(value)


class PDK(object):
    # PDK function name -> method of this class (built once, below the class)
    TABLE: Dict[str, Callable[..., Any]] = {}

    def __init__(self, state: RequestState) -> None:
        self.s = state

    def call(self, method: str, args: List[Any]) -> Any:
        fn = self.TABLE.get(method)
        if fn is None or not available(method, self.s.standin.kong_version):
            return LuaNil   # "could not find pdk method": a Step without Data, event goes on
        return fn(self, *args)

    # ---- kong.log
    @staticmethod
    def _make_log(level: str) -> Callable[..., None]:
        def log(self: "PDK", *args: Any) -> None:
            self.s.result.logs.append((level, "".join(lua_tostring(a) for a in args)))
        return log

    def m_log__set_serialize_value(self, key: Any = None, value: Any = None,
                                   options: Any = None) -> None:
        if not isinstance(key, str):
            raise LuaError("key must be a string")
        if value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
            raise LuaError("value must be a number, string, boolean or a non-self-referencial table")
        self.s.result.serialize[key] = value

    def m_log__serialize(self) -> str:
        s = self.s
        return cjson_encode({
            "request": {"method": s.method, "uri": s.path,
                        "headers": mmap_headers(s.headers.items_all(), 100),
                        "querystring": parse_args(s.orig_raw_query)},
            "client_ip": s.client_ip, "consumer": s.consumer,
            "authenticated_entity": s.credential, "started_at": int(s.start_time * 1000),
        })

    # ---- kong.request
    def m_request__get_method(self) -> str:
        return self.s.method

    def m_request__get_path(self) -> str:
        # kong.tools.uri normalize: percent-escapes of unreserved bytes decoded,
        # reserved ones (%2F...) kept (observed: a%20b%2Fc%C3%A9 -> "a b%2Fcé")
        return normalize_path(self.s.path)

    def m_request__get_raw_path(self) -> str:
        return self.s.path

    def m_request__get_path_with_query(self) -> str:
        return self.s.path + (("?" + self.s.orig_raw_query) if self.s.orig_raw_query else "")

    def m_request__get_host(self) -> str:
        return self.s.host()

    def m_request__get_port(self) -> int:
        return self.s.standin.proxy_port

    def m_request__get_scheme(self) -> str:
        return "http"

    def m_request__get_http_version(self) -> float:
        # ngx.req.http_version(): 1.1, or 1.0 -- a Lua number, packed as integer 1
        return {"HTTP/1.0": 1.0, "HTTP/2.0": 2.0}.get(self.s.http_version, 1.1)

    m_request__get_forwarded_host = m_request__get_host
    m_request__get_forwarded_port = m_request__get_port
    m_request__get_forwarded_scheme = m_request__get_scheme
    m_request__get_forwarded_path = m_request__get_path

    def m_request__get_forwarded_prefix(self) -> None:
        return None

    def m_request__get_raw_query(self) -> str:
        return self.s.raw_query

    def m_request__get_query_arg(self, name: Any = None) -> Any:
        if not isinstance(name, str):
            raise LuaError("query argument name must be a string")
        v = parse_args(self.s.raw_query, 100).get(name)     # reads get_query(): capped
        return v[0] if isinstance(v, list) else v

    def m_request__get_query(self, max_args: Any = None) -> Dict[str, Any]:
        return parse_args(self.s.raw_query, _max(max_args, "max_args"))

    def m_request__get_header(self, name: Any = None) -> Optional[str]:
        if not isinstance(name, str):
            raise LuaError("header name must be a string")
        return self.s.get_header(name)

    def m_request__get_headers(self, max_headers: Any = None) -> Dict[str, Any]:
        return mmap_headers(self.s.headers.items_all(), _max(max_headers, "max_headers"))

    def m_request__get_raw_body(self) -> Any:
        if self.s.body_in_file:
            return Multi(None, _SPOOLED)
        return self.s.body

    def m_request__get_body(self, mimetype: Any = None, max_args: Any = None,
                            max_allowed_file_size: Any = None) -> Any:
        content_type = mimetype or self.s.content_type()
        if not content_type:
            return Multi(None, "missing content type")
        ct = content_type.lower().split(";", 1)[0]
        if ct.startswith("application/x-www-form-urlencoded"):
            limit = _max(max_args, "max_args")
            if self.s.body_in_file:
                return Multi(None, "request body in temp file not supported")
            return parse_args(self.s.body.decode("utf-8", "surrogateescape"), limit)
        if ct.startswith("application/json"):
            if self.s.body_in_file:
                return Multi(None, _SPOOLED)
            try:  # cjson passes string bytes through undecoded
                v = json.loads(self.s.body.decode("utf-8", "surrogateescape"))
            except ValueError:
                v = None
            if not isinstance(v, (dict, list)):
                return Multi(None, "invalid json body")
            return with_cjson_null(v)
        if ct.startswith("multipart/form-data"):
            if self.s.body_in_file:
                return Multi(None, _SPOOLED)
            parts = parse_multipart(self.s.body, content_type)
            if parts is None:
                return Multi(None, "unable to decode multipart body")
            return parts
        return Multi(None, "unsupported content type '%s'" % content_type)

    def m_request__get_uri_captures(self) -> Dict[str, Any]:
        return {"unnamed": [], "named": {}}

    def m_request__get_start_time(self) -> int:
        return int(self.s.start_time * 1000)

    def m_request__get_id(self) -> str:
        return self.s.request_id

    # ---- kong.client
    def m_client__get_ip(self) -> str:
        return self.s.client_ip

    def m_client__get_forwarded_ip(self) -> str:
        return self.s.client_ip

    def m_client__get_port(self) -> int:
        return 54321

    m_client__get_forwarded_port = m_client__get_port

    def m_client__tls__get_full_client_certificate_chain(self) -> Optional[str]:
        # Kong 3.x: the PEM chain, client certificate first; nil (and an error,
        # which the RPC drops) when the client sent none.
        return self.s.client_cert

    def m_client__get_credential(self) -> Any:
        return self.s.credential

    def m_client__get_consumer(self) -> Any:
        return self.s.consumer

    def m_client__get_protocol(self, allow_terminated: Any = None) -> str:
        return "http"

    def m_client__load_consumer(self, consumer_id: Any = None,
                                search_by_username: Any = None) -> Any:
        if not isinstance(consumer_id, str):
            raise LuaError("consumer_id must be a string")
        if not is_uuid(consumer_id) and not search_by_username:
            raise LuaError("cannot load a consumer with an id that is not a uuid")
        reg = self.s.standin
        if is_uuid(consumer_id):
            c = reg._consumer_by_id(consumer_id)
            if c:
                return c
        if search_by_username:
            return reg._consumer_by_username(consumer_id)
        return None

    def m_client__authenticate(self, consumer: Any = None, credential: Any = None) -> None:
        if consumer is not None and not isinstance(consumer, (dict, list)):
            raise LuaError("consumer must be a table or nil")
        if credential is not None and not isinstance(credential, (dict, list)):
            raise LuaError("credential must be a table or nil")
        if consumer is None and credential is None:
            raise LuaError("either credential or consumer must be provided")
        self.s.consumer = consumer
        self.s.credential = credential

    # ---- kong.ctx / kong.nginx / misc
    def m_ctx__shared__get(self, k: Any = None) -> Any:
        return self.s.ctx_shared.get(k)

    def m_ctx__shared__set(self, k: Any = None, v: Any = None) -> None:
        if v is None:
            self.s.ctx_shared.pop(k, None)
        else:
            self.s.ctx_shared[k] = v

    def m_nginx__get_var(self, name: Any = None) -> Optional[str]:
        return self.s.ngx_var(name)

    def m_nginx__get_ctx(self, k: Any = None) -> Any:
        return self.s.ngx_ctx.get(k)

    def m_nginx__set_ctx(self, k: Any = None, v: Any = None) -> None:
        self.s.ngx_ctx[k] = v

    def m_nginx__req_start_time(self) -> float:
        return self.s.start_time

    def m_nginx__get_subsystem(self) -> str:
        return "http"

    def m_plugin__get_id(self) -> str:
        return self.s.instance.plugin_id

    def m_node__get_id(self) -> str:
        return self.s.standin.node_id

    def m_node__get_hostname(self) -> str:
        return "kong-standin"

    def m_router__get_route(self) -> Any:
        return self.s.standin.route

    def m_router__get_service(self) -> Any:
        return self.s.standin.service

    def m_ip__is_trusted(self, address: Any = None) -> bool:
        return False

    # ---- kong.service.request (what goes upstream)
    def m_service__request__set_header(self, header: Any = None, value: Any = None) -> None:
        vals = header_values(header, value, multi=False)
        self.s.headers._set(escape_header_name(header), vals)

    def m_service__request__add_header(self, header: Any = None, value: Any = None) -> None:
        vals = header_values(header, value, multi=False)
        self.s.headers._add(escape_header_name(header), vals)

    def m_service__request__clear_header(self, header: Any = None) -> None:
        if not isinstance(header, str):
            raise LuaError("header must be a string")
        self.s.headers._remove(header)

    def m_service__request__set_headers(self, headers: Any = None) -> None:
        # every value is checked before any is applied; {} and [] change nothing
        staged = [(k, header_values(k, v, multi=True))
                  for k, v in _headers_table(headers, "headers")]
        for k, vals in staged:
            self.s.headers._set(escape_header_name(k), vals)

    def m_service__request__set_query(self, args: Any = None) -> None:
        if not isinstance(args, (dict, list)):
            raise LuaError("args must be a table")
        self.s.raw_query = encode_args(args if isinstance(args, dict) else {})

    def m_service__request__set_raw_query(self, query: Any = None) -> None:
        if not isinstance(query, str):
            raise LuaError("query must be a string")
        self.s.raw_query = query

    def m_service__request__clear_query_arg(self, name: Any = None) -> None:
        if not isinstance(name, str):
            raise LuaError("query argument name must be a string")
        if self.s.raw_query:
            self.s.raw_query = search_remove(self.s.raw_query, name)

    def m_service__request__set_raw_body(self, body: Any = None) -> None:
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        if not isinstance(body, bytes):
            raise LuaError("body must be a string")
        self.s.body = body
        self.s.body_in_file = False      # ngx.req.set_body_data keeps it in memory
        self.s.headers._set("Content-Length", [str(len(body))])

    def m_service__request__set_body(self, args: Any = None, mimetype: Any = None) -> Any:
        """service/request.lua set_body: the handler is picked by the exact MIME
        type before any ';'; another type is a Lua error. multipart keeps only
        name/value pairs (sorted), no file names or part headers."""
        if not isinstance(args, (dict, list)):
            raise LuaError("args must be a table")
        if mimetype is not None and not isinstance(mimetype, str):
            raise LuaError("mime must be a string")
        mime = mimetype or self.s.content_type()
        if not mime:
            return Multi(None, "content type was neither explicitly given as an argument "
                               "or received as a header")
        bare = mime.split(";", 1)[0]
        table = args if isinstance(args, dict) else {}
        if bare == "application/x-www-form-urlencoded":
            raw, ctype = encode_args(table), mime
        elif bare == "application/json":
            raw, ctype = cjson_encode(args), mime
        elif bare == "multipart/form-data":
            at = mime.find("boundary=")
            boundary = mime[at + 9:].split('"')[1] if at >= 0 and mime[at + 9:].startswith('"') \
                else (mime[at + 9:] if at >= 0 else uuid.uuid4().hex[:10])
            parts = []
            for k in sorted(table, key=lambda x: str(x)):
                v = table[k]
                if not isinstance(k, str):
                    raise LuaError("invalid key %r: got %s, expected string" % (k, lua_type(k)))
                if not isinstance(v, (str, int, float, bool)):
                    raise LuaError("invalid value %r: got %s, expected string, number or boolean"
                                   % (k, lua_type(v)))
                parts.append('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                             % (boundary, k, lua_tostring(v)))
            raw = "".join(parts) + "--%s--\r\n" % boundary
            ctype = "multipart/form-data; boundary=" + boundary
        else:
            raise LuaError("unsupported content type " + mime)
        self.m_service__request__set_raw_body(raw)
        self.s.headers._set("Content-Type", [ctype])
        return True

    def m_service__request__set_path(self, path: Any = None) -> None:
        if not isinstance(path, str):
            raise LuaError("path must be a string")
        if not path.startswith("/"):
            raise LuaError("path must start with /")
        self.s.upstream_path = path

    def m_service__request__set_method(self, method: Any = None) -> None:
        if not isinstance(method, str):
            raise LuaError("method must be a string")
        if method not in _METHODS:
            raise LuaError("invalid method: " + method)
        self.s.upstream_method = method

    def m_service__request__set_scheme(self, scheme: Any = None) -> None:
        if scheme not in ("http", "https"):
            raise LuaError("invalid scheme: %s" % lua_tostring(scheme))
        self.s.upstream_scheme = scheme

    def m_service__request__enable_buffering(self) -> None:
        return None

    # ---- kong.response
    def m_response__set_header(self, header: Any = None, value: Any = None) -> None:
        self.s.response_headers._set(header, header_values(header, value, multi=False))

    def m_response__add_header(self, header: Any = None, value: Any = None) -> None:
        self.s.response_headers._add(header, header_values(header, value, multi=False))

    def m_response__clear_header(self, header: Any = None) -> None:
        if not isinstance(header, str):
            raise LuaError("header must be a string")
        self.s.response_headers._remove(header)

    def m_response__set_headers(self, headers: Any = None) -> None:
        staged = [(k, header_values(k, v, multi=True))
                  for k, v in _headers_table(headers, "headers")]
        for k, vals in staged:
            self.s.response_headers._set(k, vals)

    def m_response__get_header(self, name: Any = None) -> Optional[str]:
        if not isinstance(name, str):
            raise LuaError("header name must be a string")
        return self.s.response_headers.get(name)

    def m_response__get_headers(self, max_headers: Any = None) -> Dict[str, Any]:
        return mmap_headers(self.s.response_headers.items_all(), _max(max_headers, "max_headers"))

    def m_response__get_status(self) -> int:
        return 200

    def m_response__get_source(self) -> str:
        return "service"

    def m_response__exit(self, status: Any = None, body: Any = None, headers: Any = None) -> None:
        if not isinstance(status, (int, float)) or isinstance(status, bool):
            raise LuaError("code must be a number")
        if status < 100 or status > 599:
            raise LuaError("code must be a number between 100 and 599")
        if body is not None and not isinstance(body, (str, bytes, dict, list)):
            raise LuaError("body must be a nil, string or table")
        if headers is not None and not isinstance(headers, (dict, list)):
            raise LuaError("headers must be a nil or table")
        staged = [(k, header_values(k, v, multi=True))
                  for k, v in _headers_table(headers or {}, "headers")]
        self.send(int(status), body, staged)

    def m_response__error(self, status: Any = None, message: Any = None,
                          headers: Any = None) -> None:
        if not isinstance(status, (int, float)) or isinstance(status, bool):
            raise LuaError("code must be a number")
        if status < 400 or status > 599:
            raise LuaError("code must be a number between 400 and 599")
        if isinstance(message, (dict, list)):
            message = cjson_encode(message)
        if message is not None and not isinstance(message, str):
            raise LuaError("message must be a nil, a string or a table")
        staged = [(k, header_values(k, v, multi=True))
                  for k, v in _headers_table(headers or {}, "headers")]
        if message is None:
            message = _ERROR_MESSAGES.get(int(status),
                                          "The upstream server responded with %d" % status)
        if not any(k.lower() == "content-type" for k, _ in staged):
            staged.append(("Content-Type", ["application/json; charset=utf-8"]))
        body = '{\n  "message":%s,\n  "request_id":"%s"\n}' % (cjson_str(message),
                                                               self.s.request_id)
        self.send(int(status), body, staged)

    def send(self, status: int, body: Any, staged: List[Tuple[Any, List[str]]]) -> None:
        """kong.response.exit's tail: set headers, encode a table body with cjson,
        finish the request (the caller's coroutine never resumes)."""
        s, r = self.s, self.s.result
        for k, vals in staged:
            if str(k).lower() not in ("transfer-encoding", "transfer_encoding"):
                s.response_headers._set(k, vals)
        if isinstance(body, (dict, list)):
            raw = cjson_encode(body).encode("utf-8", "surrogateescape")
            if "content-type" not in s.response_headers:
                s.response_headers._set("Content-Type", ["application/json; charset=utf-8"])
        elif isinstance(body, str):
            raw = body.encode("utf-8", "surrogateescape")
        elif isinstance(body, bytes):
            raw = body
        else:
            raw = b""
        if "content-length" not in s.response_headers:
            s.response_headers._set("Content-Length", [str(len(raw))])
        r.status = status
        r.body = raw
        r.proxied = False
        raise Exited()


PDK.TABLE.update({"kong." + attr[2:].replace("__", "."): getattr(PDK, attr)
                  for attr in dir(PDK) if attr.startswith("m_")})
PDK.TABLE.update({"kong.log." + level: PDK._make_log(level) for level in LOG_LEVELS})
PDK.TABLE["kong.log"] = PDK._make_log("notice")
