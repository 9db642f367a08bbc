"""``kong-oauth2-introspection check``: what Kong (or the plugin) would refuse in a kong.yml.

Expected answers follow Kong 3.9's schema engine (kong/db/schema/init.lua) and the
plugins entity: the comment on each case names the rule that decides it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import yaml

from kong_oauth2_introspection.ops import check
from kong_oauth2_introspection.ops.guard import post_function_entry

ROOT = Path(__file__).resolve().parent.parent
COMMAND = str(Path(sys.executable).parent / "kong-oauth2-introspection")

GOOD = """\
  - name: oauth2-introspection
    config:
      introspection_url: https://idp.example/introspect
      authorization_value: Basic a29uZzpzZWNyZXQ=
"""


def guarded(text):
    """``text`` with the guard added to every scope that carries oauth2-introspection
    (after its other plugins, so their locations stay), for the cases that are not
    about the guard; text that is not a declarative config stays as it is."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not isinstance(doc, dict):
        return text
    scopes = [doc] + list(doc.get("routes") or [])
    for service in doc.get("services") or []:
        scopes += [service] + list(service.get("routes") or [])
    for scope in scopes:
        ours = [p for p in scope.get("plugins") or [] if p.get("name") == "oauth2-introspection"]
        both = any(p.get("name") == "oauth2-client-credentials" for p in scope.get("plugins") or [])
        if ours:   # rendered for our plugins on that scope
            scope["plugins"].append(post_function_entry(
                ours[0].get("config"), ["oauth2-introspection"]
                + (["oauth2-client-credentials"] if both else [])))
    return yaml.safe_dump(doc, sort_keys=False)


def run(capsys, text, tmp_path, guard=True):
    path = tmp_path / "kong.yml"
    text = textwrap.dedent(text)
    path.write_text(guarded(text) if guard else text)
    code = check.main([str(path)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_repository_kong_yml_is_valid(capsys):
    assert check.main([str(ROOT / "kong.yml")]) == 0
    out = capsys.readouterr().out
    assert "3 oauth2-client-credentials, oauth2-introspection entries, all valid" in out


def test_every_problem_of_every_entry_with_its_location(capsys, tmp_path):
    code, lines, err = run(capsys, """\
        _format_version: "3.0"
        plugins:
          - name: key-auth
          - name: oauth2-introspection
            config:
              introspection_url: ftp://idp/x
              authorization_value: ""
              ttl: "30"
        services:
          - name: s
            url: http://upstream
            routes:
              - name: r
                paths: [/r]
                plugins:
                  - name: oauth2-introspection
                    config:
                      introspection_url: https://idp/x
                      authorization_value: Basic abc
                      consumer_by: email
                      store: {redis: {endpoints: ["redis:6379", "redis"]}}
        routes:
          - name: r2
            paths: [/r2]
            plugins:
              - name: oauth2-introspection
                config:
                  authorization_value: Basic abc
        """, tmp_path)
    assert code == 1
    # Locations count from 0 (jq); Kong's paths count array elements from 1.
    assert lines == [
        "plugins[1].config.introspection_url: invalid value: ftp://idp/x",
        "plugins[1].config.ttl: expected a number",
        # validate_field: empty strings are refused unless len_min says otherwise;
        # authorization_value is referenceable, so its value is never echoed.
        "plugins[1].config.authorization_value: length must be at least 1",
        # Kong runs at_least_one_of even on an invalid field (run_with_invalid_fields).
        "plugins[1].config.authorization_value: at least one of these fields must be "
        "non-empty: 'config.authorization_value', 'config.introspection_endpoint_auth_method'",
        "services[0].routes[0].plugins[0].config.consumer_by: "
        "expected one of: username, client_id",
        "services[0].routes[0].plugins[0].config.store.redis.endpoints.2: invalid value: redis",
        "routes[0].plugins[0].config.introspection_url: required field missing",
    ]
    assert "7 problems in 3 oauth2-introspection entries" in err


def test_vault_references_accepted_where_kong_accepts_them(capsys, tmp_path):
    # referenceable fields: a {vault://...} value skips the field's other rules,
    # store.secret's 16/24/32-byte rule included (the README advises vault references
    # for such secrets).
    code, lines, _ = run(capsys, """\
        plugins:
          - name: oauth2-introspection
            config:
              introspection_url: https://idp.example/introspect
              authorization_value: "{vault://env/introspection-authorization}"
              store:
                secret: "{vault://env/oauth2-cache-key}"
                redis:
                  endpoints: ["redis:6379"]
                  password: "{vault://env/redis-password}"
        """, tmp_path)
    assert (code, lines) == (0, ["%s: 1 oauth2-introspection entry, all valid"
                                 % (tmp_path / "kong.yml")])


def test_vault_reference_refused_in_a_field_that_is_not_referenceable(capsys, tmp_path):
    code, lines, _ = run(capsys, """\
        plugins:
          - name: oauth2-introspection
            config:
              introspection_url: "{vault://env/url}"
              authorization_value: Basic abc
        """, tmp_path)
    assert code == 1
    assert lines == ["plugins[0].config.introspection_url: invalid value: {vault://env/url}"]


def test_secrets_never_printed(capsys, tmp_path):
    code, lines, err = run(capsys, """\
        plugins:
          - name: oauth2-introspection
            config:
              introspection_url: https://idp/x
              authorization_value: 424242
              store: {secret: "0123456789-topsecret"}
        """, tmp_path)
    assert code == 1
    assert lines == ["plugins[0].config.authorization_value: expected a string",
                     "plugins[0].config.store.secret: must be 16, 24 or 32 bytes long"]
    assert "424242" not in "".join(lines) + err and "topsecret" not in "".join(lines) + err


@pytest.mark.parametrize("where,yml", [
    # A plugin nested under a consumer gets that consumer as its foreign key.
    ("consumers[0].plugins[0]",
     "consumers:\n  - username: alice\n    plugins:\n" + textwrap.indent(GOOD, "    ")),
    # The same scope given explicitly at the top level.
    ("plugins[0]", "plugins:\n" + GOOD.replace("  - name: oauth2-introspection\n",
                                               "  - name: oauth2-introspection\n"
                                               "    consumer: alice\n")),
])
def test_consumer_scoped_entry_refused(capsys, tmp_path, where, yml):
    # typedefs.no_consumer: the consumer foreign key must be null (eq = null).
    code, lines, _ = run(capsys, yml, tmp_path)
    assert code == 1
    assert lines == [f"{where}.consumer: oauth2-introspection cannot be scoped to a consumer: "
                     "it authenticates the caller, which is how Kong learns the consumer"]


def test_protocols_limited_to_http_ones(capsys, tmp_path):
    # typedefs.protocols_http: grpc, grpcs, http, https.
    code, lines, _ = run(capsys, "plugins:\n" + GOOD + "    protocols: [https, tcp]\n", tmp_path)
    assert code == 1
    assert lines == ["plugins[0].protocols.2: expected one of: grpc, grpcs, http, https"]


def test_deeper_checks_of_the_plugin_reported(capsys, tmp_path):
    code, lines, _ = run(capsys, """\
        services:
          - name: s
            url: http://upstream
            plugins:
              - name: oauth2-introspection
                config:
                  introspection_url: https://idp/x
                  authorization_value: Basic abc
                  claims: "Equals(`grp`, `admin`"
              - name: oauth2-introspection
                config:
                  introspection_url: https://idp/x
                  authorization_value: Basic abc
                  forward_headers: {"Bad Header": grp}
              - name: oauth2-introspection
                config:
                  introspection_url: https://idp/x
                  authorization_value: Basic abc
                  custom_introspection_headers: {x_path: "{{nope}}"}
        """, tmp_path)
    assert code == 1 and len(lines) == 3
    assert lines[0].startswith("services[0].plugins[0].config.claims: ") and "col" in lines[0]
    assert lines[1] == ("services[0].plugins[1].config.forward_headers: key 'Bad Header': "
                        "must be a header name: letters, digits and !#$%&'*+-.^_`|~ only")
    assert lines[2].startswith("services[0].plugins[2].config.custom_introspection_headers: ")


def test_second_plugin_checked_too(capsys, tmp_path):
    pytest.importorskip("kong_oauth2_introspection.client_credentials.config")
    code, lines, err = run(capsys, """\
        plugins:
          - name: oauth2-client-credentials
            config: {url: "https://idp/token", audience: "https://api", client_id: abc}
          - name: oauth2-client-credentials
            config: {url: "https://idp/token", audience: ""}
          - name: oauth2-introspection
            config: {introspection_url: "https://idp/x", authorization_value: Basic abc}
        """, tmp_path)
    assert code == 1
    assert lines == [
        "plugins[0].config.client_id: all or none of these fields must be set: "
        "'config.client_id', 'config.client_secret'",
        "plugins[1].config.audience: length must be at least 1"]
    assert "2 problems in 3 oauth2-client-credentials, oauth2-introspection entries" in err


def test_file_without_entry_of_ours_fails(capsys, tmp_path):
    code, lines, err = run(capsys, """\
        _format_version: "3.0"
        plugins:
          - name: key-auth
        """, tmp_path)
    assert code == 1 and lines == []
    assert "no oauth2-client-credentials or oauth2-introspection entry" in err


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "---\n"])
def test_empty_file_is_not_all_valid(capsys, tmp_path, text):
    code, lines, err = run(capsys, text, tmp_path)
    assert code == 1 and lines == [] and "empty" in err


@pytest.mark.parametrize("text,reason", [
    ("plugins: [\n", "not YAML or JSON"),
    ("- name: oauth2-introspection\n", "not a declarative config"),
])
def test_unparsable_file_exits_2(capsys, tmp_path, text, reason):
    code, lines, err = run(capsys, text, tmp_path)
    assert code == 2 and lines == [] and reason in err


def test_unreadable_file_exits_2(capsys, tmp_path):
    assert check.main([str(tmp_path / "missing.yml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert check.main([str(tmp_path)]) == 2  # a directory
    assert "cannot read" in capsys.readouterr().err
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"plugins: \xff\xfe\n")
    assert check.main([str(binary)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_json_declarative_config_accepted(capsys, tmp_path):
    path = tmp_path / "kong.json"
    path.write_text('{"plugins":\t[{"name": "oauth2-introspection", "config": '
                    '{"introspection_url": "https://idp/x", "authorization_value": ""}}]}')
    assert check.main([str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "plugins[0].config.authorization_value: length must be at least 1",
        "plugins[0].config.authorization_value: at least one of these fields must be "
        "non-empty: 'config.authorization_value', 'config.introspection_endpoint_auth_method'",
        NO_GUARD]


NO_GUARD = ("plugins: oauth2-introspection applies here without the post-function guard "
            "(run_on_preflight=true, anonymous unset)")


def test_help_and_usage(capsys):
    assert check.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "Exit codes" in out
    assert check.main([]) == 2 and "usage:" in capsys.readouterr().err
    assert check.main(["a.yml", "b.yml"]) == 2


# --- through the installed command, as a user and CI run it ------------------------

def _command(*args, stdin=None):
    return subprocess.run([COMMAND, "check", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_installed_command_exit_codes(tmp_path):
    ok = _command(str(ROOT / "kong.yml"))
    assert ok.returncode == 0 and "all valid" in ok.stdout, ok.stderr

    bad = tmp_path / "bad.yml"
    bad.write_text("plugins:\n" + GOOD.replace("Basic a29uZzpzZWNyZXQ=", '""'))
    failed = _command(str(bad))
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == [
        "plugins[0].config.authorization_value: length must be at least 1",
        "plugins[0].config.authorization_value: at least one of these fields must be "
        "non-empty: 'config.authorization_value', 'config.introspection_endpoint_auth_method'",
        NO_GUARD]

    missing = _command(str(tmp_path / "nope.yml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert "Traceback" not in missing.stderr + failed.stderr + ok.stderr


def test_installed_command_reads_standard_input():
    result = _command("-", stdin=guarded("plugins:\n" + GOOD))
    assert result.returncode == 0 and "1 oauth2-introspection entry, all valid" in result.stdout
    empty = _command("-", stdin="")
    assert empty.returncode == 1 and "all valid" not in empty.stdout


def test_a_timeout_and_retries_that_cannot_fit_the_request_deadline_are_refused(tmp_path):
    # Kong's schema bounds timeout to 30 s (one attempt fits); only check can judge
    # the product: 4 attempts of 10 s plus backoff cannot fit the 30 s deadline.
    path = tmp_path / "kong.yml"
    base = "_format_version: '3.0'\nplugins:\n- name: oauth2-introspection\n  config:\n" \
           "    introspection_url: http://idp/i\n    authorization_value: Basic x\n"
    path.write_text(guarded(base + "    timeout: 10000\n    max_retries: 3\n"))
    run = subprocess.run([COMMAND, "check", str(path)], capture_output=True, text=True)
    assert run.returncode == 1 and "request deadline" in run.stdout
    path.write_text(guarded(base + "    timeout: 10000\n    max_retries: 1\n"))
    assert subprocess.run([COMMAND, "check", str(path)], capture_output=True).returncode == 0
    path.write_text(guarded(base + "    timeout: 30001\n"))
    run = subprocess.run([COMMAND, "check", str(path)], capture_output=True, text=True)
    assert run.returncode == 1 and "config.timeout" in run.stdout


# --- check as a CI gate -------------------------------------------------------------

def test_kong_yml_without_its_guards_fails_with_one_line_per_scope(capsys, tmp_path):
    doc = yaml.safe_load((ROOT / "kong.yml").read_text())
    scopes = [doc] + doc["services"] + [r for s in doc["services"] for r in s.get("routes", [])]
    for scope in scopes:
        if scope.get("plugins"):
            scope["plugins"] = [p for p in scope["plugins"] if p["name"] != "post-function"]
    path = tmp_path / "kong.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert check.main([str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("without the post-function guard" in line for line in lines)
    assert {line.split(":")[0] for line in lines} == {
        "services[0].plugins", "services[0].routes[1].plugins", "services[1].plugins"}


def test_a_guard_rendered_for_other_settings_or_shadowed_is_a_problem(capsys, tmp_path):
    # The guard of the default settings, on a plugin with run_on_preflight false; and a
    # route's own post-function (no guard), which replaces the service's guard there.
    code, lines, _ = run(capsys, """\
        services:
          - name: s
            url: http://upstream
            plugins:
              - name: oauth2-introspection
                config: {introspection_url: "https://idp/x", authorization_value: Basic abc,
                         run_on_preflight: false}
              - %s
            routes:
              - name: r
                paths: [/r]
                plugins:
                  - name: post-function
                    config: {access: ["kong.log.info('hello')"]}
        """ % json.dumps(post_function_entry({})), tmp_path, guard=False)
    assert code == 1
    assert lines == [
        "services[0].plugins: oauth2-introspection applies here without the post-function "
        "guard (run_on_preflight=false, anonymous unset)",
        "services[0].routes[0].plugins: oauth2-introspection applies here without the "
        "post-function guard (run_on_preflight=false, anonymous unset)"]


def test_schema_and_plugin_problems_of_an_entry_are_printed_together(capsys, tmp_path):
    code, lines, err = run(capsys, """\
        plugins:
          - name: oauth2-introspection
            config:
              introspection_url: https://idp/x
              authorization_value: Basic abc
              ttl: soon
              claims: "Equals(`grp`"
              client_tls: {ca: not a pem}
        """, tmp_path)
    assert code == 1
    assert lines[0] == "plugins[0].config.ttl: expected a number"
    assert lines[1] == "plugins[0].config.client_tls.ca: not PEM certificates"
    assert lines[2].startswith("plugins[0].config.claims: ") and len(lines) == 3
    assert "3 problems in 1 oauth2-introspection entry" in err


def test_pems_and_jwks_are_parsed(capsys, tmp_path):
    from certs import make_ca_and_certs
    pems = make_ca_and_certs(tmp_path / "pki")
    good = {"ca": pems["ca"], "cert": pems["client_cert"], "key": pems["client_key"]}
    for tls, expected in [
            (good, []),
            (dict(good, cert=pems["client_key"]),
             ["plugins[0].config.client_tls.cert: not a PEM certificate"]),
            (dict(good, key="-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
             ["plugins[0].config.client_tls.key: not an unencrypted PEM private key"]),
            (dict(good, key="{vault://env/tls-key}"), [])]:
        config = {"introspection_url": "https://idp/x", "authorization_value": "Basic abc",
                  "client_tls": tls}
        code, lines, _ = run(capsys, yaml.safe_dump(
            {"plugins": [{"name": "oauth2-introspection", "config": config}]}), tmp_path)
        assert lines[:-1] == expected if not expected else lines == expected
        assert code == (1 if expected else 0)
        assert "PRIVATE KEY" not in "\n".join(lines)
    code, lines, _ = run(capsys, """\
        plugins:
          - name: oauth2-introspection
            config:
              introspection_url: https://idp/x
              introspection_endpoint_auth_method: private_key_jwt
              client_id: kong
              client_jwk: '{"kty": "EC", "crv": "P-256", "d": "AAAA"}'
          - name: oauth2-client-credentials
            config:
              url: https://idp/token
              audience: https://api
              client_config: {tls: {ca: "-----BEGIN CERTIFICATE-----\\nnope\\n"}}
        """, tmp_path)
    assert code == 1
    assert lines == ["plugins[0].config.client_jwk: is not a usable ES256 key",
                     "plugins[1].config.client_config.tls.ca: not PEM certificates"]


@pytest.mark.parametrize("text", [
    "plugins:\n  - name: oauth2-introspection\n    config:\n      ttl: 30\n      ttl: 60\n",
    '{"plugins":\t[{"name": "oauth2-introspection", "name": "key-auth"}]}',
])
def test_duplicate_keys_refused_with_one_line(capsys, tmp_path, text):
    path = tmp_path / "kong.yml"
    path.write_text(text)
    assert check.main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "duplicate key" in err


@pytest.mark.parametrize("text", ["[" * 1000 + "]" * 1000,
                                  '{"a":' * 1000 + "1" + "}" * 1000,
                                  "plugins:\n" + "".join("  " * n + "- \n"
                                                          for n in range(1, 1000))])
def test_input_nested_too_deep_refused_with_one_line(text):
    result = _command("-", stdin=text)
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


DECK = """\
_format_version: "3.0"
_info:
  select_tags: [auth]
  defaults: {}
_konnect:
  control_plane_name: default
plugins:
  - name: oauth2-introspection
    tags: [auth]
    config:
      introspection_url: ${{ env "DECK_INTROSPECTION_URL" }}
      authorization_value: ${{ env "DECK_INTROSPECTION_AUTH" }}
      ttl: 30
  - %s
"""


def test_deck_files_and_their_env_placeholders(tmp_path):
    path = tmp_path / "kong.yml"
    path.write_text(DECK % json.dumps(post_function_entry({})))
    result = _command(str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all valid (2 values filled in later)" in result.stdout
    assert ('plugins[0].config.authorization_value: resolved by decK '
            '(${{ env "DECK_INTROSPECTION_AUTH" }}), not checked') in result.stderr
    assert "plugins[0].config.introspection_url: resolved by decK" in result.stderr
    # A literal value next to them is still checked.
    path.write_text((DECK % json.dumps(post_function_entry({}))).replace("ttl: 30", "ttl: -1"))
    result = _command(str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "plugins[0].config.ttl: value should be between 0 and 31536000"]


MANIFESTS = """\
apiVersion: v1
kind: Secret
metadata: {name: introspection-auth}
stringData: {authorization_value: "Basic a29uZzpzZWNyZXQ="}
---
apiVersion: configuration.konghq.com/v1
kind: KongPlugin
metadata: {name: introspection}
plugin: oauth2-introspection
config:
  introspection_url: https://idp.example/introspect
  ttl: 30
configPatches:
  - path: /authorization_value
    valueFrom: {secretKeyRef: {name: introspection-auth, key: authorization_value}}
---
apiVersion: configuration.konghq.com/v1
kind: KongClusterPlugin
metadata: {name: client-credentials, labels: {global: "true"}}
plugin: oauth2-client-credentials
configFrom:
  secretKeyRef: {name: cc-config, key: config, namespace: kong}
---
apiVersion: configuration.konghq.com/v1
kind: KongClusterPlugin
metadata: {name: guard}
plugin: post-function
config: {access: ["return"]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
"""


def test_kubernetes_manifests(tmp_path):
    path = tmp_path / "plugins.yaml"
    path.write_text(MANIFESTS)
    result = _command(str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 oauth2-client-credentials, oauth2-introspection entries, all valid" in result.stdout
    assert ("KongPlugin/introspection.config.authorization_value: resolved by Kubernetes "
            "(Secret introspection-auth key authorization_value), not checked") in result.stderr
    assert ("KongClusterPlugin/client-credentials.config: resolved by Kubernetes "
            "(Secret cc-config key config), not checked") in result.stderr
    bad = MANIFESTS.replace("ttl: 30", "ttl: -1").replace(
        "configFrom:", "config: {url: https://idp/t}\nconfigFrom:")
    path.write_text(bad)
    result = _command(str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "KongClusterPlugin/client-credentials: config and configFrom: not both "
        "(the CRD refuses it)",
        "KongPlugin/introspection.config.ttl: value should be between 0 and 31536000"]
    # Without the patch, nothing says how the plugin authenticates to the IdP.
    path.write_text(MANIFESTS.split("configPatches:")[0])
    result = _command(str(path))
    assert result.returncode == 1 and "at least one of these fields" in result.stdout


def test_every_plugin_level_problem_of_one_entry(capsys, tmp_path):
    # the runtime's parse stops at the first of these; check names all three
    code, lines, err = run(capsys, """\
        plugins:
          - name: oauth2-introspection
            config:
              introspection_url: https://idp.example/introspect
              authorization_value: Basic a29uZzpzZWNyZXQ=
              claims: "Equals(`grp`"
              forward_headers: {"Bad Header": "grp"}
              scopes_required: ['read"write']
              username_claim: "a..b"
        """, tmp_path)
    assert code == 1
    # Kong's schema rule first, then the plugin's own three
    assert sorted(line.split(":")[0] for line in lines) == [
        "plugins[0].config.claims", "plugins[0].config.forward_headers",
        "plugins[0].config.scopes_required", "plugins[0].config.username_claim"], lines
    assert "4 problems in 1 oauth2-introspection entry" in err, err


def test_every_plugin_level_problem_of_one_client_credentials_entry(capsys, tmp_path):
    pytest.importorskip("kong_oauth2_introspection.client_credentials.config")
    code, lines, err = run(capsys, """\
        plugins:
          - name: oauth2-client-credentials
            config:
              url: https://idp.example/token
              audience: https://api
              claims: "Equals(`grp`"
              forward_headers: {"Bad Header": "grp"}
              username_claim: "a..b"
        """, tmp_path)
    assert code == 1
    assert len(lines) == 3 + sum("guard" in line for line in lines), lines
    assert sorted(line.split(":")[0] for line in lines if "guard" not in line) == [
        "plugins[0].config.claims", "plugins[0].config.forward_headers",
        "plugins[0].config.username_claim"], lines
