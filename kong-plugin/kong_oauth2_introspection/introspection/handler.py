"""The plugin's access phase: find the token, ask the IdP (or the cache),
check the answer, tell the upstream who the caller is.

The plugin server builds one ``Plugin`` per instance Kong starts (one per config
and nginx worker) and calls ``access`` for every request, as a greenlet on its
event loop: PDK calls are round trips to Kong, and anything that blocks goes
through ``concurrency.blocking``.

Every path ends in exactly one of: ``kong.response.exit`` (refused), or one
``set_headers`` call that sets or clears every identity header this config owns
followed by ``kong.client.authenticate`` (let through; the Kong-side guard lets
through only requests that were authenticated), or the one deliberate pass
without authentication, a CORS preflight when ``run_on_preflight`` is false.
"""

import json
import time
from typing import Any, Dict, List, Optional, Tuple

from cachetools import LRUCache
from kong_pdk.exception import PDKException

from .. import NAME, PRIORITY, VERSION
from ..kong import body, responses
from ..ops import metrics, tracing
from . import cert_binding, dpop
from ..kong import refusals
from . import requirements as required
from .. import schema as schema_module
from ..idp import breaker as breakers
from ..cache.tokens import Policy, TokenCache
from ..claims import MISSING, resolve
from ..concurrency import DeadlineExceeded, blocking
from .config import Config, ConfigError
from .consumers import ConsumerFinder, ConsumerLookupError
from ..ops.guard import DECIDED, MARK, decided
from ..idp.httpclient import Unsendable
from .exchange import (CLOCK_SKEW, IntrospectionError, Introspector, certificate_fingerprint,
                       why_unusable)
from .jwt_answers import JWT_KEY
from ..ops.log import LOG
from ..kong.request import IncomingRequest, Uninspectable
from ..kong.responses import Refusal
from .templates import wire
from ..server.instances import PluginInstance, Unusable
from ..server.registry import Registry
from ..cache.store import RedisStore
from .tokens import Found, MalformedToken, TokenFinder, without_cookie
from ..client_credentials import NAME as CLIENT_CREDENTIALS
from ..kong.spellings import normalized
from .upstream import (IdentityHeaders, consumer_headers, credential_headers, header_value,
                       identity_like)

LOG_PREFIX = NAME + ": "


def idp_identity(conf: Config, static_headers: Dict[str, str]) -> str:
    """Exactly what changes the IdP's answer about a token: configs that agree
    here may share answers; the HMAC of every cache key is keyed with it."""
    identity: List[Any] = [conf.introspection_url, conf.authorization_value,
                           certificate_fingerprint(conf.client_tls.cert),
                           conf.token_type_hint, static_headers]
    if conf.client_auth is not None:
        identity.append(conf.client_auth.identity())
    if conf.signed_answers is not None:   # verified answers are not plain ones
        identity.append(list(conf.signed_answers))
    return json.dumps(identity, sort_keys=True)


class SharedCache:
    """A token cache and its Redis pool, shared by every runtime of one identity."""

    def __init__(self, identity: str, store_conf: Optional[Dict[str, Any]]):
        store = RedisStore.from_config(store_conf, LOG) if store_conf else None
        # The store's connection settings (a password among them) are not key
        # material: rotating a password keeps every cached answer reachable.
        self.cache = TokenCache(key_material=identity.encode(), store=store)

    def close(self) -> None:
        if self.cache.store is not None:
            self.cache.store.close()


# Answers are shared by configs that ask the same IdP as the same client through
# the same store; decisions are still each config's own.
CACHES: "Registry[SharedCache]" = Registry(idle=8)


class Runtime:
    """Everything built once from a config: the per-request path only uses it."""

    def __init__(self, conf: Config):
        self.conf = conf
        self.tokens = TokenFinder(conf.token_source)
        templates = conf.custom_introspection_headers
        self.static_headers = {n: t.text for n, t in templates if t.plain}
        self.dynamic_headers = tuple((n, t) for n, t in templates if not t.plain)
        self.introspector = Introspector(conf, LOG)
        self.introspector.headers.update(self.static_headers)
        self.consumers = ConsumerFinder(conf.consumer_by)
        self.headers = IdentityHeaders(conf)
        identity = idp_identity(conf, self.static_headers)
        self._cache_key = (identity, json.dumps(conf.store, sort_keys=True, default=str))
        self.cache = CACHES.acquire(self._cache_key,
                                    lambda: SharedCache(identity, conf.store)).cache
        self.policy = Policy(ttl=conf.ttl, negative_ttl=conf.negative_ttl,
                             stale_if_error=conf.stale_if_error,
                             wait=conf.timeout * (conf.max_retries + 1),
                             breaker=breakers.for_endpoint(conf.introspection_url, LOG))
        self.strip = () if conf.forward_authorization else ("authorization",)
        metadata = conf.resource_metadata
        self.answers = responses.Answers(metadata.url if metadata else None,
                                         conf.requirements.scope_hint,
                                         conf.proof_of_possession_dpop)
        self.dpop: Optional[dpop.DPoPVerifier] = None
        if conf.proof_of_possession_dpop != "off":
            # Proof jtis live in the shared Redis when there is one: once per cluster.
            replays = dpop.ReplayStore(self.cache.store, ttl=conf.dpop_proof_lifetime
                                       + dpop.FUTURE_SKEW)
            self.dpop = dpop.DPoPVerifier(conf.dpop_proof_lifetime, replays)
        if self.introspector.jwt_answers is not None:
            # Each signed answer once: across the cluster when there is a Redis.
            self.introspector.jwt_answers.replays = dpop.ReplayStore(
                self.cache.store, ttl=conf.introspection_jwt_max_age + CLOCK_SKEW)

        # cache key -> (the answer, its credential headers, its credential id): pure
        # functions of one answer, so a hit computes them only once per answer.
        # Touched only on the event loop's thread.
        self._identities: LRUCache = LRUCache(maxsize=1024)

    def identity_of(self, key: str, claims: Dict[str, Any]) -> Tuple[Dict[str, str], str]:
        """The credential headers (a copy, the caller's to change) and id of ``claims``."""
        known = self._identities.get(key)
        if known is None or known[0] is not claims:   # a new answer for this token
            known = (claims, credential_headers(self.conf, claims), self.cache.credential_id(key))
            self._identities[key] = known
        return dict(known[1]), known[2]

    def close(self) -> None:
        self.introspector.close()
        self.consumers.close()
        CACHES.release(self._cache_key)


# Instances whose configs have equal plugin fields share one runtime, whatever
# keys Kong adds around them (route_id, __seq__, ...).
RUNTIMES: "Registry[Any]" = Registry(idle=16)


class Plugin(PluginInstance):
    NAME = NAME
    VERSION = VERSION
    PRIORITY = PRIORITY
    SCHEMA = schema_module.load(NAME)
    RUNTIMES = RUNTIMES
    CONFIG_ERRORS = (ConfigError,)

    @classmethod
    def build(cls, conf_only: Dict[str, Any]) -> "Runtime":
        return Runtime(Config.parse(conf_only))

    def access(self, kong) -> None:
        # An exception reaching the server is answered 500 there too; here it is
        # logged with the plugin's name and answered the same way.
        access = None
        try:
            runtime = self.runtime
            if isinstance(runtime, Unusable):
                metrics.decision(metrics.ERROR, "unusable_config")
                return _error(kong, "unusable_config", str(runtime.error), self.scope)
            access = _Access(runtime, kong, self.scope)
            access.run()
        except DeadlineExceeded:
            metrics.decision(metrics.ERROR, "deadline")
            _error(kong, "deadline_exceeded", "", self.scope, access)
        except Exception as err:  # noqa: BLE001 - the last line of defence
            metrics.decision(metrics.ERROR, "internal")
            _error(kong, "internal_error", type(err).__name__, self.scope, access)


def _exit(kong, refusal: Refusal) -> None:
    kong.response.exit(refusal.status, refusal.body, refusal.headers)


def _error(kong, reason: str, detail: str, scope: Optional[str],
           access: "Optional[_Access]" = None) -> None:
    """A 500 that is not the request's fault: one ``err`` line, then the answer."""
    refusals.report(kong, NAME, 500, reason, detail, scope=scope,
                    credential=access.credential() if access is not None else None)
    _exit(kong, responses.SERVER_ERROR)


def _pdk_read(call) -> Any:
    try:
        return call()
    except PDKException:   # Kong 2.8 raises what 3.x returns as nil
        return None


class _Access:
    """One request through the plugin."""

    found: Optional[Found] = None
    dpop_scheme = False   # the token came as "Authorization: DPoP"
    prior: Any = None     # the credential on the request before us, once asked
    asked = False

    def __init__(self, runtime: Runtime, kong, scope: Optional[str] = None):
        self.rt = runtime
        self.conf = runtime.conf
        self.kong = kong
        self.scope = scope

    def credential(self) -> Optional[str]:
        """The keyed credential id Kong would log for this token (never the token)."""
        key = getattr(self, "key", None)   # the token's cache key, once there is a token
        return self.rt.cache.credential_id(key) if key is not None else None

    def deny(self, refusal: Refusal, reason: str, detail: str = "") -> None:
        """Answer ``refusal`` (no anonymous fallback), telling why once."""
        refusals.report(self.kong, NAME, refusal.status, reason, detail,
                        level=self.conf.refusal_log_level, scope=self.scope,
                        credential=self.credential())
        _exit(self.kong, refusal)

    def run(self) -> None:
        conf, kong, answers = self.conf, self.kong, self.rt.answers
        try:
            req = self.req = IncomingRequest(kong)
            metadata = conf.resource_metadata
            # One more round trip (the path), only when metadata is configured.
            if metadata is not None and req.path == metadata.path \
                    and metadata.answers(req.method, req.path):
                # Public by design (RFC 9728): no token needed to learn how to get one.
                metrics.decision(metrics.PASSED, "resource_metadata")
                return kong.response.exit(200, metadata.document,
                                          {"Content-Type": "application/json"})
            if not conf.run_on_preflight and req.method == "OPTIONS":
                # The one pass without authentication (the guard knows it too).
                metrics.decision(metrics.PASSED, "preflight")
                return kong.service.request.set_headers(self.rt.headers.table(req.headers, {}))
            if conf.anonymous and self.prior_credential():
                # Another authentication plugin already succeeded: logical OR.
                metrics.decision(metrics.PASSED, "other_credential")
                return kong.service.request.set_headers(self.rt.headers.extras_table(
                    req.headers, keep_identity_like=self.after_client_credentials()))
            if self.rt.dpop is not None:
                self.found = dpop.find_token(req)
                self.dpop_scheme = self.found is not None
            if self.found is None:
                self.found = self.rt.tokens.find(req)
        except Uninspectable as why:
            metrics.decision(metrics.REFUSED, "malformed_request")
            return self.deny(answers.BAD_REQUEST, "malformed_request", str(why))
        except MalformedToken as why:
            if why.ambiguous:
                metrics.decision(metrics.REFUSED, "malformed_request")
                return self.deny(answers.BAD_REQUEST, "token_sent_twice", str(why))
            return self.refuse(answers.INVALID_TOKEN, "malformed_token", str(why))
        if self.found is None:
            return self.refuse(answers.MISSING_TOKEN, "missing_token")

        try:
            claims = self.introspect(self.found.token)
        except Unsendable as why:
            metrics.decision(metrics.REFUSED, "malformed_request")
            return self.deny(answers.BAD_REQUEST, "request_unsendable", str(why))
        except IntrospectionError as err:
            metrics.decision(metrics.ERROR, "idp_unavailable")
            return _error(kong, err.kind, str(err), self.scope, self)
        unusable = why_unusable(claims, time.time())
        if unusable is not None:
            return self.refuse(answers.INVALID_TOKEN, unusable)
        if self.rt.dpop is not None:
            refused = self.proof_of_possession(claims)
            if refused is not None:
                return self.refuse(*refused)
        if conf.proof_of_possession_mtls != "off":
            misfit = self.certificate_misfit(claims)
            if misfit is not None:
                return self.refuse(answers.INVALID_TOKEN, misfit)
        failed = conf.requirements.failure(claims) if conf.requirements.configured else None
        if failed in (required.ISSUER, required.AUDIENCE):
            # A token meant for another resource: not a token for this one.
            return self.refuse(answers.INVALID_TOKEN, failed + "_not_allowed")
        if failed == required.SCOPE:
            # Authorization, not authentication, failed: no anonymous fallback.
            metrics.decision(metrics.REFUSED, "insufficient_scope")
            return self.deny(answers.MISSING_SCOPE, "scope_missing", "lacks " + " ".join(
                conf.requirements.missing_scopes(claims)))
        if conf.claims is not None and not conf.claims.evaluate(claims):
            metrics.decision(metrics.REFUSED, "insufficient_scope")
            return self.deny(answers.INSUFFICIENT_SCOPE, "claims_failed", str(conf.claims))

        try:
            consumer = self.rt.consumers.for_claims(kong, claims)
        except ConsumerLookupError as err:
            metrics.decision(metrics.ERROR, "consumer_lookup")
            return _error(kong, "consumer_lookup_failed", str(err), self.scope, self)

        values, credential_id = self.rt.identity_of(self.key, claims)
        if conf.upstream_introspection_jwt_header and JWT_KEY in claims:
            # The phantom token: the upstream can verify the IdP's statement itself.
            values[conf.upstream_introspection_jwt_header] = claims[JWT_KEY]
        if consumer:
            values.update(consumer_headers(consumer))
        self.send_upstream(values)

        credential: Dict[str, Any] = {"id": credential_id,
                                      MARK: NAME}   # what the Kong-side guard looks for
        if consumer:
            credential["consumer_id"] = consumer.get("id")
        if self.asked and self.after_client_credentials():
            # Kong Enterprise ran client-credentials first: name it too, for the
            # guard of a scope holding both (no extra call: asked only when known).
            earlier = [n for n in decided(self.prior) if n != NAME]
            credential[DECIDED] = earlier
        if conf.username_claim:
            name = resolve(claims, conf.username_claim)
            if name is not MISSING and name is not None:
                credential["username"] = header_value(name)
                kong.log.set_serialize_value("authenticated_entity.username",
                                             credential["username"])
        kong.client.authenticate(consumer, credential)
        metrics.decision(metrics.ALLOWED, "active_token")

    def introspect(self, token: str) -> Dict[str, Any]:
        """The IdP's claims about ``token`` (cached). IntrospectionError when the IdP
        cannot be asked, Unsendable when this request's values cannot be sent."""
        extra = self.introspection_headers()
        context = json.dumps(extra, sort_keys=True) if extra else ""
        cache, policy = self.rt.cache, self.rt.policy
        key = self.key = cache.key(token, context)
        entry = cache.peek(key, policy)  # in process, no I/O: the hit path
        if entry is None:
            introspector = self.rt.introspector
            try:
                entry = blocking(tracing.bind(self.req.headers, cache.get), key,
                                 lambda: introspector.introspect(token, extra), policy)
            except DeadlineExceeded:
                raise IntrospectionError("no answer within the request deadline",
                                         "deadline_exceeded") from None
        return entry.claims

    def proof_of_possession(self, claims: Dict[str, Any]) -> Optional[Tuple[Refusal, str, str]]:
        """RFC 9449: the refusal (and its reason) for a DPoP-bound token without a valid
        proof, or for an unbound one where binding is required (or claimed by the DPoP
        scheme)."""
        answers, kong = self.rt.answers, self.kong
        jkt = dpop.bound_key(claims)
        if jkt is None:
            if self.conf.proof_of_possession_dpop == "strict" or self.dpop_scheme:
                return answers.DPOP_BOUND, "dpop_not_bound", ""
            return None
        if not self.dpop_scheme:   # section 7.2: a bound token sent as a bearer token
            return answers.DPOP_BOUND, "dpop_proof_missing", ""
        req = self.req
        # X-Forwarded-Proto when it comes from trusted_ips: a proxy that terminates
        # TLS before Kong leaves the client's https URL in the proof.
        scheme = kong.request.get_forwarded_scheme()
        url = "%s://%s%s" % (scheme, req.header("host") or "", req.path)
        try:
            blocking(self.rt.dpop.verify, req.headers.get("dpop"),  # type: ignore[union-attr]
                     self.found.token, jkt, req.method, url)  # type: ignore[union-attr]
        except dpop.ProofRejected as why:
            return answers.INVALID_DPOP_PROOF, "dpop_proof_invalid", str(why)
        return None

    def certificate_misfit(self, claims: Dict[str, Any]) -> Optional[str]:
        """RFC 8705: a certificate-bound token only with its certificate (one PDK call,
        only for bound tokens, or for all under ``strict``); the refusal reason, or None."""
        bound = cert_binding.bound_thumbprint(claims) is not None
        if not bound and self.conf.proof_of_possession_mtls != "strict":
            return None
        if not bound:
            return "certificate_not_bound"
        try:
            chain = self.kong.client.tls.get_full_client_certificate_chain()
        except PDKException:   # Kong 2.8 raises what 3.x returns as nil
            chain = None
        if cert_binding.matches(claims, chain):
            return None
        return "certificate_mismatch" if chain else "certificate_missing"

    def introspection_headers(self) -> Optional[Dict[str, str]]:
        """Headers for the IdP that depend on this request (they join the cache key)."""
        if not (self.conf.introspect_request or self.rt.dynamic_headers):
            return None
        req = self.req
        extra = {name: t.render(req) for name, t in self.rt.dynamic_headers}
        if self.conf.introspect_request:
            # Kong hands the path decoded: sent as templates send values (``wire``).
            extra["X-Request-Path"] = wire(req.path)
            extra["X-Request-Http-Method"] = wire(req.method)
        return extra

    def prior_credential(self) -> Any:
        """``kong.client.get_credential()`` as it stood before us, asked at most once."""
        if not self.asked:
            self.asked = True
            self.prior = _pdk_read(self.kong.client.get_credential)
        return self.prior

    def after_client_credentials(self) -> bool:
        """oauth2-client-credentials let this request through before us (Kong Enterprise's
        dynamic ordering): the Authorization and X-Consumer-*/X-Credential-* headers are
        its own (it removed the client's copies in every spelling)."""
        prior = self.prior_credential()
        return isinstance(prior, dict) and prior.get(MARK) == CLIENT_CREDENTIALS

    def refuse(self, refusal: Refusal, reason: str, detail: str = "") -> None:
        """A failed authentication: ``refusal``, or the anonymous consumer."""
        conf, kong = self.conf, self.kong
        if not conf.anonymous:
            metrics.decision(metrics.REFUSED, metrics.refusal_reason(refusal))
            return self.deny(refusal, reason, detail)
        consumer = self.rt.consumers.by_id_or_username(kong, conf.anonymous)
        if not consumer:
            metrics.decision(metrics.ERROR, "anonymous_not_found")
            return _error(kong, "anonymous_consumer_not_found",
                          "anonymous %r (after %s)" % (conf.anonymous, reason), self.scope, self)
        self.send_upstream(consumer_headers(consumer, anonymous=True))
        kong.client.authenticate(consumer, None)
        metrics.decision(metrics.ANONYMOUS, metrics.refusal_reason(refusal))

    def send_upstream(self, values: Dict[str, str]) -> None:
        """One set_headers call (identity headers, hidden token), then, only when the
        token must be hidden from the query or body, one targeted write."""
        kong, req = self.kong, self.req
        found = self.found if self.conf.hide_credentials else None
        remove = list(self.rt.strip)
        if found is not None and found.where == "header":
            remove.append(found.name)
        elif found is not None and found.where == "cookie":
            rest = "; ".join(filter(None, (without_cookie(h, found.name)
                                           for h in req.headers.get("cookie", []))))
            values = dict(values, Cookie=rest) if rest else values
            if not rest:
                remove.append("cookie")
        # Headers another of our plugins set before us are not the client's: ask
        # Kong who authenticated (one round trip) only when we would remove one.
        display = self.rt.headers.display
        if (any(n.lower() == "authorization" for n in remove) or any(identity_like(n) and normalized(n) not in display
                                             for n in req.headers)) \
                and self.after_client_credentials():
            remove = [n for n in remove if n.lower() != "authorization"]
            keep = True
        else:
            keep = False
        kong.service.request.set_headers(self.rt.headers.table(req.headers, values, remove,
                                                               keep_identity_like=keep))
        if found is not None and found.where == "query":
            # Removes every copy of that one argument; the others, seen or not, stay.
            # Every copy of that one argument goes, the rest byte for byte: the raw
            # query is uncapped, and clear_query_arg is not on Kong 3.4.
            raw = _pdk_read(kong.request.get_raw_query)
            if isinstance(raw, str) and raw:
                rest_query = body.without_field(raw.encode("utf-8", "surrogateescape"),
                                                body.FORM, found.name)
                if rest_query is not None:
                    kong.service.request.set_raw_query(
                        rest_query.decode("utf-8", "surrogateescape"))
        elif found is not None and found.where == "body":
            raw = req.raw_body
            rest_body = body.without_field(raw, req.header("content-type"), found.name) \
                if raw else None
            if rest_body is not None:
                kong.service.request.set_raw_body(rest_body)
