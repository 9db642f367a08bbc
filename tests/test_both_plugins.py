"""Both of our plugins on one route (issue 17.4), each on its own plugin server as
Kong 3.9 registers them, driven through the stand-in's request chain against the
real authorization server: introspection checks the caller's token, then
client-credentials swaps it for the gateway's own bearer token.

Kong OSS runs them by priority (oauth2-introspection 1700 first); Kong
Enterprise's dynamic ordering can run client-credentials first, so both orders
are tested. The guard on the route is rendered for both plugins: a request one of
them never saw (its server down) is refused.

In the reverse order introspection checks the gateway's JWT access token, which the
real server does not store (it cannot introspect it): an introspection endpoint
double answers for such tokens from the real server's signature and claims."""

import jwt
import pytest

from authserver_fixture import AuthServer
from conftest import plugin_command
from idp_double import INACTIVE, IdPDouble, Reply, active
from kong import KongStandIn
from kong.chain import Chain
from kong_oauth2_introspection.ops.guard import render
from test_client_credentials import API, CC_CLIENTS

INTROSPECTION = "oauth2-introspection"
CLIENT_CREDENTIALS = "oauth2-client-credentials"
BOTH = [INTROSPECTION, CLIENT_CREDENTIALS]
SPOOF = "evil"
# Identity headers a client might send itself, in several spellings: none of
# these values may reach the upstream.
SPOOFED = {"X-Consumer-ID": SPOOF, "x_consumer_username": SPOOF,
           "X-Credential-Client-ID": SPOOF, "x-credential_sub": SPOOF,
           "X_CREDENTIAL_SCOPE": SPOOF, "x-svc-group": SPOOF, "X_Svc_Group": SPOOF}


@pytest.fixture(scope="module")
def auth():
    with AuthServer(clients=CC_CLIENTS) as server:
        yield server


@pytest.fixture(scope="module")
def jwt_introspection(auth):
    """RFC 7662 answers for the real server's JWT access tokens (signature,
    issuer, audience and expiry checked against its key set)."""
    keys = jwt.PyJWKClient(auth.discovery["jwks_uri"])

    def behaviour(form, headers):
        if headers.get("Authorization") != auth.introspector_authorization:
            return Reply(401, {"error": "invalid_client"})
        try:
            token = form.get("token", "")
            claims = jwt.decode(token, keys.get_signing_key_from_jwt(token).key,
                                algorithms=["ES256", "RS256"], audience=API, issuer=auth.issuer)
        except jwt.PyJWTError:
            return INACTIVE
        return active(**{k: claims[k] for k in ("client_id", "scope", "sub", "exp", "iat")
                         if k in claims})
    with IdPDouble(behaviour) as double:
        yield double


@pytest.fixture(scope="module")
def servers():
    """(introspection's stand-in, client-credentials' stand-in); the guard, rendered
    for both plugins, sits on the first (post-function runs once, after both)."""
    with KongStandIn(plugin_command(), post_function=[render(True, plugins=BOTH)]) as intro, \
            KongStandIn(plugin_command() + ["serve", "--plugin", CLIENT_CREDENTIALS]) as cc:
        yield intro, cc


def introspection_conf(auth, **extra):
    return dict({"introspection_url": auth.introspection_url,
                 "authorization_value": auth.introspector_authorization}, **extra)


def cc_conf(auth, **extra):
    # the gateway's own client: its token replaces whatever the caller sent
    return dict({"url": auth.token_url, "audience": API, "client_id": "svc-admin",
                 "client_secret": auth.secret_of("svc-admin"),
                 "forward_headers": {"X-Svc-Group": "grp"}}, **extra)


def chain(servers, auth, order, intro_extra=None, cc_extra=None, endpoint=None):
    intro, cc = servers
    extra = dict({"introspection_url": endpoint.url} if endpoint else {}, **(intro_extra or {}))
    pairs = [(intro, intro.configure(introspection_conf(auth, **extra))),
             (cc, cc.configure(cc_conf(auth, **(cc_extra or {})), name=CLIENT_CREDENTIALS))]
    if order == "priority":
        return Chain(pairs)
    return Chain(list(reversed(pairs)), order="given")   # Enterprise's dynamic ordering


def bearer(token):
    return {"Authorization": "Bearer " + token}


def gateway_bearer(result):
    scheme, _, token = result.upstream.headers["Authorization"].partition(" ")
    assert scheme == "Bearer"
    return token


def no_spoof_upstream(result):
    up = result.upstream.headers
    return [(name, value) for name in up for value in up.getall(name) if value == SPOOF]


def request_for(auth, order):
    """What a caller sends in each order: its own access token for introspection
    to check first, or nothing (client-credentials uses the gateway's client)."""
    if order == "priority":
        return dict(bearer(auth.issue_token("alice-app", scope="read")), **SPOOFED)
    # a JWT introspection accepts too: client-credentials must replace it
    return dict(bearer(auth.issue_token("svc-dev", resource=API)), **SPOOFED)


def test_chain_runs_in_kong_priority_order(servers, auth):
    c = chain(servers, auth, "priority")
    assert [inst.name for _, inst in c.pairs] == BOTH


def test_priority_order_upstream_gets_both_plugins_headers(servers, auth):
    intro, _ = servers
    token = auth.issue_token("alice-app", scope="read write")
    r = chain(servers, auth, "priority").request(
        "GET", "/orders", headers=dict(bearer(token), **SPOOFED), guard=intro)
    assert r.status == 200 and r.guard_exit is None and r.kong_error is None, (r.body, r.logs)
    up = r.upstream.headers
    # introspection's identity headers, from the caller's token
    assert up["X-Credential-Client-ID"] == "alice-app"
    assert up["X-Credential-Scope"] == "read write"
    assert up["X-Credential-Identifier"] == "alice"
    # client-credentials' bearer token and forward header replace the caller's
    assert gateway_bearer(r) != token and token not in str(list(up.items()))
    assert up["X-Svc-Group"] == "admin"
    assert no_spoof_upstream(r) == []
    # the credential names both decisions: what the guard checks
    assert r.credential["authenticated_by"] == INTROSPECTION
    assert r.credential["decided_by"] == [CLIENT_CREDENTIALS]


def test_reverse_order_upstream_gets_both_plugins_headers(servers, auth, jwt_introspection):
    intro, _ = servers
    # client-credentials first: introspection checks the gateway's token it set
    # (and keeps it upstream although hide_credentials removes a caller's token)
    r = chain(servers, auth, "reverse", intro_extra={"hide_credentials": True},
              endpoint=jwt_introspection).request(
        "GET", "/orders", headers=request_for(auth, "reverse"), guard=intro)
    assert r.status == 200 and r.guard_exit is None and r.kong_error is None, (r.body, r.logs)
    up = r.upstream.headers
    assert up["X-Credential-Client-ID"] == "svc-admin"
    assert up["X-Svc-Group"] == "admin"
    assert gateway_bearer(r)
    assert no_spoof_upstream(r) == []
    assert r.credential["authenticated_by"] == INTROSPECTION
    assert r.credential["decided_by"] == [CLIENT_CREDENTIALS]


@pytest.mark.parametrize("order", ["priority", "reverse"])
def test_introspection_refusal_stops_the_request(servers, auth, jwt_introspection, order):
    intro, _ = servers
    # a scope the token does not grant: introspection answers 403 itself
    c = chain(servers, auth, order, intro_extra={"scopes_required": ["nobody-has-this"]},
              endpoint=jwt_introspection if order == "reverse" else None)
    r = c.request("GET", "/", headers=request_for(auth, order), guard=intro)
    assert r.status == 403 and not r.proxied, r.body
    assert r.json["error"] == "insufficient_scope"
    if order == "priority":   # client-credentials never ran
        assert r.pdk_calls.count("kong.client.authenticate") == 0
        assert r.pdk_calls.count("kong.service.request.set_headers") == 0
    if order == "priority":   # no token at all: 401
        r = c.request("GET", "/", headers=dict(SPOOFED), guard=intro)
        assert r.status == 401 and not r.proxied, r.body


@pytest.mark.parametrize("order", ["priority", "reverse"])
def test_client_credentials_refusal_stops_the_request(servers, auth, jwt_introspection, order):
    intro, _ = servers
    c = chain(servers, auth, order, intro_extra={"hide_credentials": True},
              cc_extra={"claims": "Equals(`grp`, `nobody`)"},
              endpoint=jwt_introspection if order == "reverse" else None)
    r = c.request("GET", "/", headers=request_for(auth, order), guard=intro)
    assert r.status == 403 and not r.proxied, r.body
    assert r.json["error"] == "insufficient_scope"
    if order == "reverse":   # introspection never ran
        assert r.pdk_calls.count("kong.client.authenticate") == 0


@pytest.fixture
def fresh():
    """Servers of their own: the guard tests kill them."""
    with KongStandIn(plugin_command(), post_function=[render(True, plugins=BOTH)]) as intro, \
            KongStandIn(plugin_command() + ["serve", "--plugin", CLIENT_CREDENTIALS]) as cc:
        yield intro, cc


@pytest.mark.parametrize("order", ["priority", "reverse"])
def test_guard_requires_both_plugins(fresh, auth, jwt_introspection, order):
    intro, cc = fresh
    c = chain(fresh, auth, order, intro_extra={"hide_credentials": True},
              endpoint=jwt_introspection if order == "reverse" else None)
    headers = request_for(auth, order)
    assert c.request("GET", "/", headers=headers, guard=intro).status == 200

    intro.kill_server()
    r = c.request("GET", "/", headers=headers, guard=intro)
    assert r.kong_error is not None          # Kong logged the failure and went on
    assert "kong.client.authenticate" in r.pdk_calls   # client-credentials let it through
    assert r.status == 503 and r.guard_exit == 503 and not r.proxied, r.body
    assert r.json == {"message": "authentication unavailable"}
    intro.restart_server()
    assert c.request("GET", "/", headers=headers, guard=intro).status == 200

    cc.kill_server()
    r = c.request("GET", "/", headers=headers, guard=intro)
    assert r.kong_error is not None
    assert "kong.client.authenticate" in r.pdk_calls   # introspection let it through
    assert r.status == 503 and r.guard_exit == 503 and not r.proxied, r.body
    cc.restart_server()
    assert c.request("GET", "/", headers=headers, guard=intro).status == 200


def test_cache_hit_costs_one_call_more_than_the_two_plugins_alone(servers, auth):
    # in Kong's order client-credentials already reads the credential (introspection's
    # headers are there); naming itself in it is its usual authenticate call
    intro, cc = servers
    token = auth.issue_token("alice-app", scope="read")
    c = chain(servers, auth, "priority")
    (_, intro_inst), (_, cc_inst) = c.pairs
    for _ in range(2):   # the second: both caches hit
        both = c.request("GET", "/", headers=bearer(token), guard=intro)
        alone_intro = intro.request(intro_inst, "GET", "/", headers=bearer(token))
        alone_cc = cc.request(cc_inst, "GET", "/")
    assert both.status == alone_cc.status == 200
    assert alone_intro.guard_exit == 503   # the guard for both: introspection alone is not enough
    assert len(both.pdk_calls) == len(alone_intro.pdk_calls) + len(alone_cc.pdk_calls) + 1, (
        both.pdk_calls, alone_intro.pdk_calls, alone_cc.pdk_calls)
    assert both.pdk_calls.count("kong.client.get_credential") == 1
    assert "kong.client.get_consumer" not in both.pdk_calls   # no consumer mapped



def test_reverse_order_without_hide_credentials_fails_closed(servers, auth, jwt_introspection):
    # Known limit: running second, introspection asks Kong who authenticated only when
    # it has something of another plugin's to keep (the Authorization header it would
    # hide, or identity headers). Without hide_credentials it does not ask, so it
    # cannot name client-credentials and the guard for both refuses: 503, not a pass.
    intro, _ = servers
    r = chain(servers, auth, "reverse", endpoint=jwt_introspection).request(
        "GET", "/", headers=bearer(auth.issue_token("svc-dev", resource=API)), guard=intro)
    assert r.status == 503 and r.guard_exit == 503 and not r.proxied
    assert r.credential["authenticated_by"] == INTROSPECTION and "decided_by" not in r.credential
