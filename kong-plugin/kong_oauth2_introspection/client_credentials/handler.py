"""The oauth2-client-credentials access phase.

For every request: find the client credentials (configured, or the caller's
HTTP Basic ones), get a token for them (cached, or from the token endpoint,
verified), check the claims, and send the request upstream with
``Authorization: Bearer <token>`` in place of whatever the caller sent.

Every path ends in ``kong.response.exit`` or in ``kong.client.authenticate``
after one ``set_headers`` call: Kong's guard refuses a request that has neither.
"""

import base64
import binascii
import hashlib
import hmac
from typing import Any, Dict, List, NamedTuple, Optional, Union

from kong_pdk.exception import PDKException

from .. import NAME as INTROSPECTION
from ..kong import refusals, responses
from ..claims import MISSING, resolve
from ..concurrency import Deadline, DeadlineExceeded, blocking, current_deadline, deadline_scope
from ..ops.guard import MARK, also_decided
from ..ops.log import LOG
from ..kong.responses import Refusal
from ..server.instances import PluginInstance, Unusable
from ..server.registry import Registry
from ..cache.store import RedisStore
from ..kong.spellings import normalized
from ..kong.headers import SHARED, header_value, identity_like, uuid_shaped
from . import NAME, PRIORITY, VERSION
from .authserver import AuthServer, ClientRejected, Credentials, ServerError
from .config import SCHEMA, Config, ConfigError
from .tokencache import Token, TokenCache, refresh_at
from .verify import TokenInvalid, Verifier

LOG_PREFIX = NAME + ": "
MAX_HEADERS = 1000                   # Kong's ceiling for get_headers
_BASIC_REALM = 'Basic realm="service", charset="UTF-8"'

MISSING_CREDENTIALS = Refusal(401, {"error": "invalid_client",
                                    "error_description": "Client credentials are missing"},
                              {"WWW-Authenticate": _BASIC_REALM})
BAD_CREDENTIALS = Refusal(401, {"error": "invalid_client",
                                "error_description": "Client authentication failed"},
                          {"WWW-Authenticate": _BASIC_REALM})
CLIENT_FORBIDDEN = Refusal(403, {"error": "unauthorized_client",
                                 "error_description": "The client may not obtain a token "
                                                      "for this resource"}, {})
CLAIMS_FORBIDDEN = Refusal(403, {"error": "insufficient_scope",
                                 "error_description": "The client's token does not grant "
                                                      "access to this resource"}, {})
TOO_MANY_HEADERS = Refusal(400, {"error": "invalid_request",
                                 "error_description": "Too many request headers"}, {})

HeaderTable = Dict[str, Union[str, List[str]]]


class Runtime:
    """What one config builds once: HTTP client, verifier, cache."""

    def __init__(self, conf: Config, log: Any):
        self.conf = conf
        self.server = AuthServer(conf, log)
        self.verifier = Verifier(conf, self.server, log)
        self.fixed = (Credentials.configured(conf.client_id, conf.client_secret)
                      if conf.client_id is not None and conf.client_secret is not None
                      else None)
        store = RedisStore.from_config(conf.store, log) if conf.store else None
        # A token answers one question: this endpoint, this audience, these credentials.
        context = "\0".join((conf.url, conf.audience_param, conf.audience))
        self.cache = TokenCache(
            hmac_key=conf.store_secret.encode() if store is not None and conf.store_secret
            else None,
            context=context, fetch=self._fetch, check=self._check, store=store,
            wait=conf.timeout * (conf.max_retries + 1) + 1.0)
        # Credential ids Kong sees (and logs): stable across nodes, and derived
        # from the client id only, so a log reveals nothing about a secret.
        self._id_key = hashlib.sha256(b"oauth2-client-credentials/credential\0"
                                      + context.encode()).digest()

    def _check(self, value: str, deadline: Optional[Deadline]) -> Token:
        claims = self.verifier.verify(value, deadline)
        return Token(value, claims, refresh_at(claims, self.cache.clock()))

    def _fetch(self, creds: Credentials, deadline: Optional[Deadline]) -> Token:
        issued = self.server.request_token(creds, deadline)
        return self._check(issued.access_token, deadline)

    def token(self, creds: Credentials) -> Token:
        """Cached on this process (no I/O), else obtained off the event loop."""
        key = self.cache.key(creds)
        token = self.cache.cached(key)
        if token is not None:
            return token
        deadline = current_deadline()

        def obtain() -> Token:
            with deadline_scope(deadline):   # the store spends from it on this thread
                return self.cache.obtain(key, creds, deadline)
        return blocking(obtain)

    def credential_id(self, client_id: str) -> str:
        return uuid_shaped(hmac.digest(self._id_key, client_id.encode(), "sha256"))

    def close(self) -> None:
        self.cache.close()
        self.server.close()


# Kong starts one instance per config and nginx worker: equal configs share one
# runtime (HTTP pool, key set, token cache), closed when the last one goes.
RUNTIMES: "Registry[Any]" = Registry(idle=16)


class Plugin(PluginInstance):
    NAME = NAME
    VERSION = VERSION
    PRIORITY = PRIORITY
    SCHEMA = SCHEMA
    RUNTIMES = RUNTIMES
    CONFIG_ERRORS = (ConfigError,)

    @classmethod
    def build(cls, conf_only: Dict[str, Any]) -> "Runtime":
        return Runtime(Config.parse(conf_only), LOG)

    def access(self, kong: Any) -> None:
        # An exception reaching the server leaves Kong's call unanswered, and Kong
        # then lets the request through: every failure must end in a response.
        try:
            runtime = self.runtime
            if isinstance(runtime, Unusable):
                return _Refuse(kong, self.scope).error("unusable_config", str(runtime.error))
            _access(runtime, kong, _Refuse(kong, self.scope, runtime))
        except Exception as err:   # noqa: BLE001 - the last line of defence
            try:
                _Refuse(kong, self.scope).error("internal_error", type(err).__name__)
            except Exception:   # noqa: BLE001 - Kong is gone; nothing left to tell
                pass


def _exit(kong: Any, refusal: Refusal) -> None:
    kong.response.exit(refusal.status, refusal.body, refusal.headers)


class _Refuse:
    """One request's refusals: each answered once, and told once (refusals.py)."""

    def __init__(self, kong: Any, scope: Optional[str], rt: Optional[Runtime] = None):
        self.kong, self.scope, self.rt = kong, scope, rt
        self.client_id: Optional[str] = None   # once the caller's credentials are known

    def __call__(self, refusal: Refusal, reason: str, detail: str = "") -> None:
        level = self.rt.conf.refusal_log_level if self.rt is not None else "info"
        credential = (self.rt.credential_id(self.client_id)
                      if self.rt is not None and self.client_id is not None else None)
        refusals.report(self.kong, NAME, refusal.status, reason, detail, level=level,
                        scope=self.scope, credential=credential)
        _exit(self.kong, refusal)

    def error(self, reason: str, detail: str = "") -> None:
        self(responses.SERVER_ERROR, reason, detail)


def _headers(kong: Any) -> Optional[Dict[str, List[str]]]:
    """Every request header (lower-case name -> values); None when there are too many
    to be sure of having seen them all."""
    try:
        raw = kong.request.get_headers(MAX_HEADERS)
    except PDKException:
        raw = None
    headers: Dict[str, List[str]] = {}
    for name, values in (raw or {}).items():
        if isinstance(name, str):
            headers[name.lower()] = [values] if isinstance(values, str) else \
                [v for v in (values or []) if isinstance(v, str)]
    if sum(len(v) for v in headers.values()) >= MAX_HEADERS:
        return None
    return headers


def caller_credentials(headers: Dict[str, List[str]]) -> Optional[Credentials]:
    """The caller's HTTP Basic credentials (RFC 7617), or None."""
    values = headers.get("authorization") or []
    if len(values) != 1:
        return None
    scheme, _, blob = values[0].strip().partition(" ")
    blob = blob.strip()
    if scheme.lower() != "basic" or not blob or len(blob) > 4096:
        return None
    try:
        decoded = base64.b64decode(blob, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id or not secret or not decoded.isprintable():
        return None
    # Sent on as received: the caller already form-encoded id and secret (RFC 6749 2.3.1).
    return Credentials(client_id, base64.b64encode(decoded.encode()).decode("ascii"))


def _access(rt: Runtime, kong: Any, refuse: _Refuse) -> None:
    conf = rt.conf
    headers = _headers(kong)
    if headers is None:
        return refuse(TOO_MANY_HEADERS, "too_many_headers")
    creds = rt.fixed or caller_credentials(headers)
    if creds is None:
        if not headers.get("authorization"):
            return refuse(MISSING_CREDENTIALS, "missing_credentials")
        return refuse(BAD_CREDENTIALS, "malformed_credentials")
    refuse.client_id = creds.client_id

    try:
        token = rt.token(creds)
    except ClientRejected as err:
        if rt.fixed is not None:   # the gateway's own client is refused: our fault
            return refuse.error("gateway_client_rejected", str(err))
        refused = err.status == 401 or err.code == "invalid_client"
        if refused:
            return refuse(BAD_CREDENTIALS, "client_rejected", str(err))
        return refuse(CLIENT_FORBIDDEN, "client_forbidden", str(err))
    except DeadlineExceeded:
        return refuse.error("deadline_exceeded")
    except (ServerError, TokenInvalid) as err:
        return refuse.error("token_endpoint_failed", str(err) or type(err).__name__)

    claims = token.claims
    if conf.claims is not None and not conf.claims.evaluate(claims):
        return refuse(CLAIMS_FORBIDDEN, "claims_failed", str(conf.claims))

    upstream: HeaderTable = dict(conf.cleared)   # every other spelling of what we set
    upstream["Authorization"] = "Bearer " + token.value
    for name, path in conf.forward_headers:
        # Traefik's rule: a claim that is not there still gives the header, empty.
        value = resolve(claims, path)
        upstream[name] = "" if value is MISSING else header_value(value)
    ours = {normalized(name) for name in upstream}
    spoofable = [n for n in headers if identity_like(n) and normalized(n) not in ours]
    before = _before_us(kong) if spoofable else _Before(None, None)
    if before.introspected:
        # oauth2-introspection let this request through before us: those headers
        # are its own (it removed the client's copies in every spelling).
        spoofable = []
    elif before.consumer is not None or before.credential is not None:
        # Another plugin's set_consumer wrote these spellings for its consumer.
        spoofable = [n for n in spoofable if n not in SHARED]
    for name in spoofable:   # identity headers the caller sent itself never get through
        upstream[name] = []
    kong.service.request.set_headers(upstream)
    if before.introspected:
        # Its consumer and credential stay (consumer-scoped plugins see who the
        # caller is), now naming us too: the guard of a scope holding both plugins
        # wants both decisions. The consumer is asked for only when it mapped one.
        consumer = _read(kong.client.get_consumer) \
            if before.credential.get("consumer_id") is not None else None
        kong.client.authenticate(consumer, also_decided(before.credential, NAME))
        return

    # MARK: what the Kong-side guard looks for
    credential: Dict[str, Any] = {"id": rt.credential_id(creds.client_id), MARK: NAME}
    if conf.username_claim:
        name = resolve(claims, conf.username_claim)
        if name is not MISSING and name is not None:
            credential["username"] = header_value(name)
            kong.log.set_serialize_value("authenticated_entity.username", credential["username"])
    kong.client.authenticate(before.consumer, credential)


class _Before(NamedTuple):
    consumer: Any
    credential: Any

    @property
    def introspected(self) -> bool:
        return isinstance(self.credential, dict) and self.credential.get(MARK) == INTROSPECTION


def _read(call: Any) -> Any:
    try:
        value = call()
    except PDKException:   # Kong 2.8 raises what 3.x returns as nil
        return None
    return value if isinstance(value, dict) and value else None


def _before_us(kong: Any) -> _Before:
    """Who authenticated this request before us. Asked only when the headers hold
    identity headers we do not set: one round trip (two for a consumer without a
    credential, the anonymous one), and none when another plugin decided nothing."""
    credential = _read(kong.client.get_credential)
    if credential is not None:
        if credential.get(MARK) == INTROSPECTION:
            return _Before(None, credential)
    consumer = _read(kong.client.get_consumer)
    return _Before(consumer, credential)
