"""Issue 13 item 2, pre-authorization: the plugin introspects with a bearer token it
got from oidc-provider's token endpoint (client credentials), keeps it, fetches
it by one request at a time, and replaces it once when it is refused (revoked)
or about to lapse. The introspection endpoint is oidc-provider's own, reached
through the test server's /introspection-bearer route, which checks the bearer
token with oidc-provider before answering for its client.

A forwarder in front of the token endpoint counts the plugin's token requests
and notes the tokens it got (to revoke one)."""

import json
import threading
import time

import pytest
import requests

from authserver_fixture import AuthServer, client
from idp_double import IdPDouble, Reply
from test_plugin_kong import bearer

PREAUTH_SECRET = "preauth-introspector-secret"


class TokenForwarder(IdPDouble):
    """The token endpoint, relayed: each token request recorded, each token noted."""

    def __init__(self, target):
        self.issued = []

        def relay(form, headers):
            forwarded = {k: v for k, v in headers.items()
                         if k.lower() in ("authorization", "accept")}
            reply = requests.post(target, data=form, headers=forwarded, timeout=5)
            if reply.status_code == 200:
                self.issued.append(reply.json()["access_token"])
            return Reply(reply.status_code, reply.content)
        super().__init__(relay)
        self.__enter__()

    def close(self):
        self.__exit__()


@pytest.fixture(scope="module")
def idp():
    extra = [client("rs-pre", PREAUTH_SECRET, introspector=True),
             client("rs-short", PREAUTH_SECRET, introspector=True, ttl=2)]
    with AuthServer(extra_clients=extra) as server:
        yield server


@pytest.fixture
def forwarder(idp):
    fwd = TokenForwarder(idp.token_url)
    yield fwd
    fwd.close()


def conf(idp, forwarder, client_id="rs-pre", secret=PREAUTH_SECRET):
    return {"introspection_url": idp.issuer + "/introspection-bearer",
            "introspection_endpoint_auth_method": "client_secret_basic",
            "client_id": client_id, "client_secret": secret,
            "pre_authorization": {"token_url": forwarder.url}}


def test_one_token_serves_many_introspections(kong, idp, forwarder):
    inst = kong.configure(conf(idp, forwarder))
    for _ in range(5):
        r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
        assert r.status == 200, r.logs
        assert r.upstream.headers["X-Credential-Client-ID"] == "alice-app"
    assert len(forwarder.issued) == 1
    assert forwarder.issued[0] not in kong.server_log()


def test_concurrent_first_requests_fetch_one_token(kong, idp, forwarder):
    inst = kong.configure(conf(idp, forwarder))
    tokens = [idp.issue_token("bob-app") for _ in range(8)]
    results = [None] * len(tokens)

    def one(i):
        results[i] = kong.request(inst, "GET", "/", headers=bearer(tokens[i])).status
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * len(tokens)
    assert len(forwarder.issued) == 1


def test_a_revoked_token_is_replaced_once(kong, idp, forwarder):
    inst = kong.configure(conf(idp, forwarder))
    assert kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app"))).status \
        == 200
    idp.revoke(forwarder.issued[0])   # the introspection endpoint now answers 401 to it
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
    assert r.status == 200, r.logs
    assert len(forwarder.issued) == 2


def test_a_lapsing_token_is_replaced_before_it_is_refused(kong, idp, forwarder):
    inst = kong.configure(conf(idp, forwarder, client_id="rs-short"))   # 2 s tokens
    assert kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app"))).status \
        == 200
    time.sleep(2.1)
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
    assert r.status == 200 and len(forwarder.issued) == 2


def test_refused_client_is_a_server_error(kong, idp, forwarder):
    inst = kong.configure(conf(idp, forwarder, secret="not-the-secret"))
    r = kong.request(inst, "GET", "/", headers=bearer(idp.issue_token("alice-app")))
    assert r.status == 500 and not r.proxied
    assert "pre-authorization" in json.dumps(r.logs) and "not-the-secret" not in kong.server_log()
    assert forwarder.issued == []


def test_pre_authorization_needs_a_client_authentication_method():
    from kong_oauth2_introspection.introspection.config import Config, ConfigError
    with pytest.raises(ConfigError) as err:
        Config.parse({"introspection_url": "http://idp/i", "authorization_value": "Basic x",
                      "pre_authorization": {"token_url": "http://idp/token"}})
    # The schema's entity check: token_url set, so the method is required.
    assert err.value.field == "config.introspection_endpoint_auth_method"
    assert "config.pre_authorization.token_url" in err.value.message
