"""Kong starts with what we ship, the way Kong 3.9 starts (issue 17).

The settings are read out of the files a user copies: the README's ``ini`` block
(the fenced block that holds ``pluginserver_names``) and docker/Dockerfile's ENV
plus docker/docker-compose.yml's kong environment. Only the deployment's absolute
path prefixes are mapped to this test's (the package's bin directory, a temp Kong
prefix); every other word is taken as written, the start commands' /usr/bin/env
and KONG_ADMIN_URL included. A KongNode (tests/kong/node.py) then runs each query
command, registers what Kong 3.9 registers, starts each plugin server with its own
start command and socket, loads the repository's kong.yml and serves every route
it declares, against the IdP double (introspection) and the real authorization
server (client credentials) on 127.0.0.1 instead of the compose network's Keycloak.
"""

import json
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from authserver_fixture import AuthServer, DEFAULT_CLIENTS, basic_authorization, client
from conftest import ROOT, plugin_command
from idp_double import IdPDouble, kong_yml_tokens
from kong.node import KongNode, KongStartError, parse_kong_conf, settings_from_env

INTROSPECTION = "oauth2-introspection"
CLIENT_CREDENTIALS = "oauth2-client-credentials"
OUR_PLUGINS = (INTROSPECTION, CLIENT_CREDENTIALS)
DEPLOYED_BIN = "/opt/kong-oauth2-introspection/bin"
DEPLOYED_PREFIX = "/usr/local/kong"
CC_CLIENT = "deploy-app"
# oidc-provider takes RFC 8707 resource indicators (absolute URIs) where kong.yml
# names Keycloak's audience `kong`
CC_AUDIENCE = "https://kong.test"


# ---- the documented settings, read out of the files --------------------------

def readme_ini_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```ini\n(.*?)^```", text, flags=re.S | re.M)


def readme_settings():
    """The README's kong.conf block: the ini block holding pluginserver_names."""
    blocks = [b for b in readme_ini_blocks() if "pluginserver_names" in b]
    assert len(blocks) == 1, "expected one ini block with pluginserver_names, found %d" \
        % len(blocks)
    return blocks[0]


def dockerfile_env():
    """(KONG_* variables the Dockerfile's ENV sets, the Kong version of its base image)."""
    text = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)   # continuation lines
    env, version = {}, None
    for line in logical.splitlines():
        line = line.strip()
        found = re.match(r"ARG\s+KONG_IMAGE=\S+:(\S+)", line)
        if found:
            version = found.group(1)
        if line.startswith("ENV "):
            for word in shlex.split(line[4:], comments=False):
                key, eq, value = word.partition("=")
                assert eq, "ENV without '=' is not parsed here: %r" % line
                if key.startswith("KONG_"):
                    assert "$" not in value, "variable expansion is not modelled: %s" % key
                    env[key] = value
    assert version, "no ARG KONG_IMAGE=kong:<version> in the Dockerfile"
    return env, version


def compose_kong():
    doc = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text(encoding="utf-8"))
    return doc["services"]["kong"]


def docker_env():
    """The kong container's KONG_* environment: the image's, then compose's."""
    env, version = dockerfile_env()
    extra = compose_kong().get("environment") or {}
    if isinstance(extra, list):
        extra = dict(item.split("=", 1) for item in extra)
    env.update({k: str(v) for k, v in extra.items() if k.startswith("KONG_")})
    return env, version


def compose_declarative_file(env):
    """The host file compose mounts where KONG_DECLARATIVE_CONFIG points."""
    target = env["KONG_DECLARATIVE_CONFIG"]
    for volume in compose_kong().get("volumes") or []:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return (ROOT / "docker" / source).resolve()
    raise AssertionError("no volume mounts %s" % target)


# ---- what the test supplies: its paths, its IdP, its authorization server ------

@pytest.fixture
def rewrite():
    prefix = tempfile.mkdtemp(prefix="kong-node-")   # short: a socket path has 108 bytes
    try:
        yield {DEPLOYED_BIN: str(Path(plugin_command()[0]).parent), DEPLOYED_PREFIX: prefix}
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture(scope="module")
def idp():
    with IdPDouble(kong_yml_tokens) as double:
        yield double


@pytest.fixture(scope="module")
def auth():
    extra = client(CC_CLIENT, audience=CC_AUDIENCE, access_token_format="jwt",
                   claims={"azp": CC_CLIENT})   # kong.yml: X-Client from azp
    with AuthServer(clients=DEFAULT_CLIENTS + [extra]) as server:
        yield server


def kong_yml(idp, auth, path=ROOT / "kong.yml"):
    """kong.yml with the compose network's Keycloak and Redis replaced by ours
    (endpoints, issuer, audience; no store)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    for entry, _ in plugin_entries(doc):
        conf = entry.get("config") or {}
        if entry["name"] == INTROSPECTION:
            conf["introspection_url"] = idp.url
        elif entry["name"] == CLIENT_CREDENTIALS:
            conf["url"], conf["issuer"] = auth.token_url, auth.issuer
            conf["audience"] = CC_AUDIENCE
        if entry["name"] in OUR_PLUGINS:
            conf.pop("store", None)   # the compose network's Redis is not here
    return doc


def plugin_entries(doc):
    for p in doc.get("plugins") or []:
        yield p, None
    for s in doc.get("services") or []:
        for p in s.get("plugins") or []:
            yield p, s
        for r in s.get("routes") or []:
            for p in r.get("plugins") or []:
                yield p, r
    for r in doc.get("routes") or []:
        for p in r.get("plugins") or []:
            yield p, r


def sources():
    env, version = docker_env()
    return {"readme": dict(conf_text=readme_settings()),
            "docker": dict(env=env, kong_version=version)}


# ---- every route of kong.yml, from each documented source -----------------------

def _credentials(plugin, conf, auth):
    """(headers that authenticate, what the upstream must then show)."""
    if plugin == CLIENT_CREDENTIALS:
        return {"Authorization": basic_authorization(CC_CLIENT, auth.secret_of(CC_CLIENT))}, None
    token = "tok-bob" if conf.get("consumer_by") == "client_id" else "tok-alice"
    return {"Authorization": "Bearer " + token, "X-Consumer-ID": "evil"}, None


@pytest.mark.parametrize("source", ["readme", "docker"])
def test_documented_settings_serve_every_kong_yml_route(source, rewrite, idp, auth):
    settings = sources()[source]
    doc = kong_yml(idp, auth)
    with KongNode(declarative=doc, rewrite=rewrite, **settings) as node:
        # each plugin on its own server, listening on its own socket setting
        assert set(node.servers) == set(OUR_PLUGINS)
        assert node.servers[INTROSPECTION] is not node.servers[CLIENT_CREDENTIALS]
        for name, server in node.servers.items():
            assert [p["Name"] for p in server.plugins_info] == [name]
            assert server.socket_path == "%s/%s.sock" % (rewrite[DEPLOYED_PREFIX], name)
        consumers = {c["username"]: c for c in node.consumers()}
        assert node.routes, "kong.yml declares no route"
        for route in node.routes:
            path = route.paths[0]
            ours = [e for e in node.plugins_for(route) if e["name"] in OUR_PLUGINS]
            assert len(ours) == 1, (route.entity["name"], ours)
            plugin, conf = ours[0]["name"], ours[0]["config"]
            where = "%s %s (%s)" % (source, path, plugin)

            r = node.request("GET", path)
            assert r.status == 401 and not r.proxied and r.guard_exit is None, (where, r)

            headers, _ = _credentials(plugin, conf, auth)
            r = node.request("GET", path, headers=headers)
            assert r.status == 200 and r.guard_exit is None, (where, r, r.logs)
            up = r.upstream.headers
            if plugin == CLIENT_CREDENTIALS:
                scheme, _, token = up["Authorization"].partition(" ")
                assert scheme == "Bearer" and token.count(".") == 2, where   # a JWT
                assert up.getall("X-Client") == [CC_CLIENT], where       # forward_headers
                assert r.credential is not None, where
            elif conf.get("consumer_by") == "client_id":
                # found by custom_id through the Admin API the start command names
                assert up.getall("X-Consumer-ID") == [consumers["bob"]["id"]], where
                assert up.getall("X-Consumer-Custom-ID") == ["bob-app"], where
            else:
                assert up.getall("X-Consumer-Username") == ["alice"], where
                assert up.getall("X-Consumer-ID") == [consumers["alice"]["id"]], where
            assert "evil" not in up.getall("X-Consumer-ID"), where

        if source == "readme":
            assert any(("GET", "/consumers?custom_id=bob-app") == req
                       for req in node.admin_requests), node.admin_requests

        # every plugin server down: the guard of every route answers 503
        for server in set(node.servers.values()):
            server.kill_server()
            server.fail_open = "record"
        for route in node.routes:
            ours = [e for e in node.plugins_for(route) if e["name"] in OUR_PLUGINS][0]
            headers, _ = _credentials(ours["name"], ours["config"], auth)
            r = node.request("GET", route.paths[0], headers=headers)
            assert r.status == 503 and not r.proxied and r.failed_open, (route.paths, r)
            assert r.json == {"message": "authentication unavailable"}


def test_compose_mounts_the_kong_yml_the_node_loads():
    env, _ = docker_env()
    assert env["KONG_DATABASE"] == "off"
    assert compose_declarative_file(env) == (ROOT / "kong.yml").resolve()


def test_readme_and_docker_document_the_same_plugin_servers():
    readme = parse_kong_conf(readme_settings())
    env, _ = docker_env()
    docker = settings_from_env(env)
    keys = sorted(k for k in readme if k == "plugins" or k.startswith("pluginserver_"))
    assert {k: docker.get(k) for k in keys} == {k: readme[k] for k in keys}
    assert sorted(k for k in docker if k.startswith("pluginserver_")) == \
        [k for k in keys if k.startswith("pluginserver_")]
    # the client-credentials section's lines are the main block's
    for block in readme_ini_blocks():
        for key, value in parse_kong_conf(block).items():
            if key.startswith("pluginserver_") and "--metrics-port" not in value:
                assert readme.get(key) == value, key
    # no shell pipeline, no jq: one command each
    for key, value in readme.items():
        if key.endswith(("_start_cmd", "_query_cmd")):
            assert not re.search(r"[|;&`$<>]|\bjq\b", value), (key, value)


# ---- what Kong refuses ------------------------------------------------------------

def old_settings(rewrite):
    """What the README and the Docker files said before: one server whose query
    command lists both plugins (as a user would have made `dump` print both)."""
    both = ("%(bin)s/python -c 'import json, subprocess; print(json.dumps([json.loads("
            "subprocess.check_output([\"%(bin)s/kong-oauth2-introspection\", \"dump\", "
            "\"--plugin\", n]))[0] for n in (\"%(a)s\", \"%(b)s\")]))'"
            % {"bin": DEPLOYED_BIN, "a": INTROSPECTION, "b": CLIENT_CREDENTIALS})
    return "\n".join([
        "plugins = bundled,oauth2-introspection,oauth2-client-credentials",
        "pluginserver_names = oauth2-introspection",
        "pluginserver_oauth2_introspection_socket = /usr/local/kong/oauth2-introspection.sock",
        "pluginserver_oauth2_introspection_start_cmd = /usr/bin/env KONG_ADMIN_URL="
        "http://127.0.0.1:8001 %s/kong-oauth2-introspection serve -kong-prefix "
        "/usr/local/kong" % DEPLOYED_BIN,
        "pluginserver_oauth2_introspection_query_cmd = " + both])


def test_old_one_server_settings_fail_on_kong_39_and_start_on_38(rewrite):
    conf = old_settings(rewrite)
    with pytest.raises(KongStartError) as refused:
        KongNode(conf_text=conf, rewrite=rewrite, kong_version="3.9.1")
    assert str(refused.value) == \
        "oauth2-client-credentials plugin is enabled but not installed"
    # Kong 2.8 to 3.8 registered every entry of the list
    with KongNode(conf_text=conf, rewrite=rewrite, kong_version="3.8.0") as node:
        assert set(node.servers) == set(OUR_PLUGINS)
        assert node.servers[INTROSPECTION] is node.servers[CLIENT_CREDENTIALS]


def test_the_new_settings_start_on_kong_28_to_38_too(rewrite, idp, auth):
    for version in ("2.8.5", "3.4.2", "3.8.0"):
        with KongNode(conf_text=readme_settings(), rewrite=rewrite, kong_version=version,
                      declarative=kong_yml(idp, auth)) as node:
            assert set(node.servers) == set(OUR_PLUGINS), version
            assert node.request("GET", "/echo").status == 401, version
            assert node.request("GET", "/cc-echo").status == 401, version


def test_a_plugin_no_server_declares_is_refused(rewrite):
    conf = readme_settings().replace(
        "pluginserver_names = oauth2-introspection,oauth2-client-credentials",
        "pluginserver_names = oauth2-introspection")
    with pytest.raises(KongStartError) as refused:
        KongNode(conf_text=conf, rewrite=rewrite)
    assert str(refused.value) == \
        "oauth2-client-credentials plugin is enabled but not installed"


def test_kong_yml_with_a_plugin_plugins_does_not_enable_is_refused(rewrite, idp, auth):
    conf = readme_settings().replace(
        "plugins = bundled,oauth2-introspection,oauth2-client-credentials",
        "plugins = bundled,oauth2-introspection")
    with pytest.raises(KongStartError) as refused:
        KongNode(conf_text=conf, rewrite=rewrite, declarative=kong_yml(idp, auth))
    assert str(refused.value) == ("plugin 'oauth2-client-credentials' not enabled; add it "
                                  "to the 'plugins' configuration property")


def test_a_socket_setting_the_server_does_not_listen_on_fails_start_up(rewrite):
    # Kong 3.9's default socket is PREFIX/NAME.socket; the server listens on .sock
    conf = "\n".join(line for line in readme_settings().splitlines()
                     if not line.startswith("pluginserver_oauth2_introspection_socket"))
    with pytest.raises(KongStartError) as refused:
        KongNode(conf_text=conf, rewrite=rewrite, start_timeout=5)
    assert "oauth2-introspection.socket" in str(refused.value)


def test_the_start_command_gets_no_environment(rewrite, monkeypatch):
    # nginx clears it: a start command relying on PATH does not start
    monkeypatch.setenv("PATH", str(Path(plugin_command()[0]).parent) + ":/usr/bin:/bin")
    conf = readme_settings().replace(DEPLOYED_BIN + "/kong-oauth2-introspection serve",
                                     "kong-oauth2-introspection serve")
    with pytest.raises(KongStartError) as refused:
        KongNode(conf_text=conf, rewrite=rewrite, start_timeout=5)
    assert "exited with 127" in str(refused.value)


# ---- the command line the settings use --------------------------------------------

def _run(*args):
    return subprocess.run(plugin_command() + list(args), capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args, name", [
    (["dump"], INTROSPECTION), (["-dump"], INTROSPECTION),
    (["dump", "--plugin", INTROSPECTION], INTROSPECTION),
    (["dump", "--plugin", CLIENT_CREDENTIALS], CLIENT_CREDENTIALS),
    (["--plugin", CLIENT_CREDENTIALS, "-dump"], CLIENT_CREDENTIALS),
])
def test_dump_prints_one_plugin(args, name):
    out = _run(*args)
    assert out.returncode == 0, out.stderr
    assert [p["Name"] for p in json.loads(out.stdout)] == [name]


def test_an_unknown_plugin_is_a_usage_error():
    for args in (["dump", "--plugin", "key-auth"], ["serve", "--plugin", "key-auth"]):
        out = _run(*args)
        assert out.returncode == 2 and out.stdout == ""
        assert "invalid choice: 'key-auth'" in out.stderr and "Traceback" not in out.stderr


def test_serve_listens_on_its_plugins_socket_or_the_one_named(tmp_path):
    for args, sock in ((["--plugin", CLIENT_CREDENTIALS], CLIENT_CREDENTIALS + ".sock"),
                       ([], INTROSPECTION + ".sock"),
                       (["--plugin", CLIENT_CREDENTIALS, "--socket-name", "cc.sock"],
                        "cc.sock")):
        proc = subprocess.Popen(plugin_command() + ["serve"] + args +
                                ["-kong-prefix", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not (tmp_path / sock).exists():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.stdout.read() if proc.stdout else ""
                time.sleep(0.05)
        finally:
            proc.terminate()
            out = proc.communicate(timeout=20)[0].decode()
        name = CLIENT_CREDENTIALS if CLIENT_CREDENTIALS in args else INTROSPECTION
        assert "serving %s on %s" % (name, tmp_path / sock) in out, out
        assert not (tmp_path / sock).exists()   # removed on SIGTERM
