"""A real OAuth 2.0 authorization server for the tests.

`AuthServer` runs ``tests/authserver/server.mjs`` (oidc-provider from npm) on
127.0.0.1 as a child process. It issues opaque access tokens with the
client_credentials grant, and answers RFC 7662 introspection and RFC 7009
revocation. Install it once with::

    npm ci --prefix tests/authserver

Usage::

    with AuthServer() as server:
        token = server.issue_token("alice-app", scope="read")
        server.introspect(token)          # as the introspector client "kong"

The ``auth_server`` pytest fixture (session scope) yields a started server with
the default clients (see `DEFAULT_CLIENTS`).
"""

import base64
import collections
import copy
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import requests

try:  # the module is usable without pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

SERVER_DIR = Path(__file__).resolve().parent / "authserver"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"
START_TIMEOUT = 90.0  # node start-up on a loaded 2-core machine can take tens of seconds
STDERR_TAIL_LINES = 40  # of node's stderr in a start failure's message

INTROSPECTOR_ID = "kong"
INTROSPECTOR_SECRET = "kong-introspection-secret"

DEFAULT_CLIENTS = [
    {
        "client_id": INTROSPECTOR_ID,
        "client_secret": INTROSPECTOR_SECRET,
        "introspector": True,
    },
    {
        "client_id": "alice-app",
        "client_secret": "alice-app-secret",
        "scope": "read write admin",
        "claims": {
            "username": "alice",
            "grp": "admin",
            "areas": ["office", "home"],
            "user": {"name": "John Snow"},
        },
    },
    {
        "client_id": "bob-app",
        "client_secret": "bob-app-secret",
        "scope": "read",
        "claims": {"username": "bob", "grp": "dev"},
    },
]


class AuthServerError(RuntimeError):
    """The authorization server could not be started or misbehaved."""


def client(client_id, client_secret=None, scope=None, claims=None, ttl=None,
           audience=None, introspector=False, **metadata):
    """A client entry for ``AuthServer(clients=[...])``.

    scope: space-separated string or list of the scopes the client may request.
    claims: extra members of the introspection answer for this client's tokens.
    ttl: lifetime in seconds of this client's tokens.
    audience: string or list; the first is put in the tokens' ``aud``.
    introspector: may introspect (and revoke) the tokens of every client.
    """
    entry = {"client_id": client_id,
             "client_secret": client_secret or f"{client_id}-secret",
             "introspector": bool(introspector)}
    if scope is not None:
        entry["scope"] = scope if isinstance(scope, str) else " ".join(scope)
    if claims:
        entry["claims"] = claims
    if ttl is not None:
        entry["ttl"] = int(ttl)
    if audience is not None:
        entry["audience"] = audience
    entry.update(metadata)
    return entry


def basic_authorization(client_id, client_secret):
    """The ``Basic ...`` header value of RFC 6749 section 2.3.1 (form-encoded parts)."""
    raw = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _describe_status(returncode):
    if returncode is not None and returncode < 0:
        try:
            return f"{returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    return str(returncode)


def _process_state(pid):
    """Linux only: the scheduler state of the process's main thread and the
    kernel function it waits in (a futex wait with no CPU used is a deadlock)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return ""
    state = next((line.split(":", 1)[1].strip() for line in status.splitlines()
                  if line.startswith("State:")), "state unknown")
    return f"main thread {state}" + (f", waiting in {wchan}" if wchan not in ("", "0") else "")


def _terminate(process):
    """SIGTERM, then SIGKILL after 5 s; returns once the process is reaped."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class AuthServer:
    """oidc-provider running on 127.0.0.1 with the given clients.

    clients: list of client entries (see `client`); defaults to DEFAULT_CLIENTS.
    extra_clients: entries added to the defaults (or to `clients`).
    port: 0 (default) lets the server take a free port itself, without races.
    default_ttl: lifetime in seconds of tokens of clients with no own ttl.
    tls: ``certs.make_ca_and_certs`` output: serve HTTPS with its server
        certificate, take client certificates from its CA (tls_client_auth).
    """

    def __init__(self, clients=None, extra_clients=(), port=0, default_ttl=600,
                 node=None, tls=None):
        entries = copy.deepcopy(list(DEFAULT_CLIENTS if clients is None else clients))
        entries += copy.deepcopy(list(extra_clients))
        self.clients = {c["client_id"]: c for c in entries}
        if len(self.clients) != len(entries):
            raise ValueError("duplicate client_id in clients")
        introspectors = [c for c in entries if c.get("introspector")]
        self.introspector_id = (INTROSPECTOR_ID if INTROSPECTOR_ID in self.clients
                                and self.clients[INTROSPECTOR_ID].get("introspector")
                                else introspectors[0]["client_id"] if introspectors else None)
        self.requested_port = int(port)
        self.default_ttl = int(default_ttl)
        self.node = node or shutil.which("node")
        self.port = None
        self.process = None
        self.session = requests.Session()
        self._tmpdir = None
        self._stderr = None
        self._stdout_lines = None   # stdout lines for _wait_ready (None marks EOF); dropped at READY
        self._stdout_seen = collections.deque(maxlen=50)
        self._stdout_reader = None
        self._discovery = None
        self.tls = tls
        if tls:
            self.session.verify = tls["ca_path"]
            self.session.trust_env = False  # else REQUESTS_CA_BUNDLE overrides verify

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        if self.process is not None:
            return self
        if not self.node:
            raise AuthServerError("node (Node.js >= 20) is not on PATH; it runs tests/authserver/server.mjs")
        if not (SERVER_DIR / "node_modules" / "oidc-provider").is_dir():
            raise AuthServerError(
                f"oidc-provider is not installed in {SERVER_DIR / 'node_modules'}; "
                "run: npm ci --prefix tests/authserver")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="authserver-")
        config_path = Path(self._tmpdir.name) / "config.json"
        config_path.write_text(json.dumps({
            "host": "127.0.0.1",
            "port": self.requested_port,
            "default_ttl": self.default_ttl,
            "clients": list(self.clients.values()),
            **({"tls": {"cert": self.tls["server_cert"], "key": self.tls["server_key"],
                        "ca": self.tls["ca"]}} if self.tls else {}),
        }))
        # stderr goes to a file: never blocks the server, readable on failure
        self._stderr = open(Path(self._tmpdir.name) / "stderr.log", "w+b")
        env = dict(os.environ, NODE_ENV="test")
        env.pop("AUTHSERVER_CONFIG", None)
        # bufsize=0: the reader thread gets what node wrote as soon as it is
        # written, with no lines left behind in a Python-side buffer
        self.process = subprocess.Popen(
            [self.node, str(SERVER_SCRIPT), "--config", str(config_path)],
            cwd=SERVER_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, env=env, bufsize=0)
        self._stdout_lines = queue.Queue()
        self._stdout_seen.clear()
        self._stdout_reader = threading.Thread(
            target=self._read_stdout, args=(self.process.stdout, self._stdout_lines),
            name=f"authserver-stdout-{self.process.pid}", daemon=True)
        self._stdout_reader.start()
        try:
            self.port = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _read_stdout(self, out, lines):
        """Split node's stdout into lines for _wait_ready, and keep reading after
        READY: oidc-provider prints notices there, and a full pipe would block
        the server in the middle of a test."""
        pending = b""
        while True:
            try:
                chunk = out.read(65536)
            except (OSError, ValueError):   # closed by stop()
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                self._stdout_seen.append(line)
                if lines is self._stdout_lines:   # nobody reads them after READY
                    lines.put(line)
        if pending:
            self._stdout_seen.append(pending)
            lines.put(pending)
        lines.put(None)

    def _wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_failure(f"printed no READY line within {START_TIMEOUT:.0f}s")
            try:
                line = self._stdout_lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.process.poll() is not None:   # gone, whoever holds its stdout
                    raise self._start_failure("exited before READY") from None
                continue
            if line is None:   # stdout closed: node has exited (or is exiting)
                raise self._start_failure("exited before READY", grace=5.0)
            if line.startswith(b"READY "):
                self._stdout_lines = None
                return int(line.split()[1])

    def _start_failure(self, reason, grace=0.0):
        """An AuthServerError saying why the start failed, with node's exit
        status and the end of its stderr. A server still running after ``grace``
        seconds (one that closed its stdout is on its way out: its own status is
        the one to report) is stopped, after noting where it hangs."""
        process = self.process
        text = f"authorization server (pid {process.pid}) {reason}"
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            where = _process_state(process.pid)
            if where:
                text += f"; it was still running ({where})"
            _terminate(process)
        if self._stdout_reader is not None:
            self._stdout_reader.join(timeout=1)   # its last stdout lines, if any
        text += f"; exit status {_describe_status(process.returncode)}"
        seen = b"\n".join(self._stdout_seen).decode(errors="replace")
        if seen:
            text += "\n--- stdout ---\n" + seen
        tail = self.stderr_text().splitlines()[-STDERR_TAIL_LINES:]
        text += f"\n--- stderr (last {STDERR_TAIL_LINES} lines) ---\n" + (
            "\n".join(tail) if tail else "(empty)")
        return AuthServerError(text)

    def stderr_text(self):
        """What the server wrote on stderr so far (warnings, errors)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self):
        process, self.process = self.process, None
        if process is not None:
            try:
                process.stdin.close()       # the server exits when stdin closes
            except OSError:
                pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _terminate(process)
            # once node is gone its stdout ends and the reader stops; if
            # something still held the pipe open, leave the reader its file
            reader, self._stdout_reader = self._stdout_reader, None
            if reader is not None:
                reader.join(timeout=5)
            if reader is None or not reader.is_alive():
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
        self.session.close()
        self.session = requests.Session()
        if self.tls:
            self.session.verify = self.tls["ca_path"]
            self.session.trust_env = False
        self._discovery = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    # -- addresses ---------------------------------------------------------

    def _require_started(self):
        if self.port is None or self.process is None:
            raise AuthServerError("the authorization server is not started")

    @property
    def issuer(self):
        self._require_started()
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def discovery(self):
        """The server's metadata (/.well-known/openid-configuration)."""
        if self._discovery is None:
            response = self.session.get(self.issuer + "/.well-known/openid-configuration", timeout=10)
            response.raise_for_status()
            self._discovery = response.json()
        return self._discovery

    @property
    def token_url(self):
        return self.discovery["token_endpoint"]

    @property
    def introspection_url(self):
        return self.discovery["introspection_endpoint"]

    @property
    def revocation_url(self):
        return self.discovery["revocation_endpoint"]

    # -- credentials -------------------------------------------------------

    def secret_of(self, client_id):
        return self.clients[client_id]["client_secret"]

    def authorization(self, client_id):
        """``Basic ...`` header value authenticating `client_id`."""
        return basic_authorization(client_id, self.secret_of(client_id))

    @property
    def introspector_secret(self):
        if self.introspector_id is None:
            raise AuthServerError("no client is configured as introspector")
        return self.secret_of(self.introspector_id)

    @property
    def introspector_authorization(self):
        """``Basic ...`` header value of the introspecting client (e.g. kong)."""
        if self.introspector_id is None:
            raise AuthServerError("no client is configured as introspector")
        return self.authorization(self.introspector_id)

    # -- operations --------------------------------------------------------

    def token_response(self, client_id, scope=None, ttl=None, resource=None):
        """The raw `requests.Response` of a client_credentials token request."""
        data = {"grant_type": "client_credentials"}
        if scope is not None:
            data["scope"] = scope if isinstance(scope, str) else " ".join(scope)
        if resource is not None:
            data["resource"] = resource
        headers = {"Authorization": self.authorization(client_id)}
        if ttl is not None:
            headers["X-Test-Token-TTL"] = str(int(ttl))
        return self.session.post(self.token_url, data=data, headers=headers, timeout=10)

    def issue_token(self, client_id, scope=None, ttl=None, resource=None):
        """A fresh opaque access token of `client_id` (client_credentials grant).

        scope: string or list of scopes to request (none requested by default).
        ttl: lifetime in seconds for this token only.
        resource: RFC 8707 resource indicator (must be one of the client's audiences).
        """
        response = self.token_response(client_id, scope=scope, ttl=ttl, resource=resource)
        if response.status_code != 200:
            raise AuthServerError(
                f"token request for {client_id} failed: {response.status_code} {response.text}")
        return response.json()["access_token"]

    def introspect_response(self, token, authorization=None, token_type_hint=None):
        """The raw `requests.Response` of an introspection request."""
        data = {"token": token}
        if token_type_hint:
            data["token_type_hint"] = token_type_hint
        headers = {"Authorization": authorization or self.introspector_authorization,
                   "Accept": "application/json"}
        return self.session.post(self.introspection_url, data=data, headers=headers, timeout=10)

    def introspect(self, token, authorization=None):
        """The RFC 7662 answer for `token`, asked as the introspecting client."""
        response = self.introspect_response(token, authorization=authorization)
        if response.status_code != 200:
            raise AuthServerError(
                f"introspection failed: {response.status_code} {response.text}")
        return response.json()

    def revoke(self, token, client_id=None):
        """Revoke `token` (RFC 7009), as `client_id` or else as the introspector."""
        authorization = (self.authorization(client_id) if client_id
                         else self.introspector_authorization)
        response = self.session.post(
            self.revocation_url,
            data={"token": token, "token_type_hint": "access_token"},
            headers={"Authorization": authorization}, timeout=10)
        if response.status_code != 200:
            raise AuthServerError(
                f"revocation failed: {response.status_code} {response.text}")


if pytest is not None:
    @pytest.fixture(scope="session")
    def auth_server():
        """A started oidc-provider with DEFAULT_CLIENTS, shared by the session."""
        server = AuthServer()
        try:
            server.start()
        except AuthServerError as exc:
            if "npm ci" in str(exc) or "not on PATH" in str(exc):
                pytest.fail(str(exc), pytrace=False)
            raise
        try:
            yield server
        finally:
            server.stop()
