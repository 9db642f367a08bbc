"""Issue 13 item 2: the plugin authenticates to the introspection endpoint with each
client authentication method, end to end through the Kong stand-in against the
real oidc-provider, which registers each introspecting client for exactly one
method and refuses any other (and any reused assertion ``jti``)."""

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authserver_fixture import AuthServer, client
from certs import make_ca_and_certs
from test_plugin_kong import bearer

JWT_CLIENT_SECRET = "hmac-client-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
POST_CLIENT_SECRET = "post-client-secret-value"
BASIC_CLIENT_SECRET = "basic:client/secret value"  # characters Basic must form-encode


def _ec_jwk(kid):
    key = ec.generate_private_key(ec.SECP256R1())
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    private.update(kid=kid, alg="ES256")
    public = {k: v for k, v in private.items() if k != "d"}
    return json.dumps(private), public


PRIVATE_JWK, PUBLIC_JWK = _ec_jwk("rs-key-1")
OTHER_PRIVATE_JWK, _ = _ec_jwk("rs-key-1")   # same kid, another key: a forgery
# The private parts, named so that conftest searches every log for them.
CLIENT_JWK_PRIVATE_KEY = json.loads(PRIVATE_JWK)["d"]
OTHER_JWK_PRIVATE_KEY = json.loads(OTHER_PRIVATE_JWK)["d"]


@pytest.fixture(scope="module")
def idp():
    extra = [
        client("rs-basic", BASIC_CLIENT_SECRET, introspector=True,
               token_endpoint_auth_method="client_secret_basic"),
        client("rs-post", POST_CLIENT_SECRET, introspector=True,
               token_endpoint_auth_method="client_secret_post"),
        client("rs-hmac", JWT_CLIENT_SECRET, introspector=True,
               token_endpoint_auth_method="client_secret_jwt"),
        client("rs-key", "unused-secret-of-rs-key", introspector=True,
               token_endpoint_auth_method="private_key_jwt", jwks={"keys": [PUBLIC_JWK]}),
    ]
    with AuthServer(extra_clients=extra) as server:
        yield server


METHODS = {
    "client_secret_basic": {"client_id": "rs-basic", "client_secret": BASIC_CLIENT_SECRET},
    "client_secret_post": {"client_id": "rs-post", "client_secret": POST_CLIENT_SECRET},
    "client_secret_jwt": {"client_id": "rs-hmac", "client_secret": JWT_CLIENT_SECRET},
    "private_key_jwt": {"client_id": "rs-key", "client_jwk": PRIVATE_JWK},
}
WRONG = {
    "client_secret_basic": {"client_secret": "wrong-secret"},
    "client_secret_post": {"client_secret": "wrong-secret"},
    "client_secret_jwt": {"client_secret": "wrong-secret-but-long-enough-for-hs256-0123456789"},
    "private_key_jwt": {"client_jwk": OTHER_PRIVATE_JWK},
}


def conf(idp, method, **extra):
    return dict({"introspection_url": idp.introspection_url,
                 "introspection_endpoint_auth_method": method},
                **dict(METHODS[method], **extra))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_introspects(kong, idp, method):
    inst = kong.configure(conf(idp, method))
    # Two tokens: two introspection calls, so two assertions (each jti used once).
    for scope in ("read", "write"):
        token = idp.issue_token("alice-app", scope=scope)
        r = kong.request(inst, "GET", "/", headers=bearer(token))
        assert r.status == 200, (method, r.body, idp.stderr_text()[-500:])
        assert r.upstream.headers["X-Credential-Scope"] == scope
    r = kong.request(inst, "GET", "/", headers=bearer("not-a-token"))
    assert r.status == 401 and r.json["error"] == "invalid_token"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_wrong_credentials_are_a_server_error_never_a_pass(kong, idp, method):
    inst = kong.configure(conf(idp, method, **WRONG[method]))
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
    assert r.status == 500 and not r.proxied
    log = kong.server_log() + json.dumps(r.logs)
    assert "wrong-secret" not in log and '"d"' not in log


def test_a_secret_does_not_replace_the_registered_key(kong, idp):
    # rs-key may only authenticate with its key: its (valid) secret is refused.
    # (oidc-provider treats client_secret_basic and _post alike.)
    inst = kong.configure(dict(conf(idp, "client_secret_basic"), client_id="rs-key",
                               client_secret=idp.secret_of("rs-key")))
    assert kong.request(inst, "GET", "/",
                        headers=bearer(idp.issue_token("alice-app"))).status == 500


def test_tls_client_auth(kong, tmp_path):
    pki = make_ca_and_certs(tmp_path)
    extra = [client("rs-mtls", "unused-secret-of-rs-mtls", introspector=True,
                    token_endpoint_auth_method="tls_client_auth",
                    tls_client_auth_subject_dn="CN=test-client")]
    with AuthServer(extra_clients=extra, tls=pki) as server:
        base = {"introspection_url": server.introspection_url,
                "introspection_endpoint_auth_method": "tls_client_auth",
                "client_id": "rs-mtls"}
        inst = kong.configure(dict(base, client_tls={"ca": pki["ca"], "cert": pki["client_cert"],
                                                     "key": pki["client_key"]}))
        token = server.issue_token("alice-app", scope="read")
        r = kong.request(inst, "GET", "/", headers=bearer(token))
        assert r.status == 200, (r.body, server.stderr_text()[-500:])
        # The same subject, certified by a CA the server does not trust: refused.
        other = make_ca_and_certs(tmp_path / "other")
        forged = kong.configure(dict(base, client_tls={"ca": pki["ca"],
                                                       "cert": other["client_cert"],
                                                       "key": other["client_key"]}))
        assert kong.request(forged, "GET", "/", headers=bearer(token)).status == 500


@pytest.mark.parametrize("bad, field", [
    ({"authorization_value": "Basic eDp5", "introspection_endpoint_auth_method":
      "client_secret_basic", "client_id": "a", "client_secret": "b"}, "authorization_value"),
    ({}, "authorization_value"),
    ({"introspection_endpoint_auth_method": "client_secret_post", "client_id": "a"},
     "client_secret"),
    ({"introspection_endpoint_auth_method": "private_key_jwt", "client_id": "a"}, "client_jwk"),
    ({"introspection_endpoint_auth_method": "private_key_jwt", "client_id": "a",
      "client_jwk": PRIVATE_JWK, "client_alg": "HS256"}, "client_alg"),
    ({"introspection_endpoint_auth_method": "private_key_jwt", "client_id": "a",
      "client_jwk": "{\"kty\": \"EC\"}"}, "client_jwk"),
    ({"introspection_endpoint_auth_method": "tls_client_auth", "client_id": "a"},
     "client_tls.cert"),
])
def test_unusable_client_authentication_is_refused_by_check(bad, field):
    from kong_oauth2_introspection.introspection.config import Config, ConfigError
    with pytest.raises(ConfigError) as err:
        Config.parse(dict({"introspection_url": "http://idp/i"}, **bad))
    assert err.value.field == "config." + field
    assert "eDp5" not in str(err.value) and "\"d\"" not in str(err.value)


def test_vault_references_pass_the_offline_check(tmp_path):
    import json

    from kong_oauth2_introspection.ops.guard import render_for
    import subprocess
    import sys
    path = tmp_path / "kong.yml"
    path.write_text(
        '_format_version: "3.0"\nplugins:\n'
        "  - name: oauth2-introspection\n    config:\n"
        "      introspection_url: https://idp.test/introspect\n"
        "      introspection_endpoint_auth_method: private_key_jwt\n"
        "      client_id: kong\n"
        '      client_jwk: "{vault://env/kong-jwk}"\n'
        "  - name: post-function\n    config:\n      access:\n"
        "        - %s\n" % json.dumps(render_for({})))
    run = subprocess.run([sys.executable, "-m", "kong_oauth2_introspection.cli", "check",
                          str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
