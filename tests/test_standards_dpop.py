"""Issue 13 item 4, DPoP-bound tokens (RFC 9449): oidc-provider binds a client
credentials token to the client's key (``cnf.jkt`` in its introspection answer);
the plugin, driven by the Kong stand-in, accepts it only with a fresh valid proof
of that key, each proof once across two plugin servers sharing a real Redis."""

import base64
import hashlib
import re
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authserver_fixture import AuthServer
from conftest import plugin_command
from kong import KongStandIn
from redis_servers import ACL_PASSWORD, ACL_USER, redis_standalone  # noqa: F401
from test_plugin_kong import bearer

URL = "http://kong.test/orders"   # what the stand-in's request looks like to Kong
STORE_SECRET = "0123456789abcdef0123456789abcdef"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DPoPClient:
    """A client holding a DPoP key: gets bound tokens, signs proofs."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))

    def proof(self, method, url, token=None, **override):
        claims = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time())}
        if token is not None:
            claims["ath"] = b64url(hashlib.sha256(token.encode()).digest())
        claims.update(override)
        return jwt.encode(claims, self.key, algorithm="ES256",
                          headers={"typ": "dpop+jwt", "jwk": self.jwk})

    def bound_token(self, idp, client_id="alice-app", scope="read"):
        reply = idp.session.post(idp.token_url, timeout=10,
                                 data={"grant_type": "client_credentials", "scope": scope},
                                 headers={"Authorization": idp.authorization(client_id),
                                          "DPoP": self.proof("POST", idp.token_url)})
        assert reply.status_code == 200, reply.text
        assert reply.json()["token_type"] == "DPoP"
        return reply.json()["access_token"]

    def headers(self, token, method="GET", url=URL, **override):
        return {"Authorization": "DPoP " + token,
                "DPoP": self.proof(method, url, token, **override)}


@pytest.fixture(scope="module")
def idp():
    with AuthServer() as server:
        yield server


def conf(idp, mode="optional", **extra):
    return dict({"introspection_url": idp.introspection_url,
                 "authorization_value": idp.introspector_authorization,
                 "proof_of_possession_dpop": mode}, **extra)


def challenge(r):
    return r.response_headers["WWW-Authenticate"]


def test_the_token_is_bound(idp):
    holder = DPoPClient()
    answer = idp.introspect(holder.bound_token(idp))
    thumb = json.dumps({k: holder.jwk[k] for k in ("crv", "kty", "x", "y")},
                       separators=(",", ":"), sort_keys=True)
    assert answer["cnf"] == {"jkt": b64url(hashlib.sha256(thumb.encode()).digest())}


def test_bound_token_with_a_fresh_proof_passes_once(kong, idp):
    holder = DPoPClient()
    token = holder.bound_token(idp)
    inst = kong.configure(conf(idp, hide_credentials=True))
    headers = holder.headers(token)
    r = kong.request(inst, "GET", "/orders", headers=headers)
    assert r.status == 200, r.logs
    assert r.upstream.headers["X-Credential-Client-ID"] == "alice-app"
    assert "Authorization" not in r.upstream.headers
    # The same proof again: a replay.
    again = kong.request(inst, "GET", "/orders", headers=headers)
    assert again.status == 401 and again.json["error"] == "invalid_dpop_proof"
    assert challenge(again).startswith('DPoP algs="ES256')
    # A new proof: fine.
    assert kong.request(inst, "GET", "/orders", headers=holder.headers(token)).status == 200


def _odd_proof(holder, token, **header):
    claims = {"jti": uuid.uuid4().hex, "htm": "GET", "htu": URL, "iat": int(time.time()),
              "ath": b64url(hashlib.sha256(token.encode()).digest())}
    return {"Authorization": "DPoP " + token,
            "DPoP": jwt.encode(claims, holder.key, algorithm="ES256",
                               headers=dict({"typ": "dpop+jwt", "jwk": holder.jwk}, **header))}


@pytest.mark.parametrize("what", ["other key", "method", "url", "old", "future", "ath",
                                  "no proof", "two proofs", "odd jwk", "private jwk",
                                  "typ", "garbage"])
def test_a_proof_that_does_not_fit_is_refused(kong, idp, what):
    holder = DPoPClient()
    token = holder.bound_token(idp)
    inst = kong.configure(conf(idp))
    headers = {
        "other key": lambda: DPoPClient().headers(token),
        "method": lambda: holder.headers(token, method="POST"),
        "url": lambda: holder.headers(token, url="http://kong.test/other"),
        "old": lambda: holder.headers(token, iat=int(time.time()) - 301),
        "future": lambda: holder.headers(token, iat=int(time.time()) + 120),
        "ath": lambda: holder.headers(token, ath=b64url(b"x" * 32)),
        "no proof": lambda: {"Authorization": "DPoP " + token},
        "two proofs": lambda: [("Authorization", "DPoP " + token),
                               ("DPoP", holder.proof("GET", URL, token)),
                               ("DPoP", holder.proof("GET", URL, token))],
        "odd jwk": lambda: _odd_proof(holder, token, jwk=dict(holder.jwk, kty=["EC"])),
        "private jwk": lambda: _odd_proof(holder, token, jwk=dict(holder.jwk, d="AAAA")),
        "typ": lambda: _odd_proof(holder, token, typ="JWT"),
        "garbage": lambda: {"Authorization": "DPoP " + token, "DPoP": "not.a.jwt"},
    }[what]()
    r = kong.request(inst, "GET", "/orders", headers=headers)
    assert r.status == 401 and r.json["error"] == "invalid_dpop_proof", (what, r.body)
    assert not r.proxied


def test_bound_token_sent_as_bearer_is_refused(kong, idp):
    token = DPoPClient().bound_token(idp)
    r = kong.request(kong.configure(conf(idp)), "GET", "/orders", headers=bearer(token))
    assert r.status == 401 and r.json["error"] == "invalid_token"
    assert challenge(r).startswith("DPoP ")


def test_modes(kong, idp):
    holder = DPoPClient()
    bound, plain = holder.bound_token(idp), idp.issue_token("alice-app")
    optional, strict, off = (kong.configure(conf(idp, mode)) for mode in
                             ("optional", "strict", "off"))
    assert kong.request(optional, "GET", "/orders", headers=bearer(plain)).status == 200
    r = kong.request(strict, "GET", "/orders", headers=bearer(plain))
    assert r.status == 401 and challenge(r).startswith("DPoP ")
    assert kong.request(strict, "GET", "/orders", headers=holder.headers(bound)).status == 200
    missing = kong.request(strict, "GET", "/orders")
    assert missing.status == 401 and challenge(missing).startswith("DPoP ")
    # off: the binding is not looked at (as before this option existed).
    assert kong.request(off, "GET", "/orders", headers=bearer(bound)).status == 200


def test_unbound_token_costs_no_extra_round_trip(kong, idp):
    plain = idp.issue_token("alice-app")
    inst = kong.configure(conf(idp))
    kong.request(inst, "GET", "/orders", headers=bearer(plain))
    r = kong.request(inst, "GET", "/orders", headers=bearer(plain))
    assert r.status == 200 and len(r.pdk_calls) <= 4, r.pdk_calls


def test_a_proof_is_accepted_once_across_the_cluster(idp, redis_standalone):
    holder = DPoPClient()
    token = holder.bound_token(idp)
    store = {"key_prefix": "dpop-test:", "secret": STORE_SECRET,
             "redis": {"endpoints": [redis_standalone.address], "username": ACL_USER,
                       "password": ACL_PASSWORD}}
    with KongStandIn(plugin_command()) as a, KongStandIn(plugin_command()) as b:
        on_a, on_b = a.configure(conf(idp, store=store)), b.configure(conf(idp, store=store))
        headers = holder.headers(token)
        assert a.request(on_a, "GET", "/orders", headers=headers).status == 200
        replay = b.request(on_b, "GET", "/orders", headers=headers)
        assert replay.status == 401 and replay.json["error"] == "invalid_dpop_proof"
        assert b.request(on_b, "GET", "/orders", headers=holder.headers(token)).status == 200


def test_thumbprint_matches_rfc_7638_example():
    from kong_oauth2_introspection.introspection.dpop import thumbprint
    key = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
           "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFx"
                "uhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_R"
                "N5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL"
                "5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBn"
                "iIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}
    assert thumbprint(key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_unreachable_replay_store_refuses_the_proof(kong, idp):
    """With store.redis configured but down, a proof cannot be known fresh: refused."""
    from redis_servers import free_port
    holder = DPoPClient()
    token = holder.bound_token(idp)
    dead = {"key_prefix": "dpop-dead:", "secret": STORE_SECRET,
            "redis": {"endpoints": ["127.0.0.1:%d" % free_port()], "timeout_ms": 100}}
    inst = kong.configure(conf(idp, store=dead))
    r = kong.request(inst, "GET", "/orders", headers=holder.headers(token))
    assert r.status == 401 and r.json["error"] == "invalid_dpop_proof" and not r.proxied
    # Unbound tokens do not need the replay store: they still pass (cache degraded).
    assert kong.request(inst, "GET", "/orders",
                        headers=bearer(idp.issue_token("alice-app"))).status == 200


def test_a_client_clock_a_little_ahead_is_tolerated(kong, idp):
    holder = DPoPClient()
    token = holder.bound_token(idp)
    inst = kong.configure(conf(idp))
    r = kong.request(inst, "GET", "/orders",
                     headers=holder.headers(token, iat=int(time.time()) + 30))
    assert r.status == 200, r.logs


# -- issue 19.2: the in-process replay store never forgets an unexpired proof ----------

CAPACITY = 40   # the store's capacity, scaled down through its setting


@pytest.fixture
def small_store():
    """A plugin server whose in-process replay store holds CAPACITY proofs."""
    from kong_oauth2_introspection.introspection.dpop import CAPACITY_ENV
    from test_metrics import metrics_url
    with KongStandIn(plugin_command() + ["serve", "--metrics-port", "0"],
                     env={CAPACITY_ENV: str(CAPACITY)}) as standin:
        standin.base = metrics_url(standin)
        yield standin


def _replay_metrics(standin):
    import requests
    text = requests.get(standin.base + "/metrics", timeout=5).text
    found = dict(re.findall(r"^kong_oauth2_introspection_(replay_store_\w+) (\S+)$", text, re.M))
    return float(found["replay_store_full_total"]), float(found["replay_store_entries"])


def test_a_flood_of_fresh_proofs_does_not_evict_a_captured_one(small_store, idp):
    """The attack: the victim's proof is captured; the attacker, with a bound token of
    his own, sends more fresh proofs than the store holds, then replays the capture."""
    kong = small_store
    victim, attacker = DPoPClient(), DPoPClient()
    victim_token, attacker_token = victim.bound_token(idp), attacker.bound_token(idp)
    inst = kong.configure(conf(idp))
    captured = victim.headers(victim_token)
    assert kong.request(inst, "GET", "/orders", headers=captured).status == 200
    statuses = [kong.request(inst, "GET", "/orders",
                             headers=attacker.headers(attacker_token)).status
                for _ in range(CAPACITY + 10)]
    # CAPACITY - 1 fit beside the victim's; the rest are refused, none evicts it.
    assert statuses == [200] * (CAPACITY - 1) + [401] * 11, statuses
    replay = kong.request(inst, "GET", "/orders", headers=captured)
    assert replay.status == 401 and replay.json["error"] == "invalid_dpop_proof"
    assert not replay.proxied
    # Full: a fresh proof is refused too (fail closed), logged once, counted.
    fresh = kong.request(inst, "GET", "/orders", headers=victim.headers(victim_token))
    assert fresh.status == 401 and fresh.json["error"] == "invalid_dpop_proof"
    assert any("replay store full" in m for _, m in fresh.logs), fresh.logs
    assert kong.server_log().count("DPoP replay store full (%d proofs)" % CAPACITY) == 1
    refused, entries = _replay_metrics(kong)
    assert refused == 12 and entries == CAPACITY


def test_a_proof_is_once_per_process_whatever_the_config(kong, idp):
    """A config change, or another config on the same URL, does not forget a proof."""
    holder = DPoPClient()
    token = holder.bound_token(idp)
    plugin_id = str(uuid.uuid4())
    first = kong.configure(conf(idp), plugin_id=plugin_id)
    headers = holder.headers(token)
    assert kong.request(first, "GET", "/orders", headers=headers).status == 200
    changed = kong.configure(conf(idp, hide_credentials=True, dpop_proof_lifetime=200),
                             plugin_id=plugin_id)
    other = kong.configure(conf(idp, mode="strict", ttl=7), route=True)
    for inst in (changed, other):
        r = kong.request(inst, "GET", "/orders", headers=headers)
        assert r.status == 401 and r.json["error"] == "invalid_dpop_proof", r.logs
        assert any("already used" in m for _, m in r.logs), r.logs
    assert kong.request(other, "GET", "/orders", headers=holder.headers(token)).status == 200


def test_the_replay_memory_keeps_keys_until_they_expire_and_refuses_when_full():
    from kong_oauth2_introspection.introspection.dpop import Remembered
    memory = Remembered(3)
    assert [memory.add(k, 10, now=1000.0) for k in (b"a", b"b", b"a")] == [True, True, False]
    assert memory.add(b"c", 100, now=1005.0) is True
    assert memory.add(b"d", 10, now=1009.0) is None          # full: nothing evicted
    assert memory.add(b"a", 10, now=1009.9) is False          # still remembered
    assert memory.add(b"d", 10, now=1010.0) is True           # a and b expired
    assert memory.add(b"a", 10, now=1010.0) is True and len(memory) == 3
