"""The plugins this package ships, by name.

One plugin per plugin server: Kong 3.9 registers only the first entry of a query
command's list (kong/runloop/plugin_servers/process.lua), so each plugin gets its
own ``pluginserver_names`` entry, socket and query command (``--plugin NAME``).
Kong 2.8 to 3.8 read the same one-entry list just as well.

The names are known without importing the plugins: the command line checks
``--plugin`` before it pays for loading one.
"""

from typing import Tuple

from . import NAME as INTROSPECTION
from .client_credentials import NAME as CLIENT_CREDENTIALS

DEFAULT = INTROSPECTION   # what kong-pdk style ``-kong-prefix DIR`` / ``-dump`` serve
NAMES: Tuple[str, ...] = (INTROSPECTION, CLIENT_CREDENTIALS)


def load(name: str) -> type:
    """The plugin class of ``name`` (one of NAMES; else KeyError)."""
    if name == INTROSPECTION:
        from .introspection.handler import Plugin
        return Plugin
    if name == CLIENT_CREDENTIALS:
        from .client_credentials.handler import Plugin as ClientCredentials
        return ClientCredentials
    raise KeyError(name)


def all_plugins() -> Tuple[type, ...]:
    """Every plugin class, in NAMES order."""
    return tuple(load(name) for name in NAMES)


def __getattr__(attr: str) -> Tuple[type, ...]:
    # ``plugins.ALL`` stays available, loaded on first use.
    if attr == "ALL":
        return all_plugins()
    raise AttributeError(attr)
