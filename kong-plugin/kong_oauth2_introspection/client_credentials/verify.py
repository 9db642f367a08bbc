"""Checking an issued access token (a JWT) before any of its claims is used.

The signature is checked against the authorization server's JWKS (fetched
once, kept ``JWKS_MAX_AGE`` seconds, fetched again at once when a token names
an unknown ``kid``, at most every ``REFRESH_INTERVAL`` seconds), then ``exp``
(required), ``nbf``, ``aud`` (must hold the configured audience) and ``iss``
(the configured or discovered issuer), with PyJWT. Only asymmetric algorithms
are accepted: the gateway holds no shared secret, and ``none`` is never valid.
"""

import threading
import time
from typing import Any, Dict, Optional, Tuple

import jwt

from ..concurrency import Deadline
from .authserver import AuthServer, ServerError
from .config import Config

JWKS_MAX_AGE = 300.0
REFRESH_INTERVAL = 1.0
LEEWAY = 5   # seconds of clock difference tolerated between the server and Kong
_FAMILIES = {"RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
             "EC": ("ES256", "ES384", "ES512"),
             "OKP": ("EdDSA",)}
ALGORITHMS = frozenset(alg for algs in _FAMILIES.values() for alg in algs)


class TokenInvalid(Exception):
    """The token failed a check; the text names the check, never the token."""


class _Keys:
    def __init__(self, jwks: Dict[str, Any], fetched_at: float):
        self.fetched_at = fetched_at
        self.by_kid: Dict[Optional[str], Tuple[jwt.PyJWK, Dict[str, Any]]] = {}
        for data in jwks.get("keys", []):
            if not isinstance(data, dict) or data.get("kty") not in _FAMILIES \
                    or data.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(data)
            except jwt.PyJWTError:
                continue   # a key type PyJWT cannot use: not one of ours to pick
            kid = data.get("kid") if isinstance(data.get("kid"), str) else None
            self.by_kid.setdefault(kid, (key, data))

    def find(self, kid: Optional[str], alg: str) -> Optional[jwt.PyJWK]:
        if kid is not None:
            found = self.by_kid.get(kid)
        else:   # no kid: acceptable only when one key could have signed it
            fitting = [k for k in self.by_kid.values() if _fits(k[1], alg)]
            found = fitting[0] if len(fitting) == 1 else None
        if found is None or not _fits(found[1], alg):
            return None
        return found[0]


def _fits(data: Dict[str, Any], alg: str) -> bool:
    # A key names its algorithm, or at least its family: an RSA key never
    # verifies an ES256 signature, whatever the token header claims.
    if data.get("alg") is not None and data.get("alg") != alg:
        return False
    return alg in _FAMILIES.get(data.get("kty", ""), ())


class Verifier:
    def __init__(self, conf: Config, server: AuthServer, log: Any = None):
        self.conf = conf
        self.server = server
        self.log = log
        self._lock = threading.Lock()      # one metadata or JWKS fetch at a time
        self._endpoints: Optional[Tuple[str, str]] = (
            (conf.issuer, conf.jwks_url) if conf.issuer and conf.jwks_url else None)
        self._keys: Optional[_Keys] = None
        self._last_fetch = -REFRESH_INTERVAL

    def verify(self, token: str, deadline: Optional[Deadline]) -> Dict[str, Any]:
        """The claims of ``token``; raises TokenInvalid, or ServerError when the
        keys cannot be had."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid("the access token is not a JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise TokenInvalid("the access token's algorithm %r is not accepted"
                               % str(alg)[:20])
        if kid is not None and not isinstance(kid, str):
            raise TokenInvalid("the access token's kid is not a string")
        issuer, _ = self.endpoints(deadline)
        key = self._key(kid, alg, deadline)
        try:
            claims = jwt.decode(token, key.key, algorithms=[alg], audience=self.conf.audience,
                                issuer=issuer, leeway=LEEWAY,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as err:
            # PyJWT's texts name the failed check ("Signature has expired").
            raise TokenInvalid("the access token failed verification: %s" % err) from None
        if not isinstance(claims, dict):
            raise TokenInvalid("the access token's payload is not an object")
        return claims

    def endpoints(self, deadline: Optional[Deadline]) -> Tuple[str, str]:
        """(issuer, JWKS URL): configured, or discovered once."""
        found = self._endpoints
        if found is not None:
            return found
        with self._lock:
            if self._endpoints is None:
                meta = self.server.metadata(deadline)
                jwks_url = self.conf.jwks_url or meta.get("jwks_uri")
                if not isinstance(jwks_url, str) or not jwks_url.lower().startswith("http"):
                    raise ServerError("the server metadata has no jwks_uri; set config.jwks_url")
                self._endpoints = (self.conf.issuer or meta["issuer"], jwks_url)
            return self._endpoints

    def _key(self, kid: Optional[str], alg: str, deadline: Optional[Deadline]) -> jwt.PyJWK:
        keys = self._keys
        now = time.monotonic()
        if keys is not None and now - keys.fetched_at < JWKS_MAX_AGE:
            key = keys.find(kid, alg)
            if key is not None:
                return key
        with self._lock:
            keys = self._keys
            fresh = keys is not None and time.monotonic() - keys.fetched_at < JWKS_MAX_AGE
            key = keys.find(kid, alg) if fresh and keys is not None else None
            # An unknown kid may be a rotated key: fetch again, but not at every
            # request that names one.
            if key is None and time.monotonic() - self._last_fetch >= REFRESH_INTERVAL:
                self._last_fetch = time.monotonic()
                _, url = self._endpoints or (None, self.conf.jwks_url)
                try:
                    keys = self._keys = _Keys(self.server.jwks(str(url), deadline),
                                              time.monotonic())
                except ServerError:
                    if keys is None:
                        raise
                    if self.log is not None:   # keep verifying with the keys we have
                        self.log.warn("JWKS could not be fetched again; using the "
                                      "previous keys")
                key = keys.find(kid, alg)
            elif key is None and keys is not None:
                key = keys.find(kid, alg)
        if key is None:
            raise TokenInvalid("no key of the authorization server fits the access token "
                               "(kid %r, %s)" % (str(kid)[:64], alg))
        return key
