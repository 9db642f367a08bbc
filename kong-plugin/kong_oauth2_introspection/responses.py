"""The answers the plugin gives a client it refuses, per RFC 6750 section 3."""

from typing import Dict, NamedTuple

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
