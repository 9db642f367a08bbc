"""Asking the authorization server about a token (RFC 7662).

One pooled ``requests.Session`` per plugin instance: connections are reused
for ``keepalive``; ``timeout`` bounds connecting and each read; failures are
retried ``max_retries`` times with backoff, only when the server gave no
answer (connection error, timeout) or a 5xx.
"""

import atexit
import os
import random
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, NamedTuple, Optional

import requests
from requests.adapters import HTTPAdapter

from .config import Config

_BACKOFF_BASE = 0.05
_BACKOFF_MAX = 1.0


class IntrospectionError(Exception):
    """The server could not be asked or gave no usable answer.

    The message is safe to log: it never holds the token, the credentials or
    the server's body.
    """


class Answer(NamedTuple):
    claims: Dict[str, Any]
    cacheable: bool  # False when the server said Cache-Control: no-store


def _private_files(tls) -> Dict[str, str]:
    """PEM strings from the config, written where only this process can read them."""
    folder = tempfile.mkdtemp(prefix="oauth2-introspection-tls-")  # mode 0700
    atexit.register(shutil.rmtree, folder, True)
    paths = {}
    for name in ("ca", "cert", "key"):
        pem = getattr(tls, name)
        if pem:
            path = os.path.join(folder, name + ".pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(pem)
            paths[name] = path
    paths["folder"] = folder
    return paths


class Introspector:
    def __init__(self, conf: Config, log=None):
        self.url = conf.introspection_url
        self.timeout = (conf.timeout, conf.timeout)
        self.max_retries = conf.max_retries
        self.token_type_hint = conf.token_type_hint
        self.keepalive = conf.keepalive
        self.headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "Authorization": conf.authorization_value,
        }
        if conf.keepalive <= 0:
            self.headers["Connection"] = "close"

        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or netrc from the environment
        self._adapter = HTTPAdapter(pool_connections=1, pool_maxsize=64, max_retries=0)
        self.session.mount("http://", self._adapter)
        self.session.mount("https://", self._adapter)
        self._files: Optional[Dict[str, str]] = None
        tls = conf.client_tls
        if tls.ca or tls.cert:
            self._files = _private_files(tls)
        if tls.insecure_skip_verify:
            self.session.verify = False
            if log:
                log.warn("client_tls.insecure_skip_verify is on: the introspection "
                         "endpoint's certificate is not verified")
        elif self._files and "ca" in self._files:
            self.session.verify = self._files["ca"]
        if self._files and "cert" in self._files:
            self.session.cert = (self._files["cert"], self._files["key"])
        self._last_used = time.monotonic()
        self._idle_lock = threading.Lock()

    def introspect(self, token: str, extra_headers: Optional[Dict[str, str]] = None) -> Answer:
        form = {"token": token}
        if self.token_type_hint:
            form["token_type_hint"] = self.token_type_hint
        headers = dict(self.headers, **extra_headers) if extra_headers else self.headers
        self._drop_idle_connections()
        attempt = 0
        while True:
            try:
                response = self.session.post(self.url, data=form, headers=headers,
                                             timeout=self.timeout, allow_redirects=False)
            except requests.Timeout:
                failure = "timed out"
            except requests.RequestException as err:
                failure = "could not connect (%s)" % type(err).__name__
            else:
                if response.status_code < 500:
                    return self._answer(response)
                failure = "answered HTTP %d" % response.status_code
                response.close()
            if attempt >= self.max_retries:
                raise IntrospectionError("introspection endpoint " + failure)
            time.sleep(min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** attempt) * random.uniform(0.5, 1.0))
            attempt += 1

    @staticmethod
    def _answer(response) -> Answer:
        if response.status_code != 200:
            raise IntrospectionError("introspection endpoint answered HTTP %d"
                                     % response.status_code)
        try:
            claims = response.json()
        except ValueError:
            raise IntrospectionError("introspection endpoint answered with invalid JSON") from None
        if not isinstance(claims, dict):
            raise IntrospectionError("introspection endpoint answered JSON that is not an object")
        no_store = "no-store" in response.headers.get("Cache-Control", "").lower()
        return Answer(claims, not no_store)

    def _drop_idle_connections(self):
        # urllib3 keeps idle connections forever; honour ``keepalive`` ourselves.
        now = time.monotonic()
        with self._idle_lock:
            idle = now - self._last_used
            self._last_used = now
        if self.keepalive > 0 and idle > self.keepalive:
            self._adapter.poolmanager.clear()
