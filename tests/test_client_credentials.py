"""The oauth2-client-credentials plugin, in process: ``Plugin(config).access(kong)``
with a recording PDK, against the real oidc-provider token endpoint and real
Redis servers. Scriptable doubles only for what the real server cannot be made
to do (5xx, hangs, garbage, tokens signed with the wrong key or expired).

The end-to-end tests through the Kong stand-in are in
test_client_credentials_e2e.py.
"""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from authserver_fixture import DEFAULT_CLIENTS, AuthServer, basic_authorization, client
from certs import make_ca_and_certs
from idp_double import IdPDouble, Reply
from kong_oauth2_introspection.client_credentials import NAME, PRIORITY, VERSION
from kong_oauth2_introspection.client_credentials.handler import RUNTIMES, Plugin
from kong_oauth2_introspection.idp.jwks import REFRESH_INTERVAL
from kong_oauth2_introspection.concurrency import Deadline, deadline_scope
from redis_servers import (ACL_PASSWORD, ACL_USER, MASTER_SET, PASSWORD,  # noqa: F401
                           SENTINEL_PASSWORD, redis_cluster, redis_disposable,
                           redis_sentinel, redis_tls, tls_certs)

API = "https://api.example.com"
STORE_SECRET = "0123456789abcdef0123456789abcdef"

CC_CLIENTS = DEFAULT_CLIENTS + [
    client("svc-admin", scope="read write", audience=API, access_token_format="jwt",
           claims={"grp": "admin", "areas": ["office", "home"], "user": {"name": "Svc Admin"},
                   "referrer": "http://example.com/foo/bar", "active": True}),
    client("svc-dev", audience=[API, "https://other.example.com"], access_token_format="jwt",
           jwt_alg="RS256", claims={"grp": "dev"}),
    client("svc-opaque", audience=API),                        # tokens are not JWTs
    client("svc-elsewhere", audience="https://elsewhere.example.com",
           access_token_format="jwt"),                         # tokens for another audience
    client("svc-short", audience=API, access_token_format="jwt", ttl=8),
    client("svc-herd", audience=API, access_token_format="jwt"),
    client("svc-gw", audience=API, access_token_format="jwt", claims={"grp": "gateway"}),
]


@pytest.fixture(scope="module")
def auth():
    with AuthServer(clients=CC_CLIENTS) as server:
        yield server


# -- a recording PDK -------------------------------------------------------------


class _Ns:
    pass


class Outcome:
    def __init__(self, kong: "FakeKong"):
        self.exit = kong.exits[0] if kong.exits else None
        self.status = self.exit[0] if self.exit else (200 if kong.authenticated else None)
        self.body = self.exit[1] if self.exit else None
        self.response_headers = self.exit[2] if self.exit else {}
        self.credential = kong.authenticated[0][1] if kong.authenticated else None
        self.consumer = kong.authenticated[0][0] if kong.authenticated else None
        self.logs = kong.logs
        self.serialize = kong.serialize
        # What the upstream gets: the request's headers with set_headers applied.
        upstream = {k.lower(): v for k, v in kong.incoming}
        for table in kong.header_sets:
            for name, value in table.items():
                if value == []:
                    upstream.pop(name.lower(), None)
                else:
                    upstream[name.lower()] = value
        self.upstream = upstream if self.status == 200 else None

    @property
    def bearer(self) -> str:
        assert self.upstream is not None
        scheme, _, token = self.upstream["authorization"].partition(" ")
        assert scheme == "Bearer"
        return token


class FakeKong:
    """Kong's PDK as the plugin uses it, recording every call."""

    def __init__(self, headers=None):
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        self.incoming = pairs
        self.exits: List[Any] = []
        self.header_sets: List[Dict[str, Any]] = []
        self.authenticated: List[Any] = []
        self.logs: List[Any] = []
        self.serialize: Dict[str, Any] = {}
        self.request, self.client, self.log = _Ns(), _Ns(), _Ns()
        self.response, self.service = _Ns(), _Ns()
        self.service.request = _Ns()
        self.request.get_headers = self._get_headers
        self.service.request.set_headers = self.header_sets.append
        self.response.exit = lambda status, body=None, headers=None: self.exits.append(
            (status, body, headers or {}))
        self.client.authenticate = lambda consumer, credential: self.authenticated.append(
            (consumer, credential))
        # Nobody authenticated before this plugin (Kong 3.x: nil).
        self.client.get_credential = self.client.get_consumer = lambda: None
        for level in ("err", "warn", "notice", "info", "debug"):
            setattr(self.log, level, lambda *a, level=level: self.logs.append((level, a)))
        self.log.set_serialize_value = self.serialize.__setitem__

    def _get_headers(self, max_headers=100):
        out: Dict[str, List[str]] = {}
        for name, value in self.incoming[:max_headers]:
            out.setdefault(name.lower(), []).append(value)
        return out


def run(plugin: Plugin, headers=None) -> Outcome:
    kong = FakeKong(headers)
    plugin.access(kong)
    # Every path ends in exactly one exit, or in one set_headers and authenticate.
    if kong.exits:
        assert len(kong.exits) == 1 and not kong.authenticated
    else:
        assert len(kong.header_sets) == 1 and len(kong.authenticated) == 1
    return Outcome(kong)


def basic(auth_server: AuthServer, client_id: str, secret: Optional[str] = None) -> Dict[str, str]:
    secret = secret or auth_server.secret_of(client_id)
    return {"Authorization": basic_authorization(client_id, secret)}


def conf(auth_server: AuthServer, **extra) -> Dict[str, Any]:
    return dict({"url": auth_server.token_url, "audience": API}, **extra)


def store(server, **extra) -> Dict[str, Any]:
    return dict({"key_prefix": "cc:", "secret": STORE_SECRET,
                 "redis": {"endpoints": [server.address], "username": ACL_USER,
                           "password": ACL_PASSWORD, "timeout_ms": 300}}, **extra)


@pytest.fixture(autouse=True)
def fresh_runtimes():
    """Equal configs share a runtime (and its cache) in a process: not across tests."""
    yield
    RUNTIMES.close()


def node(config, n):
    """The config as node ``n`` of a cluster has it: in one process, equal configs
    share their runtime, so each "node" differs in a setting that changes nothing
    the cache depends on."""
    config = json.loads(json.dumps(config))
    config["store"]["redis"]["timeout_ms"] = 300 + n
    return config


@pytest.fixture
def plugins():
    made: List[Plugin] = []

    def make(config):
        plugin = Plugin(config)
        made.append(plugin)
        return plugin
    yield make
    for plugin in made:
        plugin.close()


def verify_upstream_token(auth_server, token, audience=API):
    jwks = jwt.PyJWKClient(auth_server.discovery["jwks_uri"])
    key = jwks.get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["ES256", "RS256"], audience=audience,
                      issuer=auth_server.issuer)


# -- the contract -------------------------------------------------------------------


def test_plugin_class_attributes():
    assert (Plugin.NAME, Plugin.PRIORITY, Plugin.VERSION) == (NAME, PRIORITY, VERSION)
    assert NAME == "oauth2-client-credentials"
    # Authentication: after Kong's request shapers, before ACL (950) and rate limiting (910).
    assert 950 < PRIORITY < 2000


# -- url, caller credentials, audience -----------------------------------------------


def test_caller_basic_credentials_become_a_verified_bearer_token(auth, plugins):
    plugin = plugins(conf(auth))
    r = run(plugin, basic(auth, "svc-admin"))
    assert r.status == 200, r.logs
    claims = verify_upstream_token(auth, r.bearer)
    assert claims["client_id"] == "svc-admin" and claims["aud"] == API
    # The caller's Basic credentials never reach the upstream.
    assert "Basic" not in json.dumps(r.upstream)
    assert auth.secret_of("svc-admin") not in json.dumps(r.upstream)
    # Kong learns who called, by an id that is neither the secret nor the token.
    assert r.consumer is None and set(r.credential) == {"id", "authenticated_by"}
    assert r.credential["authenticated_by"] == "oauth2-client-credentials"   # for the guard
    assert auth.secret_of("svc-admin") not in r.credential["id"]
    again = run(plugin, basic(auth, "svc-admin"))
    assert again.bearer == r.bearer                      # served from the cache
    assert again.credential == r.credential


def test_request_without_credentials_gets_a_basic_challenge(auth, plugins):
    r = run(plugins(conf(auth)), {"X-Other": "1"})
    assert r.status == 401
    assert r.body["error"] == "invalid_client"
    assert r.response_headers["WWW-Authenticate"].startswith('Basic realm="service"')


@pytest.mark.parametrize("authorization", [
    "Bearer abc.def.ghi",
    "Basic !!!notbase64",
    "Basic " + base64.b64encode(b"no-colon-here").decode(),
    "Basic " + base64.b64encode(b":secret-without-id").decode(),
    "Basic " + base64.b64encode(b"id-without-secret:").decode(),
    "Basic",
])
def test_malformed_caller_credentials_are_refused_without_asking(authorization, plugins):
    with IdPDouble(lambda f, h: Reply(500)) as idp:
        r = run(plugins({"url": idp.url, "audience": API}), {"Authorization": authorization})
        assert r.status == 401 and r.body["error"] == "invalid_client"
        assert r.response_headers["WWW-Authenticate"].startswith("Basic ")
        assert idp.calls == []


def test_two_authorization_headers_are_refused(auth, plugins):
    r = run(plugins(conf(auth)), [("Authorization", basic(auth, "svc-admin")["Authorization"]),
                                  ("Authorization", basic(auth, "svc-dev")["Authorization"])])
    assert r.status == 401


def test_wrong_secret_is_401_and_never_cached(auth, plugins):
    plugin = plugins(conf(auth))
    for _ in range(2):
        r = run(plugin, basic(auth, "svc-admin", "wrong-secret"))
        assert r.status == 401 and r.body["error"] == "invalid_client"
        assert r.response_headers["WWW-Authenticate"].startswith("Basic ")
    assert run(plugin, basic(auth, "svc-admin")).status == 200
    assert all("wrong-secret" not in json.dumps(entry) for entry in r.logs)


def test_client_refused_a_token_for_the_audience_is_403(auth, plugins):
    # Authenticated, but the server will not issue it a token for this resource
    # (RFC 8707 invalid_target).
    r = run(plugins(conf(auth, audience="https://elsewhere.example.com",
                         audience_param="resource")), basic(auth, "svc-admin"))
    assert r.status == 403 and r.body["error"] == "unauthorized_client"
    assert "WWW-Authenticate" not in r.response_headers


def test_client_id_and_secret_configured_the_caller_needs_none(auth, plugins):
    plugin = plugins(conf(auth, client_id="svc-gw", client_secret=auth.secret_of("svc-gw")))
    r = run(plugin, {"Authorization": basic_authorization("caller", "caller-pw")})
    assert r.status == 200
    assert verify_upstream_token(auth, r.bearer)["client_id"] == "svc-gw"
    assert "caller-pw" not in json.dumps(r.upstream)
    assert run(plugin, {}).bearer == r.bearer


def test_configured_credentials_the_server_refuses_are_a_server_error(auth, plugins):
    r = run(plugins(conf(auth, client_id="svc-gw", client_secret="not-it")), {})
    assert r.status == 500 and r.body == {"message": "An unexpected error occurred"}
    assert "not-it" not in json.dumps(r.logs)


@pytest.mark.parametrize("extra", [{"client_id": "svc-gw"}, {"client_secret": "x"}])
def test_client_id_and_secret_go_together(auth, plugins, extra):
    r = run(plugins(conf(auth, **extra)), basic(auth, "svc-admin"))
    assert r.status == 500


def test_audience_is_required_in_the_token(auth, plugins):
    # The server issues this client's tokens for another audience: never forwarded.
    r = run(plugins(conf(auth)), basic(auth, "svc-elsewhere"))
    assert r.status == 500
    assert any("audience" in json.dumps(entry).lower() for entry in r.logs)


def test_audience_sent_as_rfc8707_resource(auth, plugins):
    # svc-dev's default audience is API; asked with resource=, the server issues
    # a token for the other one.
    other = "https://other.example.com"
    r = run(plugins(conf(auth, audience=other, audience_param="resource")), basic(auth, "svc-dev"))
    assert r.status == 200
    assert verify_upstream_token(auth, r.bearer, audience=other)["aud"] == other


def test_audience_sent_as_audience_parameter():
    with IdPDouble(lambda f, h: Reply(400, {"error": "invalid_request"})) as idp:
        plugin = Plugin({"url": idp.url, "audience": API})
        try:
            run(plugin, {"Authorization": basic_authorization("a", "b")})
        finally:
            plugin.close()
        form = idp.calls[0].form
        assert form == {"grant_type": "client_credentials", "audience": API}
        assert idp.calls[0].headers["Authorization"] == basic_authorization("a", "b")


def test_opaque_tokens_are_refused(auth, plugins):
    r = run(plugins(conf(auth)), basic(auth, "svc-opaque"))
    assert r.status == 500
    assert any("not a JWT" in json.dumps(entry) for entry in r.logs)


# -- claims, forward_headers, username_claim -------------------------------------------


@pytest.mark.parametrize("expression,allowed", [
    ("Equals(`grp`, `admin`)", {"svc-admin"}),
    ("Prefix(`referrer`, `http://example.com`)", {"svc-admin"}),
    ("Contains(`referrer`, `/foo/`)", {"svc-admin"}),
    ("Contains(`areas`, `home`)", {"svc-admin"}),
    ("OneOf(`grp`, `dev`, `lab`)", {"svc-dev"}),
    ("!Equals(`grp`, `admin`)", {"svc-dev"}),
    ("Equals(`grp`, `admin`) || Equals(`grp`, `dev`)", {"svc-admin", "svc-dev"}),
    ("Equals(`grp`, `admin`) && Equals(`active`, `true`)", {"svc-admin"}),
    ("Equals(`user.name`, `Svc Admin`)", {"svc-admin"}),
])
def test_claims(auth, plugins, expression, allowed):
    plugin = plugins(conf(auth, claims=expression))
    for who in ("svc-admin", "svc-dev"):
        r = run(plugin, basic(auth, who))
        if who in allowed:
            assert r.status == 200, (who, r.body)
        else:
            assert r.status == 403 and r.body["error"] == "insufficient_scope", who


def test_invalid_claims_expression_makes_every_request_500(auth, plugins):
    assert run(plugins(conf(auth, claims="Equals(`grp`")), basic(auth, "svc-admin")).status == 500


def test_forward_headers_and_identity_header_hygiene(auth, plugins):
    plugin = plugins(conf(auth, forward_headers={"Group": "grp", "Expires-At": "exp",
                                                 "X-Name": "user.name", "X-Nope": "missing"}))
    r = run(plugin, dict(basic(auth, "svc-admin"), **{
        "Group": "spoofed", "X-Consumer-ID": "evil", "X-Consumer-Username": "evil",
        "X-Credential-Identifier": "evil", "X-Anything": "kept"}))
    assert r.status == 200
    up = r.upstream
    claims = verify_upstream_token(auth, r.bearer)
    assert up["group"] == "admin" and up["x-name"] == "Svc Admin"
    assert up["expires-at"] == str(claims["exp"])
    assert up["x-nope"] == ""                    # a missing claim: an empty header
    assert "x-consumer-id" not in up and "x-consumer-username" not in up
    assert "x-credential-identifier" not in up
    assert up["x-anything"] == "kept"


def test_username_claim_names_the_caller_in_kongs_log(auth, plugins):
    r = run(plugins(conf(auth, username_claim="user.name")), basic(auth, "svc-admin"))
    assert r.status == 200
    assert r.credential["username"] == "Svc Admin"
    assert r.serialize == {"authenticated_entity.username": "Svc Admin"}


def test_too_many_headers_are_refused(auth, plugins):
    headers = [("Authorization", basic(auth, "svc-admin")["Authorization"])]
    headers += [("X-Filler-%d" % i, "x") for i in range(1000)]
    r = run(plugins(conf(auth)), headers)
    assert r.status == 400 and r.body["error"] == "invalid_request"


# -- token lifetime ----------------------------------------------------------------------


def test_token_is_replaced_shortly_before_it_expires(auth, plugins):
    plugin = plugins(conf(auth))
    first = run(plugin, basic(auth, "svc-short"))
    claims = verify_upstream_token(auth, first.bearer)
    assert claims["exp"] - claims["iat"] == 8
    assert run(plugin, basic(auth, "svc-short")).bearer == first.bearer
    # Kept until 2 s (a quarter of its life) before exp, then asked for again.
    time.sleep(max(0.0, claims["exp"] - 2 - time.time()) + 0.3)
    later = run(plugin, basic(auth, "svc-short"))
    assert later.bearer != first.bearer
    assert verify_upstream_token(auth, later.bearer)["exp"] > claims["exp"]


# -- client_config ----------------------------------------------------------------------------


def relay_to(auth_server: AuthServer, delay: float = 0.0):
    """A token endpoint double that answers with what the real server issues."""
    def behaviour(form, headers):
        response = requests.post(auth_server.token_url, data=form,
                                 headers={"Authorization": headers["Authorization"]}, timeout=10)
        return Reply(response.status_code, response.text, delay=delay)
    return behaviour


def keys_of(auth_server: AuthServer, **extra) -> Dict[str, Any]:
    """issuer and jwks_url set: nothing to discover at a double."""
    return dict({"issuer": auth_server.issuer, "jwks_url": auth_server.discovery["jwks_uri"]},
                **extra)


def test_issuer_and_jwks_url_skip_discovery(auth, plugins):
    with IdPDouble(relay_to(auth)) as idp:
        r = run(plugins(dict(keys_of(auth), url=idp.url, audience=API)), basic(auth, "svc-admin"))
        assert r.status == 200 and len(idp.calls) == 1


def test_discovery_refuses_metadata_of_another_token_endpoint(auth, plugins):
    # The double's origin serves no metadata naming it: no key to trust, no token.
    with IdPDouble(relay_to(auth)) as idp:
        r = run(plugins({"url": idp.url, "audience": API}), basic(auth, "svc-admin"))
        assert r.status == 500


def test_wrong_issuer_is_refused(auth, plugins):
    config = dict(keys_of(auth), url=auth.token_url, audience=API)
    config["issuer"] = "http://127.0.0.1:1/not-the-issuer"
    r = run(plugins(config), basic(auth, "svc-admin"))
    assert r.status == 500 and any("issuer" in json.dumps(e).lower() for e in r.logs)


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    return (make_ca_and_certs(tmp_path_factory.mktemp("cc-tls")),
            make_ca_and_certs(tmp_path_factory.mktemp("cc-tls-other"), ca_name="Other CA"))


def _tls_double(auth_server, certs, require_client_cert=False):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server_cert_path"], certs["server_key_path"])
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs["ca_path"])
    return IdPDouble(relay_to(auth_server), tls=context)


def test_client_config_tls_ca(auth, plugins, tls_material):
    certs, other = tls_material
    with _tls_double(auth, certs) as idp:
        base = dict(keys_of(auth), url=idp.url, audience=API)
        ok = run(plugins(dict(base, client_config={"tls": {"ca": certs["ca"]}})),
                 basic(auth, "svc-admin"))
        assert ok.status == 200
        wrong = run(plugins(dict(base, client_config={"tls": {"ca": other["ca"]},
                                                      "max_retries": 0})),
                    basic(auth, "svc-admin"))
        assert wrong.status == 500
        assert len(idp.calls) == 1        # the untrusted server never saw the credentials


def test_client_config_tls_insecure_skip_verify(auth, plugins, tls_material):
    certs, _ = tls_material
    with _tls_double(auth, certs) as idp:
        r = run(plugins(dict(keys_of(auth), url=idp.url, audience=API,
                             client_config={"tls": {"insecure_skip_verify": True}})),
                basic(auth, "svc-admin"))
        assert r.status == 200


def test_client_config_tls_client_certificate(auth, plugins, tls_material):
    certs, _ = tls_material
    with _tls_double(auth, certs, require_client_cert=True) as idp:
        base = dict(keys_of(auth), url=idp.url, audience=API)
        without = run(plugins(dict(base, client_config={"tls": {"ca": certs["ca"]},
                                                        "max_retries": 0})),
                      basic(auth, "svc-admin"))
        assert without.status == 500
        with_cert = run(plugins(dict(base, client_config={"tls": {
            "ca": certs["ca"], "cert": certs["client_cert"], "key": certs["client_key"]}})),
            basic(auth, "svc-admin"))
        assert with_cert.status == 200
        assert certs["client_key"].splitlines()[1] not in json.dumps(with_cert.logs)


def test_client_config_timeout_seconds(auth, plugins):
    with IdPDouble(relay_to(auth, delay=3)) as idp:
        plugin = plugins(dict(keys_of(auth), url=idp.url, audience=API,
                              client_config={"timeout_seconds": 1, "max_retries": 0}))
        started = time.monotonic()
        r = run(plugin, basic(auth, "svc-admin"))
        assert r.status == 500 and time.monotonic() - started < 2.5
        assert any("timed out" in json.dumps(e) for e in r.logs)
        idp.behaviour = relay_to(auth, delay=0.2)        # slow but within the timeout
        assert run(plugin, basic(auth, "svc-admin")).status == 200


@pytest.mark.parametrize("retries,expected_calls", [(None, 4), (0, 1), (5, 6)])
def test_client_config_max_retries(auth, plugins, retries, expected_calls):
    with IdPDouble(lambda f, h: Reply(503, "busy")) as idp:
        client_config = {} if retries is None else {"max_retries": retries}
        r = run(plugins(dict(keys_of(auth), url=idp.url, audience=API,
                             client_config=client_config)), basic(auth, "svc-admin"))
        assert r.status == 500 and len(idp.calls) == expected_calls


def test_4xx_answers_are_not_retried(auth, plugins):
    with IdPDouble(lambda f, h: Reply(401, {"error": "invalid_client"})) as idp:
        r = run(plugins(dict(keys_of(auth), url=idp.url, audience=API)), basic(auth, "svc-admin"))
        assert r.status == 401 and len(idp.calls) == 1


def test_request_deadline_bounds_retries(auth, plugins):
    with IdPDouble(lambda f, h: Reply(503, delay=0.3)) as idp:
        plugin = plugins(dict(keys_of(auth), url=idp.url, audience=API,
                              client_config={"max_retries": 10}))
        started = time.monotonic()
        with deadline_scope(Deadline(1.0)):
            r = run(plugin, basic(auth, "svc-admin"))
        assert r.status == 500 and time.monotonic() - started < 1.6
        assert len(idp.calls) < 5


# -- faults of the token endpoint -----------------------------------------------------------------


def test_token_endpoint_down(auth, plugins):
    with IdPDouble() as idp:
        url = idp.url
    r = run(plugins(dict(keys_of(auth), url=url, audience=API,
                         client_config={"max_retries": 1})), basic(auth, "svc-admin"))
    assert r.status == 500 and any("could not connect" in json.dumps(e) for e in r.logs)


def test_failures_are_never_cached(auth, plugins):
    answers = [Reply(503), Reply(200, "<html>garbage</html>")]

    def behaviour(form, headers):
        return answers.pop(0) if answers else relay_to(auth)(form, headers)
    with IdPDouble(behaviour) as idp:
        plugin = plugins(dict(keys_of(auth), url=idp.url, audience=API,
                              client_config={"max_retries": 0}))
        assert run(plugin, basic(auth, "svc-admin")).status == 500
        assert run(plugin, basic(auth, "svc-admin")).status == 500
        assert run(plugin, basic(auth, "svc-admin")).status == 200
        assert len(idp.calls) == 3


@pytest.mark.parametrize("body", [
    "not json at all",
    {"token_type": "Bearer"},
    {"access_token": "opaque-value", "token_type": "Bearer"},
    {"access_token": "a.b.c", "token_type": "Bearer"},
    {"access_token": 42},
    [1, 2, 3],
])
def test_garbage_answers_are_refused(auth, plugins, body):
    with IdPDouble(lambda f, h: Reply(200, body)) as idp:
        r = run(plugins(dict(keys_of(auth), url=idp.url, audience=API)), basic(auth, "svc-admin"))
        assert r.status == 500 and r.upstream is None


def test_non_bearer_token_type_is_refused(auth, plugins):
    def behaviour(form, headers):
        answer = json.loads(relay_to(auth)(form, headers).body)
        return Reply(200, dict(answer, token_type="DPoP"))
    with IdPDouble(behaviour) as idp:
        r = run(plugins(dict(keys_of(auth), url=idp.url, audience=API)), basic(auth, "svc-admin"))
        assert r.status == 500


# -- JWT checks with keys the test controls -------------------------------------------------------


class KeyServer:
    """A JWKS and token endpoint double signing whatever the test asks."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "k1"
        self.claims: Dict[str, Any] = {}
        self.header: Dict[str, Any] = {}
        self.jwks_fetches = 0
        self.token_requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                server.jwks_fetches += 1
                jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(server.key.public_key()))
                self._send({"keys": [dict(jwk, kid=server.kid, use="sig", alg="ES256")]})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.token_requests += 1
                self._send({"access_token": server.sign(), "token_type": "Bearer"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def sign(self, key=None):
        now = int(time.time())
        claims = dict({"iss": self.base, "aud": API, "iat": now, "exp": now + 600}, **self.claims)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key or self.key, algorithm="ES256",
                          headers=dict({"kid": self.kid}, **self.header))

    def config(self, **extra):
        return dict({"url": self.base + "/token", "audience": API, "issuer": self.base,
                     "jwks_url": self.base + "/jwks"}, **extra)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keys():
    server = KeyServer()
    yield server
    server.close()


def test_key_server_token_is_accepted(keys, plugins):
    r = run(plugins(keys.config()), {"Authorization": basic_authorization("x", "y")})
    assert r.status == 200 and jwt.get_unverified_header(r.bearer)["kid"] == "k1"


@pytest.mark.parametrize("claims,header", [
    ({"exp": int(time.time()) - 60}, {}),                 # expired
    ({"exp": None}, {}),                                  # no exp
    ({"nbf": int(time.time()) + 600}, {}),                # not yet valid
    ({"aud": "https://someone-else"}, {}),
    ({"aud": None}, {}),
    ({"iss": "http://evil.example"}, {}),
    ({}, {"kid": "unknown-kid"}),
])
def test_tokens_failing_a_check_are_never_forwarded_or_cached(keys, plugins, claims, header):
    keys.claims, keys.header = claims, header
    plugin = plugins(keys.config())
    for _ in range(2):
        r = run(plugin, {"Authorization": basic_authorization("x", "y")})
        assert r.status == 500 and r.upstream is None
    assert keys.token_requests == 2


def test_token_signed_with_another_key_is_refused(keys, plugins):
    # The JWKS publishes the server's key under kid k1; the token names k1 but
    # was signed with another key: a forged signature.
    forger = ec.generate_private_key(ec.SECP256R1())
    keys.sign = lambda key=None: KeyServer.sign(keys, forger)
    r = run(plugins(keys.config()), {"Authorization": basic_authorization("x", "y")})
    assert r.status == 500 and any("verification" in json.dumps(e) for e in r.logs)


def test_alg_none_and_hmac_are_refused(keys, plugins):
    plugin = plugins(keys.config())
    now = int(time.time())
    body = {"iss": keys.base, "aud": API, "iat": now, "exp": now + 600}
    forged = [jwt.encode(body, None, algorithm="none"),
              jwt.encode(body, "k" * 32, algorithm="HS256", headers={"kid": "k1"})]
    for token in forged:
        keys.sign = lambda key=None, token=token: token
        assert run(plugin, {"Authorization": basic_authorization("x", "y")}).status == 500


def test_unknown_kid_fetches_the_jwks_again(keys, plugins):
    plugin = plugins(keys.config())
    assert run(plugin, {"Authorization": basic_authorization("a", "1")}).status == 200
    assert keys.jwks_fetches == 1
    # The server rotates its key: the next token names a kid the plugin has not seen.
    keys.key, keys.kid = ec.generate_private_key(ec.SECP256R1()), "k2"
    time.sleep(REFRESH_INTERVAL)
    assert run(plugin, {"Authorization": basic_authorization("b", "2")}).status == 200
    assert keys.jwks_fetches == 2
    # Unknown kids do not make the plugin fetch the JWKS on every request.
    keys.header = {"kid": "never-published"}
    for i in range(5):
        assert run(plugin, {"Authorization": basic_authorization("c", str(i))}).status == 500
    assert keys.jwks_fetches <= 3       # at most one more, within REFRESH_INTERVAL


# -- the store ----------------------------------------------------------------------------


def test_two_nodes_share_one_token_through_redis(auth, plugins, redis_disposable):
    config = conf(auth, store=store(redis_disposable))
    config["store"]["redis"]["database"] = 5                      # store.redis.database
    a, b = plugins(node(config, 1)), plugins(node(config, 2))
    ra = run(a, basic(auth, "svc-admin"))
    rb = run(b, basic(auth, "svc-admin"))
    assert ra.status == rb.status == 200 and ra.bearer == rb.bearer
    assert redis_disposable.client().keys("*") == []
    raw = redis_disposable.client(db=5)
    keys = [k for k in raw.keys("*") if not k.endswith(b":lease")]
    assert keys and all(k.startswith(b"cc:") for k in keys)        # store.key_prefix
    secret = auth.secret_of("svc-admin").encode()
    for key in keys:
        value = raw.get(key)
        assert secret not in key and b"svc-admin" not in key      # a keyed hash
        assert ra.bearer.encode() not in value and b"svc-admin" not in value   # sealed


def test_concurrent_requests_on_two_nodes_ask_for_one_token(auth, plugins, redis_disposable):
    config = conf(auth, store=store(redis_disposable))
    nodes = [plugins(node(config, 1)), plugins(node(config, 2))]
    barrier = threading.Barrier(20)
    results: List[Outcome] = []

    def one(i):
        barrier.wait()
        results.append(run(nodes[i % 2], basic(auth, "svc-herd")))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == [200] * 20
    # The server issues a new token (new jti) per request: one token means one request.
    assert len({r.bearer for r in results}) == 1


def test_store_secret_is_required_with_redis(auth, plugins, redis_disposable):
    config = conf(auth, store={"redis": {"endpoints": [redis_disposable.address]}})
    r = run(plugins(config), basic(auth, "svc-admin"))
    assert r.status == 500 and redis_disposable.client().keys("*") == []


def test_configs_with_another_store_secret_share_nothing(auth, plugins, redis_disposable):
    a = plugins(conf(auth, store=store(redis_disposable)))
    other = store(redis_disposable, secret="fedcba9876543210fedcba9876543210")
    b = plugins(conf(auth, store=other))
    ta, tb = run(a, basic(auth, "svc-admin")).bearer, run(b, basic(auth, "svc-admin")).bearer
    assert ta != tb


def test_redis_down_costs_nothing_but_sharing(auth, plugins, redis_disposable):
    plugin = plugins(conf(auth, store=store(redis_disposable)))
    redis_disposable.stop()
    for who in ("svc-admin", "svc-dev"):
        assert run(plugin, basic(auth, who)).status == 200


def _shared(auth, plugins, store_conf, who):
    config = conf(auth, store=store_conf)
    a, b = plugins(node(config, 1)), plugins(node(config, 2))
    return run(a, basic(auth, who)).bearer == run(b, basic(auth, who)).bearer


def test_store_redis_sentinel(auth, plugins, redis_sentinel):
    assert _shared(auth, plugins, {"secret": STORE_SECRET, "redis": {
        "endpoints": redis_sentinel.endpoints, "password": PASSWORD,
        "sentinel": {"master_set": MASTER_SET, "password": SENTINEL_PASSWORD}}}, "svc-admin")


def test_store_redis_cluster(auth, plugins, redis_cluster):
    assert _shared(auth, plugins, {"secret": STORE_SECRET, "redis": {
        "endpoints": redis_cluster.endpoints, "password": PASSWORD, "cluster": True,
        "database": 3}}, "svc-admin")


def test_store_redis_tls(auth, plugins, redis_tls, tls_certs):
    assert _shared(auth, plugins, {"secret": STORE_SECRET, "redis": {
        "endpoints": [redis_tls.address], "password": PASSWORD, "database": 2,
        "tls": {"enabled": True, "ca": tls_certs["ca"], "cert": tls_certs["client_cert"],
                "key": tls_certs["client_key"]}}}, "svc-admin")


def test_no_secret_or_token_in_any_log(auth, plugins, capfd, redis_disposable):
    gw_secret = auth.secret_of("svc-gw")
    fixed = plugins(conf(auth, client_id="svc-gw", client_secret=gw_secret,
                         store=store(redis_disposable)))
    callers = plugins(conf(auth, claims="Equals(`grp`, `nobody`)"))
    wrong = plugins(conf(auth, client_id="svc-gw", client_secret="wrong-gw-secret"))
    outcomes = [run(fixed, {}), run(callers, basic(auth, "svc-admin")),
                run(callers, basic(auth, "svc-admin", "wrong-caller-secret")), run(wrong, {})]
    assert [o.status for o in outcomes] == [200, 403, 401, 500]
    text = capfd.readouterr().err + json.dumps([(o.logs, o.credential) for o in outcomes])
    for secret in (gw_secret, auth.secret_of("svc-admin"), "wrong-gw-secret",
                   "wrong-caller-secret", STORE_SECRET, ACL_PASSWORD, outcomes[0].bearer):
        assert secret not in text


# -- schema and documentation ---------------------------------------------------------


def test_readme_option_table_is_generated_from_the_schema():
    from pathlib import Path

    from kong_oauth2_introspection.client_credentials.config import SCHEMA
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "<!-- cc-options:start -->\n" + SCHEMA.markdown_table() + "<!-- cc-options:end -->" \
        in readme


def test_every_seed_option_has_a_field_named_after_it():
    from kong_oauth2_introspection.client_credentials.config import SCHEMA
    seed = {"url", "clientID", "clientSecret", "audience", "claims", "forwardHeaders",
            "usernameClaim", "clientConfig.tls.ca", "clientConfig.tls.cert",
            "clientConfig.tls.key", "clientConfig.tls.insecureSkipVerify",
            "clientConfig.timeoutSeconds", "clientConfig.maxRetries", "store.keyPrefix",
            "store.secret", "store.redis.endpoints", "store.redis.username",
            "store.redis.password", "store.redis.database", "store.redis.cluster",
            "store.redis.tls.caBundle", "store.redis.tls.cert", "store.redis.tls.key",
            "store.redis.tls.insecureSkipVerify", "store.redis.sentinel.masterSet",
            "store.redis.sentinel.username", "store.redis.sentinel.password"}
    table = SCHEMA.markdown_table()
    assert {name for name in seed if "`%s`" % name not in table} == set()


def test_the_seeds_advanced_example_is_a_valid_config():
    from kong_oauth2_introspection.client_credentials.config import SCHEMA, Config
    example = {"url": "https://tenant.auth0.com/oauth/token", "client_id": "my-client",
               "client_secret": "my-secret", "audience": "https://api.example.com",
               "forward_headers": {"Group": "grp", "Expires-At": "exp"},
               "claims": "Equals(`grp`, `admin`)"}
    assert SCHEMA.validate(example)[1] == []
    parsed = Config.parse(dict(example, route_id="r-1", __seq__=3))   # Kong's own keys ignored
    assert parsed.timeout == 5 and parsed.max_retries == 3        # the seed's defaults
    assert "my-secret" not in repr(parsed)


def test_a_server_dripping_its_answer_is_cut_at_timeout_seconds(auth, plugins):
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def drip():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n")
        while not stop.wait(0.2):     # a byte at a time: every read succeeds in time
            try:
                conn.sendall(b" ")
            except OSError:
                break
        conn.close()
    threading.Thread(target=drip, daemon=True).start()
    url = "http://127.0.0.1:%d/token" % listener.getsockname()[1]
    try:
        plugin = plugins(dict(keys_of(auth), url=url, audience=API,
                              client_config={"timeout_seconds": 1, "max_retries": 0}))
        started = time.monotonic()
        r = run(plugin, basic(auth, "svc-admin"))
        assert r.status == 500 and time.monotonic() - started < 2.0
    finally:
        stop.set()
        listener.close()


def test_a_failed_leader_does_not_keep_the_other_node_waiting(auth, plugins, redis_disposable):
    # Node 1 holds the cluster lease while the server refuses the client; node 2's
    # callers take the lease over when it is released instead of waiting it out.
    with IdPDouble(lambda f, h: Reply(401, {"error": "invalid_client"}, delay=0.3)) as idp:
        config = dict(keys_of(auth), url=idp.url, audience=API, store=store(redis_disposable))
        nodes = [plugins(node(config, 1)), plugins(node(config, 2))]
        barrier = threading.Barrier(10)
        results: List[Outcome] = []

        def one(i):
            barrier.wait()
            results.append(run(nodes[i % 2], basic(auth, "svc-admin", "wrong")))
        started = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status for r in results] == [401] * 10
        assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("forward", [{"Authorization": "sub"}, {"Group": "grp", "group": "sub"}])
def test_forward_headers_cannot_replace_the_token_or_repeat(auth, plugins, forward):
    r = run(plugins(conf(auth, forward_headers=forward)), basic(auth, "svc-admin"))
    assert r.status == 500 and r.upstream is None
