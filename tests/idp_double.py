"""A scriptable introspection endpoint on 127.0.0.1, for the faults a real
authorization server cannot be made to produce on demand (5xx, hangs, bad
JSON, dropped connections) and for counting calls exactly.

Each request is answered by ``behaviour(form, headers) -> Reply``; every
request is recorded in ``calls``. A GET (a key set, a metadata document) is
answered the same way, with an empty form.
"""

import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, NamedTuple, Optional
from urllib.parse import parse_qs


class Reply(NamedTuple):
    status: int = 200
    body: object = None            # dict/list -> JSON; str/bytes -> as is
    headers: Optional[Dict[str, str]] = None
    delay: float = 0.0
    drop: bool = False             # close the connection without answering
    drip: float = 0.0              # seconds between body bytes (a slow-drip server)
    size: int = 0                  # stream this many bytes of JSON-ish filler instead of body


def active(**claims) -> Reply:
    return Reply(200, dict({"active": True}, **claims))


INACTIVE = Reply(200, {"active": False})


def kong_yml_tokens(form, headers) -> Reply:
    """The IdP behind the repository's kong.yml: tok-alice and tok-bob are active
    for its consumers (alice by username, bob-app by client_id), anything else not."""
    if form.get("token") == "tok-alice":
        return active(username="alice", client_id="alice-app", azp="alice-app",
                      exp=int(time.time()) + 600)
    if form.get("token") == "tok-bob":
        return active(username="service-account-bob-app", client_id="bob-app",
                      exp=int(time.time()) + 600)
    return INACTIVE


class Call(NamedTuple):
    form: Dict[str, str]
    headers: Dict[str, str]
    client_port: int      # the same port twice means a reused connection


class IdPDouble:
    def __init__(self, behaviour: Optional[Callable[[Dict[str, str], Dict[str, str]], Reply]] = None,
                 tls: Optional[ssl.SSLContext] = None):
        self.behaviour = behaviour or (lambda form, headers: active(client_id="app"))
        self.calls: List[Call] = []
        self._lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                form = {k: v[0] for k, v in parse_qs(raw).items()}
                headers = {k: v for k, v in self.headers.items()}
                with double._lock:
                    double.calls.append(Call(form, headers, self.client_address[1]))
                reply = double.behaviour(form, headers)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if reply.size:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(reply.size))
                    self.end_headers()
                    chunk = b" " * 65536
                    sent = 0
                    try:
                        while sent < reply.size:
                            n = min(len(chunk), reply.size - sent)
                            self.wfile.write(chunk[:n])
                            sent += n
                    except OSError:
                        pass  # the client gave up, as it should
                    return
                body = reply.body
                if isinstance(body, (dict, list)):
                    body = json.dumps(body)
                if isinstance(body, str):
                    body = body.encode()
                body = body or b""
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                for name, value in (reply.headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not reply.drip:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(reply.drip)
                except OSError:
                    pass

            do_GET = do_POST   # no body: an empty form

        class Server(ThreadingHTTPServer):
            request_queue_size = 512  # a herd of concurrent first requests connects at once

            def handle_error(self, request, client_address):
                # The plugin gave up on a slow answer (its deadline): expected here.
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/introspect"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def tokens(self) -> List[str]:
        return [call.form.get("token") for call in self.calls]
