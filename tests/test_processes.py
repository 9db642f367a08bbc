"""``serve --processes N`` (issue 21, item 1): N event loops on Kong's one socket.

Real server, real socket, the stand-in's Kong protocol. What a user would see:
Kong's pooled connections land on different processes; an instance Kong started
through one process is served by another with no "no plugin instance" restart,
including the Steps Kong sends on the other process's connection; and a process
killed under load costs only the requests it held, which the guard refuses (503),
none reaching the upstream unauthenticated, while a replacement takes its place."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import msgpack
import pytest

from conftest import plugin_command
from idp_double import IdPDouble, Reply, active
from kong import KongStandIn
from kong.rpc import Rpc
from kong_oauth2_introspection.ops.guard import render

SECRET = "Basic cHJvY2Vzc2VzOnByb2Nlc3Nlcy1zZWNyZXQ="
TOKEN = "tok-processes-0123456789"
ALICE = {"id": "6f0b3c1e-4b8e-4c43-9a51-0c7f4f1d2a11", "username": "alice"}


def config(idp_url, **extra):
    return dict({"introspection_url": idp_url, "authorization_value": SECRET}, **extra)


def server(processes=2, **kwargs):
    return KongStandIn(plugin_command() + ["serve", "--processes", str(processes)], **kwargs)


def children(pid):
    """The plugin server's processes: the supervisor's children."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def serving_without(parent, gone, count):
    """The supervisor's children once ``gone`` has been replaced (one reading)."""
    now = children(parent)
    return now if len(now) == count and gone not in now else None


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def concurrently(threads, requests_of):
    """Run ``requests_of(n)``, which sends thread n's requests and returns their
    results, on ``threads`` threads at once, as Kong's workers would; every
    result, in no particular order."""
    results, lock = [], threading.Lock()

    def run(n):
        got = requests_of(n)
        with lock:
            results.extend(got)
    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return results


def serving_pids(kong):
    """The processes behind the connections in Kong's pool."""
    serving = set()
    for c in list(kong._rpc._pool):
        c.sendall(msgpack.packb([0, 1 << 20, "plugin.GetStatus", [None]]))
        serving.add(msgpack.unpackb(c.recv(65536), raw=False)[3]["Pid"])
    return serving


class Conn:
    """One raw connection to the plugin socket (as one of Kong's pooled ones)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.ids = iter(range(1, 1 << 30))

    def call(self, method, arg):
        msgid = next(self.ids)
        self.sock.sendall(msgpack.packb([0, msgid, method, [arg]], use_bin_type=True))
        while True:
            for msg in self.unpacker:
                assert msg[0] == 1 and msg[1] == msgid
                return msg[2], msg[3]
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.unpacker.feed(chunk)

    def pid(self):
        err, status = self.call("plugin.GetStatus", None)
        assert err is None
        return status["Pid"]

    def close(self):
        self.sock.close()


def connection_to(path, pid, others):
    """A connection accepted by ``pid``: the other processes are stopped while it
    is made, so only that one can accept it."""
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        conn = Conn(path)
        assert conn.pid() == pid
        return conn
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


@pytest.fixture(scope="module")
def idp():
    with IdPDouble(lambda form, headers: active(client_id="app", username="alice")) as double:
        yield double


def test_kongs_connections_are_served_by_every_process(idp):
    with server(2) as kong:
        pids = wait_for(lambda: len(children(kong.pid)) == 2 and children(kong.pid))
        assert len(pids) == 2 and kong.pid not in pids
        inst = kong.configure(config(idp.url))
        before = {pid: cpu_ticks(pid) for pid in pids}
        results = concurrently(8, lambda n: [
            kong.request(inst, headers={"Authorization": "Bearer %s-%d-%d" % (TOKEN, n, i)})
            for i in range(40)])
        assert len(results) == 320 and all(r.status == 200 for r in results)
        # Kong's pool: the connections its events went over belong to both processes
        assert serving_pids(kong) == set(pids)
        assert all(cpu_ticks(pid) > before[pid] for pid in pids)
        # one StartInstance for the whole run: no process answered "no plugin instance"
        assert not [r for r in results if any("no plugin instance" in m for _, m in r.kong_logs)]
        conn = Conn(kong.socket_path)
        assert len(conn.call("plugin.GetStatus", None)[1]["Plugins"]["oauth2-introspection"]["Instances"]) == 1
        conn.close()


def test_an_instance_started_in_one_process_is_served_by_another(idp):
    with server(2) as kong:
        a, b = wait_for(lambda: len(children(kong.pid)) == 2 and children(kong.pid))
        via_a = connection_to(kong.socket_path, a, [b])
        via_b = connection_to(kong.socket_path, b, [a])
        inst = kong.configure(config(idp.url))
        err, started = via_a.call("plugin.StartInstance", {"Name": inst.name, "Config": inst.conf_json})
        assert err is None
        iid = started["Id"]
        # B never saw StartInstance: it builds the instance from the node's table
        err, step = via_b.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        assert err is None, err
        trace, conns = [], [via_a, via_b]
        while step["Data"] != "ret":
            method = step["Data"]["Method"]
            trace.append(method)
            if method == "kong.response.exit":
                break
            data = {"kong.request.get_headers": {"authorization": ["Bearer " + TOKEN]},
                    "kong.client.load_consumer": ALICE}.get(method)
            # Kong steps on whichever pooled connection it picks: here the other
            # process's one every time, so A carries B's event on
            conn = conns[len(trace) % 2]
            err, step = conn.call("plugin.Step", {"EventId": step["EventId"], "Data": data})
            assert err is None
        assert "kong.response.exit" not in trace, (trace, step)
        assert "kong.service.request.set_headers" in trace and len(trace) >= 2
        assert [c.form.get("token") for c in idp.calls].count(TOKEN) == 1
        # either process answers for the instance; closing it through B ends it for A too
        assert via_a.call("plugin.InstanceStatus", iid)[1]["Id"] == iid
        assert via_b.call("plugin.CloseInstance", iid)[0] is None
        assert via_a.call("plugin.InstanceStatus", iid)[0] == "no plugin instance #%d" % iid
        err, _ = via_b.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        assert err == "no plugin instance #%d" % iid
        # (A frees its copy at its next sweep; Kong sends no event for an id it closed)
        # a Step for an event nobody holds is refused (500), never left unanswered
        err, step = via_a.call("plugin.Step", {"EventId": 12345 * 64 + (1 if a < b else 0),
                                               "Data": None})
        assert err is None and step["Data"]["Args"][0] == 500
        via_a.close()
        via_b.close()


def test_a_process_killed_under_load_costs_only_its_requests():
    slow = lambda form, headers: Reply(200, {"active": True, "client_id": "app",  # noqa: E731
                                             "username": "alice"}, delay=0.3)
    with IdPDouble(slow) as idp, server(2, post_function=[render(True)], fail_open="record",
                                        rpc_timeout=10.0) as kong:
        pids = wait_for(lambda: len(children(kong.pid)) == 2 and children(kong.pid))
        inst = kong.configure(config(idp.url))
        results, lock, stop = [], threading.Lock(), threading.Event()

        def load(n):
            i = 0
            while not stop.is_set():
                i += 1
                r = kong.request(inst, headers=[("X-Consumer-ID", "evil"), (
                    "Authorization", "Bearer %s-%d-%d" % (TOKEN, n, i))])
                with lock:
                    results.append(r)
        threads = [threading.Thread(target=load, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) >= 24)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        # the supervisor starts another in its place (one log line), and it serves
        replaced = wait_for(lambda: serving_without(kong.pid, victim, 2))
        assert replaced, kong.server_log()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        assert "process %d (slot 0) was killed by SIGKILL; starting another" % victim \
            in kong.server_log()
        ok = [r for r in results if r.status == 200]
        guarded = [r for r in results if r.guard_exit == 503]
        refused = [r for r in results if r.status == 500 and r.kong_exit]
        # every request was either authenticated, or refused by the plugin or the guard
        assert not [r for r in results if r.passed_unauthenticated]
        assert all(r.status == 200 or not r.proxied for r in results)
        assert len(ok) + len(guarded) + len(refused) == len(results)
        assert guarded or refused     # the killed process held some in flight
        print("\nkilled under load: %d requests, %d authenticated, %d guard 503s, "
              "%d refused 500 (Steps for the dead process's events)"
              % (len(results), len(ok), len(guarded), len(refused)))
        assert set(replaced) - set(pids), (pids, replaced, children(kong.pid))
        newcomer = (set(replaced) - set(pids)).pop()
        survivor = (set(replaced) - {newcomer}).pop()
        # the newcomer builds the instance from the node's table: no restart
        conn = connection_to(kong.socket_path, newcomer, [survivor])
        (iid,) = kong.instance_ids().values()
        err, step = conn.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": "access"})
        assert err is None and step["Data"]["Method"] == "kong.request.get_headers"
        while step["Data"]["Method"] != "kong.response.exit":   # no token anywhere ...
            err, step = conn.call("plugin.Step", {"EventId": step["EventId"], "Data": {}})
            assert err is None
        assert step["Data"]["Args"][0] == 401                    # ... refused
        conn.close()
        after = [kong.request(inst, headers={"Authorization": "Bearer %s-after-%d" % (TOKEN, i)})
                 for i in range(10)]
        assert all(r.status == 200 for r in after)


def start(prefix, *args, env=None):
    return subprocess.Popen(plugin_command() + ["serve", "-kong-prefix", str(prefix)] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **(env or {})))


def listening(path):
    def probe():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return True
        except OSError:
            return False
        finally:
            s.close()
    return wait_for(probe)


def test_sigterm_stops_every_process_and_removes_the_socket(tmp_path):
    proc = start(tmp_path, "--processes", "3")
    sock = str(tmp_path / "oauth2-introspection.sock")
    assert listening(sock)
    pids = wait_for(lambda: len(children(proc.pid)) == 3 and children(proc.pid))
    assert len(pids) == 3
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not os.path.exists(sock)
    # the instance table (Kong's configs, secrets included) goes with the server
    assert not (tmp_path / "oauth2-introspection.node" / "instances").exists()
    assert not [p for p in pids if os.path.exists("/proc/%d" % p)
                and open("/proc/%d/stat" % p).read().rsplit(")", 1)[1].split()[0] != "Z"]


def test_the_processes_die_with_their_parent(tmp_path):
    proc = start(tmp_path, "--processes", "2")
    assert listening(str(tmp_path / "oauth2-introspection.sock"))
    pids = wait_for(lambda: len(children(proc.pid)) == 2 and children(proc.pid))
    proc.kill()
    proc.wait(timeout=10)
    def alive(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    assert wait_for(lambda: not any(alive(p) for p in pids)), pids


@pytest.mark.parametrize("given, env", [("0", None), ("65", None), (None, "many")])
def test_a_process_count_out_of_range_is_refused(tmp_path, given, env):
    args = ["--processes", given] if given is not None else []
    proc = start(tmp_path, *args, env={"OAUTH2_INTROSPECTION_PROCESSES": env} if env else None)
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 2
    assert ("OAUTH2_INTROSPECTION_PROCESSES" if env else "--processes") in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_a_second_server_on_the_prefix_is_refused_before_any_fork(tmp_path):
    first = start(tmp_path, "--processes", "2")
    try:
        assert listening(str(tmp_path / "oauth2-introspection.sock"))
        second = start(tmp_path, "--processes", "2")
        out = second.communicate(timeout=30)[0].decode()
        assert second.returncode == 2 and "another server is answering" in out
        assert "Traceback" not in out
        assert len(children(first.pid)) == 2     # the first one is untouched
    finally:
        first.terminate()
        first.wait(timeout=20)


def test_metrics_sum_every_processs_counts(idp):
    import re
    import urllib.request
    with KongStandIn(plugin_command() + ["serve", "--processes", "2", "--metrics-port", "0"]) \
            as kong:
        found = wait_for(lambda: re.search(r"metrics: (http://127\.0\.0\.1:\d+)/metrics",
                                           kong.server_log()))
        assert found, kong.server_log()
        inst = kong.configure(config(idp.url))
        results = concurrently(6, lambda n: [
            kong.request(inst, headers={"Authorization": "Bearer %s-m-%d-%d" % (TOKEN, n, i)})
            for i in range(15)])
        assert all(r.status == 200 for r in results)
        # the Steps crossed processes, so both counted; slot 0's port shows the sum
        text = urllib.request.urlopen(found.group(1) + "/metrics", timeout=10).read().decode()
        sample = lambda name: sum(float(v) for v in re.findall(  # noqa: E731
            r"(?m)^%s(?:\{[^}]*\})? (\S+)$" % re.escape(name), text))
        assert sample("kong_oauth2_introspection_events_total") == len(results) == 90
        assert sample('kong_oauth2_introspection_decisions_total') == 90
        assert sample("kong_oauth2_introspection_events_in_flight") == 0
        # instances are labelled by process (the supervisor holds none)
        held = {int(pid): float(v) for pid, v in re.findall(
            r'(?m)^kong_oauth2_introspection_plugin_instances\{pid="(\d+)"\} (\S+)$', text)}
        assert set(held) <= set(children(kong.pid)) | {kong.pid}, held
        assert held.get(kong.pid, 0) == 0 and max(held.values()) == 1.0, held


@pytest.mark.parametrize("env, expected", [("2", 2), ("", len(os.sched_getaffinity(0)))])
def test_the_process_count_comes_from_the_environment_or_the_cpus(tmp_path, env, expected):
    proc = start(tmp_path, env={"OAUTH2_INTROSPECTION_PROCESSES": env})
    try:
        assert listening(str(tmp_path / "oauth2-introspection.sock"))
        if expected == 1:   # one CPU: the single process of before, no supervisor
            assert children(proc.pid) == []
        else:
            assert wait_for(lambda: len(children(proc.pid)) == expected)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_refused_second_server_leaves_the_first_ones_metrics_alone(tmp_path):
    first = start(tmp_path, "--processes", "2", "--metrics-port", "0")
    try:
        assert listening(str(tmp_path / "oauth2-introspection.sock"))
        metrics_dir = tmp_path / "oauth2-introspection.node" / "metrics" / str(first.pid)
        assert wait_for(lambda: metrics_dir.is_dir() and list(metrics_dir.iterdir()))
        files = sorted(p.name for p in metrics_dir.iterdir())
        second = start(tmp_path, "--processes", "2", "--metrics-port", "0")
        assert second.wait(timeout=30) == 2
        assert sorted(p.name for p in metrics_dir.iterdir()) == files
    finally:
        first.terminate()
        first.wait(timeout=20)


def test_without_redis_the_processes_ask_the_idp_once_per_token(idp):
    """The node cache (issue 21, item 2) through the real ``serve --processes 2``:
    the same tokens sent over Kong's connections to both processes, at once and
    again later, cost one IdP call each."""
    tokens = ["%s-shared-%d" % (TOKEN, i) for i in range(12)]
    with server(2) as kong:
        pids = wait_for(lambda: len(children(kong.pid)) == 2 and children(kong.pid))
        assert len(pids) == 2
        inst = kong.configure(config(idp.url))
        before = len(idp.calls)
        results = concurrently(6, lambda n: [
            kong.request(inst, headers={"Authorization": "Bearer " + token})
            for _ in range(3) for token in tokens[n % 3::3] + tokens])
        assert results and all(r.status == 200 for r in results)
        assert serving_pids(kong) == set(pids)          # both processes answered requests
        asked = [call.form.get("token") for call in idp.calls[before:]]
        assert sorted(asked) == sorted(tokens), "IdP calls: %d for %d tokens" % (
            len(asked), len(tokens))


def test_health_covers_the_configs_started_through_every_process(idp):
    """``/health`` is served by one process; it reports the configs Kong started
    through the others too."""
    import re
    import urllib.request
    with KongStandIn(plugin_command() + ["serve", "--processes", "2", "--metrics-port", "0"]) \
            as kong:
        found = wait_for(lambda: re.search(r"metrics: (http://127\.0\.0\.1:\d+)/metrics",
                                           kong.server_log()))
        assert found, kong.server_log()
        a, b = wait_for(lambda: len(children(kong.pid)) == 2 and children(kong.pid))
        started = []
        for pid, others in ((a, [b]), (b, [a])):
            conn = connection_to(kong.socket_path, pid, others)
            inst = kong.configure(config(idp.url))
            err, _ = conn.call("plugin.StartInstance", {"Name": inst.name,
                                                        "Config": inst.conf_json})
            assert err is None
            started.append(inst.plugin_id)
            conn.close()
        report = json.loads(urllib.request.urlopen(found.group(1) + "/health",
                                                   timeout=30).read())
        reported = {pid for conf in report["configs"] for pid in conf["plugin_ids"]}
        assert reported == set(started), report
        assert report["healthy"] is True, report
