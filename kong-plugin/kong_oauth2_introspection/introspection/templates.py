"""Values of ``custom_introspection_headers`` that are filled from the request.

Syntax: ``{{method}}``, ``{{path}}``, ``{{host}}``, ``{{client_ip}}`` and
``{{header.NAME}}`` (case-insensitive header name). Anything else is literal
text; a value without ``{{`` stays a plain string.

What the request supplies is sent in one way, ``wire``: percent-encoded
(RFC 3986) UTF-8, every byte outside visible ASCII and ``%`` itself as ``%XX``.
Whatever a client sends, the value is a valid header value that the IdP can
decode back to the exact bytes; nothing a client sends can make the call to the
IdP fail before it is made (and count as the IdP's failure). The literal text
comes from the config and is checked once, here.
"""

import re
from typing import Callable, List, Union
from urllib.parse import quote_from_bytes

from ..kong.request import IncomingRequest

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+(?:\.[A-Za-z0-9_-]+)?)\s*\}\}")
_SIMPLE = {"method", "path", "host", "client_ip"}
# Visible ASCII but "%": kept as it is by ``wire``.
_WIRE_SAFE = "".join(chr(c) for c in range(0x21, 0x7f) if chr(c) != "%")
# What a literal part may hold: a header value http.client sends as latin-1,
# without controls (CR, LF, NUL among them).
_LITERAL = re.compile(r"[\x20-\x7e\x80-\xff]*")

Part = Union[str, Callable[[IncomingRequest], str]]


class TemplateError(ValueError):
    pass


def wire(value: str) -> str:
    """``value`` (as Kong hands it: decoded, a byte that is not UTF-8 as a lone
    surrogate) percent-encoded as its UTF-8 bytes: visible ASCII only, never fails."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:   # a surrogate no byte maps to: still one fixed encoding
        raw = value.encode("utf-8", "surrogatepass")
    return quote_from_bytes(raw, safe=_WIRE_SAFE)


def _getter(name: str) -> Callable[[IncomingRequest], str]:
    if name in _SIMPLE:
        return lambda req: getattr(req, name)
    if name.startswith("header."):
        header = name[len("header."):].lower()
        return lambda req: req.header(header) or ""
    raise TemplateError("unknown placeholder {{%s}}" % name)


class Template:
    def __init__(self, text: str):
        self.text = text
        self.parts: List[Part] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            self.parts.append(text[pos:match.start()])
            self.parts.append(_getter(match.group(1)))
            pos = match.end()
        self.parts.append(text[pos:])
        if len(self.parts) == 1 and "{{" in text:
            raise TemplateError("unclosed or malformed placeholder in %r" % text)
        for part in self.parts:
            if isinstance(part, str) and not _LITERAL.fullmatch(part):
                raise TemplateError("%r holds a control character or a character outside "
                                    "Latin-1, which no header value can carry" % text[:64])
        self.plain = len(self.parts) == 1
        if self.plain and text != text.strip(" "):
            raise TemplateError("%r starts or ends with a blank, which HTTP drops" % text[:64])

    def render(self, req: IncomingRequest) -> str:
        # Around an empty value, literal blanks would start or end the header
        # value; HTTP drops them anyway, and requests refuses a leading one.
        return "".join(p if isinstance(p, str) else wire(p(req))
                       for p in self.parts).strip(" ")

