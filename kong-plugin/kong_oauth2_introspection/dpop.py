"""DPoP-bound access tokens (RFC 9449) at the resource server.

When the introspection answer binds the token to a key (``cnf.jkt``), the
request must carry ``Authorization: DPoP <token>`` and one ``DPoP`` header: a
JWT (``typ`` dpop+jwt, asymmetric ``alg``, the public ``jwk`` in its header)
signed by that key, whose RFC 7638 thumbprint is ``jkt``, with ``htm`` the
request's method, ``htu`` its URL (no query, no fragment), ``iat`` within
``dpop_proof_lifetime`` seconds, ``ath`` the token's SHA-256, and a ``jti``
never seen before. ``ReplayStore`` remembers each accepted ``jti`` for the
proof lifetime: in the shared Redis when there is one (``SET NX``, so once
across the cluster; Redis unreachable refuses the proof), in process otherwise.

``proof_of_possession_dpop`` (openid-connect's name): ``off`` ignores binding,
``optional`` checks bound tokens, ``strict`` also refuses tokens that are not bound.
"""

import hashlib
import json
import threading
import time
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

import jwt
from cachetools import TTLCache
from jwt.utils import base64url_encode

from .jwks import ALGORITHMS   # what a proof may be signed with (our challenges say so too)
from .request import IncomingRequest
from .tokens import Found, from_header

FUTURE_SKEW = 60   # seconds a proof's iat may be ahead of our clock
MAX_PROOF_BYTES = 8192
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ProofRejected(Exception):
    """The request's proof does not show possession; the text is safe to log."""


def thumbprint(jwk: Dict[str, Any]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, no whitespace."""
    kty = jwk.get("kty")
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
               "OKP": ("crv", "kty", "x")}.get(kty if isinstance(kty, str) else "")
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise ProofRejected("proof key is not an EC, RSA or OKP public key")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"),
                           sort_keys=True)
    return base64url_encode(hashlib.sha256(canonical.encode()).digest()).decode("ascii")


def bound_key(claims: Dict[str, Any]) -> Optional[str]:
    cnf = claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return jkt if isinstance(jkt, str) and jkt else None


def find_token(req: IncomingRequest) -> Optional[Found]:
    """``Authorization: DPoP <token>`` (the scheme RFC 9449 section 7.1 names)."""
    return from_header(req, "authorization", ("dpop",))


def _same_url(htu: Any, url: str) -> bool:
    """RFC 9449 4.3: compare without query and fragment, scheme and host case-insensitive,
    default ports implied."""
    if not isinstance(htu, str):
        return False

    def norm(text: str) -> Tuple[str, str, Optional[int], str]:
        p = urlsplit(text)
        scheme = p.scheme.lower()
        return scheme, (p.hostname or ""), p.port or _DEFAULT_PORTS.get(scheme), p.path or "/"
    try:
        return norm(htu) == norm(url)
    except ValueError:
        return False


class ReplayStore:
    """Each proof ``jti`` once: in Redis across the cluster, else in this process."""

    def __init__(self, redis: Any = None, maxsize: int = 100_000, ttl: float = 300):
        self.redis = redis
        self._lock = threading.Lock()
        self._seen: TTLCache = TTLCache(maxsize=maxsize, ttl=ttl)

    def first_use(self, key: str, ttl: float) -> bool:
        """True the first time ``key`` is offered; raises ProofRejected when it cannot tell."""
        if self.redis is not None:
            fresh = self.redis.claim_once("dpop:" + key, ttl)
            if fresh is None:
                raise ProofRejected("replay store unavailable")
            return bool(fresh)
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = True
            return True


class DPoPVerifier:
    def __init__(self, lifetime: float, replays: ReplayStore):
        self.lifetime = lifetime
        self.replays = replays

    def verify(self, proofs: Any, token: str, jkt: str, method: str, url: str,
               now: Optional[float] = None) -> None:
        if not isinstance(proofs, list) or len(proofs) != 1 or not isinstance(proofs[0], str):
            raise ProofRejected("exactly one DPoP header is required")
        proof = proofs[0].strip()
        if len(proof) > MAX_PROOF_BYTES:
            raise ProofRejected("proof too large")
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError:
            raise ProofRejected("proof is not a JWT") from None
        alg, jwk = header.get("alg"), header.get("jwk")
        if header.get("typ") != "dpop+jwt" or not isinstance(alg, str) \
                or alg not in ALGORITHMS or not isinstance(jwk, dict):
            raise ProofRejected("proof header must carry typ dpop+jwt, an asymmetric alg "
                                "and a jwk")
        if "d" in jwk or any(k in jwk for k in ("p", "q", "dp", "dq", "qi")):
            raise ProofRejected("proof jwk holds a private key")
        if thumbprint(jwk) != jkt:
            raise ProofRejected("proof key is not the key the token is bound to")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
            # The leeway lets a client clock run ahead; our own window check follows.
            claims = jwt.decode(proof, key, algorithms=[alg], leeway=FUTURE_SKEW,
                                options={"require": ["iat", "jti"], "verify_aud": False})
        except (jwt.PyJWTError, ValueError, TypeError) as err:
            raise ProofRejected("proof failed verification: %s" % type(err).__name__) from None
        if claims.get("htm") != method:
            raise ProofRejected("proof htm is not the request method")
        if not _same_url(claims.get("htu"), url):
            raise ProofRejected("proof htu is not the request URL")
        iat = claims["iat"]
        current = time.time() if now is None else now
        if not isinstance(iat, (int, float)) or iat > current + FUTURE_SKEW \
                or iat < current - self.lifetime:
            raise ProofRejected("proof iat outside the accepted window")
        ath = base64url_encode(hashlib.sha256(token.encode("ascii")).digest()).decode("ascii")
        if claims.get("ath") != ath:
            raise ProofRejected("proof ath is not the hash of the access token")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise ProofRejected("proof jti missing")
        # Keyed by the key's thumbprint too: one client cannot burn another's jti.
        replay_key = hashlib.sha256(("%s\0%s" % (jkt, jti)).encode()).hexdigest()
        if not self.replays.first_use(replay_key, self.lifetime + FUTURE_SKEW):
            raise ProofRejected("proof jti already used")
