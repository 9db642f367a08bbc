"""Every spelling of a header name that reaches the upstream as "the same" header.

Kong's nginx keeps header names that hold an underscore (its template sets
``underscores_in_headers on``), and many upstreams (CGI, WSGI, PHP, most web
frameworks) read ``X_Consumer_ID`` as ``X-Consumer-ID``. nginx matches a name
case-insensitively but ``-`` and ``_`` exactly, so ``set_headers({"x-consumer-id":
[]})`` leaves ``x_consumer_id`` in place: a header the plugin owns is cleared in
all 2^n spellings of its n separators. Built once per config, never per request.
"""

import itertools
import re
from typing import Iterable, List

# 2^8 = 256 spellings for one name; a longer header name is refused at config time.
MAX_SEPARATORS = 8
_SEPARATOR = re.compile(r"[-_]")


def normalized(name: str) -> str:
    """The one form every spelling of ``name`` shares."""
    return name.lower().replace("_", "-")


def separators(name: str) -> int:
    return len(_SEPARATOR.findall(name))


def spellings(name: str) -> List[str]:
    """Every lower-case spelling of ``name`` with ``-`` or ``_`` at each separator."""
    parts = _SEPARATOR.split(name.lower())
    if len(parts) - 1 > MAX_SEPARATORS:
        raise ValueError("header name %r has more than %d '-' or '_'" % (name, MAX_SEPARATORS))
    out = []
    for seps in itertools.product("-_", repeat=len(parts) - 1):
        out.append("".join(p + s for p, s in zip(parts, seps + ("",))))
    return out


def others(name: str) -> List[str]:
    """Every spelling of ``name`` except its own (case aside): with ``name`` itself,
    the keys of one set_headers table that reach every copy a client can send."""
    own = name.lower()
    return [s for s in spellings(name) if s != own]


def too_long(names: Iterable[str]) -> List[str]:
    return [n for n in names if separators(n) > MAX_SEPARATORS]
