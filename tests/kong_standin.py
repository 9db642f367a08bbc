"""A Kong stand-in for tests: it drives a REAL kong-pdk plugin server process over
its REAL Unix-socket MessagePack-RPC protocol, and emulates, in Python, what Kong
does on its side of that socket.

Modelled on Kong's own source (kong/runloop/plugin_servers/plugin.lua and
rpc/mp_rpc.lua, kong/runloop/plugins_iterator.lua, kong/pdk/*.lua):

* start-up: the query command (``cmd -dump``) is run and its JSON read; the start
  command (``cmd -kong-prefix DIR``) is spawned and ``DIR/<Name>.sock`` awaited;
* configuration: Kong's schema layer fills every declared field (default or null),
  recurses into records, adds ``__plugin_id``/``__key__``/``__seq__`` and encodes
  with cjson semantics (an empty Lua table becomes ``{}``);
* per request: ``plugin.StartInstance`` lazily (again when the config changed, or
  after a "no plugin instance" error), ``plugin.HandleEvent``, then the bridge loop
  answering each PDK call with ``plugin.Step``/``StepMultiMap``/``StepConsumer``/
  ``StepCredential``... until the plugin answers ``"ret"`` or calls
  ``kong.response.exit``;
* one RPC call per connection use (connections are pooled, like nginx keepalive);
  an RPC that fails or is not answered within ``rpc_timeout`` is logged by Kong and
  the request is let through to the upstream; a Lua error raised inside a PDK
  function fails the request with 500.

This module is a test oracle: it never imports the plugin's code.
"""

import base64
import collections
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgpack

__all__ = ["KongStandIn", "Instance", "Result", "SchemaViolation", "CIMultiDict"]


# --------------------------------------------------------------------------
# errors


class SchemaViolation(Exception):
    """Kong's schema layer would refuse this plugin config."""

    def __init__(self, path, message):
        super().__init__("%s: %s" % (path, message))
        self.path = path
        self.message = message


class LuaError(Exception):
    """A Lua ``error()`` raised inside a PDK function (fails the request with 500)."""


class _Exited(Exception):
    """kong.response.exit/error ran: the plugin's coroutine is never resumed."""


# --------------------------------------------------------------------------
# Lua value semantics


class _LuaNil(object):
    """Marker for 'this PDK function returned nil'."""


def lua_tostring(v):
    if v is None:
        return "nil"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return _lua_number(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    if isinstance(v, str):
        return v
    return "table: 0x%08x" % (id(v) & 0xFFFFFFFF)


def _lua_number(v):
    """LuaJIT numbers are doubles printed with %.14g."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int) and abs(v) < 2 ** 53:
        return str(v)
    f = float(v)
    if math.isnan(f):
        return "nan" if math.copysign(1, f) > 0 else "-nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return "%.14g" % f


def from_python(v):
    """What a value sent by the plugin server looks like once Lua's MessagePack
    decoded it: a nil map value does not exist in a Lua table."""
    if isinstance(v, dict):
        return {k: from_python(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [from_python(x) for x in v]
    return v


def to_python(v):
    """What a Lua value returned by a PDK function looks like once Lua's
    MessagePack packed it: an empty table is packed as an empty ARRAY."""
    if isinstance(v, dict):
        if not v:
            return []
        return {k: to_python(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_python(x) for x in v]
    return v


def _cjson_str(s):
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "/":
            out.append("\\/")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif o < 0x20 or o == 0x7F:
            out.append("\\u%04x" % o)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def cjson_encode(v):
    """lua-cjson's encoding of a Lua value: '/' escaped, numbers as %.14g,
    an empty table (whether it was an empty list or dict) as ``{}``."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            raise ValueError("Cannot serialise number: must not be NaN or Infinity")
        return _lua_number(v)
    if isinstance(v, bytes):
        return _cjson_str(v.decode("utf-8", "surrogateescape"))
    if isinstance(v, str):
        return _cjson_str(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return "{}"
        return "[" + ",".join(cjson_encode(x) for x in v) + "]"
    if isinstance(v, dict):
        items = [(k, x) for k, x in v.items() if x is not None or k in _KEEP_NULL]
        if not items:
            return "{}"
        return "{" + ",".join(_cjson_str(str(k)) + ":" + cjson_encode(x) for k, x in items) + "}"
    raise ValueError("Cannot serialise %s" % type(v).__name__)


class _Null(object):
    """cjson.null / ngx.null: an explicit JSON null kept inside a Lua table."""

    def __repr__(self):
        return "null"


NULL = _Null()
_KEEP_NULL = ()


def _null_to_none(v):
    if v is NULL:
        return None
    if isinstance(v, dict):
        return {k: _null_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_null_to_none(x) for x in v]
    return v


def _drop_nulls(v):
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not NULL}
    return v


def _cjson_encode_conf(v):
    """Encode a config holding NULL markers (schema nulls) with cjson rules."""
    if v is NULL:
        return "null"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{" + ",".join(_cjson_str(str(k)) + ":" + _cjson_encode_conf(x)
                              for k, x in v.items() if x is not None) + "}"
    if isinstance(v, (list, tuple)):
        if not v:
            return "{}"
        return "[" + ",".join(_cjson_encode_conf(x) for x in v) + "]"
    return cjson_encode(v)


# --------------------------------------------------------------------------
# Kong's schema layer (the subset a kong-pdk Schema can express)


_LUA_CLASSES = {
    "a": "A-Za-z", "d": "0-9", "l": "a-z", "s": r"\s", "u": "A-Z",
    "w": "A-Za-z0-9", "x": "0-9A-Fa-f", "c": r"\x00-\x1f\x7f",
    "p": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
}


def lua_pattern_to_regex(pat):
    """Translate a Lua pattern (as used by Kong's match/not_match) to a Python regex."""
    out = []
    i, n, in_set = 0, len(pat), False
    while i < n:
        c = pat[i]
        if c == "%" and i + 1 < n:
            d = pat[i + 1]
            i += 2
            low = d.lower()
            if low in _LUA_CLASSES:
                cls = _LUA_CLASSES[low]
                if in_set:
                    out.append(cls if d == low else "")  # negated classes inside sets: rare
                else:
                    out.append(("[%s]" if d == low else "[^%s]") % cls)
            else:
                out.append(re.escape(d))
            continue
        if in_set:
            if c == "]":
                in_set = False
            out.append("\\\\" if c == "\\" else c)
        elif c == "[":
            in_set = True
            out.append(c)
            if i + 1 < n and pat[i + 1] == "^":
                out.append("^")
                i += 1
        elif c == "-":
            out.append("*?")
        elif c in "|{}\\":
            out.append("\\" + c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _lua_match(pattern, value):
    return re.search(lua_pattern_to_regex(pattern), value) is not None


def _is_uuid(s):
    return isinstance(s, str) and re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", s, re.I) is not None


def _field_items(fields):
    """A Kong field list is ``[{name: def}, ...]``."""
    for entry in fields or []:
        for name, fdef in entry.items():
            yield name, fdef


def _check_type(path, fdef, value):
    t = fdef.get("type")
    if t == "string":
        if not isinstance(value, str):
            raise SchemaViolation(path, "expected a string")
    elif t == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaViolation(path, "expected a number")
    elif t == "integer":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not value.is_integer()):
            raise SchemaViolation(path, "expected an integer")
    elif t == "boolean":
        if not isinstance(value, bool):
            raise SchemaViolation(path, "expected a boolean")
    elif t in ("array", "set"):
        if isinstance(value, dict) and not value:
            return  # an empty JSON object is an empty Lua table: a valid empty array
        if not isinstance(value, list):
            raise SchemaViolation(path, "expected a %s" % t)
    elif t in ("map", "record"):
        if isinstance(value, list) and not value:
            return
        if not isinstance(value, dict):
            raise SchemaViolation(path, "expected a %s" % ("map" if t == "map" else "record"))


def _validate_value(path, fdef, value):
    _check_type(path, fdef, value)
    t = fdef.get("type")
    if "one_of" in fdef and value not in fdef["one_of"]:
        raise SchemaViolation(path, "expected one of: %s" % ", ".join(map(str, fdef["one_of"])))
    if t in ("number", "integer"):
        if "between" in fdef:
            lo, hi = fdef["between"]
            if value < lo or value > hi:
                raise SchemaViolation(path, "value should be between %s and %s" % (lo, hi))
        if "gt" in fdef and not value > fdef["gt"]:
            raise SchemaViolation(path, "value must be greater than %s" % fdef["gt"])
    if t == "string":
        # Kong strings are non-empty unless len_min says otherwise
        len_min = fdef.get("len_min", 1)
        if len(value) < len_min:
            raise SchemaViolation(path, "length must be at least %d" % len_min)
        if "len_max" in fdef and len(value) > fdef["len_max"]:
            raise SchemaViolation(path, "length must be at most %d" % fdef["len_max"])
        if "len_eq" in fdef and len(value) != fdef["len_eq"]:
            raise SchemaViolation(path, "length must be %d" % fdef["len_eq"])
        if "match" in fdef and not _lua_match(fdef["match"], value):
            raise SchemaViolation(path, "invalid value: %s" % value)
        if "not_match" in fdef and _lua_match(fdef["not_match"], value):
            raise SchemaViolation(path, "invalid value: %s" % value)
        if "starts_with" in fdef and not value.startswith(fdef["starts_with"]):
            raise SchemaViolation(path, "should start with: %s" % fdef["starts_with"])
        if fdef.get("uuid") and not _is_uuid(value):
            raise SchemaViolation(path, "expected a valid UUID")
    if t in ("array", "set"):
        seq = value if isinstance(value, list) else []
        if "len_min" in fdef and len(seq) < fdef["len_min"]:
            raise SchemaViolation(path, "length must be at least %d" % fdef["len_min"])
        if "len_max" in fdef and len(seq) > fdef["len_max"]:
            raise SchemaViolation(path, "length must be at most %d" % fdef["len_max"])
        elements = fdef.get("elements")
        out = []
        for i, el in enumerate(seq):
            if elements:
                el = _validate_value("%s.%d" % (path, i + 1), elements, el)
            out.append(el)
        if t == "set":  # Kong de-duplicates sets
            dedup = []
            for el in out:
                if el not in dedup:
                    dedup.append(el)
            out = dedup
        return out
    if t == "map":
        m = value if isinstance(value, dict) else {}
        out = {}
        for k, v in m.items():
            if fdef.get("keys"):
                _validate_value("%s.%s" % (path, k), fdef["keys"], k)
            if fdef.get("values") and v is not None:
                v = _validate_value("%s.%s" % (path, k), fdef["values"], v)
            out[k] = v
        return out
    if t == "record":
        return _fill_record(path, fdef.get("fields", []), value if isinstance(value, dict) else {})
    return value


def _fill_record(path, fields, given):
    declared = dict(_field_items(fields))
    for k in given:
        if k not in declared:
            raise SchemaViolation("%s.%s" % (path, k), "unknown field")
    out = {}
    for name, fdef in declared.items():
        fpath = "%s.%s" % (path, name)
        if name in given:
            value = given[name]
        elif "default" in fdef:
            value = fdef["default"]
            if isinstance(value, (dict, list)):
                value = json.loads(json.dumps(value))
        elif fdef.get("type") == "record" and fdef.get("required"):
            # Kong 3.x handle_missing_field: only a REQUIRED record is expanded
            # to its nested defaults; any other missing field becomes null
            value = {}
        else:
            value = None
        if value is None or value is NULL:
            if fdef.get("required"):
                raise SchemaViolation(fpath, "required field missing")
            out[name] = NULL
            continue
        out[name] = _validate_value(fpath, fdef, value)
    return out


# --------------------------------------------------------------------------
# HTTP request helpers (ngx semantics)


class CIMultiDict(collections.abc.Mapping):
    """Case-insensitive, ordered, multi-valued headers. ``h[name]`` is the first
    value; ``h.getall(name)`` all of them."""

    def __init__(self, pairs=()):
        self._items = [(str(k), str(v)) for k, v in pairs]

    def __getitem__(self, name):
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        raise KeyError(name)

    def getall(self, name, default=None):
        low = name.lower()
        vals = [v for k, v in self._items if k.lower() == low]
        return vals if vals else ([] if default is None else default)

    def __contains__(self, name):
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self._items)

    def __iter__(self):
        seen = []
        for k, _ in self._items:
            if k.lower() not in seen:
                seen.append(k.lower())
                yield k

    def __len__(self):
        return len({k.lower() for k, _ in self._items})

    def items_all(self):
        return list(self._items)

    # mutation, ngx.req.* style
    def _remove(self, name):
        low = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != low]

    def _set(self, name, values):
        self._remove(name)
        for v in values:
            self._items.append((name, v))

    def _add(self, name, values):
        for v in values:
            self._items.append((name, v))

    def __repr__(self):
        return "CIMultiDict(%r)" % self._items


def _header_pairs(headers):
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    out = []
    for k, v in items:
        if isinstance(v, (list, tuple)):
            out.extend((k, str(x)) for x in v)
        else:
            out.append((k, str(v)))
    return out


def ngx_unescape(s):
    return urllib.parse.unquote_to_bytes(s.replace("+", " ")).decode("utf-8", "surrogateescape")


def ngx_escape(s):
    if not isinstance(s, str):
        s = lua_tostring(s)
    return urllib.parse.quote(s.encode("utf-8", "surrogateescape"), safe="-_.~!*'()")


def parse_args(raw, max_args=100):
    """ngx.req.get_uri_args / get_post_args: value string, ``True`` for a bare
    flag, a list when repeated."""
    out = {}
    count = 0
    for part in (raw or "").split("&"):
        if part == "":
            continue
        if count >= max_args:
            break
        count += 1
        if "=" in part:
            k, v = part.split("=", 1)
            k, v = ngx_unescape(k), ngx_unescape(v)
        else:
            k, v = ngx_unescape(part), True
        if k == "":
            continue
        _add(out, k, v)
    return out


def encode_args(args):
    """kong.service.request.set_query: keys sorted; true -> bare key, false -> omitted."""
    parts = []
    for k, v in args.items():
        if not isinstance(k, str):
            raise LuaError("arg keys must be strings")
        vals = v if isinstance(v, list) else [v]
        one = []
        for x in vals:
            if x is True:
                one.append(ngx_escape(k))
            elif x is False or x is None:
                continue
            elif isinstance(x, (str, int, float)):
                one.append(ngx_escape(k) + "=" + ngx_escape(x))
            else:
                raise LuaError("attempt to use %s as query arg value" % type(x).__name__)
        if one:
            parts.append("&".join(one))
    parts.sort()
    return "&".join(parts)


def _parse_multipart(body, content_type):
    m = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not m:
        return None
    boundary = ("--" + m.group(1)).encode()
    out = {}
    for chunk in body.split(boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, _, value = chunk.partition(b"\r\n\r\n")
        if value.endswith(b"\r\n"):
            value = value[:-2]
        nm = re.search(rb'name="([^"]*)"', head)
        if nm:
            out[nm.group(1).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return out


# --------------------------------------------------------------------------
# results


class Upstream(object):
    """What the upstream service would receive."""

    def __init__(self, method, path, headers, raw_query, raw_body):
        self.method = method
        self.path = path
        self.headers = headers
        self.raw_query = raw_query
        self.query = parse_args(raw_query, max_args=10 ** 6)
        self.raw_body = raw_body
        self.body = raw_body.decode("utf-8", "surrogateescape")

    def __repr__(self):
        return "Upstream(%s %s?%s headers=%r)" % (self.method, self.path, self.raw_query, self.headers)


class Result(object):
    def __init__(self):
        self.status = 200
        self.body = b""
        self.json = None
        self.response_headers = CIMultiDict()
        self.upstream = None
        self.consumer = None
        self.credential = None
        self.serialize = {}
        self.pdk_calls = []
        self.pdk_trace = []       # (method, args) pairs
        self.logs = []            # (level, message) from kong.log.*
        self.kong_logs = []       # (level, message) Kong itself would log
        self.kong_error = None
        self.proxied = True
        self.ctx_shared = {}

    def __repr__(self):
        return "Result(status=%r, kong_error=%r, body=%r, pdk_calls=%r)" % (
            self.status, self.kong_error, self.body[:200], self.pdk_calls)


class Instance(object):
    """A configured plugin (what Kong calls a plugin entity with its config)."""

    def __init__(self, name, plugin_id, conf, conf_json):
        self.name = name
        self.plugin_id = plugin_id
        self.conf = conf              # plain Python view (nulls as None)
        self.conf_json = conf_json    # exactly what StartInstance sends as Config
        self.seq = conf["__seq__"]

    def __repr__(self):
        return "Instance(%s #%s seq=%s)" % (self.name, self.plugin_id, self.seq)


# --------------------------------------------------------------------------
# per-request ngx/Kong state and the PDK functions


_LOG_LEVELS = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")


class _RequestState(object):
    def __init__(self, standin, instance, method, path, headers, query, body, client_ip,
                 authenticated, authenticated_consumer, phase):
        self.standin = standin
        self.instance = instance
        self.phase = phase
        self.method = method.upper()
        if "?" in path and query is None:
            path, query = path.split("?", 1)
        self.path = path
        pairs = _header_pairs(headers)
        # nginx (ignore_invalid_headers on, underscores_in_headers off) drops
        # request headers whose name holds an underscore
        pairs = [(k, v) for k, v in pairs if "_" not in k]
        self.headers = CIMultiDict(pairs)
        if "host" not in self.headers:
            self.headers._add("Host", ["kong.test"])
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.body = body or b""
        if body and "content-length" not in self.headers:
            self.headers._add("Content-Length", [str(len(self.body))])
        if query is None:
            self.raw_query = ""
        elif isinstance(query, str):
            self.raw_query = query
        else:
            self.raw_query = "&".join(
                ngx_escape(k) if v is True else ngx_escape(k) + "=" + ngx_escape(v)
                for k, vs in query.items()
                for v in (vs if isinstance(vs, list) else [vs]))
        self.orig_raw_query = self.raw_query
        self.client_ip = client_ip
        self.credential = authenticated
        self.consumer = authenticated_consumer
        self.upstream_path = path
        self.upstream_method = self.method
        self.upstream_scheme = "http"
        self.ctx_shared = {}
        self.ngx_ctx = {}
        self.response_headers = CIMultiDict()
        self.result = Result()
        self.request_id = uuid.uuid4().hex
        self.start_time = time.time()

    # ---- helpers
    def host(self):
        h = self.headers.get("host", "")
        return h.rsplit(":", 1)[0].lower() if not h.startswith("[") else h.split("]")[0] + "]"

    def content_type(self):
        return self.headers.get("content-type")

    def ngx_var(self, name):
        if not isinstance(name, str):
            raise LuaError("bad argument #1 to 'get_var' (string expected)")
        if name.startswith("http_"):
            want = name[5:].lower()
            for k, v in self.headers.items_all():
                if k.lower().replace("-", "_") == want:
                    return v
            return None
        if name.startswith("arg_"):
            v = parse_args(self.raw_query).get(name[4:])
            return v[0] if isinstance(v, list) else (None if v is True else v)
        q = ("?" + self.raw_query) if self.raw_query else ""
        table = {
            "remote_addr": self.client_ip, "realip_remote_addr": self.client_ip,
            "binary_remote_addr": None, "remote_port": "54321", "server_port": "8000",
            "server_addr": "127.0.0.1", "host": self.host(), "scheme": "http",
            "request_method": self.method, "request_uri": self.path + q, "uri": self.path,
            "args": self.raw_query or None, "is_args": "?" if self.raw_query else "",
            "query_string": self.raw_query or None, "content_type": self.content_type(),
            "content_length": self.headers.get("content-length"),
            "request_id": self.request_id, "upstream_uri": self.upstream_path + q,
            "upstream_scheme": self.upstream_scheme, "https": "", "server_protocol": "HTTP/1.1",
            "request_length": str(len(self.body)),
        }
        return table.get(name)


def _header_values_for_set(name, value, multi):
    """checks.validate_header(s) + normalize_multi_header: the list of header values,
    an empty list meaning 'clear the header'."""
    if not isinstance(name, str):
        raise LuaError("invalid header name %r: got %s, expected string" % (name, _lua_type(name)))
    if isinstance(value, str):
        return [value if value != "" else " "]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (int, float)):
        return [_lua_number(value)]
    if multi and isinstance(value, (list, dict)):
        # ipairs over a table: a map has no array part
        seq = value if isinstance(value, list) else []
        out = []
        for vv in seq:
            if not isinstance(vv, str):
                raise LuaError("invalid header value in array %r: got %s, expected string"
                               % (name, _lua_type(vv)))
            out.append(vv if vv != "" else " ")
        return out
    if multi:
        raise LuaError("invalid header value for %r: got %s, expected string, number, "
                       "boolean or array of strings" % (name, _lua_type(value)))
    raise LuaError("invalid header value for %r: got %s, expected string, number or boolean"
                   % (name, _lua_type(value)))


def _lua_type(v):
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, (str, bytes)):
        return "string"
    return "table"


def _arg(args, i):
    return args[i] if len(args) > i else None


def _add(out, key, value):
    """Lua multi-map insert: a string, or a list once the key repeats."""
    if key not in out:
        out[key] = value
    elif isinstance(out[key], list):
        out[key].append(value)
    else:
        out[key] = [out[key], value]


def _mmap_headers(pairs, max_headers):
    """ngx.req.get_headers(): lowercase names; string, or a list when repeated."""
    out = {}
    for k, v in pairs[:max_headers]:
        _add(out, k.lower(), v)
    return out


def fix_mmap(t):
    """mp_rpc.lua's fix for multi-maps: every value a list (a bare flag -> [])."""
    out = {}
    for k, v in (t or {}).items():
        if v is True:
            out[k] = []
        elif isinstance(v, str):
            out[k] = [v]
        else:
            out[k] = v
    return out  # an empty result is sent as an empty MAP (mp_empty_map)


class _PDK(object):
    """Kong's PDK functions, as the bridge loop runs them. Each returns ONE value
    (Kong keeps only the first); raising LuaError models a Lua error()."""

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

    def __init__(self, state):
        self.s = state
        self.table = {}
        for attr in dir(self):
            if attr.startswith("m_"):
                self.table["kong." + attr[2:].replace("__", ".")] = getattr(self, attr)
        for level in _LOG_LEVELS:
            self.table["kong.log." + level] = self._make_log(level)
        self.table["kong.log"] = self._make_log("notice")

    def call(self, method, args):
        fn = self.table.get(method)
        if fn is None:
            return _LuaNil
        return fn(*args)

    # ---- kong.log
    def _make_log(self, level):
        def log(*args):
            self.s.result.logs.append((level, "".join(lua_tostring(a) for a in args)))
        return log

    def m_log__set_serialize_value(self, key=None, value=None, options=None):
        if not isinstance(key, str):
            raise LuaError("key must be a string")
        if value is not None and not isinstance(value, (str, int, float, bool, list, dict)):
            raise LuaError("value must be a number, string, boolean or a non-self-referencial table")
        self.s.result.serialize[key] = value

    def m_log__serialize(self):
        s = self.s
        return cjson_encode({
            "request": {"method": s.method, "uri": s.path, "headers": _mmap_headers(
                s.headers.items_all(), 100), "querystring": parse_args(s.orig_raw_query)},
            "client_ip": s.client_ip, "consumer": s.consumer,
            "authenticated_entity": s.credential, "started_at": int(s.start_time * 1000),
        })

    # ---- kong.request
    def m_request__get_method(self):
        return self.s.method

    def m_request__get_path(self):
        return self.s.path

    def m_request__get_raw_path(self):
        return self.s.path

    def m_request__get_path_with_query(self):
        return self.s.path + (("?" + self.s.orig_raw_query) if self.s.orig_raw_query else "")

    def m_request__get_host(self):
        return self.s.host()

    def m_request__get_port(self):
        return 8000

    def m_request__get_scheme(self):
        return "http"

    def m_request__get_http_version(self):
        return 1.1

    m_request__get_forwarded_host = m_request__get_host
    m_request__get_forwarded_port = m_request__get_port
    m_request__get_forwarded_scheme = m_request__get_scheme
    m_request__get_forwarded_path = m_request__get_path

    def m_request__get_forwarded_prefix(self):
        return None

    def m_request__get_raw_query(self):
        return self.s.raw_query

    def m_request__get_query_arg(self, name=None):
        if not isinstance(name, str):
            raise LuaError("query argument name must be a string")
        v = parse_args(self.s.raw_query).get(name)
        return v[0] if isinstance(v, list) else v

    def m_request__get_query(self, max_args=None):
        max_args = self._max(max_args, "max_args")
        return parse_args(self.s.raw_query, max_args)

    def m_request__get_header(self, name=None):
        if not isinstance(name, str):
            raise LuaError("header name must be a string")
        return self.s.ngx_var("http_" + name.lower().replace("-", "_"))

    def m_request__get_headers(self, max_headers=None):
        max_headers = self._max(max_headers, "max_headers")
        return _mmap_headers(self.s.headers.items_all(), max_headers)

    def _max(self, value, what):
        if value is None:
            return 100
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise LuaError("%s must be a number" % what)
        if value < 1:
            raise LuaError("%s must be >= 1" % what)
        if value > 1000:
            raise LuaError("%s must be <= 1000" % what)
        return int(value)

    def m_request__get_raw_body(self):
        return self.s.body

    def m_request__get_body(self, mimetype=None, max_args=None, max_allowed_file_size=None):
        ct = (mimetype or self.s.content_type() or "").lower()
        body = self.s.body
        if ct.startswith("application/x-www-form-urlencoded"):
            return parse_args(body.decode("utf-8", "surrogateescape"), self._max(max_args, "max_args"))
        if ct.startswith("application/json"):
            try:
                v = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                return None
            return v if isinstance(v, (dict, list)) else None
        if ct.startswith("multipart/form-data"):
            return _parse_multipart(body, self.s.content_type())
        return None

    def m_request__get_uri_captures(self):
        return {"unnamed": [], "named": {}}

    def m_request__get_start_time(self):
        return int(self.s.start_time * 1000)

    def m_request__get_id(self):
        return self.s.request_id

    # ---- kong.client
    def m_client__get_ip(self):
        return self.s.client_ip

    def m_client__get_forwarded_ip(self):
        return self.s.client_ip

    def m_client__get_port(self):
        return 54321

    m_client__get_forwarded_port = m_client__get_port

    def m_client__get_credential(self):
        return self.s.credential

    def m_client__get_consumer(self):
        return self.s.consumer

    def m_client__get_protocol(self, allow_terminated=None):
        return "http"

    def m_client__load_consumer(self, consumer_id=None, search_by_username=None):
        if not isinstance(consumer_id, str):
            raise LuaError("consumer_id must be a string")
        if not _is_uuid(consumer_id) and not search_by_username:
            raise LuaError("cannot load a consumer with an id that is not a uuid")
        reg = self.s.standin
        if _is_uuid(consumer_id):
            c = reg._consumer_by_id(consumer_id)
            if c:
                return c
        if search_by_username:
            return reg._consumer_by_username(consumer_id)
        return None

    def m_client__authenticate(self, consumer=None, credential=None):
        if consumer is not None and not isinstance(consumer, (dict, list)):
            raise LuaError("consumer must be a table or nil")
        if credential is not None and not isinstance(credential, (dict, list)):
            raise LuaError("credential must be a table or nil")
        if consumer is None and credential is None:
            raise LuaError("either credential or consumer must be provided")
        self.s.consumer = consumer
        self.s.credential = credential
        return None

    # ---- kong.ctx / kong.nginx / misc
    def m_ctx__shared__get(self, k=None):
        return self.s.ctx_shared.get(k)

    def m_ctx__shared__set(self, k=None, v=None):
        if v is None:
            self.s.ctx_shared.pop(k, None)
        else:
            self.s.ctx_shared[k] = v

    def m_nginx__get_var(self, name=None):
        return self.s.ngx_var(name)

    def m_nginx__get_ctx(self, k=None):
        return self.s.ngx_ctx.get(k)

    def m_nginx__set_ctx(self, k=None, v=None):
        self.s.ngx_ctx[k] = v

    def m_nginx__req_start_time(self):
        return self.s.start_time

    def m_nginx__get_subsystem(self):
        return "http"

    def m_plugin__get_id(self):
        return self.s.instance.plugin_id

    def m_node__get_id(self):
        return self.s.standin.node_id

    def m_node__get_hostname(self):
        return "kong-standin"

    def m_router__get_route(self):
        return self.s.standin.route

    def m_router__get_service(self):
        return self.s.standin.service

    def m_ip__is_trusted(self, address=None):
        return False

    # ---- kong.service.request (what goes upstream)
    def m_service__request__set_header(self, header=None, value=None):
        vals = _header_values_for_set(header, value, multi=False)
        self.s.headers._set(header, vals)

    def m_service__request__add_header(self, header=None, value=None):
        vals = _header_values_for_set(header, value, multi=False)
        self.s.headers._add(header, vals)

    def m_service__request__clear_header(self, header=None):
        if not isinstance(header, str):
            raise LuaError("header must be a string")
        self.s.headers._remove(header)

    def m_service__request__set_headers(self, headers=None):
        if not isinstance(headers, (dict, list)):
            raise LuaError("headers must be a table")
        headers = headers if isinstance(headers, dict) else {}
        staged = [(k, _header_values_for_set(k, v, multi=True)) for k, v in headers.items()]
        for k, vals in staged:   # validated first, then applied
            self.s.headers._set(k, vals)

    def m_service__request__set_query(self, args=None):
        if not isinstance(args, (dict, list)):
            raise LuaError("args must be a table")
        self.s.raw_query = encode_args(args if isinstance(args, dict) else {})

    def m_service__request__set_raw_query(self, query=None):
        if not isinstance(query, str):
            raise LuaError("query must be a string")
        self.s.raw_query = query

    def m_service__request__clear_query_arg(self, name=None):
        if not isinstance(name, str):
            raise LuaError("query argument name must be a string")
        kept = []
        for part in self.s.raw_query.split("&"):
            key = part.split("=", 1)[0]
            if part and ngx_unescape(key) != name:
                kept.append(part)
        self.s.raw_query = "&".join(kept)

    def m_service__request__set_raw_body(self, body=None):
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        if not isinstance(body, bytes):
            raise LuaError("body must be a string")
        self.s.body = body
        self.s.headers._set("Content-Length", [str(len(body))])

    def m_service__request__set_body(self, args=None, mimetype=None):
        if not isinstance(args, (dict, list)):
            raise LuaError("args must be a table")
        ct = (mimetype or self.s.content_type() or "").lower()
        if ct.startswith("application/json"):
            raw = cjson_encode(args)
        elif ct.startswith("application/x-www-form-urlencoded"):
            raw = encode_args(args if isinstance(args, dict) else {})
        elif ct.startswith("multipart/form-data"):
            boundary = "kongstandin" + uuid.uuid4().hex[:12]
            parts = []
            for k, v in (args if isinstance(args, dict) else {}).items():
                parts.append('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                             % (boundary, k, lua_tostring(v)))
            raw = "".join(parts) + "--%s--\r\n" % boundary
            self.s.headers._set("Content-Type", ["multipart/form-data; boundary=" + boundary])
        else:
            return None  # nil, "unsupported content type"
        if mimetype and not ct.startswith("multipart"):
            self.s.headers._set("Content-Type", [mimetype])
        self.m_service__request__set_raw_body(raw)
        return True

    def m_service__request__set_path(self, path=None):
        if not isinstance(path, str):
            raise LuaError("path must be a string")
        if not path.startswith("/"):
            raise LuaError("path must start with /")
        self.s.upstream_path = path

    def m_service__request__set_method(self, method=None):
        if not isinstance(method, str):
            raise LuaError("method must be a string")
        if method not in ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "MKCOL", "COPY",
                          "MOVE", "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE"):
            raise LuaError("invalid method: " + method)
        self.s.upstream_method = method

    def m_service__request__set_scheme(self, scheme=None):
        if scheme not in ("http", "https"):
            raise LuaError("invalid scheme: %s" % lua_tostring(scheme))
        self.s.upstream_scheme = scheme

    def m_service__request__enable_buffering(self):
        return None

    # ---- kong.response
    def m_response__set_header(self, header=None, value=None):
        self.s.response_headers._set(header, _header_values_for_set(header, value, multi=False))

    def m_response__add_header(self, header=None, value=None):
        self.s.response_headers._add(header, _header_values_for_set(header, value, multi=False))

    def m_response__clear_header(self, header=None):
        if not isinstance(header, str):
            raise LuaError("header must be a string")
        self.s.response_headers._remove(header)

    def m_response__set_headers(self, headers=None):
        if not isinstance(headers, (dict, list)):
            raise LuaError("headers must be a table")
        for k, v in (headers if isinstance(headers, dict) else {}).items():
            self.s.response_headers._set(k, _header_values_for_set(k, v, multi=True))

    def m_response__get_header(self, name=None):
        if not isinstance(name, str):
            raise LuaError("header name must be a string")
        return self.s.response_headers.get(name)

    def m_response__get_headers(self, max_headers=None):
        return _mmap_headers(self.s.response_headers.items_all(), self._max(max_headers, "max_headers"))

    def m_response__get_status(self):
        return 200

    def m_response__get_source(self):
        return "service"

    def m_response__exit(self, status=None, body=None, headers=None):
        if not isinstance(status, (int, float)) or isinstance(status, bool):
            raise LuaError("code must be a number")
        if status < 100 or status > 599:
            raise LuaError("code must be a number between 100 and 599")
        if body is not None and not isinstance(body, (str, bytes, dict, list)):
            raise LuaError("body must be a nil, string or table")
        if headers is not None and not isinstance(headers, (dict, list)):
            raise LuaError("headers must be a nil or table")
        staged = []
        for k, v in (headers if isinstance(headers, dict) else {}).items():
            staged.append((k, _header_values_for_set(k, v, multi=True)))
        self._send(int(status), body, staged)

    def m_response__error(self, status=None, message=None, headers=None):
        if not isinstance(status, (int, float)) or isinstance(status, bool):
            raise LuaError("code must be a number")
        if status < 400 or status > 599:
            raise LuaError("code must be a number between 400 and 599")
        if isinstance(message, (dict, list)):
            message = cjson_encode(message)
        if message is not None and not isinstance(message, str):
            raise LuaError("message must be a nil, a string or a table")
        staged = []
        for k, v in (headers if isinstance(headers, dict) else {}).items():
            staged.append((k, _header_values_for_set(k, v, multi=True)))
        if message is None:
            message = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden",
                       404: "Not found", 405: "Method not allowed", 429: "API rate limit exceeded",
                       500: "An unexpected error occurred", 502: "An invalid response was received from the upstream server",
                       503: "The upstream server is currently unavailable"}.get(int(status), "The upstream server responded with %d" % status)
        if not any(k.lower() == "content-type" for k, _ in staged):
            staged.append(("Content-Type", ["application/json; charset=utf-8"]))
        body = '{\n  "message":%s,\n  "request_id":"%s"\n}' % (_cjson_str(message), self.s.request_id)
        self._send(int(status), body, staged)

    def _send(self, status, body, staged_headers):
        s, r = self.s, self.s.result
        for k, vals in staged_headers:
            if k.lower() in ("transfer-encoding", "transfer_encoding"):
                continue
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
        raise _Exited()


# --------------------------------------------------------------------------
# RPC client (Kong's Rpc:call over pooled Unix-socket connections)


class _RpcError(Exception):
    pass


class _Rpc(object):
    def __init__(self, socket_path, timeout):
        self.socket_path = socket_path
        self.timeout = timeout
        self._pool = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def reset(self):
        with self._lock:
            pool, self._pool = self._pool, []
        for c in pool:
            try:
                c.close()
            except OSError:
                pass

    def _get(self):
        while True:
            with self._lock:
                c = self._pool.pop() if self._pool else None
            if c is None:
                break
            try:  # an idle keepalive connection the peer closed is dropped
                c.setblocking(False)
                try:
                    if c.recv(1, socket.MSG_PEEK) == b"":
                        c.close()
                        continue
                except BlockingIOError:
                    pass
                c.setblocking(True)
                return c
            except OSError:
                c.close()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(self.timeout)
        try:
            c.connect(self.socket_path)
        except OSError as e:
            c.close()
            raise _RpcError("trying to connect: %s" % (e.strerror or e))
        return c

    def _put(self, c):
        with self._lock:
            self._pool.append(c)

    def call(self, method, arg):
        """One RPC: ``[0, id, method, [arg]]`` -> result, or _RpcError(text)."""
        msg_id = next(self._ids)
        c = self._get()
        c.settimeout(self.timeout)
        try:
            c.sendall(msgpack.packb([0, msg_id, method, [arg]], use_bin_type=True))
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            while True:
                try:
                    chunk = c.recv(65536)
                except socket.timeout:
                    raise _RpcError("timeout")
                if not chunk:
                    raise _RpcError("no data")
                unpacker.feed(chunk)
                for msg in unpacker:
                    if msg[0] == 2:       # notification
                        continue
                    if msg[0] != 1 or msg[1] != msg_id:
                        raise _RpcError("unexpected RPC response ID from Go plugin server")
                    self._put(c)
                    c = None
                    if msg[2] is not None:
                        raise _RpcError(str(msg[2]))
                    return msg[3]
        except OSError as e:
            raise _RpcError(str(e))
        finally:
            if c is not None:
                c.close()


# --------------------------------------------------------------------------
# Admin API


def _admin_handler(standin):
    class Handler(BaseHTTPRequestHandler):
        server_version = "kong/3.9.0"
        sys_version = ""

        def log_message(self, *a):
            pass

        def _send(self, status, obj):
            raw = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            standin.admin_requests.append(("GET", self.path))
            u = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in u.path.strip("/").split("/") if p]
            q = urllib.parse.parse_qs(u.query)
            if parts == ["consumers"]:
                consumers = standin.consumers()
                if "custom_id" in q:
                    consumers = [c for c in consumers if c["custom_id"] == q["custom_id"][0]]
                return self._send(200, {"data": consumers, "next": None})
            if len(parts) == 2 and parts[0] == "consumers":
                key = parts[1]
                c = standin._consumer_by_id(key) if _is_uuid(key) else None
                c = c or standin._consumer_by_username(key)
                if c:
                    return self._send(200, c)
                return self._send(404, {"message": "Not found"})
            return self._send(404, {"message": "Not found"})
    return Handler


# --------------------------------------------------------------------------
# the stand-in


class KongStandIn(object):
    def __init__(self, command, *, env=None, rpc_timeout=5.0, empty_arrays_as_objects=True,
                 drop_null_fields=False, start_timeout=20.0):
        self.command = list(command)
        self.env = dict(os.environ, **(env or {}))
        self.rpc_timeout = rpc_timeout
        self.empty_arrays_as_objects = empty_arrays_as_objects
        self.drop_null_fields = drop_null_fields
        self.start_timeout = start_timeout
        self.node_id = str(uuid.uuid4())
        self.route = {"id": str(uuid.uuid4()), "name": "standin-route", "paths": ["/"],
                      "protocols": ["http", "https"], "strip_path": True, "preserve_host": False}
        self.service = {"id": str(uuid.uuid4()), "name": "standin-service", "host": "upstream.test",
                        "port": 80, "protocol": "http", "path": None}
        self.admin_requests = []
        self._consumers = {}
        self._clock = threading.Lock()
        self._seq = itertools.count(1)
        self._running = {}            # plugin id -> {"id": instance id, "seq": seq}
        self._running_lock = threading.Lock()
        self._start_locks = collections.defaultdict(threading.Lock)
        self._log = []
        self._log_lock = threading.Lock()
        self._proc = None
        self._readers = []
        self._prefix = tempfile.mkdtemp(prefix="kong-standin-")
        self._admin = None
        try:
            self._admin = ThreadingHTTPServer(("127.0.0.1", 0), _admin_handler(self))
            self._admin.daemon_threads = True
            threading.Thread(target=self._admin.serve_forever, daemon=True).start()
            # the plugin server inherits Kong's environment; point it at this Admin API
            if "KONG_ADMIN_URL" not in (env or {}):
                self.env["KONG_ADMIN_URL"] = self.admin_url
            self.info = self._query()
            self.name = self.info["Name"]
            self.socket_path = os.path.join(self._prefix, self.name + ".sock")
            self._rpc = _Rpc(self.socket_path, rpc_timeout)
            self._spawn()
        except BaseException:
            self.close()
            raise

    # ---- process management
    def _query(self):
        out = subprocess.run(self.command + ["-dump"], env=self.env, capture_output=True,
                             timeout=60)
        if out.returncode != 0:
            raise RuntimeError("query command failed (%d): %s" % (out.returncode, out.stderr.decode(errors="replace")))
        data = json.loads(out.stdout.decode())
        if isinstance(data, dict):
            data = data.get("Plugins", [])
        if not data:
            raise RuntimeError("query command listed no plugin")
        self.plugins_info = data
        return data[0]

    def _spawn(self):
        proc = subprocess.Popen(self.command + ["-kong-prefix", self._prefix], env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self._proc = proc
        t = threading.Thread(target=self._read_output, args=(proc,), daemon=True)
        t.start()
        self._readers.append(t)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("plugin server exited with %s:\n%s" % (proc.returncode, self.server_log()))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("plugin server did not listen on %s:\n%s" % (self.socket_path, self.server_log()))
                time.sleep(0.02)
            finally:
                s.close()

    def _read_output(self, proc):
        for line in iter(proc.stdout.readline, b""):
            with self._log_lock:
                self._log.append(line.decode("utf-8", "replace"))
        proc.stdout.close()

    def _kill(self):
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for t in self._readers:
            t.join(timeout=2)
        self._readers = []

    @property
    def pid(self):
        return self._proc.pid if self._proc else None

    def restart_server(self):
        """Kill the plugin server and respawn it, as Kong's worker 0 does. Kong keeps
        its instance table: the next request meets "no plugin instance"."""
        self._kill()
        if hasattr(self, "_rpc"):
            self._rpc.reset()
        self._spawn()

    def kill_server(self):
        self._kill()
        self._rpc.reset()

    def server_log(self):
        with self._log_lock:
            return "".join(self._log)

    def close(self):
        self._kill()
        if getattr(self, "_rpc", None):
            self._rpc.reset()
        if self._admin is not None:
            self._admin.shutdown()
            self._admin.server_close()
            self._admin = None
        shutil.rmtree(self._prefix, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def admin_url(self):
        host, port = self._admin.server_address[:2]
        return "http://%s:%d" % (host, port)

    # ---- consumers
    def add_consumer(self, username=None, custom_id=None, id=None):
        if username is None and custom_id is None:
            raise ValueError("a consumer needs a username or a custom_id")
        now = int(time.time())
        c = {"id": id or str(uuid.uuid4()), "username": username, "custom_id": custom_id,
             "created_at": now, "updated_at": now, "tags": None}
        with self._clock:
            for other in self._consumers.values():
                if username is not None and other["username"] == username:
                    raise ValueError("username already exists")
                if custom_id is not None and other["custom_id"] == custom_id:
                    raise ValueError("custom_id already exists")
            self._consumers[c["id"]] = c
        return dict(c)

    def remove_consumer(self, id_or_username):
        with self._clock:
            for cid, c in list(self._consumers.items()):
                if id_or_username in (cid, c["username"]):
                    del self._consumers[cid]

    def consumers(self):
        with self._clock:
            return [dict(c) for c in self._consumers.values()]

    def _consumer_by_id(self, cid):
        with self._clock:
            c = self._consumers.get(cid.lower())
            return dict(c) if c else None

    def _consumer_by_username(self, username):
        with self._clock:
            for c in self._consumers.values():
                if c["username"] == username:
                    return dict(c)
        return None

    # ---- configuration (Kong's schema layer)
    def fill_config(self, config):
        """The config as Kong's schema layer makes it (nulls as None)."""
        fields = self.info["Schema"]["fields"][0]["config"].get("fields", [])
        return _null_to_none(_fill_record("config", fields, dict(config or {})))

    def configure(self, config, *, plugin_id=None):
        fields = self.info["Schema"]["fields"][0]["config"].get("fields", [])
        filled = _fill_record("config", fields, dict(config or {}))
        plugin_id = plugin_id or str(uuid.uuid4())
        filled["__plugin_id"] = plugin_id
        filled["__key__"] = "plugins:%s:::::%s" % (self.name, "00000000-0000-4000-8000-000000000000")
        filled["__seq__"] = next(self._seq)
        if self.drop_null_fields:
            # a DAO read in "select" context without the nulls option drops null fields
            filled = _drop_nulls(filled)
        if self.empty_arrays_as_objects:
            conf_json = _cjson_encode_conf(filled)
        else:
            conf_json = json.dumps(_null_to_none(filled), separators=(",", ":"))
        return Instance(self.name, plugin_id, _null_to_none(filled), conf_json)

    # ---- instances (plugin.lua's get_instance_id / reset_instance)
    def _instance_id(self, inst, result):
        with self._start_locks[inst.plugin_id]:
            with self._running_lock:
                info = self._running.get(inst.plugin_id)
            if info and info["seq"] == inst.seq:
                return info["id"]
            try:
                status = self._rpc.call("plugin.StartInstance",
                                        {"Name": inst.name, "Config": inst.conf_json})
            except _RpcError as e:
                result.kong_logs.append(("err", "starting instance: %s" % e))
                raise LuaError(str(e))
            with self._running_lock:
                self._running[inst.plugin_id] = {"id": status["Id"], "seq": inst.seq}
            if info:   # a previous config of the same plugin: close it, errors ignored
                try:
                    self._rpc.call("plugin.CloseInstance", info["id"])
                except _RpcError:
                    pass
            return status["Id"]

    def _reset_instances(self, name):
        with self._running_lock:
            self._running.clear()

    def instance_ids(self):
        with self._running_lock:
            return {k: v["id"] for k, v in self._running.items()}

    # ---- requests
    def request(self, instance, method="GET", path="/", *, headers=None, query=None, body=None,
                client_ip="127.0.0.1", authenticated=None, authenticated_consumer=None,
                phase="access"):
        if phase not in self.info.get("Phases", []):
            raise ValueError("plugin %s has no %s phase" % (self.name, phase))
        state = _RequestState(self, instance, method, path, headers, query, body, client_ip,
                              authenticated, authenticated_consumer, phase)
        r = state.result
        pdk = _PDK(state)
        try:
            err = self._handle_event(instance, phase, state, pdk)
            if err is not None and "no plugin instance" in err.lower():
                r.kong_logs.append(("warn", err))
                self._reset_instances(instance.name)
                err = self._handle_event(instance, phase, state, pdk)
            if err is not None:
                r.kong_logs.append(("err", err))
                r.kong_error = err
        except _Exited:
            pass
        except LuaError as e:
            # the runloop catches the plugin's error: 500, generic message
            r.kong_logs.append(("err", str(e)))
            r.kong_error = str(e)
            r.status = 500
            r.body = b'{"message":"An unexpected error occurred"}'
            r.response_headers = CIMultiDict([("Content-Type", "application/json; charset=utf-8"),
                                              ("Content-Length", str(len(r.body)))])
            r.proxied = False
        if r.proxied:
            r.status = 200
            r.response_headers = state.response_headers
        else:
            if r.status != 500 or r.kong_error is None:
                r.response_headers = state.response_headers
        try:
            r.json = json.loads(r.body.decode("utf-8")) if r.body else None
        except (ValueError, UnicodeDecodeError):
            r.json = None
        r.upstream = Upstream(state.upstream_method, state.upstream_path, state.headers,
                              state.raw_query, state.body)
        r.consumer = _null_to_none(state.consumer)
        r.credential = _null_to_none(state.credential)
        r.ctx_shared = state.ctx_shared
        return r

    def _handle_event(self, inst, phase, state, pdk):
        """Rpc:handle_event + bridge_loop. Returns an error text or None; raises
        LuaError for a Lua error in a PDK function, _Exited after an exit."""
        r = state.result
        iid = self._instance_id(inst, r)
        try:
            step_in = self._rpc.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": phase})
        except _RpcError as e:
            return str(e)
        event_id = step_in.get("EventId") if isinstance(step_in, dict) else None
        while True:
            data = step_in.get("Data") if isinstance(step_in, dict) else None
            if data == "ret":
                return None
            if not isinstance(data, dict):
                return "unexpected answer from plugin server: %r" % (data,)
            method = data.get("Method")
            args = from_python(data.get("Args") or [])
            if not isinstance(args, list):
                args = [args]
            r.pdk_calls.append(method)
            r.pdk_trace.append((method, args))
            res = pdk.call(method, args)
            if res is _LuaNil:
                r.kong_logs.append(("err", "could not find pdk method: %s" % method))
                r.kong_error = "could not find pdk method: %s" % method
                res = None
            step_method = _PDK.STEP_METHODS.get(method, "plugin.Step")
            if method in _PDK.MULTI_MAP:
                packed = fix_mmap(res) if res is not None else None
            elif method in _PDK.RAW:
                packed = res if isinstance(res, bytes) else (None if res is None else res.encode())
            else:
                packed = to_python(res)
            step = {"EventId": event_id}
            if packed is not None:
                step["Data"] = packed
            try:
                step_in = self._rpc.call(step_method, step)
            except _RpcError as e:
                return str(e)
