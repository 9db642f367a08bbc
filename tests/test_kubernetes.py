"""examples/kubernetes/: the manifests as the API server and the Kong Ingress
Controller would take them, the Helm values as Kong's chart reads them, and the
plugin configs as Kong and the plugin would.

The CRDs (their openAPIV3Schema and x-kubernetes-validations rules) and the
chart's default values are reference data in ../shared/kubernetes; those tests
skip when it is absent. The CEL rules are evaluated with cel-python (celpy)."""

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, plugin_command

EXAMPLES = ROOT / "examples" / "kubernetes"
SHARED = ROOT.parent / "shared" / "kubernetes"
OURS = ("oauth2-introspection", "oauth2-client-credentials")
PLUGIN_KINDS = ("KongPlugin", "KongClusterPlugin")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def shared(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (reference data from Kong's chart, kept in ../shared)")
    return path


def documents():
    """(file name, document) of every manifest in examples/kubernetes."""
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if path.name == "values.yaml":
            continue
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def of_kind(*kinds):
    return [(name, doc) for name, doc in documents() if doc["kind"] in kinds]


def plugin_resources():
    return of_kind(*PLUGIN_KINDS)


def resource_id(param):
    return f"{param[1]['kind']}/{param[1]['metadata']['name']}" if isinstance(param, tuple) \
        else None


def secret_value(namespace, name, key):
    for _, doc in of_kind("Secret"):
        meta = doc["metadata"]
        if meta["name"] == name and meta.get("namespace") == namespace:
            data = doc.get("stringData") or {}
            assert key in data, f"Secret {namespace}/{name} has no key {key!r}"
            return data[key]
    raise AssertionError(f"no Secret {namespace}/{name} in examples/kubernetes")


def effective_config(doc):
    """The plugin config the controller hands Kong: config or configFrom, then
    configPatches (RFC 6902 "add" of a Secret's value at a JSON pointer)."""
    namespace = doc["metadata"].get("namespace")
    if "configFrom" in doc:
        ref = doc["configFrom"]["secretKeyRef"]
        config = yaml.safe_load(secret_value(ref.get("namespace", namespace), ref["name"],
                                             ref["key"]))
    else:
        config = copy.deepcopy(doc.get("config") or {})
    for patch in doc.get("configPatches") or []:
        ref = patch["valueFrom"]["secretKeyRef"]
        value = secret_value(ref.get("namespace", namespace), ref["name"], ref["key"])
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in patch["path"].split("/")[1:]]
        target = config
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return config


# ---- the CRDs ----------------------------------------------------------------


def crd_versions():
    crds = {}
    for doc in yaml.safe_load_all(shared("kong-plugin-crds.yaml").read_text()):
        (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
        crds[doc["spec"]["names"]["kind"]] = (doc, version)
    return crds


def strict(schema):
    """The CRD schema as kubectl's strict field validation applies it: an object
    with declared properties refuses undeclared ones unless it preserves them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" and "properties" in node \
                and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for key in ("properties", "additionalProperties", "items"):
            child = node.get(key)
            if key == "properties":
                for sub in (child or {}).values():
                    walk(sub)
            else:
                walk(child)
    walk(schema)
    return schema


@pytest.mark.parametrize("resource", plugin_resources(), ids=resource_id)
def test_plugin_resources_match_the_crd_schema(resource):
    import jsonschema
    name, doc = resource
    crd, version = crd_versions()[doc["kind"]]
    assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert version["served"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, f"{name}: {errors}"
    meta = doc["metadata"]
    assert DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253
    if crd["spec"]["scope"] == "Namespaced":
        assert meta.get("namespace"), f"{name}: a namespaced resource names its namespace"
    else:
        assert "namespace" not in meta
        # the controller takes a KongClusterPlugin only with its ingress class
        assert meta.get("annotations", {}).get("kubernetes.io/ingress.class") == "kong"


def test_the_strict_schema_refuses_what_the_api_server_would():
    """The check above can fail: a misspelt field and a wrong type are refused."""
    import jsonschema
    _, version = crd_versions()["KongPlugin"]
    validator = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    good = {"apiVersion": "configuration.konghq.com/v1", "kind": "KongPlugin",
            "metadata": {"name": "x"}, "plugin": "oauth2-introspection", "config": {"a": 1}}
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors(dict(good, configPatch=[])))
    assert list(validator.iter_errors(dict(good, disabled="no")))
    assert list(validator.iter_errors({k: v for k, v in good.items() if k != "plugin"}))
    patch = {"path": "/x", "valueFrom": {"secretKeyRef": {"name": "s"}}}   # no key
    assert list(validator.iter_errors(dict(good, configPatches=[patch])))


def cel_rules(kind):
    _, version = crd_versions()[kind]
    return version["schema"]["openAPIV3Schema"].get("x-kubernetes-validations", [])


def evaluate(rule, obj, old=None):
    import celpy
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    activation = {"self": celpy.json_to_cel(obj)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    return bool(program.evaluate(activation))


@pytest.mark.parametrize("resource", plugin_resources(), ids=resource_id)
def test_plugin_resources_pass_the_crd_validation_rules(resource):
    name, doc = resource
    rules = cel_rules(doc["kind"])
    assert rules, "the CRD has no x-kubernetes-validations: the data changed"
    for rule in rules:
        # A transition rule (oldSelf) runs on updates: applying the file again.
        old = doc if "oldSelf" in rule["rule"] else None
        assert evaluate(rule["rule"], doc, old), f"{name}: {rule['message']}"


def test_the_validation_rules_refuse_what_they_should():
    """The CEL evaluation above can fail: each rule refuses its counter-example."""
    base = {"plugin": "oauth2-introspection", "config": {}}
    secret = {"secretKeyRef": {"name": "s", "key": "k"}}
    patches = [{"path": "/x", "valueFrom": secret}]
    refused = {
        "Using both config and configFrom fields is not allowed.":
            (dict(base, configFrom=secret), None),
        "Using both configFrom and configPatches fields is not allowed.":
            ({"plugin": "p", "configFrom": secret, "configPatches": patches}, None),
        "The plugin field is immutable": (base, dict(base, plugin="key-auth")),
    }
    for kind in PLUGIN_KINDS:
        rules = cel_rules(kind)
        assert {r["message"] for r in rules} == set(refused), kind
        for rule in rules:
            obj, old = refused[rule["message"]]
            assert not evaluate(rule["rule"], obj, old), rule["rule"]
            assert evaluate(rule["rule"], base, base if old is not None else None)


# ---- the plugin configs --------------------------------------------------------


@pytest.mark.parametrize("resource", [r for r in plugin_resources() if r[1]["plugin"] in OURS],
                         ids=resource_id)
def test_plugin_configs_pass_the_plugins_schema_and_checks(resource):
    from kong_oauth2_introspection.ops.check import PLUGINS
    name, doc = resource
    config = effective_config(doc)
    plugin_schema, deep = PLUGINS[doc["plugin"]]()
    parsed, violations = plugin_schema.validate(config)
    assert not violations, f"{name}: {[str(v) for v in violations]}"
    assert not deep(parsed), f"{name}: {[str(v) for v in deep(parsed)]}"
    # the secrets come from Secrets, not from the resource
    for secret_field in ("authorization_value", "client_secret"):
        assert secret_field not in (doc.get("config") or {}), f"{name}: {secret_field} inline"


def test_every_secret_field_of_our_plugins_is_patched_in_from_a_secret():
    patched = {(doc["plugin"], p["path"]) for _, doc in plugin_resources()
               for p in doc.get("configPatches") or []}
    assert ("oauth2-introspection", "/authorization_value") in patched
    assert ("oauth2-client-credentials", "/client_secret") in patched
    from_secret = [doc for _, doc in plugin_resources() if "configFrom" in doc]
    assert from_secret and all(d["kind"] == "KongClusterPlugin" for d in from_secret)


def test_the_guard_is_what_the_guard_command_prints():
    from kong_oauth2_introspection.ops import guard
    (_, doc), = [r for r in of_kind("KongClusterPlugin") if r[1]["plugin"] == "post-function"]
    printed = subprocess.run(plugin_command() + ["guard"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    (entry,) = yaml.safe_load(printed)
    assert doc["config"] == entry["config"]
    assert "global" not in doc["metadata"].get("labels", {})
    # and it fits every config of ours it is attached beside
    for _, plugin in plugin_resources():
        if plugin["plugin"] in OURS:
            assert doc["config"]["access"] == [guard.render_for(effective_config(plugin))]


def test_annotations_attach_existing_plugins_each_with_the_guard():
    plugins = plugin_resources()
    annotated = [(name, doc) for name, doc in documents()
                 if "konghq.com/plugins" in doc["metadata"].get("annotations", {})]
    assert {d["kind"] for _, d in annotated} >= {"Ingress"}
    attached = set()
    for name, doc in annotated:
        names = [n.strip() for n in doc["metadata"]["annotations"]["konghq.com/plugins"]
                 .split(",")]
        namespace = doc["metadata"].get("namespace")
        resolved = []
        for plugin_name in names:
            # the controller looks in the object's namespace first, then cluster-wide
            match = [d for _, d in plugins if d["metadata"]["name"] == plugin_name and (
                d["kind"] == "KongClusterPlugin" or d["metadata"].get("namespace") == namespace)]
            assert match, f"{name}: {doc['metadata']['name']} names no plugin {plugin_name!r}"
            resolved.append(sorted(match, key=lambda d: d["kind"] != "KongPlugin")[0])
        kinds = [d["plugin"] for d in resolved]
        if any(k in OURS for k in kinds):
            assert "post-function" in kinds, f"{name}: {doc['metadata']['name']} has no guard"
        attached |= set(kinds)
    assert set(OURS) <= attached


def test_check_reads_the_manifests():
    probe = "\n".join([
        "apiVersion: configuration.konghq.com/v1", "kind: KongPlugin",
        "metadata: {name: probe, namespace: demo}", "plugin: oauth2-introspection",
        "config: {introspection_url: 'https://idp.example/introspect', ttl: -1}"])
    out = subprocess.run(plugin_command() + ["check", "-"], input=probe, capture_output=True,
                         text=True, timeout=60)
    if "ttl" not in out.stdout:
        pytest.skip("check does not read manifests yet")
    assert out.returncode == 1
    for path in sorted(EXAMPLES.glob("kong*plugin-*.yaml")):
        ours = [d for d in yaml.safe_load_all(path.read_text()) if d and d["plugin"] in OURS]
        if not ours or all("configFrom" in d for d in ours):
            continue  # a config wholly in a Secret: nothing in the file to check
        run = subprocess.run(plugin_command() + ["check", str(path)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, f"{path.name}: {run.stdout}{run.stderr}"


# ---- the chart values -----------------------------------------------------------


def values():
    return yaml.safe_load((EXAMPLES / "values.yaml").read_text())


def key_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,), value
            yield from key_paths(value, prefix + (key,))


def test_values_set_only_keys_the_chart_has():
    defaults = yaml.safe_load(shared("kong-chart-3.4.1-values.yaml").read_text())
    for path, value in key_paths(values()):
        node = defaults
        for i, key in enumerate(path):
            if isinstance(node, dict) and key in node:
                node = node[key]
                continue
            # env is open: any kong.conf setting, checked below
            parent = path[:i]
            assert parent == ("env",) or node == {}, \
                f"values.yaml: {'.'.join(map(str, path))} is not a key of the chart"
            break
    assert values()["image"]["repository"] != defaults["image"]["repository"]


def test_values_run_one_plugin_server_per_plugin_from_the_image():
    env = values()["env"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    venv = re.search(r"(?m)^ENV PLUGIN_VENV=(\S+)$", dockerfile).group(1)
    script = f"{venv}/bin/kong-oauth2-introspection"
    assert env["plugins"].split(",") == ["bundled", *OURS]
    assert env["pluginserver_names"].split(",") == list(OURS)
    # the chart's prefix (KONG_PREFIX), where Kong and the servers meet
    defaults_prefix = "/kong_prefix/"
    assert env.get("prefix", defaults_prefix) == defaults_prefix
    for name in OURS:
        key = "pluginserver_" + name.replace("-", "_")
        assert env[key + "_socket"] == f"{defaults_prefix}{name}.sock"
        start = shlex.split(env[key + "_start_cmd"])
        if start[0] == "/usr/bin/env":
            start = [a for a in start[1:] if not re.match(r"^[A-Z_]+=", a)]
        assert start == [script, "serve", "--plugin", name, "-kong-prefix",
                         defaults_prefix.rstrip("/")]
        assert shlex.split(env[key + "_query_cmd"]) == [script, "dump", "--plugin", name]
    # the Admin API URL the start command passes is the loopback listener the values open
    admin = values()["admin"]
    assert not admin["enabled"] and admin["http"]["enabled"]
    assert f"KONG_ADMIN_URL=http://127.0.0.1:{admin['http']['containerPort']}" \
        in env["pluginserver_oauth2_introspection_start_cmd"]
    assert re.match(r"^3\.\d+", str(values()["image"]["effectiveSemver"]))


@pytest.mark.parametrize("name", OURS)
def test_the_query_commands_list_their_one_plugin(name):
    cmd = shlex.split(values()["env"][f"pluginserver_{name.replace('-', '_')}_query_cmd"])
    out = subprocess.run(plugin_command() + cmd[1:], capture_output=True, text=True, timeout=60)
    if out.returncode == 2 and "unrecognized arguments" in out.stderr:
        pytest.skip("dump --plugin is not in this build yet")
    assert out.returncode == 0, out.stderr
    assert [p["Name"] for p in json.loads(out.stdout)] == [name]


def test_readme_names_every_file():
    readme = (EXAMPLES / "README.md").read_text()
    for path in EXAMPLES.glob("*.yaml"):
        assert f"`{path.name}`" in readme, path.name
    assert "docker/Dockerfile" in readme and "helm install" in readme


def test_namespaces_exist():
    namespaces = {d["metadata"]["name"] for _, d in of_kind("Namespace")} | {"kong"}
    for name, doc in documents():
        if doc["kind"] != "Namespace" and "namespace" in doc["metadata"]:
            assert doc["metadata"]["namespace"] in namespaces, f"{name}: {doc['metadata']}"

