"""Request bodies: remove exactly one field, keeping everything else.

Rebuilding a body from Kong's parse (``get_body``, capped and lossy for files)
would lose what it did not return. To hide a token, this cuts just that field's
bytes out of the raw body: every other field and file reaches the upstream byte
for byte (a JSON body is re-serialized without the key).
"""

import json
import re
from typing import List, Optional, Tuple
from urllib.parse import unquote_to_bytes

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
MULTIPART = "multipart/form-data"

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.I)
_NAME = re.compile(rb'\bname="([^"]*)"', re.I)
_FILENAME = re.compile(rb'\bfilename\*?=', re.I)


def kind(content_type: Optional[str]) -> Optional[str]:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in (FORM, MULTIPART) or media == JSON or media.endswith("+json"):
        return JSON if media.endswith("json") else media
    return None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _form_pairs(raw: bytes) -> List[Tuple[int, int, str, str]]:
    """(start, end, name, value) of every ``name=value`` of a form body."""
    pairs, pos = [], 0
    for part in raw.split(b"&"):
        end = pos + len(part)
        if part:
            name, _, value = part.partition(b"=")
            pairs.append((pos, end, _text(unquote_to_bytes(name.replace(b"+", b" "))),
                          _text(unquote_to_bytes(value.replace(b"+", b" ")))))
        pos = end + 1
    return pairs


def _multipart_parts(raw: bytes, content_type: str):
    """(start, end, name, value) of every non-file part; None when malformed."""
    match = _BOUNDARY.search(content_type or "")
    if not match:
        return None
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1", "replace")
    pos = raw.find(delimiter)
    if pos < 0:
        return None
    parts: List[Tuple[int, int, str, str]] = []
    while True:
        after = pos + len(delimiter)
        if raw[after:after + 2] == b"--":
            return parts
        line_end = raw.find(b"\r\n", after)
        if line_end < 0:
            return None
        nxt = raw.find(b"\r\n" + delimiter, line_end)
        if nxt < 0:
            return None
        head, sep, value = raw[line_end + 2:nxt].partition(b"\r\n\r\n")
        name = _NAME.search(head)
        if sep and name and not _FILENAME.search(head):
            parts.append((pos, nxt + 2, _text(name.group(1)), _text(value)))
        pos = nxt + 2


def without_field(raw: bytes, content_type: Optional[str], name: str) -> Optional[bytes]:
    """``raw`` with field ``name`` removed and everything else kept; None if unreadable."""
    media = kind(content_type)
    if media == FORM:
        kept = [raw[s:e] for s, e, k, _ in _form_pairs(raw) if k != name]
        return b"&".join(kept)
    if media == MULTIPART:
        parts = _multipart_parts(raw, content_type or "")
        if parts is None:
            return None
        out, pos = [], 0
        for start, end, key, _ in parts:
            if key == name:
                out.append(raw[pos:start])
                pos = end
        out.append(raw[pos:])
        return b"".join(out)
    if media == JSON:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(doc, dict):
            return None
        doc.pop(name, None)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogateescape")
    return None
