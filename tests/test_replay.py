"""Replays every recorded Kong transcript (../shared/kong-transcripts/<version>/*.json)
through the Kong stand-in, with tests/plugins/replay_probe.py playing the recorded
script of PDK calls, and checks that the stand-in does what real Kong did:
1. the methods Kong sent the plugin server and the Data of every reply (an absent
   Data is not null, msgpack str is not bin);
2. the keys and values of StartInstance's Config (Kong's own keys: present);
3. whether the upstream was reached and exactly what it received;
4. the client's status, headers and body (volatile values aside);
5. for failure scenarios, the timing class (at once, or after Kong's RPC timeout,
   scaled down here) and whether Kong failed open.
The lifecycle transcripts (life_*: Kong starting, killing, respawning and
stopping the server itself) are played as their recorded timeline at LIFE_SCALE
speed; every request, the key request in full, the messages Kong sent and the
respawn timing are checked (_replay_life).
Transcripts the stand-in cannot model yet are listed in tests/kong/unmodelled.py.
"""

import base64
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from kong import KongStandIn
from kong.unmodelled import UNMODELLED

ROOT = Path(__file__).resolve().parent.parent
TRANSCRIPTS = ROOT.parent / "shared" / "kong-transcripts"
PROBE = [sys.executable, str(ROOT / "tests" / "plugins" / "replay_probe.py")]

# Kong's 60 s cosocket timeout, scaled down: a scenario that waited it out in the
# recording must take about RPC_TIMEOUT here, the others well under half of it.
KONG_TIMEOUT = 60.0
RPC_TIMEOUT = 2.0
SCALE = RPC_TIMEOUT / KONG_TIMEOUT

# the recording's fixed entities (README of the transcripts)
CONSUMER = {"id": "8a1c7e5e-4d0b-4c3a-9d55-2f0c6a9b1e01", "username": "alice",
            "custom_id": "alice-cid"}
UPSTREAM_HOST, UPSTREAM_PORT, PROXY_PORT = "127.0.0.1", 8129, 8120
# the lifecycle recording (life_*): its own upstream and proxy port; its timeline
# (kills, respawns once a second, the 10 s claim wait, 60 s timeout) runs at 1/5 speed
LIFE_UPSTREAM_PORT, LIFE_PROXY_PORT = 8149, 8140
LIFE_SCALE = 0.2
UPSTREAM_ANSWER = (200, [("Content-Type", "text/plain; charset=UTF-8"), ("Content-Length", "12"),
                         ("Connection", "close"), ("X-Upstream", "probe-upstream")],
                   b"upstream ok\n")
KONG_KEYS = ("__plugin_id", "__seq__", "route_id", "service_id", "__key__", "__ws_id")
ABSENT = "<absent>"
VOLATILE = "<volatile>"
# PDK replies whose value is the moment or the machine, not behaviour: compared by type
VOLATILE_STEPS = {"kong.request.get_start_time", "kong.node.get_id",
                  "kong.node.get_hostname"}

# scenarios recorded after (and depending on) another one: run that one first
PRELUDE = {"after_silent_next_request": "fail_silent",
           "after_late_answer_next_request": "fail_late_answer"}


# scenarios whose request went to another scenario's route (and plugin)
SAME_ROUTE = {"fail_server_restarted_stale_instance": "fail_server_down_with_instance"}


def _transcripts() -> List[Any]:
    if not TRANSCRIPTS.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(
            reason="no recorded transcripts: %s is absent (it holds ../shared from the "
                   "repository)" % TRANSCRIPTS))]
    return [pytest.param(p, id="%s/%s" % (p.parent.name, p.stem))
            for p in sorted(TRANSCRIPTS.glob("*/*.json"))]


def _load(version_dir: Path, name: str) -> Dict[str, Any]:
    with open(version_dir / (name + ".json")) as f:
        return json.load(f)


# ---- normalising both sides


def _norm(v: Any) -> Any:
    """Decoded values with dict key order dropped (Lua's hash order is not meaningful)."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _shape(v: Any) -> Any:
    return type(v).__name__


def _kong_messages(msgs: List[Any]) -> List[Tuple[str, Any]]:
    """What Kong sent, comparable across runs: method plus the part that is behaviour."""
    out: List[Tuple[str, Any]] = []
    last_method: Optional[str] = None
    for m in msgs:
        if not isinstance(m, list) or len(m) < 4 or m[0] != 0:
            out.append(("notification", _norm(m)))
            continue
        method, arg = m[2], (m[3][0] if m[3] else None)
        if method == "plugin.StartInstance":
            out.append((method, arg["Name"]))
        elif method == "plugin.HandleEvent":
            out.append((method, arg["EventName"]))
        elif method == "plugin.CloseInstance":
            out.append((method, _shape(arg)))
        elif method.startswith("plugin.Step"):
            data = arg.get("Data", ABSENT) if isinstance(arg, dict) else arg
            if last_method in VOLATILE_STEPS:
                data = _shape(data)
            elif isinstance(data, dict) and "created_at" in data:   # a consumer
                data = dict(data, created_at=_shape(data["created_at"]),
                            updated_at=_shape(data.get("updated_at")))
            out.append((method, _norm(data)))
        else:
            out.append((method, _norm(arg)))
        last_method = None
        if method in ("plugin.HandleEvent",) or method.startswith("plugin.Step"):
            last_method = "?"
        out_method = out[-1][0]
        del out_method
    return out


def _with_step_methods(msgs: List[Any], server_msgs: List[Any]) -> List[Any]:
    return msgs


def _start_configs(msgs: List[Any]) -> List[Dict[str, Any]]:
    out = []
    for m in msgs:
        if isinstance(m, list) and len(m) >= 4 and m[2] == "plugin.StartInstance":
            conf = json.loads(m[3][0]["Config"])
            out.append({k: (("present" if k in conf else ABSENT) if k in KONG_KEYS else v)
                        for k, v in sorted(conf.items())})
    return out


def _pdk_methods_sent(rpc: List[Dict[str, Any]]) -> List[Optional[str]]:
    """For each Kong->server message of the transcript, the PDK method it answers."""
    pending: Optional[str] = None
    out: List[Optional[str]] = []
    for e in rpc:
        if e["from"] == "kong":
            out.append(pending)
        else:
            res = e["msg"][3] if len(e["msg"]) > 3 else None
            data = res.get("Data") if isinstance(res, dict) else None
            pending = data.get("Method") if isinstance(data, dict) else None
    return out


def _kong_side(rpc_msgs: List[Any], answered: List[Optional[str]]) -> List[Tuple[str, Any]]:
    norm = []
    for m, pdk_method in zip(rpc_msgs, answered):
        (method, data), = _kong_messages([m])
        if method.startswith("plugin.Step") and pdk_method in VOLATILE_STEPS:
            data = _shape(m[3][0].get("Data", ABSENT)) if isinstance(m[3][0], dict) else data
        norm.append((method, data))
    return norm


def _lua_text(v: Any) -> Any:
    """A Lua string as the transcripts write it: text, or {"b64"} when not UTF-8."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return {"b64": base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()}
    return v


def _headers(pairs: List[Any]) -> List[Tuple[Any, Any]]:
    return [(json.dumps(_lua_text(k)) if not isinstance(_lua_text(k), str) else k,
             _lua_text(v)) for k, v in pairs]


def _unvolatile_body(body: str) -> str:
    body = re.sub(r'("request_id":")[0-9a-f]{32}"', r'\1<volatile>"', body)
    return re.sub(r"(request_id: )[0-9a-f]{32}", r"\1<volatile>", body)


def _text(b: bytes) -> Any:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(b).decode()}


# ---- driving the stand-in


class Replay(object):
    def __init__(self, tmp: Path, version: str, scenarios: List[Dict[str, Any]],
                 life: Optional[Path] = None) -> None:
        self.log_path = tmp / "probe.log"
        scripts = {}
        for t in scenarios:
            script = []
            for step in t["script"]:
                step = dict(step)
                if "answer_after_s" in step:
                    # as late past the (scaled) timeout as recorded, and clearly past it
                    past = step["answer_after_s"] - KONG_TIMEOUT
                    step["answer_after_s"] = RPC_TIMEOUT + max(0.3, past * SCALE)
                script.append(step)
            scripts[t["plugin_config"]["scenario"]] = {"script": script,
                                      "start_instance": t.get("server_start_instance", "ok")}
        (tmp / "scripts.json").write_text(json.dumps(scripts))
        env = {"REPLAY_SCRIPTS": str(tmp / "scripts.json"), "REPLAY_LOG": str(self.log_path)}
        if life is None:
            self.kong = KongStandIn(PROBE, env=env, kong_version=version,
                                    rpc_timeout=RPC_TIMEOUT, instance_claim_wait=10.0 * SCALE,
                                    fail_open="record", upstream_response=UPSTREAM_ANSWER,
                                    proxy_port=PROXY_PORT)
            self.kong.service.update(host=UPSTREAM_HOST, port=UPSTREAM_PORT)
        else:
            # a Kong-managed server (start_cmd): respawned; every wait of the
            # recording scaled by LIFE_SCALE
            env["REPLAY_LIFE_DIR"] = str(life)
            self.kong = KongStandIn(PROBE, env=env, kong_version=version,
                                    rpc_timeout=KONG_TIMEOUT * LIFE_SCALE,
                                    instance_claim_wait=10.0 * LIFE_SCALE, fail_open="record",
                                    respawn=True, respawn_interval=1.0 * LIFE_SCALE,
                                    upstream_response=UPSTREAM_ANSWER, proxy_port=LIFE_PROXY_PORT)
            self.kong.service.update(host=UPSTREAM_HOST, port=LIFE_UPSTREAM_PORT)
        self.kong.add_consumer(**CONSUMER)
        self.seen = 0

    def configure(self, t: Dict[str, Any], plugin_id: Optional[str] = None) -> Any:
        scope = t["scope"]
        return self.kong.configure(t["plugin_config"], plugin_id=plugin_id,
                                   route=scope == "route", service=scope == "service",
                                   instance_name=t.get("plugin_instance_name"))

    def send(self, inst: Any, request: Dict[str, Any]) -> Tuple[Any, float]:
        started = time.monotonic()
        r = self.kong.request_raw(inst, base64.b64decode(request["raw_b64"]))
        return r, time.monotonic() - started

    def new_messages(self) -> List[Any]:
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        fresh, self.seen = lines[self.seen:], len(lines)
        return [json.loads(line)["msg"] for line in fresh]


def _expected_fail_open(t: Dict[str, Any]) -> bool:
    """Kong logged an RPC failure and still proxied the request."""
    rpc_errors = ("mp_rpc.lua:318", "mp_rpc.lua:178", "Could not claim")
    return t["upstream"]["reached"] and any(
        any(e in line for e in rpc_errors) and "no plugin instance" not in line
        for line in t["kong_log"])


def _compare(t: Dict[str, Any], r: Any, msgs: List[Any], elapsed: float) -> None:
    name = t["scenario"]
    kong_msgs = [e["msg"] for e in t["rpc"] if e["from"] == "kong"]
    # 1. Kong's messages and the Data of its replies
    want = _kong_side(kong_msgs, _pdk_methods_sent(t["rpc"]))
    got_answered = [m for m in msgs]
    got = _kong_side(got_answered, _probe_answered(t, got_answered))
    assert got == want, "%s: Kong's RPC messages differ:\n got %r\nwant %r" % (name, got, want)
    # 2. StartInstance's Config
    assert _start_configs(msgs) == _start_configs(kong_msgs), \
        "%s: StartInstance Config differs" % name
    # 3. the upstream
    up = t["upstream"]
    assert r.proxied == up["reached"], "%s: upstream reached %s, recorded %s" % (
        name, r.proxied, up["reached"])
    if up["reached"]:
        _assert_upstream(name, r, up)
    # 4. the client's response
    _assert_response(name, r, t["response"])
    # 5. timing class and fail-open
    waited = t["elapsed_s"] > KONG_TIMEOUT * 0.9
    if waited:
        assert elapsed >= RPC_TIMEOUT * 0.9, "%s: answered at once, Kong waited %.0f s" % (
            name, t["elapsed_s"])
    else:
        assert elapsed < RPC_TIMEOUT * 0.5, "%s: took %.2f s, Kong answered at once" % (
            name, elapsed)
    assert (r.failed_open and r.proxied) == _expected_fail_open(t), \
        "%s: failed open %s, recorded %s" % (name, r.failed_open, _expected_fail_open(t))


def _diff(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """The items of ``a`` that differ from ``b`` (header lists: from the first
    differing line on)."""
    out: Dict[str, Any] = {}
    for k, v in a.items():
        if v != b.get(k):
            if isinstance(v, list) and isinstance(b.get(k), list):
                i = next((i for i, (x, y) in enumerate(zip(v, b[k])) if x != y),
                         min(len(v), len(b[k])))
                v = v[i:]
            out[k] = v
    return out


def _probe_answered(t: Dict[str, Any], msgs: List[Any]) -> List[Optional[str]]:
    """The PDK method each of Kong's Step messages answers, from the script."""
    out: List[Optional[str]] = []
    script = [s.get("method") for s in t["script"] if "method" in s]
    pos = 0
    for m in msgs:
        method = m[2] if isinstance(m, list) and len(m) > 2 else None
        if method == "plugin.HandleEvent":
            pos = 0
            out.append(None)
        elif isinstance(method, str) and method.startswith("plugin.Step"):
            out.append(script[pos] if pos < len(script) else None)
            pos += 1
        else:
            out.append(None)
    return out


@pytest.mark.parametrize("path", _transcripts())
def test_replay(path: Optional[Path], tmp_path: Path) -> None:
    assert path is not None
    key = "%s/%s" % (path.parent.name, path.stem)
    reason = UNMODELLED.get(key) or UNMODELLED.get(path.stem)
    if reason:
        pytest.xfail("the stand-in cannot model this transcript yet: " + reason)
    t = _load(path.parent, path.stem)
    if t["scenario"].startswith("life_"):
        _replay_life(t, tmp_path)
        return
    if t["scenario"] in SAME_ROUTE:
        # the request went to another scenario's route: that plugin entity answers
        t = dict(t, plugin_config=_load(path.parent, SAME_ROUTE[t["scenario"]])["plugin_config"])
    before = [_load(path.parent, PRELUDE[t["scenario"]])] if t["scenario"] in PRELUDE else []
    replay = Replay(tmp_path, t["kong"], before + [t])
    try:
        for p in before:
            replay.send(replay.configure(p), p["request"])
            if any(s.get("answer_after_s") for s in p["script"]):
                # the late answer arrives while the connection sits in the pool
                time.sleep(0.3 + 0.2)
            replay.new_messages()
        inst = replay.configure(t)
        if "setup" in t:
            _setup(replay, t, inst)
        _before(replay, t, inst)
        r, elapsed = replay.send(inst if not hasattr(replay, "inst") else replay.inst,
                                 t["request"])
        time.sleep(0.05)   # the probe logs what it read before answering; let it flush
        _compare(t, r, replay.new_messages(), elapsed)
    finally:
        replay.kong.close()


def _setup(replay: Replay, t: Dict[str, Any], inst: Any) -> None:
    """The preparatory exchange some transcripts recorded before the key request."""
    name = t["scenario"]
    if name == "config_reload_close_instance":
        first = dict(t, plugin_config={"scenario": name})
        old = replay.configure(first)
        replay.send(old, t["setup"]["request"])
        setattr(replay, "inst", replay.configure(t, plugin_id=old.plugin_id))
    elif name == "fail_server_down_with_instance":
        replay.send(inst, t["setup"]["request"])
        replay.kong.kill_server()
    replay.new_messages()


def _before(replay: Replay, t: Dict[str, Any], inst: Any) -> None:
    """The state a failure scenario was recorded in (they ran in sequence)."""
    name = t["scenario"]
    if name == "fail_server_down_no_instance":
        replay.kong.kill_server()           # still down from the scenario before
    elif name == "fail_server_restarted_stale_instance":
        # an instance started on the old server, which then died; a new one runs
        replay.send(inst, t["request"])
        replay.kong.kill_server()
        replay.kong.restart_server()
    replay.new_messages()


# ---- the lifecycle transcripts (life_*): Kong starts, kills, respawns and stops the
# server itself; a timeline of recorder actions and (partly concurrent) requests

# what Kong's error.log said about one request (the kinds, not the wording)
LOG_KINDS = ("no plugin instance", "no data", "connection refused", "starting instance",
             "Could not claim")
CONCURRENT = ("life_concurrent_restart", "life_concurrent_after_respawn",
              "life_reload_while_down", "life_claim_timeout")


def _target_logs(t: Dict[str, Any], target: str) -> List[str]:
    return [line for line in t["kong_log"] if '"GET %s HTTP' % target in line]


def _exchange_failed_open(t: Dict[str, Any], ex: Dict[str, Any]) -> bool:
    rpc_errors = ("mp_rpc.lua:318", "mp_rpc.lua:178", "Could not claim")
    return ex["upstream"]["reached"] and any(
        any(e in line for e in rpc_errors) and "no plugin instance" not in line
        for line in _target_logs(t, ex["request"]["target"]))


def _life_events(t: Dict[str, Any]) -> List[Tuple[float, str, Any]]:
    """The recorder's actions and the requests, in the order of the recording."""
    events: List[Tuple[float, str, Any]] = []
    for ex in t["exchanges"]:
        events.append((ex["sent_at_s"], "request", ex))
    for e in t["timeline"]:
        text = e["event"]
        if text.startswith("recorder: kill -9"):
            events.append((e["t_s"], "kill", None))
        elif text.startswith("recorder: kill -19"):
            events.append((e["t_s"], "stop", None))
        elif text.startswith("recorder: kill -18"):
            events.append((e["t_s"], "cont", None))
        elif text.startswith("recorder: exit-code file ="):
            events.append((e["t_s"], "exit_code", text.rsplit("=", 1)[1].strip()))
        elif text.startswith("recorder: exit-code file removed"):
            events.append((e["t_s"], "exit_code", None))
        elif text.startswith("recorder: POST /config"):
            events.append((e["t_s"], "reconfigure", None))
        elif text.startswith("recorder: kong stop"):
            events.append((e["t_s"], "kong_stop", None))
        elif "listening" in text and ("respawned" in text or "again" in text):
            events.append((e["t_s"], "wait_listening", None))
        elif text.startswith("probe is sleeping inside the event"):
            events.append((e["t_s"], "wait_sleeping", None))
    # a request is sent after an action recorded at the same moment
    order = {"request": 1}
    return sorted(events, key=lambda e: (e[0], order.get(e[1], 0)))


def _replay_life(t: Dict[str, Any], tmp: Path) -> None:
    name = t["scenario"]
    life = tmp / "life"
    life.mkdir()
    if name == "life_sigterm_on_stop":
        (life / "term-delay").write_text("3")
    # the probe's sleep inside an event stays as recorded (2 s): the kill, on the
    # scaled timeline, lands well inside it however loaded the machine
    replay = Replay(tmp, t["kong"], [t], life=life)
    kong = replay.kong
    first = replay.configure(dict(t, plugin_config={"scenario": name}))
    current = {"inst": first}
    results: Dict[str, Tuple[Any, float]] = {}
    threads: List[threading.Thread] = []
    kills: List[Tuple[float, float]] = []      # (when, how long that server had run)
    try:
        # the server has run as long before the scenario as in the recording (a
        # respawn comes at once after a server that ran a second or more)
        ran_before = -min(p.get("seen_s") or 0.0 for p in t["processes"])
        time.sleep(max(0.0, ran_before * LIFE_SCALE - (time.monotonic() - kong.spawns[0][0])))
        replay.new_messages()
        start = time.monotonic()
        offset = 0.0
        stopped_at = None
        for at, what, arg in _life_events(t):
            delay = start + offset + at * LIFE_SCALE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if what == "request":
                inst = current["inst"]

                def send(ex: Dict[str, Any] = arg, inst: Any = inst) -> None:
                    results[ex["label"]] = replay.send(inst, ex["request"])
                if arg["label"] == "killed_during_event":
                    (life / "arm-sleep").write_text("1")
                th = threading.Thread(target=send)
                th.start()
                threads.append(th)
                if name not in CONCURRENT and arg["elapsed_s"] < 0.5:
                    th.join()        # else it ends with what happens next (a kill)
            elif what == "kill":
                kills.append((time.monotonic(), time.monotonic() - kong.spawns[-1][0]))
                kong.kill_server()
            elif what == "stop":
                kong.hang_server()
            elif what == "cont":
                kong.resume_server()
            elif what == "exit_code":
                if arg is None:
                    (life / "exit-code").unlink()
                else:
                    (life / "exit-code").write_text(arg)
            elif what == "reconfigure":
                current["inst"] = replay.configure(t, plugin_id=first.plugin_id)
            elif what == "wait_listening":
                waited = time.monotonic()
                deadline = waited + 30
                while time.monotonic() < deadline:
                    try:
                        kong.wait_listening()
                        break
                    except RuntimeError:        # it exited again before listening
                        time.sleep(0.01)
                offset += max(0.0, time.monotonic() - (start + offset + at * LIFE_SCALE))
            elif what == "wait_sleeping":
                deadline = time.monotonic() + 30
                while (life / "arm-sleep").exists() and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(0.05)                 # well inside the event
                offset = time.monotonic() - start - at * LIFE_SCALE
        for th in threads:
            th.join(timeout=60)
        if name == "life_sigterm_on_stop":
            pid = kong.pid
            stopped_at = time.monotonic()
            kong.close()
            assert pid is not None
            gone = _gone(pid, 5.0)
            assert gone is not None and gone - stopped_at < 1.0, \
                "the server outlived kong stop (Kong does not wait for it)"
            events = _life_log(life)
            assert any(e["event"] == "signal 15" for e in events), "no SIGTERM on kong stop"
            assert any(level == "notice" and "successfully stopped pluginserver 'probe'" in m
                       for level, m in kong.process_log)
        time.sleep(0.05)
        msgs = replay.new_messages()
    finally:
        kong.close()
    _compare_life(t, replay, results, msgs)
    # a server that ran longer than the respawn interval is respawned at once
    for at, age in kills:
        if age >= 1.0 * LIFE_SCALE:
            after = [s for s, _ in kong.spawns if s >= at]
            assert after and after[0] - at < 1.0 * LIFE_SCALE, \
                "%s: a server that ran %.2f s was respawned %s s after the kill" % (
                    name, age, "%.2f" % (after[0] - at) if after else "never")


def _gone(pid: int, timeout: float) -> Optional[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path("/proc/%d" % pid).exists() or \
                Path("/proc/%d/stat" % pid).read_text().split(") ")[-1].startswith("Z"):
            return time.monotonic()
        time.sleep(0.005)
    return None


def _life_log(life: Path) -> List[Dict[str, Any]]:
    path = life / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _compare_life(t: Dict[str, Any], replay: Replay, results: Dict[str, Tuple[Any, float]],
                  msgs: List[Any]) -> None:
    name = t["scenario"]
    kong = replay.kong
    # every request: status, upstream reached, failed open, waited or not
    for ex in t["exchanges"]:
        label = ex["label"]
        assert label in results, "%s: request %s got no answer" % (name, label)
        r, elapsed = results[label]
        got = (r.status, r.proxied, bool(r.failed_open and r.proxied))
        want = (ex["response"]["status"], ex["upstream"]["reached"], _exchange_failed_open(t, ex))
        assert got == want, "%s/%s: (status, upstream reached, failed open) %r, recorded %r (%s)" % (
            name, label, got, want, r.kong_error)
        if name not in CONCURRENT:    # (which racer met which error is scheduling)
            logged = {k for k in LOG_KINDS for line in _target_logs(t, ex["request"]["target"])
                      if k in line}
            got_logged = {k for k in LOG_KINDS for _, m in r.kong_logs if k in m}
            assert got_logged == logged, "%s/%s: Kong logged %s, the stand-in %s" % (
                name, label, sorted(logged), sorted(got_logged))
        if ex["elapsed_s"] > 0.5:     # it waited (a claim, a stopped server): as long, scaled
            assert elapsed >= 0.6 * ex["elapsed_s"] * LIFE_SCALE, \
                "%s/%s: answered after %.2f s, Kong waited %.2f s (x%.1f)" % (
                    name, label, elapsed, ex["elapsed_s"], LIFE_SCALE)
        elif name == "life_concurrent_restart":    # none waited
            assert elapsed < 10.0 * LIFE_SCALE * 0.5, "%s/%s waited" % (name, label)
    # the key request in full: what the upstream and the client got
    key = next(ex for ex in t["exchanges"] if ex["request"]["target"] == t["request"]["target"])
    r, _ = results[key["label"]]
    up = t["upstream"]
    if up["reached"]:
        _assert_upstream(name, r, up)
    _assert_response(name, r, t["response"])
    # what Kong sent the server(s) over the whole scenario
    kong_msgs = [e["msg"] for e in t["rpc"] if e["from"] == "kong"]
    want = _kong_side(kong_msgs, _pdk_methods_sent(t["rpc"]))
    got = _kong_side(msgs, _probe_answered(t, msgs))
    if name in CONCURRENT:
        # interleaving (and, after a respawn, how many requests raced to start the
        # instance) depends on scheduling: the same kinds of messages, each request's
        # event played to its end
        assert sorted(set(map(repr, got))) == sorted(set(map(repr, want))), \
            "%s: Kong's RPC messages differ:\n got %r\nwant %r" % (name, got, want)
        assert sum(1 for m, _ in got if m == "plugin.Step") == \
            sum(1 for m, _ in want if m == "plugin.Step")
    else:
        assert got == want, "%s: Kong's RPC messages differ:\n got %r\nwant %r" % (name, got, want)
    assert _start_configs(msgs)[-1:] == _start_configs(kong_msgs)[-1:], \
        "%s: StartInstance Config differs" % name
    # respawns: never sooner than the interval after the previous spawn; at once
    # after a server that ran longer than that
    spawns = [at for at, _ in kong.spawns]
    interval = 1.0 * LIFE_SCALE
    for prev, nxt in zip(spawns, spawns[1:]):
        assert nxt - prev >= interval * 0.95, "%s: respawned %.3f s after the previous spawn" % (
            name, nxt - prev)
    # spawns during the scenario (life_start: Kong's first one too); the count of
    # once-a-second respawns depends on how long the scaled timeline took
    recorded = len([p for p in t["processes"] if p.get("started_s") is not None])
    made = len(spawns) - (0 if name == "life_start" else 1)
    assert made >= (recorded + 1) // 2, "%s: %d spawns, Kong made %d" % (name, made, recorded)
    if name == "life_exit_127":
        lines = [m for level, m in kong.process_log if 'exited with "command not found"' in m]
        assert len(lines) >= 2, "%s: respawned after exit 127 only %d times" % (name, len(lines))
    if name == "life_exit_1_loop":
        assert sum("terminated: exit 1" in m for _, m in kong.process_log) >= 2


def _assert_upstream(name, r, up):
    """What the upstream received, exactly as recorded (volatile values aside)."""
    got_up = {"method": r.upstream.method, "target": r.upstream.target,
              "headers": _headers(r.upstream.wire_headers(volatile=VOLATILE)),
              "body": _text(r.upstream.raw_body)}
    want_up = {"method": up["method"], "target": up["target"],
               "headers": _headers(up["headers"]), "body": up["body"]}
    assert got_up == want_up, "%s: what the upstream received differs:\n got %r\nwant %r" % (
        name, _diff(got_up, want_up), _diff(want_up, got_up))


def _assert_response(name, r, resp):
    """The client's response, exactly as recorded (volatile values aside)."""
    body = _text(r.body)
    got_resp = {"status": r.status, "headers": _headers(r.wire_headers(volatile=VOLATILE)),
                "body": _unvolatile_body(body) if isinstance(body, str) else body}
    want_resp = {"status": resp["status"], "headers": _headers(resp["headers"]),
                 "body": resp["body"]}
    assert got_resp == want_resp, "%s: the client's response differs:\n got %r\nwant %r" % (
        name, _diff(got_resp, want_resp), _diff(want_resp, got_resp))
