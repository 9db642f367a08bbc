"""Values of ``custom_introspection_headers`` that are filled from the request.

Syntax: ``{{method}}``, ``{{path}}``, ``{{host}}``, ``{{client_ip}}`` and
``{{header.NAME}}`` (case-insensitive header name). Anything else is literal
text; a value without ``{{`` stays a plain string.
"""

import re
from typing import Callable, List, Union

from .request import IncomingRequest

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+(?:\.[A-Za-z0-9_-]+)?)\s*\}\}")
_SIMPLE = {"method", "path", "host", "client_ip"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Part = Union[str, Callable[[IncomingRequest], str]]


class TemplateError(ValueError):
    pass


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
        self.plain = len(self.parts) == 1

    def render(self, req: IncomingRequest) -> str:
        out = "".join(p if isinstance(p, str) else p(req) for p in self.parts)
        out = _CONTROL.sub(" ", out)  # a header value never carries CR or LF
        # HTTP header values are bytes: send the client's bytes as they came (a
        # byte that is not UTF-8 arrives here as a lone surrogate), one char each.
        return out.encode("utf-8", "surrogateescape").decode("latin-1")

