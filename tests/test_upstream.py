"""Claim values as header values, and the headers that go upstream."""

import pytest

from kong_oauth2_introspection.introspection.config import Config
from kong_oauth2_introspection.introspection.upstream import (IdentityHeaders, consumer_headers,
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


def every_spelling(name):
    """Written out independently of the plugin: each '-' or '_' either way, lower case."""
    out = [""]
    for ch in name.lower():
        out = [o + c for o in out for c in (("-", "_") if ch in "-_" else (ch,))]
    return set(out)


def cleared_names(table):
    return {k for k, v in table.items() if v == []}


def test_every_owned_header_is_set_or_cleared_in_every_spelling_whatever_the_client_sent():
    plan = IdentityHeaders(CONF)
    # Nothing seen of the client's headers (Kong's read is capped): all cleared anyway,
    # each in every spelling a client can send (Kong keeps X_Consumer_ID as sent).
    table = plan.table({}, {})
    assert {k.lower() for k in cleared_names(table)} == \
        set().union(*(every_spelling(n) for n in OWNED))
    assert OWNED <= set(table)   # the spelling the plugin sets, as it sets it
    assert len({k.lower() for k in table}) == len(table)   # no header named twice
    assert len(table) == 86 == sum(2 ** n.count("-") for n in OWNED)   # 2^n each
    incoming = {"x-consumer-username": ["root"], "x-credential-scope": ["admin"],
                "x-credential-other": ["x"], "x_credential_other2": ["x"],
                "x-consumer_groups": ["admin"], "x-group": ["admin"], "accept": ["*/*"]}
    table = plan.table(incoming, {"X-Credential-Scope": "read", "x_group": "ops"},
                       remove=["Authorization"])
    assert table["X-Credential-Scope"] == "read" and table["X-Group"] == "ops"
    assert table["x_credential-scope"] == [] and table["x_group"] == []
    assert table["x-credential-other"] == [] and table["authorization"] == []
    assert table["x_credential_other2"] == [] and table["x-consumer_groups"] == []
    assert "accept" not in table and "x-group" not in table
    assert len({k.lower() for k in table}) == len(table)


def test_logical_or_clears_all_but_the_spellings_set_consumer_writes():
    incoming = {"x-credential-other": ["x"], "x-consumer-id": ["other-plugin"],
                "x_consumer_id": ["evil"], "x-consumer-groups": ["evil"],
                "x-anonymous_consumer": ["evil"]}
    table = IdentityHeaders(CONF).extras_table(incoming)
    kept = {"x-consumer-id", "x-consumer-custom-id", "x-consumer-username",
            "x-credential-identifier", "x-anonymous-consumer"}
    assert not kept & {k.lower() for k in table}
    assert table["X-Credential-Scope"] == [] and table["x-credential-other"] == []
    assert table["x_consumer_id"] == [] and table["x-consumer-groups"] == []
    assert table["x-anonymous_consumer"] == [] and table["x_credential_identifier"] == []
    assert {k.lower() for k in cleared_names(table)} == \
        set().union(*(every_spelling(n) for n in OWNED)) - kept | {"x-credential-other",
                                                                  "x-consumer-groups"}


def test_consumer_headers():
    assert consumer_headers({"id": "u1", "username": "alice", "custom_id": None}, True) == {
        "X-Consumer-ID": "u1", "X-Consumer-Username": "alice", "X-Anonymous-Consumer": "true"}
