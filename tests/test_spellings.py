"""Kong keeps header names with underscores (its nginx template sets
underscores_in_headers on), and many upstreams read ``X_Consumer_ID`` as
``X-Consumer-ID``. On every path that lets a request through, a client's spoofed
identity header in any spelling (case, ``-`` or ``_``) must not reach the upstream:
an active token, the anonymous consumer, the logical OR with another plugin's
consumer, a cache hit, and oauth2-client-credentials. Each test runs the real
plugin server through the Kong stand-in."""

import time
import uuid

import pytest

from authserver_fixture import AuthServer, basic_authorization
from idp_double import INACTIVE, IdPDouble, active
from test_client_credentials import API, CC_CLIENTS

SECRET = "Basic a29uZzpzM2NyZXQtdmFsdWU="
TOKEN = "tok-spelling-0123456789"
SPOOF = "evil"

# identity headers a client may send in a spelling other than the one the plugin
# sets; the last two are forward_headers targets (configured X-Tenant / X_Org)
SPOOFED = [("X_Consumer_ID", SPOOF), ("x-consumer_username", SPOOF),
           ("X-Credential_Identifier", SPOOF), ("X_Anonymous_Consumer", SPOOF),
           ("X_Consumer_Groups", SPOOF), ("x_credential_scope", SPOOF),
           ("X_Tenant", SPOOF), ("x-org", SPOOF)]
FORWARD = {"X-Tenant": "tenant", "X_Org": "org"}


def spoofs_reaching(result):
    """Every upstream header line that carries a value only the client sent."""
    return [(k, v) for k, v in result.upstream.headers.items_all() if SPOOF in v]


@pytest.fixture
def idp():
    def behaviour(form, headers):
        if form.get("token") == TOKEN:
            return active(client_id="app-1", username="alice", scope="read", sub="u-1",
                          tenant="t-1", org="o-1", exp=int(time.time()) + 3600)
        return INACTIVE
    with IdPDouble(behaviour) as double:
        yield double


def config(idp, **extra):
    return dict({"introspection_url": idp.url, "authorization_value": SECRET,
                 "forward_headers": FORWARD}, **extra)


def bearer():
    return [("Authorization", "Bearer " + TOKEN)]


def test_active_token(kong, idp):
    inst = kong.configure(config(idp))
    r = kong.request(inst, "GET", "/", headers=bearer() + SPOOFED)
    assert r.status == 200 and r.kong_error is None
    assert spoofs_reaching(r) == []
    up = r.upstream.headers
    assert up["X-Credential-Identifier"] == "alice" and up["X-Tenant"] == "t-1"
    assert up["X_Org"] == "o-1"


def test_cache_hit(kong, idp):
    inst = kong.configure(config(idp))
    assert kong.request(inst, "GET", "/", headers=bearer()).status == 200
    calls = len(idp.calls)
    r = kong.request(inst, "GET", "/", headers=bearer() + SPOOFED)
    assert r.status == 200 and len(idp.calls) == calls        # served from the cache
    assert spoofs_reaching(r) == []
    assert r.upstream.headers["X-Credential-Identifier"] == "alice"


def test_anonymous_consumer(kong, idp):
    anon = kong.add_consumer(username="anon-sp-" + uuid.uuid4().hex[:6])
    inst = kong.configure(config(idp, anonymous=anon["id"]))
    for headers in (SPOOFED, [("Authorization", "Bearer revoked")] + SPOOFED):
        r = kong.request(inst, "GET", "/", headers=headers)
        assert r.status == 200 and r.consumer["id"] == anon["id"]
        assert spoofs_reaching(r) == []
        assert r.upstream.headers["X-Anonymous-Consumer"] == "true"


def test_logical_or_with_another_plugins_consumer(kong, idp):
    anon = kong.add_consumer(username="anon-or-" + uuid.uuid4().hex[:6])
    inst = kong.configure(config(idp, anonymous=anon["id"]))
    other = {"id": str(uuid.uuid4()), "username": "bob"}
    r = kong.request(inst, "GET", "/", headers=SPOOFED,
                     authenticated={"id": "key-auth-cred"}, authenticated_consumer=other)
    assert r.status == 200 and idp.calls == []       # the other plugin decided
    # Kong's set_consumer spellings belong to the other plugin; no other spelling passes
    assert spoofs_reaching(r) == []


@pytest.fixture(scope="module")
def auth():
    with AuthServer(clients=CC_CLIENTS) as server:
        yield server


def test_client_credentials(cc_kong, auth):
    inst = cc_kong.configure({"url": auth.token_url, "audience": API,
                              "forward_headers": {"X-Group": "grp", "X_Unit": "grp"}},
                             name="oauth2-client-credentials")
    headers = [("Authorization", basic_authorization("svc-admin", auth.secret_of("svc-admin")))]
    # introspection's forward targets (X_Tenant, x-org) are not this config's
    r = cc_kong.request(inst, "GET", "/", headers=headers + SPOOFED[:-2] + [
        ("x_group", SPOOF), ("X-Unit", SPOOF)])
    assert r.status == 200 and r.kong_error is None, r.logs
    assert spoofs_reaching(r) == []
    assert r.upstream.headers["X-Group"] == "admin" and r.upstream.headers["X_Unit"] == "admin"
