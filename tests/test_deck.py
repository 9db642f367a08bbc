"""examples/deck/kong.yaml: a decK state file for both plugins. decK replaces
``${{ env "DECK_..." }}`` with environment values before Kong validates the file
(``deck gateway validate``) or receives it (``deck gateway sync``); here the same
substitution is made with stand-in values and the plugin entries are checked as
Kong and the plugin would check them."""

import re
import subprocess

import yaml

from conftest import ROOT, plugin_command

DECK = ROOT / "examples" / "deck" / "kong.yaml"
OURS = ("oauth2-introspection", "oauth2-client-credentials")
# decK's environment template: only variables prefixed DECK_ are read
TEMPLATE = re.compile(r'\$\{\{\s*env\s+"([^"]+)"\s*\}\}')
SECRET_FIELDS = ("authorization_value", "client_secret")
VALUES = {"DECK_INTROSPECTION_AUTHORIZATION": "Basic a29uZzpzdGFuZC1pbg==",
          "DECK_CLIENT_SECRET": "stand-in-client-secret"}


def rendered(values=VALUES):
    """The file as decK hands it on: templates replaced, select_tags on every entity."""
    text = TEMPLATE.sub(lambda m: values[m.group(1)], DECK.read_text())
    doc = yaml.safe_load(text)
    tags = doc["_info"]["select_tags"]
    for service in doc["services"]:
        for entity in [service, *service.get("routes", []), *service.get("plugins", [])]:
            entity["tags"] = list(tags)
    return doc


def ours(doc):
    from kong_oauth2_introspection.ops.check import plugin_entries
    return [(where, entry) for where, entry in plugin_entries(doc) if entry["name"] in OURS]


def test_the_file_is_decK_format_with_its_secrets_from_the_environment():
    text = DECK.read_text()
    raw = yaml.safe_load(text)
    assert raw["_format_version"] == "3.0"
    tags = raw["_info"]["select_tags"]
    assert tags and all(isinstance(t, str) and t for t in tags)
    names = TEMPLATE.findall(text)
    assert names and all(n.startswith("DECK_") for n in names), names
    assert set(names) == set(VALUES)
    # every secret of ours comes from the environment, none is written in the file
    found = {entry["name"] for _, entry in ours(raw)}
    assert found == set(OURS)
    for where, entry in ours(raw):
        for field in SECRET_FIELDS:
            if field in entry["config"]:
                assert TEMPLATE.fullmatch(entry["config"][field]), f"{where}: {field} inline"
    for line in ("deck gateway validate", "deck gateway sync"):
        assert line in text


def test_plugin_entries_pass_the_plugins_schema_and_checks():
    from kong_oauth2_introspection.ops.check import entry_problems
    doc = rendered()
    for where, entry in ours(doc):
        assert not entry_problems(entry), (where, [str(v) for v in entry_problems(entry)])
    # the stand-in values did reach the configs
    configs = {entry["name"]: entry["config"] for _, entry in ours(doc)}
    assert configs["oauth2-introspection"]["authorization_value"] \
        == VALUES["DECK_INTROSPECTION_AUTHORIZATION"]
    assert configs["oauth2-client-credentials"]["client_secret"] == VALUES["DECK_CLIENT_SECRET"]


def test_a_bad_value_from_the_environment_is_caught():
    """The check above can fail: a variable exported empty."""
    from kong_oauth2_introspection.ops.check import entry_problems
    doc = rendered(dict(VALUES, DECK_INTROSPECTION_AUTHORIZATION=""))
    problems = [v for _, e in ours(doc) for v in entry_problems(e)]
    assert any(v.path == "config.authorization_value" for v in problems), problems


def test_every_scope_of_the_plugin_carries_its_guard():
    from kong_oauth2_introspection.ops import guard
    doc = rendered()
    assert guard.problems(doc) == []
    for service in doc["services"]:
        names = [p["name"] for p in service["plugins"]]
        if any(n in OURS for n in names):
            config = next(p["config"] for p in service["plugins"] if p["name"] in OURS)
            functions = [p for p in service["plugins"] if p["name"] == "post-function"]
            assert [f["config"]["access"] for f in functions] == [[guard.render_for(config)]]


def test_check_accepts_the_rendered_file(tmp_path):
    path = tmp_path / "kong.yaml"
    path.write_text(yaml.safe_dump(rendered(), sort_keys=False))
    out = subprocess.run(plugin_command() + ["check", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all valid" in out.stdout
