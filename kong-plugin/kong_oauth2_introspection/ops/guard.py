"""The Kong-side guard: a Lua chunk for Kong's bundled ``post-function`` plugin.

Kong OSS lets a request through, unauthenticated, when the plugin server cannot
be reached, closes the connection or stays silent for 60 s. The guard runs in
Kong's own Lua after our plugin (post-function's priority is -1000, ours 1700)
and answers 503 to any request that does not carry the credential our plugins
set with ``kong.client.authenticate`` on every path that lets a request through:
it is marked ``authenticated_by`` with the plugin's name, so another plugin's
credential does not pass for ours. Two settings of the plugin config are
rendered into the chunk: ``anonymous`` (logical OR: any credential or consumer
passes, as the plugin would let it) and ``run_on_preflight`` false (an OPTIONS
request passes unauthenticated, as the plugin lets it).

With both of our plugins on one scope, each must have decided the request: a
request client-credentials let through while the introspection server was down
never had its token checked. The plugin that runs second carries the first
one's mark forward in the credential it sets (``decided_by``, read from the
credential it already asks Kong for), and the guard rendered for that set of
plugins requires every name. For one plugin the chunk is ``guard.lua`` as is.

Only one post-function instance runs per request (the most specific of route,
service and global), so the guard must sit on every scope where our plugin or
another post-function sits; ``problems`` finds the scopes of a declarative
config where it is missing.
"""

import argparse
import json
import sys
from importlib import resources
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import yaml

from .. import NAME

POST_FUNCTION = "post-function"
CLIENT_CREDENTIALS = "oauth2-client-credentials"
# The field of the credential our handlers authenticate with that the guard reads.
MARK = "authenticated_by"
# Our plugins that decided the request before the one whose credential it is.
DECIDED = "decided_by"
OURS = (CLIENT_CREDENTIALS, NAME)
_PREFLIGHT = "local run_on_preflight = true\n"
_LOGICAL_OR = "local logical_or = false\n"


def _template() -> str:
    return (resources.files(__package__) / "guard.lua").read_text(encoding="utf-8")


_OURS_LINE = ('local ours = { ["oauth2-introspection"] = true, '
              '["oauth2-client-credentials"] = true }\n')
_CHECK = "  if credential and ours[credential.authenticated_by] then\n"
# For several of our plugins on one scope: the names every request must carry.
_ALL = """-- Every one of them on this scope must have decided the request: the one that
-- ran last names those before it in decided_by.
local required = { %s }
local function decided(credential)
  local seen = {}
  if type(credential.authenticated_by) == "string" then
    seen[credential.authenticated_by] = true
  end
  if type(credential.decided_by) == "table" then
    for _, name in ipairs(credential.decided_by) do seen[name] = true end
  end
  for _, name in ipairs(required) do
    if not seen[name] then return false end
  end
  return true
end
"""


def plugin_set(names: Iterable[str]) -> Tuple[str, ...]:
    """Our plugins among ``names``, in a fixed order (what a guard is rendered for)."""
    wanted = set(names)
    unknown = wanted - set(OURS)
    if unknown:
        raise ValueError("not one of our plugins: %s" % ", ".join(sorted(unknown)))
    return tuple(n for n in OURS if n in wanted)


def render(run_on_preflight: bool, logical_or: bool = False,
           plugins: Iterable[str] = (NAME,)) -> str:
    """The guard's Lua chunk for a plugin config with this ``run_on_preflight``
    and, with ``logical_or``, an ``anonymous`` consumer, on a scope where
    ``plugins`` (our plugins' names) apply."""
    names = plugin_set(plugins)
    if not names:
        raise ValueError("a guard needs at least one of our plugins")
    text = _template()
    for switch in (_PREFLIGHT, _LOGICAL_OR, _OURS_LINE, _CHECK):
        if text.count(switch) != 1:
            raise RuntimeError("guard.lua lost its line %r" % switch.strip())
    text = text.replace(_PREFLIGHT, "local run_on_preflight = %s\n" % _lua_bool(run_on_preflight))
    text = text.replace(_LOGICAL_OR, "local logical_or = %s\n" % _lua_bool(logical_or))
    if len(names) > 1:
        text = text.replace(_OURS_LINE, _OURS_LINE + _ALL % ", ".join(
            '"%s"' % n for n in names))
        text = text.replace(_CHECK, "  if credential and decided(credential) then\n")
    return text


def decided(credential: Any) -> List[str]:
    """Our plugins a credential Kong holds says decided this request."""
    if not isinstance(credential, dict):
        return []
    found = [n for n in credential.get(DECIDED) or [] if n in OURS] \
        if isinstance(credential.get(DECIDED), list) else []
    if credential.get(MARK) in OURS and credential[MARK] not in found:
        found.append(credential[MARK])
    return found


def also_decided(credential: Dict[str, Any], name: str) -> Dict[str, Any]:
    """A copy of ``credential`` (set by another of our plugins) naming ``name`` in
    ``decided_by`` as well: the credential the plugin that runs later sets."""
    names = [n for n in decided(credential) if n != credential.get(MARK)]
    if name != credential.get(MARK) and name not in names:
        names.append(name)
    return dict(credential, **{DECIDED: names})


def _lua_bool(value: bool) -> str:
    return "true" if value else "false"


def run_on_preflight_of(plugin_config: Optional[Dict[str, Any]]) -> bool:
    # The schema's default is true; only an explicit false turns it off.
    return (plugin_config or {}).get("run_on_preflight") is not False


def logical_or_of(plugin_config: Optional[Dict[str, Any]]) -> bool:
    # Kong's auth plugins: an anonymous consumer makes the plugin one of several ways in.
    return bool((plugin_config or {}).get("anonymous"))


def render_for(plugin_config: Optional[Dict[str, Any]],
               plugins: Iterable[str] = (NAME,)) -> str:
    """The guard's Lua chunk for ``plugin_config`` (oauth2-introspection's, or
    {}) on a scope where ``plugins`` apply."""
    return render(run_on_preflight_of(plugin_config), logical_or_of(plugin_config), plugins)


def post_function_entry(plugin_config: Optional[Dict[str, Any]],
                        plugins: Iterable[str] = (NAME,)) -> Dict[str, Any]:
    """A declarative-config plugin entry holding the guard for ``plugin_config``."""
    return {"name": POST_FUNCTION, "config": {"access": [render_for(plugin_config, plugins)]}}


# --- Checking a declarative config ------------------------------------------

def _plugins(scope: Dict[str, Any], name: str) -> List[Dict[str, Any]]:
    return [p for p in scope.get("plugins") or []
            if isinstance(p, dict) and p.get("name") == name]


def _scopes(doc: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any], Optional[Dict[str, Any]]]]:
    """(path, scope, the scope our plugin falls back to) for global, services, routes."""
    yield "", doc, None
    for i, service in enumerate(doc.get("services") or []):
        if not isinstance(service, dict):
            continue
        yield f"services[{i}].", service, doc
        for j, route in enumerate(service.get("routes") or []):
            if isinstance(route, dict):
                yield f"services[{i}].routes[{j}].", route, service
    for i, route in enumerate(doc.get("routes") or []):
        if isinstance(route, dict):
            yield f"routes[{i}].", route, doc


def problems(doc: Any) -> List[str]:
    """Scopes where our plugin applies but a post-function without its guard runs.

    Kong picks the most specific post-function, so a route's own post-function
    replaces the service's guard: it must carry the guard too. The guard must
    match the ``run_on_preflight`` and ``anonymous`` of the plugin config that
    applies there.
    Plugins scoped by reference (a top-level ``plugins`` entry naming a
    ``service`` or ``route``) and consumer scopes are not followed.
    """
    if not isinstance(doc, dict):
        return []
    found = []
    # scope -> (the oauth2-introspection config that applies there or {}, our plugins there)
    parents: Dict[int, Tuple[Dict[str, Any], Tuple[str, ...]]] = {}
    for path, scope, parent in _scopes(doc):
        ours = _plugins(scope, NAME)
        # The client-credentials plugin marks its credential too: a request it never
        # saw (its server down) would reach the upstream with the client's own
        # Authorization header. Its guard has the default settings.
        others = _plugins(scope, CLIENT_CREDENTIALS)
        inherited = parents.get(id(parent)) if parent is not None else None
        if not (ours or others or inherited):
            continue
        config = (ours[0].get("config") or {}) if ours else (inherited[0] if inherited else {})
        names = tuple(sorted(set(inherited[1] if inherited else ())
                             | ({NAME} if ours else set())
                             | ({CLIENT_CREDENTIALS} if others else set())))
        parents[id(scope)] = (config, names)
        guard = render_for(config, names)
        functions = _plugins(scope, POST_FUNCTION)
        if not functions and not (ours or others):
            continue  # the guard of the less specific scope runs here
        if not any(guard in ((p.get("config") or {}).get("access") or []) for p in functions):
            found.append(f"{path}plugins: {' and '.join(names)} "
                         f"appl{'ies' if len(names) == 1 else 'y'} here without the "
                         "post-function guard "
                         f"(run_on_preflight={_lua_bool(run_on_preflight_of(config))}, "
                         f"anonymous {'set' if logical_or_of(config) else 'unset'}"
                         + ("; render it with: guard " + " ".join(
                             ["--plugin " + n for n in names]
                             + (["--no-preflight"] if not run_on_preflight_of(config) else [])
                             + (["--anonymous"] if logical_or_of(config) else []))
                            if len(names) > 1 else "")
                         + ")")
    return found


# --- Command line ------------------------------------------------------------

class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as YAML literal blocks, so the Lua stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kong-oauth2-introspection guard",
        description="Print the post-function plugin entry that refuses (503) every request "
                    "our plugins did not decide. Put it on the same "
                    "scope as the plugins.")
    parser.add_argument("--no-preflight", action="store_true",
                        help="for a plugin with run_on_preflight: false (OPTIONS pass unchecked)")
    parser.add_argument("--anonymous", action="store_true",
                        help="for a plugin with anonymous set (logical OR): another "
                             "authentication plugin's caller, or the anonymous consumer, passes")
    parser.add_argument("--plugin", action="append", choices=OURS, dest="plugins",
                        help="one of our plugins on the scope (repeat it for both: the guard "
                             "then requires that each decided the request); default "
                             "oauth2-introspection")
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml",
                        help="yaml: an item for a declarative config's plugins list; "
                             "json: a body for the Admin API's POST .../plugins")
    args = parser.parse_args(list(argv))
    entry = post_function_entry({"run_on_preflight": not args.no_preflight,
                                 "anonymous": "any" if args.anonymous else None},
                                args.plugins or (NAME,))
    if args.format == "json":
        sys.stdout.write(json.dumps(entry, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.dump([entry], Dumper=_BlockDumper, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
