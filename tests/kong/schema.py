"""Kong's schema layer for a plugin entity, and the config a plugin instance gets.

Mirrors kong/db/schema/init.lua (``Schema:validate``, ``handle_missing_field``,
``process_auto_fields``), kong/db/schema/entities/plugins.lua (the top-level
``consumer`` / ``route`` / ``service`` / ``protocols`` fields, ``eq = null`` for
``typedefs.no_consumer``) and kong/runloop/plugins_iterator.lua (the keys Kong adds
to a config before it reaches the plugin). Observed on Kong 3.9.1 (see
shared/design/kong-plugin-server.md, "The config a plugin instance gets"):

* Kong adds ``__plugin_id``, ``__ws_id``, ``__key__``
  (``plugins:NAME:ROUTE:SERVICE:CONSUMER::WS``) and ``__seq__`` every time, and
  ``route_id`` / ``service_id`` / ``consumer_id`` when scoped, ``plugin_instance_name``
  when an instance name is set;
* optional fields without a value are ABSENT; empty arrays and sets are ``[]``
  (cjson.array_mt), empty maps ``{}``; a record with no value is expanded to its
  defaults (``handle_missing_field``) unless it is declared ``required = false``,
  then it is null, hence absent; a record given as ``{}`` gets its defaults.
"""

import copy
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .lua import cjson_encode, is_uuid, lua_match

__all__ = ["SchemaViolation", "PluginSchema", "DEFAULT_WS_ID"]

DEFAULT_WS_ID = "00000000-0000-4000-8000-000000000000"
_PROTOCOLS = ("grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp",
              "ws", "wss")


class SchemaViolation(Exception):
    """Kong's schema layer would refuse this plugin entity (Admin API 400)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__("%s: %s" % (path, message))
        self.path = path
        self.message = message


def _field_items(fields: Optional[List[Dict[str, Any]]]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """A Kong field list is ``[{name: definition}, ...]``."""
    for entry in fields or []:
        for name, fdef in entry.items():
            yield name, fdef


def _check_type(path: str, fdef: Dict[str, Any], value: Any) -> None:
    t = fdef.get("type")
    ok = True
    if t == "string":
        ok = isinstance(value, str)
    elif t == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif t == "integer":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            float(value).is_integer()
    elif t == "boolean":
        ok = isinstance(value, bool)
    elif t in ("array", "set"):
        # an empty JSON object is an empty Lua table: a valid empty array
        ok = isinstance(value, list) or value == {}
    elif t in ("map", "record"):
        ok = isinstance(value, dict) or value == []
    if not ok:
        raise SchemaViolation(path, "expected a%s %s" % ("n" if t == "integer" else "", t))


def _validate_string(path: str, fdef: Dict[str, Any], value: str) -> None:
    # a Kong string is non-empty unless len_min says otherwise
    if len(value) < fdef.get("len_min", 1):
        raise SchemaViolation(path, "length must be at least %d" % fdef.get("len_min", 1))
    if "len_max" in fdef and len(value) > fdef["len_max"]:
        raise SchemaViolation(path, "length must be at most %d" % fdef["len_max"])
    if "len_eq" in fdef and len(value) != fdef["len_eq"]:
        raise SchemaViolation(path, "length must be %d" % fdef["len_eq"])
    if "match" in fdef and not lua_match(fdef["match"], value):
        raise SchemaViolation(path, "invalid value: %s" % value)
    if "not_match" in fdef and lua_match(fdef["not_match"], value):
        raise SchemaViolation(path, "invalid value: %s" % value)
    if "match_any" in fdef:
        spec = fdef["match_any"]
        if not any(lua_match(p, value) for p in spec.get("patterns", [])):
            raise SchemaViolation(path, spec.get("err") or "invalid value: %s" % value)
    if "starts_with" in fdef and not value.startswith(fdef["starts_with"]):
        raise SchemaViolation(path, "should start with: %s" % fdef["starts_with"])
    if fdef.get("uuid") and not is_uuid(value):
        raise SchemaViolation(path, "expected a valid UUID")


def _validate(path: str, fdef: Dict[str, Any], value: Any) -> Any:
    """Validate one present value; returns it as Kong stores it."""
    _check_type(path, fdef, value)
    t = fdef.get("type")
    if "eq" in fdef and value != fdef["eq"]:
        raise SchemaViolation(path, "value must be %s" % (
            "null" if fdef["eq"] is None else fdef["eq"]))
    if "one_of" in fdef and value not in fdef["one_of"]:
        raise SchemaViolation(path, "expected one of: %s" % ", ".join(map(str, fdef["one_of"])))
    if t in ("number", "integer"):
        if "between" in fdef:
            lo, hi = fdef["between"]
            if value < lo or value > hi:
                raise SchemaViolation(path, "value should be between %s and %s" % (lo, hi))
        if "gt" in fdef and not value > fdef["gt"]:
            raise SchemaViolation(path, "value must be greater than %s" % fdef["gt"])
        return value
    if t == "string":
        # validate_field: a vault reference in a referenceable field skips every
        # validator (Kong resolves it later).
        if not (fdef.get("referenceable") and _is_reference(value)):
            _validate_string(path, fdef, value)
        return value
    if t in ("array", "set"):
        seq = value if isinstance(value, list) else []
        if "len_min" in fdef and len(seq) < fdef["len_min"]:
            raise SchemaViolation(path, "length must be at least %d" % fdef["len_min"])
        if "len_max" in fdef and len(seq) > fdef["len_max"]:
            raise SchemaViolation(path, "length must be at most %d" % fdef["len_max"])
        out: List[Any] = []
        for i, el in enumerate(seq):
            if fdef.get("elements"):
                el = _validate("%s.%d" % (path, i + 1), fdef["elements"], el)
            if t == "array" or el not in out:     # Kong de-duplicates sets
                out.append(el)
        return out
    if t == "map":
        m = value if isinstance(value, dict) else {}
        for k, v in m.items():
            if fdef.get("keys"):
                _validate("%s.%s" % (path, k), fdef["keys"], k)
            if fdef.get("values") and v is not None:
                m[k] = _validate("%s.%s" % (path, k), fdef["values"], v)
        return {k: v for k, v in m.items() if v is not None}
    if t == "record":
        filled = fill_record(path, fdef.get("fields", []), value if isinstance(value, dict) else {})
        run_entity_checks(fdef, filled, path)
        return filled
    return value


# --- entity checks: kong/db/schema/init.lua, Schema.entity_checkers and run_entity_check

_ENTITY_ERRORS = {
    "at_least_one_of": "at least one of these fields must be non-empty: %s",
    "only_one_of": "exactly one of these fields must be non-empty: %s",
    "mutually_required": "all or none of these fields must be set: %s",
    "mutually_exclusive": "only one or none of these fields must be set: %s",
}


def _get_field(tbl: Any, name: str) -> Any:
    for part in name.split("."):
        if not isinstance(tbl, dict):
            return None
        tbl = tbl.get(part)
    return tbl


def _schema_field(record: Dict[str, Any], name: str) -> Dict[str, Any]:
    fdef = record
    for part in name.split("."):
        fdef = dict(_field_items(fdef.get("fields")))[part]
    return fdef


def _nonempty(value: Any) -> bool:
    return not (value is None or value == "" or (isinstance(value, (dict, list)) and not value))


def _is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("{vault://") and value.endswith("}")


def _passes(fdef: Dict[str, Any], value: Any) -> Optional[str]:
    """Schema:validate_field with a null-able value: the error, or None."""
    if value is None:
        if "eq" in fdef and fdef["eq"] is not None:
            return "value must be %s" % fdef["eq"]
        return "required field missing" if fdef.get("required") else None
    try:
        _validate("", fdef, value)
    except SchemaViolation as err:
        return err.message
    return None


def run_entity_checks(record: Dict[str, Any], entity: Dict[str, Any], path: str = "") -> None:
    """The ``entity_checks`` of a record (or of the plugin entity: names like
    ``config.x``) on its filled value; the first failure raises. Like Kong, a
    check is not run when one of its fields holds a vault reference in a
    referenceable string field."""
    for check in record.get("entity_checks") or []:
        (rule, arg), = check.items()
        if rule == "conditional":
            names = [arg["if_field"], arg["then_field"]]
        else:
            names = list(arg)
        if any(_is_reference(_get_field(entity, n))
               and _schema_field(record, n).get("referenceable") for n in names):
            continue
        where = path or "@entity"
        if rule == "conditional":
            if_def = dict(_schema_field(record, arg["if_field"]), **arg["if_match"])
            if _passes(if_def, _get_field(entity, arg["if_field"])) is not None:
                continue
            then_value = _get_field(entity, arg["then_field"])
            entity_err = "failed conditional validation given value of field '%s'" % arg["if_field"]
            if arg["then_match"].get("required") and then_value is None:
                raise SchemaViolation(where, "%s (%s: required field missing)"
                                      % (entity_err, arg["then_field"]))
            then_def = dict(_schema_field(record, arg["then_field"]), **arg["then_match"])
            err = _passes(then_def, then_value)
            if err is not None:
                if arg.get("then_err"):
                    entity_err = arg["then_err"].replace("%s", arg["if_field"])
                raise SchemaViolation(where, "%s (%s: %s)" % (entity_err, arg["then_field"], err))
            continue
        if rule not in _ENTITY_ERRORS:
            raise SchemaViolation(where, "the stand-in has no entity checker %r" % rule)
        filled = sum(1 for n in names if _nonempty(_get_field(entity, n)))
        ok = {"at_least_one_of": filled >= 1, "only_one_of": filled == 1,
              "mutually_required": filled in (0, len(names)),
              "mutually_exclusive": filled <= 1}[rule]
        if not ok:
            listed = ", ".join("'%s'" % n for n in names)
            raise SchemaViolation(where, _ENTITY_ERRORS[rule] % listed)


def fill_record(path: str, fields: List[Dict[str, Any]], given: Dict[str, Any]) -> Dict[str, Any]:
    """A record as Kong stores it: defaults filled, unknown keys refused, null
    fields absent (what a plugin server receives)."""
    declared = dict(_field_items(fields))
    for k in given:
        if k not in declared:
            raise SchemaViolation("%s.%s" % (path, k) if path else k, "unknown field")
    out: Dict[str, Any] = {}
    for name, fdef in declared.items():
        fpath = "%s.%s" % (path, name) if path else name
        value = given.get(name)
        if name not in given:   # missing (an explicit null stays null: no default)
            if "default" in fdef:
                value = copy.deepcopy(fdef["default"])
            elif fdef.get("type") == "record" and fdef.get("required") is not False:
                # handle_missing_field: a record is expanded to its defaults unless
                # it says ``required = false`` (observed on 3.9.1: a record with no
                # ``required`` key arrives filled, a ``required = false`` one absent)
                value = {}
        if value is None:
            if fdef.get("required"):
                raise SchemaViolation(fpath, "required field missing")
            continue
        out[name] = _validate(fpath, fdef, value)
    return out


class PluginSchema(object):
    """One plugin's schema, as the query command dumped it."""

    def __init__(self, info: Dict[str, Any]) -> None:
        self.name: str = info["Name"]
        self.phases: List[str] = list(info.get("Phases", []))
        self.top: Dict[str, Dict[str, Any]] = dict(_field_items(info["Schema"].get("fields", [])))
        self.config_fields: List[Dict[str, Any]] = self.top.get("config", {}).get("fields", [])
        # The plugin entity as a record: its fields and its top-level entity checks,
        # which Kong takes verbatim from the query command (process.lua).
        self.entity: Dict[str, Any] = {"fields": info["Schema"].get("fields", []),
                                       "entity_checks": info["Schema"].get("entity_checks", [])}

    def fill(self, config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The config as Kong stores it, or SchemaViolation where Kong's Admin API
        (or ``POST /config``) would refuse it, the entity checks included."""
        filled = fill_record("config", self.config_fields, copy.deepcopy(dict(config or {})))
        run_entity_checks(self.entity, {"config": filled})
        return filled

    def check_entity(self, route: Optional[str], service: Optional[str],
                     consumer: Optional[str], protocols: Optional[List[str]]) -> None:
        """The plugin entity's top-level fields (plugins.lua + the plugin's own
        top-level entries, e.g. ``consumer = typedefs.no_consumer``: eq null)."""
        for name, value in (("route", route), ("service", service), ("consumer", consumer)):
            fdef = self.top.get(name, {})
            if value is not None and "eq" in fdef and fdef["eq"] is None:
                raise SchemaViolation(name, "value must be null")
        if protocols is not None:
            fdef = self.top.get("protocols", {})
            allowed = (fdef.get("elements") or {}).get("one_of") or _PROTOCOLS
            for i, p in enumerate(protocols):
                if p not in allowed:
                    raise SchemaViolation("protocols.%d" % (i + 1),
                                          "expected one of: %s" % ", ".join(allowed))

    @staticmethod
    def kong_config(filled: Dict[str, Any], *, name: str, plugin_id: str, seq: int,
                    route_id: Optional[str] = None, service_id: Optional[str] = None,
                    consumer_id: Optional[str] = None, instance_name: Optional[str] = None,
                    ws_id: str = DEFAULT_WS_ID) -> Dict[str, Any]:
        """plugins_iterator.lua: the config table handed to the plugin."""
        conf = dict(filled)
        if route_id:
            conf["route_id"] = route_id
        if service_id:
            conf["service_id"] = service_id
        if consumer_id:
            conf["consumer_id"] = consumer_id
        if instance_name:
            conf["plugin_instance_name"] = instance_name
        conf["__plugin_id"] = plugin_id
        conf["__ws_id"] = ws_id
        conf["__key__"] = "plugins:%s:%s:%s:%s::%s" % (
            name, route_id or "", service_id or "", consumer_id or "", ws_id)
        conf["__seq__"] = seq
        return conf

    @staticmethod
    def encode(conf: Dict[str, Any]) -> str:
        """mp_rpc.lua's ``Config = cjson_encode(conf)``: arrays and sets carry
        cjson.array_mt, so an empty one is ``[]``; an empty map is ``{}``."""
        return cjson_encode(conf, arrays=True)
