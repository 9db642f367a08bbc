"""The operator's tools: ``check``, the fail-closed guard, health, metrics,
tracing, the log, and the loopback HTTP server metrics and health answer on.

``check`` and ``purge`` read both plugins' configs; the rest imports only the
top level and the shared wings.
"""
