#!/usr/bin/env python3
"""Benchmark of the oauth2-introspection plugin server, driven through the real
kong-pdk Unix-socket protocol by the Kong stand-in of tests/kong_standin.py.

Usage:  .venv/bin/python bench/bench.py [--quick]

Table A: p50/p99 latency at concurrency 1 and 50 of our cache-hit and cache-miss
paths beside kong-pdk's own hello-world (bench/floor_plugin.py: one PDK call),
started with kong-pdk's defaults (thread mode) and with -g (gevent), and beside the
lower bound of any plugin making our hit's 3 PDK calls (bench/bound_plugin.py: the
protocol and nothing else), all in one run. Runs are interleaved (floor, floor -g,
bound, hit, miss, ...) and the median of the repeats is shown, with each plugin
server's CPU time per sequential request (from /proc).

Table B: IdP calls and latency for 1,000 requests over 50 distinct tokens at
concurrency 50 with no cache, the in-process cache, and Redis shared by two
plugin-server processes; then a Redis hit against an in-process hit.

Table C (capacity): for N = 1, 2 and the machine's CPUs plugin-server processes
(``serve --processes N``; rows for N > 1 are skipped, saying so, where serve refuses
the flag), hits, misses and a 90/10 mix at saturation (many client threads):
requests/s, server CPU per request (every process of the server, from /proc),
p50/p99, IdP calls against the distinct tokens asked, and "no plugin instance"
restarts after warm-up; beside the floor, the zero-work 3-call bound and our own
server hosting a zero-work 3-call plugin (bench/frame_plugin.py: the bound's gap to
it is our server's machinery, its gap to a hit the plugin's own work), one run,
rounds interleaved. ``--only c`` runs this table alone.

The plugin servers get this process's PYTHONPATH (Kong clears their environment
otherwise), so ``PYTHONPATH=/other/checkout/kong-plugin`` measures another version.

The IdP is a separate process (its own GIL); Redis is a real redis-server on a
free port in a temp dir. Everything started here is stopped at the end, even on
error. Only the tables go to stdout; progress goes to stderr.
"""

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from kong import KongStandIn  # noqa: E402

FLOOR_CMD = [sys.executable, os.path.join(HERE, "floor_plugin.py")]
BOUND_CMD = [sys.executable, os.path.join(HERE, "bound_plugin.py")]
FRAME_CMD = [sys.executable, os.path.join(HERE, "frame_plugin.py")]
OURS_CMD = [shutil.which("kong-oauth2-introspection",
                         path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
            or "kong-oauth2-introspection"]
AUTH = "Basic YmVuY2g6YmVuY2g="
STORE_SECRET = "0123456789abcdef"
T0 = time.monotonic()
# Kong clears the start command's environment; PYTHONPATH picks the version measured.
ENV = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# the IdP: its own process, counts calls per path, GET /count/<path>


def _idp_main(conn):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    counts = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            # one segment per answer, no Nagle/delayed-ACK stall on keep-alive
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args):
            pass

        def _send(self, code, body, headers=()):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            path = self.path.split("?")[0].strip("/")
            with lock:
                counts[path] = counts.get(path, 0) + 1
            headers = [("Cache-Control", "no-store")] if path.endswith("nostore") else []
            self._send(200, {"active": True, "client_id": "bench",
                             "exp": int(time.time()) + 3600}, headers)

        def do_GET(self):
            if self.path.startswith("/count/"):
                with lock:
                    self._send(200, {"count": counts.get(self.path[len("/count/"):], 0)})
            else:
                self._send(404, {})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.request_queue_size = 256
    conn.send(srv.server_address[1])
    srv.serve_forever()


class IdP(object):
    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_idp_main, args=(child,), daemon=True)
        self.proc.start()
        if not parent.poll(30):
            raise RuntimeError("IdP process did not start")
        self.port = parent.recv()

    def url(self, scenario):
        return "http://127.0.0.1:%d/%s" % (self.port, scenario)

    def count(self, scenario):
        with urllib.request.urlopen("http://127.0.0.1:%d/count/%s" % (self.port, scenario), timeout=10) as r:
            return json.loads(r.read())["count"]

    def stop(self):
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# --------------------------------------------------------------------------
# redis-server


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Redis(object):
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.port

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------
# measurement helpers


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def median(values):
    return statistics.median(values) if values else float("nan")


class Errors(object):
    def __init__(self):
        self.n = 0
        self.first = None
        self.lock = threading.Lock()

    def add(self, what):
        with self.lock:
            self.n += 1
            if self.first is None:
                self.first = what


RESTART = "no plugin instance"


def one(kong, inst, token, errors, restarts=None):
    t0 = time.perf_counter()
    r = kong.request(inst, "GET", "/", headers={"Authorization": "Bearer " + token})
    dt = time.perf_counter() - t0
    if r.status != 200 or r.kong_error:
        errors.add("status %s %s" % (r.status, r.kong_error or r.body[:120]))
    if restarts is not None and any(RESTART in text for _, text in r.kong_logs):
        restarts.add(RESTART)
    return dt, len(r.pdk_calls)


def _stat(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid):
    """CPU time of process ``pid`` so far, its reaped children left out (from /proc; 0
    elsewhere)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    ran = _run_ns(pid)
    if ran is not None:
        return ran / 1e9
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def _run_ns(pid):
    """Nanoseconds on a CPU of every live thread of ``pid`` (/proc/<pid>/task/*/schedstat:
    the scheduler's own count, where stat's utime and stime move in 10 ms ticks, too
    coarse for 400 requests of 100 us); None where schedstat is not there."""
    total = 0
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            if tid == str(pid):
                return None   # no schedstat on this kernel
    return total


def tree_cpu_seconds(pid):
    """CPU time of ``pid`` and every process below it (a multi-process server's
    children), plus what its reaped children used (cutime/cstime)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        below = {p for p, pp in parents.items() if pp in tree and p not in tree}
        tree |= below
        grew = bool(below)
    tick = float(os.sysconf("SC_CLK_TCK"))
    seconds = 0.0
    for p in tree:
        fields = _stat(p)
        if fields is None:
            continue
        ran = _run_ns(p)
        own = ran / 1e9 if ran is not None else (int(fields[11]) + int(fields[12])) / tick
        seconds += own + (int(fields[13]) + int(fields[14])) / tick
    return seconds


def sequential(kong, inst, tokens, errors):
    lat, calls = [], []
    for t in tokens:
        dt, c = one(kong, inst, t, errors)
        lat.append(dt)
        calls.append(c)
    return lat, calls


def released_together(n, threads, request):
    """Requests 0..n-1 (``request(k)`` returns its latency) over ``threads`` threads
    released at once by a barrier; returns (wall seconds, latencies)."""
    lat = [None] * n
    barrier = threading.Barrier(threads + 1)

    def work(j):
        barrier.wait()
        for k in range(j, n, threads):
            lat[k] = request(k)

    ts = [threading.Thread(target=work, args=(j,), daemon=True) for j in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, [x for x in lat if x is not None]


def concurrent(kong, inst, tokens, threads, errors):
    """All tokens, split over `threads` threads; returns (wall seconds, latencies)."""
    return released_together(len(tokens), threads,
                             lambda k: one(kong, inst, tokens[k], errors)[0])


# --------------------------------------------------------------------------
# Table A


def table_a(idp, args, stack):
    """One run, side by side: kong-pdk's hello-world floor in its default (thread)
    and gevent modes, the 3-call lower bound, our cache hit and cache miss; p50/p99
    at concurrency 1 and 50, and the plugin server's CPU time per request."""
    log("[A] starting plugin servers (%.0f s)" % (time.monotonic() - T0))
    floor_t = stack.enter_context(KongStandIn(FLOOR_CMD, env=ENV))
    floor_g = stack.enter_context(KongStandIn(FLOOR_CMD + ["-g"], env=ENV))
    bound = stack.enter_context(KongStandIn(BOUND_CMD, env=ENV))
    ours = stack.enter_context(KongStandIn(OURS_CMD, env=ENV))
    scen = "a-hit"
    rows_spec = [("floor", "kong-pdk hello-world, default (thread) mode", floor_t,
                  floor_t.configure({})),
                 ("floor-g", "kong-pdk hello-world, -g (gevent) mode", floor_g,
                  floor_g.configure({})),
                 ("bound", "c=1 lower bound of any 3-call plugin: the protocol, "
                  "no work (bound_plugin.py)", bound, bound.configure({})),
                 ("hit", "ours, cache hit (default start command)", ours,
                  ours.configure({"introspection_url": idp.url(scen), "authorization_value": AUTH})),
                 ("miss", "ours, cache miss (IdP on 127.0.0.1)", ours,
                  ours.configure({"introspection_url": idp.url("a-miss"),
                                  "authorization_value": AUTH}))]
    hit_tokens = ["hit-%d" % i for i in range(100)]
    errors = {key: Errors() for key, *_ in rows_spec}
    for key, _, kong, inst in rows_spec:  # start instances; cache the hit tokens
        sequential(kong, inst, hit_tokens if key != "miss" else ["warm-miss"], errors[key])
    res = {key: {"p50": [], "p99": [], "c50p50": [], "c50p99": [], "rps": [], "calls": [],
                 "cpu": []}
           for key, *_ in rows_spec}
    miss_seq = 0
    for rep in range(args.repeats):
        for key, _, kong, inst in rows_spec:  # interleaved, so noise hits every row alike
            if key == "miss":
                seq_tokens = ["miss-%d" % (miss_seq + i) for i in range(args.seq)]
                par_tokens = ["miss-%d" % (miss_seq + args.seq + i) for i in range(args.rps_n)]
                miss_seq += args.seq + args.rps_n
            else:
                seq_tokens = [hit_tokens[i % 100] for i in range(args.seq)]
                par_tokens = [hit_tokens[i % 100] for i in range(args.rps_n)]
            cpu0 = cpu_seconds(kong.pid)
            lat, calls = sequential(kong, inst, seq_tokens, errors[key])
            cpu = (cpu_seconds(kong.pid) - cpu0) / len(seq_tokens)
            wall, par_lat = concurrent(kong, inst, par_tokens, args.rps_threads, errors[key])
            r = res[key]
            r["p50"].append(pct(lat, 50) * 1e3)
            r["p99"].append(pct(lat, 99) * 1e3)
            r["c50p50"].append(pct(par_lat, 50) * 1e3)
            r["c50p99"].append(pct(par_lat, 99) * 1e3)
            r["rps"].append(len(par_tokens) / wall)
            r["calls"].append(statistics.mean(calls))
            r["cpu"].append(cpu * 1e6)
        log("[A] repeat %d/%d done" % (rep + 1, args.repeats))
    floor = {k: median(v) for k, v in res["floor"].items()}
    rows = []
    for key, label, _, _ in rows_spec:
        m = {k: median(v) for k, v in res[key].items()}
        note = "" if not errors[key].n else "%d errors, first: %s" % (errors[key].n,
                                                                     errors[key].first)
        rows.append([label, "%.1f" % m["calls"], "%.2f" % m["p50"], "%.2f" % m["p99"],
                     "%.2f" % m["c50p50"], "%.2f" % m["c50p99"], "%.0f" % m["rps"],
                     "%.0f" % m["cpu"],
                     "%.2f× / %.2f×" % (m["p50"] / floor["p50"], m["c50p50"] / floor["c50p50"]),
                     note])
    return rows


# --------------------------------------------------------------------------
# Table B


def burst(kongs, insts, tokens, n, conc):
    """n requests, token (k//2) % len(tokens), process k % len(kongs), conc threads
    released together: the two requests for a token's first appearance run at once."""
    errors = Errors()

    def request(k):
        p = k % len(kongs)
        return one(kongs[p], insts[p], tokens[(k // 2) % len(tokens)], errors)[0]
    wall, lat = released_together(n, conc, request)
    return wall, lat, errors


def table_b(idp, redis, args, stack):
    rows = []
    n, ntok, conc = args.b_requests, args.b_tokens, args.b_conc
    a = stack.enter_context(KongStandIn(OURS_CMD, env=ENV))
    b = stack.enter_context(KongStandIn(OURS_CMD, env=ENV))
    store = {"secret": STORE_SECRET, "redis": {"endpoints": [redis.endpoint]}}

    def conf(scen, with_store=False):
        c = {"introspection_url": idp.url(scen), "authorization_value": AUTH}
        if with_store:
            c["store"] = store
        return c

    # warm the instances (StartInstance) on a throw-away scenario
    for k in (a, b):
        inst = k.configure(conf("b-warm"))
        sequential(k, inst, ["warm-%d" % i for i in range(20)], Errors())

    scenarios = [
        ("no cache (IdP: Cache-Control: no-store)", "b-nostore", [a], False, "≤ %d" % n),
        ("in-process cache", "b-local", [a], False, ntok),
        ("Redis shared by two plugin-server processes", "b-redis", [a, b], True, ntok),
    ]
    for label, scen, kongs, with_store, target in scenarios:
        log("[B] %s (%.0f s)" % (label, time.monotonic() - T0))
        insts = [k.configure(conf(scen, with_store)) for k in kongs]
        # start the instances outside the measurement (first request of a config)
        for k, i in zip(kongs, insts):
            sequential(k, i, ["start-%s-%d" % (scen, id(k))], Errors())
        before = idp.count(scen)
        tokens = ["%s-tok-%d" % (scen, i) for i in range(ntok)]
        wall, lat, errors = burst(kongs, insts, tokens, n, conc)
        calls = idp.count(scen) - before
        note = "" if not errors.n else "%d errors, first: %s" % (errors.n, errors.first)
        rows.append([label, str(len(kongs)), "%d / %d" % (n, ntok), str(calls), str(target),
                     "%.2f" % (pct(lat, 50) * 1e3), "%.2f" % (pct(lat, 99) * 1e3),
                     "%.2f" % wall, note])

    # Redis hit (process B never saw the token) against an in-process hit (process A)
    log("[B] Redis hit vs in-process hit")
    scen = "b-hit"
    ia, ib = a.configure(conf(scen, True)), b.configure(conf(scen, True))
    sequential(a, ia, ["start-a"], Errors())
    sequential(b, ib, ["start-b"], Errors())
    redis_lat, local_lat = [], []
    e_warm, e_redis, e_local = Errors(), Errors(), Errors()
    before = idp.count(scen)
    redis_calls = 0
    for rnd in range(args.hit_rounds):
        tokens = ["hit-r%d-%d" % (rnd, i) for i in range(args.hit_n)]
        sequential(a, ia, tokens, e_warm)                     # A: misses, writes Redis
        c0 = idp.count(scen)
        redis_lat += sequential(b, ib, tokens, e_redis)[0]    # B: Redis hits
        redis_calls += idp.count(scen) - c0
        local_lat += sequential(a, ia, tokens, e_local)[0]    # A: in-process hits
    total = args.hit_n * args.hit_rounds
    warm_calls = idp.count(scen) - before - redis_calls
    rm, lm = median(redis_lat), median(local_lat)
    for label, lat, e, calls, note in (
            ("Redis hit (process B, token warmed by A)", redis_lat, e_redis, redis_calls,
             "ratio of medians %.2f× the in-process hit (target ≤ 1.3×)" % (rm / lm)),
            ("in-process hit (process A)", local_lat, e_local, 0, "IdP calls while A warmed: %d" % warm_calls)):
        if e.n or e_warm.n:
            note += "; %d errors, first: %s" % (e.n + e_warm.n, e.first or e_warm.first)
        rows.append([label, "1", "%d / %d" % (total, total), str(calls), "0",
                     "%.2f" % (pct(lat, 50) * 1e3), "%.2f" % (pct(lat, 99) * 1e3), "-", note])
    return rows


# --------------------------------------------------------------------------
# Table C


def _servers(n):
    """The start command for ours with ``n`` processes, always explicit: without the
    flag ``serve`` runs one process per CPU."""
    return OURS_CMD + ["serve", "--processes", str(n)]


def saturate(kong, inst, tokens, threads, errors, restarts):
    """Every token once over ``threads`` client threads released together: (wall s,
    latencies, server CPU s of the whole process tree)."""
    cpu0 = tree_cpu_seconds(kong.pid)
    wall, lat = released_together(len(tokens), threads,
                                  lambda k: one(kong, inst, tokens[k], errors, restarts)[0])
    return wall, lat, tree_cpu_seconds(kong.pid) - cpu0


def table_c(idp, args, stack):
    """Capacity: N processes x (hit, miss, 90/10 mix) beside the floor and the bound."""
    counts = sorted({1, 2, os.cpu_count() or 1})
    cells = []   # (key, label, kong, inst, workload, idp scenario or None)
    floor = stack.enter_context(KongStandIn(FLOOR_CMD, env=ENV))
    bound = stack.enter_context(KongStandIn(BOUND_CMD, env=ENV))
    cells.append(("floor", "kong-pdk hello-world (1 call, thread mode)", floor,
                  floor.configure({}), "hit", None))
    cells.append(("bound", "zero-work 3-call bound (bound_plugin.py)", bound,
                  bound.configure({}), "hit", None))
    frame = stack.enter_context(KongStandIn(FRAME_CMD, env=ENV))
    cells.append(("frame", "our server, zero-work 3-call plugin (frame_plugin.py)", frame,
                  frame.configure({}), "hit", None))
    skipped = []
    for n in counts:
        try:
            kong = stack.enter_context(KongStandIn(_servers(n), env=ENV))
        except RuntimeError as err:
            skipped.append((n, str(err).strip().splitlines()[-1][:160]))
            continue
        for workload in ("hit", "miss", "mix"):
            scen = "c-%d-%s" % (n, workload)
            # ttl: the hot tokens stay cached for the whole run (the default is 30 s)
            inst = kong.configure({"introspection_url": idp.url(scen), "authorization_value": AUTH,
                                   "ttl": 3600})
            cells.append(("ours-%d-%s" % (n, workload), "ours, %d process%s, %s" % (
                n, "" if n == 1 else "es", {"hit": "cache hits", "miss": "cache misses",
                                              "mix": "90% hits / 10% misses"}[workload]),
                kong, inst, workload, scen))
    hot = ["hot-%d" % i for i in range(args.c_hot)]
    # Warm-up: start every instance on every process (each pooled connection may
    # reach another process) and cache the hot tokens; nothing of it is measured.
    for key, _, kong, inst, workload, scen in cells:
        saturate(kong, inst, hot * 2, args.c_threads, Errors(), None)
    fresh = itertools.count()
    res = {c[0]: {"rps": [], "cpu": [], "p50": [], "p99": [], "seq_p50": [], "seq_cpu": [],
                  "calls": 0, "asked": 0, "restarts": 0, "errors": Errors()} for c in cells}
    for rnd in range(args.c_rounds):
        for key, _, kong, inst, workload, scen in cells:   # interleaved rounds
            r = res[key]
            for phase, n_req in (("sat", args.c_requests), ("seq", args.c_seq)):
                if workload == "hit":
                    tokens = [hot[i % len(hot)] for i in range(n_req)]
                    new = 0
                elif workload == "miss":
                    tokens = ["fresh-%d" % next(fresh) for _ in range(n_req)]
                    new = n_req
                else:
                    tokens = ["fresh-%d" % next(fresh) if i % 10 == 9 else hot[i % len(hot)]
                              for i in range(n_req)]
                    new = n_req // 10
                before = idp.count(scen) if scen else 0
                restarts = Errors()
                if phase == "sat":
                    wall, lat, cpu = saturate(kong, inst, tokens, args.c_threads, r["errors"],
                                              restarts)
                    r["rps"].append(n_req / wall)
                    r["cpu"].append(cpu / n_req * 1e6)
                    r["p50"].append(pct(lat, 50) * 1e3)
                    r["p99"].append(pct(lat, 99) * 1e3)
                else:
                    cpu0 = tree_cpu_seconds(kong.pid)
                    lat = [one(kong, inst, t, r["errors"], restarts)[0] for t in tokens]
                    r["seq_cpu"].append((tree_cpu_seconds(kong.pid) - cpu0) / n_req * 1e6)
                    r["seq_p50"].append(pct(lat, 50) * 1e3)
                if scen:
                    r["calls"] += idp.count(scen) - before
                    r["asked"] += new
                r["restarts"] += restarts.n
        log("[C] round %d/%d done (%.0f s)" % (rnd + 1, args.c_rounds, time.monotonic() - T0))
    m = {key: {k: median(v) for k, v in r.items() if isinstance(v, list)} for key, r in res.items()}
    rows = []
    for key, label, _, _, workload, scen in cells:
        r, mk = res[key], m[key]
        notes = []
        if key == "frame" or key.startswith("ours") and workload == "hit":
            notes.append("CPU %.2f× / p50 %.2f× the bound (c=1)" % (
                mk["seq_cpu"] / m["bound"]["seq_cpu"], mk["seq_p50"] / m["bound"]["seq_p50"]))
        if key.startswith("ours") and workload == "miss":
            hit = m[key[:-len("miss")] + "hit"]
            notes.append("CPU %.2f× a hit (c=1), %.2f× at saturation" % (
                mk["seq_cpu"] / hit["seq_cpu"], mk["cpu"] / hit["cpu"]))
        if r["errors"].n:
            notes.append("%d errors, first: %s" % (r["errors"].n, r["errors"].first))
        rows.append([label, "%.0f" % mk["rps"], "%.0f" % mk["cpu"], "%.2f" % mk["p50"],
                     "%.2f" % mk["p99"], "%.0f" % mk["seq_cpu"], "%.2f" % mk["seq_p50"],
                     "%d / %d" % (r["calls"], r["asked"]) if scen else "-",
                     str(r["restarts"]) if scen else "-", "; ".join(notes)])
    for n, why in skipped:
        rows.append(["ours, %d processes" % n] + ["-"] * 8 + ["skipped: serve refused it (%s)" % why])
    return rows


# --------------------------------------------------------------------------


def md(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller, faster run")
    ap.add_argument("--only", choices=("a", "b", "c"), action="append",
                    help="run only this table (repeatable); default: all three")
    args = ap.parse_args()
    tables = set(args.only or ("a", "b", "c"))
    if args.quick:
        args.repeats, args.seq, args.rps_n, args.rps_threads = 1, 300, 1000, 50
        args.b_requests, args.b_tokens, args.b_conc = 400, 50, 50
        args.hit_n, args.hit_rounds = 100, 1
        args.c_rounds, args.c_requests, args.c_seq, args.c_threads, args.c_hot = 1, 1000, 200, 32, 100
    else:
        args.repeats, args.seq, args.rps_n, args.rps_threads = 3, 1000, 3000, 50
        args.b_requests, args.b_tokens, args.b_conc = 1000, 50, 50
        args.hit_n, args.hit_rounds = 200, 2
        args.c_rounds, args.c_requests, args.c_seq, args.c_threads, args.c_hot = 3, 2000, 400, 32, 100

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    t_start = time.monotonic()
    rows_a = rows_b = rows_c = None
    with contextlib.ExitStack() as stack:
        idp = IdP()
        stack.callback(idp.stop)
        if "a" in tables:
            rows_a = table_a(idp, args, stack)
        if "b" in tables:
            redis = Redis()
            stack.callback(redis.stop)
            rows_b = table_b(idp, redis, args, stack)
        if "c" in tables:
            rows_c = table_c(idp, args, stack)

    print("Machine: nproc=%d, Python %s (%s), %s; figures are from one run%s (%.0f s)." % (
        os.cpu_count(), platform.python_version(), platform.python_implementation(),
        platform.platform(terse=True), " (--quick)" if args.quick else "",
        time.monotonic() - t_start))
    if rows_a is not None:
        print()
        print("A) plugin-server protocol through the Kong stand-in: concurrency 1 = %d sequential "
              "requests, concurrency 50 = %d requests over %d threads; median of %d interleaved "
              "repeats; ratio = our p50 / the default-mode floor's p50"
              % (args.seq, args.rps_n, args.rps_threads, args.repeats))
        print()
        print(md(["path", "PDK calls", "p50 ms (c=1)", "p99 ms (c=1)", "p50 ms (c=50)",
                  "p99 ms (c=50)", "rps (c=50)", "server CPU µs/req (c=1)",
                  "vs floor p50 (c=1 / c=50)", "notes"], rows_a))
    if rows_b is not None:
        print()
        print("B) %d requests over %d distinct tokens at concurrency %d (all threads released "
              "together; with two processes each token's first two requests hit both at once); "
              "then Redis hit vs in-process hit, sequential"
              % (args.b_requests, args.b_tokens, args.b_conc))
        print()
        print(md(["cache", "processes", "requests / tokens", "IdP calls", "target", "p50 ms",
                  "p99 ms", "total s", "notes"], rows_b))
    if rows_c is not None:
        print()
        print("C) capacity: saturation = %d requests over %d client threads released together, "
              "c=1 = %d sequential requests; median of %d interleaved rounds; server CPU = every "
              "process of the plugin server (/proc utime+stime, children included); IdP calls / "
              "distinct new tokens and \"no plugin instance\" restarts summed over the rounds, "
              "after warm-up. The load generator (the stand-in, Python threads) shares the "
              "machine's %d cores with the servers: req/s is capped by the cores, not by N; "
              "a node's capacity follows from the CPU column: N x 1 s / CPU per request."
              % (args.c_requests, args.c_threads, args.c_seq, args.c_rounds, os.cpu_count()))
        print()
        print(md(["server, workload", "req/s (saturated)", "server CPU µs/req (saturated)",
                  "p50 ms (saturated)", "p99 ms (saturated)", "server CPU µs/req (c=1)",
                  "p50 ms (c=1)", "IdP calls / new tokens", "restarts", "notes"], rows_c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
