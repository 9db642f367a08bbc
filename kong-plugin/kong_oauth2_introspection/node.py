"""What the processes of one plugin server on one Kong node share.

``serve`` may run several processes on one socket. What they must agree on (the
instance table Kong filled through any of them, the node cache) lives in one
directory per plugin server, ``<kong prefix>/<plugin>.node/``, created by the
parent before it starts the children. Outside ``serve`` (tests driving the
plugin in-process, ``check``) there is no such directory and everything stays
in the process.
"""

import os
from typing import Optional

_directory: Optional[str] = None


def set_directory(path: Optional[str]) -> None:
    """Set (or, with None, forget) the node directory; ``serve`` calls it once."""
    global _directory
    if path is not None:
        os.makedirs(path, mode=0o700, exist_ok=True)
    _directory = path


def directory() -> Optional[str]:
    """The node directory, or None when this process runs alone."""
    return _directory
