"""The Kong-side guard (kong_oauth2_introspection/ops/guard.lua), run as Lua.

Kong's post-function plugin loads each `access` string once per config, with
an environment holding `kong` (and `ngx`), and calls the function it returns on
every request. These tests do the same with lupa, against a `kong` table that
holds only the four PDK functions the guard may use: any other global the chunk
touched would be nil here and fail the test.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml

from kong_oauth2_introspection.ops import guard

try:
    from lupa import luajit21 as lupa_runtime   # Kong runs LuaJIT (OpenResty)
except ImportError:
    from lupa import lua51 as lupa_runtime

ROOT = Path(__file__).resolve().parent.parent
BODY = {"message": "authentication unavailable"}

# Kong's sandbox loads the chunk with a fresh environment; setfenv is the
# Lua 5.1 / LuaJIT way to give a chunk one.
_LOADER = """
return function(src, env)
  local fn, err = loadstring(src, "=guard")
  if fn then setfenv(fn, env) end
  return fn, err
end
"""


class FakeKong:
    """The request state the guard reads, and the exits it makes."""

    def __init__(self, lua):
        self.lua = lua
        self.credential: Optional[Dict[str, Any]] = None
        self.consumer: Optional[Dict[str, Any]] = None
        self.method = "GET"
        self.exits: List[Any] = []
        self.calls: List[str] = []

    def request(self, method="GET", credential=None, consumer=None):
        self.method, self.credential, self.consumer = method, credential, consumer

    def _table(self, value):
        if value is None or not isinstance(value, dict):
            return value
        return self.lua.table_from({k: self.lua.table_from(v) if isinstance(v, list) else v
                                    for k, v in value.items()})

    def table(self):
        def get_credential():
            self.calls.append("get_credential")
            return self._table(self.credential)

        def get_consumer():
            self.calls.append("get_consumer")
            return self._table(self.consumer)

        def get_method():
            self.calls.append("get_method")
            return self.method

        def exit_(status, body=None, headers=None):
            self.calls.append("exit")
            self.exits.append((status, _to_python(body), _to_python(headers)))

        return self.lua.table_from({
            "client": self.lua.table_from({"get_credential": get_credential,
                                           "get_consumer": get_consumer}),
            "request": self.lua.table_from({"get_method": get_method}),
            "response": self.lua.table_from({"exit": exit_}),
        })


def _to_python(value):
    if value is None or not lupa_runtime.lua_type(value) == "table":
        return value
    return {k: _to_python(v) for k, v in value.items()}


class Guard:
    """One rendered chunk, loaded once like post-function does, called per request."""

    def __init__(self, run_on_preflight: bool, logical_or: bool = False,
                 plugins=("oauth2-introspection",)):
        self.lua = lupa_runtime.LuaRuntime(unpack_returned_tuples=True)
        self.kong = FakeKong(self.lua)
        # Kong's sandbox (untrusted_lua = sandbox) keeps Lua's base functions; the
        # guard for both plugins uses two of them, nothing else beyond kong.
        lua_g = self.lua.globals()
        env = self.lua.table_from({"kong": self.kong.table(), "type": lua_g.type,
                                   "ipairs": lua_g.ipairs})
        chunk, err = self.lua.execute(_LOADER)(guard.render(run_on_preflight, logical_or, plugins), env)
        assert err is None, err
        self.handler = chunk()
        assert lupa_runtime.lua_type(self.handler) == "function"

    def __call__(self, method="GET", credential=None, consumer=None):
        """The exit the guard made for this request, or None when it let it through."""
        self.kong.request(method, credential, consumer)
        self.kong.calls.clear()
        before = len(self.kong.exits)
        self.handler()
        made = self.kong.exits[before:]
        assert len(made) <= 1
        return made[0] if made else None


CREDENTIAL = {"id": "0b6b4c5e-4a0f-5d3e-9d0c-6f0a1c2b3d4e", "consumer_id": None,
              "authenticated_by": "oauth2-introspection"}
CC_CREDENTIAL = {"id": "1c7c5d6f-5b1a-4e4f-8e1d-7a1b2c3d4e5f",
                 "authenticated_by": "oauth2-client-credentials"}
OTHER = {"id": "key-auth-credential", "consumer_id": "5a1e1e2a"}
CONSUMER = {"id": "5a1e1e2a-6b8b-4bb0-8b7a-bd0ad0cbd0c1", "username": "alice"}
ANONYMOUS = {"id": "9e6b8f3c-3c1e-4f6a-9d5e-2b1a0c9d8e7f", "username": "anonymous"}
VARIANTS = [(True, False), (False, False), (True, True), (False, True)]


@pytest.fixture(params=VARIANTS, ids=["defaults", "no_preflight", "anonymous",
                                      "no_preflight+anonymous"])
def any_guard(request):
    return Guard(*request.param)


@pytest.fixture(params=[True, False], ids=["run_on_preflight", "no_preflight"])
def required_guard(request):
    """A guard for a plugin without ``anonymous``: ours is the one way in."""
    return Guard(request.param)


@pytest.fixture(params=[True, False], ids=["run_on_preflight", "no_preflight"])
def or_guard(request):
    """A guard for a plugin with ``anonymous``: one of several ways in."""
    return Guard(request.param, logical_or=True)


# --- Requests the plugin decided pass ---------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
def test_active_token_passes(any_guard, method):
    # An active token: our marked credential, with or without a consumer.
    assert any_guard(method, credential=CREDENTIAL) is None
    assert any_guard(method, credential=CREDENTIAL, consumer=CONSUMER) is None
    assert any_guard(method, credential=CC_CREDENTIAL) is None
    assert any_guard.kong.exits == []


def test_anonymous_consumer_passes_where_anonymous_is_set(or_guard):
    # anonymous: kong.client.authenticate(consumer, nil).
    assert or_guard("GET", consumer=ANONYMOUS) is None


def test_other_plugin_credential_passes_where_anonymous_is_set(or_guard):
    # Logical OR: another auth plugin authenticated first; ours let it be.
    assert or_guard("GET", credential=OTHER) is None
    assert or_guard("GET", credential=OTHER, consumer=CONSUMER) is None


@pytest.mark.parametrize("credential, consumer", [
    (OTHER, None), (OTHER, CONSUMER), (None, ANONYMOUS), (None, CONSUMER),
    ({"id": "x", "authenticated_by": "key-auth"}, None),
    ({"id": "x", "authenticated_by": True}, None), ("not a table", None)])
def test_without_anonymous_only_our_credential_passes(required_guard, credential, consumer):
    # Both required: another plugin's caller (or a consumer it set) while our
    # server could not run is not a request our plugin decided.
    assert required_guard("GET", credential=credential, consumer=consumer) == (503, BODY, None)


def test_the_guard_knows_every_plugin_this_server_hosts():
    from kong_oauth2_introspection import plugins
    text = guard.render(True)
    for cls in plugins.ALL:
        assert '["%s"] = true' % cls.NAME in text
    assert text.count("] = true") == len(plugins.ALL)


def test_authenticated_request_costs_one_lookup(any_guard):
    # The common path reads ngx.ctx once and never touches the request.
    any_guard("GET", credential=CREDENTIAL, consumer=CONSUMER)
    assert any_guard.kong.calls == ["get_credential"]


# --- Requests the plugin never decided are refused ---------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"])
def test_undecided_request_gets_503_json(any_guard, method):
    assert any_guard(method) == (503, BODY, None)


def test_preflight_passes_only_when_the_plugin_skips_it():
    # run_on_preflight false: the plugin lets OPTIONS through without
    # authenticating, so the guard must too.
    assert Guard(run_on_preflight=False)("OPTIONS") is None
    # run_on_preflight true: the plugin decides OPTIONS like any request.
    assert Guard(run_on_preflight=True)("OPTIONS") == (503, BODY, None)


def test_preflight_skip_is_for_options_only():
    g = Guard(run_on_preflight=False)
    assert g("GET") == (503, BODY, None)
    assert g("options") == (503, BODY, None)   # nginx gives the method as sent


def test_no_decision_is_remembered_between_requests(any_guard):
    # The function is built once per config and serves every request.
    assert any_guard("GET", credential=CREDENTIAL) is None
    assert any_guard("GET") == (503, BODY, None)
    assert any_guard("GET", credential=CC_CREDENTIAL) is None
    assert any_guard("GET") == (503, BODY, None)


# --- The chunk itself -------------------------------------------------------

@pytest.mark.parametrize("run_on_preflight, logical_or", VARIANTS)
def test_every_variant_compiles_and_returns_a_function(run_on_preflight, logical_or):
    lua = lupa_runtime.LuaRuntime(unpack_returned_tuples=True)
    compile_ = lua.eval("function(src) local f, err = loadstring(src, '=guard') return f, err end")
    text = guard.render(run_on_preflight, logical_or)
    assert compile_(text[:-4])[1]   # the check can fail
    fn, err = compile_(text)
    assert err is None and fn is not None, err
    assert lupa_runtime.lua_type(fn()) == "function"   # what post-function expects
    assert f"local run_on_preflight = {str(run_on_preflight).lower()}\n" in text
    assert f"local logical_or = {str(logical_or).lower()}\n" in text


def test_variants_differ_only_in_the_switches():
    base = guard.render(True).splitlines()
    switches = {base.index("local run_on_preflight = true"), base.index("local logical_or = false")}
    for variant in VARIANTS:
        lines = guard.render(*variant).splitlines()
        assert len(lines) == len(base)
        assert {i for i, (a, b) in enumerate(zip(base, lines)) if a != b} <= switches


def test_post_function_entry_follows_the_plugin_config():
    assert guard.post_function_entry({}) == \
        {"name": "post-function", "config": {"access": [guard.render(True)]}}
    assert guard.post_function_entry({"run_on_preflight": True}) == guard.post_function_entry({})
    assert guard.post_function_entry({"run_on_preflight": False})["config"]["access"] == \
        [guard.render(False)]
    assert guard.post_function_entry({"anonymous": "guest"})["config"]["access"] == \
        [guard.render(True, logical_or=True)]
    assert guard.post_function_entry({"anonymous": None}) == guard.post_function_entry({})


# --- kong.yml -----------------------------------------------------------------

def _kong_yml():
    return yaml.safe_load((ROOT / "kong.yml").read_text(encoding="utf-8"))


def _scopes_with_plugin(doc):
    scopes = [doc] + list(doc.get("services") or [])
    for service in doc.get("services") or []:
        scopes += list(service.get("routes") or [])
    scopes += list(doc.get("routes") or [])
    return [s for s in scopes if any(p["name"] == "oauth2-introspection"
                                     for p in s.get("plugins") or [])]


def test_kong_yml_guards_every_plugin_scope_exactly():
    doc = _kong_yml()
    scopes = _scopes_with_plugin(doc)
    assert [s["name"] for s in scopes] == ["echo", "client-echo"]   # service, route
    for scope in scopes:
        by_name = {p["name"]: p for p in scope["plugins"]}
        assert by_name["post-function"] == \
            guard.post_function_entry(by_name["oauth2-introspection"]["config"])
    assert guard.problems(doc) == []


def test_kong_yml_never_puts_the_plugin_on_a_consumer():
    for consumer in _kong_yml().get("consumers") or []:
        assert "oauth2-introspection" not in [p["name"] for p in consumer.get("plugins") or []]


def test_problems_finds_a_missing_guard():
    doc = _kong_yml()
    route = doc["services"][0]["routes"][1]
    route["plugins"] = [p for p in route["plugins"] if p["name"] != "post-function"]
    assert guard.problems(doc) == ["services[0].routes[1].plugins: oauth2-introspection "
                                   "applies here without the post-function guard "
                                   "(run_on_preflight=true, anonymous unset)"]


def test_problems_finds_a_post_function_that_shadows_the_guard():
    # A route's own post-function replaces the service's guard on that route.
    doc = _kong_yml()
    doc["services"][0]["routes"][0]["plugins"] = [
        {"name": "post-function", "config": {"access": ["kong.log.info('hi')"]}}]
    assert [p.split(":")[0] for p in guard.problems(doc)] == ["services[0].routes[0].plugins"]
    # Merged into that post-function's access array, the guard is there again.
    doc["services"][0]["routes"][0]["plugins"][0]["config"]["access"].append(guard.render(True))
    assert guard.problems(doc) == []


def test_problems_finds_a_guard_for_the_wrong_preflight_setting():
    doc = _kong_yml()
    doc["services"][0]["plugins"][0]["config"]["run_on_preflight"] = False
    assert guard.problems(doc) == ["services[0].plugins: oauth2-introspection applies here "
                                   "without the post-function guard (run_on_preflight=false, "
                                   "anonymous unset)"]


def test_problems_finds_a_guard_for_the_wrong_anonymous_setting():
    doc = _kong_yml()
    doc["services"][0]["plugins"][0]["config"]["anonymous"] = "guest"
    assert guard.problems(doc) == ["services[0].plugins: oauth2-introspection applies here "
                                   "without the post-function guard (run_on_preflight=true, "
                                   "anonymous set)"]


def test_global_plugin_needs_a_global_guard():
    doc = {"_format_version": "3.0",
           "plugins": [{"name": "oauth2-introspection", "config": {"run_on_preflight": False}}]}
    assert len(guard.problems(doc)) == 1
    doc["plugins"].append(guard.post_function_entry({"run_on_preflight": False}))
    assert guard.problems(doc) == []


# --- The command ---------------------------------------------------------------

def test_command_prints_entries_that_parse_back(capsys):
    assert guard.main([]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == [guard.post_function_entry({})]
    assert guard.main(["--no-preflight", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == \
        guard.post_function_entry({"run_on_preflight": False})
    assert guard.main(["--anonymous", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == \
        guard.post_function_entry({"anonymous": "guest"})


def test_command_yaml_keeps_the_lua_readable(capsys):
    guard.main(["--no-preflight"])
    out = capsys.readouterr().out
    assert "- |\n" in out and "      local run_on_preflight = false\n" in out


def test_design_notes_show_the_rendered_chunk():
    notes = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = notes[notes.index("## The guard's chunk"):]
    assert "```lua\n" + guard.render(True) + "```\n" in section


# --- Both of our plugins on one scope (issue 17.4) -------------------------------

BOTH = ("oauth2-introspection", "oauth2-client-credentials")


def test_one_plugin_renders_guard_lua_unchanged():
    # the chunk users already deployed stays byte for byte what it was
    template = (ROOT / "kong-plugin" / "kong_oauth2_introspection" / "ops" / "guard.lua").read_text()
    for name in BOTH:
        assert guard.render(True, False, [name]) == template
    assert guard.render(True, False, BOTH) != template
    assert guard.render(True, False, reversed(BOTH)) == guard.render(True, False, BOTH)
    with pytest.raises(ValueError):
        guard.render(True, False, ["key-auth"])


@pytest.mark.parametrize("run_on_preflight,logical_or", VARIANTS)
def test_guard_for_both_wants_both_decisions(run_on_preflight, logical_or):
    both = Guard(run_on_preflight, logical_or, BOTH)
    marked = guard.also_decided(CREDENTIAL, "oauth2-client-credentials")
    assert both("GET", credential=marked) is None
    assert both("GET", credential=guard.also_decided(CC_CREDENTIAL, "oauth2-introspection")) \
        is None
    assert both.kong.calls == ["get_credential"]     # one lookup, as for one plugin
    for alone in (CREDENTIAL, CC_CREDENTIAL, dict(CREDENTIAL, decided_by="nope"),
                  dict(CREDENTIAL, decided_by=["key-auth"])):
        expected = None if logical_or else (503, BODY, None)
        assert both("GET", credential=alone) == expected, alone


def test_problems_want_the_guard_for_every_plugin_on_the_scope():
    intro = {"name": "oauth2-introspection",
             "config": {"introspection_url": "https://idp/i", "authorization_value": "Basic a"}}
    cc = {"name": "oauth2-client-credentials", "config": {"url": "https://idp/t",
                                                          "audience": "https://api"}}
    doc = {"_format_version": "3.0", "services": [{"name": "s", "url": "http://up",
           "plugins": [intro, guard.post_function_entry({})],
           "routes": [{"name": "r", "paths": ["/"], "plugins": [cc]}]}]}
    # the route gets client-credentials too: the service's one-plugin guard is not enough
    assert guard.problems(doc) == [
        "services[0].routes[0].plugins: oauth2-client-credentials and oauth2-introspection "
        "apply here without the post-function guard (run_on_preflight=true, anonymous unset; "
        "render it with: guard --plugin oauth2-client-credentials --plugin oauth2-introspection)"]
    doc["services"][0]["routes"][0]["plugins"].append(guard.post_function_entry({}, BOTH))
    assert guard.problems(doc) == []


def test_command_renders_for_both_plugins(capsys):
    assert guard.main(["--plugin", "oauth2-introspection", "--plugin",
                       "oauth2-client-credentials", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == guard.post_function_entry({}, BOTH)
    assert guard.main(["--plugin", "oauth2-client-credentials", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == guard.post_function_entry({})


def test_problem_for_both_names_the_command_with_the_settings():
    intro = {"name": "oauth2-introspection", "config": {"anonymous": "guest",
                                                        "run_on_preflight": False}}
    doc = {"plugins": [intro, {"name": "oauth2-client-credentials", "config": {}}]}
    [line] = guard.problems(doc)
    command = line.split("render it with: guard ")[1].rstrip(")").split()
    assert command == ["--plugin", "oauth2-client-credentials", "--plugin",
                       "oauth2-introspection", "--no-preflight", "--anonymous"]
    assert guard.main(command + ["--format", "json"]) == 0
