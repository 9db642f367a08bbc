"""The ``kong-oauth2-introspection`` command.

- no sub-command: kong-pdk's dedicated plugin server (``-dump`` for Kong's
  query command, ``-kong-prefix DIR`` to serve ``DIR/oauth2-introspection.sock``);
- ``check FILE``: validate the plugin's entries of a declarative config offline;
- ``docs``: print the option table generated from the schema.
"""

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        from .check import main as check_main
        return check_main(argv[1:])
    if argv[:1] == ["docs"]:
        from .schema import markdown_table
        sys.stdout.write(markdown_table())
        return 0
    return serve(argv)


def serve(argv):
    if "-g" in argv or "--gevent" in argv:
        # Greenlets need cooperative sockets for requests and redis-py.
        from gevent import monkey
        monkey.patch_all()
    # The plugin is written against python-style PDK calls (exceptions, one value).
    if "--no-lua-style" not in argv:
        argv.append("--no-lua-style")
    sys.argv = [sys.argv[0]] + argv

    from kong_pdk.cli import start_dedicated_server

    from . import NAME, PRIORITY, VERSION
    from .handler import Plugin
    from .schema import kong_fields
    start_dedicated_server(NAME, Plugin, VERSION, PRIORITY, kong_fields())
    return 0


if __name__ == "__main__":
    sys.exit(main())
