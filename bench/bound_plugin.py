#!/usr/bin/env python3
"""The benchmark's lower bound for a 3-call cache hit: a plugin server that does
nothing but the protocol. Its access handler makes the same three PDK calls as our
cache hit (``kong.request.get_headers``, ``kong.service.request.set_headers``,
``kong.client.authenticate``) with answers packed once at start, on one thread
with a non-blocking ``selectors`` loop: no token, no cache, no greenlet, no
deadline. Whatever it costs is the price of 4 RPC round trips through the stand-in
on this machine, which no 3-call plugin can go below.

Kong's query command:  python bench/bound_plugin.py -dump
Kong's start command:  python bench/bound_plugin.py -kong-prefix DIR   (serves DIR/bound.sock)
"""

import json
import os
import selectors
import socket
import sys

import msgpack

NAME = "bound"
HEADERS = {"X-Credential-Client-ID": "bench", "X-Consumer-ID": []}
CREDENTIAL = {"id": "d9648806-1ad3-d9cc-d4fb-dc84e9cc0d61"}
CALLS = [{"Method": "kong.request.get_headers", "Args": [1000]},
         {"Method": "kong.service.request.set_headers", "Args": [HEADERS]},
         {"Method": "kong.client.authenticate", "Args": [None, CREDENTIAL]},
         "ret"]


def dump():
    print(json.dumps([{"Name": NAME, "Version": "0.1.0", "Priority": 0,
                       "Phases": ["access"], "Schema": {"name": NAME, "fields": [
                           {"config": {"type": "record", "fields": []}}]}}]))


def serve(path):
    pack = msgpack.Packer(use_bin_type=True).pack
    events = {}          # event id -> index of the next call
    next_event = [0]
    sel = selectors.DefaultSelector()
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)

    def answer(msg):
        _, msgid, method, args = msg
        arg = args[0] if args else None
        if method == "plugin.HandleEvent":
            eid = next_event[0]
            next_event[0] += 1
            events[eid] = 1
            return pack([1, msgid, None, {"Data": CALLS[0], "EventId": eid}])
        if method.startswith("plugin.Step"):
            eid = arg["EventId"]
            k = events[eid]
            if k + 1 == len(CALLS):
                del events[eid]
            else:
                events[eid] = k + 1
            return pack([1, msgid, None, {"Data": CALLS[k], "EventId": eid}])
        if method == "plugin.StartInstance":
            return pack([1, msgid, None, {"Name": NAME, "Id": 0, "Config": {},
                                          "StartTime": 0}])
        if method == "plugin.InstanceStatus":
            return pack([1, msgid, None, {"Name": NAME, "Id": 0, "Config": {},
                                          "StartTime": 0}])
        return pack([1, msgid, None, None])

    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ,
                             msgpack.Unpacker(raw=False, strict_map_key=False))
                continue
            conn, unpacker = key.fileobj, key.data
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(conn)
                conn.close()
                continue
            unpacker.feed(data)
            for msg in unpacker:
                conn.sendall(answer(msg))


def main(argv):
    if "-dump" in argv:
        dump()
        return 0
    prefix = argv[argv.index("-kong-prefix") + 1]
    serve(os.path.join(prefix, NAME + ".sock"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
