"""The HTTP around Kong's Lua: the client's raw request, the request head nginx
proxies upstream, and the response head the client gets.

Mirrors Kong 3.9's nginx template (``proxy_set_header`` lines, ``proxy_pass_header``)
and its header_filter (Server, Via, X-Kong-* latency and request id headers), as the
recorded transcripts of Kong 3.9.1/3.9.3 show them:
* upstream: Via, Host (the service's host:port), Connection keep-alive, the
  X-Forwarded-For/-Proto/-Host/-Port/-Path Kong computes (the client's own are
  replaced: no trusted_ips), X-Real-IP, X-Kong-Request-Id, Content-Length of the
  body, then the client's header lines (as the plugin left them) in order, minus
  the ones nginx sets itself;
* a proxied answer: the upstream's Content-Type and Content-Length, Connection
  (keep-alive, close for an HTTP/1.0 client), the upstream's other headers, then
  Server, X-Kong-Upstream-Latency, X-Kong-Proxy-Latency, Via, X-Kong-Request-Id;
* Kong's own answer (kong.response.exit, errors): Date, Content-Type, Connection,
  the headers set, Content-Length, X-Kong-Response-Latency, Server, X-Kong-Request-Id.
"""

from typing import Any, List, Optional, Tuple

from .lua import lua_str

__all__ = ["parse_raw_request", "upstream_head", "proxied_response_head", "kong_response_head",
           "HOP_BY_HOP"]

Pairs = List[Tuple[str, str]]

# headers of the client's request that nginx's proxy module does not pass as they are
_PROXY_SETS = frozenset(("host", "connection", "content-length", "x-forwarded-for",
                         "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
                         "x-forwarded-path", "x-forwarded-prefix", "x-real-ip",
                         "x-kong-request-id", "te", "upgrade", "keep-alive",
                         "transfer-encoding"))
HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                        "proxy-connection", "trailer"))


def parse_raw_request(raw: bytes) -> Tuple[str, str, str, Pairs, bytes]:
    """method, target, version, header lines (Lua strings) and body of raw bytes."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, version = (lua_str(x) for x in lines[0].split(b" ", 2))
    pairs: Pairs = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        pairs.append((lua_str(name), lua_str(value.strip(b" \t"))))
    return method, target, version, pairs, body


def _version_number(version: str) -> str:
    """ngx.req.http_version() as Lua prints it: 1.1, or 1 for HTTP/1.0."""
    return {"HTTP/1.0": "1", "HTTP/2.0": "2"}.get(version, "1.1")


def upstream_head(*, kong_version: str, version: str, service: Any, host: str, path: str,
                  client_ip: str, proxy_port: int, request_id: str, x_forwarded_for: Optional[str],
                  headers: Pairs, body: bytes) -> Pairs:
    port = service.get("port")
    default = {"http": 80, "https": 443}.get(service.get("protocol", "http"))
    upstream_host = service["host"] if port in (None, default) else \
        "%s:%s" % (service["host"], port)
    xff = client_ip if x_forwarded_for is None else "%s, %s" % (x_forwarded_for, client_ip)
    out: Pairs = [("Via", "%s kong/%s" % (_version_number(version), kong_version)),
                  ("Host", upstream_host), ("Connection", "keep-alive"),
                  ("X-Forwarded-For", xff), ("X-Forwarded-Proto", "http"),
                  ("X-Forwarded-Host", host), ("X-Forwarded-Port", str(proxy_port)),
                  ("X-Forwarded-Path", path), ("X-Real-IP", client_ip),
                  ("X-Kong-Request-Id", request_id)]
    if body:
        out.append(("Content-Length", str(len(body))))
    out.extend((k, v) for k, v in headers if k.lower() not in _PROXY_SETS)
    return out


def proxied_response_head(*, kong_version: str, version: str, upstream: Pairs,
                          set_by_plugin: Pairs, volatile: str) -> Pairs:
    first = [(k, v) for k, v in upstream if k.lower() in ("content-type", "content-length")]
    rest = [(k, v) for k, v in upstream
            if k.lower() not in ("content-type", "content-length") and
            k.lower() not in HOP_BY_HOP]
    conn = "close" if version == "HTTP/1.0" else "keep-alive"
    return first + [("Connection", conn)] + rest + list(set_by_plugin) + [
        ("Server", "kong/%s" % kong_version), ("X-Kong-Upstream-Latency", volatile),
        ("X-Kong-Proxy-Latency", volatile), ("Via", "1.1 kong/%s" % kong_version),
        ("X-Kong-Request-Id", volatile)]


def kong_response_head(*, kong_version: str, headers: Pairs, close: bool,
                       volatile: str) -> Pairs:
    ctype = [(k, v) for k, v in headers if k.lower() == "content-type"][:1]
    length = [(k, v) for k, v in headers if k.lower() == "content-length"][:1]
    rest = [(k, v) for k, v in headers if k.lower() not in ("content-type", "content-length")]
    return [("Date", volatile)] + ctype + [("Connection", "close" if close else "keep-alive")] + \
        rest + length + [("X-Kong-Response-Latency", volatile),
                         ("Server", "kong/%s" % kong_version), ("X-Kong-Request-Id", volatile)]
