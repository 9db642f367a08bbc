"""What a client or a hostile IdP answer could do to the IdP call, through the
Kong stand-in: request values the IdP call cannot carry never count as IdP
failures, answers nothing can carry are a broken IdP's 500 with one line, a
signed answer is accepted once, and every refusal says why in one line."""

import json
import time

import pytest
import requests

from authserver_fixture import AuthServer, client
from idp_double import INACTIVE, IdPDouble, Reply, active
from test_plugin_kong import SECRET, TOKEN, bearer, config

NAME = "oauth2-introspection"


def _idp(form, headers):
    if form.get("token", "").startswith("tok-"):
        return active(client_id="app-1", username="alice", scope="read",
                      exp=int(time.time()) + 3600)
    return INACTIVE


def _no_token_in(r, token=TOKEN):
    text = json.dumps(r.logs) + json.dumps(r.serialize)
    assert token not in text and "s3cret" not in text and SECRET not in text


# (a path that is not UTF-8 never reaches a plugin: Kong's router answers 404 itself)
@pytest.mark.parametrize("path", ["/€", "/😀/ä", "/a b%"])
def test_non_latin1_paths_are_percent_encoded_for_the_idp(kong, path):
    with IdPDouble(_idp) as idp:
        inst = kong.configure(config(idp, introspect_request=True))
        assert kong.request(inst, "GET", path, headers=bearer()).status == 200
        sent = idp.calls[0].headers["X-Request-Path"]
        assert sent.isascii() and " " not in sent
        assert requests.utils.unquote(sent) != sent or path.isascii()


def test_client_paths_never_open_the_breaker(kong):
    with IdPDouble(_idp) as idp:
        on = kong.configure(config(idp, introspect_request=True))
        other = kong.configure(config(idp))   # same IdP, so the same breaker
        for i in range(20):
            r = kong.request(on, "GET", "/€/%d" % i, headers=bearer())
            assert r.status == 200, r
            assert kong.request(on, "GET", "/€x%d" % i, headers=bearer("bad")).status == 401
        asked = len(idp.calls)
        r = kong.request(other, "GET", "/", headers=bearer("tok-other"))
        assert r.status == 200 and len(idp.calls) == asked + 1
    assert "circuit breaker" not in kong.server_log()


@pytest.mark.parametrize("body, cause", [
    ('{"active": true, "username": "\\ud800"}', "lone surrogate"),
    ('{"active": true, "deep": ' + "[" * 500 + "]" * 500 + "}", "nested deeper"),
])
def test_answers_nothing_can_carry_are_a_broken_idp(kong, body, cause):
    with IdPDouble(lambda f, h: Reply(200, body)) as idp:
        inst = kong.configure(config(idp, custom_claims_forward=["deep", "username"]))
        r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 500 and not r.proxied and r.kong_error is None
    lines = [m for _, m in r.logs if m.startswith(NAME + ": 500")]
    assert len(lines) == 1 and "idp_answer_invalid" in lines[0] and cause in lines[0]
    log = kong.server_log()
    assert "Traceback" not in log and "unpackable" not in log.lower()
    _no_token_in(r)


RS = "rs-jwt"


@pytest.fixture(scope="module")
def signing_idp():
    with AuthServer(extra_clients=[client(RS, f"{RS}-secret", introspector=True,
                                          introspection_signed_response_alg="ES256")]) as s:
        yield s


def test_a_signed_answer_replayed_for_another_token_is_refused(kong, signing_idp):
    idp = signing_idp
    recorded = {}

    def forward(form, headers):
        if "replay" in recorded:
            return Reply(200, recorded["replay"],
                         {"Content-Type": "application/token-introspection+jwt"})
        reply = requests.post(idp.introspection_url, data=form, timeout=5, headers={
            k: v for k, v in headers.items() if k.lower() in ("authorization", "accept",
                                                             "content-type")})
        recorded["last"] = reply.text
        return Reply(reply.status_code, reply.text,
                     {"Content-Type": reply.headers.get("Content-Type", "")})
    with IdPDouble(forward) as relay:
        inst = kong.configure({"introspection_url": relay.url,
                               "authorization_value": idp.authorization(RS),
                               "introspection_accept": "application/token-introspection+jwt",
                               "issuer": idp.issuer, "client_id": RS,
                               "jwks_url": idp.discovery["jwks_uri"]})
        genuine = idp.issue_token("alice-app")
        assert kong.request(inst, "GET", "/", headers=bearer(genuine)).status == 200
        recorded["replay"] = recorded["last"]   # the genuine answer, seconds old
        r = kong.request(inst, "GET", "/", headers=bearer("forged-token-for-someone"))
    assert r.status == 500 and not r.proxied
    assert any("replayed" in m for _, m in r.logs), r.logs
