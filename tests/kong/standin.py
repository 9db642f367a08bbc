"""KongStandIn: Kong Gateway 3.9 (OSS) as a plugin server sees it, for tests.

It runs the REAL plugin server (Kong's query command ``cmd -dump`` and start
command ``cmd -kong-prefix DIR``, socket ``DIR/<name>.sock``) and drives it over
its REAL MessagePack-RPC socket, doing in Python what Kong does on its side:

* process management: kong/runloop/plugin_servers/process.lua (worker 0 spawns
  the start command and, with ``respawn=True``, respawns a server that exits, for
  ever, exit 127 included: at once when it ran a second or more, else one second
  after its spawn; on ``close`` (kong stop) it sends SIGTERM and does not wait);
* per request: nginx first (nginx.py: 400 for a second Authorization line...),
  then the plugin's phase through plugin.lua / mp_rpc.lua (instances.py, rpc.py,
  pdk.py), then the bundled post-function guard if one is set (guard.py);
* when the RPC fails (connect refused, connection dropped, no answer within
  ``rpc_timeout``, 60 s by default like Kong's cosocket) or the instance cannot be
  claimed, Kong logs the error and the request goes on to the upstream WITHOUT
  the plugin: ``Result.failed_open`` / ``passed_unauthenticated``. By default
  (``fail_open="raise"``) that raises FailedOpen, an AssertionError, so a test
  where it happens fails; ``fail_open="record"`` only records it.

Facts: shared/design/kong-plugin-server.md. This package never imports the
plugin's code: it is a test oracle.
"""

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .admin import admin_handler
from .guard import PostFunction
from .instances import ClaimFailed, Instances
from .lua import LuaError, lua_str
from .nginx import (DEFAULT_BODY_BUFFER, CIMultiDict, HeadersIn, drop_invalid_names,
                    duplicate_unique_header, header_pairs, ngx_escape)
from .pdk import PDK, Exited
from .proxy import kong_response_head, parse_raw_request, proxied_response_head, upstream_head
from .result import FailedOpen, Result, Upstream
from .rpc import Rpc, RpcError, bridge_loop
from .schema import PluginSchema
from .state import RequestState

__all__ = ["KongStandIn", "Instance"]

# Kong's error pages (kong/tools/... error handlers, 3.9): JSON with the request id,
# text/plain for nginx's own 400s
_JSON_ERROR = '{\n  "message":"%s",\n  "request_id":"%s"\n}'
_TEXT_ERROR = "%s\nrequest_id: %s\n"


class Instance(object):
    """A configured plugin entity and exactly the Config StartInstance sends."""

    def __init__(self, name: str, plugin_id: str, conf_json: str) -> None:
        self.name = name
        self.plugin_id = plugin_id
        self.conf_json = conf_json
        self.conf: Dict[str, Any] = json.loads(conf_json)
        self.seq: int = self.conf["__seq__"]
        self.route_id: Optional[str] = self.conf.get("route_id")
        self.service_id: Optional[str] = self.conf.get("service_id")
        self.consumer_id: Optional[str] = self.conf.get("consumer_id")

    def __repr__(self) -> str:
        return "Instance(%s #%s seq=%s)" % (self.name, self.plugin_id, self.seq)


def _scope_id(value: Union[None, bool, str], default: str) -> Optional[str]:
    if value is None or value is False:
        return None
    return default if value is True else str(value)


class KongStandIn(object):
    """Options: ``env`` (what ``env VAR=... cmd`` would pass; ``inherit_env`` to
    pass the test's whole environment), ``rpc_timeout`` (60 s, the cosocket
    default), ``kong_version`` ("3.9"; "2.8" answers ``nil, err`` with StepError),
    ``client_body_buffer_size`` (8192), ``fail_open`` ("raise" or "record"),
    ``instance_claim_wait`` (10 s), ``respawn`` (worker 0 respawns the server),
    ``respawn_interval`` (1 s: the least time between two spawns),
    ``post_function`` (guard chunks), ``socket_name`` (default ``<first plugin>``),
    ``upstream_response`` ((status, header pairs, body) the upstream answers; by
    default 200, no headers, empty body), ``proxy_port`` (Kong's proxy listener).
    As a node's plugin server (node.py): ``plugins_info`` (what its query command
    printed), ``start_cmd`` (run as ``exec <start_cmd>`` through /bin/sh, with only
    ``env``) and ``socket_path`` (its ``pluginserver_<name>_socket``)."""

    def __init__(self, command: Sequence[str], *, env: Optional[Dict[str, str]] = None,
                 rpc_timeout: float = 60.0, start_timeout: float = 20.0,
                 kong_version: str = "3.9", client_body_buffer_size: int = DEFAULT_BODY_BUFFER,
                 fail_open: str = "raise", instance_claim_wait: float = 10.0,
                 respawn: bool = False, respawn_interval: float = 1.0,
                 post_function: Optional[Sequence[str]] = None,
                 socket_name: Optional[str] = None, inherit_env: bool = False,
                 plugins_info: Optional[List[Dict[str, Any]]] = None,
                 start_cmd: Optional[str] = None, socket_path: Optional[str] = None,
                 upstream_response: Optional[Tuple[int, Sequence[Tuple[str, str]], bytes]] = None,
                 proxy_port: int = 8000) -> None:
        if fail_open not in ("raise", "record"):
            raise ValueError("fail_open must be 'raise' or 'record'")
        self.command = list(command)
        self.start_cmd = start_cmd
        # the query command runs with Kong's environment; nginx clears the start
        # command's (only TZ survives): what it needs comes from `env VAR=... cmd`,
        # modelled by ``env`` (``inherit_env=True`` passes the test's environment on)
        self.query_env = dict(os.environ, **(env or {}))
        base = dict(os.environ) if inherit_env else \
            {k: v for k, v in os.environ.items() if k == "TZ"}
        self.env = dict(base, **(env or {}))
        self.rpc_timeout = rpc_timeout
        self.start_timeout = start_timeout
        self.kong_version = kong_version
        self.step_errors = int(kong_version.split(".")[0]) < 3
        # nginx's max_headers (default 1000) came with Kong 3.9.3
        self.max_header_lines: Optional[int] = 1000 if _version(kong_version) >= (3, 9, 3) \
            else None
        self.upstream_response = upstream_response
        self.proxy_port = proxy_port
        self.client_body_buffer_size = client_body_buffer_size
        self.fail_open = fail_open
        self.respawn = respawn
        self.respawn_interval = respawn_interval   # process.lua: next_spawn = now + 1
        self.node_id = str(uuid.uuid4())
        self.route: Dict[str, Any] = {"id": str(uuid.uuid4()), "name": "standin-route", "paths": ["/"],
                      "protocols": ["http", "https"], "strip_path": True,
                      "preserve_host": False}
        self.service: Dict[str, Any] = {"id": str(uuid.uuid4()), "name": "standin-service",
                        "host": "upstream.test", "port": 80, "protocol": "http", "path": None}
        self.admin_requests: List[Any] = []
        self.respawns = 0
        # (monotonic time, pid) of every spawn, and process.lua's log lines
        self.spawns: List[Tuple[float, int]] = []
        self.process_log: List[Tuple[str, str]] = []
        self.post_function: Optional[PostFunction] = None
        self._consumers: Dict[str, Dict[str, Any]] = {}
        self._clock = threading.Lock()
        self._seq = itertools.count(1)
        self._instances = Instances(instance_claim_wait)
        self._log: List[str] = []
        self._log_lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._proc_lock = threading.Lock()
        self._last_spawn = 0.0
        self._closing = False
        self._prefix = tempfile.mkdtemp(prefix="kong-standin-")
        self._admin: Optional[ThreadingHTTPServer] = None
        self._rpc: Optional[Rpc] = None
        try:
            if post_function:
                self.set_post_function(post_function)
            self._admin = ThreadingHTTPServer(("127.0.0.1", 0), admin_handler(self))
            self._admin.daemon_threads = True
            threading.Thread(target=self._admin.serve_forever, daemon=True).start()
            # the plugin server inherits Kong's environment; point it at this Admin API
            # (a node's start command passes what it needs itself)
            if "KONG_ADMIN_URL" not in (env or {}) and start_cmd is None:
                self.env["KONG_ADMIN_URL"] = self.admin_url
            self.plugins_info = plugins_info if plugins_info is not None else self._query()
            self.info = self.plugins_info[0]
            self.name: str = self.info["Name"]
            self.schemas = {p["Name"]: PluginSchema(p) for p in self.plugins_info}
            self.socket_path = socket_path or os.path.join(
                self._prefix, (socket_name or self.name) + ".sock")
            self._rpc = Rpc(self.socket_path, rpc_timeout, self._instances.notification)
            self._spawn()
        except BaseException:
            self.close()
            raise

    # ---- process management (process.lua)
    def _query(self) -> List[Dict[str, Any]]:
        out = subprocess.run(self.command + ["-dump"], env=self.query_env, capture_output=True,
                             timeout=60)
        if out.returncode != 0:
            raise RuntimeError("query command failed (%d): %s"
                               % (out.returncode, out.stderr.decode(errors="replace")))
        data = json.loads(out.stdout.decode())
        if isinstance(data, dict):
            data = data.get("Plugins", [])
        if not data:
            raise RuntimeError("query command listed no plugin")
        return data

    def _spawn(self, wait: bool = True) -> None:
        argv = ["/bin/sh", "-c", "exec " + self.start_cmd] if self.start_cmd is not None \
            else self.command + ["-kong-prefix", self._prefix]
        proc = subprocess.Popen(argv, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        with self._proc_lock:
            self._proc = proc
            self._last_spawn = time.monotonic()
            self.spawns.append((self._last_spawn, proc.pid))
        self.process_log.append(("notice", "[pluginserver] started, pid %d" % proc.pid))
        threading.Thread(target=self._read_output, args=(proc,), daemon=True).start()
        threading.Thread(target=self._watch, args=(proc,), daemon=True).start()
        if wait:
            self._wait_listening(proc)

    def _wait_listening(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("plugin server exited with %s:\n%s"
                                   % (proc.returncode, self.server_log()))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("plugin server did not listen on %s:\n%s"
                                       % (self.socket_path, self.server_log()))
                time.sleep(0.02)
            finally:
                s.close()

    def _read_output(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            with self._log_lock:
                self._log.append(line.decode("utf-8", "replace"))
        proc.stdout.close()

    def _watch(self, proc: subprocess.Popen) -> None:
        """Worker 0's timer loop: a server that exits is logged and spawned again,
        for ever, exit 127 included (observed on 3.9.1), never sooner than one
        second after the previous spawn (``next_spawn = now + 1``)."""
        code = proc.wait()
        with self._proc_lock:
            mine = proc is self._proc and not self._closing
        if not mine:
            return
        if code == 127:
            self.process_log.append(("err", 'external pluginserver "%s" start command "%s" '
                                     'exited with "command not found"'
                                     % (self.name, self._start_text())))
        else:
            how = "signal %d" % -code if code < 0 else "exit %d" % code
            self.process_log.append(("notice", "external pluginserver '%s' terminated: %s"
                                     % (self.name, how)))
        if not self.respawn:
            return
        time.sleep(max(0.0, self._last_spawn + self.respawn_interval - time.monotonic()))
        with self._proc_lock:
            if proc is not self._proc or self._closing:
                return
            self.respawns += 1
        try:
            self._spawn(wait=False)
        except OSError as e:   # pragma: no cover - /bin/sh always exists here
            self.process_log.append(("err", "spawning %s: %s" % (self.name, e)))

    def _start_text(self) -> str:
        return self.start_cmd if self.start_cmd is not None else " ".join(
            self.command + ["-kong-prefix", self._prefix])

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is not None:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _kill(self) -> None:
        with self._proc_lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    @property
    def pid(self) -> Optional[int]:
        proc = self._proc
        return proc.pid if proc else None

    def restart_server(self) -> None:
        """Kill the plugin server and start a new one, as worker 0 would. Kong keeps
        its instance table: the next request meets ``no plugin instance``."""
        self._kill()
        if self._rpc is not None:
            self._rpc.reset()
        self._spawn()

    def kill_server(self) -> None:
        """SIGKILL the server (a crash). With ``respawn=True`` it comes back as
        with Kong, after at most a second; else it stays down."""
        self._signal(signal.SIGKILL)
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if not self.respawn:
            self._kill()

    def hang_server(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel, never answered."""
        self._signal(signal.SIGSTOP)

    def resume_server(self) -> None:
        self._signal(signal.SIGCONT)

    def await_late_answers(self, timeout: float = 10.0) -> int:
        """Let a hung server's late answers arrive on Kong's pooled connections:
        nginx resets each such idle connection as the bytes come (the next call
        then connects anew). Returns how many were reset."""
        assert self._rpc is not None
        return self._rpc.await_late_answers(timeout)

    def expire_rpc_pool(self) -> None:
        """Time passing past lua_socket_keepalive_timeout (60 s): nginx closes
        the idle pooled connections, a hung one included."""
        if self._rpc is not None:
            self._rpc.reset()

    def wait_listening(self) -> None:
        """Wait until the (re)spawned server listens."""
        deadline = time.monotonic() + self.start_timeout
        while self._proc is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._proc is None:
            raise RuntimeError("no plugin server running")
        self._wait_listening(self._proc)

    def server_log(self) -> str:
        with self._log_lock:
            return "".join(self._log)

    def close(self) -> None:
        """``kong stop``: worker 0 sends the server SIGTERM, logs it stopped and
        does not wait. Observed: a server set to linger 3 s after SIGTERM was gone
        ~45 ms later all the same; here it is killed after 50 ms."""
        with self._proc_lock:
            self._closing = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)
            self.process_log.append(("notice", "[pluginserver] successfully stopped "
                                     "pluginserver '%s', pid %d" % (self.name, proc.pid)))
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        if self._rpc is not None:
            self._rpc.reset()
        if self._admin is not None:
            self._admin.shutdown()
            self._admin.server_close()
            self._admin = None
        shutil.rmtree(self._prefix, ignore_errors=True)

    def __enter__(self) -> "KongStandIn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def admin_url(self) -> str:
        assert self._admin is not None
        host, port = self._admin.server_address[:2]
        return "http://%s:%d" % (host if isinstance(host, str) else host.decode(), port)

    # ---- the bundled post-function plugin
    def set_post_function(self, chunks: Optional[Sequence[str]]) -> None:
        self.post_function = PostFunction(chunks) if chunks else None

    # ---- consumers
    def add_consumer(self, username: Optional[str] = None, custom_id: Optional[str] = None,
                     id: Optional[str] = None) -> Dict[str, Any]:
        if username is None and custom_id is None:
            raise ValueError("a consumer needs a username or a custom_id")
        now = int(time.time())
        c: Dict[str, Any] = {"id": id or str(uuid.uuid4()), "username": username, "custom_id": custom_id,
             "created_at": now, "updated_at": now, "tags": None}
        with self._clock:
            for other in self._consumers.values():
                if username is not None and other["username"] == username:
                    raise ValueError("username already exists")
                if custom_id is not None and other["custom_id"] == custom_id:
                    raise ValueError("custom_id already exists")
            self._consumers[c["id"]] = c
        return dict(c)

    def remove_consumer(self, id_or_username: str) -> None:
        with self._clock:
            for cid, c in list(self._consumers.items()):
                if id_or_username in (cid, c["username"]):
                    del self._consumers[cid]

    def consumers(self) -> List[Dict[str, Any]]:
        with self._clock:
            return [dict(c) for c in self._consumers.values()]

    def _consumer_by_id(self, cid: str) -> Optional[Dict[str, Any]]:
        with self._clock:
            c = self._consumers.get(cid.lower())
            return dict(c) if c else None

    def _consumer_by_username(self, username: str) -> Optional[Dict[str, Any]]:
        with self._clock:
            for c in self._consumers.values():
                if c["username"] == username:
                    return dict(c)
        return None

    # ---- configuration (Kong's schema layer + plugins_iterator)
    def _schema(self, name: Optional[str]) -> PluginSchema:
        schema = self.schemas.get(name or self.name)
        if schema is None:
            raise ValueError("the plugin server does not serve %r" % name)
        return schema

    def fill_config(self, config: Optional[Dict[str, Any]], *,
                    name: Optional[str] = None) -> Dict[str, Any]:
        """The plugin's own fields as Kong's schema layer makes them (no Kong keys)."""
        return json.loads(PluginSchema.encode(self._schema(name).fill(config)))

    def configure(self, config: Optional[Dict[str, Any]], *, plugin_id: Optional[str] = None,
                  name: Optional[str] = None, route: Union[None, bool, str] = None,
                  service: Union[None, bool, str] = None,
                  consumer: Union[None, bool, str] = None,
                  instance_name: Optional[str] = None,
                  protocols: Optional[List[str]] = None) -> Instance:
        """A plugin entity as the Admin API would accept it (else SchemaViolation),
        and the Config Kong sends for it. ``route``/``service``/``consumer``: True
        for the stand-in's own route/service or a new consumer id, or an id."""
        schema = self._schema(name)
        route_id = _scope_id(route, self.route["id"])
        service_id = _scope_id(service, self.service["id"])
        consumer_id = _scope_id(consumer, str(uuid.uuid4()))
        schema.check_entity(route_id, service_id, consumer_id, protocols)
        filled = schema.fill(config)
        plugin_id = plugin_id or str(uuid.uuid4())
        conf = PluginSchema.kong_config(filled, name=schema.name, plugin_id=plugin_id,
                                        seq=next(self._seq), route_id=route_id,
                                        service_id=service_id, consumer_id=consumer_id,
                                        instance_name=instance_name)
        return Instance(schema.name, plugin_id, PluginSchema.encode(conf))

    def instance_ids(self) -> Dict[str, Any]:
        return self._instances.ids()

    # ---- requests
    def request_raw(self, instance: Instance, raw: bytes, *, client_ip: str = "127.0.0.1",
                    phase: str = "access") -> Result:
        """A client's exact bytes (request line, header lines, body) through Kong."""
        method, target, version, pairs, body = parse_raw_request(raw)
        return self.request(instance, method, target, headers=pairs, body=body or None,
                            client_ip=client_ip, phase=phase, version=version,
                            exact_headers=True)

    def request(self, instance: Instance, method: str = "GET", path: str = "/", *,
                headers: HeadersIn = None, query: Union[None, str, bytes, Dict[str, Any]] = None,
                body: Union[None, str, bytes] = None, client_ip: str = "127.0.0.1",
                authenticated: Any = None, authenticated_consumer: Any = None,
                phase: str = "access", client_cert: Optional[str] = None,
                version: str = "HTTP/1.1", exact_headers: bool = False) -> Result:
        """One client request through nginx, the plugin and the guard. Headers,
        query and body may be bytes (non-UTF-8 bytes reach the plugin as they are).
        ``exact_headers``: send the header lines as given (no Host or
        Content-Length added)."""
        state = self._client_request(instance, method, path, headers=headers, query=query,
                                     body=body, client_ip=client_ip,
                                     authenticated=authenticated,
                                     authenticated_consumer=authenticated_consumer,
                                     phase=phase, client_cert=client_cert,
                                     version=version, exact_headers=exact_headers)
        if not state.result.proxied:   # nginx or the router answered
            return self._finish(state)
        return self._run(state, [(self, instance)])

    def _client_request(self, instance: Instance, method: str, path: str, *,
                        headers: HeadersIn, query: Union[None, str, bytes, Dict[str, Any]],
                        body: Union[None, str, bytes], client_ip: str, authenticated: Any,
                        authenticated_consumer: Any, phase: str,
                        client_cert: Optional[str], version: str = "HTTP/1.1",
                        exact_headers: bool = False) -> RequestState:
        """What nginx and the router make of the client's request (their answer, if
        they gave one, already in ``state.result``)."""
        if phase not in self._schema(instance.name).phases:
            raise ValueError("plugin %s has no %s phase" % (instance.name, phase))
        if "?" in path and query is None:
            path, query = path.split("?", 1)
        raw_query = _raw_query(query)
        raw_body = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else (body or b"")
        pairs = header_pairs(headers)
        if not exact_headers:
            if not any(k.lower() == "host" for k, _ in pairs):
                pairs.insert(0, ("Host", "kong.test"))
            if raw_body and not any(k.lower() in ("content-length", "transfer-encoding")
                                    for k, _ in pairs):
                pairs.append(("Content-Length", str(len(raw_body))))
        state = RequestState(standin=self, instance=instance, method=method, path=path,
                             pairs=drop_invalid_names(pairs), raw_query=raw_query,
                             body=raw_body, client_ip=client_ip, credential=authenticated,
                             consumer=authenticated_consumer, phase=phase,
                             body_buffer=self.client_body_buffer_size)
        state.client_cert = client_cert   # PEM chain the client presented over TLS
        state.http_version = version
        r = state.result
        r.kong_version = self.kong_version
        r.http_version = version
        if self.max_header_lines is not None and len(pairs) > self.max_header_lines:
            # nginx refuses the request itself (Kong 3.9.3: max_headers 1000)
            r.kong_logs.append(("info", "client sent too many header lines"))
            _answer(r, 400, (_TEXT_ERROR % ("Request header or cookie too large",
                                            state.request_id)).encode(),
                    "text/plain; charset=utf-8", close=True)
            return state
        dup = duplicate_unique_header(pairs)
        if dup is not None:
            # nginx answers before Kong's Lua runs (Kong's error page: text for a 400)
            r.kong_logs.append(("info", dup))
            _answer(r, 400, (_TEXT_ERROR % ("Bad request", state.request_id)).encode(),
                    "text/plain; charset=utf-8", close=True)
            return state
        if not _valid_utf8(ngx_unescape_path(path)):
            # Kong's router refuses a path that does not decode to UTF-8: 404
            r.kong_logs.append(("err", "router returned an error: invalid utf-8 sequence"))
            _answer(r, 404, (_JSON_ERROR % ("no Route matched with those values",
                                            state.request_id)).encode())
        return state

    def _run(self, state: RequestState, plugins: Sequence[Any]) -> Result:
        """The phase's plugins, (KongStandIn, Instance) pairs in Kong's order (each
        pair's server runs its plugin), then this stand-in's guard."""
        r = state.result
        phase = state.phase
        try:
            for standin, instance in plugins:
                state.standin, state.instance = standin, instance
                err = standin._handle_event(instance, phase, state, PDK(state))
                if err is not None:
                    r.kong_logs.append(("err", err))
                    r.kong_error = err
                    r.failed_open = True
            state.standin, state.instance = self, plugins[0][1]
            if phase == "access" and self.post_function is not None:
                self.post_function.run(state)
        except Exited:
            r.kong_exit = True
        except LuaError as e:
            # the runloop catches the error: 500 with Kong's generic message
            r.kong_logs.append(("err", str(e)))
            r.kong_error = str(e)
            _answer(r, 500, (_JSON_ERROR % ("An unexpected error occurred",
                                            state.request_id)).encode())
            state.response_headers = r.response_headers
        r.response_headers = state.response_headers
        return self._finish(state)

    def _finish(self, state: RequestState) -> Result:
        r = state.result
        if r.proxied and self.upstream_response is not None:
            status, up_headers, up_body = self.upstream_response
            r.status, r.body = status, up_body
            r.upstream_response_headers = list(up_headers)
        try:
            r.json = json.loads(r.body.decode("utf-8")) if r.body else None
        except (ValueError, UnicodeDecodeError):
            r.json = None
        q = ("?" + state.raw_query) if state.raw_query else ""
        wire = upstream_head(kong_version=self.kong_version, version=r.http_version,
                             service=self.service, host=state.host(),
                             path=state.path, client_ip=state.client_ip,
                             proxy_port=self.proxy_port, request_id=state.request_id,
                             x_forwarded_for=state.orig_headers.get("x-forwarded-for"),
                             headers=state.headers.items_all(), body=state.body)
        r.upstream = Upstream(state.upstream_method, state.upstream_path, state.headers,
                              state.raw_query, state.body, target=state.upstream_path + q,
                              wire=wire)
        r.consumer = state.consumer
        r.credential = state.credential
        r.ctx_shared = state.ctx_shared
        # Kong failed open after the plugin had authenticated the request (the server
        # died between authenticate and "ret"): decided, so not unauthenticated.
        decided = "kong.client.authenticate" in r.pdk_calls
        r.passed_unauthenticated = r.failed_open and r.proxied and not decided
        if r.passed_unauthenticated and self.fail_open == "raise":
            raise FailedOpen(r)
        return r

    def _handle_event(self, inst: Instance, phase: str, state: RequestState,
                      pdk: PDK) -> Optional[str]:
        """mp_rpc.lua Rpc:handle_event: an error text when Kong logs and goes on.
        ``no plugin instance`` resets the plugin's instances and tries again in
        this request, with no bound in Kong (a tail call); here a server that
        keeps answering it fails the test instead of hanging it."""
        assert self._rpc is not None
        for _ in range(_NO_INSTANCE_LOOP_GUARD):
            try:
                iid = self._instances.get_id(self._rpc, inst, state.result)
                bridge_loop(self._rpc, iid, phase, pdk, self.step_errors)
                return None
            except (ClaimFailed, RpcError) as e:
                err = str(e)
            if "no plugin instance" not in err.lower():
                return err
            state.result.kong_logs.append(("warn", err))
            self._instances.reset(inst.name)
        raise RuntimeError("the plugin server answered 'no plugin instance' %d times in a "
                           "row: Kong would retry this request for ever"
                           % _NO_INSTANCE_LOOP_GUARD)


# Kong retries "no plugin instance" without end; the stand-in stops there
_NO_INSTANCE_LOOP_GUARD = 50


def _answer(r: Result, status: int, body: bytes,
            content_type: str = "application/json; charset=utf-8", close: bool = False) -> None:
    r.status = status
    r.body = body
    r.proxied = False
    r.connection_close = close
    r.response_headers = CIMultiDict([("Content-Type", content_type),
                                      ("Content-Length", str(len(body)))])


def _version(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split("."):
        out.append(int(part) if part.isdigit() else 0)
    return tuple(out + [0] * (3 - len(out)))


def _valid_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def ngx_unescape_path(path: str) -> str:
    """The path as nginx decodes it for the router (%XX, no '+')."""
    raw = urllib.parse.unquote_to_bytes(path.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "surrogateescape")


def _raw_query(query: Union[None, str, bytes, Dict[str, Any]]) -> str:
    if query is None:
        return ""
    if isinstance(query, (str, bytes)):
        return lua_str(query)
    return "&".join(ngx_escape(k) if v is True else
                    ngx_escape(k) + "=" + ngx_escape(lua_str(v) if isinstance(v, bytes) else v)
                    for k, vs in query.items()
                    for v in (vs if isinstance(vs, list) else [vs]))
