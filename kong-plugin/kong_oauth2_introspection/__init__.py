"""OAuth 2.0 token introspection (RFC 7662) for Kong Gateway, as a kong-pdk plugin server."""

NAME = "oauth2-introspection"
VERSION = "0.2.0"
PRIORITY = 1700
