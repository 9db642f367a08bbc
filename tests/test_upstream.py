"""Claim values as header values, and the headers that go upstream."""

import pytest

from kong_oauth2_introspection.config import Config
from kong_oauth2_introspection.upstream import (consumer_headers, credential_headers,
                                                drop_spoofed, header_value)

CONF = Config.parse({"introspection_url": "http://idp/x", "authorization_value": "Basic a",
                     "custom_claims_forward": ["tenant_id"],
                     "forward_headers": {"X-Group": "grp", "X-Name": "user.name", "X-None": "nope"}})


@pytest.mark.parametrize("value,text", [
    (1700000000, "1700000000"), (1700000000.0, "1700000000"), (1.5, "1.5"), (True, "true"),
    (["a", "b"], "a,b"), ({"b": 1}, '{"b":1}'), ("line\r\nX-Evil: 1", "line X-Evil: 1"),
    (None, ""), ("Zoë", "Zoë"),
])
def test_header_value(value, text):
    assert header_value(value) == text


def test_credential_headers():
    claims = {"active": True, "scope": "read write", "client_id": "app", "username": "alice",
              "exp": 1700000000, "aud": ["api", "web"], "tenant_id": "t1",
              "grp": "admin", "user": {"name": "John Snow"}}
    headers = credential_headers(CONF, claims)
    assert headers == {
        "X-Credential-Scope": "read write", "X-Credential-Client-ID": "app",
        "X-Credential-Identifier": "alice", "X-Credential-Exp": "1700000000",
        "X-Credential-Aud": "api,web", "X-Credential-tenant-id": "t1",
        "X-Group": "admin", "X-Name": "John Snow", "X-None": "",
    }


def test_spoofed_identity_headers_are_removed_but_ours_kept():
    incoming = {"x-consumer-username": ["root"], "x-credential-scope": ["admin"],
                "x-anonymous-consumer": ["true"], "x-group": ["admin"], "accept": ["*/*"]}
    headers = drop_spoofed(CONF, incoming, {"X-Credential-Scope": "read"})
    assert headers == {"X-Credential-Scope": "read", "x-consumer-username": [],
                       "x-anonymous-consumer": [], "x-group": []}


def test_consumer_headers():
    assert consumer_headers({"id": "u1", "username": "alice", "custom_id": None}, True) == {
        "X-Consumer-ID": "u1", "X-Consumer-Username": "alice", "X-Anonymous-Consumer": "true"}
