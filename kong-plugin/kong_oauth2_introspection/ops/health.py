"""Health: do the IdP and the Redis of every loaded config answer?

The plugin server serves the report as JSON on ``/health`` of its loopback
metrics port (``serve --metrics-port N``): HTTP 200 when healthy, 503 when not.
``kong-oauth2-introspection health --url http://127.0.0.1:N/health`` asks it and
exits 0 (healthy), 1 (unhealthy) or 2 (could not ask), for Kubernetes exec probes.

What is checked, per distinct config Kong started (instances sharing a config
are checked once; with several processes, the one serving the port first builds
the instances Kong started through the others):
- oauth2-introspection: the IdP introspects a random, meaningless token with the
  config's own client credentials; a JSON answer (it will say ``active: false``)
  is healthy, so wrong credentials show up here as an HTTP 401. The circuit
  breaker's state is reported beside it.
- oauth2-client-credentials: the token endpoint answers HTTP at all (asking for
  a token would need a client's credentials).
- both: when the config has a Redis store, a PING through the store's client.
- a config the plugin could not use is unhealthy, with the reason it logged.

The report never holds a token or a secret: endpoints are
``scheme://host:port/path`` and failures are the plugin's own log texts or an
exception's class name. Results are kept ``MIN_INTERVAL`` seconds so that probes
arriving together ask the IdP once.
"""

import argparse
import json
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Dict, List, Optional, Tuple

from .. import NAME, VERSION
from ..concurrency import Deadline, deadline_scope
from .log import endpoint_label

PROBE_TIMEOUT = 5.0
MIN_INTERVAL = 2.0

_lock = threading.Lock()
_last: Tuple[float, Optional[Dict[str, Any]]] = (0.0, None)


def _instances(server: Any) -> List[Any]:
    # The loop thread may add or drop an instance while this HTTP thread copies.
    for _ in range(10):
        try:
            return list(server.instances.values())
        except RuntimeError:
            time.sleep(0.001)
    return []


def _configs(server: Any) -> List[Dict[str, Any]]:
    """One entry per distinct runtime, with the Kong plugin ids using it."""
    seen: Dict[int, Dict[str, Any]] = {}
    adopt = getattr(server, "adopt_all", None)
    if adopt is not None:   # one of several processes: cover what the others started
        adopt()
    for instance in _instances(server) if server is not None else []:
        runtime = getattr(instance.plugin, "runtime", None)
        if runtime is None:
            continue
        entry = seen.setdefault(id(runtime), {"plugin": instance.name, "runtime": runtime,
                                              "plugin_ids": set(), "instances": 0})
        entry["instances"] += 1
        config = instance.config if isinstance(instance.config, dict) else {}
        if isinstance(config.get("__plugin_id"), str):
            entry["plugin_ids"].add(config["__plugin_id"])
    return list(seen.values())


def _timed(check, name: Dict[str, Any], *args: Any) -> Dict[str, Any]:
    """``check(*args)``'s result, timed; ``name`` (what was probed) is kept on failure."""
    start = time.monotonic()
    try:
        result = dict(name, **check(*args))
    except Exception as err:  # noqa: BLE001 - a failed probe is the answer
        result = dict(name, ok=False, error=_safe_error(err))
    result["seconds"] = round(time.monotonic() - start, 4)
    return result


def _safe_error(err: Exception) -> str:
    # IntrospectionError texts are written to be logged (no token, no secret);
    # anything else (Redis, sockets) is named by its class only.
    if type(err).__name__ == "IntrospectionError":
        return str(err)
    return type(err).__name__


def _introspection_idp(runtime: Any) -> Dict[str, Any]:
    introspector = runtime.introspector
    result: Dict[str, Any] = {}
    breaker = getattr(getattr(runtime, "policy", None), "breaker", None)
    if breaker is not None:
        result["breaker"] = breaker.state
    with deadline_scope(Deadline(PROBE_TIMEOUT)):
        introspector.introspect("health-check-" + secrets.token_hex(16))
    result["ok"] = True
    return result


def _token_endpoint(runtime: Any) -> Dict[str, Any]:
    url = runtime.conf.url
    with deadline_scope(Deadline(PROBE_TIMEOUT)):
        reply = runtime.server.http.request("GET", url, timeout=min(runtime.conf.timeout,
                                                                    PROBE_TIMEOUT),
                                            max_bytes=64 * 1024)
    return {"ok": True, "status": reply.status}


def _redis(store: Any) -> Dict[str, Any]:
    store._require_client().ping()
    return {"ok": True}


def _probes(entry: Dict[str, Any]) -> Dict[str, Any]:
    runtime = entry["runtime"]
    out: Dict[str, Any] = {"plugin": entry["plugin"], "plugin_ids": sorted(entry["plugin_ids"]),
                           "instances": entry["instances"]}
    error = getattr(runtime, "error", None)
    if error is not None:
        out.update(healthy=False, error="unusable config: %s" % error)
        return out
    if hasattr(runtime, "introspector"):
        out["idp"] = _timed(_introspection_idp,
                            {"endpoint": endpoint_label(runtime.introspector.url)}, runtime)
    elif hasattr(runtime, "server") and hasattr(getattr(runtime, "conf", None), "url"):
        out["idp"] = _timed(_token_endpoint, {"endpoint": endpoint_label(runtime.conf.url)},
                            runtime)
    store = getattr(getattr(runtime, "cache", None), "store", None)
    out["redis"] = _timed(_redis, {"store": store.describe}, store) \
        if store is not None else None
    out["healthy"] = all(part is None or part.get("ok") for part in
                         (out.get("idp"), out["redis"]))
    return out


def _fresh_report(server: Any) -> Dict[str, Any]:
    configs = _configs(server)
    results: List[Dict[str, Any]] = []
    if configs:
        pool = ThreadPoolExecutor(max_workers=min(16, len(configs)),
                                  thread_name_prefix="oauth2-introspection-health")
        futures = [(entry, pool.submit(_probes, entry)) for entry in configs]
        until = time.monotonic() + PROBE_TIMEOUT + 1.0
        for entry, future in futures:
            try:
                results.append(future.result(max(0.0, until - time.monotonic())))
            except FutureTimeout:
                results.append({"plugin": entry["plugin"], "healthy": False,
                                "plugin_ids": sorted(entry["plugin_ids"]),
                                "instances": entry["instances"],
                                "error": "no answer within %g s" % PROBE_TIMEOUT})
        pool.shutdown(wait=False)
    return {"healthy": all(r["healthy"] for r in results), "version": VERSION,
            "configs": results, "checked_at": round(time.time(), 3)}


def report(server: Any) -> Dict[str, Any]:
    """The health of every loaded config (see the module doc)."""
    global _last
    with _lock:
        at, last = _last
        if last is not None and time.monotonic() - at < MIN_INTERVAL:
            return last
        fresh = _fresh_report(server)
        _last = (time.monotonic(), fresh)
        return fresh


def reset() -> None:
    """Forget the last report (tests)."""
    global _last
    with _lock:
        _last = (0.0, None)


# -- the ``health`` subcommand ------------------------------------------------------

def _summary(data: Dict[str, Any]) -> str:
    lines = ["%s: %s (%d config(s))" % (NAME, "healthy" if data.get("healthy") else "UNHEALTHY",
                                        len(data.get("configs", [])))]
    for conf in data.get("configs", []):
        ids = ",".join(conf.get("plugin_ids") or []) or "-"
        parts = []
        for what in ("idp", "redis"):
            part = conf.get(what)
            if part:
                state = "ok" if part.get("ok") else "FAILED (%s)" % part.get("error")
                where = part.get("endpoint") or part.get("store") or ""
                parts.append("%s %s %s" % (what, where, state))
        if conf.get("error"):
            parts.append(str(conf["error"]))
        lines.append("  %s %s: %s" % (conf.get("plugin"), ids, "; ".join(parts) or "ok"))
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kong-oauth2-introspection health",
        description="Ask a running plugin server whether the IdP and Redis of each loaded "
                    "config answer (serve --metrics-port N serves /health). Exit 0 healthy, "
                    "1 unhealthy, 2 could not ask.")
    parser.add_argument("--url", required=True,
                        help="the server's health URL, e.g. http://127.0.0.1:9542/health")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the answer (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        print("%s: --url must be an http:// URL" % NAME, file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as reply:
            body = reply.read(1024 * 1024)
    except urllib.error.HTTPError as err:
        body = err.read(1024 * 1024) if err.code == 503 else b""
        if err.code != 503:
            print("%s: cannot ask %s: HTTP %d" % (NAME, args.url, err.code), file=sys.stderr)
            return 2
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        print("%s: cannot ask %s: %s" % (NAME, args.url, reason), file=sys.stderr)
        return 2
    try:
        data = json.loads(body)
        healthy = data["healthy"]
    except (ValueError, KeyError, TypeError):
        print("%s: %s did not answer with a health report" % (NAME, args.url), file=sys.stderr)
        return 2
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else _summary(data))
    return 0 if healthy is True else 1
