"""The claims expression language (Traefik Hub's introspection middleware)."""

import math
import pickle

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kong_oauth2_introspection.claims import (
    MAX_NESTING, MISSING, And, ClaimsSyntaxError, Contains, Equals, Expression, Not,
    OneOf, Or, Prefix, SplitContains, claim_text, compile_claims, format_path,
    parse_path, resolve,
)

# The documentation's sample document, with its nested-claims addition.
DOC = {
    "active": True,
    "grp": "admin",
    "scope": "reader writer deploy",
    "referrer": "http://example.com/foo/bar",
    "areas": ["office", "home"],
    "user": {"name": "John Snow", "status": "undead"},
}


def holds(text, claims=DOC):
    return compile_claims(text).evaluate(claims)


# --- the documentation's examples -------------------------------------------

SEED_EXAMPLES = [
    "Equals(`grp`, `admin`)",
    "Prefix(`referrer`, `http://example.com`)",
    "Contains(`referrer`, `/foo/`)",
    "Contains(`areas`, `home`)",
    "SplitContains(`scope`, ` `, `writer`)",
    "OneOf(`areas`, `office`, `lab`)",
    "Equals(`grp`, `admin`) && Equals(`active`, `true`)",
    "Equals(`grp`, `admin`) || Equals(`active`, `true`)",
    "!Equals(`grp`, `testers`)",
    "Equals(`user.name`, `John Snow`)",
]

# Each example changed just enough to be false on the same document.
SEED_COUNTERPARTS = [
    "Equals(`grp`, `testers`)",
    "Prefix(`referrer`, `https://example.com`)",
    "Contains(`referrer`, `/baz/`)",
    "Contains(`areas`, `lab`)",
    "SplitContains(`scope`, ` `, `write`)",
    "OneOf(`areas`, `garage`, `lab`)",
    "Equals(`grp`, `admin`) && Equals(`active`, `false`)",
    "Equals(`grp`, `users`) || Equals(`active`, `false`)",
    "!Equals(`grp`, `admin`)",
    "Equals(`user.name`, `Jon Snow`)",
]


@pytest.mark.parametrize("text", SEED_EXAMPLES)
def test_seed_examples_hold(text):
    assert holds(text)


@pytest.mark.parametrize("text", SEED_COUNTERPARTS)
def test_seed_counterparts_fail(text):
    assert not holds(text)


def test_nested_claim_resolves_like_the_documentation():
    assert resolve(DOC, parse_path("user.name")) == "John Snow"


# --- functions ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Equals(`grp`, `admi`)", False),          # whole value, not a prefix
    ("Equals(`grp`, `ADMIN`)", False),         # case matters
    ("Equals(`grp`, ``)", False),
    ("Equals(`empty`, ``)", True),
    ("Prefix(`grp`, ``)", True),
    ("Prefix(`grp`, `adminx`)", False),
    ("Contains(`grp`, `dmi`)", True),
    ("Contains(`areas`, `offi`)", False),       # array members match whole
    ("SplitContains(`scope`, ` `, `reader writer`)", False),
    ("SplitContains(`scope`, `er `, `writ`)", True),
    ("SplitContains(`csv`, `,`, `b`)", True),
    ("SplitContains(`csv`, `,`, ``)", True),    # "a,,b" has an empty part
    ("OneOf(`grp`, `users`, `admin`)", True),   # a scalar equal to one of them
    ("OneOf(`grp`, `users`)", False),
    ("OneOf(`areas`, `lab`, `home`)", True),
])
def test_functions(text, expected):
    claims = dict(DOC, empty="", csv="a,,b")
    assert holds(text, claims) is expected


@pytest.mark.parametrize("text", [
    "Equals(`areas`, `office`)",                # arrays: only Contains and OneOf look inside
    "Prefix(`areas`, `off`)",
    "SplitContains(`areas`, `,`, `office`)",
    "Equals(`user`, `John Snow`)",              # objects are never compared
    "Contains(`user`, `name`)",
    "OneOf(`user`, `name`)",
    "Contains(`nested`, `x`)",                  # arrays inside arrays are not flattened
    "Contains(`objects`, `x`)",
    "Equals(`grp.sub`, `admin`)",               # a path through a string
    "Equals(`areas.0`, `office`)",              # no indexing into arrays
])
def test_type_mismatches_are_false(text):
    claims = dict(DOC, nested=[["x"]], objects=[{"x": "x"}])
    assert not holds(text, claims)


@pytest.mark.parametrize("function", [
    "Equals(`{}`, `x`)", "Prefix(`{}`, `x`)", "Contains(`{}`, `x`)",
    "SplitContains(`{}`, ` `, `x`)", "OneOf(`{}`, `x`, `y`)",
])
@pytest.mark.parametrize("key", ["missing", "user.missing", "missing.deeper", "user.name.deeper"])
def test_missing_keys_are_false(function, key):
    assert not holds(function.format(key))
    assert holds("!" + function.format(key))


@pytest.mark.parametrize("claims", [None, [], ["grp"], "grp", 3, True])
def test_claims_that_are_not_an_object(claims):
    assert not holds("Equals(`grp`, `admin`)", claims)


@pytest.mark.parametrize("text, claims", [
    ("Equals(`active`, `true`)", {"active": True}),
    ("Equals(`active`, `false`)", {"active": False}),
    ("Equals(`exp`, `1700000000`)", {"exp": 1700000000}),
    ("Equals(`exp`, `1700000000`)", {"exp": 1700000000.0}),
    ("Equals(`ratio`, `1.5`)", {"ratio": 1.5}),
    ("Equals(`ratio`, `-2`)", {"ratio": -2.0}),
    ("Equals(`sub`, `null`)", {"sub": None}),
    ("Prefix(`exp`, `1700`)", {"exp": 1700000000}),
    ("Contains(`levels`, `2`)", {"levels": [1, 2, 3]}),
    ("Contains(`flags`, `true`)", {"flags": [False, True]}),
    ("OneOf(`levels`, `7`, `3`)", {"levels": [1, 2, 3.0]}),
    ("OneOf(`exp`, `1`, `42`)", {"exp": 42}),
])
def test_scalars_compare_by_their_text(text, claims):
    assert holds(text, claims)


@pytest.mark.parametrize("text, claims", [
    ("Equals(`active`, `True`)", {"active": True}),
    ("Equals(`active`, `1`)", {"active": True}),
    ("Equals(`exp`, `1700000000.0`)", {"exp": 1700000000.0}),
    ("Equals(`active`, `true`)", {"active": "True"}),
    ("Equals(`sub`, ``)", {"sub": None}),
])
def test_scalar_text_is_exact(text, claims):
    assert not holds(text, claims)


@pytest.mark.parametrize("value, text", [
    ("admin", "admin"), ("", ""), (True, "true"), (False, "false"), (None, "null"),
    (0, "0"), (-7, "-7"), (1700000000, "1700000000"), (2.0, "2"), (-0.0, "0"),
    (1.5, "1.5"), (0.1, "0.1"), (1e20, "1e+20"), (2 ** 64, "18446744073709551616"),
    ([1, "a"], '[1,"a"]'), ({"k": None}, '{"k":null}'),
])
def test_claim_text(value, text):
    assert claim_text(value) == text


def test_claim_text_never_raises_on_odd_numbers():
    for value in (math.nan, math.inf, -math.inf, 10 ** 5000):
        assert isinstance(claim_text(value), str)


# --- keys --------------------------------------------------------------------

@pytest.mark.parametrize("text, path", [
    ("grp", ("grp",)),
    ("user.name", ("user", "name")),
    ("a\\.b", ("a.b",)),
    ("a\\\\.b", ("a\\", "b")),
    ("a\\\\\\.b", ("a\\.b",)),
    ("https://example\\.com/roles", ("https://example.com/roles",)),
    ("a\\b", ("a\\b",)),            # a backslash before anything else stays
    ("a\\", ("a\\",)),
    ("a..b", ("a", "", "b")),       # empty parts are the caller's to refuse
    ("", ("",)),
])
def test_parse_path(text, path):
    assert parse_path(text) == path


@given(st.lists(st.text(), min_size=1, max_size=4).map(tuple))
@settings(max_examples=200)
def test_format_path_inverts_parse_path(path):
    assert parse_path(format_path(path)) == path


def test_escaped_dot_is_one_key():
    claims = {"a.b": "flat", "a": {"b": "nested"}}
    assert holds("Equals(`a\\.b`, `flat`)", claims)
    assert holds("Equals(`a.b`, `nested`)", claims)
    assert not holds("Equals(`a\\.b`, `nested`)", claims)


def test_escaped_backslash():
    claims = {"a\\": {"b": "x"}, "c\\.d": "y", "e\\f": "z"}
    assert holds("Equals(`a\\\\.b`, `x`)", claims)
    assert holds("Equals(`c\\\\\\.d`, `y`)", claims)
    assert holds("Equals(`e\\\\f`, `z`)", claims)
    assert holds("Equals(`e\\f`, `z`)", claims)    # lone backslash kept


def test_deep_nesting():
    claims = {"realm_access": {"roles": ["admin", "user"]}, "a": {"b": {"c": {"d": 1}}}}
    assert holds("Contains(`realm_access.roles`, `admin`)", claims)
    assert holds("Equals(`a.b.c.d`, `1`)", claims)


def test_values_are_taken_literally():
    claims = {"k": "a.b\\c  && ||(!)"}
    assert holds("Equals(`k`, `a.b\\c  && ||(!)`)", claims)
    assert holds("Equals(`k`,`a.b\\c  && ||(!)`)", claims)


# --- operators ---------------------------------------------------------------

T = "Equals(`grp`, `admin`)"      # true on DOC
F = "Equals(`grp`, `testers`)"    # false on DOC


@pytest.mark.parametrize("text, expected", [
    (f"{T} && {F}", False),
    (f"{F} || {T}", True),
    (f"{F} && {F} || {T}", True),      # && binds tighter than ||
    (f"{T} || {F} && {F}", True),
    (f"({T} || {F}) && {F}", False),
    (f"{F} && ({F} || {T})", False),
    (f"!{F} && {T}", True),            # ! binds tighter than &&
    (f"!{T} || {T}", True),
    (f"!({T} || {F})", False),
    (f"!({F} && {T})", True),
    (f"!!{T}", True),
    (f"! ! ( {T} )", True),
    (f"((({T})))", True),
    (f"{T}&&{T}&&{T}&&{F}", False),
    (f"{F}||{F}||{F}||{T}", True),
    (f"\n\t{T}\n  &&\n  !{F}\n", True),
])
def test_operators(text, expected):
    assert holds(text) is expected


def test_tree_shape():
    a, b, c = (Equals(("k",), v) for v in "abc")
    parse = compile_claims
    assert parse("Equals(`k`,`a`) || Equals(`k`,`b`) && Equals(`k`,`c`)") == Or((a, And((b, c))))
    assert parse("!Equals(`k`,`a`) && Equals(`k`,`b`)") == And((Not(a), b))
    assert parse("Equals(`k`,`a`) && Equals(`k`,`b`) && Equals(`k`,`c`)") == And((a, b, c))
    assert parse("(Equals(`k`,`a`) && Equals(`k`,`b`)) && Equals(`k`,`c`)") == And((And((a, b)), c))
    assert parse("OneOf(`k`, `a`, `b`, `c`)") == OneOf(("k",), ("a", "b", "c"))
    assert parse("SplitContains(`k`, `,`, `a`)") == SplitContains(("k",), ",", "a")
    assert isinstance(parse("Prefix(`k`,`a`)"), Expression)


def test_canonical_text():
    text = "  !( Equals(`a\\.b`,`x`)||Prefix(`c`,  `y`) )&&OneOf(`d\\\\e`,`1`,`2`)"
    assert str(compile_claims(text)) == \
        "!(Equals(`a\\.b`, `x`) || Prefix(`c`, `y`)) && OneOf(`d\\\\e`, `1`, `2`)"


def test_long_chains_stay_flat():
    text = " && ".join(["Equals(`grp`, `admin`)"] * 3000)
    expression = compile_claims(text)
    assert expression.evaluate(DOC)
    assert len(expression.operands) == 3000


def test_nesting_limit():
    inner = "Equals(`grp`, `admin`)"
    deepest = "(" * (MAX_NESTING - 1) + inner + ")" * (MAX_NESTING - 1)
    assert holds(deepest)
    assert holds("!" * (MAX_NESTING - 1) + inner) is (MAX_NESTING % 2 == 1)
    with pytest.raises(ClaimsSyntaxError, match="nested deeper"):
        compile_claims("(" * MAX_NESTING + inner + ")" * MAX_NESTING)
    with pytest.raises(ClaimsSyntaxError, match="nested deeper"):
        compile_claims("(" * 5000 + inner + ")" * 5000)
    # Siblings do not add up.
    assert holds(" && ".join(["!!!!(" * 6 + inner + ")" * 6] * 20))


# --- syntax errors -----------------------------------------------------------

@pytest.mark.parametrize("text, col, msg", [
    ("Equals(`grp`, `admin`", 22, "expected ',' or ')'"),
    ("Equals(`grp` `admin`)", 14, "expected ',' or ')'"),
    ("Equals(`grp`, `admin`) Equals(`a`, `b`)", 24, "expected '&&', '||' or end of input"),
    ("Equals(`grp`, `admin`) )", 24, "expected '&&', '||' or end of input"),
    ("Equals(`grp`, `admin`) & Equals(`a`, `b`)", 24, "expected '&&', '||' or end of input"),
    ("(Equals(`grp`, `admin`)", 24, "expected '&&', '||' or ')'"),
    ("Equals(`grp`, `admin`) &&", 26, "expected a function, '(' or '!'"),
    ("Equals(`grp`, `admin`) || && Equals(`a`, `b`)", 27, "expected a function, '(' or '!'"),
    ("&& Equals(`a`, `b`)", 1, "expected a function, '(' or '!'"),
    ("!", 2, "expected a function, '(' or '!'"),
    ("()", 2, "expected a function, '(' or '!'"),
    ("`grp`", 1, "expected a function, '(' or '!'"),
    ("Equals", 7, "expected '('"),
    ("Equals `grp`, `admin`)", 8, "expected '('"),
    ("Equals()", 8, "expected an argument in backticks"),
    ("Equals(grp, admin)", 8, "expected an argument in backticks"),
    ("Equals(`grp`, )", 15, "expected an argument in backticks"),
    ("Equals(`grp`, 'admin')", 15, "expected an argument in backticks"),
    ("Equals(`grp`, `admin)", 15, "argument has no closing '`'"),
    ("Equals(`grp`, `ad`min`)", 18, "arguments cannot contain '`'"),
    ("Equals(`grp`, `admin``)", 21, "arguments cannot contain '`'"),
    ("Equals(`grp`x, `admin`)", 13, "expected ',' or ')'"),
    ("Equals(`grp`, `admin`, `x`)", 24, "Equals takes 2 arguments (key, value), got 3"),
    ("Prefix(`grp`)", 13, "Prefix takes 2 arguments (key, value), got 1"),
    ("Contains(`a`, `b`, `c`, `d`)", 20, "Contains takes 2 arguments (key, value), got 4"),
    ("SplitContains(`scope`, `writer`)", 32,
     "SplitContains takes 3 arguments (key, separator, value), got 2"),
    ("OneOf(`areas`)", 14, "OneOf takes at least 2 arguments (key, value, ...), got 1"),
    ("SplitContains(`scope`, ``, `writer`)", 25, "expected a non-empty separator"),
    ("Equals(``, `x`)", 9, "expected a claim key: names separated by '.', none of them empty"),
    ("Equals(`a..b`, `x`)", 9, "expected a claim key: names separated by '.', none of them empty"),
    ("Equals(`a.`, `x`)", 9, "expected a claim key: names separated by '.', none of them empty"),
    ("Equals(`grp`, `a`) &&\n  Equals(`grp`, `b`", 42, "expected ',' or ')'"),
])
def test_syntax_errors(text, col, msg):
    with pytest.raises(ClaimsSyntaxError) as info:
        compile_claims(text)
    assert (info.value.col, info.value.msg) == (col, msg)
    assert str(info.value) == f"col {col}: {msg}"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["equals", "EQUALS", "Equal", "NotEquals", "In", "Foo_1"])
def test_unknown_functions(name):
    with pytest.raises(ClaimsSyntaxError) as info:
        compile_claims(f"Equals(`a`, `b`) || {name}(`grp`, `admin`)")
    assert info.value.col == 21
    assert info.value.msg == (f"unknown function {name!r} "
                              "(expected Equals, Prefix, Contains, SplitContains or OneOf)")


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r\n"])
def test_empty_expression(text):
    with pytest.raises(ClaimsSyntaxError, match="^col 1: empty expression$"):
        compile_claims(text)


def test_syntax_error_pickles():
    err = pickle.loads(pickle.dumps(ClaimsSyntaxError(3, "expected '('")))
    assert (err.col, err.msg, str(err)) == (3, "expected '('", "col 3: expected '('")


def test_split_contains_refuses_an_empty_separator():
    with pytest.raises(ValueError):
        SplitContains(("k",), "", "v")


# --- properties --------------------------------------------------------------

TOKENS = ["Equals", "Prefix", "Contains", "SplitContains", "OneOf", "Foo", "(", ")", ",",
          "`", "`a`", "`a.b`", "`a\\.b`", "`\\\\`", "``", "`x y`", "&&", "||", "&", "|",
          "!", " ", "\n", ".", "\\", "x"]


@given(st.one_of(st.text(), st.lists(st.sampled_from(TOKENS), max_size=30).map("".join)))
@settings(max_examples=400, deadline=None)
def test_random_text_only_raises_syntax_errors(text):
    try:
        expression = compile_claims(text)
    except ClaimsSyntaxError as err:
        assert 1 <= err.col <= len(text) + 1
        assert err.msg and str(err).startswith(f"col {err.col}: ")
    else:
        assert compile_claims(str(expression)) == expression


KEY_PARTS = st.text(alphabet="ab.\\ xé", min_size=1, max_size=4)
KEYS = st.lists(KEY_PARTS, min_size=1, max_size=3).map(tuple)
VALUES = st.text(alphabet=st.characters(blacklist_characters="`"), max_size=8)
FUNCTIONS = st.one_of(
    st.builds(Equals, KEYS, VALUES),
    st.builds(Prefix, KEYS, VALUES),
    st.builds(Contains, KEYS, VALUES),
    st.builds(SplitContains, KEYS, VALUES.filter(bool), VALUES),
    st.builds(OneOf, KEYS, st.lists(VALUES, min_size=1, max_size=4).map(tuple)),
)
EXPRESSIONS = st.recursive(
    FUNCTIONS,
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.builds(And, st.lists(inner, min_size=2, max_size=4).map(tuple)),
        st.builds(Or, st.lists(inner, min_size=2, max_size=4).map(tuple)),
    ),
    max_leaves=12,
)


def depth(node):
    children = getattr(node, "operands", None) or (
        (node.operand,) if isinstance(node, Not) else ())
    return 1 + max((depth(child) for child in children), default=0)


@given(EXPRESSIONS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_printed_expressions_parse_back(expression):
    assume(depth(expression) < MAX_NESTING // 2)
    text = str(expression)
    assert compile_claims(text) == expression
    assert str(compile_claims(text)) == text


# Keys drawn from the same letters as KEY_PARTS, so expressions do find claims.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(alphabet="ab. ,1e", max_size=6),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", "a.b", "a\\", "x"]), inner, max_size=4),
    max_leaves=15,
)


@given(EXPRESSIONS, JSON)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_evaluation_never_raises(expression, claims):
    result = expression.evaluate(claims)
    assert result is True or result is False
    assert Not(expression).evaluate(claims) is (not result)
