#!/usr/bin/env python3
"""The benchmark floor: a kong-pdk dedicated plugin server whose access handler
makes exactly one PDK call (``kong.request.get_header("authorization")``).

Kong's query command:  python bench/floor_plugin.py -dump
Kong's start command:  python bench/floor_plugin.py -kong-prefix DIR   (serves DIR/floor.sock)

Python-style PDK errors (``--no-lua-style``) are forced, like the real plugin server.
"""

import sys

NAME = "floor"
VERSION = "0.1.0"
PRIORITY = 0
Schema = []


class Plugin(object):
    def __init__(self, config):
        self.config = config

    def access(self, kong):
        kong.request.get_header("authorization")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--no-lua-style" not in argv:
        argv.append("--no-lua-style")
    sys.argv = [sys.argv[0]] + argv
    from kong_pdk.cli import start_dedicated_server
    start_dedicated_server(NAME, Plugin, VERSION, PRIORITY, Schema)


if __name__ == "__main__":
    main()
