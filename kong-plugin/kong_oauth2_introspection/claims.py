"""The ``claims`` expression language of Traefik Hub's introspection middleware.

An expression is a boolean combination of functions over the claims an
introspection endpoint returns::

    Equals(`grp`, `admin`) && (Prefix(`referrer`, `http://example.com`) || !Contains(`areas`, `lab`))

Functions: ``Equals(key, value)``, ``Prefix(key, value)``, ``Contains(key, value)``,
``SplitContains(key, separator, value)`` and ``OneOf(key, value, ...)``.
Operators: ``!`` binds tightest, then ``&&``, then ``||``; parentheses group.
Arguments sit in backticks and cannot contain one. A key is a path into
nested objects: ``user.name``; ``\\.`` is a literal dot, ``\\\\`` a literal
backslash.

Claims are compared by their text (see :func:`claim_text`), so
``Equals(`active`, `true`)`` holds for ``"active": true``. A missing key, or
a key holding the wrong kind of value, makes a function false; evaluation
never raises.

The text is parsed once, with pyparsing, into a tree of frozen dataclasses;
evaluating that tree is plain Python. ``str()`` of a tree is canonical
source that parses back to an equal tree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple, Tuple

import pyparsing as pp

__all__ = [
    "MISSING", "ClaimsSyntaxError", "Expression", "compile_claims",
    "parse_path", "format_path", "resolve", "claim_text",
    "Equals", "Prefix", "Contains", "SplitContains", "OneOf", "Not", "And", "Or",
]

Path = Tuple[str, ...]


# ---------------------------------------------------------------------------
# Claim paths and claim values, shared with forward_headers and username_claim

class _Missing:
    """What :func:`resolve` returns for an absent claim (``None`` is JSON null)."""
    __slots__ = ()

    def __repr__(self):
        return "MISSING"


MISSING: Any = _Missing()


def parse_path(text: str) -> Path:
    """Split a claim path on ``.``; ``\\.`` is a literal dot, ``\\\\`` a backslash.

    Total: a backslash before anything else is kept as it is, and empty parts
    are returned (``"a..b"`` gives ``("a", "", "b")``) for the caller to judge.
    """
    parts, current = [], []
    i, end = 0, len(text)
    while i < end:
        ch = text[i]
        if ch == "\\" and i + 1 < end and text[i + 1] in ".\\":
            current.append(text[i + 1])
            i += 2
            continue
        if ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return tuple(parts)


def format_path(path: Path) -> str:
    """The inverse of :func:`parse_path`: escape every backslash and dot."""
    return ".".join(part.replace("\\", "\\\\").replace(".", "\\.") for part in path)


def resolve(claims: Any, path: Path) -> Any:
    """The value at ``path`` through nested objects, or :data:`MISSING`."""
    value = claims
    for part in path:
        if not isinstance(value, dict):
            return MISSING
        value = value.get(part, MISSING)
        if value is MISSING:
            return MISSING
    return value


_EXACT_FLOAT = 2.0 ** 53   # beyond this, not every integral float is an exact integer


def claim_text(value: Any) -> str:
    """The text a claim value is compared by: its JSON text, strings unquoted.

    ``True`` -> ``true``, ``None`` -> ``null``, ``2.0`` -> ``2`` (a JSON decoder may
    hand back an integer as a float), ``1.5`` -> ``1.5``. Objects and arrays give
    compact JSON, though the functions never compare them as a whole.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):   # before int: bool is an int subclass
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:   # over CPython's digit limit; no JSON decoder yields one
            return hex(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= _EXACT_FLOAT:
            return str(int(value))
        return repr(value)   # shortest round-trip form, as JSON encoders write it
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        return str(value)


def _scalar_text(value: Any):
    """The text of a present scalar claim, else None (missing, array or object)."""
    if value is MISSING or isinstance(value, (list, dict)):
        return None
    return claim_text(value)


# ---------------------------------------------------------------------------
# The expression tree

class Expression:
    """A compiled claims expression; the nodes below are its kinds."""
    __slots__ = ()
    _prec = 0   # binding strength, used by str() to place parentheses

    def evaluate(self, claims: Any) -> bool:
        raise NotImplementedError


def _wrap(node: Expression, min_prec: int) -> str:
    text = str(node)
    return f"({text})" if node._prec < min_prec else text


def _call(name: str, key: Path, *values: str) -> str:
    return "%s(%s)" % (name, ", ".join("`%s`" % arg for arg in (format_path(key),) + values))


_FUNCTION_PREC = 4


@dataclass(frozen=True)
class Equals(Expression):
    key: Path
    value: str
    _prec = _FUNCTION_PREC

    def evaluate(self, claims: Any) -> bool:
        return _scalar_text(resolve(claims, self.key)) == self.value

    def __str__(self):
        return _call("Equals", self.key, self.value)


@dataclass(frozen=True)
class Prefix(Expression):
    key: Path
    value: str
    _prec = _FUNCTION_PREC

    def evaluate(self, claims: Any) -> bool:
        text = _scalar_text(resolve(claims, self.key))
        return text is not None and text.startswith(self.value)

    def __str__(self):
        return _call("Prefix", self.key, self.value)


@dataclass(frozen=True)
class Contains(Expression):
    """An array holding the value, or a scalar whose text holds it as a substring."""
    key: Path
    value: str
    _prec = _FUNCTION_PREC

    def evaluate(self, claims: Any) -> bool:
        claim = resolve(claims, self.key)
        if isinstance(claim, list):
            return any(_scalar_text(item) == self.value for item in claim)
        text = _scalar_text(claim)
        return text is not None and self.value in text

    def __str__(self):
        return _call("Contains", self.key, self.value)


@dataclass(frozen=True)
class SplitContains(Expression):
    key: Path
    separator: str
    value: str
    _prec = _FUNCTION_PREC

    def __post_init__(self):
        if not self.separator:   # str.split("") raises; the parser refuses it too
            raise ValueError("SplitContains needs a non-empty separator")

    def evaluate(self, claims: Any) -> bool:
        text = _scalar_text(resolve(claims, self.key))
        return text is not None and self.value in text.split(self.separator)

    def __str__(self):
        return _call("SplitContains", self.key, self.separator, self.value)


@dataclass(frozen=True)
class OneOf(Expression):
    """An array holding one of the values, or a scalar equal to one of them."""
    key: Path
    values: Tuple[str, ...]
    _prec = _FUNCTION_PREC

    def evaluate(self, claims: Any) -> bool:
        claim = resolve(claims, self.key)
        if isinstance(claim, list):
            return any(_scalar_text(item) in self.values for item in claim)
        return _scalar_text(claim) in self.values

    def __str__(self):
        return _call("OneOf", self.key, *self.values)


@dataclass(frozen=True)
class Not(Expression):
    operand: Expression
    _prec = 3

    def evaluate(self, claims: Any) -> bool:
        return not self.operand.evaluate(claims)

    def __str__(self):
        return "!" + _wrap(self.operand, 3)


# And and Or hold flat operand lists, so that a long chain like a && b && ... is
# one node, not a deep tree that could exhaust the recursion limit. A
# parenthesised chain stays a nested node, so str() keeps its parentheses
# and the round trip gives back the same tree.

@dataclass(frozen=True)
class And(Expression):
    operands: Tuple[Expression, ...]
    _prec = 2

    def evaluate(self, claims: Any) -> bool:
        return all(operand.evaluate(claims) for operand in self.operands)

    def __str__(self):
        return " && ".join(_wrap(operand, 3) for operand in self.operands)


@dataclass(frozen=True)
class Or(Expression):
    operands: Tuple[Expression, ...]
    _prec = 1

    def evaluate(self, claims: Any) -> bool:
        return any(operand.evaluate(claims) for operand in self.operands)

    def __str__(self):
        return " || ".join(_wrap(operand, 2) for operand in self.operands)


# ---------------------------------------------------------------------------
# The grammar

class ClaimsSyntaxError(ValueError):
    """A claims expression that does not parse; ``col`` is 1-based."""

    def __init__(self, col: int, msg: str):
        super().__init__(f"col {col}: {msg}")
        self.col = col
        self.msg = msg

    def __reduce__(self):
        return type(self), (self.col, self.msg)


class _Arg(NamedTuple):
    loc: int    # offset of the opening backtick
    text: str   # without the backticks


class _Signature(NamedTuple):
    node: type
    params: str    # for messages
    arity: int     # number of arguments, key included
    variadic: bool  # count is a minimum


_FUNCTIONS = {
    "Equals": _Signature(Equals, "key, value", 2, False),
    "Prefix": _Signature(Prefix, "key, value", 2, False),
    "Contains": _Signature(Contains, "key, value", 2, False),
    "SplitContains": _Signature(SplitContains, "key, separator, value", 3, False),
    "OneOf": _Signature(OneOf, "key, value, ...", 2, True),
}
_FUNCTION_LIST = ", ".join(list(_FUNCTIONS)[:-1]) + " or " + list(_FUNCTIONS)[-1]


def _fail(text: str, loc: int, msg: str):
    # Fatal, so no alternative is tried and the message reaches the user as is.
    raise pp.ParseFatalException(text, loc, msg)


def _known_function(text, loc, toks):
    if toks[0] not in _FUNCTIONS:
        _fail(text, loc, f"unknown function {toks[0]!r} (expected {_FUNCTION_LIST})")


def _argument(text, loc, toks):
    return _Arg(loc, toks[0][1:-1])


def _backtick_inside(text, loc, toks):
    _fail(text, loc + len(toks[0]) - 1, "arguments cannot contain '`'")


def _unclosed(text, loc, toks):
    _fail(text, loc, "argument has no closing '`'")


def _function(text, loc, toks):
    name, args, close = toks[0], list(toks[1:-1]), toks[-1]
    sig = _FUNCTIONS[name]
    if len(args) < sig.arity or (len(args) > sig.arity and not sig.variadic):
        at_least = "at least " if sig.variadic else ""
        where = close if len(args) < sig.arity else args[sig.arity].loc
        _fail(text, where, f"{name} takes {at_least}{sig.arity} arguments "
                           f"({sig.params}), got {len(args)}")
    key = parse_path(args[0].text)
    if "" in key:
        _fail(text, args[0].loc + 1,
              "expected a claim key: names separated by '.', none of them empty")
    values = [arg.text for arg in args[1:]]
    if name == "SplitContains" and not values[0]:
        _fail(text, args[1].loc + 1, "expected a non-empty separator")
    if name == "OneOf":
        return OneOf(key, tuple(values))
    return sig.node(key, *values)


def _chain(node_type):
    def action(toks):
        return toks[0] if len(toks) == 1 else node_type(tuple(toks))
    return action


def _build_grammar() -> pp.ParserElement:
    # Errors come from the `-` operator (no backtracking past it) and from the
    # names below: pyparsing reports "Expected <name>" for the element that
    # failed, and compile_claims turns that into our message.
    lit = pp.Literal
    name = pp.Regex(r"[A-Za-z_][A-Za-z0-9_]*").set_parse_action(_known_function)
    # An argument closed early by a '`' that belongs to it: `a`b` or `a``.
    backtick_inside = pp.Regex(r"`[^`]*`(?=[^\s,)`]*`)").set_parse_action(_backtick_inside)
    argument = (backtick_inside
                | pp.Regex(r"`[^`]*`").set_parse_action(_argument)
                | pp.Regex(r"`[^`]*\Z").set_parse_action(_unclosed)
                ).set_name("an argument in backticks")
    close = lit(")").set_name("',' or ')'").set_parse_action(lambda text, loc, toks: loc)
    function = (name - pp.Suppress(lit("(").set_name("'('"))
                - argument - pp.ZeroOrMore(pp.Suppress(",") - argument)
                - close).set_parse_action(_function)

    expression = pp.Forward()
    group = (pp.Suppress("(") - expression
             - pp.Suppress(lit(")").set_name("'&&', '||' or ')'")))
    negation = pp.Forward()
    negation <<= ((pp.Suppress("!") - negation).set_parse_action(lambda toks: Not(toks[0]))
                  | function | group).set_name("a function, '(' or '!'")
    conjunction = (negation + pp.ZeroOrMore(pp.Suppress("&&") - negation)
                   ).set_parse_action(_chain(And))
    expression <<= (conjunction + pp.ZeroOrMore(pp.Suppress("||") - conjunction)
                    ).set_parse_action(_chain(Or))
    # No packrat: the grammar never backtracks over more than one token, and
    # packrat is a process-wide pyparsing switch.
    return expression - pp.StringEnd().set_name("'&&', '||' or end of input")


_GRAMMAR = _build_grammar().parse_with_tabs()   # else tabs in arguments become spaces

# pyparsing recurses a dozen Python frames per level of nesting; a fixed limit
# well inside the interpreter's gives a stable error instead of a stack overflow.
MAX_NESTING = 32


def _check_nesting(text: str) -> None:
    """Refuse more than MAX_NESTING open '(' and '!' at any point, by a quick scan."""
    open_ = []   # '(' and '!' whose operand is not finished yet
    in_argument = False
    for i, ch in enumerate(text):
        if ch == "`":
            in_argument = not in_argument
        elif in_argument:
            continue
        elif ch in "(!":
            open_.append(ch)
            if len(open_) > MAX_NESTING:
                raise ClaimsSyntaxError(i + 1, f"nested deeper than {MAX_NESTING} levels")
        elif ch == ")":
            while open_ and open_.pop() != "(":
                pass
            while open_ and open_[-1] == "!":   # the group was their operand
                open_.pop()
        elif ch in "&|":
            while open_ and open_[-1] == "!":
                open_.pop()


def compile_claims(text: str) -> Expression:
    """Parse a claims expression; raises :class:`ClaimsSyntaxError`.

    Columns count characters from the start of the text (a line break counts
    as one), so they stay meaningful for multi-line YAML values.
    """
    if not isinstance(text, str):
        raise TypeError("claims expression must be a string")
    if not text.strip():
        raise ClaimsSyntaxError(1, "empty expression")
    _check_nesting(text)
    try:
        return _GRAMMAR.parse_string(text, parse_all=True)[0]
    except pp.ParseBaseException as err:
        msg = err.msg
        if msg.startswith("Expected "):
            msg = "expected " + msg[len("Expected "):]
        raise ClaimsSyntaxError(err.loc + 1, msg) from None
    except RecursionError:   # a backstop for a caller already deep in its stack
        raise ClaimsSyntaxError(1, "nested too deeply") from None
