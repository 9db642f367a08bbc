"""Lua value semantics as Kong's side of the plugin-server socket sees them.

Mirrors:
* LuaJIT's ``tostring`` of numbers (``%.14g``) and of booleans/nil;
* lua-MessagePack as used by kong/runloop/plugin_servers/rpc/mp_rpc.lua: every Lua
  string is packed as msgpack *str* whatever bytes it holds, an empty table as an
  empty ARRAY, a nil map value does not exist, an integral number as an integer;
* lua-cjson (``cjson.encode``): ``/`` escaped, numbers ``%.14g``, an empty table
  ``{}`` unless it carries ``cjson.array_mt`` (Kong's schema layer sets it on arrays
  and sets, so they encode as ``[]``);
* Lua patterns (Kong's ``match`` / ``not_match`` / ``match_any`` validators).

Lua strings may hold any bytes; here they are Python ``str`` whose non-UTF-8 bytes
are surrogate-escaped (``"caf\\udcff"``), so that packing with
``unicode_errors="surrogateescape"`` puts the client's raw bytes on the wire.
"""

import math
import re
from typing import Any, Optional

__all__ = ["LuaError", "LuaNil", "Multi", "CJSON_NULL", "with_cjson_null", "lua_tostring", "lua_number", "lua_type",
           "to_wire", "from_wire", "cjson_str", "cjson_encode", "lua_pattern_to_regex",
           "lua_match", "is_uuid", "lua_str"]


class LuaError(Exception):
    """A Lua ``error()`` raised inside a PDK function: the request fails with 500."""


class LuaNil(object):
    """Marker: Kong could not find the PDK function (mp_rpc.lua logs and answers nil)."""


class CjsonNull(object):
    """cjson.null: a JSON null decoded by cjson, a real value in a Lua table
    (packed as msgpack nil, its key kept: observed for get_body's ``{"e": null}``)."""

    def __repr__(self) -> str:
        return "cjson.null"


CJSON_NULL = CjsonNull()


def with_cjson_null(v: Any) -> Any:
    """A decoded JSON value with its nulls as cjson.null."""
    if v is None:
        return CJSON_NULL
    if isinstance(v, dict):
        return {k: with_cjson_null(x) for k, x in v.items()}
    if isinstance(v, list):
        return [with_cjson_null(x) for x in v]
    return v


class Multi(object):
    """A Lua function's ``value, err`` pair (Kong 3.x keeps only ``value``)."""

    __slots__ = ("value", "err")

    def __init__(self, value: Any, err: Optional[str]) -> None:
        self.value = value
        self.err = err


def lua_str(b: "bytes | str") -> str:
    """A byte string as this package holds Lua strings (non-UTF-8 bytes escaped)."""
    return b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else b


def lua_number(v: Any) -> str:
    """LuaJIT prints numbers (all doubles) with %.14g."""
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


def lua_tostring(v: Any) -> str:
    if v is None:
        return "nil"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return lua_number(v)
    if isinstance(v, (bytes, str)):
        return lua_str(v)
    return "table: 0x%08x" % (id(v) & 0xFFFFFFFF)


def lua_type(v: Any) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, (str, bytes)):
        return "string"
    return "table"


def to_wire(v: Any) -> Any:
    """A Lua value as lua-MessagePack packs it for the plugin server: an empty
    table is an empty ARRAY, an integral double an integer, a string a str."""
    if v is CJSON_NULL:
        return None
    if isinstance(v, dict):
        if not v:
            return []
        return {to_wire(k): to_wire(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [to_wire(x) for x in v]
    if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 63:
        return int(v)
    if isinstance(v, bytes):
        return lua_str(v)
    return v


def from_wire(v: Any) -> Any:
    """A value sent by the plugin server once Lua decoded it: a nil map value
    does not exist in a Lua table."""
    if isinstance(v, dict):
        return {k: from_wire(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [from_wire(x) for x in v]
    return v


_CJSON_ESC = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\n": "\\n", "\r": "\\r",
              "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def cjson_str(s: "str | bytes") -> str:
    out = ['"']
    for ch in lua_str(s):
        esc = _CJSON_ESC.get(ch)
        if esc is not None:
            out.append(esc)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def cjson_encode(v: Any, arrays: bool = False) -> str:
    """lua-cjson's encoding. A Python list is a Lua sequence; when it is empty it
    encodes as ``{}`` unless ``arrays`` (the table carries cjson.array_mt, as the
    arrays and sets of Kong's schema layer do). A None map value is absent."""
    if v is None or v is CJSON_NULL:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            raise ValueError("Cannot serialise number: must not be NaN or Infinity")
        return lua_number(v)
    if isinstance(v, (str, bytes)):
        return cjson_str(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return "[]" if arrays else "{}"
        return "[" + ",".join(cjson_encode(x, arrays) for x in v) + "]"
    if isinstance(v, dict):
        items = [(k, x) for k, x in v.items() if x is not None]
        return "{" + ",".join(cjson_str(lua_tostring(k)) + ":" + cjson_encode(x, arrays)
                              for k, x in items) + "}"
    raise ValueError("Cannot serialise %s" % type(v).__name__)


_LUA_CLASSES = {
    "a": "A-Za-z", "d": "0-9", "l": "a-z", "s": r"\s", "u": "A-Z",
    "w": "A-Za-z0-9", "x": "0-9A-Fa-f", "c": r"\x00-\x1f\x7f",
    "p": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
}


def lua_pattern_to_regex(pat: str) -> str:
    """Translate a Lua pattern (Kong's match/not_match validators) to a Python regex."""
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
        elif c == ".":
            out.append("[\\s\\S]")   # Lua's '.' matches any byte, newlines included
        elif c in "|{}\\":
            out.append("\\" + c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def lua_match(pattern: str, value: str) -> bool:
    return re.search(lua_pattern_to_regex(pattern), value) is not None


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def is_uuid(s: Any) -> bool:
    return isinstance(s, str) and _UUID.fullmatch(s) is not None
