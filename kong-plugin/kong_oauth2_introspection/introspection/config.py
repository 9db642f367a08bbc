"""A plugin config, parsed and checked once per plugin instance into typed objects."""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Optional, Tuple
from urllib.parse import urlsplit

from .. import claims as claims_language
from . import resource_metadata as metadata
from .. import schema
from ..kong import spellings
from ..idp.client_auth import ClientAuth, ClientAuthError
from ..idp.httpclient import TLS
from .requirements import Requirements, any_of
from .templates import Template, TemplateError

# Retry backoff of the IdP call: BACKOFF_BASE * 2**attempt seconds, at most BACKOFF_MAX.
BACKOFF_BASE = 0.05
BACKOFF_MAX = 1.0

# RFC 7230 token: what a header name may be.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class ConfigError(ValueError):
    """A config the plugin cannot use; ``field`` names the culprit."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.message = message


@dataclass(frozen=True)
class TokenSource:
    """Traefik-style token sources; ``None`` everywhere means the Enterprise sources."""
    header: Optional[str] = None
    header_auth_scheme: Optional[str] = None
    query: Optional[str] = None
    cookie: Optional[str] = None

    @property
    def configured(self) -> bool:
        return bool(self.header or self.query or self.cookie)


@dataclass(frozen=True)
class Config:
    introspection_url: str
    authorization_value: str = field(repr=False)
    token_type_hint: Optional[str] = None
    ttl: float = 30
    timeout: float = 10.0          # seconds
    keepalive: float = 60.0        # seconds
    introspect_request: bool = False
    hide_credentials: bool = False
    run_on_preflight: bool = True
    anonymous: str = ""
    consumer_by: str = "username"
    custom_introspection_headers: Tuple[Tuple[str, Template], ...] = ()  # dashed names
    custom_claims_forward: Tuple[str, ...] = ()
    token_source: TokenSource = TokenSource()
    claims: Optional[Any] = None   # a compiled claims expression
    forward_headers: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    forward_authorization: bool = True
    username_claim: Optional[Tuple[str, ...]] = None
    client_tls: TLS = TLS()
    max_retries: int = 0
    negative_ttl: float = 5
    stale_if_error: float = 0
    store: Optional[Dict[str, Any]] = field(default=None, repr=False)
    # Headers the plugin may set upstream: a client-sent copy is always dropped.
    owned_headers: FrozenSet[str] = frozenset()
    requirements: Requirements = Requirements()
    resource_metadata: Optional[metadata.ResourceMetadata] = None
    client_auth: Optional[ClientAuth] = field(default=None, repr=False)
    # RFC 9701: (issuer, audience = client_id, JWKS URL or None to discover it).
    signed_answers: Optional[Tuple[str, str, Optional[str]]] = None
    upstream_introspection_jwt_header: Optional[str] = None
    # (token endpoint URL, scope or None): introspect with a bearer token from there.
    pre_authorization: Optional[Tuple[str, Optional[str]]] = None
    proof_of_possession_dpop: str = "off"     # off | optional | strict
    dpop_proof_lifetime: float = 300
    introspection_jwt_max_age: float = 60
    refusal_log_level: str = "info"
    proof_of_possession_mtls: str = "off"     # off | optional | strict

    @property
    def worst_case(self) -> float:
        """Seconds the IdP call may take with every retry and backoff."""
        attempts = self.max_retries + 1
        backoff = sum(min(BACKOFF_MAX, BACKOFF_BASE * 2 ** a) for a in range(self.max_retries))
        return self.timeout * attempts + backoff

    @classmethod
    def parse(cls, raw: Any) -> "Config":
        # Kong validated ``raw`` already and added keys of its own: ignore those.
        conf, violations = schema.validate(raw, strict=False)
        if violations:
            first = violations[0]
            raise ConfigError(first.path, first.message)
        return cls._from_valid(conf)

    @classmethod
    def _from_valid(cls, c: Dict[str, Any]) -> "Config":
        url = urlsplit(c["introspection_url"])
        if url.scheme.lower() not in ("http", "https") or not url.hostname:
            raise ConfigError("config.introspection_url", "must be an http(s) URL with a host")

        introspection_headers = []
        for name, value in sorted(c["custom_introspection_headers"].items()):
            _header_name("config.custom_introspection_headers", name)
            try:
                introspection_headers.append((name.replace("_", "-"), Template(value)))
            except TemplateError as err:
                raise ConfigError("config.custom_introspection_headers", str(err)) from None

        expression = None
        if c["claims"] and c["claims"].strip():
            try:
                expression = claims_language.compile_claims(c["claims"])
            except claims_language.ClaimsSyntaxError as err:
                raise ConfigError("config.claims", str(err)) from None

        forward = []
        for name, path in sorted(c["forward_headers"].items()):
            _header_name("config.forward_headers", name)
            forward.append((name, _path("config.forward_headers." + name, path)))

        username_claim = None
        if c["username_claim"]:
            username_claim = _path("config.username_claim", c["username_claim"])

        ts = c["token_source"]
        source = TokenSource(header=ts["header"] or None,
                             header_auth_scheme=ts["header_auth_scheme"] or None,
                             query=ts["query"] or None, cookie=ts["cookie"] or None)
        if source.header:
            _header_name("config.token_source.header", source.header)

        tls = c["client_tls"]
        client_tls = TLS(ca=tls["ca"] or None, cert=tls["cert"] or None, key=tls["key"] or None,
                         insecure_skip_verify=bool(tls["insecure_skip_verify"]))
        if bool(client_tls.cert) != bool(client_tls.key):
            raise ConfigError("config.client_tls", "cert and key go together")

        # Which fields go together (authorization_value or a method, what each
        # method, signed answers and pre-authorization need) are the schema's
        # entity checks, which schema.validate applied already, as Kong does.
        client_auth = None
        method = c["introspection_endpoint_auth_method"]
        if method:
            try:
                client_auth = ClientAuth.build(method, c["client_id"], c["client_secret"],
                                               c["client_jwk"], c["client_alg"],
                                               bool(client_tls.cert))
            except ClientAuthError as err:
                raise ConfigError("config." + err.field, str(err)) from None

        pre_authorization = None
        pre = c["pre_authorization"]
        if pre["token_url"] and client_auth is not None:
            pre_authorization = (pre["token_url"], pre["scope"] or None)

        signed_answers = None
        if c["introspection_accept"] == "application/token-introspection+jwt":
            signed_answers = (c["issuer"], c["client_id"], c["jwks_url"] or None)
        jwt_header = c["upstream_introspection_jwt_header"] or None
        if jwt_header:
            _header_name("config.upstream_introspection_jwt_header", jwt_header)

        store = c["store"]
        if not (store["redis"]["endpoints"] or []):
            store = None

        requirements = Requirements(
            scopes=any_of(c["scopes_required"] or ()),
            audiences=any_of(c["audience_required"] or ()),
            issuers=frozenset(c["issuers_allowed"] or ()),
            scopes_claim=tuple(c["scopes_claim"]), audience_claim=tuple(c["audience_claim"]))
        if not all(metadata.safe(scope) for needed in requirements.scopes for scope in needed):
            raise ConfigError("config.scopes_required", "a scope may not hold a quote or a "
                              "backslash (RFC 6749 section 3.3)")
        try:
            resource_metadata = metadata.build(c["resource_metadata"], source,
                                               c["proof_of_possession_dpop"],
                                               c["proof_of_possession_mtls"])
        except metadata.MetadataError as err:
            raise ConfigError("config.resource_metadata." + err.field, str(err)) from None

        claims_forward = tuple(c["custom_claims_forward"])
        # Each header we set is cleared in all 2^n spellings of its n separators.
        for where, names in (("config.forward_headers", [n for n, _ in forward]),
                             ("config.custom_claims_forward",
                              ["X-Credential-" + n.replace("_", "-") for n in claims_forward]),
                             ("config.upstream_introspection_jwt_header",
                              [jwt_header] if jwt_header else [])):
            for name in spellings.too_long(names):
                raise ConfigError(where, "%r has more than %d '-' or '_' separators"
                                  % (name, spellings.MAX_SEPARATORS))
        owned = {"x-consumer-id", "x-consumer-custom-id", "x-consumer-username",
                 "x-anonymous-consumer"}
        owned.update(name.lower() for name, _ in forward)
        if jwt_header:
            owned.add(jwt_header.lower())
        return cls(
            introspection_url=c["introspection_url"],
            authorization_value=c["authorization_value"] or "",
            token_type_hint=c["token_type_hint"] or None,
            ttl=float(c["ttl"]),
            timeout=c["timeout"] / 1000.0,
            keepalive=c["keepalive"] / 1000.0,
            introspect_request=c["introspect_request"],
            hide_credentials=bool(c["hide_credentials"]),
            run_on_preflight=c["run_on_preflight"] is not False,
            anonymous=c["anonymous"] or "",
            consumer_by=c["consumer_by"],
            custom_introspection_headers=tuple(introspection_headers),
            custom_claims_forward=claims_forward,
            token_source=source,
            claims=expression,
            forward_headers=tuple(forward),
            forward_authorization=c["forward_authorization"],
            username_claim=username_claim,
            client_tls=client_tls,
            max_retries=c["max_retries"],
            negative_ttl=float(c["negative_ttl"]),
            stale_if_error=float(c["stale_if_error"]),
            store=store,
            owned_headers=frozenset(owned),
            requirements=requirements,
            resource_metadata=resource_metadata,
            client_auth=client_auth,
            signed_answers=signed_answers,
            pre_authorization=pre_authorization,
            proof_of_possession_dpop=c["proof_of_possession_dpop"],
            dpop_proof_lifetime=float(c["dpop_proof_lifetime"]),
            introspection_jwt_max_age=float(c["introspection_jwt_max_age"]),
            refusal_log_level=c["refusal_log_level"],
            proof_of_possession_mtls=c["proof_of_possession_mtls"],
            upstream_introspection_jwt_header=jwt_header,
        )


def _header_name(where: str, name: str) -> None:
    if not _HEADER_NAME.match(name):
        raise ConfigError(where, f"not a valid header name: {name!r}")


def _path(where: str, text: str) -> Tuple[str, ...]:
    path = claims_language.parse_path(text)
    if not path or any(part == "" for part in path):
        raise ConfigError(where, f"not a valid claim path: {text!r}")
    return path
