"""Tests of the Kong stand-in itself, against bench/floor_plugin.py and the
throwaway tests/plugins/probe.py plugin server."""

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

from kong_standin import KongStandIn, SchemaViolation

ROOT = Path(__file__).resolve().parent.parent
FLOOR = [sys.executable, str(ROOT / "bench" / "floor_plugin.py")]
PROBE = [sys.executable, str(ROOT / "tests" / "plugins" / "probe.py")]


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
    """A probe server of its own, with a short RPC timeout (it gets wedged)."""
    with KongStandIn(PROBE, rpc_timeout=0.5) as k:
        yield k


def act(kong, inst, action, **kw):
    headers = dict(kw.pop("headers", {}), **{"X-Action": action})
    return kong.request(inst, kw.pop("method", "GET"), kw.pop("path", "/"), headers=headers, **kw)


# ---- start-up and schema layer


def test_dump_parsed(floor, probe):
    assert floor.info["Name"] == "floor" and floor.info["Priority"] == 0
    assert floor.info["Phases"] == ["access"] and floor.info["Version"] == "0.1.0"
    assert floor.info["Schema"]["fields"][0]["config"]["type"] == "record"
    assert probe.name == "probe" and probe.info["Priority"] == 5
    assert os.path.exists(probe.socket_path)


def test_config_filled_like_kong(probe):
    inst = probe.configure({"name": "n", "redis": {"host": "h"}})
    sent = json.loads(inst.conf_json)
    assert sent["ttl"] == 30 and sent["mode"] == "a" and sent["flag"] is False
    assert sent["hint"] is None and "hint" in sent and sent["extra"] is None
    assert sent["scopes"] == {}           # an empty set default, encoded by cjson
    assert '"scopes":{}' in inst.conf_json
    # a required record is expanded to its defaults; an optional one stays null
    assert sent["redis"] == {"host": "h", "port": 6379, "tls": None}
    assert sent["opt"] is None
    assert json.loads(probe.configure({"name": "n", "opt": {}}).conf_json)["opt"] == {"x": "d"}
    assert sent["__plugin_id"] == inst.plugin_id and isinstance(sent["__seq__"], int)
    assert sent["__key__"].startswith("plugins:probe:")
    # the plugin receives exactly that
    r = act(probe, inst, "config")
    assert r.status == 200 and r.kong_error is None
    assert json.loads(r.serialize["config"]) == sent
    bare = json.loads(probe.configure({"name": "n"}).conf_json)
    assert bare["redis"] == {"host": None, "port": 6379, "tls": None}
    assert json.loads(probe.configure({"name": "n", "redis": {"tls": {}}}).conf_json)["redis"]["tls"] == {"verify": True}
    assert bare["__seq__"] > sent["__seq__"]


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
            headers=[("Accept", "a"), ("accept", "b"), ("Content-Type", "application/x-www-form-urlencoded"),
                     ("X_Under", "dropped by nginx")],
            body="a=1&b")
    assert r.status == 200 and r.kong_error is None
    seen = json.loads(r.serialize["seen"])
    assert seen["headers"]["accept"] == ["a", "b"] and seen["headers"]["x-action"] == ["echo"]
    assert all(isinstance(v, list) for v in seen["headers"].values())
    assert "x_under" not in seen["headers"]
    assert seen["query"] == {"q": ["1", "2"], "f": [], "e": [""], "x": ["a b c"]}
    assert seen["raw_body"] == {"__bytes__": "YT0xJmI="}          # msgpack bin -> bytes
    assert seen["body"] == {"a": "1", "b": True}
    assert (seen["method"], seen["path"], seen["host"], seen["ip"]) == ("POST", "/p", "kong.test", "127.0.0.1")
    assert seen["missing"] is None and seen["credential"] is None
    assert r.logs == [("info", "echo done 42")]
    # no query at all: an empty MAP, not a list
    r = act(probe, inst, "echo")
    assert json.loads(r.serialize["seen"])["query"] == {}


def test_exit_with_table_body(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "exit")
    assert r.status == 401 and r.kong_error is None
    assert r.pdk_calls == ["kong.request.get_header", "kong.response.exit"]
    assert r.response_headers["WWW-Authenticate"] == 'Bearer realm="x"'
    assert r.response_headers["Content-Type"].startswith("application/json")
    assert b"http:\\/\\/x\\/y" in r.body                         # cjson escapes '/'
    assert r.json == {"error": "nope", "url": "http://x/y", "list": {}, "n": 2}
    assert r.upstream is not None
    r = act(probe, inst, "exit_text")
    assert (r.status, r.body, r.response_headers["content-type"]) == (403, b"plain words", "text/plain")


def test_upstream_changes(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "headers", query={"old": "1"},
            headers={"X-Remove": "gone", "X-Clear": "gone", "X-Keep": "kept", "X-Multi": "old"})
    assert r.status == 200 and r.kong_error is None
    up = r.upstream.headers
    assert "X-Remove" not in up and "X-Clear" not in up          # empty array removes
    assert up.getall("x-multi") == ["a", "b"] and up["X-New"] == "v"
    assert up["X-Num"] == "7" and up["X-Empty"] == " " and up["X-Single"] == "1"
    assert up["X-Keep"] == "kept"
    assert r.upstream.raw_query == "a&b=2%203&list=x&list=y"
    assert r.upstream.query == {"a": True, "b": "2 3", "list": ["x", "y"]}
    assert r.upstream.body == "new body" and up["Content-Length"] == "8"
    assert r.response_headers["X-Resp"] == "r"


@pytest.mark.parametrize("action,message", [
    ("bad_header", "invalid header value in array"),
    ("auth_nil", "either credential or consumer must be provided"),
])
def test_lua_errors_in_pdk_fail_with_500(probe, action, message):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, action)
    assert r.status == 500 and message in r.kong_error
    assert r.json == {"message": "An unexpected error occurred"}
    assert r.logs == []                                           # the plugin never resumed


def test_load_consumer(probe):
    bob = probe.add_consumer(username="bob-" + uuid.uuid4().hex[:6])
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "load_consumer", headers={"X-Who": bob["username"]})
    assert r.status == 500 and r.kong_error == "cannot load a consumer with an id that is not a uuid"
    r = act(probe, inst, "load_consumer", headers={"X-Who": bob["username"], "X-By-Username": "yes"})
    assert r.status == 200 and r.kong_error is None and r.consumer["id"] == bob["id"]
    assert r.credential == {"id": "cred-1", "consumer_id": bob["id"]}   # a nil field does not exist in Lua
    r = act(probe, inst, "load_consumer", headers={"X-Who": bob["id"]})
    assert json.loads(r.serialize["found"])["username"] == bob["username"]
    r = act(probe, inst, "load_consumer", headers={"X-Who": str(uuid.uuid4())})
    assert r.status == 200 and r.serialize["found"] == "null" and r.consumer is None


def test_authenticated_and_ctx(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "echo", authenticated={"id": "from-key-auth"})
    assert json.loads(r.serialize["seen"])["credential"] == {"id": "from-key-auth"}
    r = act(probe, inst, "ctx", path="/a?b=1")
    assert r.serialize == {"ctx": "v", "var": "/a?b=1"} and r.ctx_shared == {"k": "v"}


def test_unknown_pdk_method_answers_nil(probe):
    inst = probe.configure({"name": "n"})
    r = act(probe, inst, "unknown")
    assert r.status == 200 and "could not find pdk method: kong.request.no_such_thing" in r.kong_error


def test_plugin_exception_lets_request_through(fragile):
    inst = fragile.configure({"name": "n"})
    started = time.monotonic()
    r = act(fragile, inst, "raise", headers={"Authorization": "Bearer x"})
    # kong-pdk never answers the Step; Kong logs the RPC error and proxies anyway
    assert r.status == 200 and r.kong_error == "timeout"
    assert r.upstream.headers["Authorization"] == "Bearer x"
    assert 0.4 < time.monotonic() - started < 3
    assert "plugin bug" in fragile.server_log()
    assert act(fragile, inst, "nothing").kong_error is None       # other events still served


def test_exception_before_any_pdk_call_wedges_the_server(fragile):
    bad = fragile.configure({"name": "n", "raise_early": True})
    good = fragile.configure({"name": "n"})
    assert fragile.request(bad).kong_error == "timeout"
    # kong-pdk's handle_event holds its event lock while waiting: everything hangs now
    r = act(fragile, good, "nothing")
    assert r.status == 200 and r.kong_error == "timeout"
    fragile.restart_server()
    r = act(fragile, good, "nothing")
    assert r.status == 200 and r.kong_error is None


def test_restart_server_recovers_through_no_plugin_instance(floor):
    inst = floor.configure({})
    assert floor.request(inst).kong_error is None
    old_pid = floor.pid
    floor.restart_server()
    assert floor.pid != old_pid
    r = floor.request(inst, headers={"Authorization": "x"})
    assert r.status == 200 and r.kong_error is None
    assert any(level == "warn" and "no plugin instance" in msg for level, msg in r.kong_logs)


def test_reconfigure_starts_a_new_instance_and_closes_the_old(floor):
    first = floor.configure({})
    floor.request(first)
    old = floor.instance_ids()[first.plugin_id]
    second = floor.configure({}, plugin_id=first.plugin_id)
    assert second.seq > first.seq
    assert floor.request(second).kong_error is None
    assert floor.instance_ids()[first.plugin_id] != old


def test_dead_server_lets_requests_through(probe):
    inst = probe.configure({"name": "n"})
    assert act(probe, inst, "nothing").kong_error is None
    probe.kill_server()
    try:
        r = act(probe, inst, "nothing")
        assert r.status == 200 and "trying to connect" in r.kong_error
        fresh = probe.configure({"name": "n"})
        r = act(probe, fresh, "nothing")                          # StartInstance fails: Lua error
        assert r.status == 500 and r.kong_error
    finally:
        probe.restart_server()
    assert act(probe, inst, "nothing").kong_error is None


def test_concurrent_requests(floor):
    inst = floor.configure({})
    results = []
    errors = []

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
    assert floor.server_log().count("of floor started") >= 1


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
    assert len(probe.admin_requests) - before == 5
    assert probe.admin_url.startswith("http://127.0.0.1:")


def test_close_kills_the_server():
    k = KongStandIn(FLOOR)
    pid = k.pid
    k.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_config_variants_kong_may_send():
    with KongStandIn(PROBE, empty_arrays_as_objects=False, drop_null_fields=True) as k:
        inst = k.configure({"name": "n"})
        sent = json.loads(inst.conf_json)
        assert sent["scopes"] == [] and "hint" not in sent and "opt" not in sent
        assert sent["redis"] == {"port": 6379}
        r = act(k, inst, "config")
        assert json.loads(r.serialize["config"]) == sent
