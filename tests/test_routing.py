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
