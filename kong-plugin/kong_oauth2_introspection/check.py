"""``kong-oauth2-introspection check kong.yml``: find every oauth2-introspection
entry of a declarative config and report what Kong, or the plugin, would refuse.

Exit 0 when all entries are usable, 1 on any problem, 2 when the file cannot
be read. Paths are 0-based, as jq and yq count.
"""

import sys
from typing import Iterator, List, Tuple

import yaml

from . import NAME
from .config import Config, ConfigError
from .schema import validate

# Where a declarative config may hold plugins, besides the top level.
_NESTED = ("services", "routes", "consumers", "consumer_groups")


def plugin_entries(doc, path="") -> Iterator[Tuple[str, dict]]:
    if not isinstance(doc, dict):
        return
    for index, plugin in enumerate(doc.get("plugins") or []):
        if isinstance(plugin, dict) and plugin.get("name") == NAME:
            yield f"{path}plugins[{index}]", plugin
    for key in _NESTED:
        for index, child in enumerate(doc.get(key) or []):
            yield from plugin_entries(child, f"{path}{key}[{index}].")


def problems(doc) -> List[str]:
    found = []
    for where, plugin in plugin_entries(doc):
        config = plugin.get("config")
        if config is None:
            config = {}
        conf, violations = validate(config, path=f"{where}.config")
        found.extend(str(v) for v in violations)
        if violations:
            continue
        try:
            Config.parse(config)
        except ConfigError as err:
            found.append(f"{where}.{err.field}: {err.message}")
    return found


def main(argv) -> int:
    if len(argv) != 1:
        print("usage: kong-oauth2-introspection check FILE   (- for standard input)",
              file=sys.stderr)
        return 2
    name = argv[0]
    try:
        text = sys.stdin.read() if name == "-" else open(name, encoding="utf-8").read()
        doc = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as err:
        print(f"{name}: cannot read: {err}", file=sys.stderr)
        return 2
    entries = list(plugin_entries(doc))
    found = problems(doc)
    for line in found:
        print(line)
    if not found:
        print(f"{name}: {len(entries)} {NAME} entr{'y' if len(entries) == 1 else 'ies'}, all valid")
    return 1 if found else 0
