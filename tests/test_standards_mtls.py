"""Issue 13 item 4, certificate-bound tokens (RFC 8705 section 3): oidc-provider,
serving HTTPS, binds a token to the client certificate presented at its token
endpoint (``cnf.x5t#S256``); the plugin, through the Kong stand-in, accepts the
token only from a client presenting that certificate (``kong.client.tls``)."""

import pytest
import requests

from authserver_fixture import AuthServer, client
from certs import make_ca_and_certs
from test_plugin_kong import bearer


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_ca_and_certs(tmp_path_factory.mktemp("mtls-pki"))


@pytest.fixture(scope="module")
def idp(pki):
    extra = [client("bound-app", "bound-app-secret", scope="read",
                    tls_client_certificate_bound_access_tokens=True)]
    with AuthServer(extra_clients=extra, tls=pki) as server:
        yield server


def bound_token(idp, pki):
    """A token of bound-app, asked for over mutual TLS with pki's client certificate."""
    with requests.Session() as session:
        session.trust_env = False
        reply = session.post(idp.token_url, timeout=10, verify=pki["ca_path"],
                             cert=(pki["client_cert_path"], pki["client_key_path"]),
                             data={"grant_type": "client_credentials", "scope": "read"},
                             headers={"Authorization": idp.authorization("bound-app")})
    assert reply.status_code == 200, reply.text
    return reply.json()["access_token"]


def conf(idp, pki, mode="optional"):
    return {"introspection_url": idp.introspection_url,
            "authorization_value": idp.introspector_authorization,
            "client_tls": {"ca": pki["ca"]}, "proof_of_possession_mtls": mode}


def test_the_token_is_bound(idp, pki):
    assert "x5t#S256" in idp.introspect(bound_token(idp, pki))["cnf"]


def test_bound_token_only_with_its_certificate(kong, idp, pki, tmp_path):
    token = bound_token(idp, pki)
    inst = kong.configure(conf(idp, pki))
    ok = kong.request(inst, "GET", "/", headers=bearer(token),
                      client_cert=pki["client_cert"] + pki["ca"])
    assert ok.status == 200, ok.logs
    assert "kong.client.tls.get_full_client_certificate_chain" in ok.pdk_calls
    other = make_ca_and_certs(tmp_path)["client_cert"]
    for cert in (None, other):
        r = kong.request(inst, "GET", "/", headers=bearer(token), client_cert=cert)
        assert r.status == 401 and r.json["error"] == "invalid_token" and not r.proxied


def test_modes(kong, idp, pki):
    bound, plain = bound_token(idp, pki), idp.issue_token("alice-app")
    optional = kong.configure(conf(idp, pki))
    r = kong.request(optional, "GET", "/", headers=bearer(plain))
    assert r.status == 200
    # An unbound token costs no certificate read.
    assert "kong.client.tls.get_full_client_certificate_chain" not in r.pdk_calls
    strict = kong.configure(conf(idp, pki, "strict"))
    assert kong.request(strict, "GET", "/", headers=bearer(plain),
                        client_cert=pki["client_cert"]).status == 401
    assert kong.request(strict, "GET", "/", headers=bearer(bound),
                        client_cert=pki["client_cert"]).status == 200
    off = kong.configure(conf(idp, pki, "off"))
    assert kong.request(off, "GET", "/", headers=bearer(bound)).status == 200
