"""Routing-trace analysis: the replay, Belady's optimum, the oracle ceiling and recall agree with each other
and with moeshard's runtime."""
import torch

from moeshard.benchmarks.routing import Trace, belady, capture_trace, moeshard_recall, prediction_recall, simulate


def alternating_trace(steps: int = 40) -> Trace:
    chosen = torch.tensor([[[0, 1]] if t % 2 == 0 else [[2, 3]] for t in range(steps)])  # [N, L=1, K=2]
    probs = torch.full((steps, 1, 4), 0.25)
    return Trace(probs, chosen, torch.zeros(steps, 1, 4))


def test_policies_on_an_alternating_trace():
    trace = alternating_trace()
    lru, router = simulate(trace, 0, 2, "lru"), simulate(trace, 0, 2, "router")
    oracle, best = simulate(trace, 0, 2, "oracle"), simulate(trace, 0, 2, "belady")
    assert lru == 0.0  # two slots always hold the pair just used, never the one needed next
    assert 0.3 < router <= best and 0.4 < oracle <= best
    assert best == belady([[0, 1] if t % 2 == 0 else [2, 3] for t in range(40)], 2)
    assert simulate(trace, 0, 4, "lru") == simulate(trace, 0, 4, "belady") == 76 / 80  # four slots: only the first two steps miss


def test_belady_is_an_upper_bound_and_monotone():
    g = torch.Generator().manual_seed(0)
    needed = [sorted(set(torch.randint(0, 8, (2,), generator=g).tolist())) for _ in range(300)]
    for k in (2, 3, 4):
        trace = Trace(torch.full((300, 1, 8), 1 / 8), torch.tensor([[n * (2 // len(n))] for n in needed]),
                      torch.zeros(300, 1, 8))
        assert belady(needed, k) >= simulate(trace, 0, k, "lru") - 1e-9
    assert belady(needed, 2) <= belady(needed, 3) <= belady(needed, 4)


def test_recall_from_transformers_equals_the_runtime(tiny_tok_ckpt, reference):
    tokens = [1, 17, 42, 5, 88, 23, 61, 9, 30, 74, 12, 99, 150, 201, 33, 7]
    trace = capture_trace(reference(tiny_tok_ckpt), tokens)
    assert trace.chosen.shape == (len(tokens), 3, 2)
    assert abs(prediction_recall(trace, 2) - moeshard_recall(tiny_tok_ckpt, tokens, 2)) < 1e-9


# --- many-expert families, Belady bounds and the replay of moeshard's caches at equal bytes ---

import random
from itertools import combinations

import pytest

from moeshard.benchmarks.routing import (
    GLOBAL_REPLAY_POLICIES, PER_LAYER_POLICIES, belady_global, budget_rows, cache_report, format_cache_report, main,
    model_experts, replay, trace_needed,
)


def combinations_belady(needed: list[list[int]], k: int) -> float:
    """The original exhaustive `belady` (every keep-set, checked for a slot to stream through): the reference the
    fast one must reproduce."""
    resident: set[int] = set()
    hits = total = 0
    horizon = len(needed)
    next_use: list[dict[int, int]] = [{} for _ in needed]
    upcoming: dict[int, int] = {}
    for t in range(horizon - 1, -1, -1):
        next_use[t] = dict(upcoming)
        for e in needed[t]:
            upcoming[e] = t
    for t, want in enumerate(needed):
        want_set = set(want)
        hits += len(want_set & resident)
        total += len(want)
        pool = sorted(resident | want_set)
        when = next_use[t]

        def feasible(keep):
            streamed = want_set - resident - set(keep)
            return not streamed or len(set(keep) & resident) < k or any(h not in keep for h in want_set & resident)

        best = None
        for size in range(min(k, len(pool)), -1, -1):
            options = [c for c in combinations(pool, size) if feasible(c)]
            if options:
                best = min(options, key=lambda c: sorted(when.get(e, horizon) for e in c))
                break
        resident = {e for e in best if e in when}
    return hits / total


def optimum(steps: list[set], rows: int, stream_slots: bool = False) -> float:
    """Brute force over every cache history: after each step the cache may hold any <= rows entries of what it
    held and what the step used; a step's hits are the entries held when it starts. stream_slots: LayerSlots'
    extra rule, a miss that is not kept needs a slot not held by a kept old entry (one layer only)."""
    best = {frozenset(): 0}
    for need in steps:
        after: dict[frozenset, int] = {}
        for held, hits in best.items():
            hits += len(need & held)
            pool = sorted(held | need)
            for size in range(min(rows, len(pool)) + 1):
                for keep in map(frozenset, combinations(pool, size)):
                    if stream_slots and need - held - keep and len(keep & held) >= rows and (need & held) <= keep:
                        continue
                    if after.get(keep, -1) < hits:
                        after[keep] = hits
        best = after
    return max(best.values()) / sum(len(n) for n in steps)


def random_needed(seed: int, tokens: int, layers: int, experts: int, top_k: int, skew: float = 1.5):
    """needed[t][l]: top_k distinct experts per token and layer, Zipf-skewed so that some are popular."""
    rng = random.Random(seed)
    weights = [1 / (e + 1) ** skew for e in range(experts)]
    needed = []
    for _ in range(tokens):
        row = []
        for layer in range(layers):
            order = list(range(experts))
            rng.shuffle(order)  # a different popular set per layer
            chosen: set[int] = set()
            while len(chosen) < top_k:
                chosen.add(order[rng.choices(range(experts), weights)[0]])
            row.append(sorted(chosen))
        needed.append(row)
    return needed


def flat_steps(needed) -> list[set]:
    return [{(layer, e) for e in experts} for per_layer in needed for layer, experts in enumerate(per_layer)]


def test_fast_belady_reproduces_the_exhaustive_one():
    for seed in range(12):
        needed = [row[0] for row in random_needed(seed, 60, 1, 7, 1 + seed % 3)]
        for k in (1, 2, 3, 4):
            assert belady(needed, k) == combinations_belady(needed, k), (seed, k)


def test_belady_per_layer_against_brute_force():
    """`belady` keeps MIN's choice but obeys LayerSlots' streaming rule, under which greedy is not always optimal:
    it never beats the optimum under that rule, which never beats MIN without it (belady_global on one layer)."""
    exact = 0
    for seed in range(10):
        needed = [row[0] for row in random_needed(seed, 10, 1, 5, 2)]
        for k in (1, 2, 3):
            steps = [set(n) for n in needed]
            constrained, free = optimum(steps, k, stream_slots=True), optimum(steps, k)
            assert belady(needed, k) <= constrained + 1e-12 <= free + 2e-12
            assert belady_global([[n] for n in needed], k) == pytest.approx(free)
            exact += belady(needed, k) == pytest.approx(constrained)
    assert exact >= 25  # of 30: mostly optimal (seed 8, k=2: 0.45 against 0.5)


def test_belady_global_equals_brute_force():
    for seed in range(10):
        needed = random_needed(100 + seed, 6, 2, 4, 1 + seed % 2)
        for rows in (1, 2, 3):
            assert belady_global(needed, rows) == pytest.approx(optimum(flat_steps(needed), rows)), (seed, rows)
    for seed in range(6):  # one layer: the classic bypass-MIN setting
        needed = random_needed(200 + seed, 10, 1, 5, 2)
        for rows in (1, 2, 3):
            assert belady_global(needed, rows) == pytest.approx(optimum(flat_steps(needed), rows))


def test_belady_global_bounds_per_layer_caches_and_is_monotone():
    needed = random_needed(7, 200, 3, 8, 2)
    per_layer = lambda k: sum(belady([row[layer] for row in needed], k) for layer in range(3)) / 3  # noqa: E731
    rates = [belady_global(needed, rows) for rows in (3, 6, 9, 12, 24)]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(1 - 24 / (200 * 3 * 2))  # 24 rows: compulsory only
    for rows in (3, 6, 9, 12):
        assert belady_global(needed, rows) >= per_layer(rows // 3) - 1e-12
    # Strictly above somewhere: sharing lets a layer with a hot set lend rows to one that needs more.
    assert any(belady_global(needed, rows) > per_layer(rows // 3) + 1e-3 for rows in (3, 6, 9, 12))


def test_replay_drives_moeshard_caches_and_stays_under_the_bounds():
    needed = random_needed(3, 150, 3, 8, 2)
    for rows in (3, 6, 12):
        bound = belady_global(needed, rows)
        layer_bound = sum(belady([row[layer] for row in needed], rows // 3) for layer in range(3)) / 3
        for policy in PER_LAYER_POLICIES + GLOBAL_REPLAY_POLICIES:
            rate = replay(needed, 8, policy, rows)
            assert 0.0 <= rate <= bound + 1e-12 and (rate > 0.1 or rows < 12), (policy, rows)
            if policy in PER_LAYER_POLICIES:
                assert rate <= layer_bound + 1e-12, (policy, rows)
    # Per-layer LRU through build_slots is the per-layer LayerSlots replay, layer by layer.
    trace = Trace(torch.full((150, 3, 8), 1 / 8), torch.tensor(needed), torch.zeros(150, 3, 8))
    assert replay(needed, 8, "lru", 6) == pytest.approx(sum(simulate(trace, layer, 2, "lru") for layer in range(3)) / 3)


def test_a_global_cache_lends_rows_to_the_layer_that_needs_them():
    # Layer 0 cycles through three experts, layer 1 always uses expert 0: two slots each starve layer 0 (LRU
    # never hits a cycle longer than its slots), four shared rows hold all four entries.
    needed = [[[t % 3], [0]] for t in range(60)]
    lru, shared = replay(needed, 4, "lru", 4), replay(needed, 4, "global-lru", 4)
    assert lru == pytest.approx(59 / 120)  # layer 1 only, after its first miss
    assert shared == pytest.approx(1 - 4 / 120) == belady_global(needed, 4)  # compulsory misses only
    assert belady([row[0] for row in needed], 2) < 1 - 3 / 60


def test_cache_report_budgets_and_gaps():
    needed = random_needed(11, 120, 2, 10, 2)
    trace = Trace(torch.full((120, 2, 10), 0.1), torch.tensor(needed), torch.zeros(120, 2, 10))
    assert trace_needed(trace) == needed
    assert [budget_rows(f, 2, 10) for f in (0.1, 0.25, 0.5)] == [2, 6, 10]
    assert budget_rows(0.1, 4, 64) == 24 and budget_rows(0.1, 4, 8) == 4  # whole rows per layer, at least one
    report = cache_report(trace)
    assert list(report) == ["10%", "25%", "50%"]
    for entry in report.values():
        rates, gap = entry["hit_rate"], entry["gap_closed_vs_belady_global"]
        assert entry["rows"] == 2 * entry["slots_per_layer"]
        assert set(rates) == {"lru", "router", "oracle", "global-lru", "global-lfru", "belady", "min_per_layer",
                              "belady_global"}
        assert all(r <= rates["belady_global"] + 1e-12 for r in rates.values())
        assert all(rates[p] <= rates["min_per_layer"] + 1e-12 for p in ("lru", "router", "oracle", "belady"))
        lru, bound = rates["lru"], rates["belady_global"]
        assert gap["belady"] == pytest.approx((rates["belady"] - lru) / (bound - lru)) and "lru" not in gap
    assert report["10%"]["hit_rate"]["belady_global"] < report["50%"]["hit_rate"]["belady_global"]
    assert "belady_global" in format_cache_report(report)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint (layer 1 dense) with a tokenizer and a held-out text."""
    from .conftest import TOKENIZER_TEXT, save_tiny_tokenizer
    from .families import make_family_checkpoint

    path = make_family_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3_moe", seed=3, vocab_size=300)
    save_tiny_tokenizer(path)
    (path / "heldout.txt").write_text(TOKENIZER_TEXT, encoding="utf-8")
    return path


def test_qwen3_moe_trace_matches_transformers_and_the_runtime(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    tokens = [1, 17, 42, 5, 88, 23, 61, 9, 30, 74, 12, 99, 150, 201, 33, 7]
    trace = capture_trace(model, tokens)
    assert model_experts(tiny_qwen3) == trace.num_experts == 8
    assert trace.chosen.shape == (len(tokens), 3, 2)  # 4 decoder layers, layer 1 dense
    with torch.no_grad():  # the same routing from one teacher-forced forward over the whole sequence
        out = model(input_ids=torch.tensor([tokens]), output_router_logits=True)
    full = torch.stack([logits.float() for logits in out.router_logits], dim=1)  # [N, 3, E]
    assert torch.allclose(trace.probs, full.softmax(-1), atol=1e-4)
    assert torch.equal(trace.chosen.sort(-1).values, full.topk(2, dim=-1).indices.sort(-1).values)
    assert len({tuple(row) for row in trace.chosen[:, 0].tolist()}) > 3  # routing varies from token to token
    # Prediction across the dense layer: sparse layer 2's router on sparse layer 0's output, as moeshard does it.
    assert abs(prediction_recall(trace, 2) - moeshard_recall(tiny_qwen3, tokens, 2)) < 1e-9


def test_report_on_a_qwen3_moe_checkpoint(tiny_qwen3, tmp_path, capsys):
    import json

    assert main(["--model", str(tiny_qwen3), "--tokens", "24", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model_type"] == "qwen3_moe" and report["moe_layers"] == 3 and report["tokens"] == 24
    assert report["cache"]["25%"]["rows"] == 3 * 2
    assert abs(report["recall_transformers_router"] - report["recall_moeshard_runtime"]) < 1e-9
    assert "global-lfru" in capsys.readouterr().out
