"""The repository's kong.yml, as real Kong would run it: every oauth2-introspection
entry configured on its own scope (service, route) with the keys Kong adds, its
guard running after it, against an IdP on 127.0.0.1 instead of the compose
network's Keycloak (and without the compose network's Redis)."""

import copy
import time

import pytest
import yaml

from conftest import ROOT, plugin_command
from idp_double import IdPDouble, kong_yml_tokens
from kong import KongStandIn, SchemaViolation
from kong_oauth2_introspection.ops.guard import post_function_entry

NAME = "oauth2-introspection"


def entries():
    """(scope kind, scope name, plugin entry, the guard entry on the same scope)."""
    doc = yaml.safe_load((ROOT / "kong.yml").read_text())
    found = []

    def visit(kind, scope):
        plugins = scope.get("plugins") or []
        ours = [p for p in plugins if p.get("name") == NAME]
        guards = [p for p in plugins if p.get("name") == "post-function"]
        for p in ours:
            found.append((kind, scope.get("name"), p, guards[0] if guards else None))
    for service in doc.get("services") or []:
        visit("service", service)
        for route in service.get("routes") or []:
            visit("route", route)
    for route in doc.get("routes") or []:
        visit("route", route)
    return found


ENTRIES = entries()


@pytest.fixture(scope="module")
def idp():
    with IdPDouble(kong_yml_tokens) as double:
        yield double


def test_kong_yml_has_a_service_and_a_route_entry_each_with_its_guard():
    kinds = sorted(kind for kind, *_ in ENTRIES)
    assert kinds == ["route", "service"]
    for kind, name, plugin, guard in ENTRIES:
        assert guard == post_function_entry(plugin["config"]), (kind, name)


@pytest.mark.parametrize("kind, name, plugin, guard", ENTRIES,
                         ids=["%s:%s" % (k, n) for k, n, *_ in ENTRIES])
def test_each_kong_yml_entry_works_on_its_scope(idp, kind, name, plugin, guard):
    conf = copy.deepcopy(plugin["config"])
    conf["introspection_url"] = idp.url
    conf.pop("store", None)  # the compose network's Redis is not here
    with KongStandIn(plugin_command(), post_function=guard["config"]["access"]) as kong:
        kong.add_consumer(username="alice")
        bob = kong.add_consumer(username="bob", custom_id="bob-app")
        inst = kong.configure(conf, **{kind: True}, instance_name="%s-auth" % name)
        assert "%s_id" % kind in inst.conf   # the key that made real Kong answer 500
        r = kong.request(inst, "GET", "/")
        assert r.status == 401 and r.guard_exit is None
        token = "tok-bob" if conf.get("consumer_by") == "client_id" else "tok-alice"
        r = kong.request(inst, "GET", "/", headers=[("Authorization", "Bearer " + token),
                                                     ("X-Consumer-ID", "evil")])
        assert r.status == 200 and r.guard_exit is None, r
        up = r.upstream.headers
        if conf.get("consumer_by") == "client_id":
            assert up.getall("X-Consumer-ID") == [bob["id"]]
        else:
            assert up.getall("X-Consumer-Username") == ["alice"]
        assert "evil" not in up.getall("X-Consumer-ID")
        kong.kill_server()   # and with the server gone, the guard holds
        kong.fail_open = "record"
        r = kong.request(inst, "GET", "/", headers=[("Authorization", "Bearer " + token)])
        assert r.status == 503 and not r.proxied


def test_a_consumer_scoped_entry_is_refused_like_kong_does(idp):
    conf = dict(ENTRIES[0][2]["config"], introspection_url=idp.url)
    conf.pop("store", None)
    with KongStandIn(plugin_command()) as kong:
        with pytest.raises(SchemaViolation) as refused:
            kong.configure(conf, consumer=True)
    assert "consumer" in str(refused.value)
