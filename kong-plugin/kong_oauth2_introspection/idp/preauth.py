"""Pre-authorization: the introspection call carries a bearer token the plugin got
from the authorization server's token endpoint (client credentials grant,
authenticated with ``introspection_endpoint_auth_method``), instead of client
credentials.

One token per config, shared by every request: kept until ``MARGIN`` before it
expires; fetched by one thread at a time (the others wait and take its token:
single flight); dropped when the introspection endpoint answers 401 to it, so
the next caller fetches a new one. Runs on the cache's worker threads: it may
block. The token is a secret: never logged, never in an error text.
"""

import json
import threading
import time
from typing import Any, Dict, Optional, Tuple

from .client_auth import ClientAuth
from ..concurrency import current_deadline
from .httpclient import HTTPClient, HTTPFailure

MARGIN = 30.0            # seconds before expiry a token is no longer used
DEFAULT_LIFETIME = 300.0  # a token answer without expires_in
MAX_ANSWER_BYTES = 64 * 1024


class PreAuthorizationError(Exception):
    """No token could be had; the text is safe to log."""


class PreAuthorization:
    def __init__(self, token_url: str, scope: Optional[str], client: ClientAuth,
                 http: HTTPClient, timeout: float):
        self.token_url = token_url
        self.scope = scope
        self.client = client
        self.http = http
        self.timeout = timeout
        self._lock = threading.Lock()
        self._token: Optional[Tuple[str, float]] = None   # (token, usable until, monotonic)
        self.fetches = 0

    def token(self) -> str:
        """A usable token: the kept one, or a new one (one fetch at a time)."""
        kept = self._token
        if kept is not None and time.monotonic() < kept[1]:
            return kept[0]
        deadline = current_deadline()
        wait = deadline.remaining() if deadline is not None else self.timeout
        if not self._lock.acquire(timeout=max(0.0, wait)):
            raise PreAuthorizationError("no pre-authorization token within the deadline")
        try:
            kept = self._token
            if kept is not None and time.monotonic() < kept[1]:
                return kept[0]   # another thread fetched it while we waited
            self._token = self._fetch()
            return self._token[0]
        finally:
            self._lock.release()

    def rejected(self, token: str) -> None:
        """The introspection endpoint answered 401 to ``token``: never use it again."""
        with self._lock:
            if self._token is not None and self._token[0] == token:
                self._token = None

    def _fetch(self) -> Tuple[str, float]:
        form: Dict[str, str] = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Accept": "application/json"}
        self.client.apply(self.token_url, form, headers)
        self.fetches += 1
        try:
            reply = self.http.request("POST", self.token_url, data=form, headers=headers,
                                      timeout=self.timeout, max_bytes=MAX_ANSWER_BYTES)
        except HTTPFailure as err:
            raise PreAuthorizationError("token endpoint %s" % err) from None
        if reply.status != 200:
            raise PreAuthorizationError("token endpoint answered HTTP %d" % reply.status)
        answer: Any
        try:
            answer = json.loads(reply.body)
        except ValueError:
            answer = None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token \
                or str(answer.get("token_type", "")).lower() != "bearer":
            raise PreAuthorizationError("token endpoint gave no Bearer access_token")
        lifetime = answer.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_LIFETIME
        # Stop using it a little before it expires: never send a token that lapses on the way.
        usable_for = max(0.0, lifetime - min(MARGIN, lifetime / 10))
        return token, time.monotonic() + usable_for
