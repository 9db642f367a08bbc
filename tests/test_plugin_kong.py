"""The plugin as Kong runs it: the real plugin server, driven over its socket
by the Kong stand-in, against an introspection endpoint on 127.0.0.1."""

import json
import threading
import time
import uuid

import pytest

from idp_double import INACTIVE, IdPDouble, Reply, active

SECRET = "Basic a29uZzpzM2NyZXQtdmFsdWU="   # kong:s3cret-value
TOKEN = "tok-ABCdef0123456789"


def config(idp, **extra):
    return dict({"introspection_url": idp.url, "authorization_value": SECRET}, **extra)


def bearer(token=TOKEN):
    return {"Authorization": "Bearer " + token}


@pytest.fixture
def idp():
    claims = {"client_id": "app-1", "username": "alice", "scope": "read write",
              "token_type": "access_token", "sub": "u-1", "iss": "http://idp",
              "aud": ["api", "web"], "jti": "j-1", "iat": 1700000000, "nbf": 1700000000}

    def behaviour(form, headers):
        if form.get("token", "").startswith("tok-"):
            return active(exp=int(time.time()) + 3600, **claims)
        return INACTIVE
    with IdPDouble(behaviour) as double:
        yield double


def assert_no_secrets(kong, result=None, token=TOKEN):
    text = kong.server_log()
    if result is not None:
        text += json.dumps(result.logs) + json.dumps(result.credential or {}) + json.dumps(result.serialize or {})
    assert token not in text and "s3cret" not in text and SECRET not in text


def test_missing_token(kong, idp):
    inst = kong.configure(config(idp))
    r = kong.request(inst, "GET", "/")
    assert r.status == 401
    assert r.json == {"error": "invalid_request", "error_description": "The access token is missing"}
    assert r.response_headers["WWW-Authenticate"] == 'Bearer realm="service"'
    assert idp.calls == [] and r.kong_error is None


@pytest.mark.parametrize("headers, status, error", [
    # RFC 6750 3.1: a token sent twice is a malformed request (nginx itself
    # refuses a second Authorization line; a configured header may repeat).
    ([("Authorization", "Bearer a"), ("Authorization", "Bearer b")], 400, None),
    ({"Authorization": "Bearer " + "x" * 9000}, 401, "invalid_token"),
])
def test_malformed_token_never_reaches_idp(kong, idp, headers, status, error):
    inst = kong.configure(config(idp))
    r = kong.request(inst, "GET", "/", headers=headers)
    assert r.status == status and (error is None or r.json["error"] == error)
    assert idp.calls == []


def test_active_token_goes_upstream_with_credential_headers(kong, idp):
    inst = kong.configure(config(idp, custom_claims_forward=["token_type", "sub"]))
    r = kong.request(inst, "GET", "/things", headers=bearer())
    assert r.status == 200 and r.kong_error is None
    up = r.upstream.headers
    assert up["X-Credential-Client-ID"] == "app-1"
    assert up["X-Credential-Identifier"] == "alice"
    assert up["X-Credential-Scope"] == "read write"
    assert up["X-Credential-Aud"] == "api,web"
    assert up["X-Credential-Iat"] == "1700000000"
    assert up["X-Credential-Token-Type"] == "access_token"
    assert up["Authorization"] == "Bearer " + TOKEN   # forwarded, as Enterprise does
    # The credential Kong sees has a stable id that is not the token.
    assert r.credential["id"] != TOKEN and str(uuid.UUID(r.credential["id"]))
    again = kong.request(inst, "GET", "/", headers=bearer())
    assert again.credential["id"] == r.credential["id"]
    assert idp.calls[0].form == {"token": TOKEN}
    assert idp.calls[0].headers["Authorization"] == SECRET
    assert_no_secrets(kong, r)


def test_inactive_token(kong, idp):
    inst = kong.configure(config(idp))
    r = kong.request(inst, "GET", "/", headers=bearer("revoked"))
    assert r.status == 401
    assert r.json == {"error": "invalid_token",
                      "error_description": "The access token is invalid or has expired"}
    assert r.response_headers["WWW-Authenticate"] == (
        'Bearer realm="service", error="invalid_token", '
        'error_description="The access token is invalid or has expired"')
    assert not any(k.lower().startswith("x-credential") for k in r.response_headers)


@pytest.mark.parametrize("reply", [Reply(500, {"error": "db down at 10.1.2.3"}), Reply(200, "<html>"),
                                   Reply(200, [1]), Reply(drop=True), Reply(403, {"x": 1})])
def test_idp_failure_is_500_not_cached_and_server_survives(kong, reply):
    state = {"fail": True}
    with IdPDouble(lambda f, h: reply if state["fail"] else active(client_id="c")) as idp:
        inst = kong.configure(config(idp))
        r = kong.request(inst, "GET", "/", headers=bearer())
        assert r.status == 500 and r.kong_error is None
        assert r.json == {"message": "An unexpected error occurred"}
        assert "10.1.2.3" not in r.body.decode() and idp.url not in r.body.decode()
        assert any(level == "err" for level, _ in r.logs)
        assert_no_secrets(kong, r)
        state["fail"] = False
        r = kong.request(inst, "GET", "/", headers=bearer())
        assert r.status == 200      # the failure was not cached
        assert len(idp.calls) == 2


def test_idp_timeout(kong):
    with IdPDouble(lambda f, h: Reply(200, {"active": True}, delay=1.0)) as idp:
        inst = kong.configure(config(idp, timeout=200))
        started = time.monotonic()
        r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 500 and time.monotonic() - started < 0.9


def test_cache_hit_costs_few_pdk_calls(kong, idp):
    kong.add_consumer(username="alice")
    inst = kong.configure(config(idp))
    first = kong.request(inst, "GET", "/", headers=bearer())
    assert first.upstream.headers["X-Consumer-Username"] == "alice"
    hit = kong.request(inst, "GET", "/", headers=bearer())
    assert hit.status == 200 and len(idp.calls) == 1
    assert hit.upstream.headers["X-Consumer-Username"] == "alice"
    assert len(hit.pdk_calls) <= 4, hit.pdk_calls


def test_ttl_never_past_exp(kong):
    with IdPDouble(lambda f, h: active(exp=int(time.time()) + 1)) as idp:
        inst = kong.configure(config(idp, ttl=300))
        kong.request(inst, "GET", "/", headers=bearer())
        time.sleep(1.2)
        kong.request(inst, "GET", "/", headers=bearer())
    assert len(idp.calls) == 2


def test_two_idps_never_share_an_entry(kong):
    with IdPDouble(lambda f, h: active(client_id="one")) as one, \
            IdPDouble(lambda f, h: INACTIVE) as two:
        a, b = kong.configure(config(one)), kong.configure(config(two))
        assert kong.request(a, "GET", "/", headers=bearer()).status == 200
        assert kong.request(b, "GET", "/", headers=bearer()).status == 401
        assert len(one.calls) == 1 and len(two.calls) == 1


def test_same_idp_other_client_identity_never_shares(kong, idp):
    a = kong.configure(config(idp))
    b = kong.configure(config(idp, authorization_value="Basic b3RoZXI6b3RoZXI="))
    kong.request(a, "GET", "/", headers=bearer())
    kong.request(b, "GET", "/", headers=bearer())
    assert len(idp.calls) == 2


def test_consumer_by_username_found_after_late_creation(kong, idp):
    inst = kong.configure(config(idp))
    with IdPDouble(lambda f, h: active(username="carol")) as carol_idp:
        inst = kong.configure(config(carol_idp))
        r = kong.request(inst, "GET", "/", headers=bearer())
        assert r.status == 200 and "X-Consumer-ID" not in r.upstream.headers and r.consumer is None
        carol = kong.add_consumer(username="carol")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r = kong.request(inst, "GET", "/", headers=bearer())
            if r.consumer:
                break
            time.sleep(0.25)
        assert r.consumer["id"] == carol["id"]
        assert r.upstream.headers["X-Consumer-ID"] == carol["id"]
        assert r.credential["consumer_id"] == carol["id"]


def test_username_that_is_another_consumers_id_is_not_that_consumer(kong):
    victim = kong.add_consumer(username="victim-" + uuid.uuid4().hex[:6])
    with IdPDouble(lambda f, h: active(username=victim["id"])) as idp:
        inst = kong.configure(config(idp))
        r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 200 and r.consumer is None


def test_consumer_by_client_id_uses_admin_api_and_caches(kong):
    dave = kong.add_consumer(username="dave", custom_id="dave-app")
    with IdPDouble(lambda f, h: active(client_id="dave-app")) as idp:
        inst = kong.configure(config(idp, consumer_by="client_id"))
        before = len(kong.admin_requests)
        for _ in range(3):
            r = kong.request(inst, "GET", "/", headers=bearer())
            assert r.upstream.headers["X-Consumer-Custom-ID"] == "dave-app"
            assert r.upstream.headers["X-Consumer-Username"] == "dave"
            assert r.consumer["id"] == dave["id"]
        assert len(kong.admin_requests) - before == 1


def test_spoofed_identity_headers_never_reach_upstream(kong):
    with IdPDouble(lambda f, h: active(scope="read write", username="nobody-here")) as idp:
        inst = kong.configure(config(idp))
        r = _spoof(kong, inst)
    up = r.upstream.headers
    assert "X-Consumer-Username" not in up and "X-Consumer-ID" not in up
    assert "X-Credential-Tenant" not in up and "X-Anonymous-Consumer" not in up
    assert up["X-Credential-Scope"] == "read write"


def _spoof(kong, inst):
    spoof = {"X-Consumer-Username": "root", "X-Consumer-ID": "0", "X-Credential-Scope": "admin",
             "X-Credential-Tenant": "other", "X-Anonymous-Consumer": "false"}
    return kong.request(inst, "GET", "/", headers=dict(bearer(), **spoof))


def test_anonymous(kong, idp):
    anon = kong.add_consumer(username="anon-" + uuid.uuid4().hex[:6])
    inst = kong.configure(config(idp, anonymous=anon["id"]))
    r = kong.request(inst, "GET", "/", headers={"X-Credential-Scope": "admin"})
    assert r.status == 200 and r.consumer["id"] == anon["id"]
    assert r.upstream.headers["X-Anonymous-Consumer"] == "true"
    assert r.upstream.headers["X-Consumer-ID"] == anon["id"]
    assert "X-Credential-Scope" not in r.upstream.headers
    r = kong.request(inst, "GET", "/", headers=bearer("revoked"))
    assert r.status == 200 and r.consumer["id"] == anon["id"]


def test_anonymous_that_does_not_exist_is_500(kong, idp):
    inst = kong.configure(config(idp, anonymous=str(uuid.uuid4())))
    r = kong.request(inst, "GET", "/")
    assert r.status == 500 and r.kong_error is None


def test_anonymous_and_already_authenticated_is_logical_or(kong, idp):
    anon = kong.add_consumer(username="anon2-" + uuid.uuid4().hex[:6])
    inst = kong.configure(config(idp, anonymous=anon["id"]))
    r = kong.request(inst, "GET", "/", authenticated={"id": "key-auth-cred"})
    assert r.status == 200 and idp.calls == []
    assert "X-Anonymous-Consumer" not in r.upstream.headers


def test_preflight(kong, idp):
    skip = kong.configure(config(idp, run_on_preflight=False))
    r = kong.request(skip, "OPTIONS", "/")
    assert r.status == 200 and r.credential is None
    run = kong.configure(config(idp))
    assert kong.request(run, "OPTIONS", "/").status == 401


def test_hide_credentials_header(kong, idp):
    inst = kong.configure(config(idp, hide_credentials=True))
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 200 and "Authorization" not in r.upstream.headers


def test_hide_credentials_query_keeps_other_parameters(kong, idp):
    inst = kong.configure(config(idp, hide_credentials=True))
    r = kong.request(inst, "GET", "/", query={"access_token": TOKEN, "page": "2"})
    assert r.status == 200
    assert "access_token" not in r.upstream.query and r.upstream.query["page"] in ("2", ["2"])


@pytest.mark.parametrize("content_type,body", [
    ("application/x-www-form-urlencoded", f"access_token={TOKEN}&name=x"),
    ("application/json", json.dumps({"access_token": TOKEN, "name": "x"})),
    ("multipart/form-data; boundary=XyZ",
     f'--XyZ\r\nContent-Disposition: form-data; name="access_token"\r\n\r\n{TOKEN}\r\n'
     '--XyZ\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--XyZ--\r\n'),
])
def test_token_in_body_and_hidden(kong, idp, content_type, body):
    inst = kong.configure(config(idp, hide_credentials=True))
    r = kong.request(inst, "POST", "/", headers={"Content-Type": content_type}, body=body)
    assert r.status == 200 and idp.tokens == [TOKEN]
    upstream_body = r.upstream.body if isinstance(r.upstream.body, str) else json.dumps(r.upstream.body)
    assert TOKEN not in upstream_body and "name" in upstream_body


def test_introspection_request_extras(kong, idp):
    inst = kong.configure(config(idp, introspect_request=True, token_type_hint="access_token",
                                 custom_introspection_headers={"x_tenant": "acme"}))
    kong.request(inst, "DELETE", "/orders/7", headers=bearer())
    call = idp.calls[0]
    assert call.headers["X-Request-Path"] == "/orders/7"
    assert call.headers["X-Request-Http-Method"] == "DELETE"
    assert call.headers["x-tenant"] == "acme"
    assert call.form["token_type_hint"] == "access_token"


def test_unusable_config_answers_500_and_names_the_field(kong, idp):
    inst = kong.configure(config(idp, claims="Equals(`grp`, `admin`"))
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 500 and r.kong_error is None
    assert any("config.claims" in msg for _, msg in r.logs)
    assert idp.calls == []


def test_odd_claim_shapes_never_break_the_request(kong):
    odd = {"active": True, "iat": "long ago", "aud": {"x": [1, 2.0]}, "scope": ["a", "b"],
           "username": 12, "client_id": None, "sub": "line\r\nX-Injected: 1"}
    with IdPDouble(lambda f, h: Reply(200, odd)) as idp:
        kong.add_consumer(username="12")
        inst = kong.configure(config(idp))
        r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 200 and r.kong_error is None
    up = r.upstream.headers
    assert up["X-Credential-Aud"] == '{"x":[1,2.0]}' or up["X-Credential-Aud"] == '{"x":[1,2]}'
    assert up["X-Credential-Scope"] == "a,b" and up["X-Credential-Identifier"] == "12"
    assert "\n" not in up["X-Credential-Sub"] and "X-Injected" not in up
    assert "X-Credential-Client-ID" not in up


def test_concurrent_requests_all_answered(kong, idp):
    inst = kong.configure(config(idp))
    results = []

    def one(i):
        token = f"tok-{i % 5}" if i % 7 else "bad"
        results.append(kong.request(inst, "GET", "/", headers=bearer(token)))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50 and all(r.kong_error is None for r in results)
    assert sorted({r.status for r in results}) == [200, 401]
    assert len(idp.calls) <= 6   # five good tokens and one bad, each asked once


def test_plugin_server_restart_recovers(kong, idp):
    inst = kong.configure(config(idp))
    assert kong.request(inst, "GET", "/", headers=bearer()).status == 200
    kong.restart_server()
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 200 and r.kong_error is None
