"""Where the access token comes from, and how it is taken out again.

Enterprise sources (``token_source`` unset): ``Authorization: Bearer|Token``,
then ``access_token`` in the query string, then in the body. The header is
looked at first because it costs no PDK call; RFC 6750 forbids a client to
send the token in more than one place, so the order only matters to clients
that break that rule.

Two kinds of unusable token (RFC 6750 section 3.1): one sent more than once is an
``invalid_request`` (400, ``ambiguous``); one that is too long or holds anything
but visible ASCII (bytes that are not UTF-8 included) is an ``invalid_token`` (401).

Traefik sources (``token_source`` set): only the named header, query
parameter and cookie, in that order.
"""

import re
from typing import Any, List, NamedTuple, Optional, Tuple

from .config import TokenSource
from ..kong.request import IncomingRequest

MAX_TOKEN_LENGTH = 8192
ACCESS_TOKEN = "access_token"
# Visible ASCII only: covers RFC 6750's b64token and every opaque token in use.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class MalformedToken(Exception):
    """A token was sent, but not one we can use; ``ambiguous`` when sent twice."""

    def __init__(self, why: str, ambiguous: bool = False):
        super().__init__(why)
        self.ambiguous = ambiguous


class Found(NamedTuple):
    token: str
    where: str   # "header", "query", "body" or "cookie"
    name: str    # the header, parameter or cookie name


def _checked(token) -> str:
    if not isinstance(token, str) or not token:
        raise MalformedToken("not a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise MalformedToken("longer than %d bytes" % MAX_TOKEN_LENGTH)
    if not _VISIBLE_ASCII.fullmatch(token):
        raise MalformedToken("characters outside visible ASCII")
    return token


def _single(value):
    """One parameter value; a repeated parameter is ambiguous (parameter pollution)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise MalformedToken("parameter sent %d times" % len(value), ambiguous=True)
        value = value[0]
    return value


def from_header(req: IncomingRequest, name: str, schemes) -> Optional[Found]:
    """The token of header ``name`` as ``<scheme> <token>`` (``schemes`` lower-case;
    none: the whole value); MalformedToken when sent twice or unusable."""
    count = req.header_count(name)
    if count == 0:
        return None
    if count > 1:
        raise MalformedToken("header %s sent %d times" % (name, count), ambiguous=True)
    value = req.header(name) or ""
    if not schemes:
        return Found(_checked(value.strip()), "header", name)
    parts = value.split()
    if len(parts) == 2 and parts[0].lower() in schemes:
        return Found(_checked(parts[1]), "header", name)
    return None


def parse_cookies(header: str):
    """(name, value) pairs of a Cookie header, in order."""
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            yield name.strip(), value.strip()


def without_cookie(header: str, name: str) -> str:
    return "; ".join(f"{k}={v}" for k, v in parse_cookies(header) if k != name)


class TokenFinder:
    def __init__(self, source: TokenSource):
        self.source = source
        self._schemes: Tuple[str, ...]
        if source.configured:
            scheme = source.header_auth_scheme
            self._schemes = (scheme.lower(),) if scheme else ()
        else:
            self._schemes = ("bearer", "token")

    def find(self, req: IncomingRequest) -> Optional[Found]:
        """The token of ``req``, None if there is none; MalformedToken if unusable."""
        if self.source.configured:
            return self._find_configured(req)
        found = from_header(req, "authorization", self._schemes)
        if found:
            return found
        if ACCESS_TOKEN in req.query:
            return Found(_checked(_single(req.query[ACCESS_TOKEN])), "query", ACCESS_TOKEN)
        values: Optional[List[Any]] = req.body_field(ACCESS_TOKEN)
        if values:
            return Found(_checked(_single(values)), "body", ACCESS_TOKEN)
        return None

    def _find_configured(self, req: IncomingRequest) -> Optional[Found]:
        src = self.source
        if src.header:
            found = from_header(req, src.header, self._schemes)
            if found:
                return found
        if src.query and src.query in req.query:
            return Found(_checked(_single(req.query[src.query])), "query", src.query)
        if src.cookie:
            values = [v for header in req.headers.get("cookie", [])
                      for k, v in parse_cookies(header) if k == src.cookie]
            if values:
                return Found(_checked(_single(values)), "cookie", src.cookie)
        return None
