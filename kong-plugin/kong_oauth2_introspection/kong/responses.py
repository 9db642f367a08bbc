"""The answers the plugin gives a client it refuses, per RFC 6750 section 3."""

from typing import Dict, NamedTuple, Optional

from ..idp.jwks import FAMILIES

REALM = 'Bearer realm="service"'


class Refusal(NamedTuple):
    status: int
    body: Dict[str, str]
    headers: Dict[str, str]


def _bearer(status: int, error: str, description: str) -> Refusal:
    # RFC 6750 section 3: auth-params are comma-separated; quotes cannot occur in our texts.
    challenge = f'{REALM}, error="{error}", error_description="{description}"'
    return Refusal(status, {"error": error, "error_description": description},
                   {"WWW-Authenticate": challenge})


# Same body and challenge as the Enterprise plugin for a request without a token.
MISSING_TOKEN = Refusal(401, {"error": "invalid_request",
                              "error_description": "The access token is missing"},
                        {"WWW-Authenticate": REALM})
INVALID_TOKEN = _bearer(401, "invalid_token", "The access token is invalid or has expired")
# RFC 6750 3.1: a token sent twice, or a request too large to inspect safely.
BAD_REQUEST = _bearer(400, "invalid_request", "The request is malformed")
INSUFFICIENT_SCOPE = _bearer(403, "insufficient_scope",
                             "The access token does not grant access to this resource")
# Never the IdP's words: what went wrong is in the log, not in the answer.
SERVER_ERROR = Refusal(500, {"message": "An unexpected error occurred"}, {})


def _with_params(refusal: Refusal, params: str) -> Refusal:
    challenge = refusal.headers["WWW-Authenticate"] + params
    return refusal._replace(headers=dict(refusal.headers, **{"WWW-Authenticate": challenge}))


class Answers:
    """One config's refusals: the constants above, plus the auth-params that config
    adds to every challenge (RFC 9728 ``resource_metadata``) and the ``scope`` a
    failed ``scopes_required`` names (RFC 6750 section 3)."""

    def __init__(self, metadata_url: Optional[str] = None, scope: Optional[str] = None,
                 dpop: str = "off"):
        # Our URLs and scope tokens hold no quote or backslash (config checks it).
        params = f', resource_metadata="{metadata_url}"' if metadata_url else ""
        # RFC 9449 section 7.1: DPoP challenges name the algorithms proofs may use.
        dpop_challenge = f'DPoP algs="{DPOP_ALGS}"' + params
        self.INVALID_DPOP_PROOF = _dpop(dpop_challenge, "invalid_dpop_proof",
                                        "The DPoP proof is missing or invalid")
        self.DPOP_BOUND = _dpop(dpop_challenge, "invalid_token",
                                "The access token must be sent with a DPoP proof")
        self.MISSING_TOKEN = _with_params(MISSING_TOKEN, params)
        self.INVALID_TOKEN = _with_params(INVALID_TOKEN, params)
        self.BAD_REQUEST = _with_params(BAD_REQUEST, params)
        self.INSUFFICIENT_SCOPE = _with_params(INSUFFICIENT_SCOPE, params)
        self.MISSING_SCOPE = _with_params(INSUFFICIENT_SCOPE, (
            f', scope="{scope}"' if scope else "") + params)
        self.SERVER_ERROR = SERVER_ERROR
        if dpop == "strict":   # only DPoP-bound tokens: the challenge says which scheme
            self.MISSING_TOKEN = MISSING_TOKEN._replace(
                headers={"WWW-Authenticate": dpop_challenge})
            self.INVALID_TOKEN = self.DPOP_BOUND


# The asymmetric algorithms a DPoP proof may use, EC first (the common choice).
DPOP_ALGS = " ".join(FAMILIES["EC"] + FAMILIES["RSA"] + FAMILIES["OKP"])


def _dpop(challenge: str, error: str, description: str) -> Refusal:
    header = f'{challenge}, error="{error}", error_description="{description}"'
    return Refusal(401, {"error": error, "error_description": description},
                   {"WWW-Authenticate": header})
