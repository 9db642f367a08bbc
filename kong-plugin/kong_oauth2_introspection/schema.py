"""Plugin config schemas, read from ``schema/<plugin>.json``, and Kong's rules applied to them.

Each JSON file is the one source for its plugin: Kong receives
:meth:`PluginSchema.kong_schema` through the query command (``-dump``) and
enforces it with its own schema engine; :meth:`PluginSchema.validate` applies
the same rules here (for the offline ``check`` command and as a guard in the
plugin); :meth:`PluginSchema.markdown_table` renders the README's option table.

The rules follow Kong 3.9's ``kong/db/schema/init.lua`` (``validate_field``,
``handle_missing_field``, ``make_set``) and ``kong/db/schema/entity.lua``
(``make_records_required``): strings are non-empty unless ``len_min`` says
otherwise, lengths count bytes, patterns are Lua patterns, a vault reference in a
``referenceable`` string skips the other checks, sets lose their duplicates, and
a record nobody set is built from its fields' defaults. Every field with a
problem is reported, each with the first rule it breaks, as Kong does.

The module-level names (``FIELDS``, ``validate`` …) are the oauth2-introspection
plugin's, for the code written before there was a second plugin.
"""

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from . import entity_checks as checks_engine
from . import luapattern

Spec = Dict[str, Any]

# Keys of ours in the JSON files, for documentation only: Kong never sees them.
DOC_KEYS = frozenset({"description", "traefik", "origin"})

# typedefs.protocols_http of Kong 3.9 OSS: the HTTP-subsystem protocols, sorted
# (ws and wss exist only in Kong Enterprise). An external plugin only ever runs in
# the http subsystem, so this is every protocol it can serve.
HTTP_PROTOCOLS = ["grpc", "grpcs", "http", "https"]


class Violation(NamedTuple):
    path: str
    message: str
    # Kong itself lets this through: an entity check it does not run because one
    # of the fields it covers holds a vault reference (the plugin still refuses it).
    kong_skips: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def is_reference(value: Any) -> bool:
    """Kong's ``kong.vault.is_reference``: ``{vault://…}``."""
    return isinstance(value, str) and value.startswith("{vault://") and value.endswith("}")


def _lua_len(value: Any) -> int:
    # Lua's # counts bytes; Kong counts a map's keys.
    return len(value.encode("utf-8")) if isinstance(value, str) else len(value)


def _num(value: Any) -> str:
    """A value as Lua's tostring (or %d, for whole numbers) would print it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_validators(spec: Spec, value: Any) -> Optional[str]:
    """The first of Kong's validators (in Kong's order) that ``value`` fails."""
    def shown() -> str:
        # Kong echoes the value; a referenceable field may hold a secret: never echo it.
        return "(hidden)" if spec.get("referenceable") else str(value)

    if "eq" in spec and spec["eq"] is not None and value != spec["eq"]:
        return f"value must be {_num(spec['eq'])}"
    if "ne" in spec and value == spec["ne"]:
        return f"value must not be {_num(value)}"
    if "not_one_of" in spec and value in spec["not_one_of"]:
        return "must not be one of: " + ", ".join(map(_num, spec["not_one_of"]))
    if "one_of" in spec and value not in spec["one_of"]:
        return "expected one of: " + ", ".join(map(_num, spec["one_of"]))
    if "gt" in spec and not value > spec["gt"]:
        return f"value must be greater than {_num(spec['gt'])}"
    if "between" in spec:
        low, high = spec["between"]
        if value < low or value > high:
            return f"value should be between {_num(low)} and {_num(high)}"
    for rule, test, text in (("len_eq", lambda n, m: n == m, "length must be {}"),
                             ("len_min", lambda n, m: n >= m, "length must be at least {}"),
                             ("len_max", lambda n, m: n <= m, "length must be at most {}")):
        if rule in spec and not test(_lua_len(value), spec[rule]):
            return text.format(spec[rule])
    if not isinstance(value, str):
        if "contains" in spec and spec["contains"] not in value:
            return f"expected to contain: {_num(spec['contains'])}"
        return None
    if "starts_with" in spec and not value.startswith(spec["starts_with"]):
        return f"should start with: {spec['starts_with']}"
    if "not_match" in spec and luapattern.find(spec["not_match"], value):
        return "invalid value: " + shown()
    for rule in spec.get("match_none", ()):
        if luapattern.find(rule["pattern"], value):
            return rule.get("err") or "invalid value: " + shown()
    if "match" in spec and not luapattern.find(spec["match"], value):
        return "invalid value: " + shown()
    for rule in spec.get("match_all", ()):
        if not luapattern.find(rule["pattern"], value):
            return rule.get("err") or "invalid value: " + shown()
    if "match_any" in spec:
        rule = spec["match_any"]
        if not any(luapattern.find(p, value) for p in rule["patterns"]):
            return rule.get("err") or "invalid value: " + shown()
    return None


class PluginSchema:
    """One plugin's schema, as ``schema/<name>.json`` declares it."""

    def __init__(self, doc: Dict[str, Any]):
        self.doc = doc
        self.name: str = doc["name"]
        self.fields: List[Dict[str, Spec]] = doc["fields"]
        # An authentication plugin cannot be scoped to a consumer: Kong's
        # typedefs.no_consumer (Kong Enterprise's oauth2-introspection has it).
        # The JSON says true, or gives the reason as a string.
        no_consumer = doc.get("no_consumer")
        self.no_consumer: bool = bool(no_consumer)
        self.no_consumer_message = f"{self.name} cannot be scoped to a consumer" + (
            f": {no_consumer}" if isinstance(no_consumer, str) else "")
        for path, spec in _walk(self.fields, "config"):
            _compile_patterns(path, spec)
        # Cross-field rules on the plugin entity, with Kong's paths (config.x).
        self.entity_checks: List[Dict[str, Any]] = doc.get("entity_checks", [])
        self._entity_spec: Spec = {"type": "record", "fields": [
            {"config": {"type": "record", "fields": self.fields}}]}
        _check_entity_checks("plugin", self._entity_spec, self.entity_checks)

    # -- what Kong reads ------------------------------------------------------

    def kong_fields(self) -> List[Dict[str, Spec]]:
        """The config fields as Kong's schema engine takes them (no doc keys)."""
        return _strip_docs(self.fields)

    def entity_fields(self) -> List[Dict[str, Spec]]:
        """The plugin-entity fields besides ``config`` that Kong's own plugins restrict."""
        fields: List[Dict[str, Spec]] = []
        if self.no_consumer:
            # As typedefs.no_consumer: a foreign key that must stay null. Kong's
            # loader decodes the JSON null as cjson.null, which is ngx.null, the
            # value its `eq` validator and kong/db/dao/plugins.lua compare with.
            fields.append({"consumer": {
                "type": "foreign", "reference": "consumers", "eq": None,
                "err": self.no_consumer_message,
            }})
        fields.append({"protocols": {
            "type": "set", "required": True, "default": list(HTTP_PROTOCOLS),
            "elements": {"type": "string", "one_of": list(HTTP_PROTOCOLS)},
        }})
        return fields

    def kong_schema(self) -> Dict[str, Any]:
        """The ``Schema`` object of the query command's answer: Kong validates it with
        its MetaSubSchema (only ``name`` and ``fields`` here) and mounts it as the
        plugins entity's subschema ``name``."""
        schema: Dict[str, Any] = {
            "name": self.name,
            "fields": self.entity_fields()
            + [{"config": {"type": "record", "fields": self.kong_fields()}}]}
        if self.entity_checks:
            # Kong runs them on the plugin entity (process.lua takes the Schema
            # verbatim), hence the config. prefix of their field names.
            schema["entity_checks"] = checks_engine.strip_docs(self.entity_checks)
        return schema

    # -- Kong's rules, applied here ---------------------------------------------

    def validate(self, config: Any, path: str = "config", strict: bool = True,
                 kong: bool = False) -> Tuple[Dict[str, Any], List[Violation]]:
        """Check ``config`` the way Kong does and fill in defaults.

        Returns the normalized config (every field present, ``None`` where
        unset) and every violation (empty when Kong would accept it), the
        plugin entity's entity checks included.

        ``strict`` reports keys the schema does not declare: right for a user's
        file (typos), wrong for what Kong sends, which adds ``route_id``,
        ``service_id``, ``consumer_id``, ``plugin_instance_name`` and ``__*`` keys.
        ``kong`` leaves out what Kong itself lets through (an entity check
        covering a vault reference); by default those are reported too, since
        the plugin cannot run such a config either.
        """
        errors: List[Violation] = []
        if isinstance(config, list) and not config:
            config = {}  # an empty Lua table
        if not isinstance(config, dict):
            return {}, [Violation(path, "expected a record")]
        out = _record(self.fields, config, path, errors, strict)
        for failure in checks_engine.evaluate(
                self.entity_checks, {"config": out}, self._spec_of, _matches, is_reference):
            errors.append(_violation(failure, ""))
        if kong:
            errors = [e for e in errors if not e.kong_skips]
        return out, errors

    def _spec_of(self, name: str) -> Spec:
        return _spec_at(self._entity_spec, name)

    def validate_plugin(self, entry: Any, kong: bool = False) -> List[Violation]:
        """Check a whole plugin entity (a ``plugins:`` item of a declarative
        config): ``config`` and the top-level fields this schema restricts, as
        Kong would, with Kong's paths (``consumer``, ``protocols.1``, ``config.ttl``)."""
        if not isinstance(entry, dict):
            return [Violation("plugin", "expected a record")]
        errors: List[Violation] = []
        restricted = {name: spec for item in self.entity_fields() for name, spec in item.items()}
        for name, value in entry.items():
            if name == "config" or name in restricted:
                continue
            if name not in _PLUGIN_ENTITY:
                errors.append(Violation(str(name), "unknown field"))
            elif value is not None:
                _field(_PLUGIN_ENTITY[name], value, str(name), errors, True)
        for name, spec in restricted.items():
            # null is what no_consumer asks for; an absent set gets its default.
            if entry.get(name) is not None:
                _field(spec, entry[name], name, errors, True)
        _, config_errors = self.validate({} if entry.get("config") is None else entry["config"],
                                         kong=kong)
        return errors + config_errors

    def from_kong(self, config: Any) -> Dict[str, Any]:
        """The plugin's own fields of a config Kong sent, nothing else: the identity
        runtimes are shared by, whatever keys Kong adds around them."""
        if not isinstance(config, dict):
            return {}
        names = {name for entry in self.fields for name in entry}
        return {k: v for k, v in config.items() if k in names}

    # -- documentation ------------------------------------------------------------

    def markdown_table(self) -> str:
        """The README's option table, generated from the schema."""
        lines = ["| option | type | default | Traefik Hub | description |",
                 "|---|---|---|---|---|"]
        for name, spec in _walk(self.fields, ""):
            default = json.dumps(spec["default"]) if "default" in spec else ""
            # Kong builds a record nobody set from its fields' defaults
            # (make_records_required): a record is never the user's to supply.
            if spec.get("required") and "default" not in spec and spec["type"] != "record":
                default = "*required*"
            traefik = f"`{spec['traefik']}`" if spec.get("traefik") else ""
            desc = spec.get("description", "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_text(spec)} | {default} | {traefik} | {desc} |")
        return "\n".join(lines) + "\n"


# Kong 3.9's plugins entity, the fields a declarative entry may carry besides
# config, protocols and consumer (kong/db/schema/entities/plugins.lua). Foreign
# keys are names or ids in a declarative file: any value is left to Kong.
_ANY: Spec = {"type": "any"}
_PLUGIN_ENTITY: Dict[str, Spec] = {
    "id": {"type": "string", "err": "expected a valid UUID",
           "match": "^" + "%-".join("%x" * n for n in (8, 4, 4, 4, 12)) + "$"},
    "name": {"type": "string", "required": True},
    "instance_name": {"type": "string"},
    "created_at": {"type": "integer"},
    "updated_at": {"type": "integer"},
    "route": _ANY, "service": _ANY, "consumer": _ANY, "consumer_group": _ANY,
    "enabled": {"type": "boolean"},
    "tags": {"type": "set", "elements": {"type": "string"}},
    "ordering": _ANY,
    "protocols": {"type": "set", "elements": {"type": "string"}},
}


def _walk(fields: List[Dict[str, Spec]], prefix: str) -> Iterator[Tuple[str, Spec]]:
    for entry in fields:
        (name, spec), = entry.items()
        path = f"{prefix}.{name}" if prefix else name
        yield path, spec
        if spec["type"] == "record":
            yield from _walk(spec["fields"], path)


def _spec_at(record: Spec, name: str) -> Spec:
    """The definition of field ``name`` (dotted: ``config.store.secret``) in a record."""
    spec = record
    for part in name.split("."):
        found = [entry[part] for entry in spec.get("fields", []) if part in entry]
        if not found:
            raise KeyError(name)
        spec = found[0]
    return spec


_CONDITION_KEYS = {"if_field", "if_match", "then_field", "then_match", "then_err"}


def _check_entity_checks(path: str, record: Spec, checks: Sequence[Dict[str, Any]]) -> None:
    """Refuse, when the schema loads, an entity check this module cannot judge as
    Kong would, or one naming a field the record does not have."""
    for check in checks:
        try:
            rule, arg = checks_engine.rule_of(check)
            if rule not in checks_engine.SUPPORTED:
                raise KeyError(rule)
            if rule == "conditional" and not (
                    {"if_field", "if_match", "then_field", "then_match"} <= set(arg)
                    and set(arg) <= _CONDITION_KEYS):
                raise KeyError("conditional")
            for name in checks_engine.field_names(rule, arg):
                _spec_at(record, name)
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"schema field {path}: entity check {check!r} "
                             "is not supported") from None


def _compile_patterns(path: str, spec: Spec) -> None:
    """Refuse, when the schema loads, a pattern or entity check this module cannot
    judge as Kong would."""
    _check_entity_checks(path, spec, spec.get("entity_checks", []))
    for part in (spec, spec.get("elements"), spec.get("keys"), spec.get("values")):
        if not part:
            continue
        patterns = [part.get("match"), part.get("not_match")]
        patterns += [r["pattern"] for r in part.get("match_all", []) + part.get("match_none", [])]
        patterns += part.get("match_any", {}).get("patterns", [])
        for pattern in filter(None, patterns):
            try:
                luapattern.compile_pattern(pattern)
            except luapattern.LuaPatternError as err:
                raise ValueError(f"schema field {path}: pattern {pattern!r}: {err}") from None


def _strip_docs(fields: List[Dict[str, Spec]]) -> List[Dict[str, Spec]]:
    return [{name: _strip_spec(spec) for name, spec in entry.items()} for entry in fields]


def _strip_spec(spec: Spec) -> Spec:
    out = {k: v for k, v in spec.items() if k not in DOC_KEYS}
    for part in ("elements", "keys", "values"):
        if part in out:
            out[part] = _strip_spec(out[part])
    if "fields" in out:
        out["fields"] = _strip_docs(out["fields"])
    if "entity_checks" in out:
        out["entity_checks"] = checks_engine.strip_docs(out["entity_checks"])
    return out


def _type_ok(kind: str, value: Any) -> bool:
    checks: Dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "number": _is_number,
        "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer()),
        # An empty Lua table has no kind: cjson sends an empty map or record as
        # [] and an empty set or array as {}; Kong's YAML loader does the same.
        "map": lambda v: isinstance(v, dict) or v == [],
        "record": lambda v: isinstance(v, dict) or v == [],
        "set": lambda v: isinstance(v, list) or v == {},
        "array": lambda v: isinstance(v, list) or v == {},
        "foreign": lambda v: True,
        "any": lambda v: True,
    }
    return checks[kind](value)


_ARTICLE = {"array": "an", "integer": "an"}


def _field(spec: Spec, value: Any, path: str, errors: List[Violation], strict: bool) -> Any:
    """Kong's validate_field for a value that is present (not null): the
    normalized value, with at most one violation for a scalar."""
    if "eq" in spec and spec["eq"] is None:
        errors.append(Violation(path, spec.get("err") or "value must be null"))
        return value
    kind = spec["type"]
    if not _type_ok(kind, value):
        errors.append(Violation(path, f"expected {_ARTICLE.get(kind, 'a')} {kind}"))
        return value
    if kind == "record":
        return _record(spec["fields"], {} if value == [] else value, path, errors, strict,
                       spec.get("entity_checks", ()))
    if kind in ("set", "array"):
        items = [] if value == {} else list(value)
        if kind == "set":  # Kong's make_set: duplicates go before validation
            seen: Dict[str, Any] = {}
            for item in items:  # the first of equal elements stays, in place
                seen.setdefault(json.dumps(item, sort_keys=True, default=str), item)
            items = list(seen.values())
        out: List[Any] = []
        for n, item in enumerate(items, 1):
            if item is None:  # elements are required
                errors.append(Violation(f"{path}.{n}", "required field missing"))
                out.append(item)
            else:
                out.append(_field(spec["elements"], item, f"{path}.{n}", errors, strict))
        return _after_type(spec, out, path, errors)
    if kind == "map":
        mapping = {} if value == [] else value
        out_map = {}
        for key, item in mapping.items():
            where = f"{path}.{key}"
            key_errors: List[Violation] = []
            _field(spec["keys"], key, where, key_errors, strict)
            errors.extend(Violation(path, f"key {key!r}: {e.message}") for e in key_errors)
            if item is None:
                errors.append(Violation(where, "required field missing"))
                continue
            out_map[key] = _field(spec["values"], item, where, errors, strict)
        return _after_type(spec, out_map, path, errors)
    if kind == "integer":
        value = int(value)
    if kind == "string":
        if spec.get("referenceable") and is_reference(value):
            return value  # Kong resolves it later: no other rule applies
        spec = dict(spec, len_min=spec.get("len_min", 1))  # Kong refuses "" by default
    return _after_type(spec, value, path, errors)


def _after_type(spec: Spec, value: Any, path: str, errors: List[Violation]) -> Any:
    problem = _check_validators(spec, value)
    if problem:
        errors.append(Violation(path, spec.get("err") or problem))
    return value


def _record(fields: List[Dict[str, Spec]], config: Dict[str, Any], path: str,
            errors: List[Violation], strict: bool,
            checks: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    first_error = len(errors)
    out: Dict[str, Any] = {}
    known = set()
    for entry in fields:
        (name, spec), = entry.items()
        known.add(name)
        where = f"{path}.{name}" if path else name
        value = config.get(name)
        if value is None and name in config and spec.get("required"):
            # An explicit null on a required field: Kong refuses it, default or not.
            errors.append(Violation(where, "required field missing"))
            out[name] = None
            continue
        if value is None and "default" in spec:
            value = copy.deepcopy(spec["default"])
        if value is None and spec["type"] == "record":
            # A record is required in a Kong entity (make_records_required): one
            # nobody set is built from its fields' defaults.
            value = {}
        if value is None:
            if spec.get("required"):
                errors.append(Violation(where, "required field missing"))
            out[name] = None
            continue
        out[name] = _field(spec, value, where, errors, strict)
    if strict:
        for name in config:
            if name not in known:
                errors.append(Violation(f"{path}.{name}" if path else str(name), "unknown field"))
    if checks:
        record: Spec = {"type": "record", "fields": fields}
        failed = {e.path for e in errors[first_error:]}
        prefix = f"{path}." if path else ""

        def invalid(name: str) -> bool:
            where = prefix + name
            return any(p == where or p.startswith(where + ".") for p in failed)
        for failure in checks_engine.evaluate(checks, out, lambda n: _spec_at(record, n),
                                              _matches, is_reference, invalid):
            errors.append(_violation(failure, path))
    return out


# What check and the plugin add to Kong's message when Kong itself would not run
# the check (a covered field holds a vault reference).
KONG_SKIPS = " (Kong lets this through: it skips the check for a vault reference)"


def _violation(failure: checks_engine.Failure, path: str) -> Violation:
    """One line for a failed entity check: at the field Kong marks (conditional),
    else at the record the check sits on (the first field named, for the plugin
    entity itself)."""
    prefix = f"{path}." if path else ""
    if failure.field is not None:
        where = prefix + failure.field
        message = f"{failure.field_error} ({failure.entity_error})"
    else:
        where = path or failure.names[0]
        message = failure.entity_error
    if failure.kong_skips:
        message += KONG_SKIPS
    return Violation(where, message, failure.kong_skips)


def _matches(spec: Spec, value: Any) -> Optional[str]:
    """Kong's validate_field of one value (None: null or absent): its error or None."""
    if value is None:
        if "ne" in spec and spec["ne"] is None:
            return "value must not be null"
        if spec.get("eq") is not None:
            return f"value must be {_num(spec['eq'])}"
        return "required field missing" if spec.get("required") else None
    found: List[Violation] = []
    _field(spec, value, "", found, False)
    return found[0].message if found else None


def _type_text(spec: Spec) -> str:
    kind = spec["type"]
    if kind in ("set", "array"):
        return f"{kind} of {spec['elements']['type']}"
    if kind == "map":
        return f"map of {spec['keys']['type']} to {spec['values']['type']}"
    if "one_of" in spec:
        return kind + " (" + " \\| ".join(map(_num, spec["one_of"])) + ")"
    return kind


@lru_cache(maxsize=None)
def load(name: str) -> PluginSchema:
    """The schema of plugin ``name``, from the package's ``schemadata/<name>.json``."""
    text = (resources.files("kong_oauth2_introspection.schemadata")
            .joinpath(f"{name}.json").read_text(encoding="utf-8"))
    doc = json.loads(text)
    if doc.get("name") != name:
        raise ValueError(f"schema/{name}.json names the plugin {doc.get('name')!r}")
    return PluginSchema(doc)


# The oauth2-introspection plugin's schema under the names older code imports.
INTROSPECTION = load("oauth2-introspection")
SCHEMA: Dict[str, Any] = INTROSPECTION.doc
FIELDS: List[Dict[str, Spec]] = INTROSPECTION.fields


def kong_fields() -> List[Dict[str, Spec]]:
    return INTROSPECTION.kong_fields()


def validate(config: Any, path: str = "config", strict: bool = True,
             kong: bool = False) -> Tuple[Dict[str, Any], List[Violation]]:
    return INTROSPECTION.validate(config, path, strict, kong)


def from_kong(config: Any) -> Dict[str, Any]:
    return INTROSPECTION.from_kong(config)


def markdown_table() -> str:
    return INTROSPECTION.markdown_table()
