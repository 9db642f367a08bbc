"""Why a request was refused, told once: one line in Kong's error log and one
value on Kong's log serializer, for both plugins.

Only refusal and error paths come here, so a request that is let through costs
no PDK call for it. A refusal (4xx) is logged at the config's
``refusal_log_level`` (``info`` by default: Kong's own ``log_level`` is
``notice``, so these lines appear only where someone asked for them); an error
answer (5xx) is the operator's problem and is logged at ``err``.

The line names the reason (a fixed identifier, listed in ``REASONS``), a short
detail that never holds a token, a secret or an IdP's body, where the plugin
runs (route, service, or the route Kong matched for a global plugin) and the
keyed credential id (the id Kong logs for an authenticated request, derived
from the token by a keyed hash: it identifies a token without revealing it).
The serializer gets ``<plugin name>.reason``, so Kong's logging plugins carry
it too.
"""

from typing import Any, Dict, Optional

LEVELS = ("debug", "info", "notice", "warn", "err")
DEFAULT_LEVEL = "info"
_MAX_DETAIL = 240

# Every reason either plugin gives, and what it means (the README's
# Troubleshooting table says what to do about each).
REASONS: Dict[str, str] = {
    # oauth2-introspection: the request or its token
    "missing_token": "no access token in the request",
    "token_sent_twice": "the token (or its header or parameter) was sent more than once",
    "malformed_token": "the token is too long or holds characters outside visible ASCII",
    "malformed_request": "the request holds more than the plugin can read",
    "request_unsendable": "a value from the request cannot be sent to the IdP",
    "token_inactive": "the IdP says the token is not active",
    "token_expired": "the answer's exp is in the past",
    "token_not_yet_valid": "the answer's nbf is in the future (beyond the clock skew)",
    "token_time_claims_invalid": "the answer's exp or nbf is not a number",
    "issuer_not_allowed": "iss is not in issuers_allowed",
    "audience_not_allowed": "no audience_required entry is in the audience claim",
    "scope_missing": "scopes_required does not hold (the detail names the missing scopes)",
    "claims_failed": "the claims expression is false for this token",
    "dpop_not_bound": "DPoP is required (strict, or the DPoP scheme) but the token is not bound",
    "dpop_proof_missing": "a DPoP-bound token was sent as a bearer token",
    "dpop_proof_invalid": "the DPoP proof was refused (the detail says which check)",
    "certificate_not_bound": "proof_of_possession_mtls is strict and the token is not bound",
    "certificate_missing": "a certificate-bound token came without a client certificate",
    "certificate_mismatch": "the client certificate is not the one the token is bound to",
    # oauth2-introspection: the IdP or Kong (500)
    "idp_unreachable": "the introspection endpoint could not be reached",
    "idp_refused": "the introspection endpoint refused the connection",
    "idp_timed_out": "the introspection endpoint did not answer in time",
    "idp_error": "the introspection endpoint answered with an error status",
    "idp_answer_invalid": "the IdP's answer cannot be used (bad JSON, signature, replay)",
    "idp_circuit_open": "the circuit breaker is open after repeated IdP failures",
    "idp_pre_authorization": "no token could be obtained for calling the introspection endpoint",
    "consumer_lookup_failed": "Kong's consumer could not be looked up",
    "anonymous_consumer_not_found": "the anonymous consumer does not exist",
    # oauth2-client-credentials
    "missing_credentials": "no client credentials in the request",
    "malformed_credentials": "the Authorization header is not usable HTTP Basic credentials",
    "too_many_headers": "the request has more headers than the plugin can read",
    "client_rejected": "the token endpoint refused the caller's client credentials",
    "client_forbidden": "the token endpoint will not issue a token to this client",
    "gateway_client_rejected": "the token endpoint refused the configured client",
    "token_endpoint_failed": "the token endpoint failed or gave no usable token",
    # both
    "deadline_exceeded": "the request's time ran out",
    "unusable_config": "the plugin's config cannot be used",
    "internal_error": "an unexpected error in the plugin",
}


def scope_of(config: Any) -> Optional[str]:
    """Where an instance runs, from the keys Kong adds to its config (no PDK call);
    None for a global plugin, whose route is asked for only when it refuses."""
    if not isinstance(config, dict):
        return None
    for key, what in (("route_id", "route"), ("service_id", "service"),
                      ("consumer_id", "consumer")):
        if isinstance(config.get(key), str):
            return "%s %s" % (what, config[key])
    return None


def _where(kong: Any, scope: Optional[str]) -> str:
    if scope is not None:
        return scope
    try:
        route = kong.router.get_route()
    except Exception:   # noqa: BLE001 - PDKException on Kong 2.8; a log line must not fail
        route = None
    if isinstance(route, dict):
        name = route.get("name") or route.get("id")
        if isinstance(name, str):
            return "route " + name
    return "no route"


def report(kong: Any, plugin: str, status: int, reason: str, detail: str = "", *,
           level: str = DEFAULT_LEVEL, scope: Optional[str] = None,
           credential: Optional[str] = None) -> None:
    """Log why this request gets ``status`` and put the reason on the serializer."""
    detail = " ".join(detail.split())[:_MAX_DETAIL]
    line = "%s: %d %s%s (%s, credential %s)" % (
        plugin, status, reason, ": " + detail if detail else "", _where(kong, scope),
        credential or "none")
    log = getattr(kong.log, "err" if status >= 500 else level)
    log(line)
    kong.log.set_serialize_value(plugin + ".reason", reason)
