"""The test authorization server (oidc-provider) behaves as the plugin expects."""

import base64
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from authserver_fixture import AuthServer, AuthServerError, client  # noqa: E402
from authserver_fixture import auth_server  # noqa: E402,F401


def test_addresses(auth_server):
    assert auth_server.issuer == f"http://127.0.0.1:{auth_server.port}"
    for url in (auth_server.token_url, auth_server.introspection_url, auth_server.revocation_url):
        assert url.startswith(auth_server.issuer + "/")
    assert auth_server.discovery["issuer"] == auth_server.issuer
    assert "client_credentials" in auth_server.discovery["grant_types_supported"]
    expected = "Basic " + base64.b64encode(b"kong:kong-introspection-secret").decode()
    assert auth_server.introspector_authorization == expected


def test_token_is_opaque(auth_server):
    response = auth_server.token_response("alice-app", scope="read")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "read"
    assert 0 < body["expires_in"] <= 600
    assert body["access_token"].count(".") == 0      # not a JWT


def test_fresh_token_introspects_active_with_extra_claims(auth_server):
    before = int(time.time())
    token = auth_server.issue_token("alice-app", scope="read write")
    answer = auth_server.introspect(token)
    assert answer["active"] is True
    assert answer["client_id"] == "alice-app"
    assert answer["scope"] == "read write"
    assert answer["token_type"] == "Bearer"
    assert answer["iss"] == auth_server.issuer
    assert before - 2 <= answer["iat"] <= int(time.time()) + 2
    assert answer["exp"] == answer["iat"] + 600
    assert answer["username"] == "alice"
    assert answer["grp"] == "admin"
    assert answer["user"] == {"name": "John Snow"}
    assert answer["areas"] == ["office", "home"]


def test_claims_are_per_client(auth_server):
    answer = auth_server.introspect(auth_server.issue_token("bob-app", scope="read"))
    assert answer["active"] is True
    assert answer["client_id"] == "bob-app"
    assert (answer["username"], answer["grp"]) == ("bob", "dev")
    assert "user" not in answer and "areas" not in answer


def test_scope_outside_the_clients_allowance_is_refused(auth_server):
    response = auth_server.token_response("bob-app", scope="write")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


def test_revoked_token_is_inactive(auth_server):
    token = auth_server.issue_token("alice-app", scope="read")
    other = auth_server.issue_token("alice-app", scope="read")
    auth_server.revoke(token)
    assert auth_server.introspect(token) == {"active": False}
    assert auth_server.introspect(other)["active"] is True


def test_owner_can_revoke_its_token(auth_server):
    token = auth_server.issue_token("bob-app")
    auth_server.revoke(token, client_id="bob-app")
    assert auth_server.introspect(token) == {"active": False}


def test_garbage_token_is_inactive(auth_server):
    assert auth_server.introspect("not-a-token") == {"active": False}
    assert auth_server.introspect("x" * 43) == {"active": False}


def test_wrong_introspector_credentials_are_refused(auth_server):
    token = auth_server.issue_token("alice-app")
    wrong = "Basic " + base64.b64encode(b"kong:wrong-secret").decode()
    response = auth_server.introspect_response(token, authorization=wrong)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    unknown = "Basic " + base64.b64encode(b"nobody:secret").decode()
    assert auth_server.introspect_response(token, authorization=unknown).status_code == 401
    response = requests.post(auth_server.introspection_url, data={"token": token}, timeout=10)
    assert response.status_code in (400, 401)


def test_only_the_introspector_sees_other_clients_tokens(auth_server):
    token = auth_server.issue_token("alice-app")
    as_bob = auth_server.introspect(token, authorization=auth_server.authorization("bob-app"))
    assert as_bob == {"active": False}
    as_alice = auth_server.introspect(token, authorization=auth_server.authorization("alice-app"))
    assert as_alice["active"] is True


def test_short_lived_token_expires(auth_server):
    token = auth_server.issue_token("bob-app", ttl=2)
    answer = auth_server.introspect(token)
    assert answer["active"] is True
    assert answer["exp"] - answer["iat"] == 2
    time.sleep(max(0.0, answer["exp"] - time.time()) + 1.1)
    assert auth_server.introspect(token) == {"active": False}


def test_custom_clients_ttl_and_audience():
    extra = [client("svc", scope=["read"], ttl=5, audience="https://api.test/",
                    claims={"sub": "service-1", "username": "svc"})]
    with AuthServer(extra_clients=extra) as server:
        answer = server.introspect(server.issue_token("svc", scope="read"))
        assert answer["active"] is True
        assert answer["exp"] - answer["iat"] == 5
        assert answer["aud"] == "https://api.test/"
        assert answer["sub"] == "service-1"
        assert answer["username"] == "svc"
        assert answer["scope"] == "read"
        process = server.process
    assert process.poll() is not None        # stopped with the context


def test_missing_node_modules_is_reported(monkeypatch, tmp_path):
    import authserver_fixture
    monkeypatch.setattr(authserver_fixture, "SERVER_DIR", tmp_path)
    with pytest.raises(AuthServerError, match="npm ci --prefix tests/authserver"):
        AuthServer().start()
