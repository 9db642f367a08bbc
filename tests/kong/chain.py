"""Several external plugins on one request, each served by its own plugin server.

Kong 3.9 registers one plugin per plugin server, so two of our plugins on one
route run in two server processes: Kong's plugins iterator calls each plugin's
phase in priority order (highest first; Kong Enterprise's dynamic ``ordering``
can change it), all on the same request, so each plugin reads what the ones
before it wrote (``ngx.req.set_header`` changes the request every later
``get_headers`` reads) and the consumer and credential they authenticated.
A plugin whose server fails is logged and skipped; the next one still runs.
"""

from typing import Any, Optional, Sequence, Tuple

from .result import Result
from .standin import Instance, KongStandIn

__all__ = ["Chain", "by_priority"]

Pair = Tuple[KongStandIn, Instance]


def by_priority(pairs: Sequence[Pair]) -> Sequence[Pair]:
    """Kong's order: the plugin with the higher PRIORITY first."""
    def priority(pair: Pair) -> int:
        standin, instance = pair
        return next(int(p.get("Priority", 0)) for p in standin.plugins_info
                    if p["Name"] == instance.name)
    return sorted(pairs, key=priority, reverse=True)


class Chain(object):
    """``Chain([(standin_a, instance_a), (standin_b, instance_b)])`` runs a request
    through both plugins in Kong's priority order, or, with ``order="given"``, in
    the order given. The first stand-in's guard (``post_function``) runs last."""

    def __init__(self, pairs: Sequence[Pair], order: str = "priority") -> None:
        if order not in ("priority", "given"):
            raise ValueError("order must be 'priority' or 'given'")
        self.pairs = list(by_priority(pairs) if order == "priority" else pairs)

    def request(self, method: str = "GET", path: str = "/", *, guard: Optional[KongStandIn] = None,
                **kwargs: Any) -> Result:
        """One client request (``KongStandIn.request``'s arguments) through every
        plugin; the guard of ``guard`` (default: the first pair's stand-in)."""
        first = guard or self.pairs[0][0]
        # the first plugin's stand-in knows its schema (phases); the guard's runs the rest
        state = self.pairs[0][0]._client_request(self.pairs[0][1], method, path,
                                      headers=kwargs.get("headers"), query=kwargs.get("query"),
                                      body=kwargs.get("body"),
                                      client_ip=kwargs.get("client_ip", "127.0.0.1"),
                                      authenticated=kwargs.get("authenticated"),
                                      authenticated_consumer=kwargs.get("authenticated_consumer"),
                                      phase=kwargs.get("phase", "access"),
                                      client_cert=kwargs.get("client_cert"))
        if not state.result.proxied:   # nginx answered
            return first._finish(state)
        return first._run(state, self.pairs)
