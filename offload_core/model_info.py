"""What a checkpoint is, and what fits where: the report behind `moe-coordinator info`.

Reads headers only (no tensor data): the family layout from transformers' model on the meta device, the
dense bytes (everything that is not an expert: attention, norms, routers, shared experts, dense MLP layers,
embeddings), and the packed size of one expert at each bit width moeshard offers.
"""
from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import SAFETENSORS_DTYPES, Checkpoint
from .config import ALLOWED_BITS, GLOBAL_POLICIES, QuantConfig, dtype_name, human_bytes, resolve_dtype
from .families import VERIFIED_FAMILIES, open_layout
from .formats import expert_format


def describe_checkpoint(path: Path, memory: int | None = None, expert_memory: int | None = None,
                        routing: dict | None = None) -> dict:
    """The report behind `info`; `routing`: the "cache" section of a routing benchmark's report on this model (hit
    rates per budget share and policy), read at each bit width's share of `expert_memory`."""
    ckpt = Checkpoint(path)
    config, layout = open_layout(ckpt)
    dtype = resolve_dtype(None, config)
    expert_names = layout.expert_names()
    dense_bytes = sum(math.prod(ckpt.shape(n)) * SAFETENSORS_DTYPES[ckpt._require(n).dtype].itemsize
                      for n in ckpt.names if n not in expert_names)
    shared = sorted(layout.shared_experts)
    per_expert = {}
    for bits in ALLOWED_BITS:
        try:
            fmt = expert_format(layout.tensors, QuantConfig(expert_bits=bits), dtype)
        except ValueError as exc:  # e.g. a shape that does not split into the bit width's groups
            per_expert[bits] = {"error": str(exc)}
            continue
        per_expert[bits] = {"bytes": fmt.layout.nbytes, "format": fmt.label}
    n_experts = len(layout.sparse_layers) * layout.num_experts
    report = {
        "path": str(ckpt.path), "model_type": layout.model_type, "verified": layout.model_type in VERIFIED_FAMILIES,
        "experts_class": layout.experts_class, "layers": int(config.num_hidden_layers),
        "moe_layers": layout.sparse_layers, "experts_per_layer": layout.num_experts, "top_k": layout.top_k,
        "shared_experts_layers": shared, "hidden_size": layout.hidden_size, "dtype": dtype_name(dtype),
        "prequantized": layout.quantization, "dense_bytes": dense_bytes, "experts": n_experts,
        "bytes_per_expert": per_expert,
    }
    if memory is not None:
        report["memory"] = memory
        report["fits"] = {bits: _fit(memory, dense_bytes, info["bytes"], len(layout.sparse_layers), layout.num_experts)
                          for bits, info in per_expert.items() if "bytes" in info}
    if expert_memory is not None:
        report["expert_memory"] = expert_memory
        report["buys"] = {bits: _buys(expert_memory, info["bytes"], len(layout.sparse_layers), layout.num_experts)
                          for bits, info in per_expert.items() if "bytes" in info}
        if routing:
            for buy in report["buys"].values():  # a per-layer policy uses only whole slots per layer
                per_layer = expected_hit_rates(routing, buy["per_layer"] / layout.num_experts)
                shared = expected_hit_rates(routing, buy["share"])
                buy["expected_hit_rate"] = {p: (shared if p in GLOBAL_POLICIES else per_layer)[p] for p in shared}
    return report


def expected_hit_rates(routing: dict, share: float) -> dict[str, float]:
    """Each policy's hit rate at `share` of the experts, interpolated linearly between the measured budgets of a routing
    report's "cache" section ({"25%": {"hit_rate": {policy: rate}}}), from 0 at none to 1 at every expert."""
    points = sorted((float(name.rstrip("%")) / 100, budget["hit_rate"]) for name, budget in routing.items())
    policies = [p for p in points[0][1] if all(p in rates for _, rates in points)]
    out = {}
    for policy in policies:
        xs = [0.0] + [x for x, _ in points] + [1.0]
        ys = [0.0] + [rates[policy] for _, rates in points] + [1.0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x0 <= share <= x1:
                out[policy] = y0 + (y1 - y0) * (share - x0) / (x1 - x0) if x1 > x0 else y1
                break
    return out


def _buys(budget: int, expert: int, layers: int, experts: int) -> dict:
    """What `--expert-memory budget` holds of experts of `expert` bytes (their stored form)."""
    slots = min(budget // expert, layers * experts)
    return {"slots": int(slots), "share": slots / (layers * experts), "per_layer": int(min(slots // layers, experts))}


def _fit(memory: int, dense: int, expert: int, layers: int, experts: int) -> dict:
    """Slots per layer that fit beside the dense weights (attention bits at 16; quantizing attention frees more)."""
    free = memory - dense
    slots = max(0, free // (expert * layers)) if free > 0 else 0
    return {"slots_per_layer": int(min(slots, experts)), "all_resident": slots >= experts,
            "fits": slots >= 1, "experts_bytes": expert * layers * experts}


def format_info(r: dict) -> str:
    lines = [
        f"{r['path']}",
        f"  family          {r['model_type']} ({r['experts_class']})" + ("" if r["verified"] else
                                                                        "  [not verified by moeshard's tests]"),
        f"  layers          {r['layers']}, of which {len(r['moe_layers'])} MoE"
        + (f" (dense: {sorted(set(range(r['layers'])) - set(r['moe_layers']))})" if len(r["moe_layers"]) < r["layers"] else ""),
        f"  experts         {r['experts_per_layer']} per layer, top-{r['top_k']}, {r['experts']} in all",
        f"  shared experts  {'in ' + str(len(r['shared_experts_layers'])) + ' layers (resident on the coordinator)' if r['shared_experts_layers'] else 'none'}",
        f"  hidden size     {r['hidden_size']}, dtype {r['dtype']}" + (f", pre-quantized {r['prequantized']}" if r["prequantized"] else ""),
        f"  dense weights   {human_bytes(r['dense_bytes'])} (attention, norms, routers, shared experts, embeddings)",
        "  one expert      " + ", ".join(f"{bits}-bit {human_bytes(info['bytes'])}" if "bytes" in info
                                          else f"{bits}-bit n/a" for bits, info in r["bytes_per_expert"].items()),
        "  all experts     " + ", ".join(f"{bits}-bit {human_bytes(info['bytes'] * r['experts'])}"
                                          for bits, info in r["bytes_per_expert"].items() if "bytes" in info),
    ]
    if "fits" in r:
        lines.append(f"  in {human_bytes(r['memory'])} (dense weights at 16 bits, the rest for expert slots):")
        for bits, fit in r["fits"].items():
            if not fit["fits"]:
                lines.append(f"    {bits:>2}-bit experts: does not fit (the dense weights alone need more, or "
                             "not one expert per layer fits)")
            else:
                what = "every expert resident" if fit["all_resident"] else f"--slots-per-layer {fit['slots_per_layer']}"
                lines.append(f"    {bits:>2}-bit experts: {what}")
    if "buys" in r:
        lines.append(f"  --expert-memory {human_bytes(r['expert_memory'])} holds (one expert per slot):")
        for bits, buy in r["buys"].items():
            lines.append(f"    {bits:>2}-bit experts: {buy['slots']} of {r['experts']} ({buy['share']:.0%}); "
                         + (f"{buy['per_layer']} per layer with a per-layer policy" if buy["per_layer"] else
                            "fewer than one per layer: only a global policy (global-lru) runs in it"))
            if buy.get("expected_hit_rate"):
                lines.append("       expected hit rate without prefetch: " + ", ".join(
                    f"{policy} {rate:.2f}" for policy, rate in buy["expected_hit_rate"].items()
                    if policy in ("lru", "router", "global-lru", "global-lfru")))
        lines.append("    (a slot holds the compute form: on CPU, 3-bit codes widen to 4 bits; the start-up line says "
                     "what a run bought)")
    return "\n".join(lines)
