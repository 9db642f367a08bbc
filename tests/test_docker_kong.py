"""The plugin inside a real Kong: docker/Dockerfile, docker/docker-compose.yml,
kong.yml and docker/keycloak/realm.json, end to end, the fail-closed guard and
the Redis token cache included.

Needs a Docker engine (and the compose plugin). Without one, the whole module
is skipped with the reason. With one, it builds the image with the Docker SDK,
starts Kong (DB-less) + Keycloak + an echo upstream with `docker compose` on
free 127.0.0.1 ports, waits for them (bounded), sends real requests, and
always tears the stack down (`down -v`).
"""

import io
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
DOCKERFILE = "docker/Dockerfile"
IMAGE_TAG = "kong-oauth2-introspection:dev"   # the kong service's `image:` in the compose file
PLUGIN = "oauth2-introspection"
REALM_ISSUER = "http://keycloak:8080/realms/kong"

# Bounded waits (seconds).
BUILD_TIMEOUT = 900
UP_TIMEOUT = 600   # includes pulling the Keycloak and echo images
READY_TIMEOUT = 240
DOWN_TIMEOUT = 120
HTTP_TIMEOUT = 15

# Test-only credentials from docker/keycloak/realm.json, docker-compose.yml, kong.yml.
CLIENTS = {"alice-app": "alice-secret", "bob-app": "bob-secret"}
REDIS_PASSWORD = "kong-redis-test-password"
GUARD_BODY = {"message": "authentication unavailable"}
KONG_SILENCE = 60   # seconds Kong waits for a plugin server's answer

# Signals every process of the plugin server in the kong container (the venv's
# Python is the only interpreter there; the image has no pkill).
_SIGNAL_SERVER = """
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\\0")
    except OSError:
        continue
    if b"serve" in argv and any(a.endswith(b"/kong-oauth2-introspection") for a in argv):
        os.kill(int(pid), int(sys.argv[1]))
        print(pid)
"""


def _skip_module(reason):
    pytest.skip(reason + ": real-Kong tests skipped", allow_module_level=True)


def _docker_client():
    """A Docker SDK client that answered a ping, or skip the module."""
    try:
        import docker
    except ImportError:
        _skip_module("the Docker SDK is not installed (pip install '.[test]')")
    docker_host = os.environ.get("DOCKER_HOST")
    try:
        docker.from_env(timeout=10).ping()   # fail fast on a dead DOCKER_HOST
        return docker.from_env(timeout=BUILD_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - any failure means "no engine"
        if docker_host:
            where = "DOCKER_HOST=%s did not answer (%s)" % (docker_host, type(err).__name__)
        elif not os.path.exists("/var/run/docker.sock"):
            where = "DOCKER_HOST unset / /var/run/docker.sock missing"
        else:
            where = "/var/run/docker.sock did not answer (%s)" % type(err).__name__
        _skip_module("no Docker engine reachable (%s)" % where)


def _compose_command():
    """`docker compose` (v2), or the standalone v2 binary, or skip the module."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            done = subprocess.run(cmd + ["version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        found = re.search(r"version v?(\d+)\.", done.stdout)
        if done.returncode == 0 and found and int(found.group(1)) >= 2:
            return cmd
    _skip_module("Docker Compose v2 not found (neither `docker compose` nor `docker-compose`)")


DOCKER = _docker_client()
COMPOSE = _compose_command()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_context():
    """The files the Dockerfile copies, as a tar: the repository's .venv,
    node_modules and .git stay out of the build context."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in ("pyproject.toml", "README.md", "schema", "kong-plugin", DOCKERFILE):
            path = ROOT / rel
            if not path.exists():
                continue   # the build then fails on its COPY, with a clear message
            tar.add(str(path), arcname=rel, filter=_clean_tarinfo)
    buf.seek(0)
    return buf


def _clean_tarinfo(info):
    name = Path(info.name).name
    if name in ("__pycache__", ".pytest_cache") or name.endswith((".pyc", ".egg-info")):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _build_image():
    import docker
    try:
        DOCKER.images.build(fileobj=_build_context(), custom_context=True,
                            dockerfile=DOCKERFILE, tag=IMAGE_TAG, rm=True,
                            forcerm=True, timeout=BUILD_TIMEOUT)
    except docker.errors.BuildError as err:
        lines = [str(chunk.get("stream") or chunk.get("error") or "")
                 for chunk in err.build_log]
        pytest.fail("docker build failed: %s\n%s" % (err.msg, "".join(lines)[-6000:]))


class Stack:
    """One compose project on free ports."""

    def __init__(self):
        self.project = "oauth2introspection-test-" + uuid.uuid4().hex[:8]
        self.ports = {"KONG_PROXY_PORT": _free_port(), "KONG_ADMIN_PORT": _free_port(),
                      "KEYCLOAK_PORT": _free_port()}
        self.proxy = "http://127.0.0.1:%d" % self.ports["KONG_PROXY_PORT"]
        self.admin = "http://127.0.0.1:%d" % self.ports["KONG_ADMIN_PORT"]
        self.keycloak = "http://127.0.0.1:%d" % self.ports["KEYCLOAK_PORT"]
        self.env = dict(os.environ, **{k: str(v) for k, v in self.ports.items()})
        self.http = requests.Session()
        self.http.trust_env = False   # no proxy between the tests and 127.0.0.1

    def compose(self, *args, timeout=UP_TIMEOUT, check=True):
        cmd = COMPOSE + ["-f", str(COMPOSE_FILE), "-p", self.project] + list(args)
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=str(ROOT))
        if check and done.returncode != 0:
            pytest.fail("%s failed (%d):\n%s\n%s\n%s" % (" ".join(cmd), done.returncode,
                                                        done.stdout[-3000:], done.stderr[-3000:],
                                                        self.logs()))
        return done

    def logs(self):
        try:
            done = subprocess.run(COMPOSE + ["-f", str(COMPOSE_FILE), "-p", self.project,
                                             "logs", "--no-color", "--tail", "150"],
                                  env=self.env, capture_output=True, text=True, timeout=60)
            return "--- compose logs ---\n" + done.stdout[-12000:] + done.stderr[-2000:]
        except (OSError, subprocess.TimeoutExpired) as err:
            return "(no compose logs: %s)" % err

    def up(self):
        # The image was just built by the SDK under the tag the compose file
        # names, so compose must not build it a second time.
        self.compose("up", "-d", "--no-build")

    def down(self):
        self.compose("down", "-v", "--remove-orphans", timeout=DOWN_TIMEOUT, check=False)

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        checks = [
            ("Keycloak realm", lambda: self.http.get(
                self.keycloak + "/realms/kong/.well-known/openid-configuration",
                timeout=5).status_code == 200),
            ("Kong Admin API", lambda: self.http.get(self.admin + "/status",
                                                     timeout=5).status_code == 200),
            # The plugin server is up once the plugin answers for itself.
            ("plugin server", lambda: self.http.get(self.proxy + "/echo",
                                                    timeout=5).status_code == 401),
        ]
        for name, check in checks:
            while True:
                try:
                    if check():
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("%s not ready within %ds\n%s" % (name, READY_TIMEOUT, self.logs()))
                time.sleep(2)

    def exec(self, service, *cmd):
        return self.compose("exec", "-T", service, *cmd, timeout=60).stdout

    def signal_server(self, signum):
        """Send ``signum`` to the plugin server; the pids it reached."""
        out = self.exec("kong", "/opt/kong-oauth2-introspection/bin/python", "-c",
                        _SIGNAL_SERVER, str(int(signum)))
        return out.split()

    def wait_plugin_answers(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/echo").status_code == 401:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail("the plugin did not answer again within %ds\n%s" % (timeout, self.logs()))

    def token(self, client_id):
        r = self.http.post(self.keycloak + "/realms/kong/protocol/openid-connect/token",
                           data={"grant_type": "client_credentials"},
                           auth=(client_id, CLIENTS[client_id]), timeout=HTTP_TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def get(self, path, token=None, headers=None):
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        return self.http.get(self.proxy + path, headers=headers, timeout=HTTP_TIMEOUT)


@pytest.fixture(scope="module")
def stack():
    _build_image()
    s = Stack()
    try:
        s.up()
        s.wait_ready()
        yield s
    finally:
        s.down()


def upstream_headers(response):
    """The request headers the echo upstream received (names lower-cased)."""
    assert response.status_code == 200, response.text
    return {k.lower(): v for k, v in response.json()["headers"].items()}


# --- Admin API -----------------------------------------------------------

def test_plugin_is_loaded_and_configured(stack):
    # Not `GET /`: Kong 3.9 answers it 500 while a start_cmd plugin server runs
    # (Kong/kong#14260). The plugin's schema is served only when it is loaded.
    r = stack.http.get(stack.admin + "/schemas/plugins/" + PLUGIN, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text

    plugins = stack.http.get(stack.admin + "/plugins", timeout=HTTP_TIMEOUT).json()["data"]
    ours = [p for p in plugins if p["name"] == PLUGIN]
    assert len(ours) == 2   # one on the service, one on the client-echo route
    by_consumer = sorted(p["config"]["consumer_by"] for p in ours)
    assert by_consumer == ["client_id", "username"]
    for p in ours:
        assert p["config"]["introspection_url"].startswith(REALM_ISSUER + "/")

    # The guard sits on the same two scopes, as guard.py renders it.
    from kong_oauth2_introspection.ops.guard import render
    guards = [p for p in plugins if p["name"] == "post-function"]
    assert sorted((p["service"] or {}).get("id") is not None for p in guards) == [False, True]
    for p in guards:
        assert p["config"]["access"] == [render(True)]


def test_schema_served_and_enforced(stack):
    r = stack.http.get(stack.admin + "/schemas/plugins/" + PLUGIN, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text

    good = {"name": PLUGIN, "config": {"introspection_url": "http://idp.example/introspect",
                                       "authorization_value": "Basic eDp5"}}
    r = stack.http.post(stack.admin + "/schemas/plugins/validate", json=good, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text

    missing_url = {"name": PLUGIN, "config": {"authorization_value": "Basic eDp5"}}
    r = stack.http.post(stack.admin + "/schemas/plugins/validate", json=missing_url,
                        timeout=HTTP_TIMEOUT)
    assert r.status_code == 400, r.text
    assert "introspection_url" in r.json()["fields"]["config"]

    bad_choice = {"name": PLUGIN, "config": dict(good["config"], consumer_by="email")}
    r = stack.http.post(stack.admin + "/schemas/plugins/validate", json=bad_choice,
                        timeout=HTTP_TIMEOUT)
    assert r.status_code == 400, r.text
    assert "consumer_by" in r.json()["fields"]["config"]


# --- Proxy ---------------------------------------------------------------

def test_no_token_is_401_invalid_request(stack):
    r = stack.get("/echo")
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_request"
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="service"')


def test_garbage_token_is_401_invalid_token(stack):
    r = stack.get("/echo", token="not-a-token-" + uuid.uuid4().hex)
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="service"') and 'error="invalid_token"' in challenge


def test_keycloak_token_reaches_upstream_as_alice(stack):
    up = upstream_headers(stack.get("/echo", token=stack.token("alice-app")))
    assert up["x-credential-client-id"] == "alice-app"
    assert up["x-credential-identifier"] == "alice"
    assert up["x-credential-iss"] == REALM_ISSUER
    assert up["x-credential-azp"] == "alice-app"   # custom_claims_forward
    assert up["x-consumer-username"] == "alice"
    assert up["x-consumer-id"]
    assert "x-consumer-custom-id" not in up


def test_client_id_maps_to_custom_id(stack):
    up = upstream_headers(stack.get("/client-echo", token=stack.token("bob-app")))
    assert up["x-credential-client-id"] == "bob-app"
    assert up["x-consumer-username"] == "bob"
    assert up["x-consumer-custom-id"] == "bob-app"


def test_spoofed_identity_headers_never_reach_upstream(stack):
    spoofed = {"X-Consumer-Username": "mallory", "X-Consumer-ID": "spoofed-id",
               "X-Consumer-Custom-ID": "spoofed-custom", "X-Credential-Scope": "admin"}
    # A consumer matches: the plugin's values replace the client's.
    up = upstream_headers(stack.get("/echo", token=stack.token("alice-app"), headers=spoofed))
    assert up["x-consumer-username"] == "alice"
    assert up["x-consumer-id"] != "spoofed-id"
    assert "x-consumer-custom-id" not in up
    assert up.get("x-credential-scope") != "admin"
    # No consumer has custom_id alice-app: no consumer headers at all go upstream.
    up = upstream_headers(stack.get("/client-echo", token=stack.token("alice-app"),
                                    headers=spoofed))
    assert up["x-credential-client-id"] == "alice-app"
    for name in ("x-consumer-username", "x-consumer-id", "x-consumer-custom-id"):
        assert name not in up
    assert up.get("x-credential-scope") != "admin"
    # Without a token the request stops at Kong.
    assert stack.get("/echo", headers=spoofed).status_code == 401


def test_answers_are_shared_through_redis_encrypted(stack):
    token = stack.token("alice-app")
    assert stack.get("/echo", token=token).status_code == 200
    cli = ("redis", "redis-cli", "-a", REDIS_PASSWORD, "--no-auth-warning")
    # Entries are stored under the HMAC of the token (64 hex digits, no key_prefix
    # in kong.yml); leases and index sets have longer names.
    keys = [k for k in stack.exec(*cli, "--scan").split() if re.fullmatch("[0-9a-f]{64}", k)]
    assert keys, "no entry in Redis after an introspection"
    for key in keys:
        assert token not in key   # keys are HMACs of the token
    # --no-raw prints the value escaped (ASCII), as it is stored.
    value = stack.exec(*cli, "--no-raw", "GET", keys[0])
    assert value.strip() not in ("", "(nil)")
    assert "alice" not in value and "client_id" not in value   # store.secret: AES-GCM


# --- The guard: a dead or hung plugin server never lets a request through ----

def test_the_users_try_script_passes_against_the_stack(stack):
    # docker/try.sh is what a user runs after `docker compose up`: Keycloak tokens
    # through Kong, every status checked. Same ports and project as this stack.
    if COMPOSE[:2] != ["docker", "compose"]:
        pytest.skip("docker/try.sh calls `docker compose`; only docker-compose is here")
    env = dict(stack.env, COMPOSE_PROJECT_NAME=stack.project)
    done = subprocess.run(["bash", str(ROOT / "docker" / "try.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_killed_server_gives_503_not_the_upstream(stack):
    import signal
    statuses = []
    for _ in range(20):
        assert stack.signal_server(signal.SIGKILL), "no plugin server process found"
        # Ask before Kong's respawn (at most once a second) has a server listening.
        r = stack.get("/echo", headers={"X-Consumer-ID": "evil"})
        statuses.append(r.status_code)
        assert r.status_code != 200, "reached the upstream unauthenticated: %s" % r.text
        if r.status_code == 503:
            assert r.json() == GUARD_BODY
            break
    assert 503 in statuses, "never caught the server down: %s" % statuses
    stack.wait_plugin_answers()
    up = upstream_headers(stack.get("/echo", token=stack.token("alice-app")))
    assert up["x-consumer-username"] == "alice"   # healthy traffic passes again


def test_hung_server_gives_503_after_kongs_wait(stack):
    import signal
    assert stack.signal_server(signal.SIGSTOP), "no plugin server process found"
    try:
        started = time.monotonic()
        r = stack.http.get(stack.proxy + "/echo", headers={"X-Consumer-ID": "evil"},
                           timeout=KONG_SILENCE + 30)
        waited = time.monotonic() - started
    finally:
        stack.signal_server(signal.SIGCONT)
    assert r.status_code == 503, "hung server: %d %s" % (r.status_code, r.text)
    assert r.json() == GUARD_BODY
    assert waited >= KONG_SILENCE - 5   # Kong's own wait, then the guard
    stack.wait_plugin_answers()


# --- Declarative config through the Admin API (last: it reloads Kong) ----

def test_post_config_accepts_kong_yml_and_rejects_missing_url(stack):
    text = (ROOT / "kong.yml").read_text(encoding="utf-8")
    r = stack.http.post(stack.admin + "/config", json={"config": text}, timeout=60)
    assert r.status_code == 201, r.text

    broken = yaml.safe_load(text)
    del broken["services"][0]["plugins"][0]["config"]["introspection_url"]
    r = stack.http.post(stack.admin + "/config", json={"config": yaml.safe_dump(broken)},
                        timeout=60)
    assert r.status_code == 400, r.text
    assert "introspection_url" in r.text

    # The rejected config changed nothing: the plugin still guards /echo.
    deadline = time.monotonic() + 30
    while True:
        r = stack.get("/echo")
        if r.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 401 and r.json()["error"] == "invalid_request"
    up = upstream_headers(stack.get("/echo", token=stack.token("alice-app")))
    assert up["x-consumer-username"] == "alice"
