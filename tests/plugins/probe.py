#!/usr/bin/env python3
"""Throwaway plugin server for tests/test_kong_standin.py: its access handler does
what the request's X-Action header (or the config) asks, to exercise the stand-in."""

import base64
import json
import sys

NAME = "probe"
VERSION = "0.0.1"
PRIORITY = 5

Schema = [
    {"name": {"type": "string", "required": True}},
    {"ttl": {"type": "number", "default": 30, "between": [0, 3600]}},
    {"mode": {"type": "string", "default": "a", "one_of": ["a", "b"]}},
    {"hint": {"type": "string"}},
    {"flag": {"type": "boolean", "default": False}},
    {"scopes": {"type": "set", "elements": {"type": "string"}, "default": []}},
    {"extra": {"type": "map", "keys": {"type": "string"}, "values": {"type": "string"}}},
    {"raise_early": {"type": "boolean", "default": False}},
    {"opt": {"type": "record", "fields": [{"x": {"type": "string", "default": "d"}}]}},
    {"redis": {"type": "record", "required": True, "fields": [
        {"host": {"type": "string"}},
        {"port": {"type": "integer", "default": 6379, "between": [1, 65535]}},
        {"tls": {"type": "record", "fields": [{"verify": {"type": "boolean", "default": True}}]}},
    ]}},
]


def _jsonable(v):
    if isinstance(v, bytes):
        return {"__bytes__": base64.b64encode(v).decode()}
    if isinstance(v, str) and any(0xDC80 <= ord(c) <= 0xDCFF for c in v):
        # a msgpack str that was not UTF-8 (only seen with --lenient)
        return {"__str_bytes__": base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()}
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class Plugin(object):
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        if self.config.get("raise_early"):
            raise RuntimeError("boom before any PDK call")
        action = kong.request.get_header("x-action")
        getattr(self, "do_" + (action or "nothing").replace("-", "_"))(kong)

    def do_nothing(self, kong):
        pass

    def do_config(self, kong):
        kong.log.set_serialize_value("config", json.dumps(self.config))

    def do_echo(self, kong):
        seen = {
            "headers": kong.request.get_headers(),
            "query": kong.request.get_query(),
            "raw_body": kong.request.get_raw_body(),
            "body": kong.request.get_body(),
            "method": kong.request.get_method(),
            "path": kong.request.get_path(),
            "host": kong.request.get_host(),
            "ip": kong.client.get_ip(),
            "credential": kong.client.get_credential(),
            "missing": kong.request.get_header("x-not-there"),
            "x_token": kong.request.get_header("x-token"),
            "cookie": kong.request.get_header("cookie"),
        }
        kong.log.set_serialize_value("seen", json.dumps(_jsonable(seen)))
        kong.log.info("echo done ", 42)

    def do_exit(self, kong):
        kong.response.exit(401, {"error": "nope", "url": "http://x/y", "list": [], "n": 2.0},
                           {"WWW-Authenticate": 'Bearer realm="x"'})

    def do_exit_text(self, kong):
        kong.response.exit(403, "plain words", {"Content-Type": "text/plain"})

    def do_headers(self, kong):
        kong.service.request.set_headers({"X-Remove": [], "X-Multi": ["a", "b"], "X-New": "v",
                                          "X-Num": 7, "X-Empty": ""})
        kong.service.request.set_header("X-Single", "1")
        kong.service.request.clear_header("X-Clear")
        kong.service.request.set_query({"b": "2 3", "a": True, "list": ["x", "y"]})
        kong.service.request.set_raw_body("new body")
        kong.response.set_header("X-Resp", "r")

    def do_bad_header(self, kong):
        kong.service.request.set_headers({"X-Bad": [1]})
        kong.log.err("not reached")

    def do_load_consumer(self, kong):
        who = kong.request.get_header("x-who")
        by_name = kong.request.get_header("x-by-username") == "yes"
        consumer = kong.client.load_consumer(who, by_name)
        kong.log.set_serialize_value("found", json.dumps(consumer))
        if consumer:
            kong.client.authenticate(consumer, {"id": "cred-1", "consumer_id": consumer["id"],
                                                "dropped": None})

    def do_auth_nil(self, kong):
        kong.client.authenticate(None, None)

    def do_raise(self, kong):
        kong.request.get_method()
        raise RuntimeError("plugin bug")

    def do_unknown(self, kong):
        kong.request.no_such_thing()

    def _try(self, fn, *args):
        """A PDK read: its value, or the PDKException a StepError raises (Kong 2.8)."""
        try:
            return {"value": _jsonable(fn(*args))}
        except Exception as e:  # kong_pdk.exception.PDKException
            return {"error": str(e)}

    def do_body(self, kong):
        out = {"body": self._try(kong.request.get_body)}
        if kong.request.get_header("x-skip-raw") is None:
            out["raw_body"] = self._try(kong.request.get_raw_body)
        kong.log.set_serialize_value("body", json.dumps(out))

    def do_caps(self, kong):
        n = kong.request.get_header("x-max")
        extra = [int(n)] if n else []
        out = {"headers": len(kong.request.get_headers(*extra)),
               "query": len(kong.request.get_query(*extra)),
               "form": len(kong.request.get_body(None, *extra) or {})}
        kong.log.set_serialize_value("caps", json.dumps(out))

    def do_bad_max(self, kong):
        kong.request.get_headers(1001)

    def do_set_headers(self, kong):
        which = kong.request.get_header("x-which")
        arg = {"map": {}, "list": [], "clear": {"X-Gone": []},
               "values": {"X-Empty": "", "X-Num": 1.5, "X-Int": 3, "X-Flag": True}}[which]
        kong.service.request.set_headers(arg)

    def do_set_body(self, kong):
        ok = kong.service.request.set_body({"b": "2", "a": "1"})
        kong.log.set_serialize_value("ok", json.dumps(ok))

    def do_clear_query(self, kong):
        kong.service.request.clear_query_arg("access_token")

    def do_authenticate(self, kong):
        kong.client.authenticate(None, {"id": "cred-probe"})

    def do_ctx(self, kong):
        kong.ctx.shared.set("k", "v")
        kong.log.set_serialize_value("ctx", kong.ctx.shared.get("k"))
        kong.log.set_serialize_value("var", kong.nginx.get_var("request_uri"))


class Second(object):
    """A second plugin for --multi: it only says who it is."""

    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.log.set_serialize_value("who", "probe_two")


def _lenient():
    """--lenient: kong-pdk's listener decodes msgpack str strictly and drops the
    connection on bytes that are not UTF-8; decode them surrogate-escaped instead,
    so a test can see what Kong actually sent."""
    import msgpack
    from kong_pdk import listener
    strict = msgpack.Unpacker

    class Unpacker(strict):
        def __init__(self, *a, **kw):
            kw.setdefault("unicode_errors", "surrogateescape")
            super().__init__(*a, **kw)
    listener.msgpack = type("m", (), {"Unpacker": Unpacker, "packb": staticmethod(
        lambda o, **kw: msgpack.packb(o, unicode_errors="surrogateescape", **kw))})


def _multi(argv):
    """--multi: one kong-pdk server hosting two plugins (probe, probe_two) on
    probe.sock; -dump lists both, as Kong's query command reads them."""
    from kong_pdk.listener import UnixStreamServer
    from kong_pdk.module import Module
    from kong_pdk.server import PluginServer
    ps = PluginServer(name="probe multi", lua_style=False)
    for name, cls, schema in (("probe", Plugin, Schema), ("probe_two", Second, [])):
        mod = type("mod", (), {"Plugin": cls, "Schema": schema, "version": VERSION,
                               "priority": PRIORITY})
        ps.plugins[name] = Module(name, module=mod)
    if "-dump" in argv:
        print(json.dumps([ps.get_plugin_info(n) for n in ("probe", "probe_two")]))
        return
    prefix = argv[argv.index("-kong-prefix") + 1]
    UnixStreamServer(ps, prefix, sock_name="probe.sock").serve_forever()


def _dump_with_entity_fields():
    """PROBE_NO_CONSUMER=1: the dumped schema also has top-level entries, like a
    Lua plugin's ``consumer = typedefs.no_consumer`` and ``protocols``."""
    fields = [{"consumer": {"type": "foreign", "reference": "consumers", "eq": None}},
              {"protocols": {"type": "set", "elements": {"type": "string",
                                                         "one_of": ["http", "https"]}}},
              {"config": {"type": "record", "fields": Schema}}]
    print(json.dumps([{"Name": NAME, "Phases": ["access"], "Priority": PRIORITY,
                       "Version": VERSION, "Schema": {"name": NAME, "fields": fields}}]))


if __name__ == "__main__":
    import os
    argv = sys.argv[1:]
    if "--lenient" in argv:
        argv.remove("--lenient")
        _lenient()
    if "--multi" in argv:
        argv.remove("--multi")
        _multi(argv)
        sys.exit(0)
    if "-dump" in argv and os.environ.get("PROBE_NO_CONSUMER"):
        _dump_with_entity_fields()
        sys.exit(0)
    if "--no-lua-style" not in argv:
        argv.append("--no-lua-style")
    sys.argv = [sys.argv[0]] + argv
    from kong_pdk.cli import start_dedicated_server
    start_dedicated_server(NAME, Plugin, VERSION, PRIORITY, Schema)
