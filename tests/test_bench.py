"""The benchmark's comparison rows stay honest: the lower-bound server and our own
server's zero-work plugin make exactly the PDK calls our cache hit makes, and the
floor exactly one (the figures in
docs/benchmark.md compare against them)."""

import os
import sys
import time

import pytest

from conftest import plugin_command
from idp_double import IdPDouble, active
from kong import KongStandIn

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def idp():
    with IdPDouble(lambda form, headers: active(exp=int(time.time()) + 3600,
                                                client_id="bench")) as double:
        yield double


def calls(command, config, n=3):
    with KongStandIn(command) as kong:
        inst = kong.configure(config)
        results = [kong.request(inst, headers={"Authorization": "Bearer tok-bench"})
                   for _ in range(n)]
    assert all(r.status == 200 and r.proxied for r in results), [r.status for r in results]
    return [r.pdk_calls for r in results]


def test_the_lower_bound_makes_the_calls_of_our_cache_hit(idp):
    ours = calls(plugin_command(), {"introspection_url": idp.url,
                                    "authorization_value": "Basic YTpi"})
    bound = calls([sys.executable, os.path.join(BENCH, "bound_plugin.py")], {})
    frame = calls([sys.executable, os.path.join(BENCH, "frame_plugin.py")], {})
    assert len(idp.calls) == 1            # the first request missed, the others hit
    assert bound[-1] == ours[-1] == frame[-1]
    assert len(ours[-1]) == 3


def test_the_floor_makes_one_call():
    floor = calls([sys.executable, os.path.join(BENCH, "floor_plugin.py")], {}, n=1)
    assert floor == [["kong.request.get_header"]]


def test_the_capacity_table_counts_every_process_of_a_server():
    """Table C's server CPU covers a multi-process server: a child's CPU counts,
    live (its own /proc entry) and after it was reaped (the parent's cutime)."""
    sys.path.insert(0, BENCH)
    import bench
    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n")
    parent = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', %r])\n"
              "print(child.pid, flush=True)\n"
              "sys.stdin.readline()\n"
              "child.wait()\n"
              "print('reaped', flush=True)\n"
              "sys.stdin.readline()\n" % burn)
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", parent], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        while bench.cpu_seconds(child) < 0.25:   # the child has burnt most of its CPU
            time.sleep(0.01)
        assert bench.tree_cpu_seconds(proc.pid) >= 0.25 > bench.cpu_seconds(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "reaped"
        assert bench.tree_cpu_seconds(proc.pid) >= 0.29
    finally:
        proc.kill()
        proc.wait()


def test_the_capacity_rows_run_the_process_count_they_name():
    """Without ``--processes``, serve runs one process per CPU: the N = 1 row must
    say so explicitly, or on a 2-core machine it measures two."""
    sys.path.insert(0, BENCH)
    import bench
    for n in (1, 2):
        with KongStandIn(bench._servers(n)) as kong:
            deadline = time.monotonic() + 30
            while True:
                children = [p for p in os.listdir("/proc") if p.isdigit()
                            and (bench._stat(int(p)) or [None, None])[1] == str(kong.pid)]
                if len(children) == (0 if n == 1 else n) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert len(children) == (0 if n == 1 else n)
