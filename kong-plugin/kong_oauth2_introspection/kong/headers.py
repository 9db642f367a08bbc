"""Header values and names as both plugins send them upstream: safe values, Kong's
credential ids, and which names an upstream may take for an identity header."""

import json
import re
from typing import Any

from .spellings import normalized

_SPOOFABLE_PREFIXES = ("x-consumer-", "x-credential-")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def header_value(value: Any) -> str:
    """Any JSON value as a safe header value."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    elif isinstance(value, list):
        text = ",".join(header_value(item) for item in value)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return _CONTROL.sub(" ", text)


def uuid_shaped(digest: bytes) -> str:
    """A credential id for ``kong.client.authenticate``: the first 16 bytes of
    ``digest`` written as ``str(uuid.UUID(bytes=...))`` writes them, without
    building the object (it is made on every authenticated request)."""
    h = digest[:16].hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


CONSUMER_HEADERS = ("X-Consumer-ID", "X-Consumer-Custom-ID", "X-Consumer-Username",
                    "X-Anonymous-Consumer")


# Set (or cleared) by Kong's own set_consumer (key-auth, basic-auth, ...) for
# the consumer another plugin identified, in exactly these spellings: on the
# logical-OR path they are that plugin's. Every other spelling stays ours.
SHARED = frozenset(n.lower() for n in CONSUMER_HEADERS + ("X-Credential-Identifier",))


def identity_like(name: str) -> bool:
    """A header an upstream may take for an identity header, in any spelling
    (Kong's auth plugins own X-Anonymous-Consumer as much as X-Consumer-*)."""
    norm = normalized(name)
    return norm.startswith(_SPOOFABLE_PREFIXES) or norm == "x-anonymous-consumer"
