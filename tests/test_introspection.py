"""Asking the IdP: the request we send, and every way the IdP can fail."""

import base64

import pytest

from idp_double import INACTIVE, IdPDouble, Reply, active
from kong_oauth2_introspection.introspection.config import Config
from kong_oauth2_introspection.introspection.exchange import IntrospectionError, Introspector

AUTH = "Basic " + base64.b64encode(b"kong:s3cret-value").decode()


def introspector(url, **conf):
    return Introspector(Config.parse(dict({"introspection_url": url, "authorization_value": AUTH},
                                          **conf)))


def test_request_shape():
    with IdPDouble() as idp:
        answer = introspector(idp.url, token_type_hint="access_token").introspect("tok-1")
    assert answer.claims["active"] is True and answer.cacheable
    call, = idp.calls
    assert call.form == {"token": "tok-1", "token_type_hint": "access_token"}
    assert call.headers["Authorization"] == AUTH
    assert call.headers["Accept"] == "application/json"
    assert call.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_connections_are_reused():
    with IdPDouble() as idp:
        client = introspector(idp.url)
        for _ in range(5):
            client.introspect("t")
    assert len({call.client_port for call in idp.calls}) == 1


def test_keepalive_zero_closes_connections():
    with IdPDouble() as idp:
        client = introspector(idp.url, keepalive=0)
        client.introspect("t")
        client.introspect("t")
    assert idp.calls[0].headers.get("Connection") == "close"
    assert idp.calls[0].client_port != idp.calls[1].client_port


def test_idle_connections_dropped_after_keepalive():
    import time
    with IdPDouble() as idp:
        client = introspector(idp.url, keepalive=200)
        client.introspect("t")
        client.introspect("t")
        time.sleep(0.3)
        client.introspect("t")
    ports = [call.client_port for call in idp.calls]
    assert ports[0] == ports[1] != ports[2]


@pytest.mark.parametrize("reply,why", [
    (Reply(500, {"error": "boom"}), "HTTP 500"),
    (Reply(401, {"error": "invalid_client"}), "HTTP 401"),
    (Reply(200, "<html>"), "invalid JSON"),
    (Reply(200, ["active"]), "not an object"),
    (Reply(drop=True), "could not connect"),
    (Reply(200, {"active": True}, delay=1.5), "timed out"),
])
def test_failures_are_errors_without_secrets(reply, why):
    with IdPDouble(lambda f, h: reply) as idp:
        with pytest.raises(IntrospectionError) as err:
            introspector(idp.url, timeout=500).introspect("the-token")
    text = str(err.value)
    assert why in text
    assert "the-token" not in text and "s3cret" not in text and "boom" not in text


def test_unreachable():
    with pytest.raises(IntrospectionError, match="could not connect"):
        introspector("http://127.0.0.1:9/introspect", timeout=500).introspect("t")


def test_inactive_is_an_answer():
    with IdPDouble(lambda f, h: INACTIVE) as idp:
        assert introspector(idp.url).introspect("t").claims == {"active": False}


def test_no_store_is_noticed():
    with IdPDouble(lambda f, h: Reply(200, {"active": True},
                                      {"Cache-Control": "private, no-store"})) as idp:
        assert introspector(idp.url).introspect("t").cacheable is False


def test_retries_on_5xx_and_connection_errors_then_answers():
    replies = iter([Reply(503), Reply(drop=True), active(sub="x")])
    with IdPDouble(lambda f, h: next(replies)) as idp:
        answer = introspector(idp.url, max_retries=2).introspect("t")
    assert answer.claims["sub"] == "x" and len(idp.calls) == 3


def test_no_retry_on_4xx():
    with IdPDouble(lambda f, h: Reply(400, {"error": "invalid_request"})) as idp:
        with pytest.raises(IntrospectionError):
            introspector(idp.url, max_retries=3).introspect("t")
    assert len(idp.calls) == 1


def test_retries_are_bounded():
    with IdPDouble(lambda f, h: Reply(502)) as idp:
        with pytest.raises(IntrospectionError, match="HTTP 502"):
            introspector(idp.url, max_retries=2).introspect("t")
    assert len(idp.calls) == 3
