"""Tests of the Kong stand-in itself (tests/kong/), against bench/floor_plugin.py
and the throwaway kong-pdk plugin tests/plugins/probe.py, each checking one fact of
shared/design/kong-plugin-server.md."""

import base64
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from kong import FailedOpen, KongStandIn, SchemaViolation
from kong.schema import DEFAULT_WS_ID

ROOT = Path(__file__).resolve().parent.parent
FLOOR = [sys.executable, str(ROOT / "bench" / "floor_plugin.py")]
PROBE = [sys.executable, str(ROOT / "tests" / "plugins" / "probe.py")]

GUARD = """
return function()
  if not kong.client.get_credential() and not kong.client.get_consumer() then
    kong.log.err("refused: ", kong.request.get_method(), " ", kong.request.get_path())
    return kong.response.exit(503, {message = "authentication unavailable"},
                              {["X-Guard"] = kong.request.get_header("x-action") or "none"})
  end
end
"""


@pytest.fixture(scope="module")
def floor():
    with KongStandIn(FLOOR) as k:
        yield k


@pytest.fixture(scope="module")
def probe():
    with KongStandIn(PROBE) as k:
        yield k


@pytest.fixture
def fragile():
    """A probe server of its own with a short RPC timeout (it gets killed or wedged)."""
    with KongStandIn(PROBE, rpc_timeout=0.5) as k:
        yield k


def act(kong, inst, action, **kw):
    headers = kw.pop("headers", {})
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return kong.request(inst, kw.pop("method", "GET"), kw.pop("path", "/"),
                        headers=pairs + [("X-Action", action)], **kw)


def unb64(v):
    return base64.b64decode(v["__str_bytes__"] if "__str_bytes__" in v else v["__bytes__"])


# ---- start-up and the config a plugin instance gets


def test_dump_parsed(floor, probe):
    assert floor.info["Name"] == "floor" and floor.info["Priority"] == 0
    assert floor.info["Phases"] == ["access"] and floor.info["Version"] == "0.1.0"
    assert probe.name == "probe" and probe.info["Priority"] == 5
    assert os.path.exists(probe.socket_path) and probe.socket_path.endswith("/probe.sock")


def test_global_config_as_kong_sends_it(probe):
    inst = probe.configure({"name": "n", "redis": {"host": "h"}, "extra": {}})
    text = inst.conf_json
    sent = json.loads(text)
    # optional fields without a value are absent, not null
    assert "hint" not in sent and "null" not in text
    # a record that does not say required = false comes filled with its defaults
    # (Kong 3.9.1's transcripts: rec_defaults)
    assert sent["opt"] == {"x": "d"} and sent["redis"] == {"host": "h", "port": 6379,
                                                 "tls": {"verify": True}}
    assert json.loads(probe.configure({"name": "n"}).conf_json)["redis"] == {"port": 6379,
                                                                     "tls": {"verify": True}}
    assert json.loads(probe.configure({"name": "n", "opt": {}}).conf_json)["opt"] == {"x": "d"}
    # empty sets/arrays are [], empty maps {}
    assert '"scopes":[]' in text and '"extra":{}' in text
    assert (sent["ttl"], sent["mode"], sent["flag"]) == (30, "a", False)
    # Kong's own keys, every time; no scope keys for a global plugin
    assert sent["__plugin_id"] == inst.plugin_id and sent["__ws_id"] == DEFAULT_WS_ID
    assert sent["__key__"] == "plugins:probe:::::" + DEFAULT_WS_ID
    assert isinstance(sent["__seq__"], int)
    assert not {"route_id", "service_id", "consumer_id", "plugin_instance_name"} & set(sent)
    # the plugin receives exactly that
    r = act(probe, inst, "config")
    assert r.status == 200 and r.kong_error is None
    assert json.loads(r.serialize["config"]) == sent
    assert probe.configure({"name": "n"}).seq > inst.seq


def test_scoped_config_carries_kong_keys(probe):
    consumer = str(uuid.uuid4())
    inst = probe.configure({"name": "n"}, route=True, service=True, consumer=consumer,
                           instance_name="mine")
    sent = json.loads(inst.conf_json)
    route, service = probe.route["id"], probe.service["id"]
    assert (sent["route_id"], sent["service_id"], sent["consumer_id"]) == (route, service, consumer)
    assert sent["plugin_instance_name"] == "mine"
    assert sent["__key__"] == "plugins:probe:%s:%s:%s::%s" % (route, service, consumer,
                                                              DEFAULT_WS_ID)
    r = act(probe, inst, "config")
    assert json.loads(r.serialize["config"]) == sent
    only_route = json.loads(probe.configure({"name": "n"}, route=True).conf_json)
    assert only_route["__key__"] == "plugins:probe:%s::::%s" % (route, DEFAULT_WS_ID)
    assert "service_id" not in only_route and "consumer_id" not in only_route


@pytest.mark.parametrize("config,path", [
    ({}, "config.name"),
    ({"name": None}, "config.name"),
    ({"name": ""}, "config.name"),
    ({"name": "n", "mode": "c"}, "config.mode"),
    ({"name": "n", "ttl": "30"}, "config.ttl"),
    ({"name": "n", "ttl": 4000}, "config.ttl"),
    ({"name": "n", "flag": "yes"}, "config.flag"),
    ({"name": "n", "scopes": "a"}, "config.scopes"),
    ({"name": "n", "scopes": [1]}, "config.scopes.1"),
    ({"name": "n", "redis": {"port": 1.5}}, "config.redis.port"),
    ({"name": "n", "redis": {"tls": {"verify": 1}}}, "config.redis.tls.verify"),
    ({"name": "n", "nope": 1}, "config.nope"),
])
def test_schema_violations(probe, config, path):
    with pytest.raises(SchemaViolation) as e:
        probe.configure(config)
    assert e.value.path == path


def test_top_level_schema_entries_are_enforced():
    with KongStandIn(PROBE, env={"PROBE_NO_CONSUMER": "1"}) as k:
        assert k.configure({"name": "n"}, route=True, service=True).plugin_id
        with pytest.raises(SchemaViolation) as e:
            k.configure({"name": "n"}, consumer=True)
        assert (e.value.path, e.value.message) == ("consumer", "value must be null")
        with pytest.raises(SchemaViolation) as e:
            k.configure({"name": "n"}, protocols=["http", "tcp"])
        assert e.value.path == "protocols.2"


def test_several_plugins_on_one_server():
    with KongStandIn(PROBE + ["--multi"]) as k:
        assert [p["Name"] for p in k.plugins_info] == ["probe", "probe_two"]
        two = k.configure({}, name="probe_two")
        assert json.loads(two.conf_json)["__key__"].startswith("plugins:probe_two:")
        assert k.request(two).serialize == {"who": "probe_two"}
        one = k.configure({"name": "n"})
        assert act(k, one, "config").serialize["config"]
        with pytest.raises(ValueError):
            k.configure({}, name="absent")


# ---- requests


def test_floor_round_trip(floor):
    inst = floor.configure({})
    r = floor.request(inst, "GET", "/", headers={"Authorization": "Bearer x"})
    assert r.status == 200 and r.kong_error is None and r.body == b""
    assert r.pdk_calls == ["kong.request.get_header"]
    assert r.pdk_trace == [("kong.request.get_header", ["authorization"])]
    assert r.upstream.headers["authorization"] == "Bearer x"
    iid = floor.instance_ids()[inst.plugin_id]
    floor.request(inst)
    assert floor.instance_ids()[inst.plugin_id] == iid      # started once, lazily
    assert "instance #%d of floor started" % iid in floor.server_log()


def test_multi_map_shapes(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "echo", method="POST", path="/p", query="q=1&f&q=2&e=&x=a%20b+c",
            headers=[("Accept", "a"), ("accept", "b"),
                     ("Content-Type", "application/x-www-form-urlencoded"),
                     ("X_Under", "kept by Kong's nginx")],
            body="a=1&b")
    assert r.status == 200 and r.kong_error is None
    seen = json.loads(r.serialize["seen"])
    assert seen["headers"]["accept"] == ["a", "b"] and seen["headers"]["x-action"] == ["echo"]
    assert all(isinstance(v, list) for v in seen["headers"].values())
    # Kong's nginx keeps underscore names (transcript hdr_underscore_name)
    assert seen["headers"]["x_under"] == ["kept by Kong's nginx"] and "X_Under" in r.upstream.headers
    assert seen["query"] == {"q": ["1", "2"], "f": [], "e": [""], "x": ["a b c"]}
    assert seen["raw_body"] == {"__bytes__": "YT0xJmI="}          # msgpack bin -> bytes
    assert seen["body"] == {"a": "1", "b": True}
    assert (seen["method"], seen["path"], seen["host"], seen["ip"]) == ("POST", "/p", "kong.test", "127.0.0.1")
    assert seen["missing"] is None and seen["credential"] is None
    assert r.logs == [("info", "echo done 42")]
    r = act(probe, inst, "echo")                                  # no query: an empty MAP
    assert json.loads(r.serialize["seen"])["query"] == {}


def test_repeated_custom_header_reads_joined(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "echo", headers=[("X-Token", "a"), ("X-Token", "b"),
                                          ("Cookie", "c=1"), ("Cookie", "d=2")])
    assert r.status == 200
    seen = json.loads(r.serialize["seen"])
    assert seen["headers"]["x-token"] == ["a", "b"] and seen["headers"]["cookie"] == ["c=1", "d=2"]
    # Kong 3.9 reads $http_x_token (every line joined, "; " for Cookie) and, when it
    # holds ", ", the first value of get_headers() instead
    assert (seen["x_token"], seen["cookie"]) == ("a", "c=1; d=2")
    assert r.upstream.headers.getall("x-token") == ["a", "b"]
    # ... whose 100-line cap hides a repeated header sent after the 100th line
    filler = [("X-F%d" % i, "f") for i in range(100)]
    r = act(probe, inst, "echo", headers=filler + [("X-Token", "a"), ("X-Token", "b"),
                                                   ("Cookie", "c=1")])
    seen = json.loads(r.serialize["seen"])
    assert (seen["x_token"], seen["cookie"]) == (None, "c=1")


BIG = json.dumps({"access_token": "t", "pad": "x" * 9000})
NIL_BODY_CASES = [
    ("POST", {}, '{"a":1}', False),                                       # no content type
    ("POST", {"Content-Type": "text/plain"}, "hello", False),             # unsupported
    ("POST", {"Content-Type": "application/json"}, "{not json", False),   # invalid JSON
    ("POST", {"Content-Type": "application/json"}, '"a string"', False),  # not a table
    ("GET", {"Content-Type": "application/json"}, None, False),           # GET, no body
    ("POST", {"Content-Type": "application/json"}, BIG, True),            # spooled
    ("POST", {"Content-Type": "application/x-www-form-urlencoded"}, "a=" + "x" * 9000, True),
]


@pytest.mark.parametrize("method,headers,body,spooled", NIL_BODY_CASES)
def test_get_body_failures_arrive_as_none_on_kong_3(probe, method, headers, body, spooled):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "body", method=method, body=body,
            headers=dict(headers, **({"X-Skip-Raw": "1"} if spooled else {})))
    assert r.status == 200 and r.kong_error is None
    seen = json.loads(r.serialize["body"])
    assert seen["body"] == {"value": None}
    if spooled:
        assert r.upstream.raw_body == body.encode()                   # still goes upstream
    else:
        assert unb64(seen["raw_body"]["value"]) == (body or "").encode()


def test_get_raw_body_of_a_spooled_body_is_a_500_on_kong_3(probe):
    # get_raw_body() answers nil, err; mp_rpc.lua's fix_raw then packs nil as
    # binary, which raises in Lua (read from the source)
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "body", method="POST", headers={"Content-Type": "application/json"},
            body=BIG)
    assert r.status == 500 and "attempt to get length" in r.kong_error
    assert r.pdk_calls[-1] == "kong.request.get_raw_body"


@pytest.mark.parametrize("method,headers,body,spooled", NIL_BODY_CASES)
def test_get_body_failures_are_step_errors_on_kong_2_8(method, headers, body, spooled):
    with KongStandIn(PROBE, kong_version="2.8") as k:
        inst = k.configure({"name": "n"})
        r = act(k, inst, "body", method=method, headers=headers, body=body)
        assert r.status == 200 and r.kong_error is None
        seen = json.loads(r.serialize["body"])
        assert "error" in seen["body"]
        expected = ("missing content type", "unsupported content type", "invalid json body",
                    "client_body_buffer_size", "temp file not supported")
        assert any(e in seen["body"]["error"] for e in expected), seen
        assert ("error" in seen["raw_body"]) == spooled


def test_json_empty_objects_arrive_as_arrays(probe):
    inst = probe.configure({"name": "n"})
    ct = {"Content-Type": "application/json"}
    assert json.loads(act(probe, inst, "body", method="POST", headers=ct, body="{}")
                      .serialize["body"])["body"] == {"value": []}
    r = act(probe, inst, "body", method="POST", headers=ct, body='{"a":{},"b":[],"c":1.0}')
    assert json.loads(r.serialize["body"])["body"] == {"value": {"a": [], "b": [], "c": 1}}


def test_client_body_buffer_size_option():
    with KongStandIn(PROBE, client_body_buffer_size=16) as k:
        inst = k.configure({"name": "n"})
        ct = {"Content-Type": "application/json", "X-Skip-Raw": "1"}
        r = act(k, inst, "body", method="POST", headers=ct, body='{"access_token": "abc"}')
        assert json.loads(r.serialize["body"]) == {"body": {"value": None}}      # 23 bytes
        r = act(k, inst, "body", method="POST", headers=ct, body='{"a": 1}')
        assert json.loads(r.serialize["body"]) == {"body": {"value": {"a": 1}}}  # 8 bytes


def test_reads_capped_at_100_but_everything_goes_upstream(probe):
    inst = probe.configure({"name": "n"})
    headers = [("X-H%d" % i, str(i)) for i in range(150)] + [("Content-Type", "application/x-www-form-urlencoded")]
    query = "&".join("q%d=%d" % (i, i) for i in range(150))
    body = "&".join("f%d=%d" % (i, i) for i in range(150))
    r = act(probe, inst, "caps", method="POST", headers=headers, query=query, body=body)
    assert r.status == 200 and json.loads(r.serialize["caps"]) == {"headers": 100, "query": 100, "form": 100}
    assert len(r.upstream.headers.items_all()) == 154      # Host, 150, Content-Type/-Length, X-Action
    assert len(r.upstream.query) == 150 and r.upstream.body == body
    r = act(probe, inst, "caps", method="POST", headers=headers + [("X-Max", "1000")],
            query=query, body=body)
    assert json.loads(r.serialize["caps"]) == {"headers": 155, "query": 150, "form": 150}


def test_max_out_of_range_is_a_lua_error(probe):
    r = act(probe, probe.configure({"name": "n"}), "bad_max")
    assert r.status == 500 and r.kong_error == "max_headers must be <= 1000"


def test_non_utf8_bytes_drop_kong_pdk_connection_and_fail_open(fragile):
    # kong-pdk 0.36's listener decodes strictly and drops the connection; Kong then
    # lets the request through with the client's identity headers
    inst = fragile.configure({"name": "n"})
    with pytest.raises(FailedOpen) as e:
        act(fragile, inst, "echo", headers={b"X-Note": b"caf\xff", "X-Consumer-ID": "evil"})
    r = e.value.result
    assert r.kong_error == "no data" and r.passed_unauthenticated and r.status == 200
    assert r.upstream.headers["X-Consumer-ID"] == "evil"
    # The server's traceback reaches its log through a reader thread: allow it a moment.
    deadline = time.monotonic() + 10
    while "UnicodeDecodeError" not in fragile.server_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "UnicodeDecodeError" in fragile.server_log()


def test_non_utf8_bytes_are_sent_as_msgpack_str():
    with KongStandIn(PROBE + ["--lenient"]) as k:
        inst = k.configure({"name": "n"})
        r = act(k, inst, "echo", method="POST", headers={
            "X-Note": b"caf\xff", "Content-Type": "application/x-www-form-urlencoded"},
            query=b"q=%FF&raw=\xfe", body=b"f=\xfd")
        assert r.status == 200 and r.kong_error is None
        seen = json.loads(r.serialize["seen"])
        # a str holding the raw bytes, where bin would have arrived as bytes
        assert unb64(seen["headers"]["x-note"][0]) == b"caf\xff"
        assert "__str_bytes__" in seen["headers"]["x-note"][0]
        assert unb64(seen["query"]["q"][0]) == b"\xff" and unb64(seen["query"]["raw"][0]) == b"\xfe"
        assert unb64(seen["body"]["f"]) == b"\xfd" and "__str_bytes__" in seen["body"]["f"]
        assert seen["raw_body"] == {"__bytes__": base64.b64encode(b"f=\xfd").decode()}
        assert r.upstream.raw_query == "q=%FF&raw=\udcfe" and r.upstream.raw_body == b"f=\xfd"


@pytest.mark.parametrize("name", ["Authorization", "authorization", "Host", "Content-Length",
                                  "Transfer-Encoding", "Expect", "If-Match", "If-None-Match"])
def test_nginx_refuses_a_second_unique_header(probe, name):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "exit", headers=[(name, "1"), (name.upper(), "2")])
    # Kong's error page for nginx's 400 is text with the request id
    # (transcript hdr_duplicate_authorization)
    assert r.status == 400 and r.body.startswith(b"Bad request\nrequest_id: ")
    assert r.pdk_calls == [] and not r.plugin_ran and not r.proxied


def test_other_headers_may_repeat(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "nothing", headers=[("X-Token", "a"), ("X-Token", "b"),
                                             ("Authorization", "Bearer x")])
    assert r.status == 200 and r.plugin_ran


@pytest.mark.parametrize("which,changed", [
    ("map", {}), ("list", {}), ("clear", {"X-Gone": []}),
    ("values", {"X-Empty": [" "], "X-Num": ["1.5"], "X-Int": ["3"], "X-Flag": ["true"]}),
])
def test_set_headers_rules(probe, which, changed):
    inst = probe.configure({"name": "n"})
    sent = [("X-Gone", "1"), ("X-Gone", "2"), ("X-Keep", "k"), ("X-Which", which)]
    r = act(probe, inst, "set_headers", headers=sent)
    assert r.status == 200 and r.kong_error is None
    up = r.upstream.headers
    expected = {"X-Gone": ["1", "2"], "X-Keep": ["k"], "X-Which": [which]}
    expected.update(changed)
    for name, values in expected.items():
        assert up.getall(name) == values


def test_upstream_changes(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "headers", query={"old": "1"},
            headers={"X-Remove": "gone", "X-Clear": "gone", "X-Keep": "kept", "X-Multi": "old"})
    assert r.status == 200 and r.kong_error is None
    up = r.upstream.headers
    assert "X-Remove" not in up and "X-Clear" not in up
    assert up.getall("x-multi") == ["a", "b"] and up["X-New"] == "v"
    assert up["X-Num"] == "7" and up["X-Empty"] == " " and up["X-Single"] == "1"
    assert up["X-Keep"] == "kept"
    assert r.upstream.raw_query == "a&b=2%203&list=x&list=y"
    assert r.upstream.body == "new body" and up["Content-Length"] == "8"
    assert r.response_headers["X-Resp"] == "r"


def test_clear_query_arg_reserializes_the_rest(probe):
    # Kong 3.9: lua-resty-ada parses the query as URLSearchParams and serializes
    # what is left; it keeps every argument, past the 100th too
    inst = probe.configure({"name": "n"})
    many = "&".join("q%d=%d" % (i, i) for i in range(150))
    r = act(probe, inst, "clear_query",
            query="debug&access_token=t&a=b+c%7E&access%5Ftoken=u&x=%FF&" + many)
    # `+` stays as sent (transcript clear_query_arg: e=x+y)
    assert r.upstream.raw_query == "debug=&a=b+c%7E&x=%FF&" + many
    assert act(probe, inst, "clear_query").upstream.raw_query == ""


@pytest.mark.parametrize("content_type,upstream_body", [
    ("application/x-www-form-urlencoded", "a=1&b=2"),
    ('multipart/form-data; boundary="xyz"',
     '--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
     '--xyz\r\nContent-Disposition: form-data; name="b"\r\n\r\n2\r\n--xyz--\r\n'),
    (None, "original"),
])
def test_set_body_rules(probe, content_type, upstream_body):
    inst = probe.configure({"name": "n"})
    headers = {"Content-Type": content_type} if content_type else {}
    r = act(probe, inst, "set_body", method="POST", headers=headers, body="original")
    assert r.status == 200 and r.upstream.body == upstream_body
    assert r.serialize["ok"] == ("null" if content_type is None else "true")
    if content_type and content_type.startswith("multipart"):
        # the parts' own headers (filename, Content-Type) cannot survive set_body
        assert r.upstream.headers["Content-Type"] == "multipart/form-data; boundary=xyz"


def test_set_body_json_and_unsupported_type(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "set_body", method="POST",
            headers={"Content-Type": "application/json; charset=utf-8"}, body="{}")
    assert json.loads(r.upstream.body) == {"a": "1", "b": "2"}
    r = act(probe, inst, "set_body", method="POST", headers={"Content-Type": "text/plain"}, body="x")
    assert r.status == 500 and r.kong_error == "unsupported content type text/plain"


def test_exit_with_table_body(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "exit")
    assert r.status == 401 and r.kong_error is None and not r.proxied
    assert r.pdk_calls == ["kong.request.get_header", "kong.response.exit"]
    assert r.response_headers["WWW-Authenticate"] == 'Bearer realm="x"'
    assert b"http:\\/\\/x\\/y" in r.body                         # cjson escapes '/'
    assert r.json == {"error": "nope", "url": "http://x/y", "list": {}, "n": 2}
    r = act(probe, inst, "exit_text")
    assert (r.status, r.body, r.response_headers["content-type"]) == (403, b"plain words", "text/plain")


@pytest.mark.parametrize("action,message", [
    ("bad_header", "invalid header value in array"),
    ("auth_nil", "either credential or consumer must be provided"),
])
def test_lua_errors_in_pdk_fail_with_500(probe, action, message):
    r = act(probe, probe.configure({"name": "n"}), action)
    assert r.status == 500 and message in r.kong_error
    assert r.json["message"] == "An unexpected error occurred" and "request_id" in r.json
    assert r.logs == [] and not r.proxied                        # the plugin never resumed


def test_load_consumer(probe):
    bob = probe.add_consumer(username="bob-" + uuid.uuid4().hex[:6])
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "load_consumer", headers={"X-Who": bob["username"]})
    assert r.status == 500 and r.kong_error == "cannot load a consumer with an id that is not a uuid"
    r = act(probe, inst, "load_consumer", headers={"X-Who": bob["username"], "X-By-Username": "yes"})
    assert r.status == 200 and r.kong_error is None and r.consumer["id"] == bob["id"]
    assert r.credential == {"id": "cred-1", "consumer_id": bob["id"]}
    r = act(probe, inst, "load_consumer", headers={"X-Who": str(uuid.uuid4())})
    assert r.status == 200 and r.serialize["found"] == "null" and r.consumer is None


def test_authenticated_and_ctx(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "echo", authenticated={"id": "from-key-auth"})
    assert json.loads(r.serialize["seen"])["credential"] == {"id": "from-key-auth"}
    r = act(probe, inst, "ctx", path="/a?b=1")
    assert r.serialize == {"ctx": "v", "var": "/a?b=1"} and r.ctx_shared == {"k": "v"}


def test_unknown_pdk_method_answers_nil(probe):
    r = act(probe, probe.configure({"name": "n"}), "unknown")
    assert r.status == 200 and r.kong_error is None
    assert ("err", "could not find pdk method: kong.request.no_such_thing") in r.kong_logs


# ---- when the plugin server fails, Kong fails OPEN


def wait_for_log_line(kong, line, timeout=30.0):
    """The server log once ``line`` is in it as a whole line. The log is read by a
    thread, line by line, so a traceback may be half there when the request ends."""
    deadline = time.monotonic() + timeout
    while True:
        text = kong.server_log()
        if line in text.splitlines():
            return text
        if time.monotonic() > deadline:
            raise AssertionError("no line %r in the server log:\n%s" % (line, text))
        time.sleep(0.02)


def test_plugin_exception_fails_open_after_the_timeout(fragile):
    inst = fragile.configure({"name": "n"})
    started = time.monotonic()
    with pytest.raises(FailedOpen) as e:
        act(fragile, inst, "raise", headers={"Authorization": "Bearer x", "X-Consumer-ID": "evil"})
    r = e.value.result
    # Kong gave up at its RPC timeout (0.5 s here), not earlier. No upper bound: a
    # loaded machine may take longer to get there, and kong_error says why it ended.
    assert time.monotonic() - started > 0.4
    assert r.kong_error == "no data" and r.passed_unauthenticated and r.status == 200
    assert r.upstream.headers["X-Consumer-ID"] == "evil"
    # kong-pdk's traceback ends with the exception's own line: wait until it is all there
    log = wait_for_log_line(fragile, "RuntimeError: plugin bug")
    assert "in do_raise" in log
    # Kong put the timed-out connection back in its pool: the next event on it waits
    # the timeout out again and fails open too (transcript after_silent_next_request)
    with pytest.raises(FailedOpen) as e:
        act(fragile, inst, "nothing", headers={"X-Consumer-ID": "evil"})
    assert e.value.result.kong_error == "no data"
    assert e.value.result.upstream.headers["X-Consumer-ID"] == "evil"
    # once nginx has closed that idle connection, other events are served again
    fragile.expire_rpc_pool()
    assert act(fragile, inst, "nothing").kong_error is None


def test_fail_open_record_mode_counts_instead_of_raising():
    with KongStandIn(PROBE, rpc_timeout=0.5, fail_open="record") as k:
        bad = k.configure({"name": "n", "raise_early": True})
        good = k.configure({"name": "n"})
        assert act(k, good, "nothing").kong_error is None     # its instance runs
        r = k.request(bad)
        assert r.failed_open and r.passed_unauthenticated and r.kong_error == "no data"
        # on Kong's pooled connection, which still holds the unanswered event
        r = act(k, good, "nothing")
        assert r.passed_unauthenticated and r.kong_error == "no data"
        # kong-pdk's handle_event holds its event lock while waiting: a fresh
        # connection hangs too
        k.expire_rpc_pool()
        r = act(k, good, "nothing")
        assert r.passed_unauthenticated and r.kong_error == "no data"
        k.restart_server()
        r = act(k, good, "nothing")
        assert not r.failed_open and r.kong_error is None


def test_killed_server_fails_open_and_start_instance_fails_with_500(fragile):
    inst = fragile.configure({"name": "n"})
    assert act(fragile, inst, "nothing").kong_error is None
    fragile.kill_server()
    with pytest.raises(FailedOpen) as e:
        act(fragile, inst, "nothing", headers={"X-Consumer-ID": "evil"})
    assert "trying to connect" in e.value.result.kong_error
    assert e.value.result.upstream.headers["X-Consumer-ID"] == "evil"
    r = act(fragile, fragile.configure({"name": "n"}), "nothing")   # StartInstance fails
    assert r.status == 500 and not r.proxied and not r.failed_open
    assert any("starting instance" in m for _, m in r.kong_logs)
    fragile.restart_server()
    assert act(fragile, inst, "nothing").kong_error is None


def test_hung_server_fails_open_after_rpc_timeout(fragile):
    inst = fragile.configure({"name": "n"})
    assert act(fragile, inst, "nothing").kong_error is None
    fragile.hang_server()
    try:
        started = time.monotonic()
        with pytest.raises(FailedOpen) as e:
            act(fragile, inst, "nothing", headers={"X-Consumer-ID": "evil"})
        assert e.value.result.kong_error == "no data" and time.monotonic() - started >= 0.5
        assert e.value.result.upstream.headers["X-Consumer-ID"] == "evil"
    finally:
        fragile.resume_server()
    # the resumed server answers the timed-out event late, on the connection Kong
    # pooled; nginx resets that idle connection as the answer arrives
    # (fail_late_answer), so the next request connects anew and is served
    # (after_late_answer_next_request)
    assert fragile.await_late_answers() == 1
    assert act(fragile, inst, "nothing").kong_error is None


def test_instance_claim_wait_then_fail_open():
    with KongStandIn(PROBE, rpc_timeout=2.0, instance_claim_wait=0.5, fail_open="record") as k:
        inst = k.configure({"name": "n"})
        k.hang_server()
        results = {}

        def first():
            results["first"] = act(k, inst, "nothing")
        t = threading.Thread(target=first)
        try:
            t.start()
            time.sleep(0.2)                          # the first request holds the claim
            started = time.monotonic()
            second = act(k, inst, "nothing")
            waited = time.monotonic() - started
            t.join()
        finally:
            k.resume_server()
        assert 0.4 < waited < 1.5
        assert second.passed_unauthenticated
        assert second.kong_error == "Could not claim instance_id for probe (key: %s)" % inst.plugin_id
        assert results["first"].status == 500 and not results["first"].proxied   # StartInstance timed out


def test_restart_server_recovers_through_no_plugin_instance(floor):
    inst = floor.configure({})
    assert floor.request(inst).kong_error is None
    old_pid = floor.pid
    floor.restart_server()
    assert floor.pid != old_pid
    r = floor.request(inst, headers={"Authorization": "x"})
    assert r.status == 200 and r.kong_error is None
    assert any(level == "warn" and "no plugin instance" in msg for level, msg in r.kong_logs)


def test_respawn_like_worker_0():
    with KongStandIn(PROBE, respawn=True, fail_open="record") as k:
        inst = k.configure({"name": "n"})
        assert act(k, inst, "nothing").kong_error is None
        old = k.pid
        k.kill_server()
        r = act(k, inst, "nothing")                  # while it is down: fail open
        assert r.passed_unauthenticated
        deadline = time.monotonic() + 10
        while (k.pid in (None, old)) and time.monotonic() < deadline:
            time.sleep(0.05)
        k.wait_listening()
        # process.lua: never sooner than a second after the previous spawn
        assert k.respawns == 1 and k.pid != old
        assert k.spawns[1][0] - k.spawns[0][0] >= 0.95
        assert ("notice", "external pluginserver 'probe' terminated: signal 9") in k.process_log
        r = act(k, inst, "nothing")
        assert not r.failed_open and r.kong_error is None
        assert any("no plugin instance" in m for _, m in r.kong_logs)


def test_reconfigure_starts_a_new_instance_and_closes_the_old(floor):
    first = floor.configure({})
    floor.request(first)
    old = floor.instance_ids()[first.plugin_id]
    second = floor.configure({}, plugin_id=first.plugin_id)
    assert second.seq > first.seq
    assert floor.request(second).kong_error is None
    assert floor.instance_ids()[first.plugin_id] != old


def test_concurrent_requests(floor):
    inst = floor.configure({})
    results, errors = [], []

    def one(i):
        try:
            results.append(floor.request(inst, headers={"Authorization": "Bearer %d" % i}))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 50
    assert all(r.status == 200 and r.kong_error is None for r in results)
    assert all(r.pdk_calls == ["kong.request.get_header"] for r in results)


# ---- the post-function guard


def test_guard_passes_what_the_plugin_authenticated_and_refuses_the_rest():
    with KongStandIn(PROBE, post_function=[GUARD]) as k:
        inst = k.configure({"name": "n"})
        r = act(k, inst, "authenticate")
        assert r.status == 200 and r.guard_exit is None and r.proxied
        r = act(k, inst, "nothing", authenticated_consumer={"id": "c"})   # e.g. anonymous
        assert r.status == 200 and r.guard_exit is None
        r = act(k, inst, "nothing", path="/x")
        assert r.status == 503 and r.guard_exit == 503 and not r.proxied
        assert r.json == {"message": "authentication unavailable"}
        assert r.response_headers["X-Guard"] == "nothing"
        assert ("err", "refused: GET /x") in r.logs
        r = act(k, inst, "exit")                     # the plugin answered: no guard
        assert r.status == 401 and r.guard_exit is None


def test_guard_runs_after_fail_open():
    with KongStandIn(PROBE, post_function=[GUARD], rpc_timeout=0.5) as k:
        inst = k.configure({"name": "n"})
        assert act(k, inst, "authenticate").status == 200          # the instance exists
        k.kill_server()
        r = act(k, inst, "authenticate", headers={"X-Consumer-ID": "evil"})   # no FailedOpen
        assert r.failed_open and not r.passed_unauthenticated
        assert r.status == 503 and r.guard_exit == 503 and "trying to connect" in r.kong_error
        k.restart_server()
        k.hang_server()
        try:
            r = act(k, inst, "authenticate")
        finally:
            k.resume_server()
        assert r.failed_open and r.status == 503 and r.kong_error == "no data"


def test_guard_chunks_compile_once():
    closure = "local n = 0\nreturn function() n = n + 1; kong.ctx.shared.closure = n end"
    plain = "kong.ctx.shared.plain = (kong.ctx.shared.plain or 0) + 1"
    with KongStandIn(FLOOR, post_function=[closure, plain]) as k:
        inst = k.configure({})
        assert k.request(inst).ctx_shared == {"closure": 1, "plain": 1}
        assert k.request(inst).ctx_shared == {"closure": 2, "plain": 1}
        k.set_post_function(["error('guard bug')"])
        r = k.request(inst)
        assert r.status == 500 and "guard bug" in r.kong_error
        with pytest.raises(ValueError):
            k.set_post_function(["this is not lua"])


# ---- Admin API and lifecycle


def test_admin_api(probe):
    c = probe.add_consumer(username="eve-" + uuid.uuid4().hex[:6], custom_id="eve-app-" + uuid.uuid4().hex[:6])
    before = len(probe.admin_requests)

    def get(path):
        try:
            with urllib.request.urlopen(probe.admin_url + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    assert get("/consumers?custom_id=" + c["custom_id"]) == (200, {"data": [c], "next": None})
    assert get("/consumers?custom_id=nobody") == (200, {"data": [], "next": None})
    assert get("/consumers/" + c["id"]) == (200, c)
    assert get("/consumers/" + c["username"]) == (200, c)
    assert get("/consumers/" + str(uuid.uuid4()))[0] == 404
    assert get("/")[0] == 500                         # Kong/kong#14260, observed on 3.9.x
    assert len(probe.admin_requests) - before == 6


def test_start_command_gets_a_cleared_environment(monkeypatch):
    # nginx clears the environment of what it spawns; `env VAR=... cmd` passes values
    monkeypatch.setenv("STANDIN_LEAK", "from the test")
    env_probe = [sys.executable, "-c",
                 "import json, os, sys\n"
                 "if '-dump' in sys.argv:\n"
                 "    print(json.dumps([{'Name': 'envp', 'Phases': ['access'], 'Priority': 0,"
                 " 'Version': '0', 'Schema': {'fields': [{'config': {'type': 'record', 'fields': []}}]}}]))\n"
                 "else:\n"
                 "    import socket\n"
                 "    print(json.dumps(sorted(os.environ)), flush=True)\n"
                 "    s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[-1] + '/envp.sock'); s.listen()\n"
                 "    import time; time.sleep(60)\n"]
    with KongStandIn(env_probe, env={"PASSED": "1"}) as k:
        seen = json.loads(k.server_log().splitlines()[0])
        assert "PASSED" in seen and "KONG_ADMIN_URL" in seen
        assert "STANDIN_LEAK" not in seen and "PATH" not in seen and "HOME" not in seen


def test_close_kills_the_server():
    k = KongStandIn(FLOOR)
    pid = k.pid
    k.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_compat_shim_exports_the_same_api():
    import kong_standin
    assert kong_standin.KongStandIn is KongStandIn and kong_standin.FailedOpen is FailedOpen
