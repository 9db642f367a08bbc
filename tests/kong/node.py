"""KongNode: a Kong Gateway node started from Kong's own settings, for tests.

Where ``KongStandIn`` is one plugin server driven the way Kong drives it, a node
is what a user's settings make of Kong: it reads kong.conf text and/or KONG_*
environment variables, starts the way Kong 3.9 starts, loads a declarative
config (kong.yml) and routes requests by path to the plugin instances it
declares. Each plugin server is a ``KongStandIn`` (one per ``pluginserver_names``
entry).

Start-up, as Kong 3.9 does it (kong/conf_loader, kong/runloop/plugin_servers/
process.lua, kong/db/schema/entities/plugins.lua):

* ``pluginserver_names``: for each NAME (lower-cased; dashes become underscores
  in the setting names), ``pluginserver_NAME_socket`` (default
  ``PREFIX/NAME.socket``), ``_start_cmd`` and ``_query_cmd`` (defaults
  ``/usr/local/bin/NAME`` and ``/usr/local/bin/query_NAME``, only if they exist);
* each query command runs through ``/bin/sh`` (``io.popen``) with the environment
  nginx leaves (TZ only); from its JSON (a list, or ``{"Plugins": [...]}``) Kong
  3.9 registers ONLY THE FIRST entry; Kong 2.8 to 3.8 registered every entry;
* ``plugins`` (``bundled`` expands to Kong's bundled plugins, ``off`` to none):
  a name neither bundled nor registered stops Kong with ``NAME plugin is enabled
  but not installed``;
* the declarative config: a plugin entity whose name ``plugins`` does not enable
  is refused with ``plugin 'NAME' not enabled; add it to the 'plugins'
  configuration property``; every config of an external plugin passes that
  plugin's schema (SchemaViolation);
* worker 0 starts each server as ``exec <start_cmd>`` through ``/bin/sh`` with the
  environment cleared, and Kong connects to the server's socket setting: a
  server listening elsewhere never answers (the node reports it).

Settings are taken as written; ``rewrite`` maps absolute path prefixes of a
deployment (``/opt/...``, ``/usr/local/kong``) to the test's own, and nothing
else is changed. The Admin API (consumers, for ``consumer_by: client_id``)
listens on 127.0.0.1 at ``admin_listen``'s port (Kong's default 8001), since the
documented start command names that address.

Routing: a route matches by path prefix (the longest wins; ``~`` paths are
regular expressions), and ``hosts``/``methods`` when given. For each plugin name
the most specific entry applies (route and service, route, service, global);
consumer-scoped entries are not modelled (refused). A route runs one external
plugin here, then the bundled ``post-function`` (the guard) of its precedence.
"""

import copy
import json
import re
import shlex
import subprocess
import threading
import uuid
from http.server import ThreadingHTTPServer
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .admin import admin_handler
from .result import Result
from .standin import Instance, KongStandIn

__all__ = ["KongNode", "KongStartError", "ServerDef", "parse_kong_conf", "settings_from_env",
           "BUNDLED_PLUGINS"]

# kong/constants.lua, Kong 3.9 (the names ``plugins = bundled`` stands for).
BUNDLED_PLUGINS = frozenset("""
jwt acl correlation-id cors oauth2 tcp-log udp-log file-log http-log key-auth hmac-auth
basic-auth ip-restriction request-transformer response-transformer request-size-limiting
rate-limiting response-ratelimiting syslog loggly datadog ldap-auth statsd bot-detection
aws-lambda request-termination prometheus proxy-cache session acme grpc-gateway grpc-web
pre-function post-function azure-functions zipkin opentelemetry ai-proxy
ai-prompt-decorator ai-prompt-template ai-request-transformer ai-response-transformer
ai-prompt-guard ai-request-transformer standard-webhooks redirect
""".split())

DEFAULT_PREFIX = "/usr/local/kong"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8001 reuseport backlog=16384, 127.0.0.1:8444 http2 ssl"
_NO_ROUTE = b'{"message":"no Route matched with those values"}'


class KongStartError(RuntimeError):
    """Kong refused to start (or to load the declarative config) with this message."""


def parse_kong_conf(text: str) -> Dict[str, str]:
    """kong.conf ``key = value`` lines; ``#`` starts a comment unless escaped (``\\#``)."""
    settings: Dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"(?<!\\)#.*$", "", line).replace("\\#", "#").strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise KongStartError("kong.conf line %d is not `key = value`: %r" % (number, line))
        settings[key.strip().lower()] = value.strip()
    return settings


def settings_from_env(env: Mapping[str, str]) -> Dict[str, str]:
    """KONG_* variables as settings (``KONG_PLUGINSERVER_X_SOCKET`` ->
    ``pluginserver_x_socket``); they override kong.conf."""
    return {k[5:].lower(): v.strip() for k, v in env.items() if k.startswith("KONG_")}


def _split_list(value: str) -> List[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _version(text: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


class ServerDef(object):
    """One ``pluginserver_names`` entry as Kong's conf loader makes it."""

    def __init__(self, name: str, settings: Mapping[str, str], prefix: str,
                 exists: Any) -> None:
        self.name = name.lower()
        key = "pluginserver_" + self.name.replace("-", "_")
        self.socket = settings.get(key + "_socket") or "%s/%s.socket" % (prefix, self.name)
        self.start_cmd = settings.get(key + "_start_cmd") or \
            (("/usr/local/bin/" + self.name) if exists("/usr/local/bin/" + self.name) else None)
        self.query_cmd = settings.get(key + "_query_cmd") or \
            (("/usr/local/bin/query_" + self.name)
             if exists("/usr/local/bin/query_" + self.name) else None)

    def __repr__(self) -> str:
        return "ServerDef(%s socket=%s)" % (self.name, self.socket)


class _Route(object):
    def __init__(self, entity: Dict[str, Any], service: Optional[Dict[str, Any]]) -> None:
        self.entity = entity
        self.service = service
        self.paths: List[str] = list(entity.get("paths") or [])
        self.hosts = [h.lower() for h in entity.get("hosts") or []]
        self.methods = [m.upper() for m in entity.get("methods") or []]

    def match(self, method: str, path: str, host: str) -> Optional[int]:
        """The length of the path that matched (for longest-first), or None."""
        if self.hosts and host.lower() not in self.hosts:
            return None
        if self.methods and method.upper() not in self.methods:
            return None
        if not self.paths:
            return 0
        best: Optional[int] = None
        for p in self.paths:
            if p.startswith("~"):
                m = re.match(p[1:], path)
                length = len(m.group(0)) if m else None
            else:
                length = len(p) if path.startswith(p) else None
            if length is not None and (best is None or length > best):
                best = length
        return best


class KongNode(object):
    """A Kong node: ``KongNode(conf_text=..., env=..., declarative=doc, rewrite={...})``.

    ``kong_version`` ("3.9"): from 3.9 on only the first entry of each query
    command's list is registered. ``fail_open`` and ``rpc_timeout`` go to every
    plugin server (``KongStandIn``). Close it (or use ``with``)."""

    def __init__(self, *, conf_text: str = "", env: Optional[Mapping[str, str]] = None,
                 declarative: Optional[Dict[str, Any]] = None,
                 rewrite: Optional[Mapping[str, str]] = None, kong_version: str = "3.9",
                 fail_open: str = "raise", rpc_timeout: float = 60.0,
                 start_timeout: float = 20.0, exists: Any = None) -> None:
        import os.path
        self.kong_version = kong_version
        self.rewrite = dict(rewrite or {})
        raw = parse_kong_conf(conf_text)
        raw.update(settings_from_env(env or {}))
        self.settings = {k: self._rewritten(v) for k, v in raw.items()}
        self.prefix = self.settings.get("prefix") or self._rewritten(DEFAULT_PREFIX)
        exists = exists or os.path.exists
        self.server_defs = [ServerDef(n, self.settings, self.prefix, exists)
                            for n in _split_list(self.settings.get("pluginserver_names", ""))]
        self.servers: Dict[str, KongStandIn] = {}     # plugin name -> its server
        self.log: List[str] = []                      # what Kong logs at start-up
        self._by_server: List[KongStandIn] = []
        self._admin: Optional[ThreadingHTTPServer] = None
        self._lock = threading.Lock()
        self.admin_requests: List[Any] = []
        self.routes: List[_Route] = []
        self._instances: Dict[int, Instance] = {}
        self._entities: List[Dict[str, Any]] = []
        self._consumers: List[Dict[str, Any]] = []
        try:
            infos = self._load_external_plugins()
            self.enabled = self._enabled_plugins(infos)
            doc = copy.deepcopy(declarative) if declarative is not None else None
            if doc is not None:
                self._check_declarative(doc)
            self._start(infos, fail_open, rpc_timeout, start_timeout)
            if doc is not None:
                self._load_declarative(doc)
        except BaseException:
            self.close()
            raise

    # ---- settings
    def _rewritten(self, value: str) -> str:
        for old, new in self.rewrite.items():
            # a whole path prefix only: /usr/local/kong, not /usr/local/kong-x
            value = re.sub(r"(?<![\w./-])" + re.escape(old.rstrip("/")) + r"(?=/|\s|$|,)",
                           new.rstrip("/"), value)
        return value

    # ---- start-up (process.lua)
    def _query(self, sd: ServerDef) -> List[Dict[str, Any]]:
        if not sd.query_cmd:
            raise KongStartError("no info query for " + sd.name)
        out = subprocess.run(["/bin/sh", "-c", sd.query_cmd], env={}, capture_output=True,
                             timeout=60)
        text = out.stdout.decode("utf-8", "replace")
        if out.stderr:
            self.log.append("[%s query] %s" % (sd.name, out.stderr.decode("utf-8", "replace")))
        try:
            dump = json.loads(text)
        except ValueError as err:
            raise KongStartError("failed decoding plugin info: %s (%s exited %d: %s)"
                                 % (err, sd.query_cmd, out.returncode,
                                    out.stderr.decode("utf-8", "replace").strip()))
        if not isinstance(dump, (list, dict)):
            raise KongStartError("not a plugin info table: \n%s\n%s" % (sd.query_cmd, text))
        infos = dump.get("Plugins", dump) if isinstance(dump, dict) else dump
        if not isinstance(infos, list) or not infos:
            raise KongStartError("not a plugin info table: \n%s\n%s" % (sd.query_cmd, text))
        return infos

    def _load_external_plugins(self) -> List[Tuple[ServerDef, List[Dict[str, Any]]]]:
        registered: Dict[str, str] = {}
        result = []
        first_only = _version(self.kong_version) >= (3, 9)
        for sd in self.server_defs:
            infos = self._query(sd)
            if first_only:
                infos = infos[:1]   # (dump.Plugins or dump)[1]
            kept = []
            for info in infos:
                name = info.get("Name")
                if name in registered:
                    self.log.append("Duplicate plugin name [%s] by %s and %s"
                                    % (name, registered[name], sd.name))
                    continue
                registered[name] = sd.name
                kept.append(info)
            result.append((sd, kept))
        return result

    def _enabled_plugins(self, infos: Sequence[Tuple[ServerDef, List[Dict[str, Any]]]]
                         ) -> List[str]:
        external = {info["Name"] for _, kept in infos for info in kept}
        enabled: List[str] = []
        for name in _split_list(self.settings.get("plugins", "bundled")):
            if name == "off":
                continue
            names = sorted(BUNDLED_PLUGINS) if name == "bundled" else [name]
            for n in names:
                if n not in BUNDLED_PLUGINS and n not in external:
                    raise KongStartError("%s plugin is enabled but not installed" % n)
                if n not in enabled:
                    enabled.append(n)
        return enabled

    def _start(self, infos: Sequence[Tuple[ServerDef, List[Dict[str, Any]]]], fail_open: str,
               rpc_timeout: float, start_timeout: float) -> None:
        for sd, kept in infos:
            if not kept or not any(i["Name"] in self.enabled for i in kept):
                continue   # Kong connects only for the plugins it loaded
            if not sd.start_cmd:
                raise KongStartError("%s: no start command (an externally managed server is "
                                     "not modelled)" % sd.name)
            try:
                server = KongStandIn(shlex.split(sd.start_cmd), plugins_info=kept,
                                     start_cmd=sd.start_cmd, socket_path=sd.socket, env={},
                                     kong_version=self.kong_version, fail_open=fail_open,
                                     rpc_timeout=rpc_timeout, start_timeout=start_timeout)
            except RuntimeError as err:
                raise KongStartError("pluginserver %s: %s" % (sd.name, err)) from err
            self._by_server.append(server)
            for info in kept:
                self.servers[info["Name"]] = server
        self._start_admin()

    def _start_admin(self) -> None:
        listen = self.settings.get("admin_listen", DEFAULT_ADMIN_LISTEN)
        if listen.strip() == "off":
            return
        first = _split_list(listen)[0].split()[0]
        port = int(first.rsplit(":", 1)[1])
        try:
            self._admin = ThreadingHTTPServer(("127.0.0.1", port), admin_handler(self))
        except OSError as err:
            raise KongStartError("the Admin API cannot listen on 127.0.0.1:%d (admin_listen "
                                 "%r): %s" % (port, first, err.strerror or err)) from err
        self._admin.daemon_threads = True
        threading.Thread(target=self._admin.serve_forever, daemon=True).start()

    # ---- what the Admin API handler reads (admin.py)
    def consumers(self) -> List[Dict[str, Any]]:
        return [dict(c) for c in self._consumers]

    def _consumer_by_id(self, cid: str) -> Optional[Dict[str, Any]]:
        return next((dict(c) for c in self._consumers if c["id"] == cid.lower()), None)

    def _consumer_by_username(self, username: str) -> Optional[Dict[str, Any]]:
        return next((dict(c) for c in self._consumers if c["username"] == username), None)

    # ---- the declarative config
    def _plugin_entities(self, doc: Dict[str, Any]) -> List[Tuple[Dict[str, Any], str, Any]]:
        """(entity, scope kind, scope entity) for every plugin the file declares."""
        found: List[Tuple[Dict[str, Any], str, Any]] = []
        for p in doc.get("plugins") or []:
            found.append((p, "global", None))
        for s in doc.get("services") or []:
            for p in s.get("plugins") or []:
                found.append((p, "service", s))
            for r in s.get("routes") or []:
                for p in r.get("plugins") or []:
                    found.append((p, "route", r))
        for r in doc.get("routes") or []:
            for p in r.get("plugins") or []:
                found.append((p, "route", r))
        for c in doc.get("consumers") or []:
            for p in c.get("plugins") or []:
                found.append((p, "consumer", c))
        return found

    def _check_declarative(self, doc: Dict[str, Any]) -> None:
        for p, _, _ in self._plugin_entities(doc):
            if p.get("name") not in self.enabled:
                raise KongStartError("plugin '%s' not enabled; add it to the 'plugins' "
                                     "configuration property" % p.get("name"))

    def _load_declarative(self, doc: Dict[str, Any]) -> None:
        services: Dict[str, Dict[str, Any]] = {}
        routes: Dict[str, Dict[str, Any]] = {}
        for s in doc.get("services") or []:
            s.setdefault("id", str(uuid.uuid4()))
            services[s.get("name") or s["id"]] = s
            for r in s.get("routes") or []:
                r.setdefault("id", str(uuid.uuid4()))
                routes[r.get("name") or r["id"]] = r
                self.routes.append(_Route(r, s))
        for r in doc.get("routes") or []:
            r.setdefault("id", str(uuid.uuid4()))
            routes[r.get("name") or r["id"]] = r
            ref = r.get("service")
            name = ref.get("name") or ref.get("id") if isinstance(ref, dict) else ref
            self.routes.append(_Route(r, services.get(name) if name else None))
        for c in doc.get("consumers") or []:
            self._consumers.append({"id": c.get("id") or str(uuid.uuid4()),
                                    "username": c.get("username"),
                                    "custom_id": c.get("custom_id"), "tags": c.get("tags")})
        for server in self._by_server:
            for c in self._consumers:
                server.add_consumer(username=c["username"], custom_id=c["custom_id"],
                                    id=c["id"])
        for p, kind, scope in self._plugin_entities(doc):
            if p.get("enabled") is False:
                continue
            if kind == "consumer" or p.get("consumer"):
                raise NotImplementedError("consumer-scoped plugins are not modelled")
            route_id = scope["id"] if kind == "route" else _ref_id(p.get("route"), routes)
            service_id = scope["id"] if kind == "service" else _ref_id(p.get("service"),
                                                                         services)
            entry = {"name": p["name"], "config": p.get("config") or {}, "route": route_id,
                     "service": service_id, "instance_name": p.get("instance_name")}
            server = self.servers.get(p["name"])
            if server is not None:   # Kong's schema layer: SchemaViolation if refused
                inst = server.configure(entry["config"], name=p["name"], route=route_id,
                                        service=service_id,
                                        instance_name=entry["instance_name"],
                                        protocols=p.get("protocols"))
                self._instances[id(entry)] = inst
            self._entities.append(entry)

    # ---- requests
    def route_for(self, method: str, path: str, host: str = "kong.test") -> Optional[_Route]:
        best: Optional[Tuple[int, _Route]] = None
        for r in self.routes:
            length = r.match(method, path, host)
            if length is not None and (best is None or length > best[0]):
                best = (length, r)
        return best[1] if best else None

    def plugins_for(self, route: _Route) -> List[Dict[str, Any]]:
        """The plugin entries that run on ``route``: per name the most specific one."""
        sid = route.service["id"] if route.service else None
        rank = {}
        for e in self._entities:
            if e["route"] and e["service"]:
                level = 3 if (e["route"], e["service"]) == (route.entity["id"], sid) else None
            elif e["route"]:
                level = 2 if e["route"] == route.entity["id"] else None
            elif e["service"]:
                level = 1 if e["service"] == sid else None
            else:
                level = 0
            if level is not None and (e["name"] not in rank or level > rank[e["name"]][0]):
                rank[e["name"]] = (level, e)
        return [e for _, e in rank.values()]

    def server_for_path(self, path: str, method: str = "GET") -> KongStandIn:
        route = self.route_for(method, path)
        assert route is not None, "no route for %s" % path
        external = [e for e in self.plugins_for(route) if e["name"] in self.servers]
        assert len(external) == 1, external
        return self.servers[external[0]["name"]]

    def request(self, method: str = "GET", path: str = "/", *,
                headers: Any = None, **kwargs: Any) -> Result:
        """One client request: routed by path, through the route's plugin (over its
        server's socket) and the route's post-function guard."""
        host = "kong.test"
        for k, v in (headers.items() if isinstance(headers, dict) else headers or []):
            if k.lower() == "host":
                host = v
        route = self.route_for(method, path.split("?", 1)[0], host)
        if route is None:
            r = Result()
            r.status, r.body, r.proxied = 404, _NO_ROUTE, False
            r.json = json.loads(_NO_ROUTE)
            return r
        entries = self.plugins_for(route)
        external = [e for e in entries if e["name"] in self.servers]
        others = [e["name"] for e in entries if e["name"] not in self.servers
                  and e["name"] != "post-function"]
        if len(external) != 1 or others:
            raise NotImplementedError("a route runs exactly one external plugin here (and "
                                      "post-function); %r has %s"
                                      % (route.entity.get("name"),
                                         [e["name"] for e in entries]))
        guard = next((e for e in entries if e["name"] == "post-function"), None)
        server = self.servers[external[0]["name"]]
        with self._lock:   # one node, one request at a time: the server's route is set
            server.route = {k: v for k, v in route.entity.items() if k != "plugins"}
            if route.service is not None:
                server.service = _expand_url({k: v for k, v in route.service.items()
                                              if k not in ("routes", "plugins")})
            server.set_post_function((guard["config"].get("access") or None) if guard else None)
            return server.request(self._instances[id(external[0])], method, path,
                                  headers=headers, **kwargs)

    # ---- life
    def close(self) -> None:
        for server in self._by_server:
            server.close()
        self._by_server = []
        if self._admin is not None:
            self._admin.shutdown()
            self._admin.server_close()
            self._admin = None

    def __enter__(self) -> "KongNode":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ref_id(ref: Any, by_name: Dict[str, Dict[str, Any]]) -> Optional[str]:
    if ref is None:
        return None
    key = ref.get("name") or ref.get("id") if isinstance(ref, dict) else ref
    entity = by_name.get(key)
    return entity["id"] if entity else key


def _expand_url(service: Dict[str, Any]) -> Dict[str, Any]:
    """Kong stores a service's ``url`` as protocol, host, port and path."""
    url = service.pop("url", None)
    if url:
        from urllib.parse import urlsplit
        u = urlsplit(url)
        service.setdefault("protocol", u.scheme or "http")
        service.setdefault("host", u.hostname)
        service.setdefault("port", u.port or {"https": 443}.get(u.scheme, 80))
        if u.path:
            service.setdefault("path", u.path)
    return service
