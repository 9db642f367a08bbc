"""What asking an authorization server gives the caches: an answer, or why there is none."""

from typing import Any, Dict, NamedTuple


class IntrospectionError(Exception):
    """The server could not be asked or gave no usable answer.

    The message is safe to log: it never holds the token, the credentials or
    the server's body. ``kind`` is the reason a refusal log names: ``idp_refused``,
    ``idp_unreachable``, ``idp_timed_out``, ``idp_error`` (an HTTP status),
    ``idp_answer_invalid``, ``idp_circuit_open``.
    """

    def __init__(self, message: str, kind: str = "idp_error"):
        super().__init__(message)
        self.kind = kind


class Answer(NamedTuple):
    claims: Dict[str, Any]
    cacheable: bool  # False when the server said Cache-Control: no-store
