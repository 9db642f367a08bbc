"""Why a request was refused: one log line per refusal naming the reason, the
route and the keyed credential id, never the token; the same reason on Kong's
log serializer; nothing extra on a cache hit that is let through."""

import time

import pytest

from idp_double import IdPDouble, Reply, active
from test_plugin_kong import TOKEN, bearer, config

NAME = "oauth2-introspection"
NOW = int(time.time())


def _answer(**claims):
    return lambda f, h: Reply(200, dict({"active": True, "client_id": "app-1",
                                         "scope": "read", "exp": NOW + 3600}, **claims))


CASES = [
    # (reason, status, answer, extra config, request kwargs)
    ("missing_token", 401, _answer(), {}, {"headers": {}}),
    ("token_sent_twice", 400, _answer(), {}, {"headers": {}, "query": "access_token=a1234&access_token=b1234"}),
    ("malformed_token", 401, _answer(), {}, {"headers": bearer("x" * 9000)}),
    ("token_inactive", 401, lambda f, h: Reply(200, {"active": False}), {}, {}),
    ("token_expired", 401, _answer(exp=NOW - 10), {}, {}),
    ("token_not_yet_valid", 401, _answer(nbf=NOW + 3600), {}, {}),
    ("token_time_claims_invalid", 401, _answer(exp="soon"), {}, {}),
    ("issuer_not_allowed", 401, _answer(iss="https://other"), {"issuers_allowed": ["https://idp"]}, {}),
    ("audience_not_allowed", 401, _answer(aud="web"), {"audience_required": ["api"]}, {}),
    ("scope_missing", 403, _answer(), {"scopes_required": ["read admin"]}, {}),
    ("claims_failed", 403, _answer(), {"claims": "Equals(`grp`, `admin`)"}, {}),
    ("dpop_not_bound", 401, _answer(), {"proof_of_possession_dpop": "strict"}, {}),
    ("dpop_proof_missing", 401, _answer(cnf={"jkt": "abc"}), {"proof_of_possession_dpop": "optional"}, {}),
    ("dpop_proof_invalid", 401, _answer(cnf={"jkt": "abc"}), {"proof_of_possession_dpop": "optional"},
     {"headers": {"Authorization": "DPoP " + TOKEN, "DPoP": "not-a-proof"}}),
    ("certificate_not_bound", 401, _answer(), {"proof_of_possession_mtls": "strict"}, {}),
    ("certificate_missing", 401, _answer(cnf={"x5t#S256": "abc"}), {"proof_of_possession_mtls": "optional"}, {}),
    ("idp_error", 500, lambda f, h: Reply(503), {}, {}),
    ("idp_timed_out", 500, lambda f, h: Reply(200, {"active": True}, delay=1.5), {"timeout": 300}, {}),
    ("idp_answer_invalid", 500, lambda f, h: Reply(200, "not json"), {}, {}),
    ("anonymous_consumer_not_found", 500, lambda f, h: Reply(200, {"active": False}),
     {"anonymous": "nobody-here"}, {}),
    ("unusable_config", 500, _answer(), {"claims": "Equals(`grp`"}, {}),
]


@pytest.mark.parametrize("reason, status, answer, extra, kwargs", CASES, ids=[c[0] for c in CASES])
def test_each_refusal_names_its_reason(kong, reason, status, answer, extra, kwargs):
    with IdPDouble(answer) as idp:   # its own URL: failures open no shared breaker
        inst = kong.configure(config(idp, **extra), route=True)
        kwargs = dict({"headers": bearer()}, **kwargs)
        r = kong.request(inst, "GET", "/orders", **kwargs)
    assert r.status == status, (r, r.logs)
    lines = [(lvl, m) for lvl, m in r.logs if m.startswith("%s: %d " % (NAME, status))]
    assert len(lines) == 1, r.logs
    level, line = lines[0]
    assert (" %s" % reason) in line and "route " + inst.route_id in line
    assert level == ("err" if status >= 500 else "info")
    assert r.serialize == {NAME + ".reason": reason}
    for secret in (TOKEN, "x" * 100, "s3cret"):
        assert secret not in line


def test_idp_refused(kong):
    with IdPDouble() as idp:
        url = idp.url
    inst = kong.configure({"introspection_url": url, "authorization_value": "Basic eA=="})
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 500
    assert any(" idp_refused" in m and "credential " in m for _, m in r.logs), r.logs
    assert r.serialize == {NAME + ".reason": "idp_refused"}


def test_scope_and_level_and_credential_in_the_line(kong):
    with IdPDouble(_answer()) as idp:
        inst = kong.configure(config(idp, scopes_required=["read admin"],
                                     refusal_log_level="notice"))
        r = kong.request(inst, "GET", "/", headers=bearer())
    (level, line), = [(lvl, m) for lvl, m in r.logs if NAME + ": 403" in m]
    assert level == "notice" and "lacks admin" in line
    assert "credential none" not in line and TOKEN not in line


def test_a_cache_hit_let_through_makes_no_extra_pdk_call(kong):
    with IdPDouble(_answer()) as idp:
        inst = kong.configure(config(idp))
        first = kong.request(inst, "GET", "/", headers=bearer())
        hit = kong.request(inst, "GET", "/", headers=bearer())
        assert len(idp.calls) == 1 and first.status == hit.status == 200
    assert not [c for c in hit.pdk_calls if c.startswith("kong.log.")]
    assert "kong.router.get_route" not in hit.pdk_calls and hit.serialize == {}


CC = "oauth2-client-credentials"


@pytest.mark.parametrize("headers, reason", [
    ({}, "missing_credentials"), ({"Authorization": "Bearer abc"}, "malformed_credentials")])
def test_client_credentials_refusals_name_their_reason(cc_kong, headers, reason):
    kong = cc_kong
    inst = kong.configure({"url": "http://127.0.0.1:9/token", "audience": "api"}, name=CC)
    r = kong.request(inst, "GET", "/", headers=headers)
    assert r.status == 401
    (level, line), = [(lvl, m) for lvl, m in r.logs if m.startswith(CC + ": 401 ")]
    assert reason in line and level == "info"
    assert r.serialize == {CC + ".reason": reason}


def test_client_credentials_token_endpoint_down(cc_kong):
    kong = cc_kong
    inst = kong.configure({"url": "http://127.0.0.1:9/token", "audience": "api"}, name=CC)
    r = kong.request(inst, "GET", "/", headers={"Authorization": "Basic YXBwOnNlY3JldA=="})
    assert r.status == 500
    (line,) = [m for lvl, m in r.logs if m.startswith(CC + ": 500 ")]
    assert "token_endpoint_failed" in line and "credential " in line and "secret" not in line
