"""The common checks as options, named as Kong Enterprise's openid-connect names them:
``scopes_required``, ``audience_required`` and ``issuers_allowed``.

``scopes_required`` and ``audience_required`` are any-of lists of all-of sets:
each entry is a space-separated set of values that must all be present, and
one entry holding is enough (openid-connect's semantics). The claim may be a
space-separated string (RFC 7662 ``scope``) or an array (``aud``, and the
``scp``-style arrays some servers send as ``scope``).

An issuer or audience that does not match means the token was not meant for
this resource: 401 ``invalid_token``. Missing scopes mean the token is valid but
not enough: 403 ``insufficient_scope`` (RFC 6750 section 3.1).
"""

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, Optional, Tuple

from ..claims import resolve

AnyOf = Tuple[FrozenSet[str], ...]

# What failed, for the handler to choose the answer.
ISSUER = "issuer"
AUDIENCE = "audience"
SCOPE = "scope"


def any_of(entries: Iterable[str]) -> AnyOf:
    """Each entry's space-separated words as one all-of set; empty entries dropped."""
    sets = (frozenset(entry.split()) for entry in entries)
    return tuple(s for s in sets if s)


def _values(claim: Any) -> FrozenSet[str]:
    """The claim as a set of strings: a space-separated string or an array of strings."""
    if isinstance(claim, str):
        return frozenset(claim.split())
    if isinstance(claim, list):
        return frozenset(v for v in claim if isinstance(v, str))
    return frozenset()


def _holds(required: AnyOf, claim: Any) -> bool:
    if not required:
        return True
    present = _values(claim)
    return any(needed <= present for needed in required)


@dataclass(frozen=True)
class Requirements:
    scopes: AnyOf = ()
    audiences: AnyOf = ()
    issuers: FrozenSet[str] = frozenset()
    # Where the values are, as openid-connect's scopes_claim / audience_claim:
    # path segments through nested objects (["realm_access", "roles"]).
    scopes_claim: Tuple[str, ...] = ("scope",)
    audience_claim: Tuple[str, ...] = ("aud",)

    @property
    def configured(self) -> bool:
        return bool(self.scopes or self.audiences or self.issuers)

    @property
    def scope_hint(self) -> Optional[str]:
        """The ``scope`` attribute of a 403: the first alternative, the one to ask for."""
        if not self.scopes:
            return None
        return " ".join(sorted(self.scopes[0]))

    def missing_scopes(self, claims: Dict[str, Any]) -> Tuple[str, ...]:
        """For a log line: the scopes of the alternative closest to holding that
        the token lacks (config values, never the token's)."""
        present = _values(resolve(claims, self.scopes_claim))
        lacking = [tuple(sorted(needed - present)) for needed in self.scopes]
        return min(lacking, key=lambda names: len(names)) if lacking else ()

    def failure(self, claims: Dict[str, Any]) -> Optional[str]:
        """ISSUER, AUDIENCE or SCOPE for the first check that fails, None when all hold."""
        iss = claims.get("iss")
        if self.issuers and not (isinstance(iss, str) and iss in self.issuers):
            return ISSUER
        if self.audiences and not _holds(self.audiences, resolve(claims, self.audience_claim)):
            return AUDIENCE
        if self.scopes and not _holds(self.scopes, resolve(claims, self.scopes_claim)):
            return SCOPE
        return None
