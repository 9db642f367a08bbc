"""What nginx (OpenResty) does with a request before and around Kong's Lua.

Mirrors:
* ngx_http_request.c: a second ``Host``, ``Authorization``, ``Content-Length``,
  ``Content-Range``, ``Transfer-Encoding``, ``Expect`` or ``If-*`` line is answered
  400 before any plugin runs (``ngx_http_process_unique_header_line``; observed on
  Kong 3.9.1); ``ignore_invalid_headers on`` drops header names holding any byte but
  letters, digits, ``-`` and ``_`` -- Kong's template sets ``underscores_in_headers
  on``, so ``X_Consumer_ID`` reaches the plugin and the upstream (observed);
* lua-nginx-module's ``ngx.req.get_headers`` / ``get_uri_args`` / ``get_post_args``:
  at most ``max`` (default 100) lines or arguments are returned, the rest still
  reach the upstream; a bare flag is ``true``, a repeated name a list;
* ``client_body_buffer_size`` (8 KB by default): a larger body is spooled to a file,
  then ``ngx.req.get_body_data()`` is nil and ``get_post_args`` fails.

Header names and values, query and body text are kept as Lua strings: Python
``str`` with the client's non-UTF-8 bytes surrogate-escaped (see lua.py).
"""

import collections.abc
import re
import urllib.parse
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .lua import LuaError, lua_str, lua_tostring

__all__ = ["CIMultiDict", "UNIQUE_HEADERS", "header_pairs", "duplicate_unique_header",
           "drop_invalid_names", "ngx_unescape", "ngx_escape", "parse_args", "encode_args",
           "parse_multipart", "mmap_headers", "DEFAULT_BODY_BUFFER", "search_remove"]

DEFAULT_BODY_BUFFER = 8192
UNIQUE_HEADERS = frozenset(("host", "authorization", "content-length", "content-range",
                            "transfer-encoding", "expect", "if-modified-since",
                            "if-unmodified-since", "if-match", "if-none-match", "if-range"))
_VALID_NAME = re.compile(r"[A-Za-z0-9_-]+")

Pairs = List[Tuple[str, str]]


class CIMultiDict(collections.abc.Mapping):
    """Case-insensitive, ordered, multi-valued headers: ``h[name]`` is the first
    value, ``h.getall(name)`` all of them, ``h.items_all()`` every line in order."""

    def __init__(self, pairs: Iterable[Tuple[str, str]] = ()) -> None:
        self._items: Pairs = [(str(k), str(v)) for k, v in pairs]

    def __getitem__(self, name: str) -> str:
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        raise KeyError(name)

    def getall(self, name: str, default: Optional[List[str]] = None) -> List[str]:
        low = name.lower()
        vals = [v for k, v in self._items if k.lower() == low]
        return vals if vals else ([] if default is None else default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        seen: List[str] = []
        for k, _ in self._items:
            if k.lower() not in seen:
                seen.append(k.lower())
                yield k

    def __len__(self) -> int:
        return len({k.lower() for k, _ in self._items})

    def items_all(self) -> Pairs:
        return list(self._items)

    # mutation, ngx.req.set_header / clear_header style
    def _remove(self, name: str) -> None:
        low = name.lower()
        self._items = [(k, v) for k, v in self._items if k.lower() != low]

    def _set(self, name: str, values: List[str]) -> None:
        """ngx.req.set_header: the first existing line keeps its place and its
        name's case (observed: ``set_headers({"x-a": ["1","2"]})`` on a client's
        ``X-A`` sends ``X-A: 1`` then ``x-a: 2``); further values are appended."""
        low = name.lower()
        at = next((i for i, (k, _) in enumerate(self._items) if k.lower() == low), None)
        if at is None or not values:
            self._remove(name)
            self._add(name, values)
            return
        kept = self._items[at][0]
        self._items = [(k, v) for i, (k, v) in enumerate(self._items)
                       if i == at or k.lower() != low]
        at = next(i for i, (k, _) in enumerate(self._items) if k.lower() == low)
        self._items[at] = (kept, values[0])
        self._add(name, values[1:])

    def _add(self, name: str, values: List[str]) -> None:
        for v in values:
            self._items.append((name, v))

    def _prepend(self, name: str, value: str) -> None:
        self._items.insert(0, (name, value))

    def __repr__(self) -> str:
        return "CIMultiDict(%r)" % self._items


HeadersIn = Union[None, Dict[Any, Any], Iterable[Tuple[Any, Any]]]


def header_pairs(headers: HeadersIn) -> Pairs:
    """A test's headers (dict or pairs; names and values str, bytes or numbers;
    a list value is several lines) as the lines a client sends."""
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    out: Pairs = []
    for k, v in items:
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            out.append((lua_str(k) if isinstance(k, bytes) else str(k),
                        lua_str(x) if isinstance(x, bytes) else str(x)))
    return out


def duplicate_unique_header(pairs: Pairs) -> Optional[str]:
    """nginx's error text for a second line of a header it keeps only once."""
    seen = set()
    for k, v in pairs:
        low = k.lower()
        if low in UNIQUE_HEADERS:
            if low in seen:
                return 'client sent duplicate header line: "%s: %s", previous value: ...' % (k, v)
            seen.add(low)
    return None


def drop_invalid_names(pairs: Pairs, underscores_in_headers: bool = True) -> Pairs:
    """Kong's nginx template sets ``underscores_in_headers on``: ``X_Consumer_ID``
    reaches Kong and the upstream (observed on Kong 3.9.1, hdr_underscore_name)."""
    return [(k, v) for k, v in pairs
            if _VALID_NAME.fullmatch(k.replace("_", "-") if underscores_in_headers else k)]


def ngx_unescape(s: str) -> str:
    raw = urllib.parse.unquote_to_bytes(s.replace("+", " ").encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "surrogateescape")


def ngx_escape(s: Any) -> str:
    text = s if isinstance(s, str) else lua_tostring(s)
    # ngx.escape_uri (URI component): only A-Za-z0-9 and -._~ stay as they are
    return urllib.parse.quote(text.encode("utf-8", "surrogateescape"), safe="-_.~")


def _add(out: Dict[str, Any], key: str, value: Any) -> None:
    """Lua multi-map insert: a value, or a list once the key repeats."""
    if key not in out:
        out[key] = value
    elif isinstance(out[key], list):
        out[key].append(value)
    else:
        out[key] = [out[key], value]


def parse_args(raw: Optional[str], max_args: int = 100) -> Dict[str, Any]:
    """ngx.req.get_uri_args / get_post_args: value string, ``True`` for a bare
    flag, a list when repeated; at most ``max_args`` arguments."""
    out: Dict[str, Any] = {}
    count = 0
    for part in (raw or "").split("&"):
        if part == "":
            continue
        if count >= max_args:
            break
        count += 1
        if "=" in part:
            k, v = part.split("=", 1)
            key, value = ngx_unescape(k), ngx_unescape(v)
            if key == "":
                continue
            _add(out, key, value)
        else:
            key = ngx_unescape(part)
            if key != "":
                _add(out, key, True)
    return out


def encode_args(args: Dict[Any, Any]) -> str:
    """kong.service.request.set_query (ngx.encode_args after Kong sorts keys):
    ``true`` a bare key, ``false`` omitted."""
    parts = []
    for k, v in args.items():
        if not isinstance(k, str):
            raise LuaError("arg keys must be strings")
        one = []
        for x in (v if isinstance(v, list) else [v]):
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


_FORM_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789*-._")


def _form_encode(s: str) -> str:
    """WHATWG application/x-www-form-urlencoded serializer (ada's url_search_params)."""
    out = []
    for b in s.encode("utf-8", "surrogateescape"):
        out.append(chr(b) if b in _FORM_SAFE else "+" if b == 0x20 else "%%%02X" % b)
    return "".join(out)


def search_remove(raw: str, name: str) -> str:
    """lua-resty-ada ``search.remove`` as Kong 3.9's clear_query_arg uses it: the
    query is parsed as URLSearchParams, ``name`` removed, the rest RE-SERIALIZED
    (a bare ``flag`` becomes ``flag=``, every byte but alnum and ``*-._`` is
    percent-encoded, a space is ``+``: observed on 3.9.1, ``e=x+y`` stays ``e=x+y``)."""
    kept = []
    for part in raw.split("&"):
        if part == "":
            continue
        k, _, v = part.partition("=")
        key, value = ngx_unescape(k), ngx_unescape(v)
        if key != name:
            kept.append(_form_encode(key) + "=" + _form_encode(value))
    return "&".join(kept)


def parse_multipart(body: bytes, content_type: Optional[str]) -> Optional[Dict[str, Any]]:
    """lua-multipart's get_all_with_arrays, enough for form fields and files."""
    m = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not m:
        return None
    boundary = ("--" + m.group(1)).encode()
    out: Dict[str, Any] = {}
    for chunk in body.split(boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, _, value = chunk.partition(b"\r\n\r\n")
        if value.endswith(b"\r\n"):
            value = value[:-2]
        nm = re.search(rb'name="([^"]*)"', head)
        if nm:
            _add(out, lua_str(nm.group(1)), lua_str(value))
    return out


def mmap_headers(pairs: Pairs, max_headers: int) -> Dict[str, Any]:
    """ngx.req.get_headers(max): lowercase names; a string, a list when repeated."""
    out: Dict[str, Any] = {}
    for k, v in pairs[:max_headers]:
        _add(out, k.lower(), v)
    return out
