"""Cache-aware routing: what the bonus buys (offloaded decode speed) and what it costs (held-out perplexity).

`python -m moeshard.benchmarks.cache_aware [--model M] [--lambdas 0,0.5,1,2] [--slots-per-layer K | --expert-memory S]`

For each bonus LAMBDA (`--cache-aware-routing`; 0 = the model's own routing, always measured as the reference) one
offloaded model is loaded with the same budget, and:
- perplexity: held-out text (the model folder's heldout.txt, or --text) fed token by token through the offloaded
  model, teacher forcing with a KV cache, in windows spread evenly over the text (a fresh KV cache per window, the
  expert slots carried on), so residency evolves as it does in decode and the bonus sees the same slots it would;
- the expert-cache hit rate over that pass and over the decodes, and the expert loads per decoded token (demand
  and prefetch: the bytes a slot fill moves, which is what decode speed follows where transfers dominate);
- offloaded greedy decode speed: a prompt from the held-out text, then `--decode-tokens` greedy steps with a KV
  cache, tokens/s over the decode steps (prefill excluded); `--repeats` rounds, interleaved across lambdas
  (ABC, CBA, ...) so that a shared machine's drift falls on every setting alike; median and min..max.
Printed side by side: lambda, perplexity, its change against lambda 0, hit rate, tok/s and the speed-up against
lambda 0 (ratio of medians); `--json` prints everything instead. `--cold` drops every expert read from the page
cache (POSIX_FADV_DONTNEED after each read), so a miss costs a real disk read as it does when the experts do not
fit in RAM.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_LAMBDAS = "0,0.5,1,2"


def _lambdas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers >= 0, got {text!r}")
    return sorted(set([0.0, *values]))  # 0 (the model's own routing) is the reference for every ratio


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moeshard.benchmarks.cache_aware", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--lambdas", type=_lambdas, default=_lambdas(DEFAULT_LAMBDAS),
                   help="bonuses to measure, comma-separated (0 is always added: the reference)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--slots-per-layer", type=int, default=None,
                        help="expert slots per layer (default 2 when --expert-memory is not given)")
    budget.add_argument("--expert-memory", default=None, help="bytes of expert slots instead, e.g. 64MiB")
    p.add_argument("--prefetch", type=int, default=1, help="next-layer experts prefetched per token")
    p.add_argument("--policy", default=None, help="slot eviction policy (default: moeshard's)")
    p.add_argument("--store", choices=["ram", "disk"], default=None, help="host tier (default: disk on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--text", type=Path, default=None, help="held-out text (default: the model folder's heldout.txt)")
    p.add_argument("--ppl-tokens", type=int, default=1020, help="held-out tokens predicted for perplexity")
    p.add_argument("--window", type=int, default=256, help="tokens per perplexity window (one KV cache each)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="decode prompt: this many held-out tokens")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy decode steps timed per round")
    p.add_argument("--repeats", type=int, default=5, help="timed decode rounds per lambda (interleaved)")
    p.add_argument("--cold", action="store_true", help="drop every expert read from the page cache (cold disk)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def _config(args, bonus: float):
    from ..offload_core.config import DEFAULT_POLICY, OffloadConfig, parse_size

    memory = parse_size(args.expert_memory) if args.expert_memory else None
    return OffloadConfig(device=args.device, slots_per_layer=args.slots_per_layer or 2, expert_memory=memory,
                         prefetch=args.prefetch, store=args.store, dtype=args.dtype,
                         policy=args.policy or DEFAULT_POLICY, drop_page_cache=args.cold, cache_aware_routing=bonus)


def _windows(ids: list[int], tokens: int, window: int) -> list[list[int]]:
    """Windows of `window` tokens (each predicts window - 1) spread evenly over `ids`, `tokens` predictions in all."""
    count = max(1, math.ceil(tokens / (window - 1)))
    span = len(ids) - window
    if span < 0:
        return [ids]
    starts = [round(i * span / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]
    out = [ids[s:s + window] for s in starts]
    surplus = sum(len(w) - 1 for w in out) - tokens
    if surplus > 0:
        out[-1] = out[-1][: len(out[-1]) - surplus]
    return [w for w in out if len(w) >= 2]


@torch.inference_mode()
def teacher_forced(om, windows: list[list[int]]) -> dict:
    """Cross-entropy of every next token, fed one token at a time with a KV cache per window (the slots persist)."""
    from transformers import DynamicCache

    device = om.model.get_input_embeddings().weight.device
    before = om.stats().total
    total, count = 0.0, 0
    for window in windows:
        cache = DynamicCache(config=om.model.config)
        ids = torch.tensor(window, device=device)
        for t in range(len(window) - 1):
            logits = om.model(input_ids=ids[t:t + 1].view(1, 1), cache=cache, use_cache=True).logits[0, -1].float()
            total += F.cross_entropy(logits.unsqueeze(0), ids[t + 1:t + 2]).item()
            count += 1
    om.runtime.reset_prediction()
    counters = om.stats().total - before
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "hit_rate": counters.hit_rate,
            "loads_per_token": counters.bytes_loaded / om.slot_bytes / count}


@torch.inference_mode()
def decode(om, prompt: list[int], steps: int) -> dict:
    """Prefill `prompt`, then `steps` greedy steps with a KV cache; tokens/s over the steps."""
    from transformers import DynamicCache

    device = om.model.get_input_embeddings().weight.device
    cache = DynamicCache(config=om.model.config)
    logits = om.model(input_ids=torch.tensor([prompt], device=device), cache=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    tokens = [int(token)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    before = om.stats().total  # the decode steps' counters only
    start = time.perf_counter()
    for _ in range(steps):
        logits = om.model(input_ids=token, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token))  # a host sync per step, as any decode loop has
    sync()
    elapsed = time.perf_counter() - start
    om.runtime.reset_prediction()
    counters = om.stats().total - before
    return {"tok_s": steps / elapsed, "tokens": tokens, "hit_rate": counters.hit_rate,
            "loads_per_token": counters.bytes_loaded / om.slot_bytes / steps}  # demand and prefetch loads


def run(args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from ..offload_core import load_model
    from ..offload_core.demo import demo_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else demo_model_path()
    text_path = args.text or path / "heldout.txt"
    if not text_path.is_file():
        raise SystemExit(f"no held-out text: {text_path} does not exist (give --text)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(text_path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    context = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 0) or 0)
    window = min(args.window, context) if context else args.window
    if args.prompt_tokens + args.decode_tokens + 1 > (context or sys.maxsize):
        raise SystemExit(f"--prompt-tokens + --decode-tokens must fit the model's {context}-token context")
    windows = _windows(ids, args.ppl_tokens, window)
    middle = len(ids) // 2
    prompt = ids[middle:middle + args.prompt_tokens]

    models = {lam: load_model(path, _config(args, lam)) for lam in args.lambdas}
    first = models[args.lambdas[0]]
    rows = {lam: {"lambda": lam} for lam in args.lambdas}
    try:
        for lam, om in models.items():
            rows[lam].update({f"ppl_{k}": v for k, v in teacher_forced(om, windows).items()})
        for om in models.values():
            decode(om, prompt, min(8, args.decode_tokens))  # warm-up, untimed
        speeds = {lam: [] for lam in args.lambdas}
        hits = {lam: [] for lam in args.lambdas}
        loads = {lam: [] for lam in args.lambdas}
        tokens = {}
        for r in range(args.repeats):
            order = args.lambdas if r % 2 == 0 else args.lambdas[::-1]
            for lam in order:
                result = decode(models[lam], prompt, args.decode_tokens)
                speeds[lam].append(result["tok_s"])
                hits[lam].append(result["hit_rate"])
                loads[lam].append(result["loads_per_token"])
                tokens[lam] = result["tokens"]
        for lam in args.lambdas:
            rows[lam].update({"tok_s": statistics.median(speeds[lam]), "tok_s_min": min(speeds[lam]),
                              "tok_s_max": max(speeds[lam]), "tok_s_rounds": speeds[lam],
                              "decode_hit_rate": statistics.median(h for h in hits[lam] if h is not None),
                              "decode_loads_per_token": statistics.median(loads[lam]),
                              "decode_tokens_same_as_lambda_0": tokens[lam] == tokens[0.0]})
    finally:
        for om in models.values():
            om.close()
    ref = rows[0.0]
    for row in rows.values():
        row["ppl_change"] = row["ppl_perplexity"] / ref["ppl_perplexity"] - 1
        row["speedup"] = row["tok_s"] / ref["tok_s"]
    cfg = first.config
    return {"model": str(path), "model_type": first.layout.model_type, "experts": first.layout.num_experts,
            "top_k": first.layout.top_k, "sparse_layers": len(first.layout.sparse_layers),
            "slots_per_layer": cfg.slots_per_layer, "expert_memory": cfg.expert_memory, "prefetch": cfg.prefetch,
            "policy": cfg.policy, "store": cfg.store_for(torch.device(cfg.device).type), "device": cfg.device,
            "dtype": str(first.model.dtype).removeprefix("torch."), "cold": args.cold, "text": str(text_path),
            "ppl_tokens": ref["ppl_tokens"], "ppl_windows": len(windows), "window": window,
            "prompt_tokens": len(prompt), "decode_tokens": args.decode_tokens, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {platform.processor() or '?'}",
            "rows": [rows[lam] for lam in args.lambdas]}


def table(result: dict) -> str:
    head = (f"{result['model_type']} ({result['sparse_layers']} MoE layers x {result['experts']} experts, top-"
            f"{result['top_k']}), {result['slots_per_layer']} slots/layer, prefetch {result['prefetch']}, "
            f"{result['policy']}, store {result['store']}{' (cold)' if result['cold'] else ''}, {result['device']} "
            f"{result['dtype']}; perplexity over {result['ppl_tokens']} held-out tokens ({result['ppl_windows']} "
            f"windows), decode {result['decode_tokens']} tokens x {result['repeats']} rounds")
    lines = [head, "",
             "| lambda | perplexity | vs 0 | hit rate (text) | hit rate (decode) | expert loads / token (text, decode) "
             "| tok/s median (min..max) | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['lambda']:g} | {r['ppl_perplexity']:.2f} | {100 * r['ppl_change']:+.1f}% | "
                     f"{r['ppl_hit_rate']:.3f} | {r['decode_hit_rate']:.3f} | {r['ppl_loads_per_token']:.1f}, "
                     f"{r['decode_loads_per_token']:.1f} | "
                     f"{r['tok_s']:.1f} "
                     f"({r['tok_s_min']:.1f}..{r['tok_s_max']:.1f}) | {r['speedup']:.2f}x |")
    good = [r for r in result["rows"] if r["lambda"] > 0 and r["speedup"] >= 1.3 and r["ppl_change"] <= 0.02]
    lines.append("")
    lines.append("target (>= 1.3x at <= 2% perplexity): " + (
        ", ".join(f"lambda {r['lambda']:g} ({r['speedup']:.2f}x, {100 * r['ppl_change']:+.1f}%)" for r in good)
        if good else "no setting met it"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
