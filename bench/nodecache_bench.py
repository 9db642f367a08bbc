#!/usr/bin/env python3
"""Micro-benchmark of the token cache's first level: in-process LRU against the
node cache (LMDB shared by a plugin server's processes, cache/node.py).

Usage:  .venv/bin/python bench/nodecache_bench.py [--n 20000]

Rows, per operation (wall µs and CPU µs of this process, median of 5 rounds):

- ``peek`` hit, in-process: what a hit costs today with one process;
- ``peek`` hit, node cache, entry already decoded in this process: one LMDB
  read transaction (the write id) and the in-process copy;
- ``peek`` hit, node cache, written by another process: LMDB read, AES-GCM
  open and JSON decode (the first hit of each entry in each process);
- a write (what a miss adds after the IdP answered): in-process, node cache;
- the node-wide single flight of a miss nobody else waits for (take and
  release the key's lock).

A hit's whole server CPU through Kong's protocol is ~185 µs (issue 21), so the
rows say what the node cache adds to it. Only the table goes to stdout.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "kong-plugin"))

from kong_oauth2_introspection import node, nodecache  # noqa: E402
from kong_oauth2_introspection.cache.tokens import Entry, Policy, TokenCache  # noqa: E402
from kong_oauth2_introspection.introspection.exchange import Answer  # noqa: E402

CLAIMS = {"active": True, "sub": "248289761001", "client_id": "s6BhdRkqt3",
          "username": "jdoe", "scope": "read write dolphin", "token_type": "Bearer",
          "iss": "https://server.example.com/", "aud": "https://protected.example.net/resource",
          "iat": 1419350238, "nbf": 1419350238, "exp": int(time.time()) + 3600,
          "jti": "5b1f3a7c-2d4e-4f60-9a8b-c0d1e2f3a4b5"}
POLICY = Policy(ttl=300, negative_ttl=5, stale_if_error=0, wait=2.0)


def measure(fn, n):
    """(wall µs, CPU µs) per call of fn(i), median of 5 rounds of n calls."""
    walls, cpus = [], []
    for _ in range(5):
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            fn(i)
        walls.append((time.perf_counter() - w0) / n * 1e6)
        cpus.append((time.process_time() - c0) / n * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=1000)
    args = parser.parse_args()
    n, t = args.n, args.tokens
    rows = []

    alone = TokenCache(key_material=b"bench-idp")
    keys = [alone.key("tok-%d" % i) for i in range(t)]
    fetch = lambda: Answer(dict(CLAIMS), True)  # noqa: E731
    for k in keys:
        alone.get(k, fetch, POLICY)
    rows.append(("peek hit, in-process", measure(lambda i: alone.peek(keys[i % t], POLICY), n)))

    directory = tempfile.mkdtemp(prefix="bench-nodecache-")
    node.set_directory(directory)
    shared = TokenCache(key_material=b"bench-idp")
    other = TokenCache(key_material=b"bench-idp")   # another process's copy: own front LRU
    assert shared._node is not None
    for k in keys:
        shared.get(k, fetch, POLICY)
    rows.append(("peek hit, node cache, decoded here",
                 measure(lambda i: shared.peek(keys[i % t], POLICY), n)))

    def cold(i):
        other._node._front.clear()   # as if every hit were the first in this process
        other.peek(keys[i % t], POLICY)
    rows.append(("peek hit, node cache, first in this process", measure(cold, n)))

    now = time.time()
    entry = Entry(dict(CLAIMS), now, now + 300)
    lru = alone._local

    def write_lru(i):
        lru[keys[i % t]] = entry
    level = shared._node

    def write_node(i):
        level[keys[i % t]] = entry
    rows.append(("write, in-process", measure(write_lru, n)))
    rows.append(("write, node cache", measure(write_node, max(n // 4, 1))))

    def flight(i):
        level.flight(keys[i % t], 2.0, None).release()
    rows.append(("single flight, uncontended (lock+unlock)", measure(flight, n)))

    print("| operation | wall µs | CPU µs |")
    print("|---|---:|---:|")
    for name, (wall, cpu) in rows:
        print("| %s | %.2f | %.2f |" % (name, wall, cpu))
    print("\n%d tokens, %d calls per round, median of 5; python %s, lmdb %s, %d CPUs"
          % (t, n, sys.version.split()[0], ".".join(map(str, nodecache.lmdb.version())),
             os.cpu_count() or 0))


if __name__ == "__main__":
    main()
