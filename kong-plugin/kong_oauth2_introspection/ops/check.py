"""``kong-oauth2-introspection check FILE|-``: what Kong, or the plugin, would refuse
in a declarative config (kong.yml or a decK file, YAML or JSON) or in Kubernetes
manifests (KongPlugin / KongClusterPlugin), for a CI gate.

Every entry of a plugin this package serves is checked, wherever a declarative
config may hold plugins: the top level, services, routes (top level and under
services), consumers and consumer_groups. Each entry goes through

1. Kong's schema rules for the plugin entity (:meth:`PluginSchema.validate_plugin`),
   the schema's entity checks (cross-field rules) included: every field with a
   problem, with Kong's path (``config.ttl``, ``config.custom_claims_forward.2``,
   ``consumer``); a rule Kong skips for a vault reference is still reported;
2. the plugin's own checks, which Kong cannot make and which would otherwise fail
   every request of that config with a 500: the claims expression, header
   templates, header names, key material (PEM certificates and keys, the private
   JWK), timeout and retries against the request deadline;
3. the fail-closed guard (:func:`guard.problems`): a scope our plugin protects
   without the post-function guard, a guard rendered for other settings, a more
   specific post-function that shadows it.

One line per problem goes to stdout: ``LOCATION.PATH: MESSAGE``, where LOCATION
is the entry in the file, counted from 0 as jq and yq count
(``services[0].routes[1].plugins[0]``, or ``KongPlugin/NAME`` in a manifest) and
PATH is Kong's, array elements counted from 1 as Kong prints them
(``config.store.redis.endpoints.2``). Secrets (``referenceable`` fields) are never
echoed. Values filled in later are not checked as written, and said so: decK's
``${{ env "DECK_X" }}`` ("resolved by decK") and a manifest's ``configFrom`` /
``configPatches`` from a Secret ("resolved by Kubernetes").

Exit codes:
  0  at least one entry of ours, all valid;
  1  a problem in some entry, or no entry of ours at all (an empty file included);
  2  the file cannot be read, is not YAML or JSON (duplicate keys, nesting too deep
     included), or is not a mapping; or the command line is wrong.
"""

import copy
import json
import re
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import yaml

from .. import NAME
from . import guard
from ..schema import PluginSchema, Violation, is_reference, load

# The plugin's checks beyond the schema, on the config as the schema normalized it
# (every field present). They run even when the schema found problems, so that
# one run shows everything; a crash on a value the schema refused already is not
# a problem of its own.
DeepCheck = Callable[[Dict[str, Any]], List[Violation]]

# The PEM fields of each plugin: certificates (one or more) and private keys.
_PEMS = {
    NAME: ("client_tls", "store.redis.tls"),
    "oauth2-client-credentials": ("client_config.tls", "store.redis.tls"),
}


def _every(first: Callable[[Dict[str, Any]], Optional[Violation]],
           plugin_schema: PluginSchema) -> DeepCheck:
    """A deep check reporting every problem of an entry, where ``first`` (like the
    runtime's parse) stops at the first: the top-level field each problem names is
    put back to its default and ``first`` runs again, until it finds none. A field
    is reported once, however many problems it holds."""
    def deep(conf: Dict[str, Any]) -> List[Violation]:
        defaults, _ = plugin_schema.validate({}, strict=False)
        conf = dict(conf)
        found: List[Violation] = []
        reset: Set[str] = set()
        while True:
            try:
                violation = first(conf)
            except Exception:  # noqa: BLE001 - a value the schema refused (reported there)
                if found:
                    return found
                raise
            if violation is None:
                return found
            key = violation.path.split(".")[1] if violation.path.startswith("config.") \
                else violation.path
            if key in reset:
                return found   # what its default broke, not the user's value
            found.append(violation)
            if key not in conf or conf[key] == (defaults or {}).get(key):
                return found   # its default does not help: nothing more to learn
            reset.add(key)
            conf[key] = copy.deepcopy((defaults or {}).get(key))
    return deep


def _introspection() -> Tuple[PluginSchema, DeepCheck]:
    from ..concurrency import REQUEST_DEADLINE
    from ..introspection.config import Config, ConfigError

    def first(conf: Dict[str, Any]) -> Optional[Violation]:
        try:
            parsed = Config._from_valid(conf)
        except ConfigError as err:
            return Violation(err.field, err.message)
        if parsed.worst_case > REQUEST_DEADLINE:
            # Kong cannot check a product; the plugin server would cut it short.
            return Violation("config.max_retries", "timeout x (max_retries + 1) plus backoff "
                             "is %.1f s, more than the %g s request deadline: the last "
                             "retries could never run" % (parsed.worst_case, REQUEST_DEADLINE))
        return None
    plugin_schema = load(NAME)
    return plugin_schema, _every(first, plugin_schema)


def _client_credentials() -> Tuple[PluginSchema, DeepCheck]:
    from ..client_credentials.config import SCHEMA, Config, ConfigError

    def first(conf: Dict[str, Any]) -> Optional[Violation]:
        try:
            Config._from_valid(conf)
        except ConfigError as err:  # its text reads "PATH: MESSAGE"
            path, _, message = str(err).partition(": ")
            return Violation(path, message) if message else Violation("config", str(err))
        return None
    return SCHEMA, _every(first, SCHEMA)


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

# decK's environment placeholder: ${{ env "DECK_NAME" }} (decK substitutes it
# before it validates or syncs; Kong never sees it).
_DECK_ENV = re.compile(r'\$\{\{\s*env\s+"(DECK_[A-Za-z0-9_]*)"\s*\}\}')
# Kubernetes kinds whose plugin config we check (configuration.konghq.com/v1).
_K8S_KINDS = ("KongPlugin", "KongClusterPlugin")

USAGE = "usage: kong-oauth2-introspection check FILE   (- for standard input)"


class Entry:
    """One plugin entry of ours: where it is, the entity, and the config paths
    whose value is filled in later (path -> by whom), which are not checked."""

    def __init__(self, where: str, entity: Dict[str, Any],
                 resolved: Optional[Dict[str, str]] = None, opaque: bool = False) -> None:
        self.where = where
        self.entity = entity
        self.resolved = resolved or {}
        self.opaque = opaque   # the whole config comes from elsewhere

    @property
    def name(self) -> str:
        return str(self.entity["name"])


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


def _deck_placeholders(value: Any, path: str) -> Iterator[Tuple[str, str]]:
    """(config path, variable) of every decK env placeholder in a config."""
    if isinstance(value, str):
        found = _DECK_ENV.search(value)
        if found:
            yield path, found.group(1)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _deck_placeholders(item, f"{path}.{key}")
    elif isinstance(value, list):
        for n, item in enumerate(value, 1):
            yield from _deck_placeholders(item, f"{path}.{n}")


def declarative_entries(doc: Dict[str, Any]) -> List[Entry]:
    entries = []
    for where, entity in plugin_entries(doc):
        resolved = {path: f'resolved by decK (${{{{ env "{var}" }}}})'
                    for path, var in _deck_placeholders(entity.get("config"), "config")}
        entries.append(Entry(where, entity, resolved))
    return entries


def _secret(ref: Any) -> str:
    ref = (ref or {}).get("secretKeyRef") if isinstance(ref, dict) else None
    if not isinstance(ref, dict):
        return "a Secret"
    return "Secret %s key %s" % (ref.get("name", "?"), ref.get("key", "?"))


def kubernetes_entries(docs: Sequence[Any]) -> Tuple[List[Entry], List[str]]:
    """Our KongPlugin / KongClusterPlugin resources (other kinds are passed over),
    and the problems the CRDs' own rules find."""
    entries: List[Entry] = []
    found: List[str] = []
    for index, doc in enumerate(docs):
        if not isinstance(doc, dict) or doc.get("kind") not in _K8S_KINDS \
                or doc.get("plugin") not in PLUGINS:
            continue
        meta = doc.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        where = "%s/%s" % (doc["kind"], meta.get("name") or f"[{index}]")
        # The CRDs' x-kubernetes-validations.
        if "config" in doc and "configFrom" in doc:
            found.append(f"{where}: config and configFrom: not both (the CRD refuses it)")
        if "configFrom" in doc and "configPatches" in doc:
            found.append(f"{where}: configFrom and configPatches: not both (the CRD refuses it)")
        entity: Dict[str, Any] = {"name": doc["plugin"],
                                  "config": copy.deepcopy(doc.get("config") or {})}
        for key in ("protocols", "instance_name", "ordering"):
            if key in doc:
                entity[key] = doc[key]
        if doc.get("consumerRef"):
            entity["consumer"] = doc["consumerRef"]
        if "configFrom" in doc:
            entries.append(Entry(where, entity, {"config": "resolved by Kubernetes (%s)"
                                                 % _secret(doc["configFrom"])}, opaque=True))
            continue
        resolved = {}
        patches = doc.get("configPatches")
        for patch in patches if isinstance(patches, list) else []:
            pointer = patch.get("path") if isinstance(patch, dict) else None
            if not isinstance(pointer, str) or not pointer.startswith("/"):
                found.append(f"{where}.configPatches: path must be a JSON pointer (/field)")
                continue
            parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
            target = entity["config"]
            for part in parts[:-1]:
                target = target.setdefault(part, {}) if isinstance(target, dict) else {}
            if isinstance(target, dict):
                target[parts[-1]] = "(from Kubernetes)"
            resolved["config." + ".".join(parts)] = "resolved by Kubernetes (%s)" % _secret(
                patch.get("valueFrom"))
        entries.append(Entry(where, entity, resolved))
    return entries, found


def _covered(path: str, resolved: Dict[str, str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in resolved)


def _stand_in_for_resolved(plugin_schema: PluginSchema, entry: Entry) -> Dict[str, Any]:
    """The entity with every value filled in later replaced by what passes for it:
    a vault reference in a referenceable field (no validator applies), else the
    text as written, whose own problems are then left out."""
    entity = copy.deepcopy(entry.entity)
    for path in entry.resolved:
        parts = path.split(".")[1:]
        try:
            spec = plugin_schema._spec_of(path)
        except KeyError:
            continue
        target = entity.get("config")
        for part in parts[:-1]:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict) and spec.get("type") == "string" and spec.get("referenceable"):
            target[parts[-1]] = "{vault://resolved/%s}" % parts[-1]
    return entity


_NOT_PEM = {"ca": "not PEM certificates", "cert": "not a PEM certificate",
            "key": "not an unencrypted PEM private key"}


def _pem_problems(conf: Dict[str, Any], records: Sequence[str]) -> List[Violation]:
    """PEM certificates and keys that do not parse (the plugin would fail every
    request with them)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    found = []
    for record in records:
        values: Any = conf
        for part in record.split("."):
            values = values.get(part) if isinstance(values, dict) else None
        if not isinstance(values, dict):
            continue
        for name in ("ca", "cert", "key"):
            value = values.get(name)
            if not isinstance(value, str) or not value or is_reference(value):
                continue
            data = value.encode("utf-8", "surrogateescape")
            try:
                if name == "key":
                    serialization.load_pem_private_key(data, password=None)
                elif not x509.load_pem_x509_certificates(data):
                    raise ValueError
            except (ValueError, TypeError, UnsupportedAlgorithm):
                found.append(Violation(f"config.{record}.{name}", _NOT_PEM[name]))
    return found


def entry_problems(entry: Any) -> List[Violation]:
    """Every problem of one plugin entry: Kong's schema rules (entity checks
    included) and the plugin's own, together."""
    if not isinstance(entry, Entry):
        entry = Entry("", entry)
    plugin_schema, deep = PLUGINS[entry.name]()
    if entry.opaque:
        # Only the fields around the config can be checked.
        return [v for v in plugin_schema.validate_plugin(dict(entry.entity, config={}))
                if not v.path.startswith("config")]
    entity = _stand_in_for_resolved(plugin_schema, entry)
    violations = [v for v in plugin_schema.validate_plugin(entity)
                  if not _covered(v.path, entry.resolved)]
    config = entity.get("config")
    conf, _ = plugin_schema.validate({} if config is None else config, strict=False)
    if not conf:
        return violations
    extra = _pem_problems(conf, _PEMS[entry.name])
    try:
        extra += deep(conf)
    except Exception as err:  # noqa: BLE001 - a value the schema refused, or a bug of ours
        if not violations:    # still one line, and no value echoed
            extra.append(Violation("config", "the plugin cannot use this config (%s)"
                                   % type(err).__name__))
    seen = {v.path for v in violations}
    violations += [v for v in extra if v.path not in seen and not _covered(v.path, entry.resolved)]
    return violations


def problems(doc: Any) -> List[str]:
    """One line per problem of a parsed declarative config: every entry of ours,
    then the guard."""
    lines = [f"{entry.where}.{violation}"
             for entry in declarative_entries(doc if isinstance(doc, dict) else {})
             for violation in entry_problems(entry)]
    return lines + guard.problems(doc)


class _Loader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (YAML says keys are
    unique; PyYAML, like Kong's loader, would keep the last one silently)."""


def _mapping(loader: _Loader, node: yaml.MappingNode) -> Dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:   # an unhashable key: yaml refuses it below
            continue
        if duplicate:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} at line {mark.line + 1}, "
                f"column {mark.column + 1}")
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _json_pairs(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse(text: str) -> List[Any]:
    """The documents of a YAML (or JSON) text."""
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as err:
        if "duplicate key" in str(err):
            raise
        try:
            return [json.loads(text, object_pairs_hook=_json_pairs)]  # JSON YAML refuses (tabs)
        except json.JSONDecodeError:
            pass
        raise


def _reason(err: Exception) -> str:
    """A parse error in one line, without the snippet of the file PyYAML quotes
    (the line could hold a secret)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return " ".join(f"{err.problem}{where}".split())
    return " ".join(str(err).split())


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
        docs = [d for d in _parse(text) if d is not None]
    except (yaml.YAMLError, ValueError) as err:   # ValueError: a key twice in JSON
        print(f"{name}: not YAML or JSON: {_reason(err)}", file=sys.stderr)
        return 2
    except RecursionError:
        print(f"{name}: not YAML or JSON this command can read: nested too deep",
              file=sys.stderr)
        return 2
    try:
        return _report(name, docs)
    except RecursionError:   # a structure nested deeper than the schema goes
        print(f"{name}: nested too deep to check", file=sys.stderr)
        return 2


def _report(name: str, docs: List[Any]) -> int:
    wanted = " or ".join(sorted(PLUGINS))
    if not docs:
        print(f"{name}: empty: no {wanted} entry to check", file=sys.stderr)
        return 1
    kubernetes = any(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs)
    if not kubernetes and (len(docs) > 1 or not isinstance(docs[0], dict)):
        print(f"{name}: not a declarative config: expected one mapping at the top level",
              file=sys.stderr)
        return 2
    if kubernetes:
        entries, found = kubernetes_entries(docs)
        where_looked = "KongPlugin or KongClusterPlugin resources"
    else:
        entries, found = declarative_entries(docs[0]), []
        where_looked = ("plugins at the top level and under services, routes, consumers "
                        "and consumer_groups")
    if not entries:
        print(f"{name}: no {wanted} entry (looked at {where_looked})", file=sys.stderr)
        return 1
    found += [f"{entry.where}.{violation}" for entry in entries
              for violation in entry_problems(entry)]
    if not kubernetes:
        found += guard.problems(docs[0])
    for line in found:
        print(line)
    notes = [f"{entry.where}.{path}: {how}, not checked"
             for entry in entries for path, how in sorted(entry.resolved.items())]
    for line in notes:
        print(line, file=sys.stderr)
    names = ", ".join(sorted({entry.name for entry in entries}))
    count = f"{len(entries)} {names} entr{'y' if len(entries) == 1 else 'ies'}"
    if found:
        print(f"{name}: {len(found)} problem{'' if len(found) == 1 else 's'} in {count}",
              file=sys.stderr)
        return 1
    later = f" ({len(notes)} value{'' if len(notes) == 1 else 's'} filled in later)" \
        if notes else ""
    print(f"{name}: {count}, all valid{later}")
    return 0
