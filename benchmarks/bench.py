"""`moe-coordinator bench`: every system decodes the same prompt on the same checkpoint, in one run.

Systems: moeshard all resident, LRU, LRU + prefetch, naive (every active expert loaded every token),
moeshard with two local workers; transformers eager with everything in RAM; transformers + accelerate
disk offloading at the same memory budget. Offloaded systems run under the cold protocol (page cache
dropped before each decode step, see protocol.py); warm figures are reported too. Each system's greedy
tokens are checked against transformers' so a fast wrong answer cannot win.
"""
from __future__ import annotations

import gc
import json
import logging
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import torch

from .bench_model import BenchModelSpec, make_bench_checkpoint
from .cli import SYSTEMS
from .protocol import data_files, drop_page_cache, h2d_bandwidth, read_bandwidth

logger = logging.getLogger(__name__)
OFFLOADED = ("lru", "lru+prefetch", "naive", "accelerate-offload")


def decode(model, prompt: torch.Tensor, steps: int, before_step=None) -> dict:
    """Prefill `prompt`, then `steps` greedy decode steps with a KV cache, each timed on its own."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    ids = prompt.to(device)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        if before_step:
            before_step()
        start = time.perf_counter()
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
        prefill_s = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        tokens, times = [int(token)], []
        for _ in range(steps):
            if before_step:
                before_step()
            start = time.perf_counter()
            logits = model(input_ids=token, cache=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
            tokens.append(int(token))
    return {"prefill_s": prefill_s, "step_s": times, "tokens": tokens}


class _System:
    """One benchmarked system: how to build it, which files it reads while decoding, its counters."""

    def __init__(self, name, build, files=(), stats=None, close=None):
        self.name, self.build, self.files, self.stats, self.close = name, build, list(files), stats, close


def _moeshard(ckpt: Path, args, **kw):
    from ..offload_core import load_model

    return load_model(ckpt, device=args.device, dtype=args.dtype, **kw)


def _systems(ckpt: Path, args, spec: BenchModelSpec, budget_bytes: int, workdir: Path) -> dict[str, _System]:
    from transformers import MixtralForCausalLM

    from ..coordinator.cluster import ClusterConfig, join_workers
    from ..coordinator.local_workers import LocalWorkers
    from ..coordinator.placement import ClusterSpec
    from ..offload_core.experts import ExpertKey

    E, k, m = spec.num_local_experts, args.slots_per_layer, args.prefetch
    ckpt_files = data_files(ckpt)
    state = {}

    def resident():
        om = _moeshard(ckpt, args, slots_per_layer=E, prefetch=0, store="ram")
        om.runtime.local.warm()
        return om

    def offloaded(slots, prefetch, policy="lru"):
        return lambda: _moeshard(ckpt, args, slots_per_layer=slots, prefetch=prefetch, store=args.store,
                                 drop_page_cache=args.protocol == "cold", policy=policy)

    def workers():
        # Each worker gets every core, as it would on a machine of its own (here they share them).
        state["workers"] = LocalWorkers(2, ckpt, extra_args=("--slots-per-layer", str(E), "--store", "ram",
                                                              *(("--dtype", args.dtype) if args.dtype else ())),
                                        threads=psutil.cpu_count(logical=True) or 1)
        addresses = state["workers"].__enter__().addresses
        om = _moeshard(ckpt, args, slots_per_layer=1, prefetch=0, store="disk")
        keys = [(layer, e) for layer in range(spec.num_hidden_layers) for e in range(E)]
        placement = {ExpertKey(*key): (addresses[i % 2],) for i, key in enumerate(keys)}
        join_workers(om, ClusterConfig(ClusterSpec(tuple(addresses), placement)))
        return om

    def close_workers():
        if "workers" in state:
            state.pop("workers").__exit__(None, None, None)

    dtype = getattr(torch, args.dtype or spec.dtype)
    device = torch.device(args.device)

    def hf_eager():
        return MixtralForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()

    offload_dir = workdir / "accelerate-offload"

    def accelerate_offload():
        # The same budget on the primary device; what does not fit goes to host RAM (store=ram, GPU only) or
        # to the offload folder on disk.
        if device.type == "cuda":
            host = psutil.virtual_memory().available // 2 if args.store == "ram" else 0
            max_memory = {device.index or 0: budget_bytes, "cpu": host}
        else:
            max_memory = {"cpu": budget_bytes}
        return MixtralForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                  offload_folder=str(offload_dir)).eval()

    def runtime_stats(om):
        return om.stats().total

    return {
        "resident": _System("resident", resident, (), runtime_stats),
        "lru": _System("lru", offloaded(k, 0), ckpt_files, runtime_stats),
        "lru+prefetch": _System("lru+prefetch", offloaded(k, m), ckpt_files, runtime_stats),
        "naive": _System("naive", offloaded(spec.num_experts_per_tok, 0, "none"), ckpt_files, runtime_stats),
        "workers": _System("workers", workers, (), runtime_stats, close_workers),
        "hf-eager": _System("hf-eager", hf_eager),
        "accelerate-offload": _System("accelerate-offload", accelerate_offload, [offload_dir, ckpt]),
    }


def _run(system: _System, prompt, steps: int, cold: bool, warmup_steps: int) -> dict:
    from ..offload_core.model import OffloadedModel

    built = system.build()
    model = built.model if isinstance(built, OffloadedModel) else built  # transformers' model either way
    try:
        files = data_files(*[f for f in system.files if Path(f).is_dir()]) + [f for f in system.files if Path(f).is_file()]
        drop = (lambda: drop_page_cache(files)) if cold and files else None
        if warmup_steps:
            decode(model, prompt, warmup_steps)  # first-call overheads (allocations, lazy inits) are not timed
        before = system.stats(built) if system.stats else None
        io_before = psutil.Process().io_counters().read_bytes
        result = decode(model, prompt, steps, drop)
        result["disk_read_bytes"] = psutil.Process().io_counters().read_bytes - io_before
        if system.stats:
            result["counters"] = system.stats(built) - before
        return result
    finally:
        if built is not model:
            built.close()
        if system.close:
            system.close()
        del model, built
        gc.collect()


def _summarise(name: str, raw: dict, prompt_len: int, steps: int, bandwidth: float) -> dict:
    step_s = statistics.median(raw["step_s"])
    c = raw.get("counters")  # ExpertCounters of the timed steps (moeshard systems)
    per_token = c.bytes_loaded / steps if c and name in OFFLOADED else (
        raw["disk_read_bytes"] / steps if name in OFFLOADED else 0)
    return {
        "name": name,
        "decode_tok_s": 1.0 / step_s,
        "decode_s_per_token": step_s,
        "prefill_tok_s": prompt_len / raw["prefill_s"],
        "hit_rate": c.hit_rate if c else None,
        "prefetch_recall": c.prefetch_recall if c else None,
        "prefetch_precision": c.prefetch_precision if c else None,
        "bytes_per_token": per_token if name in OFFLOADED else None,
        "floor_s_per_token": per_token / bandwidth if name in OFFLOADED else None,
        "disk_read_bytes_per_token": raw["disk_read_bytes"] / steps,
        "tokens": raw["tokens"],
    }


def run_benchmark(args) -> dict:
    spec = BenchModelSpec(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                          dtype=args.model_dtype)
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "moeshard-bench")
    ckpt = make_bench_checkpoint(workdir / f"model-{spec.hidden_size}x{spec.num_hidden_layers}", spec)
    largest = max(data_files(ckpt), key=lambda p: p.stat().st_size)
    bandwidth = {"cold": read_bandwidth(largest, cold=True), "warm": read_bandwidth(largest, cold=False)}
    if torch.device(args.device).type == "cuda":
        bandwidth["h2d"] = h2d_bandwidth(torch.device(args.device))
    # The transfer floor: bytes moved per token over the bandwidth of the tier they come from.
    floor_bandwidth = bandwidth["h2d"] if args.store == "ram" and "h2d" in bandwidth else bandwidth[args.protocol]
    dense = sum(p.stat().st_size for p in data_files(ckpt)) - spec.total_expert_bytes()
    budget = dense + args.slots_per_layer * spec.num_hidden_layers * spec.expert_bytes()
    prompt = torch.randint(3, spec.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    systems = _systems(ckpt, args, spec, budget, workdir)
    runs, reference = [], None
    for name in args.systems:
        logger.info("running %s", name)
        raw = _run(systems[name], prompt, args.tokens, cold=args.protocol == "cold" and name in OFFLOADED,
                   warmup_steps=args.warmup)
        summary = _summarise(name, raw, args.prompt_tokens, args.tokens, floor_bandwidth)
        if name == "hf-eager":
            reference = summary["tokens"]
        runs.append(summary)
        print(f"{name:>20}: {summary['decode_tok_s']:8.2f} tok/s decode, {summary['prefill_tok_s']:8.1f} tok/s "
              f"prefill", flush=True)
    for run in runs:
        run["tokens_match_reference"] = None if reference is None else run.pop("tokens") == reference
        run.pop("tokens", None)
    return {
        "model": {**asdict(spec), "expert_bytes": spec.expert_bytes(), "total_expert_bytes": spec.total_expert_bytes(),
                  "dense_bytes": dense},
        "quantization": {"attn_bits": 16, "expert_bits": 16, "dtype": args.dtype or spec.dtype},
        "budget": {"slots_per_layer": args.slots_per_layer, "prefetch": args.prefetch, "bytes": budget},
        "protocol": {"name": args.protocol, "read_bandwidth_bytes_s": bandwidth,
                     "description": "page cache of offloaded files dropped (POSIX_FADV_DONTNEED) before each decode "
                                    "step" if args.protocol == "cold" else "page cache allowed"},
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.tokens,
        "machine": {"cpu_count": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "platform": platform.platform(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "targets": _targets(runs, spec.num_hidden_layers),
    }


def _targets(runs: list[dict], layers: int) -> dict:
    by = {r["name"]: r for r in runs}
    out = {}
    if "lru+prefetch" in by and "accelerate-offload" in by:
        out["lru+prefetch_vs_accelerate"] = by["lru+prefetch"]["decode_tok_s"] / by["accelerate-offload"]["decode_tok_s"]
    if "resident" in by and "hf-eager" in by:
        out["resident_vs_hf_eager"] = by["resident"]["decode_tok_s"] / by["hf-eager"]["decode_tok_s"]
    if "resident" in by:
        for name in ("lru", "lru+prefetch"):
            if name in by:
                bound = by[name]["floor_s_per_token"] + by["resident"]["decode_s_per_token"]
                out[f"{name}_vs_floor_plus_compute"] = by[name]["decode_s_per_token"] / bound
        if "workers" in by:
            extra = by["workers"]["decode_s_per_token"] - by["resident"]["decode_s_per_token"]
            out["workers_overhead"] = extra / by["resident"]["decode_s_per_token"]
            out["workers_overhead_ms_per_layer"] = 1e3 * extra / layers
    return out


def format_table(report: dict) -> str:
    head = f"{'system':>20} {'decode tok/s':>12} {'prefill tok/s':>13} {'hit rate':>8} {'recall':>6} {'MB/token':>8} " \
           f"{'floor s/tok':>11} {'same tokens':>11}"
    lines = [head]
    for r in report["runs"]:
        def f(v, spec):
            return "-" if v is None else format(v, spec)
        lines.append(f"{r['name']:>20} {r['decode_tok_s']:12.2f} {r['prefill_tok_s']:13.1f} {f(r['hit_rate'], '.3f'):>8} "
                     f"{f(r['prefetch_recall'], '.3f'):>6} {f(r['bytes_per_token'] and r['bytes_per_token'] / 1e6, '.1f'):>8} "
                     f"{f(r['floor_s_per_token'], '.3f'):>11} {str(r['tokens_match_reference']):>11}")
    lines.append("targets: " + ", ".join(f"{k} = {v:.2f}" for k, v in report["targets"].items()))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'moeshard[bench]')")
        return False
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["name"] for r in runs], [r["decode_tok_s"] for r in runs],
           color=["tab:blue" if r["name"] not in OFFLOADED else "tab:orange" for r in runs])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title(f"{report['protocol']['name']} protocol, budget {report['budget']['slots_per_layer']} slots/layer, "
                 f"{report['machine']['device']}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(args) -> int:
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown}: expected a subset of {list(SYSTEMS)}")
    report = run_benchmark(args)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0
