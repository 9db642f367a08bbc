"""OAuth 2.0 Protected Resource Metadata (RFC 9728).

The plugin answers ``GET`` on the metadata path with a JSON document naming the
resource, the authorization servers that issue tokens for it and how tokens may
be sent; every ``WWW-Authenticate`` challenge then carries the document's URL
as ``resource_metadata`` (section 5.1), so a client refused for want of a token
learns where to get one.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

from ..kong.responses import DPOP_ALGS

WELL_KNOWN = "/.well-known/oauth-protected-resource"

# Values that go inside a quoted auth-param or a URL: no quote, backslash,
# control character or space (RFC 9110 quoted-string, kept simple).
_SAFE = re.compile(r'^[^"\\\s\x00-\x1f\x7f]+$')


class MetadataError(ValueError):
    """A ``resource_metadata`` setting that cannot be served; ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def safe(value: str) -> bool:
    return bool(_SAFE.match(value))


def default_path(resource: str) -> str:
    """RFC 9728 section 3.1: the well-known suffix goes between the host and the
    resource's path, whose terminating slash is dropped first."""
    path = urlsplit(resource).path.rstrip("/")
    return WELL_KNOWN + path


@dataclass(frozen=True)
class ResourceMetadata:
    resource: str
    path: str
    document: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def url(self) -> str:
        """The document's absolute URL, on the resource's own origin."""
        parts = urlsplit(self.resource)
        return f"{parts.scheme}://{parts.netloc}{self.path}"

    def answers(self, method: str, path: str) -> bool:
        return path == self.path and method in ("GET", "HEAD")


def bearer_methods(token_source: Any) -> Tuple[str, ...]:
    """RFC 6750 methods the config accepts: ``header`` (Authorization), ``body``, ``query``.

    Without configured sources the plugin reads the Enterprise ones (Authorization,
    a form or JSON body field, a query argument); a cookie or a custom header is no
    RFC 6750 method and is not listed."""
    if not token_source.configured:
        return ("header", "body", "query")
    methods = []
    if (token_source.header or "").lower() == "authorization":
        methods.append("header")
    if token_source.query:
        methods.append("query")
    return tuple(methods)


def build(raw: Dict[str, Any], token_source: Any, dpop: str = "off",
          mtls: str = "off") -> Optional[ResourceMetadata]:
    """The metadata of a config's ``resource_metadata`` record; None when it names no
    resource. ``dpop`` and ``mtls`` are the proof_of_possession_* modes it advertises."""
    resource = raw.get("resource")
    if not resource:
        return None
    parts = urlsplit(resource)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname \
            or parts.fragment or parts.query or not safe(resource):
        raise MetadataError("resource", "must be an http(s) URL with a host and neither "
                            "query nor fragment, without quotes or spaces")
    path = raw.get("path") or default_path(resource)
    if not path.startswith("/") or not safe(path):
        raise MetadataError("path", "must be a path starting with / without quotes or spaces")
    document: Dict[str, Any] = {"resource": resource}
    servers = list(raw.get("authorization_servers") or [])
    if servers:
        document["authorization_servers"] = servers
    scopes = list(raw.get("scopes_supported") or [])
    if scopes:
        document["scopes_supported"] = scopes
    document["bearer_methods_supported"] = list(bearer_methods(token_source))
    if dpop != "off":   # RFC 9728 section 2, from RFC 9449 and RFC 8705
        document["dpop_signing_alg_values_supported"] = list(DPOP_ALGS.split())
    if dpop == "strict":
        document["dpop_bound_access_tokens_required"] = True
    if mtls == "strict":
        document["tls_client_certificate_bound_access_tokens"] = True
    for name in ("resource_name", "resource_documentation"):
        if raw.get(name):
            document[name] = raw[name]
    return ResourceMetadata(resource=resource, path=path, document=document)
