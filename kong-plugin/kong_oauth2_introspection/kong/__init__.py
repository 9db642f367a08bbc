"""The PDK facade both plugins use: Kong's request as read once, what the
upstream receives, what the client is answered, and the one line a refusal logs.

Shared wing: it imports only the package's top level (schema, claims,
concurrency) and ``ops.log``; never a plugin's wing.
"""
