"""How many processes ``serve`` runs: read before anything imports prometheus_client,
whose multiprocess mode must be chosen first (see cli.serve)."""

import os

ENV = "OAUTH2_INTROSPECTION_PROCESSES"
MAX_PROCESSES = 64   # listener.EVENT_SLOTS: an event id's remainder names its process


def default_processes() -> int:
    """The CPUs this process may run on (what Kong's nginx may use too)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
