"""The headers that go to the upstream service.

Everything is gathered into one table for a single
``kong.service.request.set_headers`` call. An empty list removes a header:
that is how identity headers a client sent itself are dropped.
"""

import json
import re
from typing import Any, Dict, Iterable, List, Optional, Union

from .claims import MISSING, resolve
from .config import Config

# (header, claim) pairs the Enterprise plugin sends, in its order.
CREDENTIAL_HEADERS = (
    ("X-Credential-Scope", "scope"),
    ("X-Credential-Client-ID", "client_id"),
    ("X-Credential-Identifier", "username"),
    ("X-Credential-Token-Type", "token_type"),
    ("X-Credential-Exp", "exp"),
    ("X-Credential-Iat", "iat"),
    ("X-Credential-Nbf", "nbf"),
    ("X-Credential-Sub", "sub"),
    ("X-Credential-Aud", "aud"),
    ("X-Credential-Iss", "iss"),
    ("X-Credential-Jti", "jti"),
)
_SPOOFABLE_PREFIXES = ("x-consumer-", "x-credential-")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

HeaderTable = Dict[str, Union[str, List[str]]]


def header_value(value: Any) -> str:
    """Any JSON value as a safe header value."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    elif isinstance(value, list):
        text = ",".join(header_value(item) for item in value)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return _CONTROL.sub(" ", text)


def claim_header_name(claim: str) -> str:
    return "X-Credential-" + claim.replace("_", "-")


def consumer_headers(consumer: Dict[str, Any], anonymous: bool = False) -> HeaderTable:
    headers: HeaderTable = {"X-Consumer-ID": header_value(consumer.get("id"))}
    for header, field in (("X-Consumer-Custom-ID", "custom_id"),
                          ("X-Consumer-Username", "username")):
        if consumer.get(field) not in (None, ""):
            headers[header] = header_value(consumer[field])
    if anonymous:
        headers["X-Anonymous-Consumer"] = "true"
    return headers


def credential_headers(conf: Config, claims: Dict[str, Any]) -> HeaderTable:
    headers: HeaderTable = {}
    for header, claim in CREDENTIAL_HEADERS:
        if claims.get(claim) is not None:
            headers[header] = header_value(claims[claim])
    for claim in conf.custom_claims_forward:
        if claims.get(claim) is not None:
            headers[claim_header_name(claim)] = header_value(claims[claim])
    for header, path in conf.forward_headers:
        # Traefik's rule: a claim that is not there still gives the header, empty.
        value = resolve(claims, path)
        headers[header] = "" if value is MISSING else header_value(value)
    return headers


def drop_spoofed(conf: Config, incoming: Iterable[str], headers: HeaderTable,
                 extra: Optional[Iterable[str]] = None) -> HeaderTable:
    """Add removals for identity headers the client sent that we did not set."""
    ours = {name.lower() for name in headers}
    for name in incoming:
        lower = name.lower()
        if lower in ours:
            continue
        if lower.startswith(_SPOOFABLE_PREFIXES) or lower in conf.owned_headers:
            headers[lower] = []
    for name in extra or ():
        if name.lower() not in ours:
            headers[name.lower()] = []
    return headers
