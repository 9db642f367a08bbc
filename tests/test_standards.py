"""Issue 13, standards reach, end to end: the real plugin server driven by the Kong
stand-in, asking the real oidc-provider about the tokens it issued.

- scopes_required / audience_required / issuers_allowed (openid-connect's names);
- RFC 9728 protected resource metadata and its ``resource_metadata`` challenge.
"""

import re

import pytest
import requests

from authserver_fixture import AuthServer, client
from test_plugin_kong import bearer

API = "https://api.test/orders"
OTHER_API = "https://other.test/"


@pytest.fixture(scope="module")
def idp():
    """oidc-provider with the default clients plus one whose tokens carry an audience."""
    extra = [client("svc-app", scope="read", audience=[API, OTHER_API],
                    claims={"username": "svc"})]
    with AuthServer(extra_clients=extra) as server:
        yield server


def conf(idp, **extra):
    return dict({"introspection_url": idp.introspection_url,
                 "authorization_value": idp.introspector_authorization}, **extra)


def challenge_params(result):
    """The auth-params of the Bearer challenge, as a dict."""
    header = result.response_headers["WWW-Authenticate"]
    assert header.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


# -- scopes_required: any-of lists of all-of sets -----------------------------

def test_scopes_required_any_of_all_of(kong, idp):
    inst = kong.configure(conf(idp, scopes_required=["read write", "admin"]))
    for scope in ("read write", "admin", "read write admin"):
        token = idp.issue_token("alice-app", scope=scope)
        r = kong.request(inst, "GET", "/", headers=bearer(token))
        assert r.status == 200, (scope, r.body)
        assert r.upstream.headers["X-Credential-Scope"] == scope
    for scope in ("read", "write", None):
        token = idp.issue_token("alice-app", scope=scope)
        r = kong.request(inst, "GET", "/", headers=bearer(token))
        assert r.status == 403, scope
        assert r.json["error"] == "insufficient_scope"
        # RFC 6750 3: the challenge names the scope to ask for (the first alternative).
        params = challenge_params(r)
        assert params["error"] == "insufficient_scope" and params["scope"] == "read write"
        assert not r.proxied


def test_scope_failure_never_falls_back_to_anonymous(kong, idp):
    anon = kong.add_consumer(username="anon-scope")
    inst = kong.configure(conf(idp, scopes_required=["admin"], anonymous=anon["id"]))
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("bob-app", scope="read")))
    assert r.status == 403 and r.consumer is None


def test_scopes_and_audience_from_other_claims(kong, idp):
    # alice-app's answers carry "areas": ["office", "home"] and "grp": "admin"
    # (bob-app's: "grp": "dev"): the claims openid-connect's *_claim options name.
    inst = kong.configure(conf(idp, scopes_required=["home"], scopes_claim=["areas"],
                               audience_required=["admin"], audience_claim=["grp"]))
    assert kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app"))).status \
        == 200
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("bob-app")))
    assert r.status == 401 and r.json["error"] == "invalid_token"
    lab = kong.configure(conf(idp, scopes_required=["lab"], scopes_claim=["areas"]))
    r = kong.request(lab, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
    assert r.status == 403 and challenge_params(r)["scope"] == "lab"


# -- audience_required / issuers_allowed: 401 invalid_token -------------------

def test_audience_required(kong, idp):
    inst = kong.configure(conf(idp, audience_required=[API]))
    ours = idp.issue_token("svc-app", scope="read", resource=API)
    r = kong.request(inst, "GET", "/", headers=bearer(ours))
    assert r.status == 200, r.body
    for token in (idp.issue_token("svc-app", scope="read", resource=OTHER_API),
                  idp.issue_token("alice-app", scope="read")):      # no aud at all
        r = kong.request(inst, "GET", "/", headers=bearer(token))
        assert r.status == 401 and r.json["error"] == "invalid_token"
        assert challenge_params(r)["error"] == "invalid_token"
        assert not r.proxied


def test_audience_any_of(kong, idp):
    inst = kong.configure(conf(idp, audience_required=["https://nowhere.test/", OTHER_API]))
    token = idp.issue_token("svc-app", scope="read", resource=OTHER_API)
    assert kong.request(inst, "GET", "/", headers=bearer(token)).status == 200


def test_issuers_allowed(kong, idp):
    token = idp.issue_token("alice-app", scope="read")
    ok = kong.configure(conf(idp, issuers_allowed=["https://elsewhere.test", idp.issuer]))
    assert kong.request(ok, "GET", "/", headers=bearer(token)).status == 200
    wrong = kong.configure(conf(idp, issuers_allowed=["https://elsewhere.test"]))
    r = kong.request(wrong, "GET", "/", headers=bearer(token))
    assert r.status == 401 and r.json["error"] == "invalid_token"


def test_audience_failure_falls_back_to_anonymous(kong, idp):
    anon = kong.add_consumer(username="anon-aud")
    inst = kong.configure(conf(idp, audience_required=[API], anonymous=anon["id"]))
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
    assert r.status == 200 and r.consumer["id"] == anon["id"]
    assert r.upstream.headers["X-Anonymous-Consumer"] == "true"


def test_shortcuts_and_claims_must_all_hold(kong, idp):
    inst = kong.configure(conf(idp, scopes_required=["read"], issuers_allowed=[idp.issuer],
                               claims="Equals(`grp`, `admin`)"))
    alice = idp.issue_token("alice-app", scope="read")
    assert kong.request(inst, "GET", "/", headers=bearer(alice)).status == 200
    bob = idp.issue_token("bob-app", scope="read")           # scope ok, grp is dev
    r = kong.request(inst, "GET", "/", headers=bearer(bob))
    assert r.status == 403 and "scope" not in challenge_params(r)
    alice_write = idp.issue_token("alice-app", scope="write")  # grp ok, no read
    r = kong.request(inst, "GET", "/", headers=bearer(alice_write))
    assert r.status == 403 and challenge_params(r)["scope"] == "read"


def test_one_cached_answer_judged_by_each_config(kong, idp):
    token = idp.issue_token("alice-app", scope="read")
    lenient = kong.configure(conf(idp))
    strict = kong.configure(conf(idp, scopes_required=["admin"]))
    assert kong.request(lenient, "GET", "/", headers=bearer(token)).status == 200
    assert kong.request(strict, "GET", "/", headers=bearer(token)).status == 403
    assert kong.request(lenient, "GET", "/", headers=bearer(token)).status == 200


# -- RFC 9728 protected resource metadata -------------------------------------

def metadata_conf(idp, **extra):
    return conf(idp, resource_metadata={"resource": API, "authorization_servers": [idp.issuer],
                                        "scopes_supported": ["read", "write"],
                                        "resource_name": "Orders"}, **extra)


def test_metadata_is_served_without_a_token(kong, idp):
    inst = kong.configure(metadata_conf(idp))
    r = kong.request(inst, "GET", "/.well-known/oauth-protected-resource/orders")
    assert r.status == 200 and not r.proxied
    assert r.json == {"resource": API, "authorization_servers": [idp.issuer],
                      "scopes_supported": ["read", "write"], "resource_name": "Orders",
                      "bearer_methods_supported": ["header", "body", "query"]}
    # Any other method there is an ordinary request: it needs a token.
    assert kong.request(inst, "POST", "/.well-known/oauth-protected-resource/orders").status == 401


def test_every_challenge_names_the_metadata(kong, idp):
    url = "https://api.test/.well-known/oauth-protected-resource/orders"
    inst = kong.configure(metadata_conf(idp, scopes_required=["admin"]))
    missing = kong.request(inst, "GET", "/orders")
    invalid = kong.request(inst, "GET", "/orders", headers=bearer("not-a-token"))
    bad = kong.request(inst, "GET", "/orders", headers=bearer("a b"))
    scope = kong.request(inst, "GET", "/orders",
                         headers=bearer(idp.issue_token("bob-app", scope="read")))
    for r, status in ((missing, 401), (invalid, 401), (bad, 401), (scope, 403)):
        assert r.status == status
        assert challenge_params(r)["resource_metadata"] == url, r.response_headers
    assert challenge_params(scope)["scope"] == "admin"


def test_a_client_finds_its_way_from_the_challenge(kong, idp):
    """RFC 9728 section 5: challenge -> metadata -> authorization server -> token -> 200."""
    inst = kong.configure(metadata_conf(idp, token_source={"header": "Authorization",
                                                           "header_auth_scheme": "Bearer"}))
    refused = kong.request(inst, "GET", "/orders")
    url = challenge_params(refused)["resource_metadata"]
    assert url.startswith("https://api.test/")
    document = kong.request(inst, "GET", url[len("https://api.test"):]).json
    assert document["bearer_methods_supported"] == ["header"]
    issuer = document["authorization_servers"][0]
    discovery = requests.get(issuer + "/.well-known/openid-configuration", timeout=10).json()
    answer = requests.post(discovery["token_endpoint"], timeout=10,
                           data={"grant_type": "client_credentials", "scope": "read"},
                           auth=("alice-app", idp.secret_of("alice-app"))).json()
    r = kong.request(inst, "GET", "/orders", headers=bearer(answer["access_token"]))
    assert r.status == 200


def test_metadata_names_sender_constraints(kong, idp):
    inst = kong.configure(metadata_conf(idp, proof_of_possession_dpop="strict",
                                        proof_of_possession_mtls="strict"))
    document = kong.request(inst, "GET", "/.well-known/oauth-protected-resource/orders").json
    assert document["dpop_bound_access_tokens_required"] is True
    assert "ES256" in document["dpop_signing_alg_values_supported"]
    assert document["tls_client_certificate_bound_access_tokens"] is True


def test_configured_path(kong, idp):
    inst = kong.configure(conf(idp, resource_metadata={"resource": "https://api.test/",
                                                       "path": "/meta"}))
    r = kong.request(inst, "GET", "/meta")
    assert r.status == 200 and r.json["resource"] == "https://api.test/"
    assert challenge_params(kong.request(inst, "GET", "/"))["resource_metadata"] == \
        "https://api.test/meta"


def test_round_trips(kong, idp):
    """Not configured: the cache hit stays at 3 PDK calls; metadata adds one (the path)."""
    token = idp.issue_token("alice-app", scope="read")
    plain = kong.configure(conf(idp, scopes_required=["read"], audience_required=[],
                                issuers_allowed=[idp.issuer]))
    served = kong.configure(metadata_conf(idp))
    for inst, calls in ((plain, 3), (served, 4)):
        kong.request(inst, "GET", "/", headers=bearer(token))
        hit = kong.request(inst, "GET", "/", headers=bearer(token))
        assert hit.status == 200 and len(hit.pdk_calls) == calls, hit.pdk_calls


@pytest.mark.parametrize("bad, field", [
    ({"resource_metadata": {"resource": "https://api.test/#x"}}, "resource_metadata.resource"),
    ({"resource_metadata": {"resource": "https://api.test/", "path": "/a b"}},
     "resource_metadata.path"),
    ({"scopes_required": ['re"ad']}, "scopes_required"),
])
def test_unusable_settings_are_refused_by_the_config(bad, field):
    from kong_oauth2_introspection.introspection.config import Config, ConfigError
    with pytest.raises(ConfigError) as err:
        Config.parse(dict({"introspection_url": "http://idp/i", "authorization_value": "x"},
                          **bad))
    assert err.value.field == "config." + field


def test_the_standards_example_passes_check():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "kong_oauth2_introspection.cli", "check",
                          str(root / "examples" / "standards.kong.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 oauth2-introspection entries, all valid" in run.stdout
