"""Routing-trace analysis: expert-cache policies and next-layer prediction, on a real text.

`capture_trace` decodes a text token by token (teacher forcing, KV cache) through transformers' own model
(Mixtral or Qwen3-MoE; dense layers of Qwen3-MoE are skipped) and records, per token and MoE layer, the
router's probabilities, the experts chosen, and the speculative prediction as moeshard makes it: MoE layer
l's norm and router applied to the output of the MoE layer before it (the residual stream as that layer's
MoE left it). On that trace:
`simulate` replays LRU, Belady's optimal (MIN) and the router-aware policies one layer at a time;
`replay` drives moeshard's own caches for every layer at once (`slots.build_slots`: per-layer and global
policies at equal bytes) in the order decode visits them; `belady` (per layer, k slots each) and
`belady_global` (one cache of `rows` entries shared by all layers) are the offline optima they are
measured against; `prediction_recall` scores next-layer prediction from transformers' own router outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..offload_core.policies import RouterPolicy, make_policy
from ..offload_core.slots import LayerSlots, Loader, build_slots
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


def moe_layers(model) -> list[int]:
    """Indices of the decoder layers whose MLP is a routed MoE block (Mixtral: all; Qwen3-MoE: all but
    `mlp_only_layers` and those off `decoder_sparse_step`)."""
    return [i for i, layer in enumerate(model.model.layers)
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


@torch.inference_mode()
def capture_trace(model, token_ids: list[int]) -> Trace:
    """Decode `token_ids` one at a time through a transformers Mixtral or Qwen3-MoE model; record routing.

    Both families' routers (`mlp.gate`) return (logits [T, E], top-k weights, top-k indices); the top-k of
    the logits is the top-k of the softmax either family takes it from."""
    from transformers import DynamicCache

    layers = model.model.layers
    sparse = moe_layers(model)
    if not sparse:
        raise ValueError(f"{type(model).__name__} has no routed MoE layer (mlp.gate and mlp.experts)")
    top_k = model.config.num_experts_per_tok
    logits_seen: list[torch.Tensor] = []
    outputs: dict[int, torch.Tensor] = {}  # each MoE layer's output: the residual stream as its MoE left it
    hooks = [layers[i].mlp.gate.register_forward_hook(lambda m, a, out: logits_seen.append(out[0].float()))
             for i in sparse]
    hooks += [layers[i].register_forward_hook(
        lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in sparse]
    cache = DynamicCache(config=model.config)
    probs, chosen, predicted = [], [], []
    device = model.get_input_embeddings().weight.device
    try:
        for token in token_ids:
            logits_seen.clear()
            outputs.clear()
            model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True)
            step = torch.cat(logits_seen)  # [L, E]
            probs.append(step.softmax(-1))
            chosen.append(step.topk(top_k, dim=-1).indices)
            pred = [torch.zeros_like(step[0])]
            for before, layer in zip(sparse, sparse[1:]):
                normed = layers[layer].post_attention_layernorm(outputs[before])
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
    "belady" is Belady's MIN under LayerSlots' streaming rule (see below)."""
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
    """Belady's MIN with bypass for one layer's k slots: after each step keep the (at most k) experts, among the
    resident and the just-used, whose next uses come soonest. An expert may be used without being kept (it
    streams through a slot), as LayerSlots can do, provided a slot is free of kept old experts for it to pass
    through (or a needed hit that is not kept frees one): when the k soonest are all old residents and a miss
    must stream, the farthest of them gives way to the soonest miss. Greedy: under that rule it is not always
    optimal (tests find 10-step traces where it is 0.05 below the optimum), and it binds hard when k < top-k;
    `belady_global([[n] for n in needed], k)` is MIN without the rule, an upper bound on any k-slot cache."""
    if k < 1:
        raise ValueError(f"belady needs at least one slot, got {k}")
    horizon = len(needed)
    next_use: list[dict[int, int]] = [{} for _ in needed]
    upcoming: dict[int, int] = {}
    for t in range(horizon - 1, -1, -1):  # next_use[t][e]: first step after t that needs e
        next_use[t] = dict(upcoming)
        for e in needed[t]:
            upcoming[e] = t
    resident: set[int] = set()
    hits = total = 0
    for t, want in enumerate(needed):
        want_set = set(want)
        hits += len(want_set & resident)
        total += len(want_set)
        when = next_use[t]
        pool = resident | want_set
        if len(pool) <= k:
            keep = list(pool)
        else:  # soonest next use first (never again: last); ties by expert id
            keep = sorted(pool, key=lambda e: (when.get(e, horizon), e))[:k]
            misses = want_set - resident
            if misses and resident.issuperset(keep):  # no slot for the misses to stream through
                keep[-1] = min(misses, key=lambda e: (when.get(e, horizon), e))
        resident = {e for e in keep if e in when}
    return hits / total


def belady_global(needed: list[list[list[int]]], rows: int) -> float:
    """Belady's MIN with bypass for one cache of `rows` (layer, expert) entries shared by every layer: the offline
    optimum for moeshard's global policies (and so a bound for per-layer caches of the same bytes too).

    needed[t][l]: the experts MoE layer l uses at token t. Steps are taken token by token, layer by layer (as
    decode visits them); a step's hits are the entries resident when it starts. Then each miss, in turn, takes a
    free row, or evicts the resident entry whose next use is farthest, or bypasses the cache (streams) if its own
    next use is farther than all of theirs. Equivalently the cache keeps, after each step, the `rows` entries of
    the resident and the just-used whose next uses come soonest; any entry used at a step may be kept after it, so
    swapping two entries with the same next use changes no hit, and the greedy choice is optimal.
    O(accesses x log accesses): a next-use index, and a max-heap of resident next uses with stale entries skipped.
    """
    import heapq

    if rows < 1:
        raise ValueError(f"belady_global needs at least one row, got {rows}")
    if not needed:
        return 0.0
    layers = len(needed[0])
    never = len(needed) * layers  # past the last step
    nxt: list[list[list[int]]] = [[[] for _ in range(layers)] for _ in needed]
    upcoming: dict[tuple[int, int], int] = {}
    for t in range(len(needed) - 1, -1, -1):
        for layer in range(layers - 1, -1, -1):
            row = sorted(set(needed[t][layer]))
            nxt[t][layer] = [upcoming.get((layer, e), never) for e in row]
            step = t * layers + layer
            for e in row:
                upcoming[(layer, e)] = step
    resident: dict[tuple[int, int], int] = {}  # entry -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, layer, expert); stale when it disagrees with `resident`
    hits = total = 0
    for t, per_layer in enumerate(needed):
        for layer in range(layers):
            row = sorted(set(per_layer[layer]))
            total += len(row)
            misses = []
            for e, use in zip(row, nxt[t][layer]):
                if (layer, e) in resident:
                    hits += 1
                    resident[(layer, e)] = use
                    heapq.heappush(heap, (-use, layer, e))
                else:
                    misses.append((use, e))
            for use, e in misses:
                if len(resident) >= rows:
                    while -heap[0][0] != resident.get(heap[0][1:], -1):
                        heapq.heappop(heap)
                    if -heap[0][0] <= use:
                        continue  # bypass: every resident entry is needed again no later than this one
                    del resident[heapq.heappop(heap)[1:]]
                resident[(layer, e)] = use
                heapq.heappush(heap, (-use, layer, e))
    return hits / total


def trace_needed(trace: Trace) -> list[list[list[int]]]:
    """needed[t][l]: the sorted distinct experts MoE layer l uses at token t."""
    return [[sorted(set(row)) for row in token] for token in trace.chosen.tolist()]


PER_LAYER_POLICIES = ("lru", "router")
GLOBAL_REPLAY_POLICIES = ("global-lru", "global-lfru")
BUDGETS = (0.10, 0.25, 0.50)  # shares of all the model's experts the cache holds


def replay(needed: list[list[list[int]]], num_experts: int, policy: str, rows: int) -> float:
    """Hit rate of moeshard's own caches (`slots.build_slots`, so the replay is the implementation) for `policy`
    with `rows` slots in all: a per-layer policy gives each layer rows // layers, a global one shares them.
    Layer calls come token by token, layer by layer, as in decode; loads cost nothing (no I/O)."""
    layers = len(needed[0])
    loader = Loader(DiskStore(_NullSource()), torch.device("cpu"))
    try:
        slots = build_slots(list(range(layers)), loader, _NullSource.nbytes, policy, num_experts, rows=rows)
        for per_layer in needed:
            for layer, want in enumerate(per_layer):
                cache = slots[layer]
                for e in cache.begin(want):
                    cache.acquire(e)
                    cache.release(e)
    finally:
        loader.close()
    hits = sum(s.counters.hits for s in slots.values())
    return hits / (hits + sum(s.counters.misses for s in slots.values()))


def budget_rows(fraction: float, layers: int, num_experts: int) -> int:
    """Rows for a cache holding `fraction` of all the model's experts, a whole number per layer so that per-layer
    and global policies get the same bytes (at least one per layer)."""
    return layers * max(1, int(fraction * num_experts + 0.5))  # half up: 25% of 10 is 3, not round()'s 2


def cache_report(trace: Trace, budgets=BUDGETS, oracle: bool = True) -> dict:
    """Per budget: every policy's replayed hit rate beside the per-layer and global Belady bounds, and the share
    of the gap from per-layer LRU to the global bound each policy closes.

    hit_rate keys: lru, router (per layer, k = rows // layers slots each) and global-lru, global-lfru (one pool of
    `rows`), replayed through `slots.build_slots`; oracle (per layer, `simulate`); belady (per layer, MIN under
    LayerSlots' streaming rule: what the original exhaustive search kept); min_per_layer (per layer, MIN with free
    bypass: the optimum, >= every per-layer cache); belady_global (one cache of `rows`: >= every cache here)."""
    needed = trace_needed(trace)
    layers, experts = trace.chosen.shape[1], trace.num_experts
    out = {}
    for fraction in budgets:
        rows = budget_rows(fraction, layers, experts)
        k = rows // layers
        rates = {policy: replay(needed, experts, policy, rows)
                 for policy in PER_LAYER_POLICIES + GLOBAL_REPLAY_POLICIES}
        if oracle:
            rates["oracle"] = sum(simulate(trace, layer, k, "oracle") for layer in range(layers)) / layers
        per_layer = [[row[layer] for row in needed] for layer in range(layers)]
        rates["belady"] = sum(belady(trace_l, k) for trace_l in per_layer) / layers
        # MIN per layer without LayerSlots' streaming rule (under which greedy `belady` is not always optimal):
        # the true optimum of k slots per layer, so an upper bound on every per-layer policy.
        rates["min_per_layer"] = sum(belady_global([[n] for n in trace_l], k) for trace_l in per_layer) / layers
        rates["belady_global"] = belady_global(needed, rows)
        bound, lru = rates["belady_global"], rates["lru"]
        gap = {policy: (rate - lru) / (bound - lru) if bound > lru else None
               for policy, rate in rates.items() if policy not in ("lru", "belady_global")}
        out[f"{round(fraction * 100)}%"] = {"rows": rows, "slots_per_layer": k, "hit_rate": rates,
                                            "gap_closed_vs_belady_global": gap}
    return out


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
    """Experts per MoE layer from a checkpoint's config.json (Mixtral: num_local_experts; Qwen3-MoE: num_experts,
    or num_local_experts as transformers 5 writes it)."""
    import json
    from pathlib import Path

    config = json.loads((Path(path) / "config.json").read_text())
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    raise ValueError(f"{path}/config.json names no number of experts (num_local_experts or num_experts)")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..offload_core.demo import demo_model_path

    p = argparse.ArgumentParser(prog="python -m moeshard.benchmarks.routing", allow_abbrev=False,
                                description="Cache policies and next-layer prediction on a routing trace.")
    p.add_argument("--model", type=Path, default=demo_model_path(),
                   help="a Mixtral or Qwen3-MoE checkpoint folder with its tokenizer (default: the demo model)")
    p.add_argument("--text", type=Path, default=None, help="default: the model folder's heldout.txt")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text to decode")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    text = (args.text or args.model / "heldout.txt").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    top_k = model.config.num_experts_per_tok
    trace = capture_trace(model, ids)
    layers = trace.chosen.shape[1]
    report = {"model": str(args.model), "model_type": model.config.model_type, "tokens": len(ids),
              "moe_layers": layers, "experts_per_layer": trace.num_experts, "top_k": top_k,
              "recall_transformers_router": prediction_recall(trace, top_k),
              "recall_moeshard_runtime": moeshard_recall(args.model, ids, top_k),
              # Per budget (share of all layers x experts): moeshard's caches replayed at equal bytes, beside
              # Belady per layer (k = rows // layers each) and Belady for one cache shared by all layers.
              "cache": cache_report(trace),
              "hit_rate": {}}
    for k in (2, 3, 4):  # per-layer caches of k slots, one layer at a time
        report["hit_rate"][k] = {policy: sum(simulate(trace, layer, k, policy) for layer in range(layers)) / layers
                                 for policy in ("lru", "router", "oracle", "belady")}
        r = report["hit_rate"][k]
        for policy in ("router", "oracle"):
            r[f"{policy}_gap_closed"] = (r[policy] - r["lru"]) / (r["belady"] - r["lru"]) if r["belady"] > r["lru"] else None
    print(json.dumps(report, indent=2))
    print(format_cache_report(report["cache"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def format_cache_report(cache: dict) -> str:
    """The cache section as a table: hit rate per policy and budget, and the share of the lru -> belady_global gap
    each closes."""
    policies = ["lru", "router", "oracle", "global-lru", "global-lfru", "belady", "min_per_layer", "belady_global"]
    lines = [f"{'budget':>7} {'rows':>5} {'k':>3}  " + " ".join(f"{p:>13}" for p in policies)]
    for budget, entry in cache.items():
        rates, gaps = entry["hit_rate"], entry["gap_closed_vs_belady_global"]
        lines.append(f"{budget:>7} {entry['rows']:>5} {entry['slots_per_layer']:>3}  "
                     + " ".join(f"{rates[p]:>13.4f}" if p in rates else f"{'-':>13}" for p in policies))
        lines.append(f"{'gap':>7} {'':>5} {'':>3}  " + " ".join(
            f"{gaps[p]:>13.1%}" if gaps.get(p) is not None else f"{'':>13}" for p in policies))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
