"""Signed introspection answers (RFC 9701, JWT Response for OAuth Token Introspection).

Asked for with ``Accept: application/token-introspection+jwt``, the server answers
a JWT whose ``token_introspection`` claim is the RFC 7662 answer. Before that
claim is believed: the ``typ`` header must be ``token-introspection+jwt``, the
signature must verify with a key of the server's JWKS (asymmetric algorithms
only), ``iss`` must be the configured issuer, ``aud`` the plugin's ``client_id``
and ``iat`` at most ``max_age`` seconds old (``CLOCK_SKEW`` ahead). Nothing in
an answer names the token it is about, so a recorded answer would vouch for any
token: each answer is accepted once, by its ``jti`` (without one, by the SHA-256
of the whole JWT), in the replay store DPoP proofs use (Redis when the config has
a store: once across the cluster). Any failure is the server's failure (the
request gets 500, nothing is cached), never an inactive token.

The JWKS is kept and fetched again as ``jwks.Keys`` does for both plugins (a key
rotation is found at once, at most once every ``REFRESH_INTERVAL`` seconds). The
code here runs on the cache's worker threads: it may block.
"""

import hashlib
import json
import time
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlsplit

import jwt

from ..idp.jwks import ALGORITHMS, Keys

MEDIA_TYPE = "application/token-introspection+jwt"
TYP = "token-introspection+jwt"
CLOCK_SKEW = 60          # seconds the IdP's clock may run ahead (introspection.CLOCK_SKEW)
MAX_JWKS_BYTES = 256 * 1024

# Where the verified JWT rides along with the claims it carries, for the
# phantom-token header: a name no claim path or header template can spell.
JWT_KEY = "\x00introspection-jwt"


class AnswerRejected(Exception):
    """A signed answer that cannot be believed; the text names the check only."""


# (url, headers, max_bytes) -> (status, body): a GET on the introspection client
Fetch = Callable[[str, Dict[str, str], int], Tuple[int, bytes]]


class JWTAnswers:
    def __init__(self, issuer: str, audience: str, jwks_url: Optional[str], fetch: Fetch,
                 log: Any = None, max_age: float = 60):
        self.issuer = issuer
        self.audience = audience
        self.max_age = max_age
        # dpop.ReplayStore (``first_use``); set by the runtime once its store is known.
        self.replays: Any = None
        self._jwks_url = jwks_url
        self._fetch = fetch
        self._keys = Keys(unavailable=(AnswerRejected,), log=log)

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
        key = self._keys.find(kid, alg, self._jwks)
        if key is None:
            raise AnswerRejected("no key of the issuer fits the signed answer (kid %r)"
                                 % str(kid)[:64])
        try:
            # The leeway lets the server's clock run ahead; the iat window follows.
            payload = jwt.decode(text, key.key, algorithms=[alg], issuer=self.issuer,
                                 audience=self.audience, leeway=CLOCK_SKEW,
                                 options={"require": ["iss", "aud", "iat"]})
        except jwt.PyJWTError as err:
            raise AnswerRejected("signed answer failed verification: %s" % err) from None
        except RecursionError:
            raise AnswerRejected("signed answer nested too deeply") from None
        iat = payload.get("iat")
        current = time.time() if now is None else now
        if isinstance(iat, bool) or not isinstance(iat, (int, float)) \
                or not current - self.max_age <= iat <= current + CLOCK_SKEW:
            raise AnswerRejected("signed answer's iat is older than %g s or in the future"
                                 % self.max_age)
        inner = payload.get("token_introspection")
        if not isinstance(inner, dict):
            raise AnswerRejected("signed answer has no token_introspection object")
        self._once(payload, text)
        return dict(inner, **{JWT_KEY: text})

    def _once(self, payload: Dict[str, Any], text: str) -> None:
        """AnswerRejected unless this answer is seen for the first time."""
        if self.replays is None:
            return
        jti = payload.get("jti")
        seen = ("jti\0%s\0%s" % (self.issuer, jti) if isinstance(jti, str) and jti
                else "jwt\0" + text)
        key = hashlib.sha256(("signed-answer\0" + seen).encode("utf-8", "surrogatepass"))
        # Kept as long as the answer could pass the iat check.
        try:
            fresh = self.replays.first_use(key.hexdigest(), self.max_age + CLOCK_SKEW)
        except Exception as err:   # noqa: BLE001 - the store's "cannot tell": refuse
            raise AnswerRejected("replay store unavailable (%s)" % type(err).__name__) from None
        if not fresh:
            raise AnswerRejected("signed answer replayed (its %s was accepted before)"
                                 % ("jti" if seen.startswith("jti") else "JWT"))

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

    def _jwks(self) -> Any:
        status, body = self._fetch(self._jwks_location(), {"Accept": "application/json"},
                                   MAX_JWKS_BYTES)
        if status != 200:
            raise AnswerRejected("JWKS answered HTTP %d" % status)
        return _json(body)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
