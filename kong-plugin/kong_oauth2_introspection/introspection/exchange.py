"""Asking the authorization server about a token (RFC 7662).

One pooled HTTP client per IdP identity. Each attempt is bounded in total time
by ``timeout`` and every attempt, retry and backoff by the request's deadline
(``concurrency``); answers larger than ``MAX_ANSWER_BYTES`` are refused while
they are read. Failures are retried ``max_retries`` times with backoff, only
when the server gave no answer (connection error, timeout) or a 5xx.
"""

import hashlib
import json
import math
import random
import threading
import time
from typing import Any, Dict, Optional

from ..ops import metrics
from ..concurrency import DeadlineExceeded, current_deadline
from .config import BACKOFF_BASE, BACKOFF_MAX, Config, ConfigError
from ..idp.httpclient import HTTPClient, HTTPFailure, Unsendable, check_sendable
from .jwt_answers import MEDIA_TYPE, AnswerRejected, JWTAnswers
from ..idp.preauth import PreAuthorization, PreAuthorizationError
from ..idp.answer import Answer, IntrospectionError

MAX_ANSWER_BYTES = 1024 * 1024
# Seconds another clock (the IdP's) may run ahead of ours: nbf, a signed answer's iat.
CLOCK_SKEW = 60


# A JSON answer nested deeper than this is not an introspection answer (RFC 7662
# answers are flat; real ones nest a few levels): refused before anything walks it.
MAX_ANSWER_DEPTH = 32
_HTTP_KINDS = {"refused": "idp_refused", "timed_out": "idp_timed_out"}


def parse_answer(body: bytes) -> Dict[str, Any]:
    """The JSON object of an answer; IntrospectionError for anything else.

    NaN, Infinity and numbers too large for a float are kept (as non-finite
    floats): ``usable`` refuses them where they matter (exp, nbf) and they are
    harmless elsewhere."""
    try:
        claims = json.loads(body)
    except (ValueError, RecursionError):
        raise IntrospectionError("introspection endpoint answered with invalid JSON",
                                 "idp_answer_invalid") from None
    if not isinstance(claims, dict):
        raise IntrospectionError("introspection endpoint answered JSON that is not an object",
                                 "idp_answer_invalid")
    check_answer(claims)
    return claims


def check_answer(claims: Any) -> None:
    """IntrospectionError for JSON nothing downstream can carry: nested deeper than
    ``MAX_ANSWER_DEPTH``, or a string (key or value) holding a lone surrogate
    (``"\\ud800"`` is valid JSON, but no UTF-8 and so no header, log or PDK call
    can hold it). Iterative: a deep answer cannot exhaust the stack here."""
    todo = [(claims, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, str):
            items: Any = ()
            strings: Any = (value,)
        elif isinstance(value, dict):
            items, strings = value.values(), value.keys()
        elif isinstance(value, list):
            items, strings = value, ()
        else:
            continue
        if depth > MAX_ANSWER_DEPTH and not isinstance(value, str):
            raise IntrospectionError("introspection endpoint answered JSON nested deeper "
                                     "than %d levels" % MAX_ANSWER_DEPTH, "idp_answer_invalid")
        for text in strings:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise IntrospectionError("introspection endpoint answered a string with a "
                                             "lone surrogate (not Unicode text)",
                                             "idp_answer_invalid") from None
        todo.extend((item, depth + 1) for item in items)


def _time_claim(claims: Dict[str, Any], name: str):
    """A NumericDate claim: None when absent, False when present but not a sane number."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value


def why_unusable(claims: Dict[str, Any], now: float) -> Optional[str]:
    """None when an answer says "this token may be used now" (judged at decision
    time), else the refusal reason.

    ``active`` must be the JSON ``true``; ``exp`` and ``nbf`` are optional (RFC
    7662) but, when present, must be numbers that allow ``now``. ``iat`` is only
    informational and never refuses a token.
    """
    if claims.get("active") is not True:
        return "token_inactive"
    exp = _time_claim(claims, "exp")
    nbf = _time_claim(claims, "nbf")
    if exp is False or nbf is False:
        return "token_time_claims_invalid"
    if exp is not None and exp <= now:
        return "token_expired"
    if nbf is not None and nbf > now + CLOCK_SKEW:
        return "token_not_yet_valid"
    return None


def usable(claims: Dict[str, Any], now: float) -> bool:
    return why_unusable(claims, now) is None


def certificate_fingerprint(pem: Optional[str]) -> str:
    """What identifies a client certificate in the cache identity (not the key)."""
    return hashlib.sha256(pem.encode()).hexdigest() if pem else ""


class Introspector:
    def __init__(self, conf: Config, log=None):
        self.url = conf.introspection_url
        self.timeout = conf.timeout
        self.max_retries = conf.max_retries
        self.token_type_hint = conf.token_type_hint
        self.keepalive = conf.keepalive
        self.headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        if conf.authorization_value:
            self.headers["Authorization"] = conf.authorization_value
        self.client_auth = conf.client_auth
        if conf.keepalive <= 0:
            self.headers["Connection"] = "close"
        try:   # what the config sends on every call: refused once, here
            check_sendable(self.headers)
        except Unsendable as err:
            raise ConfigError("config.authorization_value", str(err)) from None

        self.http = HTTPClient.for_tls(conf.client_tls, prefix="oauth2-introspection-tls-",
                                       option="client_tls", what="the introspection endpoint",
                                       log=log)
        self.pre_authorization: Optional[PreAuthorization] = None
        if conf.pre_authorization is not None and conf.client_auth is not None:
            token_url, scope = conf.pre_authorization
            self.pre_authorization = PreAuthorization(token_url, scope, conf.client_auth,
                                                      self.http, conf.timeout)
        self.jwt_answers: Optional[JWTAnswers] = None
        if conf.signed_answers is not None:
            # RFC 9701: ask for signed answers and believe nothing else.
            self.headers["Accept"] = MEDIA_TYPE
            issuer, audience, jwks_url = conf.signed_answers
            self.jwt_answers = JWTAnswers(issuer, audience, jwks_url, self._get, log,
                                          max_age=conf.introspection_jwt_max_age)
        self._last_used = time.monotonic()
        self._idle_lock = threading.Lock()

    def introspect(self, token: str, extra_headers: Optional[Dict[str, str]] = None) -> Answer:
        form = {"token": token}
        if self.token_type_hint:
            form["token_type_hint"] = self.token_type_hint
        headers = dict(self.headers, **extra_headers) if extra_headers else self.headers
        if self.client_auth is not None:
            headers = dict(headers)
        renewed = False
        self._drop_idle_connections()
        deadline = current_deadline()
        attempt = 0
        while True:
            bearer = None
            if self.pre_authorization is not None:
                try:
                    bearer = self.pre_authorization.token()
                except PreAuthorizationError as err:
                    raise IntrospectionError("pre-authorization: %s" % err,
                                             "idp_pre_authorization") from None
                headers["Authorization"] = "Bearer " + bearer
            elif self.client_auth is not None:
                # Per attempt: an assertion's jti may be used only once.
                self.client_auth.apply(self.url, form, headers)
            try:
                reply = metrics.idp_request(self.http.request, "POST", self.url, data=form,
                                            headers=headers,
                                            timeout=self.timeout, max_bytes=MAX_ANSWER_BYTES)
            except DeadlineExceeded:
                raise IntrospectionError("introspection endpoint did not answer within "
                                         "the request deadline", "idp_timed_out") from None
            except HTTPFailure as err:
                failure, kind = str(err), _HTTP_KINDS.get(err.kind, "idp_unreachable")
            else:
                if reply.status == 401 and bearer is not None and not renewed:
                    # Revoked or lapsed early: drop it, fetch one new token, ask again once.
                    self.pre_authorization.rejected(bearer)  # type: ignore[union-attr]
                    renewed = True
                    continue
                if reply.status < 500:
                    return metrics.idp_answer(self.url, self._answer, reply)
                failure, kind = "answered HTTP %d" % reply.status, "idp_error"
            if attempt >= self.max_retries:
                raise IntrospectionError("introspection endpoint " + failure, kind)
            pause = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.0)
            if deadline is not None and deadline.remaining() <= pause:
                raise IntrospectionError("introspection endpoint %s; no time left to retry"
                                         % failure, kind)
            time.sleep(pause)
            attempt += 1

    def _get(self, url: str, headers: Dict[str, str], max_bytes: int):
        reply = self.http.request("GET", url, headers=headers, timeout=self.timeout,
                                  max_bytes=max_bytes)
        return reply.status, reply.body

    def _answer(self, reply) -> Answer:
        if reply.status != 200:
            raise IntrospectionError("introspection endpoint answered HTTP %d" % reply.status)
        if self.jwt_answers is None:
            claims = parse_answer(reply.body)
        else:
            try:
                claims = self.jwt_answers.claims(reply.body)
            except (AnswerRejected, HTTPFailure) as err:
                # A bad signature is the server's failure, never an inactive token.
                raise IntrospectionError("introspection endpoint: %s" % err,
                                         "idp_answer_invalid") from None
            check_answer(claims)
        cache_control = {k.lower(): v for k, v in reply.headers.items()}.get("cache-control", "")
        return Answer(claims, "no-store" not in cache_control.lower())

    def _drop_idle_connections(self):
        # urllib3 keeps idle connections forever; honour ``keepalive`` ourselves.
        now = time.monotonic()
        with self._idle_lock:
            idle = now - self._last_used
            self._last_used = now
        if self.keepalive > 0 and idle > self.keepalive:
            self.http.drop_idle()

    def close(self) -> None:
        self.http.close()
