"""Signed introspection answers (RFC 9701, JWT Response for OAuth Token Introspection).

Asked for with ``Accept: application/token-introspection+jwt``, the server answers
a JWT whose ``token_introspection`` claim is the RFC 7662 answer. Before that
claim is believed: the ``typ`` header must be ``token-introspection+jwt``, the
signature must verify with a key of the server's JWKS (asymmetric algorithms
only), ``iss`` must be the configured issuer, ``aud`` the plugin's ``client_id``
and ``iat`` recent. Any failure is the server's failure (the request gets 500,
nothing is cached), never an inactive token.

The JWKS is fetched once, kept ``JWKS_MAX_AGE`` seconds, and fetched again at once
when an answer names a ``kid`` it lacks (a key rotation), at most once every
``REFRESH_INTERVAL`` seconds whatever the answers name. The code here runs on the
cache's worker threads: it may block.
"""

import json
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlsplit

import jwt

MEDIA_TYPE = "application/token-introspection+jwt"
TYP = "token-introspection+jwt"
JWKS_MAX_AGE = 300.0
REFRESH_INTERVAL = 1.0
IAT_WINDOW = 60          # seconds an answer's iat may differ from now
MAX_JWKS_BYTES = 256 * 1024
_FAMILY = {"RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
           "EC": ("ES256", "ES384", "ES512"), "OKP": ("EdDSA",)}
ALGORITHMS = frozenset(a for algs in _FAMILY.values() for a in algs)

# Where the verified JWT rides along with the claims it carries, for the
# phantom-token header: a name no claim path or header template can spell.
JWT_KEY = "\x00introspection-jwt"


class AnswerRejected(Exception):
    """A signed answer that cannot be believed; the text names the check only."""


# (url, headers, max_bytes) -> (status, body): a GET on the introspection client
Fetch = Callable[[str, Dict[str, str], int], Tuple[int, bytes]]


class _KeySet:
    def __init__(self, document: Any):
        self.fetched = time.monotonic()
        self.keys: Dict[Optional[str], Tuple[Any, Dict[str, Any]]] = {}
        entries = document.get("keys") if isinstance(document, dict) else None
        for data in entries if isinstance(entries, list) else []:
            if not isinstance(data, dict) or not isinstance(data.get("kty"), str) \
                    or data["kty"] not in _FAMILY or data.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(data)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue
            kid = data["kid"] if isinstance(data.get("kid"), str) else None
            self.keys.setdefault(kid, (key.key, data))

    def find(self, kid: Optional[str], alg: str) -> Any:
        if kid is None:   # no kid: only when exactly one key fits
            fitting = [e for e in self.keys.values() if _fits(e[1], alg)]
            entry = fitting[0] if len(fitting) == 1 else None
        else:
            entry = self.keys.get(kid)
        return entry[0] if entry is not None and _fits(entry[1], alg) else None


def _fits(data: Dict[str, Any], alg: str) -> bool:
    # An RSA key never verifies an ES256 signature, whatever the header claims.
    return data.get("alg", alg) == alg and alg in _FAMILY.get(str(data.get("kty")), ())


class JWTAnswers:
    def __init__(self, issuer: str, audience: str, jwks_url: Optional[str], fetch: Fetch,
                 log: Any = None):
        self.issuer = issuer
        self.audience = audience
        self._jwks_url = jwks_url
        self._fetch = fetch
        self._log = log
        self._lock = threading.Lock()
        self._keys: Optional[_KeySet] = None
        self._last_fetch = -REFRESH_INTERVAL

    def claims(self, body: bytes, now: Optional[float] = None) -> Dict[str, Any]:
        """The RFC 7662 answer inside a signed answer; AnswerRejected when unbelievable."""
        text = body.decode("ascii", "replace").strip()
        try:
            header = jwt.get_unverified_header(text)
        except jwt.PyJWTError:
            raise AnswerRejected("signed answer is not a JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        # RFC 7515 4.1.9: "application/" may be left out of typ, or not.
        if str(header.get("typ", "")).lower() not in (TYP, "application/" + TYP):
            raise AnswerRejected("signed answer's typ is not " + TYP)
        if not isinstance(alg, str) or alg not in ALGORITHMS \
                or (kid is not None and not isinstance(kid, str)):
            raise AnswerRejected("signed answer's alg or kid is not acceptable")
        key = self._key(kid, alg)
        try:
            # The leeway lets the server's clock run ahead; the iat window follows.
            payload = jwt.decode(text, key, algorithms=[alg], issuer=self.issuer,
                                 audience=self.audience, leeway=IAT_WINDOW,
                                 options={"require": ["iss", "aud", "iat"]})
        except jwt.PyJWTError as err:
            raise AnswerRejected("signed answer failed verification: %s" % err) from None
        iat = payload.get("iat")
        if not isinstance(iat, (int, float)) or abs((now or time.time()) - iat) > IAT_WINDOW:
            raise AnswerRejected("signed answer's iat is not recent")
        inner = payload.get("token_introspection")
        if not isinstance(inner, dict):
            raise AnswerRejected("signed answer has no token_introspection object")
        return dict(inner, **{JWT_KEY: text})

    def _jwks_location(self) -> str:
        if self._jwks_url:
            return self._jwks_url
        # Discovered once from the issuer's metadata (RFC 8414, then OpenID discovery).
        parts = urlsplit(self.issuer)
        origin, path = "%s://%s" % (parts.scheme, parts.netloc), parts.path.rstrip("/")
        for where in (origin + "/.well-known/oauth-authorization-server" + path,
                      origin + path + "/.well-known/openid-configuration"):
            status, body = self._fetch(where, {"Accept": "application/json"}, MAX_JWKS_BYTES)
            meta = _json(body) if status == 200 else None
            if isinstance(meta, dict) and meta.get("issuer") == self.issuer \
                    and isinstance(meta.get("jwks_uri"), str):
                self._jwks_url = meta["jwks_uri"]
                return self._jwks_url
        raise AnswerRejected("no metadata of the issuer names a jwks_uri; set jwks_url")

    def _key(self, kid: Optional[str], alg: str) -> Any:
        keys = self._keys
        if keys is not None and time.monotonic() - keys.fetched < JWKS_MAX_AGE:
            key = keys.find(kid, alg)
            if key is not None:
                return key
        with self._lock:
            keys = self._keys
            key = keys.find(kid, alg) if keys is not None and \
                time.monotonic() - keys.fetched < JWKS_MAX_AGE else None
            # Unknown kid or stale set: fetch, but never more often than REFRESH_INTERVAL.
            if key is None and time.monotonic() - self._last_fetch >= REFRESH_INTERVAL:
                self._last_fetch = time.monotonic()
                status, body = self._fetch(self._jwks_location(),
                                           {"Accept": "application/json"}, MAX_JWKS_BYTES)
                if status == 200:
                    keys = self._keys = _KeySet(_json(body))
                elif self._log is not None:
                    self._log.warn("JWKS answered HTTP %d; keeping the keys we have" % status)
                key = keys.find(kid, alg) if keys is not None else None
            elif key is None and keys is not None:
                key = keys.find(kid, alg)   # stale, but refreshed a moment ago
        if key is None:
            raise AnswerRejected("no key of the issuer fits the signed answer (kid %r)"
                                 % str(kid)[:64])
        return key


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
