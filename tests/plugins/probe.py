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

    def do_ctx(self, kong):
        kong.ctx.shared.set("k", "v")
        kong.log.set_serialize_value("ctx", kong.ctx.shared.get("k"))
        kong.log.set_serialize_value("var", kong.nginx.get_var("request_uri"))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--no-lua-style" not in argv:
        argv.append("--no-lua-style")
    sys.argv = [sys.argv[0]] + argv
    from kong_pdk.cli import start_dedicated_server
    start_dedicated_server(NAME, Plugin, VERSION, PRIORITY, Schema)
