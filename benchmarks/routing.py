"""Routing-trace analysis: expert-cache policies and next-layer prediction, on a real text.

`capture_trace` decodes a text token by token (teacher forcing, KV cache) through transformers' own model
and records, per token and layer, the router's probabilities, the experts chosen, and the speculative
prediction as moeshard makes it: layer l's norm and router applied to layer l-1's output (the residual
stream before layer l's attention). On that trace:
`simulate` replays LRU, Belady's optimal (MIN) and the router-aware policies, and `prediction_recall`
scores next-layer prediction from transformers' own router outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..offload_core.policies import RouterPolicy, make_policy
from ..offload_core.slots import LayerSlots, Loader
from ..offload_core.stores import DiskStore

# N = tokens in the trace, L = MoE layers, E = experts per layer, K = experts per token


@dataclass
class Trace:
    probs: torch.Tensor  # [N, L, E] router softmax per token and layer
    chosen: torch.Tensor  # [N, L, K] experts the router chose
    predicted_logits: torch.Tensor  # [N, L, E] layer l's router on layer l-1's output (layer 0: unused)

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]


@torch.inference_mode()
def capture_trace(model, token_ids: list[int]) -> Trace:
    """Decode `token_ids` one at a time through a transformers Mixtral-style model; record routing."""
    from transformers import DynamicCache

    layers = model.model.layers
    logits_seen: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []  # each decoder layer's input: the previous layer's output
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: logits_seen.append(out[0].float()))
             for layer in layers]
    hooks += [layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for layer in layers]
    cache = DynamicCache(config=model.config)
    probs, chosen, predicted = [], [], []
    device = model.get_input_embeddings().weight.device
    try:
        for token in token_ids:
            logits_seen.clear()
            inputs.clear()
            model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True)
            step = torch.cat(logits_seen)  # [L, E]
            probs.append(step.softmax(-1))
            chosen.append(step.topk(model.config.num_experts_per_tok, dim=-1).indices)
            pred = [torch.zeros_like(step[0])]
            for layer in range(1, len(layers)):
                normed = layers[layer].post_attention_layernorm(inputs[layer])
                pred.append(layers[layer].mlp.gate(normed.reshape(1, -1))[0].float()[0])
            predicted.append(torch.stack(pred))
    finally:
        for h in hooks:
            h.remove()
    return Trace(torch.stack(probs).cpu(), torch.stack(chosen).cpu(), torch.stack(predicted).cpu())


def prediction_recall(trace: Trace, m: int) -> float:
    """Share of the experts chosen at layer l (l >= 1) that were in the top-m of the speculative prediction."""
    hit = total = 0
    for layer in range(1, trace.chosen.shape[1]):
        top = trace.predicted_logits[:, layer].topk(m, dim=-1).indices  # [N, m]
        for row_pred, row_true in zip(top.tolist(), trace.chosen[:, layer].tolist()):
            hit += len(set(row_pred) & set(row_true))
            total += len(row_true)
    return hit / total


class _NullSource:
    """Loads that cost nothing: the replay measures decisions, not bandwidth."""

    nbytes = 64

    def read_into(self, key, out) -> None:
        pass


class OraclePolicy(RouterPolicy):
    """The router policy's keep-or-stream, told the next step's experts instead of predicting them: the
    ceiling for any policy that predicts one step ahead."""

    def __init__(self, num_experts: int, upcoming: list[list[int]]):
        super().__init__(num_experts)
        self._upcoming, self._step = upcoming, 0

    def plan(self, needed: list[int], resident: list[int], capacity: int) -> set[int]:
        nxt = set(self._upcoming[self._step + 1]) if self._step + 1 < len(self._upcoming) else set()
        self._step += 1
        self.scores = [1.0 if e in nxt else 0.0 for e in range(len(self.scores))]
        return self.favoured(needed, resident, capacity)


def simulate(trace: Trace, layer: int, k: int, policy: str) -> float:
    """Hit rate of one layer's k-slot cache replaying the trace. "lru" and "router" drive moeshard's own
    LayerSlots (so the replay is the implementation); "oracle" is the router policy told the next step;
    "belady" is the offline optimum (see below)."""
    needed = [sorted(set(row)) for row in trace.chosen[:, layer].tolist()]
    if policy == "belady":
        return belady(needed, k)
    loader = Loader(DiskStore(_NullSource()), torch.device("cpu"))
    strategy = OraclePolicy(trace.num_experts, needed) if policy == "oracle" else make_policy(policy, trace.num_experts)
    slots = LayerSlots(layer, k, loader, _NullSource.nbytes, strategy)
    try:
        for want in needed:
            for e in slots.begin(want):
                slots.acquire(e)
                slots.release(e)
    finally:
        loader.close()
    return slots.counters.hit_rate


def belady(needed: list[list[int]], k: int) -> float:
    """Belady's MIN with bypass: after each step keep the (at most k) experts, among the resident and the
    just-used, whose next uses come soonest. An expert may be used without being kept (it streams through
    a slot), as LayerSlots can do, provided a slot is free of kept old experts for it to pass through (or
    a needed hit that is not kept frees one)."""
    from itertools import combinations

    resident: set[int] = set()
    hits = total = 0
    horizon = len(needed)
    next_use: list[dict[int, int]] = [{} for _ in needed]
    upcoming: dict[int, int] = {}
    for t in range(horizon - 1, -1, -1):  # next_use[t][e]: first step after t that needs e
        next_use[t] = dict(upcoming)
        for e in needed[t]:
            upcoming[e] = t
    for t, want in enumerate(needed):
        want_set = set(want)
        hits += len(want_set & resident)
        total += len(want)
        pool = sorted(resident | want_set)
        when = next_use[t]

        def feasible(keep: tuple[int, ...]) -> bool:
            streamed = want_set - resident - set(keep)
            freed_by_hit = any(h not in keep for h in want_set & resident)
            return not streamed or len(set(keep) & resident) < k or freed_by_hit

        best = None
        for size in range(min(k, len(pool)), -1, -1):
            options = [c for c in combinations(pool, size) if feasible(c)]
            if options:  # the soonest next uses first, like MIN
                best = min(options, key=lambda c: sorted(when.get(e, horizon) for e in c))
                break
        resident = {e for e in best if e in when}
    return hits / total


@torch.inference_mode()
def moeshard_recall(path, token_ids: list[int], m: int) -> float:
    """Prefetch recall as moeshard's runtime counts it, decoding the same tokens one at a time."""
    from transformers import DynamicCache

    from ..offload_core import load_model

    om = load_model(path, slots_per_layer=model_experts(path), prefetch=m, dtype="float32")
    try:
        cache = DynamicCache(config=om.model.config)
        for token in token_ids:
            om(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        return om.stats().total.prefetch_recall
    finally:
        om.close()


def model_experts(path) -> int:
    import json
    from pathlib import Path

    return json.loads((Path(path) / "config.json").read_text())["num_local_experts"]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, MixtralForCausalLM

    from ..offload_core.demo import demo_model_path

    p = argparse.ArgumentParser(prog="python -m moeshard.benchmarks.routing", allow_abbrev=False,
                                description="Cache policies and next-layer prediction on a routing trace.")
    p.add_argument("--model", type=Path, default=demo_model_path())
    p.add_argument("--text", type=Path, default=None, help="default: the demo model's held-out text")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text to decode")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    text = (args.text or args.model / "heldout.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    top_k = model.config.num_experts_per_tok
    trace = capture_trace(model, ids)
    layers = trace.chosen.shape[1]
    report = {"model": str(args.model), "tokens": len(ids),
              "recall_transformers_router": prediction_recall(trace, top_k),
              "recall_moeshard_runtime": moeshard_recall(args.model, ids, top_k),
              "hit_rate": {}}
    for k in (2, 3, 4):
        report["hit_rate"][k] = {policy: sum(simulate(trace, layer, k, policy) for layer in range(layers)) / layers
                                 for policy in ("lru", "router", "oracle", "belady")}
        r = report["hit_rate"][k]
        for policy in ("router", "oracle"):
            r[f"{policy}_gap_closed"] = (r[policy] - r["lru"]) / (r["belady"] - r["lru"]) if r["belady"] > r["lru"] else None
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
