"""The slice of Kong's Admin API a plugin may call: consumers by id, username or
custom_id (kong/api/routes/consumers.lua; ``GET /consumers?custom_id=`` answers in
DB-less mode too; ``GET /`` answers 500 as on Kong 3.9.x). Every request is recorded in ``standin.admin_requests``."""

import json
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import Any, Type

from .lua import is_uuid

__all__ = ["admin_handler"]


def admin_handler(standin: Any) -> Type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kong/3.9.1"
        sys_version = ""

        def log_message(self, *a: Any) -> None:
            pass

        def _send(self, status: int, obj: Any) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            standin.admin_requests.append(("GET", self.path))
            u = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in u.path.strip("/").split("/") if p]
            q = urllib.parse.parse_qs(u.query)
            if not parts:
                # Kong/kong#14260: on 3.9.x GET / answers 500 while a start_cmd
                # plugin server runs (observed); other endpoints work
                return self._send(500, {"message": "An unexpected error occurred"})
            if parts == ["consumers"]:
                consumers = standin.consumers()
                if "custom_id" in q:
                    consumers = [c for c in consumers if c["custom_id"] == q["custom_id"][0]]
                return self._send(200, {"data": consumers, "next": None})
            if len(parts) == 2 and parts[0] == "consumers":
                key = parts[1]
                c = standin._consumer_by_id(key) if is_uuid(key) else None
                c = c or standin._consumer_by_username(key)
                if c:
                    return self._send(200, c)
            return self._send(404, {"message": "Not found"})
    return Handler
