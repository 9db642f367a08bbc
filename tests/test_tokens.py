"""Where the token comes from."""

import pytest

from fake_pdk import fake_kong
from kong_oauth2_introspection.introspection.config import TokenSource
from kong_oauth2_introspection.kong.request import IncomingRequest
from kong_oauth2_introspection.introspection.tokens import (MAX_TOKEN_LENGTH, MalformedToken, TokenFinder,
                                              without_cookie)

ENTERPRISE = TokenFinder(TokenSource())


def find(finder=ENTERPRISE, **request):
    kong = fake_kong(**request)
    return finder.find(IncomingRequest(kong)), kong.calls


@pytest.mark.parametrize("header", ["Bearer abc", "bearer abc", "Token abc", "TOKEN   abc"])
def test_authorization_schemes(header):
    found, calls = find(headers={"Authorization": header})
    assert found.token == "abc" and found.where == "header"
    assert calls == ["get_headers"]  # no query or body read when the header has it


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer a b", "abc"])
def test_authorization_without_a_bearer_token(header):
    found, _ = find(headers={"Authorization": header})
    assert found is None


def test_query_then_body():
    found, _ = find(query={"access_token": ["q"]})
    assert (found.token, found.where) == ("q", "query")
    found, calls = find(headers={"Content-Type": "application/x-www-form-urlencoded"},
                        body={"x": "1", "access_token": "b"})
    assert (found.token, found.where) == ("b", "body") and "get_body" in calls
    found, _ = find(headers={"Content-Type": "application/json; charset=utf-8"},
                    body={"access_token": "j"})
    assert (found.token, found.where) == ("j", "body")
    found, calls = find(headers={"Content-Type": "text/plain"}, body={"access_token": "b"})
    assert found is None and "get_body" not in calls
    # Kong could not read it (3.x: nil): no body, not an error.
    found, _ = find(headers={"Content-Type": "application/json"}, body=None)
    assert found is None


@pytest.mark.parametrize("request_", [
    {"headers": {"Authorization": ["Bearer a", "Bearer b"]}},
    {"query": {"access_token": ["a", "b"]}},
    {"headers": {"Authorization": "Bearer " + "a" * (MAX_TOKEN_LENGTH + 1)}},
    {"query": {"access_token": ["to ken"]}},
    {"query": {"access_token": ["tök"]}},
    {"headers": {"Content-Type": "application/json"}, "body": {"access_token": 12}},
    {"headers": {"Content-Type": "application/x-www-form-urlencoded"},
     "body": {"access_token": b"a\xffb".decode("utf-8", "surrogateescape")}},
])
def test_malformed(request_):
    with pytest.raises(MalformedToken) as caught:
        find(**request_)
    # Sent twice is a malformed request (400); anything else an invalid token (401).
    values = (request_.get("headers", {}).get("Authorization"), request_.get("query", {}).get(
        "access_token"))
    assert caught.value.ambiguous == any(isinstance(v, list) and len(v) > 1 for v in values)


def test_configured_sources_only_and_in_order():
    finder = TokenFinder(TokenSource(header="X-Api-Token", query="tok", cookie="sid"))
    assert find(finder, headers={"Authorization": "Bearer a"})[0] is None
    assert find(finder, headers={"X-Api-Token": "h"}, query={"tok": ["q"]})[0].where == "header"
    assert find(finder, query={"tok": ["q"]}, headers={"Cookie": "sid=c"})[0].where == "query"
    found, _ = find(finder, headers={"Cookie": "a=1; sid=c; b=2"})
    assert (found.token, found.where, found.name) == ("c", "cookie", "sid")


def test_configured_header_with_scheme():
    finder = TokenFinder(TokenSource(header="Authorization", header_auth_scheme="Bearer"))
    assert find(finder, headers={"Authorization": "BEARER x"})[0].token == "x"
    assert find(finder, headers={"Authorization": "Token x"})[0] is None


def test_cookie_removal_keeps_the_others():
    assert without_cookie("a=1; sid=c; b=2", "sid") == "a=1; b=2"
