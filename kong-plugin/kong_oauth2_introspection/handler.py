"""The plugin's access phase: find the token, ask the IdP (or the cache),
check the answer, tell the upstream who the caller is.

kong-pdk builds one ``Plugin`` per plugin config (StartInstance) and calls
``access`` for every request, on a thread of its own.
"""

import hashlib
import json
import sys
import threading
from typing import Any, Dict, Optional

from cachetools import LRUCache

from . import NAME, responses
from .cache import Policy, TokenCache
from .claims import MISSING, resolve
from .config import Config, ConfigError
from .consumers import ConsumerFinder, ConsumerLookupError
from .introspection import IntrospectionError, Introspector
from .request import IncomingRequest
from .responses import Refusal
from .store import RedisStore
from .tokens import MalformedToken, TokenFinder, without_cookie
from .upstream import consumer_headers, credential_headers, drop_spoofed, header_value

LOG_PREFIX = NAME + ": "
# Guards both registries below; re-entered when a new runtime looks up its cache.
_RUNTIMES_LOCK = threading.RLock()


class StderrLog:
    """Log lines written before any request exists; Kong copies them to its error log."""

    def _write(self, level, msg):
        print(f"[{NAME}] {level}: {msg}", file=sys.stderr, flush=True)

    def info(self, msg):
        self._write("info", msg)

    def warn(self, msg):
        self._write("warn", msg)

    def err(self, msg):
        self._write("error", msg)


class Runtime:
    """Everything built once from a config: the per-request path only uses it."""

    def __init__(self, conf: Config, log):
        self.conf = conf
        self.tokens = TokenFinder(conf.token_source)
        templates = conf.custom_introspection_headers
        self.static_headers = {n: t.text for n, t in templates if t.plain}
        self.dynamic_headers = tuple((n, t) for n, t in templates if not t.plain)
        self.introspector = Introspector(conf, log)
        self.introspector.headers.update(self.static_headers)
        self.consumers = ConsumerFinder(conf.consumer_by)
        self.cache = _shared_cache(conf, self.static_headers, log)
        self.policy = Policy(ttl=conf.ttl, negative_ttl=conf.negative_ttl,
                             stale_if_error=conf.stale_if_error,
                             wait=conf.timeout * (conf.max_retries + 1))


# Configs that ask the same IdP as the same client (and share a store) share one
# cache: what the IdP said about a token does not depend on the route. Decisions
# are still each config's own.
_CACHES: Dict[str, TokenCache] = {}


def _shared_cache(conf: Config, static_headers, log) -> TokenCache:
    identity = json.dumps([conf.introspection_url, conf.authorization_value,
                           conf.token_type_hint, static_headers, conf.store],
                          sort_keys=True, default=str)
    with _RUNTIMES_LOCK:
        cache = _CACHES.get(identity)
        if cache is None:
            store = RedisStore.from_config(conf.store, log) if conf.store else None
            cache = _CACHES[identity] = TokenCache(key_material=identity.encode(), store=store)
    return cache


# Instances with the same config share one runtime. In kong-pdk's
# multiprocessing mode the Plugin is pickled for every event; the registry makes each
# worker process build a runtime once per config, not once per request.
_RUNTIMES: LRUCache = LRUCache(maxsize=256)


def _runtime_for(raw: Any):
    """A Runtime for ``raw``, or the ConfigError that makes it unusable."""
    conf_only = {k: v for k, v in raw.items() if not k.startswith("__")} \
        if isinstance(raw, dict) else raw
    ident = hashlib.sha256(json.dumps(conf_only, sort_keys=True, default=str).encode()).hexdigest()
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(ident)
        if runtime is None:
            log = StderrLog()
            try:
                runtime = Runtime(Config.parse(conf_only), log)
            except ConfigError as err:
                runtime = err
            except Exception as err:  # noqa: BLE001 - e.g. unreadable PEM; its text may hold secrets
                runtime = ConfigError("config", "cannot be used (%s)" % type(err).__name__)
            if isinstance(runtime, ConfigError):
                log.err("unusable config, every request under it gets 500: %s" % runtime)
            _RUNTIMES[ident] = runtime
    return runtime


class Plugin:
    def __init__(self, config):
        self._raw = config
        self._runtime = _runtime_for(config)

    def __getstate__(self):
        return {"raw": self._raw}

    def __setstate__(self, state):
        self.__init__(state["raw"])

    def access(self, kong):
        # An exception reaching kong-pdk would leave Kong's RPC unanswered, and Kong
        # then lets the request through: every failure must end in a response.
        try:
            runtime = self._runtime
            if isinstance(runtime, ConfigError):
                kong.log.err(LOG_PREFIX + "unusable config: %s" % runtime)
                return _exit(kong, responses.SERVER_ERROR)
            _Access(runtime, kong).run()
        except Exception as err:  # noqa: BLE001 - the last line of defence
            try:
                kong.log.err(LOG_PREFIX + "internal error: %s" % type(err).__name__)
                _exit(kong, responses.SERVER_ERROR)
            except Exception:  # noqa: BLE001 - Kong is gone; nothing left to tell
                pass


def _exit(kong, refusal: Refusal):
    kong.response.exit(refusal.status, refusal.body, refusal.headers)


class _Access:
    """One request through the plugin."""

    def __init__(self, runtime: Runtime, kong):
        self.rt = runtime
        self.conf = runtime.conf
        self.kong = kong

    def run(self):
        conf, kong = self.conf, self.kong
        req = self.req = IncomingRequest(kong)
        if not conf.run_on_preflight and req.method == "OPTIONS":
            return
        if conf.anonymous and kong.client.get_credential():
            return  # another auth plugin already succeeded: logical OR

        try:
            self.found = self.rt.tokens.find(req)
        except MalformedToken as why:
            kong.log.info(LOG_PREFIX + "unusable token: %s" % why)
            self.found = None
            return self.refuse(responses.MISSING_TOKEN)
        if self.found is None:
            return self.refuse(responses.MISSING_TOKEN)

        extra = self.introspection_headers()
        context = json.dumps(extra, sort_keys=True) if extra else ""
        key = self.rt.cache.key(self.found.token, context)
        token = self.found.token
        try:
            entry = self.rt.cache.get(key, lambda: self.rt.introspector.introspect(token, extra),
                                      self.rt.policy)
        except IntrospectionError as err:
            kong.log.err(LOG_PREFIX + str(err))
            return _exit(kong, responses.SERVER_ERROR)

        claims = entry.claims
        if not entry.active:
            return self.refuse(responses.INVALID_TOKEN)
        if conf.claims is not None and not conf.claims.evaluate(claims):
            # Authorization, not authentication, failed: no anonymous fallback.
            return _exit(kong, responses.INSUFFICIENT_SCOPE)

        try:
            consumer = self.rt.consumers.for_claims(kong, claims)
        except ConsumerLookupError as err:
            kong.log.err(LOG_PREFIX + str(err))
            return _exit(kong, responses.SERVER_ERROR)

        headers = credential_headers(conf, claims)
        if consumer:
            headers.update(consumer_headers(consumer))
        self.send_upstream(headers, strip_authorization=not conf.forward_authorization)

        credential: Dict[str, Any] = {"id": self.rt.cache.credential_id(key)}
        if consumer:
            credential["consumer_id"] = consumer.get("id")
        if conf.username_claim:
            name = resolve(claims, conf.username_claim)
            if name is not MISSING and name is not None:
                credential["username"] = header_value(name)
                kong.log.set_serialize_value("authenticated_entity.username",
                                             credential["username"])
        kong.client.authenticate(consumer, credential)

    def introspection_headers(self) -> Optional[Dict[str, str]]:
        """Headers for the IdP that depend on this request (they join the cache key)."""
        if not (self.conf.introspect_request or self.rt.dynamic_headers):
            return None
        req = self.req
        extra = {name: t.render(req) for name, t in self.rt.dynamic_headers}
        if self.conf.introspect_request:
            extra["X-Request-Path"] = req.path
            extra["X-Request-Http-Method"] = req.method
        return extra

    def refuse(self, refusal: Refusal):
        conf, kong = self.conf, self.kong
        if not conf.anonymous:
            return _exit(kong, refusal)
        consumer = self.rt.consumers.by_id_or_username(kong, conf.anonymous)
        if not consumer:
            kong.log.err(LOG_PREFIX + "anonymous consumer %r not found" % conf.anonymous)
            return _exit(kong, responses.SERVER_ERROR)
        self.send_upstream(consumer_headers(consumer, anonymous=True))
        kong.client.authenticate(consumer, None)

    def send_upstream(self, headers, strip_authorization=False):
        """One set_headers call: our headers, removals of spoofed ones, hidden token."""
        kong, found = self.kong, self.found
        extra = ["authorization"] if strip_authorization else []
        hide = found is not None and self.conf.hide_credentials
        if hide and found.where == "header":
            extra.append(found.name)
        elif hide and found.where == "cookie":
            rest = "; ".join(filter(None, (without_cookie(h, found.name)
                                           for h in self.req.headers.get("cookie", []))))
            headers["Cookie"] = rest if rest else []
        kong.service.request.set_headers(drop_spoofed(self.conf, self.req.headers, headers, extra))
        if hide and found.where == "query":
            query = {k: v for k, v in self.req.query.items() if k != found.name}
            kong.service.request.set_query(query)
        elif hide and found.where == "body":
            body = {k: v for k, v in self.req.body.items() if k != found.name}
            kong.service.request.set_body(body)
