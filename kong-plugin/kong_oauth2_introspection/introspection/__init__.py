"""Plugin 1, ``oauth2-introspection``: the handler (the flow, top-down like
Kong's key-auth), its config, where tokens are found, the IdP exchange
(RFC 7662) and its signed answers (RFC 9701), consumers, requirements, DPoP,
certificate binding, resource metadata and header templates.

A plugin wing: it imports the shared wings (``kong``, ``idp``, ``cache``,
``server``, ``ops``) and the top level; no shared wing imports it.
"""
