"""The plugin under the facts of real Kong 3.9 (../shared/design/kong-plugin-server.md),
through the stand-in: scoped configs, failed PDK reads, 100-line reads, bytes that
are not UTF-8, and identity headers that must never pass spoofed.

Every request here goes through the real plugin server. The stand-in raises
FailedOpen for any request Kong would have passed on without the plugin, so a
test that ends normally also proves none did."""

import json
import time

import pytest

from conftest import plugin_command
from idp_double import INACTIVE, IdPDouble, active
from kong import KongStandIn, SchemaViolation

SECRET = "Basic a29uZzpzM2NyZXQtdmFsdWU="
TOKEN = "tok-real-kong-0123456789"
SPOOFS = [("X-Consumer-ID", "evil"), ("X-Consumer-Username", "admin"),
          ("X-Consumer-Custom-ID", "root"), ("X-Credential-Scope", "admin"),
          ("X-Credential-Client-ID", "evil-app"), ("X-Credential-Whatever", "x"),
          ("X-Anonymous-Consumer", "false"), ("X-Tenant", "evil-tenant")]


def config(idp, **extra):
    return dict({"introspection_url": idp.url, "authorization_value": SECRET}, **extra)


def fillers(n):
    return [("X-Filler-%d" % i, "v") for i in range(n)]


@pytest.fixture(scope="module")
def idp():
    def behaviour(form, headers):
        if form.get("token", "").startswith("tok-"):
            return active(exp=int(time.time()) + 3600, client_id="app-1", scope="read",
                          username="alice", tenant="acme")
        return INACTIVE
    with IdPDouble(behaviour) as double:
        yield double


@pytest.fixture(scope="module")
def kong28():
    """Kong 2.8: a failed PDK read answers plugin.StepError (kong-pdk raises it)."""
    with KongStandIn(plugin_command(), kong_version="2.8") as standin:
        yield standin


def no_spoof_reached(up, allowed=("X-Tenant",)):
    for name, value in SPOOFS:
        if name in allowed:
            continue
        assert value not in up.headers.getall(name), (name, up.headers.getall(name))


# -- 1. every config real Kong sends ---------------------------------------------------

@pytest.mark.parametrize("scope", [dict(route=True), dict(service=True),
                                   dict(route=True, service=True, instance_name="orders-auth"),
                                   dict()])
def test_scoped_configs_are_accepted(kong, idp, scope):
    inst = kong.configure(config(idp, custom_claims_forward=[], forward_headers={}), **scope)
    for key in ("route_id", "service_id"):
        assert (key in inst.conf) == (key[:-3] in scope)
    assert ("plugin_instance_name" in inst.conf) == ("instance_name" in scope)
    r = kong.request(inst, headers={"Authorization": "Bearer " + TOKEN})
    assert r.status == 200, r
    assert r.upstream.headers["X-Credential-Client-ID"] == "app-1"
    assert kong.request(inst).status == 401


def test_consumer_scope_is_refused_by_the_schema_like_key_auth(kong, idp):
    # The dumped schema says no_consumer (an authentication plugin cannot be
    # consumer-scoped): Kong's Admin API refuses it before any request.
    with pytest.raises(SchemaViolation):
        kong.configure(config(idp), consumer=True)


def test_equal_plugin_fields_share_one_runtime_whatever_kong_adds(idp):
    from kong_oauth2_introspection.introspection.handler import RUNTIMES, Plugin
    base = config(idp, ttl=12)
    a = Plugin(dict(base, route_id="r-1", __seq__=1, __plugin_id="p-1", __key__="k1"))
    b = Plugin(dict(base, service_id="s-9", plugin_instance_name="x", __seq__=7,
                    __ws_id="w", some_future_key={"x": 1}))
    c = Plugin(dict(base, ttl=13, route_id="r-1"))
    try:
        assert a.runtime is b.runtime
        assert c.runtime is not a.runtime
        assert not hasattr(a.runtime, "error")  # usable, not an Unusable config
    finally:
        for p in (a, b, c):
            p.close()
    assert len(RUNTIMES) <= RUNTIMES.idle_max + 1


# -- 2. a failed PDK read is client input ------------------------------------------------

@pytest.mark.parametrize("which", ["3.9", "2.8"])
@pytest.mark.parametrize("method, content_type, body", [
    ("POST", "application/json", b'{"access_token": '),         # JSON that does not decode
    ("POST", "text/plain", b"access_token=" + TOKEN.encode()),   # unsupported type
    ("POST", None, b"access_token=" + TOKEN.encode()),           # no content type
    ("GET", None, b""),                                          # no body at all
    ("POST", "application/x-www-form-urlencoded",                 # spooled past the buffer
     b"pad=" + b"x" * 9000 + b"&access_token=" + TOKEN.encode()),
])
def test_unreadable_body_means_no_body(kong, kong28, idp, which, method, content_type, body):
    standin = kong28 if which == "2.8" else kong
    inst = standin.configure(config(idp))
    headers = {"Content-Type": content_type} if content_type else {}
    r = standin.request(inst, method, "/", headers=headers, body=body)
    assert r.status == 401 and r.json["error"] == "invalid_request", r
    assert r.kong_error is None
    # The same broken body never gets in the way of a token in the header.
    headers["Authorization"] = "Bearer " + TOKEN
    r = standin.request(inst, method, "/", headers=headers, body=body)
    assert r.status == 200, r


def test_token_in_a_body_that_kong_can_read(kong, idp):
    inst = kong.configure(config(idp))
    for content_type, raw in [
            ("application/x-www-form-urlencoded", "a=1&access_token=" + TOKEN),
            ("application/json", json.dumps({"access_token": TOKEN, "a": {}})),
            ("multipart/form-data; boundary=XyZ",
             "--XyZ\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\n"
             + TOKEN + "\r\n--XyZ--\r\n")]:
        r = kong.request(inst, "POST", "/", headers={"Content-Type": content_type}, body=raw)
        assert r.status == 200, (content_type, r)


# -- 3. capped reads: writes never depend on them --------------------------------------

def test_spoofed_identity_headers_past_the_100th_line_never_reach_the_upstream(kong, idp):
    inst = kong.configure(config(idp, forward_headers={"X-Tenant": "tenant"}))
    headers = fillers(150) + SPOOFS + [("Authorization", "Bearer " + TOKEN)]
    r = kong.request(inst, headers=headers)
    assert r.status == 200, r
    up = r.upstream.headers
    no_spoof_reached(r.upstream, allowed=())
    assert up.getall("X-Credential-Scope") == ["read"] and up.getall("X-Tenant") == ["acme"]
    assert "X-Consumer-ID" not in up and "X-Credential-Whatever" not in up
    assert "X-Filler-149" in up  # everything else still goes upstream


def test_more_header_lines_than_the_plugin_can_read_is_400(kong, idp):
    inst = kong.configure(config(idp))
    r = kong.request(inst, headers=fillers(1000) + [("Authorization", "Bearer " + TOKEN)])
    assert r.status == 400 and r.json["error"] == "invalid_request"
    assert not r.proxied


def test_a_configured_token_header_repeated_after_the_100th_line_is_refused(kong, idp):
    inst = kong.configure(config(idp, token_source={"header": "X-Token"}))
    headers = [("X-Token", TOKEN)] + fillers(120) + [("X-Token", "tok-other")]
    before = len(idp.calls)
    r = kong.request(inst, headers=headers)
    assert r.status == 400 and r.json["error"] == "invalid_request", r
    assert len(idp.calls) == before


@pytest.mark.parametrize("path, extra, allowed", [
    ("anonymous", {}, ()),
    ("preflight", {"run_on_preflight": False}, ()),
    # Logical OR: the consumer headers belong to the plugin that authenticated.
    ("logical-or", {}, ("X-Consumer-ID", "X-Consumer-Username", "X-Consumer-Custom-ID",
                        "X-Anonymous-Consumer")),
])
def test_every_pass_path_clears_what_it_owns(kong, idp, path, extra, allowed):
    anon = kong.add_consumer(username="anon-%s" % path)
    inst = kong.configure(config(idp, anonymous=anon["id"],
                                 forward_headers={"X-Tenant": "tenant"}, **extra))
    headers = fillers(130) + SPOOFS
    kwargs = {}
    method = "GET"
    if path == "preflight":
        method = "OPTIONS"
    if path == "logical-or":
        kwargs = {"authenticated": {"id": "other-credential"}}
    r = kong.request(inst, method, "/", headers=headers, **kwargs)
    assert r.status == 200, r
    no_spoof_reached(r.upstream, allowed)
    up = r.upstream.headers
    assert "X-Credential-Whatever" not in up
    if path == "anonymous":
        assert up.getall("X-Consumer-ID") == [anon["id"]]
        assert up.getall("X-Anonymous-Consumer") == ["true"]
        assert r.consumer["id"] == anon["id"]


def test_hiding_a_query_token_keeps_every_other_argument(kong, idp):
    inst = kong.configure(config(idp, hide_credentials=True))
    args = ["a%d=%d" % (i, i) for i in range(130)]
    raw = "&".join(args[:120] + ["access_token=" + TOKEN] + args[120:] + ["flag", "e="])
    r = kong.request(inst, "GET", "/", query=raw)
    assert r.status == 200, r
    assert "access_token" not in r.upstream.raw_query
    # Kong 3.9 re-serializes the query it edits (a bare flag becomes "flag="):
    # what counts is that every other argument, the 101st and on included, is there.
    expected = {"a%d" % i: str(i) for i in range(130)}
    assert {k: v for k, v in r.upstream.query.items() if k.startswith("a")} == expected
    assert "flag" in r.upstream.query and r.upstream.query["e"] == ""


def test_hiding_a_body_token_keeps_every_other_field_and_file(kong, idp):
    inst = kong.configure(config(idp, hide_credentials=True))
    file_bytes = bytes(range(256)) * 4
    multipart = (b"--B0undary\r\nContent-Disposition: form-data; name=\"keep\"\r\n\r\nyes\r\n"
                 b"--B0undary\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\n"
                 + TOKEN.encode() + b"\r\n--B0undary\r\nContent-Disposition: form-data; "
                 b"name=\"up\"; filename=\"f.bin\"\r\nContent-Type: application/octet-stream"
                 b"\r\n\r\n" + file_bytes + b"\r\n--B0undary--\r\n")
    r = kong.request(inst, "POST", "/", body=multipart,
                     headers={"Content-Type": "multipart/form-data; boundary=B0undary"})
    assert r.status == 200, r
    assert TOKEN.encode() not in r.upstream.raw_body
    assert file_bytes in r.upstream.raw_body and b'name="keep"\r\n\r\nyes' in r.upstream.raw_body
    form = "&".join("f%d=%d" % (i, i) for i in range(150))
    r = kong.request(inst, "POST", "/", body=form + "&access_token=" + TOKEN + "&z=%FF",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 200 and r.upstream.body == form + "&z=%FF"
    r = kong.request(inst, "POST", "/", body=json.dumps({"access_token": TOKEN, "n": [1, {}]}),
                     headers={"Content-Type": "application/json"})
    assert r.status == 200 and json.loads(r.upstream.body) == {"n": [1, {}]}


# -- 4. bytes that are not UTF-8 -------------------------------------------------------

def test_a_header_byte_that_is_not_utf8_never_opens_the_door(kong, idp):
    inst = kong.configure(config(idp))
    r = kong.request(inst, headers=[("X-Note", b"caf\xff")] + SPOOFS)
    assert r.status == 401 and not r.proxied  # was: passed unauthenticated with X-Consumer-ID: evil
    r = kong.request(inst, headers=[("X-Note", b"caf\xff"), ("Authorization", "Bearer " + TOKEN)]
                     + SPOOFS)
    assert r.status == 200
    no_spoof_reached(r.upstream)
    assert r.upstream.headers.getall("X-Note") == [b"caf\xff".decode("utf-8", "surrogateescape")]


@pytest.mark.parametrize("where", ["header", "query", "form", "cookie"])
def test_a_token_that_is_not_visible_ascii_is_invalid_token(kong, idp, where):
    bad = b"tok-\xff\xfe"
    conf = config(idp, token_source={"cookie": "session"}) if where == "cookie" else config(idp)
    inst = kong.configure(conf)
    kwargs = {
        "header": {"headers": [("Authorization", b"Bearer " + bad)]},
        "query": {"query": b"access_token=" + bad},
        "form": {"body": b"access_token=" + bad,
                 "headers": {"Content-Type": "application/x-www-form-urlencoded"},
                 "method": "POST"},
        "cookie": {"headers": [("Cookie", b"session=" + bad)]},
    }[where]
    method = kwargs.pop("method", "GET")
    before = len(idp.calls)
    r = kong.request(inst, method, "/", **kwargs)
    assert r.status == 401 and r.json["error"] == "invalid_token", r
    assert len(idp.calls) == before
