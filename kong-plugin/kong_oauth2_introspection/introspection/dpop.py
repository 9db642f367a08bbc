"""DPoP-bound access tokens (RFC 9449) at the resource server.

When the introspection answer binds the token to a key (``cnf.jkt``), the
request must carry ``Authorization: DPoP <token>`` and one ``DPoP`` header: a
JWT (``typ`` dpop+jwt, asymmetric ``alg``, the public ``jwk`` in its header)
signed by that key, whose RFC 7638 thumbprint is ``jkt``, with ``htm`` the
request's method, ``htu`` its URL (no query, no fragment), ``iat`` within
``dpop_proof_lifetime`` seconds, ``ath`` the token's SHA-256, and a ``jti``
never seen before for that key and URL. ``ReplayStore`` remembers each accepted
``jti`` for the proof lifetime: in the shared Redis when there is one (``SET NX``,
so once across the cluster; Redis unreachable refuses the proof), else in one
memory shared by every config of the process, which never forgets an unexpired
proof and refuses new ones while full.

``proof_of_possession_dpop`` (openid-connect's name): ``off`` ignores binding,
``optional`` checks bound tokens, ``strict`` also refuses tokens that are not bound.
"""

import hashlib
import heapq
import json
import math
import os
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import urlsplit

import jwt
from jwt.utils import base64url_encode

from .. import node
from ..cache import replays
from ..ops import metrics
from ..idp.jwks import ALGORITHMS
from ..ops.log import LOG
from ..kong.request import IncomingRequest
from .tokens import Found, from_header

FUTURE_SKEW = 60   # seconds a proof's iat may be ahead of our clock
MAX_PROOF_BYTES = 8192
_DEFAULT_PORTS = {"http": 80, "https": 443}
# In-process replay memory (no Redis): how many unexpired proofs it holds, shared
# by every config of the server (about 110 MB when full at the default).
CAPACITY_ENV = "OAUTH2_INTROSPECTION_REPLAY_CAPACITY"
DEFAULT_CAPACITY = 1_000_000


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

    try:
        return _normal_url(htu) == _normal_url(url)
    except ValueError:
        return False


def _normal_url(text: str) -> Tuple[str, str, Optional[int], str]:
    p = urlsplit(text)
    scheme = p.scheme.lower()
    return scheme, (p.hostname or ""), p.port or _DEFAULT_PORTS.get(scheme), p.path or "/"


class Remembered:
    """Keys remembered until their own expiry, never forgotten earlier: a fixed
    capacity, and when it is reached new keys are refused rather than old ones
    evicted (evicting one would let its proof replay).

    About 110 bytes per key (a 16-byte digest in a set, plus its slot in a
    per-second expiry bucket). Expiries are rounded up to the next second, so a
    key is kept up to a second longer than asked, never shorter.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._keys: Set[bytes] = set()
        self._buckets: Dict[int, List[bytes]] = {}
        self._seconds: List[int] = []   # heap of the buckets' seconds
        self._full = False              # logged once per episode of being full

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: bytes, ttl: float, now: Optional[float] = None) -> Optional[bool]:
        """True: ``key`` is new and now remembered; False: it was there; None: full."""
        current = time.time() if now is None else now
        with self._lock:
            self._expire(current)
            if key in self._keys:
                return False
            if len(self._keys) >= self.capacity:
                if not self._full:
                    self._full = True
                    LOG.err("DPoP replay store full (%d proofs): new proofs are refused "
                            "until older ones expire" % self.capacity)
                metrics.replay_store_full()
                return None
            self._full = False
            second = math.ceil(current + ttl)
            bucket = self._buckets.get(second)
            if bucket is None:
                bucket = self._buckets[second] = []
                heapq.heappush(self._seconds, second)
            bucket.append(key)
            self._keys.add(key)
            return True

    def _expire(self, now: float) -> None:
        seconds, keys = self._seconds, self._keys
        while seconds and seconds[0] <= now:
            for key in self._buckets.pop(heapq.heappop(seconds)):
                keys.discard(key)


def _capacity() -> int:
    text = os.environ.get(CAPACITY_ENV, "").strip()
    try:
        value = int(text) if text else DEFAULT_CAPACITY
    except ValueError:
        value = 0
    if value < 1:
        LOG.err("%s=%r is not a positive integer; using %d" % (CAPACITY_ENV, text,
                                                               DEFAULT_CAPACITY))
        value = DEFAULT_CAPACITY
    return value


_PROCESS: Optional[Any] = None
_PROCESS_LOCK = threading.Lock()


def process_replays() -> Any:
    """The one store every config of this server shares (built on first use, so a
    config change or a second config does not start from an empty memory): with
    several processes, the node's (a proof replayed to another process is still
    seen), else this process's ``Remembered``."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None or getattr(_PROCESS, "pid", os.getpid()) != os.getpid():
            directory = node.directory()
            if directory is not None:
                _PROCESS = replays.for_node(directory, _capacity())
            else:
                _PROCESS = Remembered(_capacity())
            metrics.replay_store_size(lambda: len(_PROCESS or ()))
        return _PROCESS


class ReplayStore:
    """Each key (a proof's, or a signed answer's ``jti``) once: in Redis across the
    cluster when ``redis`` is given, else in this process's shared ``Remembered``
    (``maxsize``: a private one of that capacity instead, for tests)."""

    def __init__(self, redis: Any = None, maxsize: Optional[int] = None,
                 ttl: Optional[float] = None):
        self.redis = redis
        self._memory = Remembered(maxsize) if maxsize is not None else None
        del ttl   # each call passes its own lifetime; kept for callers that name it

    @property
    def memory(self) -> Remembered:
        return self._memory if self._memory is not None else process_replays()

    def first_use(self, key: str, ttl: float) -> bool:
        """True the first time ``key`` is offered within ``ttl`` seconds; raises
        ProofRejected when it cannot tell (Redis unreachable, or the in-process store
        full): a replay check that cannot remember must refuse."""
        if self.redis is not None:
            fresh = self.redis.claim_once("dpop:" + key, ttl)
            if fresh is None:
                raise ProofRejected("replay store unavailable")
            return bool(fresh)
        digest = hashlib.sha256(key.encode()).digest()[:16]
        added = self.memory.add(digest, ttl)
        if added is None:
            raise ProofRejected("replay store full")
        return added


# The longest proof lifetime of any config this process built: a proof used on a
# short-lived config is remembered as long as a long-lived one would accept it.
_longest = 0.0


class DPoPVerifier:
    def __init__(self, lifetime: float, replays: ReplayStore):
        global _longest
        self.lifetime = lifetime
        self.replays = replays
        _longest = max(_longest, lifetime)

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
        # Once per key and URL (RFC 9449 11.1), whichever config checks it: keyed by
        # the thumbprint so that one client cannot burn another's jti.
        replay_key = hashlib.sha256(json.dumps([jkt, _normal_url(url), jti]).encode()
                                    ).hexdigest()
        if not self.replays.first_use(replay_key, max(self.lifetime, _longest) + FUTURE_SKEW):
            raise ProofRejected("proof jti already used")
