"""The in-process level of the token cache: lifetimes, single flight, failures."""

import threading
import time

import pytest

from kong_oauth2_introspection.cache.tokens import Policy, TokenCache
from kong_oauth2_introspection.concurrency import Deadline, DeadlineExceeded, deadline_scope
from kong_oauth2_introspection.introspection.exchange import Answer, IntrospectionError


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


class Cache:
    """A TokenCache used under one config's policy."""

    def __init__(self, clock=None, key_material=b"k", maxsize=10000, **policy):
        args = dict(ttl=30, negative_ttl=5, stale_if_error=0, wait=2.0)
        args.update(policy)
        self.policy = Policy(**args)
        self.cache = TokenCache(key_material=key_material, maxsize=maxsize,
                                clock=clock or time.time)

    def get(self, key, fetch, policy=None, **kw):
        return self.cache.get(key, fetch, policy or self.policy, **kw)

    def __getattr__(self, name):
        return getattr(self.cache, name)


make = Cache


class Fetcher:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_key_hides_the_token_and_depends_on_config():
    a, b = make(key_material=b"idp-1"), make(key_material=b"idp-2")
    assert "secret-token" not in a.key("secret-token")
    assert a.key("t") == make(key_material=b"idp-1").key("t") != b.key("t")
    assert a.key("t", "ctx") != a.key("t")
    assert a.credential_id(a.key("t")) == a.credential_id(a.key("t"))


def test_active_answer_cached_for_ttl_but_never_past_exp():
    clock = Clock()
    cache = make(clock)
    fetch = Fetcher(Answer({"active": True, "exp": clock.now + 10}, True))
    cache.get("k", fetch)
    clock.now += 9
    cache.get("k", fetch)
    assert fetch.calls == 1
    clock.now += 2  # past exp, well before ttl
    cache.get("k", fetch)
    assert fetch.calls == 2


def test_ttl_zero_keeps_until_exp():
    clock = Clock()
    cache = make(clock, ttl=0)
    fetch = Fetcher(Answer({"active": True, "exp": clock.now + 3600}, True))
    cache.get("k", fetch)
    clock.now += 3599
    cache.get("k", fetch)
    assert fetch.calls == 1


def test_inactive_cached_for_negative_ttl_only():
    clock = Clock()
    cache = make(clock, negative_ttl=5)
    fetch = Fetcher(Answer({"active": False}, True))
    cache.get("k", fetch)
    clock.now += 4
    cache.get("k", fetch)
    assert fetch.calls == 1
    clock.now += 2
    cache.get("k", fetch)
    assert fetch.calls == 2


def test_no_store_answers_are_not_cached():
    cache = make()
    fetch = Fetcher(Answer({"active": True}, False))
    cache.get("k", fetch)
    cache.get("k", fetch)
    assert fetch.calls == 2


def test_failure_is_never_cached():
    cache = make()
    fetch = Fetcher(IntrospectionError("down"), Answer({"active": True}, True))
    with pytest.raises(IntrospectionError):
        cache.get("k", fetch)
    assert cache.get("k", fetch).active and fetch.calls == 2


def test_stale_if_error_serves_an_expired_active_answer_while_idp_is_down():
    clock = Clock()
    cache = make(clock, ttl=10, stale_if_error=60)
    fetch = Fetcher(Answer({"active": True, "exp": clock.now + 3600}, True),
                    IntrospectionError("down"))
    cache.get("k", fetch)
    clock.now += 30
    assert cache.get("k", fetch).active and fetch.calls == 2   # asked, failed, served stale
    clock.now += 45  # past ttl + stale_if_error
    with pytest.raises(IntrospectionError):
        cache.get("k", fetch)


def test_stale_never_past_exp():
    clock = Clock()
    cache = make(clock, ttl=10, stale_if_error=600)
    fetch = Fetcher(Answer({"active": True, "exp": clock.now + 20}, True),
                    IntrospectionError("down"))
    cache.get("k", fetch)
    clock.now += 25
    with pytest.raises(IntrospectionError):
        cache.get("k", fetch)


def test_single_flight_within_a_process():
    cache = make()
    calls = []
    gate = threading.Event()

    def slow():
        calls.append(1)
        gate.wait(2)
        return Answer({"active": True}, True)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow)))
               for _ in range(35)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 35 and all(r.active for r in results)


def test_waiters_share_the_leaders_failure_then_retry_fresh():
    cache = make()
    gate = threading.Event()

    def failing():
        gate.wait(2)
        raise IntrospectionError("down")

    errors = []

    def worker():
        try:
            cache.get("k", failing)
        except IntrospectionError as err:
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert len(errors) == 5
    assert cache.get("k", lambda: Answer({"active": True}, True)).active


def test_bounded_size():
    cache = make(maxsize=3)
    fetch = Fetcher(Answer({"active": True}, True))
    for i in range(10):
        cache.get(f"k{i}", fetch)
    assert len(cache._local) == 3


def test_configs_sharing_a_cache_each_apply_their_own_ttl():
    clock = Clock()
    short = Cache(clock, ttl=5)
    long = Policy(ttl=300, negative_ttl=5, stale_if_error=0, wait=1)
    fetch = Fetcher(Answer({"active": True}, True))
    short.get("k", fetch, long)            # cached by a config with ttl 300
    clock.now += 10
    short.get("k", fetch, long)
    assert fetch.calls == 1                # still fresh for that config
    short.get("k", fetch)                  # but not for the ttl-5 config
    assert fetch.calls == 2


# -- peek, the request deadline, and what same-process waiters do -----------------------

def test_peek_returns_only_fresh_entries_and_never_fetches():
    clock = Clock()
    cache = make(clock, ttl=10)
    assert cache.peek("k", cache.policy) is None
    cache.get("k", Fetcher(Answer({"active": True}, True)))
    assert cache.peek("k", cache.policy).active
    clock.now += 11
    assert cache.peek("k", cache.policy) is None


def slow_leader(cache, answer, hold):
    """Start a leader whose IdP call takes ``hold`` seconds; returns its thread."""
    started = threading.Event()

    def fetch():
        started.set()
        time.sleep(hold)
        if isinstance(answer, Exception):
            raise answer
        return answer
    t = threading.Thread(target=lambda: _swallow(lambda: cache.get("k", fetch)))
    t.start()
    started.wait(2)
    return t


def _swallow(fn):
    try:
        fn()
    except Exception:
        pass


def test_waiter_gives_up_at_its_deadline():
    cache = make()
    leader = slow_leader(cache, Answer({"active": True}, True), 1.0)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        cache.get("k", Fetcher(Answer({"active": True}, True)), deadline=Deadline(0.2))
    assert 0.15 < time.monotonic() - start < 0.5
    leader.join()


def test_waiter_past_its_wait_bound_asks_itself_instead_of_failing():
    cache = make(wait=0.2)
    leader = slow_leader(cache, Answer({"active": True}, True), 1.0)
    own = Fetcher(Answer({"active": True, "who": "waiter"}, True))
    start = time.monotonic()
    entry = cache.get("k", own)
    assert entry.claims["who"] == "waiter" and own.calls == 1
    assert time.monotonic() - start < 0.6
    leader.join()


def test_no_store_answer_is_not_shared_with_waiters():
    cache = make()
    leader = slow_leader(cache, Answer({"active": True, "who": "leader"}, False), 0.3)
    own = Fetcher(Answer({"active": True, "who": "waiter"}, False))
    assert cache.get("k", own).claims["who"] == "waiter" and own.calls == 1
    leader.join()


def test_leaders_failure_waiters_apply_their_own_stale_if_error():
    clock = Clock()
    tolerant = Policy(ttl=1, negative_ttl=5, stale_if_error=60, wait=2)
    strict = Policy(ttl=1, negative_ttl=5, stale_if_error=0, wait=2)
    cache = make(clock)
    cache.get("k", Fetcher(Answer({"active": True}, True)), tolerant)
    clock.now += 5        # stale for both
    gate = threading.Event()

    def failing():
        gate.wait(2)
        raise IntrospectionError("down")
    results = {}

    def run(name, policy, fetch):
        try:
            results[name] = cache.get("k", fetch, policy).active
        except IntrospectionError:
            results[name] = "error"
    leader = threading.Thread(target=run, args=("leader", strict, failing))
    leader.start()
    time.sleep(0.1)
    waiters = [threading.Thread(target=run, args=(n, p, Fetcher(Answer({"active": True}, True))))
               for n, p in (("tolerant", tolerant), ("strict", strict))]
    for t in waiters:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in [leader] + waiters:
        t.join()
    assert results == {"leader": "error", "tolerant": True, "strict": "error"}


def test_deadline_scope_of_the_caller_is_used():
    cache = make()
    leader = slow_leader(cache, Answer({"active": True}, True), 1.0)
    with deadline_scope(Deadline(0.2)):
        with pytest.raises(DeadlineExceeded):
            cache.get("k", Fetcher(Answer({"active": True}, True)))
    leader.join()


def test_herd_of_distinct_tokens_asks_once_per_token():
    cache = make()
    calls = []
    lock = threading.Lock()

    def fetch_for(token):
        def fetch():
            with lock:
                calls.append(token)
            time.sleep(0.2)
            return Answer({"active": True, "t": token}, True)
        return fetch
    barrier = threading.Barrier(60)
    results = []

    def one(i):
        token = f"t{i % 12}"
        barrier.wait()
        results.append(cache.get(token, fetch_for(token)).claims["t"] == token)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results) and len(results) == 60
    assert sorted(calls) == sorted(f"t{i}" for i in range(12))


def test_leader_out_of_time_waiters_fail_with_it_instead_of_asking_again():
    cache = make()
    calls = []

    def late():
        calls.append(1)
        time.sleep(0.4)
        raise DeadlineExceeded("the leader's request ran out of time")
    outcome = {}

    def leader():
        try:
            cache.get("k", late)
        except DeadlineExceeded:
            outcome["leader"] = "deadline"
    t = threading.Thread(target=leader)
    t.start()
    time.sleep(0.1)
    waiter_fetch = Fetcher(Answer({"active": True}, True))
    with pytest.raises(IntrospectionError):
        cache.get("k", waiter_fetch)
    t.join()
    assert outcome == {"leader": "deadline"} and len(calls) == 1 and waiter_fetch.calls == 0
