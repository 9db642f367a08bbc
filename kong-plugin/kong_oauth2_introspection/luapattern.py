"""Lua patterns (what Kong's ``match``, ``not_match``, ``match_any`` … take) as Python regexes.

Kong runs them with LuaJIT's ``string.match`` on the value's bytes, so they are
translated to a regex over bytes (a UTF-8 value is matched as its Latin-1 view:
one character per byte). Character classes follow the C locale, as OpenResty's
does. ``%b`` and ``%f`` have no regex equivalent and are refused when the
schema loads, rather than misjudged at run time. ``tests/test_schema_config.py``
compares this translation with LuaJIT itself.
"""

import re
import string
from functools import lru_cache
from typing import FrozenSet, List, Tuple

_ALL = frozenset(chr(b) for b in range(256))
_CLASSES = {
    "a": frozenset(string.ascii_letters),
    "c": frozenset(chr(b) for b in list(range(32)) + [127]),
    "d": frozenset(string.digits),
    "g": frozenset(chr(b) for b in range(33, 127)),
    "l": frozenset(string.ascii_lowercase),
    "p": frozenset(string.punctuation),
    "s": frozenset(" \t\n\v\f\r"),
    "u": frozenset(string.ascii_uppercase),
    "w": frozenset(string.ascii_letters + string.digits),
    "x": frozenset(string.hexdigits),
    "z": frozenset("\0"),  # Lua 5.1's %z, which LuaJIT keeps
}


class LuaPatternError(ValueError):
    """A pattern Lua would refuse, or one this translation cannot express."""


def _escape_class(ch: str) -> FrozenSet[str]:
    lower = ch.lower()
    if lower in _CLASSES:
        chars = _CLASSES[lower]
        return _ALL - chars if ch.isupper() else chars
    return frozenset(ch)  # %. %% %- …: the character itself


def _regex_set(chars: FrozenSet[str]) -> str:
    if not chars:
        return "(?!)"
    return "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"


def _bracket(pattern: str, i: int) -> Tuple[FrozenSet[str], int]:
    """The set ``[...]`` starting at ``pattern[i] == '['``, and the index after it."""
    n = len(pattern)
    body = i + 1
    negate = body < n and pattern[body] == "^"
    if negate:
        body += 1
    # Find the closing ']' as Lua's classEnd does: the first character is always
    # part of the set ("[]]"), and "%]" is an escaped bracket.
    end = body
    while True:
        if end >= n:
            raise LuaPatternError("malformed pattern (missing ']')")
        ch = pattern[end]
        end += 1
        if ch == "%" and end < n:
            end += 1
        if end < n and pattern[end] == "]":
            break
    chars: set = set()
    j = body
    while j < end:  # as Lua's matchbracketclass
        ch = pattern[j]
        if ch == "%":
            chars |= _escape_class(pattern[j + 1])
            j += 2
        elif j + 2 < end and pattern[j + 1] == "-":
            chars |= {chr(c) for c in range(ord(ch), ord(pattern[j + 2]) + 1)}
            j += 3
        else:
            chars.add(ch)
            j += 1
    result = frozenset(chars)
    return (_ALL - result if negate else result), end + 1


def _single(pattern: str, i: int) -> Tuple[str, int]:
    """One character class at ``i`` as a regex, and the index after it."""
    ch = pattern[i]
    if ch == ".":
        return "[\\x00-\\xff]", i + 1
    if ch == "[":
        chars, nxt = _bracket(pattern, i)
        return _regex_set(chars), nxt
    if ch == "%":
        if i + 1 >= len(pattern):
            raise LuaPatternError("malformed pattern (ends with '%')")
        return _regex_set(_escape_class(pattern[i + 1])), i + 2
    return re.escape(ch), i + 1


def translate(pattern: str) -> str:
    """The regex (over Latin-1 text) that finds what ``string.match`` finds."""
    out: List[str] = []
    i = 0
    if pattern.startswith("^"):
        out.append(r"\A")
        i = 1
    while i < len(pattern):
        ch = pattern[i]
        if ch == "(":
            out.append("(")
            i += 1
        elif ch == ")":
            out.append(")")
            i += 1
        elif ch == "$" and i == len(pattern) - 1:
            out.append(r"\Z")  # not "$": it would also match before a final newline
            i += 1
        elif ch == "%" and i + 1 < len(pattern) and pattern[i + 1] in "bf":
            raise LuaPatternError(f"%{pattern[i + 1]} is not supported in schema patterns")
        elif ch == "%" and i + 1 < len(pattern) and pattern[i + 1].isdigit():
            out.append(f"(?:\\{pattern[i + 1]})")
            i += 2
        else:
            single, i = _single(pattern, i)
            quantifier = pattern[i] if i < len(pattern) else ""
            if quantifier in ("*", "+", "?"):
                out.append(single + quantifier)
                i += 1
            elif quantifier == "-":
                out.append(single + "*?")  # Lua's lazy repetition
                i += 1
            else:
                out.append(single)
    return "".join(out)


@lru_cache(maxsize=None)
def compile_pattern(pattern: str) -> "re.Pattern[str]":
    return re.compile(translate(pattern))


def find(pattern: str, value: str) -> bool:
    """Whether Lua's ``value:match(pattern)`` finds something."""
    data = value.encode("utf-8").decode("latin-1")  # Lua matches bytes
    return compile_pattern(pattern).search(data) is not None
