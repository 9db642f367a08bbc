"""Connecting to Redis: endpoints, Sentinel and Cluster records, and the TLS
files a client certificate and key need (written private, removed on close)."""

import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple


def _parse_endpoint(endpoint: str) -> Tuple[str, int]:
    host, sep, port = str(endpoint).strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port_n = int(port)
    if not 0 < port_n < 65536:
        raise ValueError(f"endpoint {endpoint!r}: bad port")
    return host, port_n


def _get(record, name, default=None):
    if not isinstance(record, dict):
        return default
    value = record.get(name)
    return default if value is None else value


def _close_client(client):
    sentinel = getattr(client, "_kong_sentinel", None)
    for c in [client] + (list(sentinel.sentinels) if sentinel is not None else []):
        try:
            c.close()
        except Exception:
            pass


def _write_private(pem: str, suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix="kong-oauth2-introspection-", suffix=suffix)
    try:
        os.fchmod(fd, 0o600)  # mkstemp already does; be explicit
        os.write(fd, pem.encode())
    finally:
        os.close(fd)
    return path


def _tls_kwargs(tls_conf, log) -> Tuple[Dict[str, Any], List[str]]:
    """redis-py's ssl_* arguments for ``tls_conf``, and the temp files they name.

    redis-py takes the CA bundle as data but the client certificate and key only
    as file paths (in all three modes), so those two go to private (0600) temp
    files, removed by ``close``. The CA is trusted in addition to the system
    store: redis-py builds its SSLContext with the default roots.
    """
    ca = _get(tls_conf, "ca") or None
    cert = _get(tls_conf, "cert") or None
    key = _get(tls_conf, "key") or None
    insecure = bool(_get(tls_conf, "insecure_skip_verify", False))
    if not (_get(tls_conf, "enabled", False) or ca or cert or key or insecure):
        return {}, []
    kwargs: Dict[str, Any] = {"ssl": True}
    files: List[str] = []
    if insecure:
        _log(log, "warn", "store: tls.insecure_skip_verify is set: the Redis server "
                          "certificate is NOT verified")
        kwargs.update(ssl_cert_reqs="none", ssl_check_hostname=False)
    else:
        kwargs.update(ssl_cert_reqs="required", ssl_check_hostname=True)
    if ca:
        kwargs["ssl_ca_data"] = ca
    if cert:
        try:
            path = _write_private(cert, ".crt")
            files.append(path)
            kwargs["ssl_certfile"] = path
            if key:
                path = _write_private(key, ".key")
                files.append(path)
                kwargs["ssl_keyfile"] = path
        except Exception:
            remove = _file_remover(files)
            if remove is not None:
                remove()
            raise
    elif key:
        _log(log, "warn", "store: tls.key without tls.cert is ignored")
    return kwargs, files


def _file_remover(paths: List[str]) -> Optional[Callable[[], None]]:
    if not paths:
        return None
    paths = list(paths)

    def remove():
        while paths:
            try:
                os.unlink(paths.pop())
            except OSError:
                pass
    return remove


def _log(log, level: str, msg: str):
    if log is None:
        return
    try:
        getattr(log, level)(msg)
    except Exception:
        pass
