"""``kong-oauth2-introspection check FILE|-``: what Kong, or the plugin, would refuse
in a declarative config (kong.yml, YAML or JSON).

Every entry of a plugin this package serves is checked, wherever a declarative
config may hold plugins: the top level, services, routes (top level and under
services), consumers and consumer_groups. Each entry goes through

1. Kong's schema rules for the plugin entity (:meth:`PluginSchema.validate_plugin`):
   every field with a problem, with Kong's path (``config.ttl``,
   ``config.custom_claims_forward.2``, ``consumer``);
2. when those pass, the plugin's own deeper checks (``Config.parse``: the claims
   expression, header templates, header names), which Kong cannot see and which
   would otherwise fail every request of that config with a 500.

One line per problem goes to stdout: ``LOCATION.PATH: MESSAGE``, where LOCATION
is the entry in the file, counted from 0 as jq and yq count
(``services[0].routes[1].plugins[0]``) and PATH is Kong's, array elements
counted from 1 as Kong prints them (``config.store.redis.endpoints.2``).
Secrets (``referenceable`` fields) are never echoed.

Exit codes:
  0  at least one entry of ours, all valid;
  1  a problem in some entry, or no entry of ours at all (an empty file included);
  2  the file cannot be read, is not YAML or JSON, or is not a mapping;
     or the command line is wrong.
"""

import json
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

from . import NAME
from .schema import PluginSchema, Violation, load

# The plugin's checks beyond the schema: the problems of a schema-valid config.
DeepCheck = Callable[[Dict[str, Any]], List[Violation]]


def _introspection() -> Tuple[PluginSchema, DeepCheck]:
    from .config import REQUEST_DEADLINE, Config, ConfigError

    def deep(config: Dict[str, Any]) -> List[Violation]:
        try:
            conf = Config.parse(config)
        except ConfigError as err:
            return [Violation(err.field, err.message)]
        if conf.worst_case > REQUEST_DEADLINE:
            # Kong cannot check a product; the plugin server would cut it short.
            return [Violation("config.max_retries", "timeout x (max_retries + 1) plus backoff "
                              "is %.1f s, more than the %g s request deadline: the last "
                              "retries could never run" % (conf.worst_case, REQUEST_DEADLINE))]
        return []
    return load(NAME), deep


def _client_credentials() -> Tuple[PluginSchema, DeepCheck]:
    from .client_credentials.config import SCHEMA, Config

    def deep(config: Dict[str, Any]) -> List[Violation]:
        try:
            Config.parse(config)
        except ValueError as err:  # its ConfigError reads "PATH: MESSAGE"
            path, _, message = str(err).partition(": ")
            return [Violation(path, message) if message else Violation("config", str(err))]
        return []
    return SCHEMA, deep


# Plugin name -> what checks its entries. Loaded on first use, so a plugin's
# modules are imported only when a file holds one of its entries.
PLUGINS: Dict[str, Callable[[], Tuple[PluginSchema, DeepCheck]]] = {
    NAME: _introspection,
    "oauth2-client-credentials": _client_credentials,
}

# Where a declarative config nests entities that may carry plugins, and the
# foreign key Kong sets on a plugin nested under one of them.
_NESTED = {"services": "service", "routes": "route", "consumers": "consumer",
           "consumer_groups": "consumer_group"}

USAGE = "usage: kong-oauth2-introspection check FILE   (- for standard input)"


def plugin_entries(doc: Any, path: str = "",
                   scope: Optional[Dict[str, Any]] = None) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(location, entry) of every plugin entry of ours; an entry nested under a
    service, route, consumer or group gets that foreign key, as Kong gives it."""
    if not isinstance(doc, dict):
        return
    plugins = doc.get("plugins")
    for index, plugin in enumerate(plugins if isinstance(plugins, list) else []):
        if isinstance(plugin, dict) and isinstance(plugin.get("name"), str) \
                and plugin["name"] in PLUGINS:
            entry = dict(plugin)
            for key, value in (scope or {}).items():
                entry.setdefault(key, value)
            yield f"{path}plugins[{index}]", entry
    for key, foreign in _NESTED.items():
        children = doc.get(key)
        for index, child in enumerate(children if isinstance(children, list) else []):
            if not isinstance(child, dict):
                continue
            ref = child.get("id") or child.get("name") or child.get("username") or \
                child.get("custom_id") or f"{key}[{index}]"
            yield from plugin_entries(child, f"{path}{key}[{index}].",
                                      dict(scope or {}, **{foreign: ref}))


def entry_problems(entry: Dict[str, Any]) -> List[Violation]:
    """Every problem of one plugin entry: Kong's schema rules, then the plugin's own."""
    plugin_schema, deep = PLUGINS[entry["name"]]()
    violations = plugin_schema.validate_plugin(entry)
    if violations:
        return violations  # the deeper checks need a config Kong would accept
    config = entry.get("config")
    try:
        return deep({} if config is None else config)
    except Exception as err:  # a bug of ours: still one line, and no value echoed
        return [Violation("config", f"the plugin cannot use this config ({type(err).__name__})")]


def problems(doc: Any) -> List[str]:
    """One line per problem of every entry of ours in a parsed declarative config."""
    return [f"{where}.{violation}"
            for where, entry in plugin_entries(doc)
            for violation in entry_problems(entry)]


def _parse(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        try:
            return json.loads(text)  # JSON that YAML refuses (tabs, for one)
        except ValueError:
            pass
        raise


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__.split("\n\n", 1)[1].rstrip())
        return 0
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    name = args[0]
    try:
        if name == "-":
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as handle:
                text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        print(f"{name}: cannot read: {reason}", file=sys.stderr)
        return 2
    try:
        doc = _parse(text)
    except yaml.YAMLError as err:
        print(f"{name}: not YAML or JSON: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    wanted = " or ".join(sorted(PLUGINS))
    if doc is None:
        print(f"{name}: empty: no {wanted} entry to check", file=sys.stderr)
        return 1
    if not isinstance(doc, dict):
        print(f"{name}: not a declarative config: expected a mapping at the top level",
              file=sys.stderr)
        return 2
    entries = list(plugin_entries(doc))
    if not entries:
        print(f"{name}: no {wanted} entry (looked at plugins at the top level and under "
              "services, routes, consumers and consumer_groups)", file=sys.stderr)
        return 1
    found = problems(doc)
    for line in found:
        print(line)
    names = ", ".join(sorted({entry["name"] for _, entry in entries}))
    count = f"{len(entries)} {names} entr{'y' if len(entries) == 1 else 'ies'}"
    if found:
        print(f"{name}: {len(found)} problem{'' if len(found) == 1 else 's'} in {count}",
              file=sys.stderr)
        return 1
    print(f"{name}: {count}, all valid")
    return 0
