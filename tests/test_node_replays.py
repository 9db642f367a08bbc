"""With ``serve --processes N`` Kong sends a request to whichever process holds the
pooled connection it picks, so a DPoP proof (or a signed answer) accepted by one
process must be refused by every other one of the node, without Redis: real
separate processes sharing one node directory, real LMDB."""

import multiprocessing

from kong_oauth2_introspection.cache.replays import NodeReplays


def _offer(directory, keys, ttl, out):
    from kong_oauth2_introspection import node
    from kong_oauth2_introspection.introspection import dpop
    node.set_directory(directory)      # None: the process runs alone
    out.put([dpop.ReplayStore().first_use(k, ttl) for k in keys])


def _in_processes(directory, batches, ttl=60.0):
    """Each batch offered by a new OS process, one after the other."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    results = []
    for keys in batches:
        p = ctx.Process(target=_offer, args=(directory, keys, ttl, out))
        p.start()
        results.append(out.get(timeout=60))
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_a_proof_accepted_by_one_process_is_refused_by_another(tmp_path):
    first, second = _in_processes(str(tmp_path), [["proof-a", "proof-b"],
                                                  ["proof-b", "proof-a", "proof-c"]])
    assert first == [True, True]
    assert second == [False, False, True]


def test_expired_keys_are_forgotten_and_the_store_refuses_when_full(tmp_path):
    store = NodeReplays(str(tmp_path), capacity=3)
    assert [store.add(b"k%d" % i, 10, now=100.0) for i in range(3)] == [True, True, True]
    assert store.add(b"k9", 10, now=105.0) is None          # full: refused, never evicted
    assert store.add(b"k0", 10, now=105.0) is False         # still remembered
    assert store.add(b"k9", 10, now=111.0) is True          # the old ones expired
    assert store.add(b"k0", 10, now=111.0) is True
    assert len(store) <= 3
    store.close()


def test_without_a_node_directory_the_store_is_the_process_own():
    first, second = _in_processes(None, [["p1"], ["p1"]])
    assert first == [True] and second == [True]
