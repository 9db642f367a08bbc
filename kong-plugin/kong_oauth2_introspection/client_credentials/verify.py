"""Checking an issued access token (a JWT) before any of its claims is used.

The signature is checked against the authorization server's JWKS (``jwks.Keys``:
fetched once, kept ``JWKS_MAX_AGE`` seconds, fetched again at once when a token
names an unknown ``kid``, at most every ``REFRESH_INTERVAL`` seconds), then ``exp``
(required), ``nbf``, ``aud`` (must hold the configured audience) and ``iss``
(the configured or discovered issuer), with PyJWT. Only asymmetric algorithms
are accepted: the gateway holds no shared secret, and ``none`` is never valid.
"""

import threading
from typing import Any, Dict, Optional, Tuple

import jwt

from ..concurrency import Deadline
from ..idp.jwks import ALGORITHMS, Keys
from .authserver import AuthServer, ServerError
from .config import Config

LEEWAY = 5   # seconds of clock difference tolerated between the server and Kong


class TokenInvalid(Exception):
    """The token failed a check; the text names the check, never the token."""


class Verifier:
    def __init__(self, conf: Config, server: AuthServer, log: Any = None):
        self.conf = conf
        self.server = server
        self.log = log
        self._lock = threading.Lock()      # one metadata fetch at a time
        self._endpoints: Optional[Tuple[str, str]] = (
            (conf.issuer, conf.jwks_url) if conf.issuer and conf.jwks_url else None)
        self._keys = Keys(unavailable=(ServerError,), log=log)

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
        _, url = self._endpoints or (None, self.conf.jwks_url)
        key = self._keys.find(kid, alg, lambda: self.server.jwks(str(url), deadline))
        if key is None:
            raise TokenInvalid("no key of the authorization server fits the access token "
                               "(kid %r, %s)" % (str(kid)[:64], alg))
        return key
