"""The second plugin: the OAuth 2.0 client credentials flow (Traefik Hub's
oAuthClientCredentials) in front of a Kong route.

The gateway exchanges client credentials (configured ones, or the caller's
HTTP Basic ones) for an access token at the authorization server, verifies the
token (a JWT) against the server's keys, caches it while it is valid, and sends
it upstream as ``Authorization: Bearer``.
"""

from .. import VERSION

NAME = "oauth2-client-credentials"
# Kong runs higher priorities first. 1150 places this among Kong's bundled
# authentication plugins (jwt 1450, oauth2 1400, key-auth 1250, basic-auth
# 1100), after the request-shaping ones (cors 2000, bot-detection 2500), and
# before what needs the authenticated client: acl 950, rate-limiting 910, and
# the fail-closed post-function guard (-1000). It stays below our
# oauth2-introspection (1700) so that, should both sit on one route, the
# Bearer token a caller brings is checked before this plugin replaces it.
PRIORITY = 1150

__all__ = ["NAME", "PRIORITY", "VERSION"]
