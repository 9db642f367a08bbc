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


# -- start-up: what the fixture does with a server that misbehaves. A stand-in
# "node" (a Python script, given as AuthServer(node=...)) plays the server.

def _fake_node(tmp_path, body):
    script = tmp_path / "fake-node"
    script.write_text(f"#!{sys.executable}\nimport os, sys, time\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_ready_in_one_read_with_earlier_stdout_lines(tmp_path):
    # oidc-provider prints notices on stdout; READY must be found even when it
    # arrives in the same read as them
    node = _fake_node(tmp_path, "os.write(1, b'oidc-provider NOTICE: one\\nNOTICE two\\nREADY 4321\\n')\n"
                                "sys.stdin.read()")
    with AuthServer(node=node) as server:
        assert server.port == 4321
        process = server.process
    assert process.poll() is not None


def test_stdout_is_drained_after_ready(tmp_path):
    # a server writing a lot on stdout later must not block on a full pipe
    node = _fake_node(tmp_path, "os.write(1, b'READY 4321\\n')\n"
                                "for _ in range(64): os.write(1, b'x' * 8191 + b'\\n')\n"
                                "sys.stderr.write('all written\\n'); sys.stderr.flush()\n"
                                "sys.stdin.read()")
    with AuthServer(node=node) as server:
        deadline = time.monotonic() + 20
        while "all written" not in server.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "all written" in server.stderr_text()


def test_exit_before_ready_reports_status_and_stderr_tail(tmp_path):
    node = _fake_node(tmp_path, "for i in range(100): sys.stderr.write(f'stderr line {i}\\n')\n"
                                "print('partial', end='', flush=True)\n"
                                "sys.exit(3)")
    with pytest.raises(AuthServerError) as caught:
        AuthServer(node=node).start()
    text = str(caught.value)
    assert "exited before READY" in text and "exit status 3" in text
    assert "stderr line 99" in text and "stderr line 59\n" not in text   # the last 40 only
    assert "partial" in text


def test_start_timeout_reports_a_hung_server(tmp_path, monkeypatch):
    import authserver_fixture
    monkeypatch.setattr(authserver_fixture, "START_TIMEOUT", 1.0)
    node = _fake_node(tmp_path, "sys.stderr.write('stuck before listening\\n'); sys.stderr.flush()\n"
                                "time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(AuthServerError) as caught:
        AuthServer(node=node).start()
    assert time.monotonic() - started < 15
    text = str(caught.value)
    assert "printed no READY line within 1s" in text
    assert "still running" in text and "exit status -15 (SIGTERM)" in text
    assert "stuck before listening" in text


def test_server_takes_its_keys_from_key_generation_as_jwk():
    # Node 20 can deadlock in keyObject.export({format: 'jwk'}) on a key fresh
    # from generateKeyPairSync (see server.mjs); the server must not do that
    source = (Path(__file__).resolve().parent / "authserver" / "server.mjs").read_text()
    assert "export({ format: 'jwk' })" not in source
    assert "privateKeyEncoding: jwk" in source
