"""LRU, policies and prefetch semantics of LayerSlots on scripted routing sequences (real loader, CPU slots)."""
import pytest
import torch

from moeshard.offload_core.experts import ExpertKey
from moeshard.offload_core.policies import NoReusePolicy, RouterPolicy, make_policy
from moeshard.offload_core.slots import LayerSlots, Loader
from moeshard.offload_core.stores import DiskStore

NBYTES = 64


class StampSource:
    """Writes (layer, expert) into the buffer, so a test can see which expert a slot really holds."""

    nbytes = NBYTES

    def __init__(self):
        self.reads: list[ExpertKey] = []

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        self.reads.append(key)
        out.fill_(0)
        out[0], out[1] = key.layer, key.expert


def make_cache(capacity, layer=3, policy=None):
    source = StampSource()
    loader = Loader(DiskStore(source), torch.device("cpu"), threads=1)
    return LayerSlots(layer, capacity, loader, NBYTES, policy), source


def run_step(cache, needed):
    """One layer call; returns the experts in compute order, checking each slot holds the right expert."""
    order = cache.begin(needed)
    for e in order:
        buf = cache.acquire(e)
        assert (int(buf[0]), int(buf[1])) == (cache.layer, e)
        cache.release(e)
    return order


def test_lru_hits_misses_and_eviction_order():
    cache, source = make_cache(capacity=2)
    script = [
        # needed, hits, misses, resident after (LRU -> MRU)
        ([0, 1], 0, 2, [0, 1]),
        ([1, 2], 1, 1, [1, 2]),  # 0 is least recently used: evicted
        ([0], 0, 1, [2, 0]),  # evicts 1
        ([2, 3], 1, 1, [2, 3]),  # 2 touched first, then 3 evicts 0
        ([3], 1, 0, [2, 3]),
        ([1, 0], 0, 2, [0, 1]),  # both miss, ascending order: 0 evicts 2, then 1 evicts 3
    ]
    for needed, hits, misses, resident in script:
        before = cache.counters.hits, cache.counters.misses
        run_step(cache, needed)
        assert (cache.counters.hits - before[0], cache.counters.misses - before[1]) == (hits, misses), needed
        assert cache.resident() == resident, needed
    assert cache.counters.hits == 3 and cache.counters.misses == 7
    assert cache.counters.evictions == 5
    assert [k.expert for k in source.reads] == [0, 1, 2, 0, 3, 0, 1]
    assert cache.counters.bytes_loaded == 7 * NBYTES


def test_hits_are_computed_before_misses_and_more_needed_than_slots():
    cache, source = make_cache(capacity=1)
    run_step(cache, [5])
    order = run_step(cache, [2, 5, 7])  # 5 resident: computed first; 2 and 7 then share the single slot
    assert order == [5, 2, 7]
    assert cache.resident() == [7]
    assert (cache.counters.hits, cache.counters.misses) == (1, 3)


def test_needed_expert_is_never_evicted_while_pending():
    cache, source = make_cache(capacity=2)
    run_step(cache, [0, 1])
    order = cache.begin([1, 2, 3])  # 1 hit (pinned), 2 loads into 0's slot, 3 must wait for a release
    assert order == [1, 2, 3]
    assert cache.resident() == [1, 2]
    for e in order:
        buf = cache.acquire(e)
        assert int(buf[1]) == e
        if e == 2:  # 3's load has not been started: no slot was free before 1 and 2 were released
            assert [k.expert for k in source.reads] == [0, 1, 2]
        cache.release(e)
    assert [k.expert for k in source.reads] == [0, 1, 2, 3]
    assert cache.resident() == [2, 3]  # 1 was released first, so it was the victim for 3


def test_prefetch_bookkeeping():
    cache, source = make_cache(capacity=3)
    run_step(cache, [0])
    assert cache.prefetch([4, 5]) == 2  # two loads into free slots
    run_step(cache, [4, 6])  # 4: hit and prefetch used; 6: miss evicts 0 (LRU), not 5
    assert cache.resident() == [5, 4, 6]
    assert cache.prefetch([6, 7]) == 1  # 6 resident: touched, not issued; 7 evicts 5, which was never used
    run_step(cache, [7])
    s = cache.counters
    assert (s.prefetch_issued, s.prefetch_used, s.hits, s.misses) == (3, 2, 2, 2)
    assert cache.resident() == [4, 6, 7]


def test_prefetch_never_evicts_pinned_or_its_own_experts():
    cache, source = make_cache(capacity=2)
    cache.begin([0, 1])  # both pinned while this layer call is in flight
    assert cache.prefetch([2, 3]) == 0
    for e in (0, 1):
        cache.acquire(e)
        cache.release(e)
    assert cache.prefetch([2, 3, 4]) == 2  # capped at capacity; 3 does not evict 2
    assert sorted(cache.resident()) == [2, 3]


def test_zero_slots_rejected():
    with pytest.raises(ValueError, match="slots per layer must be >= 1"):
        make_cache(capacity=0)


def test_router_policy_learns_what_comes_next_and_streams_the_rest():
    """Routing alternates between {0, 1} and {2, 3}: LRU with 2 slots always holds the wrong pair; the router
    policy learns the alternation, keeps the pair needed next and streams the current one through a slot."""
    cache, _ = make_cache(capacity=2, layer=0, policy=RouterPolicy(num_experts=4))
    lru, _ = make_cache(capacity=2)
    for step in range(12):
        for c in (cache, lru):
            run_step(c, [0, 1] if step % 2 == 0 else [2, 3])  # run_step checks every slot holds its expert
    assert lru.counters.hits == 0
    assert cache.counters.hits >= 8  # after a few steps of learning, one of each pair is kept for its next use
    assert cache.counters.hits + cache.counters.misses == 24


def test_router_policy_needs_the_expert_count():
    with pytest.raises(ValueError, match="needs the number of experts"):
        make_policy("router", num_experts=0)
    with pytest.raises(ValueError, match="eviction policy must be one of"):
        make_policy("mru", num_experts=8)


def test_router_policy_prefetch_before_any_call_evicts_lru_first():
    """The crash users hit: a prefetch-driven eviction in a layer whose first call has not happened yet (the
    router policy had no scores). Each policy's state is built in its constructor: the victim is the LRU one."""
    cache, source = make_cache(capacity=2, layer=0, policy=RouterPolicy(num_experts=8))
    assert cache.prefetch([0, 1]) == 2
    assert cache.prefetch([2]) == 1  # evicts a prefetched expert: all scores are equal, LRU breaks the tie
    assert cache.resident() == [1, 2]
    run_step(cache, [2, 3])
    assert cache.counters.evictions == 2


def test_naive_policy_reuses_nothing():
    cache, _ = make_cache(capacity=2, layer=0, policy=NoReusePolicy())
    run_step(cache, [0, 1])
    run_step(cache, [0, 1])
    assert (cache.counters.hits, cache.counters.misses) == (0, 4)
