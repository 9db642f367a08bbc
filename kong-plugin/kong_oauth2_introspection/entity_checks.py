"""Kong's entity checks (cross-field rules), evaluated as Kong 3.9 evaluates them.

The schema JSON declares them, Kong enforces them (Admin API, ``POST /config``,
``kong config parse``, decK), and :mod:`.schema` runs them here for ``check`` and
for the plugin's own config parsing: one declaration, three enforcers.

Semantics follow kong/db/schema/init.lua (``Schema.entity_checkers``,
``run_entity_check``):

* a field is *set* when it is non-empty (``is_nonempty``: not null, not ``""``,
  not an empty table; ``false`` and ``0`` are set);
* ``mutually_required`` / ``mutually_exclusive`` do not run when one of their
  fields already failed its own validation; the others do. Kong looks the
  failure up by the check's field name, so a dotted name (``config.x``, as the
  checks on a plugin entity are written) never counts as failed;
* Kong does not run a check at all when one of the fields it covers is a
  ``referenceable`` string holding a ``{vault://...}`` reference: such a failure
  is returned with ``kong_skips`` set, so that ``check`` (which sees the
  reference, not the secret) still reports it and the Kong stand-in can skip it;
* ``conditional``: when ``if_field`` passes ``if_match`` (the field's own
  definition overlaid with ``if_match``), ``then_field`` must pass ``then_match``;
  a ``required`` then-field that is null fails with "required field missing",
  any other then-failure with the validator's text; the entity-level message is
  ``then_err`` (formatted with the if-field's name) or Kong's "failed conditional
  validation given value of field '...'".
"""

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

Spec = Dict[str, Any]
# A validator of one value against a (merged) field definition: None or the error.
Matcher = Callable[[Spec, Any], Optional[str]]

MESSAGES = {
    "at_least_one_of": "at least one of these fields must be non-empty: %s",
    "only_one_of": "exactly one of these fields must be non-empty: %s",
    "mutually_required": "all or none of these fields must be set: %s",
    "mutually_exclusive": "only one or none of these fields must be set: %s",
    "conditional_at_least_one_of": "at least one of these fields must be non-empty: %s",
}
CONDITIONAL = "failed conditional validation given value of field '%s'"
# Checks that still run when one of their fields is invalid (run_with_invalid_fields).
_WITH_INVALID = {"at_least_one_of", "only_one_of", "conditional", "conditional_at_least_one_of"}
SUPPORTED = frozenset(MESSAGES) | {"conditional"}
# Keys of ours next to the rule in a check: documentation, never sent to Kong.
DOC_KEYS = frozenset({"description"})


class Failure(NamedTuple):
    rule: str
    field: Optional[str]     # the field Kong also marks (conditional's then_field), else None
    field_error: Optional[str]
    entity_error: str        # what Kong lists under "@entity"
    names: Sequence[str]     # every field the check covers
    kong_skips: bool         # Kong does not run it: a covered field holds a vault reference


def rule_of(check: Dict[str, Any]) -> Any:
    """(rule name, argument) of one ``entity_checks`` item."""
    rules = [k for k in check if k not in DOC_KEYS]
    if len(rules) != 1:
        raise ValueError(f"entity check {check!r}: expected exactly one rule")
    return rules[0], check[rules[0]]


def field_names(rule: str, arg: Any) -> List[str]:
    """The fields a check covers (Kong's ``field_sources``)."""
    if rule == "conditional":
        return [arg["if_field"], arg["then_field"]]
    if rule == "conditional_at_least_one_of":
        return [arg["if_field"]] + list(arg.get("then_at_least_one_of", [])) \
            + list(arg.get("else_then_at_least_one_of", []))
    return list(arg)


def strip_docs(checks: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in check.items() if k not in DOC_KEYS} for check in checks]


def is_set(value: Any) -> bool:
    """Kong's ``is_nonempty``."""
    return not (value is None or value == "" or (isinstance(value, (dict, list)) and not value))


def get(record: Any, name: str) -> Any:
    """Kong's ``get_field``: ``x.y.z`` in nested records; None where absent or null."""
    for part in name.split("."):
        if not isinstance(record, dict):
            return None
        record = record.get(part)
    return record


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def evaluate(checks: Sequence[Dict[str, Any]], record: Dict[str, Any],
             spec_of: Callable[[str], Spec], matches: Matcher,
             is_reference: Callable[[Any], bool],
             invalid: Callable[[str], bool] = lambda name: False) -> List[Failure]:
    """Every check of ``checks`` that ``record`` fails, in declaration order.

    ``spec_of`` gives a (dotted) field's definition, ``matches`` validates a value
    against a definition, ``invalid`` says whether a field failed its own rules."""
    failures = []
    for check in checks:
        rule, arg = rule_of(check)
        names = field_names(rule, arg)
        if rule not in _WITH_INVALID and any("." not in n and invalid(n) for n in names):
            continue
        skips = any(spec_of(n).get("type") == "string" and spec_of(n).get("referenceable")
                    and is_reference(get(record, n)) for n in names)
        failure = _run(rule, arg, names, record, spec_of, matches)
        if failure is not None:
            failures.append(failure._replace(kong_skips=skips))
    return failures


def _run(rule: str, arg: Any, names: List[str], record: Dict[str, Any],
         spec_of: Callable[[str], Spec], matches: Matcher) -> Optional[Failure]:
    def fail(entity: str, field: Optional[str] = None,
             field_error: Optional[str] = None) -> Failure:
        return Failure(rule, field, field_error, entity, names, False)

    if rule == "conditional":
        if_field, then_field = arg["if_field"], arg["then_field"]
        if matches(dict(spec_of(if_field), **arg["if_match"]), get(record, if_field)):
            return None   # the condition does not hold
        then_value = get(record, then_field)
        if arg["then_match"].get("required") and then_value is None:
            return fail(CONDITIONAL % if_field, then_field, "required field missing")
        error = matches(dict(spec_of(then_field), **arg["then_match"]), then_value)
        if error is None:
            return None
        entity = arg["then_err"].replace("%s", if_field) if arg.get("then_err") \
            else CONDITIONAL % if_field
        return fail(entity, then_field, error)
    if rule == "conditional_at_least_one_of":
        if_field = arg["if_field"]
        if_spec = spec_of(if_field)
        value = get(record, if_field)
        if not matches(dict(if_spec, **arg["if_match"]), value):
            wanted, err = arg["then_at_least_one_of"], arg.get("then_err")
        elif arg.get("else_match") is not None and \
                not matches(dict(if_spec, **arg["else_match"]), value):
            wanted, err = arg["else_then_at_least_one_of"], arg.get("else_then_err")
        else:
            return None
        if any(is_set(get(record, n)) for n in wanted):
            return None
        listed = _quoted(wanted)
        return fail(err.replace("%s", listed) if err else MESSAGES[rule] % listed)
    filled = sum(1 for n in names if is_set(get(record, n)))
    ok = {"at_least_one_of": filled >= 1, "only_one_of": filled == 1,
          "mutually_required": filled in (0, len(names)),
          "mutually_exclusive": filled <= 1}[rule]
    return None if ok else fail(MESSAGES[rule] % _quoted(names))
