"""One memory knob: byte budgets, the global cache shared by every layer, and its policies."""
import json

import pytest
import torch

from moeshard.cli import main
from moeshard.offload_core import load_model
from moeshard.offload_core.config import OffloadConfig, SettingError
from moeshard.offload_core.demo import demo_model_path
from moeshard.offload_core.local_experts import ExpertMemory
from moeshard.offload_core.policies import GlobalLFRUPolicy
from moeshard.offload_core.slots import Loader, build_slots
from moeshard.offload_core.stores import DiskStore

from .conftest import demo_greedy
from .test_cache import NBYTES, StampSource

DEMO = demo_model_path()
PROMPT = "def fibonacci(n):"
NEW = 12


@pytest.fixture(scope="module")
def demo_reference():
    return demo_greedy(PROMPT, NEW)


def make_global(rows, layers=(0, 1, 2), policy="global-lru", experts=8):
    source = StampSource()
    loader = Loader(DiskStore(source), torch.device("cpu"), threads=1)
    return build_slots(list(layers), loader, NBYTES, policy, experts, rows=rows), source


def step(slots, layer, needed):
    cache = slots[layer]
    for e in cache.begin(needed):
        buf = cache.acquire(e)
        assert (int(buf[0]), int(buf[1])) == (layer, e)  # the slot really holds this layer's expert
        cache.release(e)


def test_a_global_cache_gives_slots_to_the_layers_whose_routing_needs_them():
    slots, _ = make_global(rows=6, layers=(0, 1))
    assert slots[0].pool is slots[1].pool and slots[0].slab.shape[0] == 6
    # layer 0 always routes to expert 0; layer 1 cycles over five experts
    for t in range(20):
        step(slots, 0, [0])
        step(slots, 1, [t % 5])
    assert len(slots[0].resident()) == 1 and len(slots[1].resident()) == 5  # per-layer k=3 would cap layer 1 at 3
    c0, c1 = slots[0].counters, slots[1].counters
    assert (c0.hits, c0.misses) == (19, 1)
    assert (c1.hits, c1.misses) == (15, 5)  # five first touches, then every call hits


def test_global_lru_evicts_the_least_recently_used_expert_of_any_layer():
    slots, source = make_global(rows=3, layers=(0, 1))
    step(slots, 0, [1])
    step(slots, 1, [2])
    step(slots, 0, [3])
    step(slots, 1, [4])  # full: (0, 1) is the least recently used of all
    assert slots[0].resident() == [3] and slots[1].resident() == [2, 4]
    assert slots[1].counters.evictions == 1
    step(slots, 1, [2])  # a hit refreshes (1, 2): (0, 3) is now the oldest
    step(slots, 0, [5])
    assert slots[0].resident() == [5] and slots[1].resident() == [4, 2]  # LRU first


def test_a_pinned_expert_of_another_layer_is_never_evicted():
    slots, _ = make_global(rows=2, layers=(0, 1))
    order = slots[0].begin([0, 1])  # layer 0's call holds both slots...
    for e in order:
        slots[0].acquire(e)
    assert slots[1].prefetch([5]) == 0  # ...so a prefetch for layer 1 finds none to take
    assert slots[0].resident() == [0, 1]
    for e in order:
        slots[0].release(e)
    assert slots[1].prefetch([5]) == 1
    assert slots[1].resident() == [5]


def test_more_needed_than_a_small_global_cache_holds_streams_through_it():
    slots, source = make_global(rows=1, layers=(0, 1, 2))
    for t in range(3):
        for layer in (0, 1, 2):
            step(slots, layer, [t, t + 1, t + 2])  # three experts through one slot
    assert sum(c.misses for c in (s.counters for s in slots.values())) == 27


def test_lfru_keeps_a_popular_expert_through_a_scan_that_lru_would_let_push_it_out():
    def run(policy):
        slots, _ = make_global(rows=3, layers=(0,), policy=policy)
        for t in range(30):
            step(slots, 0, [0])  # a popular expert, between three calls of a scan over the other seven
            for i in range(3):
                step(slots, 0, [1 + (3 * t + i) % 7])
        return slots[0].counters.hits
    assert run("global-lru") == 0  # the popular expert's reuse distance is one more than the cache holds
    assert run("global-lfru") >= 25


def test_lfru_use_counts_halve():
    policy = GlobalLFRUPolicy(layers=2, half_life=3)
    for _ in range(3):
        policy.used(0, [1])
        policy.used(1, [1])
    assert policy.counts[(0, 1)] == 1.5 and policy.counts[(1, 1)] == 1.5


def test_per_layer_policies_split_a_byte_budget_evenly():
    source = StampSource()
    loader = Loader(DiskStore(source), torch.device("cpu"), threads=1)
    slots = build_slots([0, 1, 2], loader, NBYTES, "lru", 8, rows=7)
    assert [s.capacity for s in slots.values()] == [2, 2, 2]
    assert len({id(s.pool) for s in slots.values()}) == 3
    with pytest.raises(ValueError, match="one"):
        build_slots([0, 1, 2], loader, NBYTES, "lru", 8, rows=2)


@pytest.mark.parametrize("policy", ["lru", "global-lru"])
def test_expert_memory_plans_rows_and_refuses_what_cannot_work(policy):
    cpu = torch.device("cpu")
    cfg = OffloadConfig(expert_memory=10_000, policy=policy)
    plan = ExpertMemory.plan(cfg, cpu, layers=4, num_experts=8, slot_bytes=1000)
    assert (plan.rows, plan.bytes, plan.all_experts) == (10, 10_000, 32)
    assert "31%" in plan.line(policy, 4)
    big = ExpertMemory.plan(OffloadConfig(expert_memory=10**9, policy=policy), cpu, 4, 8, 1000)
    assert big.rows == 32 and "capped" in big.how
    with pytest.raises(SettingError, match="holds no expert: one takes 1000 B"):
        ExpertMemory.plan(OffloadConfig(expert_memory=999, policy=policy), cpu, 4, 8, 1000)
    small = OffloadConfig(expert_memory=3000, policy=policy)
    if policy == "lru":
        with pytest.raises(SettingError, match="fewer than one per MoE layer") as err:
            ExpertMemory.plan(small, cpu, 4, 8, 1000)
        assert err.value.setting == "expert_memory"
    else:
        assert ExpertMemory.plan(small, cpu, 4, 8, 1000).rows == 3
    auto = ExpertMemory.plan(OffloadConfig(expert_memory="auto", policy=policy), cpu, 4, 8, 1000)
    assert auto.rows == 32 and auto.how.startswith("auto:") and "headroom" in auto.how
    assert ExpertMemory.plan(OffloadConfig(), cpu, 4, 8, 1000) is None  # slots_per_layer decides


@pytest.mark.parametrize("bad", [0, -5, "lots", 1.5, True])
def test_a_bad_expert_memory_is_refused_by_name(bad):
    with pytest.raises(SettingError, match="expert memory must be a size") as err:
        OffloadConfig(expert_memory=bad)
    assert err.value.setting == "expert_memory"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["global-lru", "global-lfru", "lru"])
def test_byte_budgets_on_the_demo_model_decode_transformers_tokens(demo_reference, policy):
    ids, expected, experts = demo_reference
    with load_model(DEMO, dtype="float32") as probe:
        slot = probe.runtime.local.slot_bytes
        layers = len(probe.layout.sparse_layers)
    for rows in ([1, 3] if policy != "lru" else []) + [layers, layers * experts // 4, layers * experts]:
        for m in (0, 1):
            with load_model(DEMO, expert_memory=rows * slot, policy=policy, prefetch=m, dtype="float32") as om:
                assert om.runtime.local.rows == rows and om.runtime.local.expert_memory == rows * slot
                tokens = om.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                     min_new_tokens=NEW, do_sample=False)
                assert torch.equal(tokens, expected), (policy, rows, m)
                total = om.stats().total
                if rows == layers * experts:  # everything fits: only first touches miss
                    assert total.misses <= layers * experts


@pytest.mark.parametrize("policy", ["global-lru", pytest.param("global-lfru", marks=pytest.mark.slow)])
def test_cli_expert_memory_with_each_global_policy(demo_reference, capsys, policy):
    ids, expected, _ = demo_reference
    code = main(["generate", "--policy", policy, "--expert-memory", "600KiB", "--prompt", PROMPT,
                 "--max-new-tokens", str(NEW), "--dtype", "float32", "--device", "cpu", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["token_ids"] == expected[0, ids.shape[1]:].tolist()


def test_cli_refuses_both_knobs_and_a_bad_size(capsys):
    assert main(["generate", "--expert-memory", "1GiB", "--slots-per-layer", "2", "--prompt", "x", "--quiet"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--expert-memory", "lots", "--prompt", "x", "--quiet"])
    assert exc.value.code == 2
    assert "expected a size such as 12GiB" in capsys.readouterr().err
    assert main(["generate", "--expert-memory", "1KiB", "--policy", "lru", "--prompt", "x", "--quiet",
                 "--device", "cpu"]) == 2
    assert "--expert-memory" in capsys.readouterr().err


def test_layers_are_placed_on_devices_by_their_budgets():
    from moeshard.offload_core.local_experts import _split, place_layers

    assert _split(4, [1.0, 1.0]) == [2, 2] and _split(5, [3, 1]) == [4, 1] and _split(3, [100, 1]) == [2, 1]
    assert _split(48, [600, 200]) == [36, 12]
    cpu = torch.device("cpu")
    # two devices' budgets (a test stands two CPU "devices" in for two GPUs; the CLI refuses that, below)
    cfg = OffloadConfig(expert_memory=12_000, policy="global-lru")
    placed = place_layers(cfg, [cpu, cpu], [0, 1, 2, 3], 8, 1000, memories=[12_000, 4_000])
    assert [(p.layers, p.rows) for p in placed] == [((0, 1, 2), 12), ((3,), 4)]
    even = place_layers(OffloadConfig(), [cpu, cpu], [0, 1, 2, 3], 8, 1000)
    assert [(p.layers, p.rows) for p in even] == [((0, 1), None), ((2, 3), None)]
    with pytest.raises(SettingError, match="fewer than one for each of its"):
        place_layers(OffloadConfig(expert_memory=3_000, policy="lru"), [cpu, cpu], [0, 1, 2, 3, 4, 5, 6], 8, 1000,
                     memories=[3_000, 1_000])


def test_experts_spread_over_two_devices_compute_the_same_tokens(demo_reference):
    """The multi-device path (per-device loaders and slabs, outputs back to the primary device), on two CPU stand-ins."""
    from moeshard.offload_core.local_experts import LocalExperts, Placement

    ids, expected, _ = demo_reference
    with load_model(DEMO, slots_per_layer=2, dtype="float32") as om:
        local = om.runtime.local
        cpu = torch.device("cpu")
        spread = [Placement(cpu, (0, 1), rows=3), Placement(cpu, (2, 3), rows=5)]
        two = LocalExperts(local.source, local.format, local.math, cpu, local.layers, local.num_experts, 2,
                           "disk", "global-lru", spread=spread)
        assert len(two.loaders) == 1 or two.rows == 8
        assert two.slots[0].pool is two.slots[1].pool and two.slots[1].pool is not two.slots[2].pool
        assert two.rows == 8
        om.runtime.local = om.runtime.plane.local = two
        tokens = om.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False)
        assert torch.equal(tokens, expected)
        two.close()


def test_several_devices_on_a_cpu_are_refused_with_the_reason(capsys):
    with pytest.raises(SettingError, match="A CPU has one memory"):
        OffloadConfig(device="cpu", expert_devices=("cpu", "cpu"))
    assert main(["generate", "--device", "cpu,cpu", "--prompt", "x", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "cpu alone" in err
    with pytest.raises(SettingError, match="2 expert memory sizes for 1 device"):
        OffloadConfig(expert_memory=(1000, 2000))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["global-lru", "lru"])
def test_expert_memory_on_cuda_decodes_transformers_tokens(demo_reference, policy):
    ids, expected, _ = demo_reference
    with load_model(DEMO, device="cuda", expert_memory=1 << 20, policy=policy, prefetch=1, dtype="float32") as om:
        assert om.runtime.local.slots[0].slab.device.type == "cuda"
        tokens = om.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False)
        assert torch.equal(tokens.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_expert_slots_on_two_gpus_decode_transformers_tokens(demo_reference):
    ids, expected, _ = demo_reference
    with load_model(DEMO, device="cuda:0", expert_devices=("cuda:0", "cuda:1"), expert_memory=(600_000, 300_000),
                    policy="global-lru", dtype="float32") as om:
        devices = {str(s.slab.device) for s in om.runtime.local.slots.values()}
        assert devices == {"cuda:0", "cuda:1"}
        tokens = om.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False)
        assert torch.equal(tokens.cpu(), expected)


def test_info_reads_expected_hit_rates_from_routing_statistics(tmp_path, capsys):
    from moeshard.offload_core.model_info import expected_hit_rates

    cache = {"25%": {"hit_rate": {"lru": 0.4, "global-lru": 0.3}}, "50%": {"hit_rate": {"lru": 0.6, "global-lru": 0.7}}}
    rates = expected_hit_rates(cache, 0.375)
    assert rates == pytest.approx({"lru": 0.5, "global-lru": 0.5})
    assert expected_hit_rates(cache, 0.125) == pytest.approx({"lru": 0.2, "global-lru": 0.15})
    assert expected_hit_rates(cache, 0.75) == pytest.approx({"lru": 0.8, "global-lru": 0.85})
    report = tmp_path / "routing.json"
    report.write_text(json.dumps({"cache": cache}))
    # the demo model's 16-bit expert is 252 KiB: 16 of its 32 experts = 4 per layer, 50% for either kind of policy
    assert main(["info", "--expert-memory", f"{16 * 252}KiB", "--routing", str(report), "--json"]) == 0
    buys = json.loads(capsys.readouterr().out)["buys"]["16"]
    assert buys["slots"] == 16 and buys["per_layer"] == 4
    assert buys["expected_hit_rate"] == pytest.approx({"lru": 0.6, "global-lru": 0.7})
    report.write_text("{}")
    assert main(["info", "--expert-memory", "1MiB", "--routing", str(report)]) == 2
    assert "expected the JSON report of moeshard.benchmarks.routing" in capsys.readouterr().err
    assert main(["info", "--routing", str(report)]) == 2
    assert "--routing needs --expert-memory" in capsys.readouterr().err
