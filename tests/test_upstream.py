"""Claim values as header values, and the headers that go upstream."""

import pytest

from kong_oauth2_introspection.config import Config
from kong_oauth2_introspection.upstream import (IdentityHeaders, consumer_headers,
                                                credential_headers, header_value)

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


OWNED = {"X-Consumer-ID", "X-Consumer-Custom-ID", "X-Consumer-Username", "X-Anonymous-Consumer",
         "X-Credential-Scope", "X-Credential-Client-ID", "X-Credential-Identifier",
         "X-Credential-Token-Type", "X-Credential-Exp", "X-Credential-Iat", "X-Credential-Nbf",
         "X-Credential-Sub", "X-Credential-Aud", "X-Credential-Iss", "X-Credential-Jti",
         "X-Credential-tenant-id", "X-Group", "X-Name", "X-None"}


def test_every_owned_header_is_set_or_cleared_whatever_the_client_sent():
    plan = IdentityHeaders(CONF)
    # Nothing seen of the client's headers (Kong's read is capped): all cleared anyway.
    assert plan.table({}, {}) == {name: [] for name in OWNED}
    incoming = {"x-consumer-username": ["root"], "x-credential-scope": ["admin"],
                "x-credential-other": ["x"], "x-group": ["admin"], "accept": ["*/*"]}
    table = plan.table(incoming, {"X-Credential-Scope": "read", "x-group": "ops"},
                       remove=["Authorization"])
    assert table["X-Credential-Scope"] == "read" and table["X-Group"] == "ops"
    assert table["x-credential-other"] == [] and table["authorization"] == []
    assert "accept" not in table and "x-group" not in table
    assert {k for k, v in table.items() if v == []} == (OWNED - {"X-Credential-Scope", "X-Group"}
                                                        | {"x-credential-other", "authorization"})


def test_logical_or_clears_only_what_no_other_plugin_sets():
    table = IdentityHeaders(CONF).extras_table({"x-credential-other": ["x"],
                                                "x-consumer-id": ["other-plugin"]})
    assert "X-Consumer-ID" not in table and "X-Credential-Identifier" not in table
    assert table["X-Credential-Scope"] == [] and table["x-credential-other"] == []


def test_consumer_headers():
    assert consumer_headers({"id": "u1", "username": "alice", "custom_id": None}, True) == {
        "X-Consumer-ID": "u1", "X-Consumer-Username": "alice", "X-Anonymous-Consumer": "true"}
