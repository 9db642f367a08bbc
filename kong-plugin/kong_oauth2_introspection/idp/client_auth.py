"""How the plugin authenticates itself to the authorization server (RFC 7662 section 2.1
leaves it to the server; these are the methods OpenID Connect and RFC 8705 name).

- ``client_secret_basic``: HTTP Basic with the form-encoded id and secret (RFC 6749 2.3.1);
- ``client_secret_post``: id and secret as form fields;
- ``client_secret_jwt`` / ``private_key_jwt`` (RFC 7523 section 2.2): a fresh signed
  assertion per request, unique ``jti``, ``exp`` a minute ahead, signed with the
  secret (HMAC) or a configured private key (JWK);
- ``tls_client_auth`` (RFC 8705 section 2): the ``client_tls`` certificate
  authenticates; only ``client_id`` goes in the form.

Without a method the static ``authorization_value`` header is sent, as before.
"""

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple
from urllib.parse import quote

import jwt

from ..schema import is_reference

METHODS = ("client_secret_basic", "client_secret_post", "client_secret_jwt",
           "private_key_jwt", "tls_client_auth")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 60  # seconds: long enough for one request and its retries

# A JWK's kty (and curve) when it names no alg.
_DEFAULT_ALG = {"RSA": "RS256", "EC:P-256": "ES256", "EC:P-384": "ES384",
                "EC:P-521": "ES512", "OKP:Ed25519": "EdDSA"}
_HMAC_ALGS = ("HS256", "HS384", "HS512")


class ClientAuthError(ValueError):
    """A client authentication setting that cannot be used; ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def _private_jwk(text: str, alg: Optional[str]) -> Tuple[Any, str, Optional[str]]:
    """(signing key, alg, kid) of a private JWK given as JSON text."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ClientAuthError("client_jwk", "is not JSON") from None
    if not isinstance(data, dict) or "d" not in data:
        raise ClientAuthError("client_jwk", "must be one private JWK (with its private part)")
    kty = str(data.get("kty"))
    chosen = alg or data.get("alg") or _DEFAULT_ALG.get(
        kty if kty == "RSA" else "%s:%s" % (kty, data.get("crv")))
    if not chosen or chosen in _HMAC_ALGS:
        raise ClientAuthError("client_alg", "no asymmetric algorithm fits this key")
    try:
        key = jwt.PyJWK(data, algorithm=chosen)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
        # The message of a key error may quote the key: keep ours.
        raise ClientAuthError("client_jwk", "is not a usable %s key" % chosen) from None
    return key.key, chosen, data.get("kid")


@dataclass(frozen=True)
class ClientAuth:
    method: str
    client_id: str
    secret: str = field(default="", repr=False)
    key: Any = field(default=None, repr=False)   # private key of private_key_jwt
    alg: str = ""
    kid: Optional[str] = None

    @classmethod
    def build(cls, method: str, client_id: Optional[str], secret: Optional[str],
              jwk: Optional[str], alg: Optional[str], has_certificate: bool) -> "ClientAuth":
        if not client_id:
            raise ClientAuthError("client_id", "required by %s" % method)
        if method.startswith("client_secret_") and not secret:
            raise ClientAuthError("client_secret", "required by %s" % method)
        if method == "client_secret_jwt":
            chosen = alg or "HS256"
            if chosen not in _HMAC_ALGS:
                raise ClientAuthError("client_alg", "client_secret_jwt signs with HS256, "
                                      "HS384 or HS512")
            return cls(method, client_id, secret=secret or "", alg=chosen)
        if method == "private_key_jwt":
            if not jwk:
                raise ClientAuthError("client_jwk", "required by private_key_jwt")
            if is_reference(jwk):
                # Only ``check`` sees a vault reference (Kong resolves it before the
                # plugin starts): the key cannot be judged offline.
                return cls(method, client_id, alg=alg or "", kid=None)
            key, chosen, kid = _private_jwk(jwk, alg)
            return cls(method, client_id, key=key, alg=chosen, kid=kid)
        if method == "tls_client_auth" and not has_certificate:
            raise ClientAuthError("client_tls", "tls_client_auth needs client_tls.cert and key")
        return cls(method, client_id, secret=secret or "")

    def identity(self) -> str:
        """What distinguishes this client to the server, for the cache identity."""
        return "%s %s" % (self.method, self.client_id)

    def assertion(self, audience: str) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": audience,
                  "jti": uuid.uuid4().hex, "iat": now, "exp": now + ASSERTION_LIFETIME}
        headers = {"kid": self.kid} if self.kid else None
        key = self.secret if self.method == "client_secret_jwt" else self.key
        if key is None:
            raise ClientAuthError("client_jwk", "is an unresolved vault reference")
        return jwt.encode(claims, key, algorithm=self.alg, headers=headers)

    def apply(self, endpoint: str, form: Dict[str, str], headers: Dict[str, str]) -> None:
        """Add this client's credentials to a request to ``endpoint`` (new dicts given)."""
        if self.method == "client_secret_basic":
            pair = "%s:%s" % (quote(self.client_id, safe=""), quote(self.secret, safe=""))
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            return
        form["client_id"] = self.client_id
        if self.method == "client_secret_post":
            form["client_secret"] = self.secret
        elif self.method in ("client_secret_jwt", "private_key_jwt"):
            # RFC 7523 3: the audience is the server; the endpoint URL names it exactly.
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = self.assertion(endpoint)
