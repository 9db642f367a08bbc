"""The oauth2-client-credentials config, checked once per plugin instance."""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Optional, Tuple
from urllib.parse import urlsplit

from .. import claims as claims_language
from .. import schema
from ..kong import spellings
from ..idp.httpclient import TLS

SCHEMA = schema.load("oauth2-client-credentials")

# RFC 7230 token: what a header name may be.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Set upstream by this plugin: a copy the caller sent never gets through.
_ALWAYS_OWNED = frozenset({"authorization"})


class ConfigError(ValueError):
    """A config the plugin cannot use; the text names the field, never its value."""


@dataclass(frozen=True)
class Config:
    url: str
    audience: str
    audience_param: str = "audience"
    client_id: Optional[str] = None
    client_secret: Optional[str] = field(default=None, repr=False)
    issuer: Optional[str] = None
    jwks_url: Optional[str] = None
    claims: Optional[claims_language.Expression] = None
    forward_headers: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    username_claim: Optional[Tuple[str, ...]] = None
    refusal_log_level: str = "info"
    tls: TLS = TLS()
    timeout: float = 5.0
    max_retries: int = 3
    store: Optional[Dict[str, Any]] = field(default=None, repr=False)
    store_secret: Optional[str] = field(default=None, repr=False)
    # Lower-case names of the headers this plugin writes upstream.
    owned_headers: FrozenSet[str] = _ALWAYS_OWNED
    # Every other spelling (``-``/``_``, case) of those headers, each mapped to []:
    # a set_headers table that, with the values set, reaches every copy a caller sends.
    cleared: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def fixed_client(self) -> bool:
        """True when the gateway authenticates as its own client, not as the caller."""
        return self.client_id is not None

    @classmethod
    def parse(cls, raw: Any) -> "Config":
        # strict=False: Kong adds keys of its own (route_id, __seq__, ...).
        conf, violations = SCHEMA.validate(raw, strict=False)
        if violations:
            raise ConfigError(str(violations[0]))
        return cls._from_valid(conf)

    @classmethod
    def _from_valid(cls, c: Dict[str, Any]) -> "Config":
        for name in ("url", "issuer", "jwks_url"):
            if c[name] is not None:
                _http_url("config." + name, c[name])
        # Both or neither, and store.secret with a Redis store: the schema's entity
        # checks, applied by SCHEMA.validate as Kong applies them.
        client_id, client_secret = c["client_id"] or None, c["client_secret"] or None

        expression = None
        if c["claims"] and c["claims"].strip():
            try:
                expression = claims_language.compile_claims(c["claims"])
            except claims_language.ClaimsSyntaxError as err:
                raise ConfigError("config.claims: %s" % err) from None

        forward = []
        seen = set()
        for name, path in sorted(c["forward_headers"].items()):
            if not _HEADER_NAME.match(name):
                raise ConfigError("config.forward_headers: not a valid header name: %r" % name)
            if name.lower() in _ALWAYS_OWNED or spellings.normalized(name) in seen:
                # The upstream's Authorization is the token; a header named twice
                # (in two cases, or with "-" and "_") would go upstream twice.
                raise ConfigError("config.forward_headers: %r cannot be set from a claim"
                                  % name)
            if spellings.separators(name) > spellings.MAX_SEPARATORS:
                raise ConfigError("config.forward_headers: %r has more than %d '-' or '_' "
                                  "separators" % (name, spellings.MAX_SEPARATORS))
            seen.add(spellings.normalized(name))
            forward.append((name, _path("config.forward_headers." + name, path)))
        username_claim = (_path("config.username_claim", c["username_claim"])
                          if c["username_claim"] else None)

        cc = c["client_config"]
        t = cc["tls"]
        tls = TLS(ca=t["ca"] or None, cert=t["cert"] or None, key=t["key"] or None,
                  insecure_skip_verify=bool(t["insecure_skip_verify"]))
        if bool(tls.cert) != bool(tls.key):
            raise ConfigError("config.client_config.tls: cert and key go together")

        store = c["store"]
        secret = store.get("secret") or None
        if not (store["redis"]["endpoints"] or []):
            store = None

        owned = set(_ALWAYS_OWNED)
        owned.update(name.lower() for name, _ in forward)
        return cls(
            url=c["url"], audience=c["audience"], audience_param=c["audience_param"],
            client_id=client_id, client_secret=client_secret,
            issuer=c["issuer"] or None, jwks_url=c["jwks_url"] or None,
            claims=expression, forward_headers=tuple(forward), username_claim=username_claim,
            tls=tls, timeout=float(cc["timeout_seconds"]), max_retries=int(cc["max_retries"]),
            store=store, store_secret=secret, owned_headers=frozenset(owned),
            refusal_log_level=c["refusal_log_level"],
            cleared={s: [] for n in ["Authorization"] + [n for n, _ in forward]
                     for s in spellings.others(n)},
        )


def _http_url(where: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(where + ": must be an http(s) URL with a host")


def _path(where: str, text: str) -> Tuple[str, ...]:
    path = claims_language.parse_path(text)
    if not path or any(part == "" for part in path):
        raise ConfigError("%s: not a valid claim path: %r" % (where, text))
    return tuple(path)
