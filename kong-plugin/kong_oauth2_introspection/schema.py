"""The plugin's config schema, read from ``schema/oauth2-introspection.json``.

The JSON file is the one source: Kong receives its ``fields`` through ``-dump``
and enforces them with its own schema engine; :func:`validate` applies the same
rules here (for the offline ``check`` command and as a guard in the plugin);
:func:`markdown_table` renders the README's option table from it.
"""

import copy
import json
import re
from importlib import resources
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

# Keys of ours in the JSON file, for documentation only: Kong never sees them.
DOC_KEYS = frozenset({"description", "traefik", "origin"})


def load(name: str = "oauth2-introspection") -> Dict[str, Any]:
    """The schema file ``schema/NAME.json`` (one per plugin the package serves)."""
    text = (resources.files("kong_oauth2_introspection.schemadata")
            .joinpath(name + ".json").read_text(encoding="utf-8"))
    return json.loads(text)


SCHEMA = load()
FIELDS: List[Dict[str, Any]] = SCHEMA["fields"]


def _strip_docs(fields):
    out = []
    for entry in fields:
        (name, spec), = entry.items()
        spec = {k: v for k, v in spec.items() if k not in DOC_KEYS}
        if "fields" in spec:
            spec["fields"] = _strip_docs(spec["fields"])
        out.append({name: spec})
    return out


def kong_fields(fields: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """The config fields as Kong's schema engine takes them."""
    return _strip_docs(FIELDS if fields is None else fields)


class Violation(NamedTuple):
    path: str
    message: str

    def __str__(self):
        return f"{self.path}: {self.message}"


_LUA_CLASSES = {"d": r"\d", "a": "[A-Za-z]", "w": "[A-Za-z0-9]", "s": r"\s",
                "l": "[a-z]", "u": "[A-Z]", "x": "[0-9A-Fa-f]"}


def _lua_pattern(pattern: str) -> "re.Pattern[str]":
    """Translate the Lua patterns our schema uses (Kong's ``match``) to a regex."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "%" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append(_LUA_CLASSES.get(nxt, re.escape(nxt)))
            i += 2
            continue
        out.append(re.escape(ch) if ch in "|{}\\" else ch)
        i += 1
    return re.compile("".join(out), re.DOTALL)


_TYPES = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    # An empty Lua table has no type: Kong may send an empty map or record as [].
    "map": lambda v: isinstance(v, dict) or v == [],
    "record": lambda v: isinstance(v, dict) or v == [],
    # Lua's cjson encodes an empty table as {}: an empty set may arrive as a map.
    "set": lambda v: isinstance(v, list) or v == {},
    "array": lambda v: isinstance(v, list) or v == {},
}


def _check_scalar(spec, value, path, errors):
    if "one_of" in spec and value not in spec["one_of"]:
        errors.append(Violation(path, "expected one of: " + ", ".join(map(str, spec["one_of"]))))
    if "between" in spec:
        low, high = spec["between"]
        if not low <= value <= high:
            errors.append(Violation(path, f"value should be between {low} and {high}"))
    if isinstance(value, str):
        if "len_min" in spec and len(value) < spec["len_min"]:
            errors.append(Violation(path, f"length must be at least {spec['len_min']}"))
        if "match" in spec and not _lua_pattern(spec["match"]).search(value):
            errors.append(Violation(path, "invalid value: " + _shown(spec, value)))
        if "match_any" in spec:
            rule = spec["match_any"]
            data = value.encode("utf-8").decode("latin-1")  # Lua matches bytes
            if not any(_lua_pattern(p).search(data) for p in rule["patterns"]):
                errors.append(Violation(path, rule.get("err", "invalid value")))


def _shown(spec, value):
    # A referenceable field may hold a secret: never echo it.
    return "(hidden)" if spec.get("referenceable") else repr(value)


def _check(spec, value, path, errors, strict):
    kind = spec["type"]
    if not _TYPES[kind](value):
        errors.append(Violation(path, f"expected a {kind}"))
        return value
    if kind in ("map", "record") and value == []:
        value = {}
    if kind == "record":
        return _fill(spec["fields"], value, path, errors, strict)
    if kind in ("set", "array"):
        items = [] if value == {} else list(value)
        if kind == "set":
            items = list(dict.fromkeys(json.dumps(i, sort_keys=True) for i in items))
            items = [json.loads(i) for i in items]
        return [_check(spec["elements"], item, f"{path}[{n + 1}]", errors, strict)
                for n, item in enumerate(items)]
    if kind == "map":
        out = {}
        for key, item in value.items():
            _check(spec["keys"], key, f"{path}.{key}", errors, strict)
            out[key] = _check(spec["values"], item, f"{path}.{key}", errors, strict)
        return out
    if kind == "integer":
        value = int(value)
    _check_scalar(spec, value, path, errors)
    return value


def _fill(fields, config, path, errors, strict):
    known = set()
    out = {}
    for entry in fields:
        (name, spec), = entry.items()
        known.add(name)
        where = f"{path}.{name}" if path else name
        value = config.get(name)
        if value is None and "default" in spec:
            value = copy.deepcopy(spec["default"])
        if value is None and spec["type"] == "record":
            value = {}  # Kong builds a record from its fields' defaults
        if value is None:
            if spec.get("required"):
                errors.append(Violation(where, "required field missing"))
            out[name] = None
            continue
        out[name] = _check(spec, value, where, errors, strict)
    if strict:
        for name in config:
            if name not in known:
                errors.append(Violation(f"{path}.{name}" if path else name, "unknown field"))
    return out


def validate(config: Any, path: str = "config", strict: bool = True,
             fields: Optional[List[Dict[str, Any]]] = None
             ) -> Tuple[Dict[str, Any], List[Violation]]:
    """Check ``config`` against the schema the way Kong does and fill in defaults.

    Returns the normalized config (every field present, ``None`` where unset)
    and the list of violations (empty when Kong would accept it).

    ``strict`` reports keys the schema does not declare: right for a user's file
    (typos), wrong for what Kong sends, which adds ``route_id``, ``service_id``,
    ``consumer_id``, ``plugin_instance_name`` and ``__*`` keys of its own.
    """
    if not isinstance(config, dict):
        return {}, [Violation(path, "expected a record")]
    errors: List[Violation] = []
    return _fill(FIELDS if fields is None else fields, config, path, errors, strict), errors


def from_kong(config: Any) -> Dict[str, Any]:
    """The plugin's own fields of a config Kong sent, nothing else: the identity
    runtimes are shared by, whatever keys Kong adds around them."""
    if not isinstance(config, dict):
        return {}
    names = {name for entry in FIELDS for name in entry}
    return {k: v for k, v in config.items() if k in names}


def _rows(fields, prefix=""):
    for entry in fields:
        (name, spec), = entry.items()
        yield prefix + name, spec
        if spec["type"] == "record":
            yield from _rows(spec["fields"], prefix + name + ".")


def _type_text(spec):
    kind = spec["type"]
    if kind in ("set", "array"):
        return f"{kind} of {spec['elements']['type']}"
    if kind == "map":
        return f"map of {spec['keys']['type']} to {spec['values']['type']}"
    if "one_of" in spec:
        return kind + " (" + " \\| ".join(spec["one_of"]) + ")"
    return kind


def markdown_table(fields: Optional[List[Dict[str, Any]]] = None) -> str:
    """The README's option table, generated from the schema."""
    lines = ["| option | type | default | Traefik Hub | description |",
             "|---|---|---|---|---|"]
    for name, spec in _rows(FIELDS if fields is None else fields):
        default = json.dumps(spec["default"]) if "default" in spec else ""
        if spec.get("required") and "default" not in spec:
            default = "*required*"
        traefik = f"`{spec['traefik']}`" if spec.get("traefik") else ""
        desc = spec.get("description", "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_text(spec)} | {default} | {traefik} | {desc} |")
    return "\n".join(lines) + "\n"
