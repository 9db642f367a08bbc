"""Finding the Kong consumer an introspection answer belongs to.

``consumer_by=username``: the answer's ``username`` is a consumer's username,
found with ``kong.client.load_consumer``. ``consumer_by=client_id``: the
answer's ``client_id`` is a consumer's ``custom_id``; the PDK cannot search by
``custom_id``, so Kong's Admin API is asked (it answers in DB-less mode too).

A Python plugin hears no consumer events, so lookups are remembered only
briefly: a consumer created after a miss is found within NEGATIVE_TTL seconds.
"""

import json
import os
import threading
from typing import Any, Dict, Optional
from urllib.parse import quote

from cachetools import TTLCache
from kong_pdk.exception import PDKException

from ..concurrency import DeadlineExceeded, blocking
from ..idp.httpclient import HTTPClient, HTTPFailure

POSITIVE_TTL = 10.0
NEGATIVE_TTL = 2.0
ADMIN_TIMEOUT = 2.0
MAX_ADMIN_ANSWER = 1024 * 1024
_MISSING = object()


class ConsumerLookupError(Exception):
    """Kong could not be asked; the message is safe to log."""


class _Memo:
    """A thread-safe memo with separate lifetimes for hits and misses."""

    def __init__(self):
        self._hits = TTLCache(maxsize=10000, ttl=POSITIVE_TTL)
        self._misses = TTLCache(maxsize=10000, ttl=NEGATIVE_TTL)
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._misses:
                return None
            return self._hits.get(key, _MISSING)

    def put(self, key, consumer):
        with self._lock:
            (self._hits if consumer else self._misses)[key] = consumer


class ConsumerFinder:
    def __init__(self, consumer_by: str, admin_url: Optional[str] = None):
        self.consumer_by = consumer_by
        self.claim = "client_id" if consumer_by == "client_id" else "username"
        self.admin_url = (admin_url or os.environ.get("KONG_ADMIN_URL")
                          or "http://127.0.0.1:8001").rstrip("/")
        self._admin_headers = {"Accept": "application/json"}
        admin_token = os.environ.get("KONG_ADMIN_TOKEN")
        if admin_token:
            self._admin_headers["Kong-Admin-Token"] = admin_token
        self._memo = _Memo()
        self._http: Optional[HTTPClient] = None

    def for_claims(self, kong, claims: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The consumer the answer maps to, or None."""
        value = claims.get(self.claim)
        if not isinstance(value, str) or not value:
            return None
        key = (self.claim, value)
        consumer = self._memo.get(key)
        if consumer is _MISSING:
            if self.claim == "username":
                consumer = self._by_username(kong, value)
            else:
                consumer = blocking(self._by_custom_id, value)
            self._memo.put(key, consumer)
        return consumer

    def by_id_or_username(self, kong, ref: str) -> Optional[Dict[str, Any]]:
        """The ``anonymous`` consumer, given by id or by username like Kong's own plugins."""
        key = ("anonymous", ref)
        consumer = self._memo.get(key)
        if consumer is _MISSING:
            consumer = _load_consumer(kong, ref)
            self._memo.put(key, consumer)
        return consumer

    @staticmethod
    def _by_username(kong, username: str):
        consumer = _load_consumer(kong, username)
        # load_consumer tries the value as an id first: a username that happens to
        # be another consumer's id must not become that consumer.
        if consumer and consumer.get("username") == username:
            return consumer
        return None

    def _by_custom_id(self, custom_id: str):
        if self._http is None:
            self._http = HTTPClient(pool_maxsize=16)
        url = f"{self.admin_url}/consumers?custom_id={quote(custom_id, safe='')}"
        try:
            reply = self._http.request("GET", url, headers=self._admin_headers,
                                       timeout=ADMIN_TIMEOUT, max_bytes=MAX_ADMIN_ANSWER)
            if reply.status != 200:
                raise ConsumerLookupError("Kong Admin API answered HTTP %d" % reply.status)
            data = json.loads(reply.body).get("data") or []
        except (HTTPFailure, DeadlineExceeded, ValueError, AttributeError) as err:
            raise ConsumerLookupError("Kong Admin API lookup failed (%s)"
                                      % type(err).__name__) from None
        for consumer in data:
            if isinstance(consumer, dict) and consumer.get("custom_id") == custom_id:
                return consumer
        return None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()


def _load_consumer(kong, ref: str) -> Optional[Dict[str, Any]]:
    """``load_consumer`` by id, else by username; a failed read is "no consumer"."""
    try:
        consumer = kong.client.load_consumer(ref, True)
    except PDKException:
        return None
    return consumer if isinstance(consumer, dict) else None
