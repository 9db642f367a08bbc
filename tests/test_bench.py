"""The benchmark's comparison rows stay honest: the lower-bound server makes exactly
the PDK calls our cache hit makes, and the floor exactly one (the figures in
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
    assert len(idp.calls) == 1            # the first request missed, the others hit
    assert bound[-1] == ours[-1]
    assert len(ours[-1]) == 3


def test_the_floor_makes_one_call():
    floor = calls([sys.executable, os.path.join(BENCH, "floor_plugin.py")], {}, n=1)
    assert floor == [["kong.request.get_header"]]
