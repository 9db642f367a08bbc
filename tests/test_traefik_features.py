"""What Traefik Hub's introspection middleware offers, through the real plugin
server: token sources, the claims language, claim headers, mTLS, retries,
templated introspection headers, and the offline config check."""

import json
import ssl
import subprocess
import sys
import time
from urllib.parse import unquote_to_bytes

import pytest

from certs import make_ca_and_certs
from idp_double import IdPDouble, Reply, active
from test_claims import SEED_EXAMPLES
from test_plugin_kong import TOKEN, bearer, config

# The seeds' sample document, as the IdP's answer.
SAMPLE = {"active": True, "grp": "admin", "scope": "reader writer deploy",
          "referrer": "http://example.com/foo/bar", "areas": ["office", "home"],
          "user": {"name": "John Snow", "status": "undead"}, "a.b": "dotted",
          "exp": int(time.time()) + 3600}


@pytest.fixture
def idp():
    with IdPDouble(lambda f, h: Reply(200, SAMPLE)) as double:
        yield double


@pytest.mark.parametrize("source,request_,where", [
    ({"header": "X-Api-Token"}, {"headers": {"X-Api-Token": TOKEN}}, "header"),
    ({"header": "Authorization", "header_auth_scheme": "Bearer"}, {"headers": bearer()}, "header"),
    ({"query": "tok"}, {"query": {"tok": TOKEN}}, "query"),
    ({"cookie": "session"}, {"headers": {"Cookie": f"theme=dark; session={TOKEN}"}}, "cookie"),
])
def test_each_token_source(kong, idp, source, request_, where):
    inst = kong.configure(config(idp, token_source=source, hide_credentials=True))
    r = kong.request(inst, "GET", "/", **request_)
    assert r.status == 200 and idp.tokens == [TOKEN]
    up = r.upstream
    assert TOKEN not in json.dumps({"h": dict(up.headers), "q": up.query})
    if where == "cookie":
        assert up.headers["Cookie"] == "theme=dark"


def test_configured_sources_replace_the_enterprise_ones(kong, idp):
    inst = kong.configure(config(idp, token_source={"cookie": "session"}))
    assert kong.request(inst, "GET", "/", headers=bearer()).status == 401
    assert kong.request(inst, "GET", "/", query={"access_token": TOKEN}).status == 401
    assert idp.calls == []


@pytest.mark.parametrize("expression", SEED_EXAMPLES + [
    "Equals(`a\\.b`, `dotted`)",
])
def test_seed_examples_pass(kong, idp, expression):
    inst = kong.configure(config(idp, claims=expression))
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 200, expression


def test_failing_claims_are_403_insufficient_scope(kong, idp):
    inst = kong.configure(config(idp, claims="Equals(`grp`, `testers`) || !Contains(`areas`, `home`)"))
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 403
    assert r.json["error"] == "insufficient_scope"
    assert r.response_headers["WWW-Authenticate"].startswith(
        'Bearer realm="service", error="insufficient_scope"')
    assert not any(k.lower().startswith("x-credential") for k in r.upstream.headers)


def test_lenient_route_never_lets_a_cached_token_through_a_strict_one(kong, idp):
    lenient = kong.configure(config(idp))
    strict = kong.configure(config(idp, claims="Equals(`grp`, `root`)"))
    assert kong.request(lenient, "GET", "/", headers=bearer()).status == 200
    assert kong.request(strict, "GET", "/", headers=bearer()).status == 403
    assert len(idp.calls) == 1   # same IdP, same client: one shared cache entry


def test_unparsable_claims_answer_500_and_log_the_column(kong, idp):
    inst = kong.configure(config(idp, claims="Equals(`grp`, `admin`"))
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 500
    assert any("config.claims" in m and "col" in m for _, m in r.logs)


def test_forward_headers_and_authorization_stripping(kong, idp):
    inst = kong.configure(config(idp, forward_authorization=False, forward_headers={
        "X-Group": "grp", "X-User-Name": "user.name", "X-Areas": "areas", "X-Missing": "nope"}))
    r = kong.request(inst, "GET", "/", headers=dict(bearer(), **{"X-Group": "root"}))
    up = r.upstream.headers
    assert up["X-Group"] == "admin" and up["X-User-Name"] == "John Snow"
    assert up["X-Areas"] == "office,home"
    assert up.get("X-Missing", "").strip() == ""   # Kong sends an empty value as " "
    assert "Authorization" not in up


def test_username_claim_names_the_caller_in_kongs_log(kong, idp):
    inst = kong.configure(config(idp, username_claim="user.name"))
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.serialize["authenticated_entity.username"] == "John Snow"
    assert r.credential["username"] == "John Snow"


def test_templated_introspection_headers(kong, idp):
    inst = kong.configure(config(idp, custom_introspection_headers={
        "X-Original-Method": "{{method}}", "X-Original-Uri": "https://{{host}}{{path}}",
        "X-Caller-Tenant": "{{header.x-tenant}}", "X-Plain": "no {template} here"}))
    kong.request(inst, "PUT", "/a/b", headers=dict(bearer(), **{"X-Tenant": "acme", "Host": "api.test"}))
    h = idp.calls[0].headers
    assert h["X-Original-Method"] == "PUT" and h["X-Caller-Tenant"] == "acme"
    assert h["X-Original-Uri"].endswith("/a/b") and h["X-Plain"] == "no {template} here"


def test_unknown_template_placeholder_is_a_config_error(kong, idp):
    inst = kong.configure(config(idp, custom_introspection_headers={"X-A": "{{cookie.x}}"}))
    r = kong.request(inst, "GET", "/", headers=bearer())
    assert r.status == 500 and idp.calls == []
    assert any("custom_introspection_headers" in m for _, m in r.logs)


def test_retries_against_an_endpoint_that_fails_twice(kong):
    replies = iter([Reply(503), Reply(drop=True)])
    with IdPDouble(lambda f, h: next(replies, Reply(200, SAMPLE))) as idp:
        inst = kong.configure(config(idp, max_retries=2))
        assert kong.request(inst, "GET", "/", headers=bearer()).status == 200
        assert len(idp.calls) == 3


def test_no_retries_by_default(kong):
    with IdPDouble(lambda f, h: Reply(503)) as idp:
        inst = kong.configure(config(idp))
        assert kong.request(inst, "GET", "/", headers=bearer()).status == 500
        assert len(idp.calls) == 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_ca_and_certs(tmp_path_factory.mktemp("pki")), \
        make_ca_and_certs(tmp_path_factory.mktemp("other"), ca_name="Other CA")


def _mtls_server_context(pems):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pems["server_cert_path"], pems["server_key_path"])
    ctx.load_verify_locations(cadata=pems["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED   # a client certificate is mandatory
    return ctx


def test_mtls_to_the_idp(kong, pki):
    pems, _ = pki
    with IdPDouble(lambda f, h: Reply(200, SAMPLE), tls=_mtls_server_context(pems)) as idp:
        good = kong.configure(config(idp, client_tls={
            "ca": pems["ca"], "cert": pems["client_cert"], "key": pems["client_key"]}))
        assert kong.request(good, "GET", "/", headers=bearer()).status == 200
        no_cert = kong.configure(config(idp, client_tls={"ca": pems["ca"]}))
        assert kong.request(no_cert, "GET", "/", headers=bearer("tok-2")).status == 500
    assert pems["client_key"].splitlines()[1] not in kong.server_log()


def test_wrong_ca_is_refused(kong, pki):
    pems, other = pki
    with IdPDouble(lambda f, h: Reply(200, SAMPLE), tls=_mtls_server_context(pems)) as idp:
        inst = kong.configure(config(idp, client_tls={
            "ca": other["ca"], "cert": pems["client_cert"], "key": pems["client_key"]}))
        r = kong.request(inst, "GET", "/", headers=bearer())
        assert r.status == 500 and idp.calls == []


def test_insecure_skip_verify_warns(kong, pki):
    pems, _ = pki
    with IdPDouble(lambda f, h: Reply(200, SAMPLE), tls=_mtls_server_context(pems)) as idp:
        inst = kong.configure(config(idp, client_tls={
            "insecure_skip_verify": True, "cert": pems["client_cert"], "key": pems["client_key"]}))
        assert kong.request(inst, "GET", "/", headers=bearer("tok-3")).status == 200
    assert "insecure_skip_verify" in kong.server_log()


def _check(text):
    from conftest import plugin_command
    return subprocess.run(plugin_command() + ["check", "-"], input=text, capture_output=True,
                          text=True)


def test_check_command_reports_paths_and_exit_codes():
    bad = """
_format_version: "3.0"
services:
- name: orders
  url: http://orders
  plugins:
  - name: oauth2-introspection
    config: {introspection_url: "http://idp/i", authorization_value: "Basic x", consumer_by: email}
plugins:
- name: key-auth
- name: cors
- name: oauth2-introspection
  config:
    introspection_url: http://idp/i
    authorization_value: Basic x
    claims: "Equals(`grp`, `admin`"
"""
    run = _check(bad)
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert "services[0].plugins[0].config.consumer_by: expected one of: username, client_id" in lines
    claims_line, = [l for l in lines if l.startswith("plugins[2].config.claims: col ")]
    assert "expected" in claims_line
    good = bad.replace("consumer_by: email", "consumer_by: client_id").replace(
        '"Equals(`grp`, `admin`"', '"Equals(`grp`, `admin`)"')
    # valid configs but no fail-closed guard on either scope: still refused
    unguarded = _check(good)
    assert unguarded.returncode == 1
    assert all("without the post-function guard" in line
               for line in unguarded.stdout.splitlines()), unguarded.stdout
    # the guard on both scopes, as `guard` renders it: all valid
    import json as _json
    from kong_oauth2_introspection.ops.guard import post_function_entry
    entry = _json.dumps(post_function_entry({}))
    guarded = good.replace("  plugins:\n  - name: oauth2-introspection",
                           "  plugins:\n  - " + entry + "\n  - name: oauth2-introspection", 1)
    guarded = guarded.replace("plugins:\n- name: key-auth", "plugins:\n- " + entry + "\n- name: key-auth", 1)
    run = _check(guarded)
    assert run.returncode == 0, run.stdout
    assert "2 oauth2-introspection entries, all valid" in run.stdout


def test_check_the_shipped_kong_yml():
    from conftest import ROOT, plugin_command
    run = subprocess.run(plugin_command() + ["check", str(ROOT / "kong.yml")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_templated_header_carries_the_clients_bytes_percent_encoded(kong):
    with IdPDouble(lambda f, h: Reply(200, SAMPLE)) as idp:
        inst = kong.configure(config(idp, custom_introspection_headers={
            "X-Client-Note": "{{header.x-note}}"}))
        r = kong.request(inst, "GET", "/", headers=[("X-Note", b"caf\xc3\xa9 100% \xff"),
                                                     ("Authorization", "Bearer " + TOKEN)])
        assert r.status == 200, r
        sent = idp.calls[0].headers["X-Client-Note"]
        assert sent == "caf%C3%A9%20100%25%20%FF"   # visible ASCII only
        assert unquote_to_bytes(sent) == b"caf\xc3\xa9 100% \xff"   # the exact bytes
