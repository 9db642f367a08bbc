"""An issuer's signing keys (a JWKS), as both plugins check signatures with them.

Only asymmetric algorithms are accepted: the gateway holds no shared secret with
the issuer, and ``none`` is never valid. A key is picked by ``kid`` (without one,
only when exactly one key fits) and must fit the algorithm: its own ``alg`` when
it names one, else its family (an RSA key never verifies an ES256 signature,
whatever the JWT header claims).

``Keys`` fetches the set on first use, again when it is older than
``JWKS_MAX_AGE`` or lacks the ``kid`` asked for (a key rotation), but never more
often than ``REFRESH_INTERVAL``, whatever the JWTs name. A failed fetch keeps the
keys it had. Fetches block: callers run on worker threads.
"""

import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple, Type

import jwt

JWKS_MAX_AGE = 300.0
REFRESH_INTERVAL = 1.0
FAMILIES = {"RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
            "EC": ("ES256", "ES384", "ES512"),
            "OKP": ("EdDSA",)}
ALGORITHMS = frozenset(alg for algs in FAMILIES.values() for alg in algs)


def fits(data: Dict[str, Any], alg: str) -> bool:
    if "alg" in data and data["alg"] != alg:
        return False
    kty = data.get("kty")
    return alg in FAMILIES.get(kty if isinstance(kty, str) else "", ())


class KeySet:
    """One fetched JWKS document: its signing keys by ``kid``."""

    def __init__(self, document: Any, fetched: float):
        self.fetched = fetched
        self.by_kid: Dict[Optional[str], Tuple[jwt.PyJWK, Dict[str, Any]]] = {}
        entries = document.get("keys") if isinstance(document, dict) else None
        for data in entries if isinstance(entries, list) else []:
            if not isinstance(data, dict) or not isinstance(data.get("kty"), str) \
                    or data["kty"] not in FAMILIES or data.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(data)
            except (jwt.PyJWTError, ValueError, TypeError):
                continue   # a key PyJWT cannot use: not one to pick
            kid = data["kid"] if isinstance(data.get("kid"), str) else None
            self.by_kid.setdefault(kid, (key, data))

    def find(self, kid: Optional[str], alg: str) -> Optional[jwt.PyJWK]:
        if kid is None:   # no kid: acceptable only when one key could have signed it
            fitting = [e for e in self.by_kid.values() if fits(e[1], alg)]
            entry = fitting[0] if len(fitting) == 1 else None
        else:
            entry = self.by_kid.get(kid)
        return entry[0] if entry is not None and fits(entry[1], alg) else None


class Keys:
    """The keys of one issuer, kept and refetched as the module says.

    ``unavailable``: what ``fetch`` raises when the set cannot be had; with keys
    at hand it is logged and they are kept, else it reaches the caller."""

    def __init__(self, unavailable: Tuple[Type[Exception], ...], log: Any = None):
        self.unavailable = unavailable
        self.log = log
        self._lock = threading.Lock()   # one fetch at a time
        self._set: Optional[KeySet] = None
        self._last_fetch = -REFRESH_INTERVAL

    def find(self, kid: Optional[str], alg: str,
             fetch: Callable[[], Any]) -> Optional[jwt.PyJWK]:
        """The key for ``kid`` and ``alg``, fetching the set (``fetch()`` returns the
        JWKS document) when needed and allowed; None when no key fits."""
        keys = self._set
        if keys is not None and time.monotonic() - keys.fetched < JWKS_MAX_AGE:
            key = keys.find(kid, alg)
            if key is not None:
                return key
        with self._lock:
            keys = self._set
            fresh = keys is not None and time.monotonic() - keys.fetched < JWKS_MAX_AGE
            key = keys.find(kid, alg) if fresh and keys is not None else None
            if key is None and time.monotonic() - self._last_fetch >= REFRESH_INTERVAL:
                self._last_fetch = time.monotonic()
                try:
                    keys = self._set = KeySet(fetch(), time.monotonic())
                except self.unavailable as err:
                    if keys is None:
                        raise
                    if self.log is not None:
                        self.log.warn("JWKS could not be fetched again (%s); keeping the "
                                      "keys we have" % err)
                key = keys.find(kid, alg)
            elif key is None and keys is not None:
                key = keys.find(kid, alg)   # stale, but refetched a moment ago
        return key
