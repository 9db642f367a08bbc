"""HTTP to the authorization server: the token request, its metadata, its keys.

One pooled ``httpclient.HTTPClient`` per config, with the config's TLS: every
exchange ends within ``timeout`` and the request's deadline, whatever the
server drips, and answers are capped in size. Connection errors, timeouts and
5xx answers are retried ``max_retries`` times with a short jittered backoff,
4xx answers never.

Error texts are safe to log: they never hold credentials, tokens or bodies.
"""

import base64
import json
import random
import time
from typing import Any, Dict, NamedTuple, Optional
from urllib.parse import quote, urlsplit

from ..concurrency import Deadline
from ..idp.httpclient import HTTPClient, HTTPFailure, Reply
from .config import Config

_BACKOFF_BASE = 0.05
_BACKOFF_MAX = 1.0
_MAX_BODY = 1 << 20   # a token answer or a key set larger than this is garbage


class ServerError(Exception):
    """The authorization server could not be asked or gave no usable answer."""


class ClientRejected(Exception):
    """The server refused the client (4xx). ``code`` is its OAuth ``error`` member."""

    def __init__(self, status: int, code: str):
        super().__init__("token endpoint refused the client: HTTP %d %s" % (status, code))
        self.status = status
        self.code = code


class Credentials(NamedTuple):
    """Client credentials as RFC 6749 section 2.3.1 sends them: ``basic`` is the
    base64 of ``urlencode(id):urlencode(secret)``."""
    client_id: str
    basic: str

    @classmethod
    def configured(cls, client_id: str, client_secret: str) -> "Credentials":
        raw = "%s:%s" % (quote(client_id, safe=""), quote(client_secret, safe=""))
        return cls(client_id, base64.b64encode(raw.encode()).decode("ascii"))

    def __repr__(self) -> str:   # never the secret
        return "Credentials(%r)" % self.client_id


class Issued(NamedTuple):
    access_token: str
    token_type: str


class AuthServer:
    def __init__(self, conf: Config, log: Any = None):
        self.conf = conf
        self.http = HTTPClient.for_tls(conf.tls, prefix="oauth2-client-credentials-tls-",
                                       option="client_config.tls",
                                       what="the authorization server", log=log)

    def close(self) -> None:
        self.http.close()

    # -- the three calls ------------------------------------------------------

    def request_token(self, creds: Credentials, deadline: Optional[Deadline]) -> Issued:
        conf = self.conf
        form = {"grant_type": "client_credentials", conf.audience_param: conf.audience}
        headers = {"Authorization": "Basic " + creds.basic, "Accept": "application/json",
                   "Content-Type": "application/x-www-form-urlencoded"}
        response = self._send("POST", conf.url, "token endpoint", deadline,
                              data=form, headers=headers)
        body = _json(response)
        if 400 <= response.status < 500:
            code = body.get("error") if isinstance(body, dict) else None
            raise ClientRejected(response.status,
                                 code if isinstance(code, str) and code.isprintable() else "")
        if response.status != 200 or not isinstance(body, dict):
            raise ServerError("token endpoint answered HTTP %d%s" % (
                response.status, "" if isinstance(body, dict) else " without a JSON object"))
        token, kind = body.get("access_token"), body.get("token_type", "Bearer")
        if not isinstance(token, str) or not token:
            raise ServerError("token endpoint answered without an access_token")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise ServerError("token endpoint issued a token that is not a Bearer token")
        return Issued(token, "Bearer")

    def metadata(self, deadline: Optional[Deadline]) -> Dict[str, Any]:
        """The server's metadata (OpenID discovery or RFC 8414), checked to be the
        server that ``url`` belongs to."""
        conf = self.conf
        failures = []
        for where in _metadata_urls(conf.issuer or conf.url, from_issuer=bool(conf.issuer)):
            try:
                response = self._send("GET", where, "metadata", deadline, retry=False,
                                      headers={"Accept": "application/json"})
            except ServerError as err:
                failures.append(str(err))
                continue
            meta = _json(response)
            if response.status != 200 or not isinstance(meta, dict):
                failures.append("metadata at %s: HTTP %d" % (where, response.status))
                continue
            if conf.issuer and meta.get("issuer") != conf.issuer:
                raise ServerError("metadata at %s names another issuer" % where)
            if not conf.issuer and meta.get("token_endpoint") != conf.url:
                raise ServerError("metadata at %s names another token endpoint; set "
                                  "config.issuer" % where)
            if not isinstance(meta.get("issuer"), str):
                raise ServerError("metadata at %s has no issuer" % where)
            return meta
        raise ServerError("no server metadata found (%s)" % "; ".join(failures))

    def jwks(self, url: str, deadline: Optional[Deadline]) -> Dict[str, Any]:
        response = self._send("GET", url, "JWKS", deadline,
                              headers={"Accept": "application/json"})
        body = _json(response)
        if response.status != 200 or not isinstance(body, dict) \
                or not isinstance(body.get("keys"), list):
            raise ServerError("JWKS at %s: HTTP %d, no key set" % (url, response.status))
        return body

    # -- plumbing -------------------------------------------------------------

    def _send(self, method: str, url: str, what: str, deadline: Optional[Deadline],
              retry: bool = True, **kwargs: Any) -> Reply:
        # HTTPClient spends from current_deadline(): the caller's scope sets it.
        attempt = 0
        while True:
            try:
                reply = self.http.request(method, url, timeout=self.conf.timeout,
                                          max_bytes=_MAX_BODY, **kwargs)
            except HTTPFailure as err:
                failure = str(err)
            else:
                if reply.status < 500:
                    return reply
                failure = "answered HTTP %d" % reply.status
            if not retry or attempt >= self.conf.max_retries:
                raise ServerError("%s %s" % (what, failure))
            pause = min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.0)
            if deadline is not None and deadline.remaining() <= pause:
                raise ServerError("%s %s; no time left to retry" % (what, failure))
            time.sleep(pause)
            attempt += 1


def _json(reply: Reply) -> Any:
    """The answer's JSON, or None."""
    try:
        return json.loads(reply.body)
    except ValueError:
        return None


def _metadata_urls(base: str, from_issuer: bool):
    """Where metadata may be: OpenID Connect Discovery appends the well-known
    suffix to the issuer, RFC 8414 inserts it between host and path."""
    parts = urlsplit(base)
    origin = "%s://%s" % (parts.scheme, parts.netloc)
    path = parts.path.rstrip("/") if from_issuer else ""
    yield origin + path + "/.well-known/openid-configuration"
    yield origin + "/.well-known/oauth-authorization-server" + path
