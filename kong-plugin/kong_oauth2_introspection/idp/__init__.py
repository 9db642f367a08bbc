"""The authorization server, as both plugins talk to it: the bounded HTTP
client, client authentication, JWKS, the circuit breaker and pre-authorization.

Shared wing: it imports the top level and ``ops``; never a plugin's wing.
"""
