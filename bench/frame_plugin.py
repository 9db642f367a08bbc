#!/usr/bin/env python3
"""Our own plugin server with nothing in it: the real listener (lenient decoding,
one deadline per event, greenlets on the asyncio loop, the instance table)
hosting a plugin whose access handler makes our cache
hit's three PDK calls with constant arguments, like bench/bound_plugin.py.

Beside the bound (the protocol alone on a bare ``selectors`` loop) it splits a
hit's cost in two: this row minus the bound is what our server's machinery costs
per request, our hit minus this row is what the plugin's own work costs.

Kong's query command:  python bench/frame_plugin.py -dump
Kong's start command:  python bench/frame_plugin.py -kong-prefix DIR   (serves DIR/frame.sock)
"""

import json
import os
import sys

from kong_oauth2_introspection.ops.log import LOG
from kong_oauth2_introspection.server.instances import PluginInstance
from kong_oauth2_introspection.server.listener import PluginServer, plugin_info, serve
from kong_oauth2_introspection.server.registry import Registry

NAME = "frame"
HEADERS = {"X-Credential-Client-ID": "bench", "X-Consumer-ID": []}
CREDENTIAL = {"id": "d9648806-1ad3-d9cc-d4fb-dc84e9cc0d61"}


class _Schema:
    """No fields: the instance's config is empty whatever Kong adds around it."""

    def kong_schema(self):
        return {"name": NAME, "fields": [{"config": {"type": "record", "fields": []}}]}

    def from_kong(self, config):
        return {}


class Frame(PluginInstance):
    NAME = NAME
    VERSION = "0.1.0"
    PRIORITY = 0
    SCHEMA = _Schema()
    RUNTIMES = Registry(idle=1)

    @classmethod
    def build(cls, conf_only):
        return None

    def access(self, kong):
        kong.request.get_headers(1000)
        kong.service.request.set_headers(HEADERS)
        kong.client.authenticate(None, CREDENTIAL)


def main(argv):
    if "-dump" in argv:
        print(json.dumps([plugin_info(Frame)]))
        return 0
    prefix = argv[argv.index("-kong-prefix") + 1]
    serve(os.path.join(prefix, NAME + ".sock"), PluginServer([Frame], log=LOG))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
