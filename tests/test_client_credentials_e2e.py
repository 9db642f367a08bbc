"""oauth2-client-credentials as Kong runs it: the real plugin server (hosting both
plugins) driven over its socket by the Kong stand-in, with the fail-closed guard,
against the real oidc-provider token endpoint, two plugin-server processes and
one real Redis. Doubles only for the faults (slow, 5xx, garbage answers)."""

import json
import threading
import time

import jwt
import pytest

from authserver_fixture import AuthServer, basic_authorization
from conftest import plugin_command
from idp_double import IdPDouble, Reply
from kong import KongStandIn
from kong_oauth2_introspection.ops.guard import render
from redis_servers import ACL_PASSWORD, ACL_USER, redis_disposable  # noqa: F401
from test_client_credentials import API, CC_CLIENTS, STORE_SECRET, relay_to

NAME = "oauth2-client-credentials"


@pytest.fixture(scope="module")
def auth():
    with AuthServer(clients=CC_CLIENTS) as server:
        yield server


@pytest.fixture(scope="module")
def two_nodes():
    guard = [render(True)]
    # one plugin per plugin server, as Kong 3.9 registers them
    command = plugin_command() + ["serve", "--plugin", NAME]
    with KongStandIn(command, post_function=guard) as a, \
            KongStandIn(command, post_function=guard) as b:
        yield a, b


@pytest.fixture
def kong(two_nodes):
    return two_nodes[0]


def basic(auth_server, client_id, secret=None):
    return {"Authorization": basic_authorization(client_id,
                                                 secret or auth_server.secret_of(client_id))}


def conf(auth_server, **extra):
    return dict({"url": auth_server.token_url, "audience": API}, **extra)


def store(server, **extra):
    return dict({"key_prefix": "e2e:", "secret": STORE_SECRET,
                 "redis": {"endpoints": [server.address], "username": ACL_USER,
                           "password": ACL_PASSWORD, "timeout_ms": 300}}, **extra)


def bearer_of(result):
    scheme, _, token = result.upstream.headers["Authorization"].partition(" ")
    assert scheme == "Bearer"
    return token


def claims_of(auth_server, token, audience=API):
    key = jwt.PyJWKClient(auth_server.discovery["jwks_uri"]).get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["ES256", "RS256"], audience=audience,
                      issuer=auth_server.issuer)


def test_the_server_declares_only_its_own_plugin(kong):
    # Kong 3.9 registers the first entry of a query command's list, so it is the only one
    assert [p["Name"] for p in kong.plugins_info] == [NAME]
    assert kong.plugins_info[0]["Priority"] == 1150
    assert kong.plugins_info[0]["Phases"] == ["access"]


def test_caller_credentials_exchanged_for_a_verified_token(kong, auth):
    inst = kong.configure(conf(auth, forward_headers={"Group": "grp", "X-User": "user.name"},
                               username_claim="user.name"), name=NAME)
    r = kong.request(inst, "GET", "/orders", headers=dict(basic(auth, "svc-admin"), **{
        "X-Consumer-ID": "evil", "X-Credential-Identifier": "evil", "Group": "spoofed"}))
    assert r.status == 200 and r.kong_error is None and r.guard_exit is None, r.logs
    up = r.upstream.headers
    claims = claims_of(auth, bearer_of(r))
    assert claims["client_id"] == "svc-admin"
    assert up["Group"] == "admin" and up["X-User"] == "Svc Admin"
    assert "X-Consumer-ID" not in up and "X-Credential-Identifier" not in up
    assert auth.secret_of("svc-admin") not in json.dumps(list(up.items()))
    assert r.credential["username"] == "Svc Admin"
    assert r.serialize.get("authenticated_entity.username") == "Svc Admin"
    again = kong.request(inst, "GET", "/orders", headers=basic(auth, "svc-admin"))
    assert bearer_of(again) == bearer_of(r)        # cached: one token request


def test_no_credentials_basic_challenge(kong, auth):
    inst = kong.configure(conf(auth), name=NAME)
    r = kong.request(inst, "GET", "/")
    assert r.status == 401 and not r.proxied
    assert r.json["error"] == "invalid_client"
    assert r.response_headers["WWW-Authenticate"].startswith('Basic realm="service"')


def test_wrong_credentials(kong, auth):
    inst = kong.configure(conf(auth), name=NAME)
    r = kong.request(inst, "GET", "/", headers=basic(auth, "svc-admin", "guessed"))
    assert r.status == 401 and not r.proxied and r.json["error"] == "invalid_client"
    assert "guessed" not in kong.server_log()


def test_configured_client_and_claims(kong, auth):
    gw = conf(auth, client_id="svc-gw", client_secret=auth.secret_of("svc-gw"))
    allowed = kong.configure(dict(gw, claims="Equals(`grp`, `gateway`)"), name=NAME)
    refused = kong.configure(dict(gw, claims="Equals(`grp`, `admin`)"), name=NAME)
    r = kong.request(allowed, "GET", "/", headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert r.status == 200 and claims_of(auth, bearer_of(r))["client_id"] == "svc-gw"
    assert kong.request(refused, "GET", "/").status == 403
    assert auth.secret_of("svc-gw") not in kong.server_log()


def test_unusable_config_answers_500_never_passes(kong, auth):
    # A claims expression that does not parse: only the plugin can judge it (a
    # client_id without its secret is now refused by Kong's schema layer).
    inst = kong.configure(conf(auth, claims="Equals(`grp`"), name=NAME)
    r = kong.request(inst, "GET", "/", headers=basic(auth, "svc-admin"))
    assert r.status == 500 and not r.proxied


# -- the cluster -----------------------------------------------------------------------


def test_a_token_obtained_by_one_node_is_used_by_the_other(two_nodes, auth, redis_disposable):
    a, b = two_nodes
    config = conf(auth, store=store(redis_disposable))
    ia, ib = a.configure(config, name=NAME), b.configure(config, name=NAME)
    ra = a.request(ia, "GET", "/", headers=basic(auth, "svc-dev"))
    rb = b.request(ib, "GET", "/", headers=basic(auth, "svc-dev"))
    assert ra.status == rb.status == 200 and bearer_of(ra) == bearer_of(rb)
    raw = redis_disposable.client()
    for key in raw.keys("*"):
        assert key.startswith(b"e2e:") and b"svc-dev" not in key
        value = raw.get(key)
        assert bearer_of(ra).encode() not in value


def test_concurrent_first_requests_on_two_nodes_make_one_token_request(
        two_nodes, auth, redis_disposable):
    a, b = two_nodes
    config = conf(auth, store=store(redis_disposable))
    ia, ib = a.configure(config, name=NAME), b.configure(config, name=NAME)
    # Instances start lazily; start them first (with another client's token).
    a.request(ia, "GET", "/", headers=basic(auth, "svc-admin"))
    b.request(ib, "GET", "/", headers=basic(auth, "svc-admin"))
    barrier = threading.Barrier(40)
    results = []

    def one(i):
        node, inst = (a, ia) if i % 2 else (b, ib)
        barrier.wait()
        results.append(node.request(inst, "GET", "/", headers=basic(auth, "svc-herd")))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == [200] * 40
    # oidc-provider issues a new token (new jti) per request: one token, one request.
    assert len({bearer_of(r) for r in results}) == 1


# -- faults of the token endpoint ----------------------------------------------------------


def keys_of(auth_server, **extra):
    return dict({"issuer": auth_server.issuer, "jwks_url": auth_server.discovery["jwks_uri"],
                 "audience": API}, **extra)


def test_token_endpoint_down(kong, auth):
    with IdPDouble() as idp:
        url = idp.url
    inst = kong.configure(keys_of(auth, url=url), name=NAME)
    r = kong.request(inst, "GET", "/", headers=basic(auth, "svc-admin"))
    assert r.status == 500 and not r.proxied and r.kong_error is None


def test_token_endpoint_slow(kong, auth):
    with IdPDouble(relay_to(auth, delay=3)) as idp:
        inst = kong.configure(keys_of(auth, url=idp.url, client_config={
            "timeout_seconds": 1, "max_retries": 1}), name=NAME)
        started = time.monotonic()
        r = kong.request(inst, "GET", "/", headers=basic(auth, "svc-admin"))
        took = time.monotonic() - started
        assert r.status == 500 and not r.proxied and r.kong_error is None
        assert took < 4, took                     # two tries of 1 s, not the 3 s answer
        assert len(idp.calls) == 2


@pytest.mark.parametrize("reply", [
    Reply(200, "<html>maintenance</html>"),
    Reply(200, {"access_token": "not-a-jwt", "token_type": "Bearer"}),
    Reply(503, "busy"),
    Reply(200, drop=True),
])
def test_token_endpoint_garbage(kong, auth, reply):
    with IdPDouble(lambda f, h: reply) as idp:
        inst = kong.configure(keys_of(auth, url=idp.url, client_config={"max_retries": 0}),
                              name=NAME)
        r = kong.request(inst, "GET", "/", headers=basic(auth, "svc-admin"))
        assert r.status == 500 and not r.proxied and r.kong_error is None


def test_key_rotation_on_the_real_server(kong):
    first = AuthServer(clients=CC_CLIENTS).start()
    port = first.port
    try:
        inst = kong.configure({"url": first.token_url, "audience": API}, name=NAME)
        r = kong.request(inst, "GET", "/", headers=basic(first, "svc-admin"))
        assert r.status == 200
        old_kid = jwt.get_unverified_header(bearer_of(r))["kid"]
    finally:
        first.stop()
    time.sleep(1.1)     # the plugin refetches a key set at most once a second
    with AuthServer(clients=CC_CLIENTS, port=port) as second:   # new keys, new kids
        # Another client: its token is not cached, and is signed with the new key.
        r = kong.request(inst, "GET", "/", headers=basic(second, "svc-gw"))
        assert r.status == 200, r.logs
        new_kid = jwt.get_unverified_header(bearer_of(r))["kid"]
        assert new_kid != old_kid and new_kid.split("-")[0] == old_kid.split("-")[0]
        claims_of(second, bearer_of(r))
