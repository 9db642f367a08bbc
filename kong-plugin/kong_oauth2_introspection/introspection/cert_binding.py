"""Certificate-bound access tokens (RFC 8705 section 3).

An introspection answer with ``cnf["x5t#S256"]`` binds the token to one client
certificate: the request must come over mutual TLS with that certificate, whose
DER SHA-256, base64url-encoded, equals the claim. The certificate is read with
``kong.client.tls.get_full_client_certificate_chain`` (one PDK call, made only
for a bound token, or for every token under ``strict``). Kong asks clients for
a certificate only when told to (``nginx_proxy_ssl_verify_client =
optional_no_ca`` in kong.conf, or a plugin calling
``kong.client.tls.request_client_certificate``).

``proof_of_possession_mtls`` (openid-connect's name): ``off`` ignores binding,
``optional`` checks bound tokens, ``strict`` also refuses tokens that are not bound.
"""

import hashlib
from typing import Any, Dict, Optional

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from jwt.utils import base64url_encode

CLAIM = "x5t#S256"


def bound_thumbprint(claims: Dict[str, Any]) -> Optional[str]:
    cnf = claims.get("cnf")
    value = cnf.get(CLAIM) if isinstance(cnf, dict) else None
    return value if isinstance(value, str) and value else None


def certificate_thumbprint(chain: Any) -> Optional[str]:
    """x5t#S256 of the first certificate of a PEM chain; None when there is none."""
    if not isinstance(chain, str) or "-----BEGIN CERTIFICATE-----" not in chain:
        return None
    try:
        # load_pem_x509_certificate reads the first certificate: the client's own.
        cert = x509.load_pem_x509_certificate(chain.encode("ascii", "replace"))
    except ValueError:
        return None
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    return base64url_encode(digest).decode("ascii")


def matches(claims: Dict[str, Any], chain: Any) -> bool:
    expected = bound_thumbprint(claims)
    presented = certificate_thumbprint(chain)
    return expected is not None and presented is not None and presented == expected
