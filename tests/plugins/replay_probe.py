#!/usr/bin/env python3
"""Plugin server for tests/test_replay.py: plays a recorded transcript's script of
PDK calls back to the Kong stand-in over the real plugin-server socket.

Not kong-pdk: a bare MessagePack-RPC server, so that what Kong sends arrives
exactly as sent (msgpack str and bin stay apart, an absent ``Data`` stays absent)
and so that it can misbehave on cue (close, stay silent, answer late, refuse).

  replay_probe.py -dump                 the plugin info (plugin "probe")
  replay_probe.py -kong-prefix DIR      serve "probe" on DIR/probe.sock

Environment: REPLAY_SCRIPTS (JSON file: scenario -> {"script": [...],
"start_instance": "ok"|"error"}; the instance's config.scenario picks one) and
REPLAY_LOG (every message Kong sent, one JSON line each, appended).
REPLAY_LIFE_DIR (optional, the lifecycle scenarios): a file ``exit-code`` there makes
the probe exit at once with that status; ``term-delay`` is how long it lingers after
SIGTERM; the step {"action": "sleep_if_armed", "seconds": T} sleeps T s when the file
``arm-sleep`` exists (removing it first). Each start and SIGTERM is logged.
Script steps are {"method", "args"} (an arg {"$ref": i} is Kong's reply Data to
step i of the event) or {"action": "close" | "silent" (optional "answer_after_s")
| "error" (optional "message") | "no_instance_once"}.
"""

import base64
import json
import os
import socket
import sys
import signal
import threading
import time

import msgpack

PLUGIN_INFO = [{
    "Name": "probe", "Priority": 1000, "Version": "0.1.0", "Phases": ["access"],
    "Schema": {"name": "probe", "fields": [{"config": {"type": "record", "fields": [
        {"scenario": {"type": "string", "required": True}},
        {"opt_string": {"type": "string"}},
        {"opt_number": {"type": "number"}},
        {"opt_integer": {"type": "integer"}},
        {"opt_boolean": {"type": "boolean"}},
        {"opt_array": {"type": "array", "elements": {"type": "string"}}},
        {"opt_set": {"type": "set", "elements": {"type": "string"}}},
        {"opt_map": {"type": "map", "keys": {"type": "string"},
                     "values": {"type": "string"}}},
        {"rec_defaults": {"type": "record", "fields": [
            {"d_str": {"type": "string", "default": "dflt"}},
            {"d_int": {"type": "integer", "default": 7}},
            {"d_num": {"type": "number", "default": 1.5}},
            {"d_bool": {"type": "boolean", "default": True}},
            {"d_arr": {"type": "array", "elements": {"type": "string"},
                       "default": ["x", "y"]}},
            {"d_nodefault": {"type": "string"}}]}},
        {"opt_record": {"type": "record", "required": False, "fields": [
            {"r_str": {"type": "string"}},
            {"r_int": {"type": "integer", "default": 3}}]}},
    ]}}]},
}]

EXITS = ("kong.response.exit", "kong.response.error")


def as_json(v):
    """Decoded msgpack as the transcripts write it: non-UTF-8 str and every bin
    tagged, so the two stay distinguishable."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
            return v
        except UnicodeEncodeError:
            return {"b64": base64.b64encode(v.encode("utf-8", "surrogateescape")).decode(),
                    "msgpack": "str"}
    if isinstance(v, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(v)).decode(), "msgpack": "bin"}
    if isinstance(v, dict):
        return {str(as_json(k)): as_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [as_json(x) for x in v]
    return v


def from_json(v):
    """The reverse for script arguments ({"b64", "msgpack"} back to str or bin)."""
    if isinstance(v, dict):
        if set(v) == {"b64", "msgpack"}:
            raw = base64.b64decode(v["b64"])
            return raw if v["msgpack"] == "bin" else raw.decode("utf-8", "surrogateescape")
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v


class Server(object):
    def __init__(self, path, scripts, log):
        self.path = path
        self.scripts = scripts
        self.log_file = open(log, "a", buffering=1) if log else None
        self.lock = threading.Lock()
        self.instances = {}       # id -> scenario
        self.events = {}          # id -> {"steps", "pos", "replies"}
        self.next_id = 1
        self.no_instance_done = set()

    def log(self, conn, msg):
        if self.log_file is not None:
            with self.lock:
                self.log_file.write(json.dumps({"conn": conn, "msg": as_json(msg)}) + "\n")

    # -- what to answer: ("reply", err, result) | ("close",) | ("silent", after, result)
    def answer(self, msg):
        if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == 0):
            return None
        method, args = msg[2], msg[3]
        arg = args[0] if isinstance(args, list) and args else None
        with self.lock:
            if method == "plugin.StartInstance":
                conf = json.loads(arg["Config"])
                scen = conf.get("scenario")
                if self.scripts.get(scen, {}).get("start_instance") == "error":
                    return ("reply", "probe: StartInstance refused for scenario %s" % scen, None)
                iid = self.next_id
                self.next_id += 1
                self.instances[iid] = scen
                return ("reply", None, {"Name": "probe", "Id": iid, "Config": conf})
            if method == "plugin.CloseInstance":
                if self.instances.pop(arg, None) is None:
                    return ("reply", "no plugin instance #%s" % arg, None)
                return ("reply", None, {"Name": "probe", "Id": arg})
            if method == "plugin.HandleEvent":
                iid = arg.get("InstanceId")
                scen = self.instances.get(iid)
                if scen is None:
                    return ("reply", "no plugin instance #%s" % iid, None)
                steps = list(self.scripts.get(scen, {}).get("script", []))
                if steps and steps[0].get("action") == "no_instance_once":
                    steps = steps[1:]
                    if scen not in self.no_instance_done:
                        self.no_instance_done.add(scen)
                        del self.instances[iid]
                        return ("reply", "no plugin instance #%s" % iid, None)
                eid = self.next_id
                self.next_id += 1
                self.events[eid] = {"steps": steps, "pos": 0, "replies": []}
                return self.next_step(eid)
            if isinstance(method, str) and method.startswith("plugin.Step"):
                eid = arg.get("EventId") if isinstance(arg, dict) else None
                ev = self.events.get(eid)
                if ev is None:
                    return ("reply", "event id %s not found" % eid, None)
                ev["replies"].append(arg.get("Data"))
                return self.next_step(eid)
        return ("reply", "probe: %s not supported" % method, None)

    def resolve(self, v, replies):
        if isinstance(v, dict) and set(v) == {"$ref"}:
            return replies[v["$ref"]]
        if isinstance(v, dict) and set(v) != {"b64", "msgpack"}:
            return {k: self.resolve(x, replies) for k, x in v.items()}
        if isinstance(v, list):
            return [self.resolve(x, replies) for x in v]
        return from_json(v)

    def next_step(self, eid):
        ev = self.events[eid]
        if ev["pos"] >= len(ev["steps"]):
            del self.events[eid]
            return ("reply", None, {"Data": "ret", "EventId": eid})
        step = ev["steps"][ev["pos"]]
        ev["pos"] += 1
        action = step.get("action")
        if action == "sleep_if_armed":
            arm = os.path.join(os.environ.get("REPLAY_LIFE_DIR", ""), "arm-sleep")
            if os.environ.get("REPLAY_LIFE_DIR") and os.path.exists(arm):
                os.remove(arm)
                self.lock.release()       # other connections go on meanwhile
                try:
                    time.sleep(step.get("seconds", 0))
                finally:
                    self.lock.acquire()
            return self.next_step(eid)
        if action is not None:
            del self.events[eid]
            if action == "close":
                return ("close",)
            if action == "silent":
                return ("silent", step.get("answer_after_s"), {"Data": "ret", "EventId": eid})
            return ("reply", step.get("message", "probe: scripted error"), None)
        if step["method"] in EXITS:
            del self.events[eid]
        return ("reply", None, {"EventId": eid, "Data": {
            "Method": step["method"], "Args": self.resolve(step.get("args", []), ev["replies"])}})

    def serve_conn(self, conn, cid):
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape",
                                    strict_map_key=False)
        silent = [False]
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                unpacker.feed(data)
                for msg in unpacker:
                    self.log(cid, msg)
                    if silent[0]:
                        continue
                    what = self.answer(msg)
                    if what is None:
                        continue
                    if what[0] == "close":
                        conn.shutdown(socket.SHUT_RDWR)
                        return
                    if what[0] == "silent":
                        silent[0] = True
                        if what[1]:
                            late = msgpack.packb([1, msg[1], None, what[2]], use_bin_type=True)

                            def send_late(late=late):
                                try:
                                    conn.sendall(late)
                                except OSError:
                                    pass
                                silent[0] = False
                            threading.Timer(what[1], send_late).start()
                        continue
                    conn.sendall(msgpack.packb([1, msg[1], what[1], what[2]], use_bin_type=True,
                                               unicode_errors="surrogateescape"))
        except OSError:
            return
        finally:
            if not silent[0]:
                conn.close()

    def serve_forever(self):
        if os.path.exists(self.path):
            os.remove(self.path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.path)
        srv.listen(128)
        n = 0
        while True:
            conn, _ = srv.accept()
            n += 1
            threading.Thread(target=self.serve_conn, args=(conn, n), daemon=True).start()


def life_event(ev):
    path = os.path.join(os.environ["REPLAY_LIFE_DIR"], "events.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(dict(ev, t=time.time())) + "\n")


def main(argv):
    if "-dump" in argv:
        sys.stdout.write(json.dumps(PLUGIN_INFO))
        return
    prefix = argv[argv.index("-kong-prefix") + 1]
    life = os.environ.get("REPLAY_LIFE_DIR")
    log = os.environ.get("REPLAY_LOG")
    if life:
        code = None
        if os.path.exists(os.path.join(life, "exit-code")):
            with open(os.path.join(life, "exit-code")) as f:
                code = int(f.read().strip() or "1")
        life_event({"event": "start", "pid": os.getpid(), "exit_code": code})
        print("probe pid %d starting%s" % (os.getpid(), ", exiting %d (exit-code file)" % code
                                           if code is not None else ""), flush=True)
        if code is not None:
            os._exit(code)
        delay = 0.0
        if os.path.exists(os.path.join(life, "term-delay")):
            with open(os.path.join(life, "term-delay")) as f:
                delay = float(f.read().strip() or "0")

        def on_term(signum, frame, delay=delay):
            life_event({"event": "signal 15", "pid": os.getpid()})
            time.sleep(delay)
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    with open(os.environ["REPLAY_SCRIPTS"]) as f:
        scripts = json.load(f)
    Server(os.path.join(prefix, "probe.sock"), scripts,
           os.environ.get("REPLAY_LOG")).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
