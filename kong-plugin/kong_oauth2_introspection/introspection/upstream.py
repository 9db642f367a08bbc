"""The headers that go to the upstream service.

Everything is gathered into one table for a single
``kong.service.request.set_headers`` call. An empty list removes a header
(observed on Kong 3.9: ``set_headers({"x": []})`` removes x).
"""

from typing import Any, Dict, Iterable, List, Union

from ..claims import MISSING, resolve
from .config import Config
from ..kong.spellings import normalized, others
from ..kong.headers import CONSUMER_HEADERS, SHARED, header_value, identity_like

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

HeaderTable = Dict[str, Union[str, List[str]]]


def claim_header_name(claim: str) -> str:
    return "X-Credential-" + claim.replace("_", "-")


def consumer_headers(consumer: Dict[str, Any], anonymous: bool = False) -> Dict[str, str]:
    headers = {"X-Consumer-ID": header_value(consumer.get("id"))}
    for header, field in (("X-Consumer-Custom-ID", "custom_id"),
                          ("X-Consumer-Username", "username")):
        if consumer.get(field) not in (None, ""):
            headers[header] = header_value(consumer[field])
    if anonymous:
        headers["X-Anonymous-Consumer"] = "true"
    return headers


def credential_headers(conf: Config, claims: Dict[str, Any]) -> Dict[str, str]:
    headers: Dict[str, str] = {}
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


class IdentityHeaders:
    """Every header one config owns, set or cleared in every spelling (case, ``-``
    or ``_`` at each separator) on every path that lets a request through,
    whatever the plugin saw of the client's headers.

    Built once per config; ``table`` makes the one ``set_headers`` argument of a
    request. An empty list removes a header; no two keys of a table name the same
    header (nginx matches names case-insensitively, ``-`` and ``_`` exactly).
    """

    def __init__(self, conf: Config):
        names = list(CONSUMER_HEADERS) + [h for h, _ in CREDENTIAL_HEADERS]
        names += [claim_header_name(c) for c in conf.custom_claims_forward]
        names += [h for h, _ in conf.forward_headers]
        if conf.upstream_introspection_jwt_header:   # RFC 9701 phantom token
            names.append(conf.upstream_introspection_jwt_header)
        # normalized name -> the spelling this plugin sets
        self.display: Dict[str, str] = {}
        for name in names:
            self.display.setdefault(normalized(name), name)
        self.cleared: HeaderTable = {}
        for name in self.display.values():
            self.cleared[name] = []
            for spelling in others(name):
                self.cleared[spelling] = []
        # The logical-OR path: another plugin authenticated; clear all but the
        # exact spellings Kong's set_consumer wrote for it.
        self.cleared_extras: HeaderTable = {name: [] for name in self.cleared
                                            if name.lower() not in SHARED}

    def table(self, incoming: Iterable[str], values: Dict[str, str],
              remove: Iterable[str] = (), keep_identity_like: bool = False) -> HeaderTable:
        """Clear every owned header, set ``values``, remove ``remove``, and remove
        any other X-Consumer-*/X-Credential-* (any spelling) the client sent,
        unless ``keep_identity_like`` (another of our plugins set those)."""
        table: HeaderTable = dict(self.cleared)
        display = self.display
        for name, value in values.items():
            table[display.get(normalized(name), name)] = value
        if not keep_identity_like:
            for name in incoming:
                if identity_like(name) and normalized(name) not in display:
                    table[name] = []
        for name in remove:
            if normalized(name) not in display:
                table[name.lower()] = []
        return table

    def extras_table(self, incoming: Iterable[str],
                     keep_identity_like: bool = False) -> HeaderTable:
        """The logical-OR path: clear what set_consumer did not set, and any
        X-Consumer-*/X-Credential-* the client sent in another spelling or name."""
        table: HeaderTable = dict(self.cleared_extras)
        if not keep_identity_like:
            for name in incoming:
                if identity_like(name) and name not in SHARED \
                        and normalized(name) not in self.display:
                    table[name] = []
        return table
