"""Issue 13 item 3: signed introspection answers (RFC 9701) from the real oidc-provider,
through the Kong stand-in: verified against the server's JWKS (fetched once, again
on a rotated key), iss/aud/iat checked, a bad signature an IdP failure (500), and
the verified JWT forwarded upstream (phantom token).

The only stand-in here is a JWKS forwarder that counts fetches and, for one test,
serves a key the server never had: a forged signature is a fault the real server
cannot produce."""

import json
import socket
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from authserver_fixture import AuthServer, client
from idp_double import IdPDouble, Reply, active
from kong_oauth2_introspection.idp.jwks import REFRESH_INTERVAL
from test_plugin_kong import bearer

RS = "rs-jwt"
JWT_HEADER = "X-Introspection-JWT"


def _clients():
    return [client(RS, f"{RS}-secret", introspector=True,
                   introspection_signed_response_alg="ES256")]


@pytest.fixture(scope="module")
def idp():
    with AuthServer(extra_clients=_clients()) as server:
        yield server


@pytest.fixture
def own_idp():
    """A server of its own for a test whose failures would open the shared
    endpoint's circuit breaker (five IdP failures in a row)."""
    with AuthServer(extra_clients=_clients()) as server:
        yield server


class JWKSForwarder(IdPDouble):
    """GET /jwks answered from the real server (each fetch recorded), or a forged key set."""

    def __init__(self, upstream):
        self.forged = None
        super().__init__(lambda form, headers: Reply(
            200, self.forged or requests.get(upstream, timeout=5).content))
        self.__enter__()

    @property
    def fetches(self):
        return len(self.calls)

    def close(self):
        self.__exit__()


def conf(idp, **extra):
    return dict({"introspection_url": idp.introspection_url,
                 "authorization_value": idp.authorization(RS),
                 "introspection_accept": "application/token-introspection+jwt",
                 "issuer": idp.issuer, "client_id": RS}, **extra)


def test_signed_answer_passes_and_goes_upstream_as_phantom_token(kong, idp):
    inst = kong.configure(conf(idp, upstream_introspection_jwt_header=JWT_HEADER,
                               scopes_required=["read"]))
    token = idp.issue_token("alice-app", scope="read")
    r = kong.request(inst, "GET", "/", headers=dict(bearer(token), **{JWT_HEADER: "forged"}))
    assert r.status == 200, (r.body, r.logs)
    assert r.upstream.headers["X-Credential-Client-ID"] == "alice-app"
    signed = r.upstream.headers[JWT_HEADER]
    # The upstream can check it with the IdP's keys, as the plugin did.
    keys = jwt.PyJWKClient(idp.discovery["jwks_uri"])
    claims = jwt.decode(signed, keys.get_signing_key_from_jwt(signed).key,
                        algorithms=["ES256"], audience=RS, issuer=idp.issuer)
    assert claims["token_introspection"]["active"] is True
    assert claims["token_introspection"]["client_id"] == "alice-app"
    assert token not in signed   # the answer, never the access token
    # oidc-provider answers "Cache-Control: no-store": each request asks again,
    # and each gets the fresh signed answer.
    again = kong.request(inst, "GET", "/", headers=bearer(token)).upstream.headers[JWT_HEADER]
    assert jwt.decode(again, keys.get_signing_key_from_jwt(again).key, algorithms=["ES256"],
                      audience=RS, issuer=idp.issuer)["token_introspection"]["active"] is True


def test_signed_inactive_answer_is_401(kong, idp):
    inst = kong.configure(conf(idp))
    r = kong.request(inst, "GET", "/", headers=bearer("not-a-token"))
    assert r.status == 401 and r.json["error"] == "invalid_token"


def test_wrong_issuer_or_audience_is_an_idp_failure(kong, own_idp):
    idp = own_idp
    token = idp.issue_token("alice-app")
    for bad in ({"issuer": "https://elsewhere.test", "jwks_url": idp.discovery["jwks_uri"]},
                {"client_id": "someone-else"}):
        inst = kong.configure(conf(idp, **bad))
        r = kong.request(inst, "GET", "/", headers=bearer(token))
        assert r.status == 500 and not r.proxied, bad


def test_unsigned_answer_is_refused_when_signed_ones_are_configured(kong, idp):
    # oidc-provider signs whenever asked; a plain JSON answer (a downgrade on the
    # way) is a fault only a double can produce.
    with IdPDouble(lambda form, headers: active(client_id="alice-app")) as plain:
        inst = kong.configure(conf(idp, introspection_url=plain.url))
        r = kong.request(inst, "GET", "/", headers=bearer("tok-plain"))
        assert len(plain.calls) == 1
        assert plain.calls[0].headers["Accept"] == "application/token-introspection+jwt"
    assert r.status == 500 and not r.proxied


def test_forged_signature_is_500_and_not_cached(kong, own_idp):
    idp = own_idp
    forwarder = JWKSForwarder(idp.discovery["jwks_uri"])
    try:
        real = requests.get(idp.discovery["jwks_uri"], timeout=5).json()["keys"]
        es_kid = [k["kid"] for k in real if k["kty"] == "EC"][0]
        other = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(
            ec.generate_private_key(ec.SECP256R1()).public_key()))
        forwarder.forged = {"keys": [dict(other, kid=es_kid, use="sig", alg="ES256")]}
        inst = kong.configure(conf(idp, jwks_url=forwarder.url))
        token = idp.issue_token("alice-app")
        for _ in range(3):
            r = kong.request(inst, "GET", "/", headers=bearer(token))
            assert r.status == 500 and not r.proxied
            assert "signature" in json.dumps(r.logs).lower()
        assert forwarder.fetches == 1   # a bad answer never triggers a fetch per request
    finally:
        forwarder.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jwks_fetched_once_and_again_after_a_key_rotation(kong):
    port = _free_port()
    first = AuthServer(extra_clients=_clients(), port=port).start()
    forwarder = JWKSForwarder(first.issuer + "/jwks")
    try:
        inst = kong.configure(conf(first, jwks_url=forwarder.url))
        for _ in range(5):   # five tokens, five introspections, one JWKS fetch
            token = first.issue_token("alice-app")
            assert kong.request(inst, "GET", "/", headers=bearer(token)).status == 200
        assert forwarder.fetches == 1
        first.stop()
        # Restarted on the same port: new signing keys with new kids.
        second = AuthServer(extra_clients=_clients(), port=port).start()
        time.sleep(REFRESH_INTERVAL)   # an unknown kid refetches at most this often
        try:
            token = second.issue_token("alice-app")
            r = kong.request(inst, "GET", "/", headers=bearer(token))
            assert r.status == 200, r.logs
            assert forwarder.fetches == 2
        finally:
            second.stop()
    finally:
        first.stop()
        forwarder.close()


def test_discovered_jwks(kong, idp):
    inst = kong.configure(conf(idp))   # no jwks_url: found through the issuer's metadata
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
    assert r.status == 200, r.logs


@pytest.mark.parametrize("bad, field", [
    ({"issuer": None}, "issuer"),
    ({"client_id": None}, "client_id"),
    # The schema's entity check marks the field whose value does not fit.
    ({"introspection_accept": "application/json", "upstream_introspection_jwt_header": "X-J"},
     "introspection_accept"),
])
def test_incomplete_signed_answer_settings_are_refused(bad, field):
    from kong_oauth2_introspection.introspection.config import Config, ConfigError
    raw = {"introspection_url": "http://idp/i", "authorization_value": "x",
           "introspection_accept": "application/token-introspection+jwt",
           "issuer": "http://idp", "client_id": "rs"}
    raw.update(bad)
    with pytest.raises(ConfigError) as err:
        Config.parse({k: v for k, v in raw.items() if v is not None})
    assert err.value.field == "config." + field
