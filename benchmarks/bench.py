"""`moe-coordinator bench`: every system decodes the same prompt on the same checkpoint, in one run.

Systems: moeshard all resident, LRU, LRU + prefetch, naive (every active expert loaded every token), moeshard
with two local workers; transformers with everything in RAM, once per experts implementation (eager loop,
batched_mm, grouped_mm: the fastest is the one to beat); transformers + accelerate disk offloading at the same
memory budget. Method: every system is built and warmed up first (untimed decode steps), then timed in
`--repeats` rounds, interleaved (ABC, CBA, ABC, ...) so that drift of a shared machine falls on every system
alike; each system's figure is the median over rounds of its median step time, with the spread (min..max)
beside it, and every ratio is computed from medians. Offloaded systems run under the cold protocol (page cache
dropped before each decode step, see protocol.py). Each system's greedy tokens are checked against
transformers' in every round, so a fast wrong answer cannot win.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch

from ..offload_core.config import DEFAULT_POLICY, GLOBAL_POLICIES
from ..offload_core.counters import ExpertCounters
from .bench_model import BenchModelSpec, make_bench_checkpoint
from .cli import DEFAULT_SYSTEMS, HF_SYSTEMS, OFFLOADED, REAL_LAYERS, base_name, parse_system
from .protocol import (data_files, drop_page_cache, h2d_bandwidth, mapped_files, memory_bandwidth, own_memory,
                       read_bandwidth, write_bandwidth)

logger = logging.getLogger(__name__)


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


@dataclass
class _System:
    """One benchmarked system: how to build it, which files it reads while decoding, and what it measured."""

    name: str
    build: Callable
    files: list = field(default_factory=list)
    close: Callable | None = None
    processes: Callable | None = None  # -> {name: psutil.Process} of its worker processes (CPU time per token)
    activate: Callable | None = None  # called before each decode (systems that share one model switch it over)
    expert_bits: int | str | None = None  # moeshard: HQQ bits of experts (16 = none); llama.cpp: its GGUF type
    attn_bits: int | None = None
    built: object = None  # an OffloadedModel, transformers' model, or a LlamaCppModel
    rounds: list = field(default_factory=list)  # per round: {"step_s", "prefill_s", "counters", "disk_read_bytes"}
    empty_round_trip_ms: float | None = None  # worker systems: an empty message's round trip on the session
    resident_bytes: int | None = None  # resident moeshard systems: weight bytes read from memory per token
    quantize_s_per_layer: float | None = None  # when building it quantized the experts (the cache was new)
    slots_per_layer: int | None = None  # moeshard: the slots its budget bought
    misses_since_load: int | None = None  # budget sweep: every miss since it was built (warm-up included)
    policy: str | None = None  # budget sweep: the cache policy
    expert_memory: int | None = None  # budget sweep: the bytes of expert slots asked for
    rows: int | None = None  # budget sweep: the slots (rows of slab) those bytes bought, all layers together

    @property
    def base(self) -> str:
        return base_name(self.name)

    @property
    def model(self):
        return getattr(self.built, "model", None) if self.is_moeshard else self.built

    @property
    def is_moeshard(self) -> bool:
        from ..offload_core.model import OffloadedModel

        return isinstance(self.built, OffloadedModel)

    def decode(self, prompt, steps: int, before_step=None) -> dict:
        if self.base == "llama.cpp":
            return self.built.decode(prompt[0].tolist(), steps)
        return decode(self.model, prompt, steps, before_step)

    def shutdown(self) -> None:
        if self.is_moeshard or self.base == "llama.cpp":
            self.built.close()
        if self.close is not None:
            self.close()
        self.built = None
        gc.collect()


def _systems(names: list[str], ckpt: Path, args, spec: BenchModelSpec, budget_bytes: int,
             workdir: Path) -> list[_System]:
    from transformers import AutoModelForCausalLM

    from ..coordinator.cluster import ClusterConfig, join_workers
    from ..coordinator.local_workers import LocalWorkers
    from ..coordinator.placement import ClusterSpec
    from ..offload_core import OffloadConfig, QuantConfig, load_model
    from ..offload_core.experts import ExpertKey
    from ..offload_core.model import planned_format

    E, k, m = spec.num_local_experts, args.slots_per_layer, args.prefetch
    ckpt_files = data_files(ckpt)
    workers_state = {}
    dtype = getattr(torch, args.dtype or spec.dtype)
    device = torch.device(args.device)
    quant_cache = workdir / "quant-cache"

    def quant(e: int, a: int) -> QuantConfig:
        return QuantConfig(expert_bits=e, attn_bits=a)

    # The budget is bytes: k unquantized experts per layer; a quantized system gets the slots that fit in them.
    dense_slot = planned_format(ckpt, OffloadConfig(device=args.device, dtype=args.dtype)).compute_layout.nbytes

    def slots_for(e: int, a: int) -> int:
        if e == 16:
            return k
        fmt = planned_format(ckpt, OffloadConfig(device=args.device, dtype=args.dtype, quant=quant(e, a)))
        return max(1, min(E, k * dense_slot // fmt.compute_layout.nbytes))

    def moeshard(system: _System, **kw):
        e, a = system.expert_bits, system.attn_bits
        om = load_model(ckpt, device=args.device, dtype=args.dtype, quant=quant(e, a), cache_dir=quant_cache, **kw)
        cache = getattr(om.runtime.local.source, "cache", None)
        if cache is not None and cache.built_layers:
            system.quantize_s_per_layer = cache.build_s / len(cache.built_layers)
        system.slots_per_layer = kw.get("slots_per_layer")
        return om

    def resident(system: _System):
        def build():
            om = moeshard(system, slots_per_layer=E, prefetch=0, store="ram")
            om.runtime.local.warm()
            return om
        return build

    def offloaded(system: _System, prefetch: int, policy: str = "lru", slots: int | None = None):
        return lambda: moeshard(system, slots_per_layer=slots or slots_for(system.expert_bits, system.attn_bits),
                                prefetch=prefetch, store=args.store, drop_page_cache=args.protocol == "cold",
                                policy=policy)

    def workers(system: _System, count: int):
        def build():
            # Each worker gets every core, as it would on a machine of its own (here they share them).
            bits = ("--expert-bits", str(system.expert_bits)) if system.expert_bits != 16 else ()
            pool = workers_state[count] = LocalWorkers(count, ckpt, threads=psutil.cpu_count(logical=True) or 1,
                                                       extra_args=("--slots-per-layer", str(E), "--store", "ram",
                                                                   "--cache-dir", str(quant_cache), *bits,
                                                                   *(("--dtype", args.dtype) if args.dtype else ())))
            addresses = pool.__enter__().addresses
            om = moeshard(system, slots_per_layer=1, prefetch=0, store="disk")
            keys = [(layer, e) for layer in range(spec.num_hidden_layers) for e in range(E)]
            placement = {ExpertKey(*key): (addresses[i % count],) for i, key in enumerate(keys)}
            join_workers(om, ClusterConfig(ClusterSpec(tuple(addresses), placement)))
            return om
        return build

    def close_workers(count: int):
        return lambda: workers_state.pop(count).__exit__(None, None, None) if count in workers_state else None

    def worker_processes(count: int):
        return lambda: {f"worker{i}": psutil.Process(p.pid) for i, p in enumerate(workers_state[count].procs)}

    hf_shared = {}  # the transformers systems share one model (switched per round): one copy of the weights, not three

    def hf(implementation):
        def build():
            if "model" not in hf_shared:
                model = AutoModelForCausalLM.from_pretrained(
                    ckpt, dtype=dtype, experts_implementation=implementation).to(device).eval()
                own_memory(model)  # else its map of the checkpoint keeps the offloaded systems' reads warm
                hf_shared["model"] = model
            return hf_shared["model"]
        return build

    def hf_activate(implementation):
        return lambda: hf_shared["model"].set_experts_implementation(implementation)

    offload_dir = workdir / "accelerate-offload"

    def accelerate_offload():
        # The same budget on the primary device; what does not fit goes to host RAM (store=ram, GPU only) or
        # to the offload folder on disk.
        if device.type == "cuda":
            host = psutil.virtual_memory().available // 2 if args.store == "ram" else 0
            max_memory = {device.index or 0: budget_bytes, "cpu": host}
        else:
            max_memory = {"cpu": budget_bytes}
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                     offload_folder=str(offload_dir)).eval()
        own_memory(model)
        return model

    def llama_cpp(system: _System):
        def build():
            from .llamacpp import LlamaCppModel, quantize, write_gguf

            folder = workdir / "gguf"
            folder.mkdir(parents=True, exist_ok=True)
            source = write_gguf(ckpt, folder / f"{ckpt.name}-{spec.dtype}.gguf")
            kind = system.expert_bits
            native = {"bfloat16": "BF16", "float32": "F32"}.get(spec.dtype)
            path = source if kind == native else folder / f"{ckpt.name}-{kind}.gguf"
            if path != source:
                took = quantize(source, path, kind, threads=torch.get_num_threads())
                if took:  # None / 0: an existing file was reused
                    system.quantize_s_per_layer = took / spec.num_hidden_layers
            return LlamaCppModel(path, threads=torch.get_num_threads(), n_ctx=args.prompt_tokens + args.tokens + 16)
        return build

    out = []
    for name in names:
        base, e, a = parse_system(name, args.expert_bits, args.attn_bits)
        system = _System(name, None, expert_bits=e, attn_bits=a)
        if base == "resident":
            system.build = resident(system)
        elif base in ("lru", "lru+prefetch"):
            system.build, system.files = offloaded(system, m if base == "lru+prefetch" else 0), ckpt_files
        elif base == "naive":
            system.build = offloaded(system, 0, "none", slots=spec.num_experts_per_tok)
            system.files = ckpt_files
        elif base in ("worker", "workers"):
            count = 1 if base == "worker" else 2
            system.build, system.close = workers(system, count), close_workers(count)
            system.processes = worker_processes(count)
        elif base == "accelerate-offload":
            system.build, system.files = accelerate_offload, [offload_dir, ckpt]
        elif base == "llama.cpp":
            system.build = llama_cpp(system)
        else:
            implementation = HF_SYSTEMS[base]
            system.build, system.activate, system.close = hf(implementation), hf_activate(implementation), hf_shared.clear
        if system.expert_bits not in (None, 16) and base in OFFLOADED and system.files is ckpt_files:
            system.files = [quant_cache]  # quantized experts are read from the cache, not the checkpoint
        out.append(system)
    return out


def _cold_files(system: _System) -> list[Path]:
    return data_files(*[f for f in system.files if Path(f).is_dir()]) + [f for f in system.files if Path(f).is_file()]


def _cpu_s(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in procs.items():
        times = proc.cpu_times()
        out[name] = times.user + times.system
    return out


def _after_prefill(system: _System, then: Callable | None, out: list) -> Callable:
    """A before-step hook that takes the counters as the first decode step starts (into `out`), then calls `then`:
    the hooks run outside the timed part of each step."""
    calls = 0

    def hook():
        nonlocal calls
        calls += 1
        if calls == 2:  # the first call comes before the prefill, the second before the first decode step
            out.append(system.built.stats().total)
        if then is not None:
            then()
    return hook


def _round(system: _System, prompt, steps: int, cold: bool) -> dict:
    files = _cold_files(system)
    drop = (lambda: drop_page_cache(files)) if cold and files else None
    before = system.built.stats().total if system.is_moeshard else None
    after_prefill = []
    if system.is_moeshard:
        drop = _after_prefill(system, drop, after_prefill)
    procs = {"coordinator": psutil.Process(), **(system.processes() if system.processes else {})}
    if system.activate is not None:
        system.activate()
    io_before, cpu_before = psutil.Process().io_counters().read_bytes, _cpu_s(procs)
    result = system.decode(prompt, steps, drop)
    result["disk_read_bytes"] = psutil.Process().io_counters().read_bytes - io_before
    result["cpu_s"] = {name: t - cpu_before[name] for name, t in _cpu_s(procs).items()}
    result["counters"] = system.built.stats().total - before if system.is_moeshard else None
    result["decode_counters"] = system.built.stats().total - after_prefill[0] if after_prefill else None
    return result


def _empty_round_trip_ms(system: _System, calls: int = 300) -> float | None:
    """Median round trip of an empty message on the system's worker sessions (the floor under RunExperts)."""
    workers = getattr(getattr(getattr(system.built, "runtime", None), "plane", None), "workers", None)
    if not workers:  # no cluster joined
        return None
    times = []
    for backend in workers.values():
        session = backend.client.session()
        for _ in range(calls):
            start = time.perf_counter()
            session.ping().result(timeout=10)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _resident_bytes_per_token(system: _System, top_k: int) -> int | None:
    """Bytes a moeshard system with every expert resident reads from memory per decoded token (batch 1): its dense
    weights (packed attention too; not the embedding table, of which it reads one row) and top-k experts' slots
    per MoE layer."""
    if not system.is_moeshard or system.base != "resident":
        return None
    model, local = system.built.model, system.built.runtime.local
    embedding = model.get_input_embeddings().weight
    dense = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                if not t.is_meta and t is not embedding)
    return dense + top_k * local.slot_bytes * len(local.slots)


def _summarise(system: _System, prompt_len: int, steps: int, bandwidth: float, memory_bandwidth: float,
               layers: int, real_layers: int | None, top_k: int, agreement_to: list[int]) -> dict:
    name, rounds = system.name, system.rounds
    tok_s = [1.0 / statistics.median(r["step_s"]) for r in rounds]  # per round: its median step
    step_s = statistics.median(statistics.median(r["step_s"]) for r in rounds)
    counters = rounds[0]["counters"]
    for r in rounds[1:]:
        counters = counters + r["counters"] if counters is not None else None
    decoded = steps * len(rounds)
    offloaded = system.base in OFFLOADED
    per_token = (counters.bytes_loaded / decoded if counters is not None else
                 sum(r["disk_read_bytes"] for r in rounds) / decoded) if offloaded else None
    resident_bytes = system.resident_bytes
    agree = [sum(a == b for a, b in zip(r["tokens"], agreement_to)) / len(agreement_to) for r in rounds]
    return {
        "name": name,
        "expert_bits": system.expert_bits, "attn_bits": system.attn_bits, "slots_per_layer": system.slots_per_layer,
        "decode_tok_s": 1.0 / step_s,
        "decode_tok_s_spread": _spread(tok_s),
        "decode_s_per_token": step_s,
        "ms_per_layer": 1e3 * step_s / layers,
        "projected_tok_s": 1.0 / (step_s / layers * real_layers) if real_layers else None,
        "prefill_tok_s": prompt_len / statistics.median(r["prefill_s"] for r in rounds),
        "hit_rate": counters.hit_rate if counters is not None else None,
        "prefetch_recall": counters.prefetch_recall if counters is not None else None,
        "prefetch_precision": counters.prefetch_precision if counters is not None else None,
        "bytes_per_token": per_token,
        "floor_s_per_token": per_token / bandwidth if offloaded else None,
        "memory_bytes_per_token": resident_bytes,
        "memory_floor_s_per_token": resident_bytes / memory_bandwidth if resident_bytes else None,
        "disk_read_bytes_per_token": sum(r["disk_read_bytes"] for r in rounds) / decoded,
        "cpu_s_per_token": {proc: sum(r["cpu_s"][proc] for r in rounds) / decoded for proc in rounds[0]["cpu_s"]},
        "empty_round_trip_ms": system.empty_round_trip_ms,
        "quantize_s_per_layer": system.quantize_s_per_layer,
        "greedy_agreement": statistics.median(agree),
    }


def _workdir(args) -> Path:
    return Path(args.workdir or Path(tempfile.gettempdir()) / "moeshard-bench")


def bench_checkpoint(args) -> tuple[BenchModelSpec, Path, Path]:
    """The benchmark model's spec, checkpoint folder (written once) and work folder; sets the default budget."""
    spec = BenchModelSpec.of_kind(args.model_kind, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                  num_hidden_layers=args.layers, dtype=args.model_dtype)
    if args.slots_per_layer is None:  # the budget: half the experts (the paper's setting), a quarter of many
        args.slots_per_layer = spec.num_local_experts // (2 if spec.num_local_experts <= 8 else 4)
    workdir = _workdir(args)
    ckpt = make_bench_checkpoint(workdir / f"model-{spec.family}-{spec.hidden_size}x{spec.num_hidden_layers}"
                                           f"x{spec.num_local_experts}", spec)
    return spec, ckpt, workdir


def run_benchmark(args) -> dict:
    spec, ckpt, workdir = bench_checkpoint(args)
    largest = max(data_files(ckpt), key=lambda p: p.stat().st_size)
    bandwidth = {"cold": read_bandwidth(largest, cold=True), "warm": read_bandwidth(largest, cold=False),
                 "memory": memory_bandwidth()}
    if torch.device(args.device).type == "cuda":
        bandwidth["h2d"] = h2d_bandwidth(torch.device(args.device))
    # The transfer floor: bytes moved per token over the bandwidth of the tier they come from.
    floor_bandwidth = bandwidth["h2d"] if args.store == "ram" and "h2d" in bandwidth else bandwidth[args.protocol]
    dense = sum(p.stat().st_size for p in data_files(ckpt)) - spec.total_expert_bytes()
    budget = dense + args.slots_per_layer * spec.num_hidden_layers * spec.expert_bytes()
    prompt = torch.randint(3, spec.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    systems = _systems(args.systems, ckpt, args, spec, budget, workdir)
    try:
        for system in systems:  # build and warm up every system before any is timed
            logger.info("building %s", system.name)
            system.built = system.build()
            if system.activate is not None:
                system.activate()
            system.decode(prompt, args.warmup)
            system.resident_bytes = _resident_bytes_per_token(system, spec.num_experts_per_tok)
        gc.collect()
        if args.protocol == "cold":
            mapped = mapped_files(sorted({f for s in systems if s.base in OFFLOADED for f in _cold_files(s)}))
            if mapped:  # a mapped page cannot be dropped: every "cold" read of it would be warm
                raise RuntimeError(f"the cold protocol cannot hold: this process maps {len(mapped)} offloaded "
                                   f"file(s), e.g. {mapped[0]}")
        for r in range(args.repeats):
            order = systems if r % 2 == 0 else systems[::-1]
            for system in order:
                result = _round(system, prompt, args.tokens, cold=args.protocol == "cold" and system.base in OFFLOADED)
                system.rounds.append(result)
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(
                f"{s.name} {1 / statistics.median(s.rounds[-1]['step_s']):.2f}" for s in systems) + " tok/s", flush=True)
        for system in systems:
            system.empty_round_trip_ms = _empty_round_trip_ms(system)
    finally:
        for system in systems:
            if system.built is not None:
                system.shutdown()
    push = measure_push(ckpt, args, spec, workdir) if args.push else None
    hf = [s for s in systems if s.base in HF_SYSTEMS]
    reference = hf[0].rounds[0]["tokens"] if hf else _reference_tokens(ckpt, spec, args, prompt)
    real_layers = REAL_LAYERS.get(args.model_kind)
    runs = []
    for system in systems:
        summary = _summarise(system, args.prompt_tokens, args.tokens, floor_bandwidth, bandwidth["memory"],
                             spec.num_hidden_layers, real_layers, spec.num_experts_per_tok, reference)
        # Unquantized systems must give transformers' greedy tokens; quantized ones compute other weights (their
        # exactness against dequantize-then-multiply is tested), so only their agreement is reported.
        exact = system.expert_bits in (None, 16) and system.attn_bits in (None, 16) and system.base != "llama.cpp"
        summary["tokens_match_reference"] = all(r["tokens"] == reference for r in system.rounds) if exact else None
        runs.append(summary)
    return {
        "model": {**asdict(spec), "expert_bytes": spec.expert_bytes(), "total_expert_bytes": spec.total_expert_bytes(),
                  "dense_bytes": dense, "kind": args.model_kind, "real_layers": real_layers},
        "quantization": {"attn_bits": args.attn_bits, "expert_bits": args.expert_bits, "dtype": args.dtype or spec.dtype,
                         "per_system": {s.name: [s.expert_bits, s.attn_bits] for s in systems}},
        "budget": {"slots_per_layer": args.slots_per_layer, "prefetch": args.prefetch, "bytes": budget,
                   "note": "quantized systems get the slots that fit in the bytes of slots_per_layer unquantized "
                           "experts (runs[].slots_per_layer)"},
        "protocol": {"name": args.protocol, "read_bandwidth_bytes_s": bandwidth,
                     "description": "page cache of offloaded files dropped (POSIX_FADV_DONTNEED) before each decode "
                                    "step" if args.protocol == "cold" else "page cache allowed"},
        "method": {"repeats": args.repeats, "warmup_steps": args.warmup, "order": "interleaved, alternating direction",
                   "figure": "median over rounds of each round's median step time; spread = min..max over rounds"},
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.tokens,
        "machine": _machine(args),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "skipped": getattr(args, "skipped", {}),
        "push": push,
        "targets": _targets(runs, spec.num_hidden_layers, push),
    }


def _machine(args) -> dict:
    return {"cpu_count": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(), "processor": _processor(), "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _reference_tokens(ckpt: Path, spec: BenchModelSpec, args, prompt) -> list[int]:
    """transformers' greedy tokens, when no transformers system was among those benchmarked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, args.dtype or spec.dtype)).eval()
    tokens = decode(model, prompt, args.tokens)["tokens"]
    del model
    gc.collect()
    return tokens


def measure_push(ckpt: Path, args, spec: BenchModelSpec, workdir: Path) -> dict:
    """Every expert of the model pushed to one empty worker, beside a plain gRPC byte stream of the same size to a
    sink process (plain, push, plain: the plain figure is their mean), then a second coordinator start against the
    same worker, which must send nothing. `push_s` is the transfer (PushExperts), `join_s` the whole join around it
    (the empty worker builds the model's skeleton from the description first). The disk is in the push and not in
    the plain stream: `disk_write_bytes_s` is a sequential write of the same size with fsync, on the worker's disk."""
    import shutil
    import subprocess
    import sys

    from ..coordinator.cluster import ClusterConfig, join_workers
    from ..coordinator.local_workers import LocalWorkers
    from ..coordinator.placement import ClusterSpec
    from ..offload_core import load_model
    from .grpc_sink import send

    cache = workdir / "push-cache"
    shutil.rmtree(cache, ignore_errors=True)
    sink = subprocess.Popen([sys.executable, "-c", "import sys; del sys.path[0]; import asyncio; "
                             "from moeshard.benchmarks.grpc_sink import _serve; asyncio.run(_serve())"],
                            stdout=subprocess.PIPE, text=True)
    try:
        sink_address = f"127.0.0.1:{sink.stdout.readline().strip()}"
        memory = str(2 * spec.total_expert_bytes() + (1 << 30))
        with LocalWorkers(1, None, cache_dirs=[cache], extra_args=("--store", "disk", "--memory", memory)) as pool:
            spec_ = ClusterSpec(tuple(pool.addresses), local_share=0.0)
            om = load_model(ckpt, device=args.device, dtype=args.dtype, slots_per_layer=1, prefetch=0, store="disk")
            try:
                total = om.runtime.local.format.layout.nbytes * len(om.layout.sparse_layers) * om.layout.num_experts
                plain = []
                start = time.perf_counter()
                assert send(sink_address, total) == total
                plain.append(time.perf_counter() - start)
                start = time.perf_counter()
                cluster = join_workers(om, ClusterConfig(spec_))
                join_s = time.perf_counter() - start
                pushed = sum(d["pushed_bytes"] for d in cluster.describe().values())
                push_s = sum(d["push_s"] for d in cluster.describe().values())
                start = time.perf_counter()
                send(sink_address, total)
                plain.append(time.perf_counter() - start)
            finally:
                om.close()
            om = load_model(ckpt, device=args.device, dtype=args.dtype, slots_per_layer=1, prefetch=0, store="disk")
            try:
                start = time.perf_counter()
                again = join_workers(om, ClusterConfig(spec_))
                warm_s = time.perf_counter() - start
                warm_bytes = sum(d["pushed_bytes"] for d in again.describe().values())
            finally:
                om.close()
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(cache, ignore_errors=True)
    plain_s = statistics.mean(plain)
    workdir.mkdir(parents=True, exist_ok=True)
    disk_write = write_bandwidth(workdir)
    return {"disk_write_bytes_s": disk_write, "push_vs_disk_write": (pushed / push_s) / disk_write,"bytes": pushed, "push_s": push_s, "join_s": join_s, "push_bytes_s": pushed / push_s, "plain_s": plain_s,
            "plain_bytes_s": total / plain_s, "push_vs_plain": (pushed / push_s) / (total / plain_s),
            "warm_restart_bytes": warm_bytes, "warm_restart_s": warm_s}


def _targets(runs: list[dict], layers: int, push: dict | None = None) -> dict:
    by = {r["name"]: r for r in runs}
    out = {}
    hf = [by[n] for n in HF_SYSTEMS if n in by]
    fastest = max(hf, key=lambda r: r["decode_tok_s"]) if hf else None
    if fastest is not None:
        out["fastest_transformers"] = fastest["name"]
    if "lru+prefetch" in by and "accelerate-offload" in by:
        out["lru+prefetch_vs_accelerate"] = by["lru+prefetch"]["decode_tok_s"] / by["accelerate-offload"]["decode_tok_s"]
    if "resident" in by and fastest is not None:
        out["resident_vs_fastest_transformers"] = by["resident"]["decode_tok_s"] / fastest["decode_tok_s"]
    if "resident" in by:
        for name in ("lru", "lru+prefetch"):
            if name in by:
                bound = by[name]["floor_s_per_token"] + by["resident"]["decode_s_per_token"]
                out[f"{name}_vs_floor_plus_compute"] = by[name]["decode_s_per_token"] / bound
        for name in ("worker", "workers"):
            if name in by:
                extra = by[name]["decode_s_per_token"] - by["resident"]["decode_s_per_token"]
                out[f"{name}_overhead"] = extra / by["resident"]["decode_s_per_token"]
                out[f"{name}_overhead_ms_per_layer"] = 1e3 * extra / layers
                out[f"{name}_empty_round_trip_ms"] = by[name]["empty_round_trip_ms"]
    out.update(_quantized_targets(runs))
    if push is not None:
        out["push_vs_plain_stream"] = push["push_vs_plain"]
        out["push_vs_disk_write"] = push["push_vs_disk_write"]
        out["warm_restart_bytes"] = push["warm_restart_bytes"]
    return out


def _quantized_targets(runs: list[dict]) -> dict:
    """Issue 20's ratios, for whichever of their systems ran: quantized against unquantized moeshard, the bit
    widths against each other, offloaded at equal bytes, and against llama.cpp on the same weights."""
    def find(base: str, e, a=None) -> dict | None:
        return next((r for r in runs if base_name(r["name"]) == base and r["expert_bits"] == e
                     and (a is None or r["attn_bits"] == a)), None)

    def ratio(name: str, a: dict | None, b: dict | None) -> None:
        if a is not None and b is not None:
            out[name] = a["decode_tok_s"] / b["decode_tok_s"]

    out: dict = {}
    bf16, q4, q4a4 = find("resident", 16, 16), find("resident", 4, 16), find("resident", 4, 4)
    ratio("resident_e4_vs_bf16", q4, bf16)
    ratio("resident_e4a4_vs_bf16", q4a4, bf16)
    ratio("resident_e3a4_vs_e4a4", find("resident", 3, 4), q4a4)
    ratio("resident_e2a4_vs_e4a4", find("resident", 2, 4), q4a4)
    ratio("lru+prefetch_e4_vs_bf16_same_bytes", find("lru+prefetch", 4), find("lru+prefetch", 16, 16))
    best4 = q4a4 or q4
    ratio("resident_e4_vs_llama.cpp_q4_0", best4, find("llama.cpp", "Q4_0"))
    ratio("resident_bf16_vs_llama.cpp_bf16", bf16, find("llama.cpp", "BF16"))
    if best4 is not None and best4["memory_floor_s_per_token"]:
        out["resident_e4_memory_floor_share"] = best4["memory_floor_s_per_token"] / best4["decode_s_per_token"]
    return out


def format_table(report: dict) -> str:
    project = report["model"].get("real_layers")
    head = (f"{'system':>20} {'bits e/a':>8} {'decode tok/s':>12} {'spread':>13} {'ms/layer':>8} "
            + (f"{f'tok/s@{project}L':>10} " if project else "")
            + f"{'mem floor':>9} {'prefill tok/s':>13} {'hit rate':>8} {'recall':>6} {'MB/token':>8} "
              f"{'floor s/tok':>11} {'same tokens':>11} {'agree':>5}")
    lines = [head]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in report["runs"]:
        s = r["decode_tok_s_spread"]
        bits = "-" if r["expert_bits"] is None else (f"{r['expert_bits']}" if r["attn_bits"] is None
                                                      else f"{r['expert_bits']}/{r['attn_bits']}")
        floor = r["memory_floor_s_per_token"] and r["memory_floor_s_per_token"] * 1e3
        lines.append(f"{r['name']:>20} {bits:>8} {r['decode_tok_s']:12.2f} {s['min']:6.2f}-{s['max']:<6.2f} "
                     f"{r['ms_per_layer']:8.2f} " + (f"{f(r['projected_tok_s'], '.2f'):>10} " if project else "")
                     + f"{f(floor, '.2f'):>6} ms {r['prefill_tok_s']:13.1f} {f(r['hit_rate'], '.3f'):>8} "
                     f"{f(r['prefetch_recall'], '.3f'):>6} "
                     f"{f(r['bytes_per_token'] and r['bytes_per_token'] / 1e6, '.1f'):>8} "
                     f"{f(r['floor_s_per_token'], '.3f'):>11} {f(r['tokens_match_reference'], ''):>11} "
                     f"{r['greedy_agreement']:5.2f}")
    quantized = [r for r in report["runs"] if r["quantize_s_per_layer"]]
    if quantized:
        lines.append("quantized while building (s per layer): " + ", ".join(
            f"{r['name']} {r['quantize_s_per_layer']:.1f}" for r in quantized))
    for name, why in report.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    lines.append("targets: " + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}"
                                         for k, v in report["targets"].items()))
    lines.append("mem floor: weight bytes read per token / memory read bandwidth (resident systems); "
                 "agree: share of greedy tokens equal to transformers'")
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
    medians = [r["decode_tok_s"] for r in runs]
    errors = [[m - r["decode_tok_s_spread"]["min"] for m, r in zip(medians, runs)],
              [r["decode_tok_s_spread"]["max"] - m for m, r in zip(medians, runs)]]
    ax.bar([r["name"] for r in runs], medians, yerr=errors, capsize=3,
           color=["tab:blue" if base_name(r["name"]) not in OFFLOADED else "tab:orange" for r in runs])
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (median, min..max)")
    ax.set_title(f"{report['model']['kind']}: {report['protocol']['name']} protocol, budget "
                 f"{report['budget']['slots_per_layer']} slots/layer, {report['machine']['device']}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- the budget sweep: what memory buys, per cache policy ----------------------------------------------------------

SWEEP_VERDICT_AT = 0.25  # the budget the issue's targets are read at: a quarter of the experts' bytes
SWEEP_TARGETS = {"hit_rate_gain": 0.05, "speed_ratio": 1.3}  # the default policy against per-layer lru, at that budget


def _sweep_summary(system: _System, fraction: float, steps: int, prompt_len: int, layers: int,
                   reference: list[int]) -> dict:
    rounds = system.rounds
    tok_s = [1.0 / statistics.median(r["step_s"]) for r in rounds]
    step_s = statistics.median(statistics.median(r["step_s"]) for r in rounds)
    decode = ExpertCounters.total(r["decode_counters"] for r in rounds)
    whole = ExpertCounters.total(r["counters"] for r in rounds)
    per_round = [r["decode_counters"].hit_rate for r in rounds if r["decode_counters"].hit_rate is not None]
    decoded = steps * len(rounds)
    return {
        "name": system.name, "policy": system.policy, "fraction": fraction, "expert_memory": system.expert_memory,
        "rows": system.rows,
        "slots_per_layer": None if system.policy in GLOBAL_POLICIES else system.rows // layers,
        "expert_bits": system.expert_bits, "attn_bits": system.attn_bits,
        "decode_tok_s": 1.0 / step_s, "decode_tok_s_spread": _spread(tok_s), "decode_s_per_token": step_s,
        "prefill_tok_s": prompt_len / statistics.median(r["prefill_s"] for r in rounds),
        # decode steps only (the prefill's burst of experts is in the *_with_prefill figures)
        "hit_rate": decode.hit_rate, "hit_rate_spread": _spread(per_round) if per_round else None,
        "hits": decode.hits, "misses": decode.misses, "prefetch_used": decode.prefetch_used,
        # needed experts the cache had kept from an earlier use (hits that a prefetch did not bring): the policy's part
        "kept_rate": (decode.hits - decode.prefetch_used) / (decode.hits + decode.misses)
        if decode.hits + decode.misses else None,
        "prefetch_recall": decode.prefetch_recall, "prefetch_precision": decode.prefetch_precision,
        "bytes_per_token": decode.bytes_loaded / decoded,
        "hit_rate_with_prefill": whole.hit_rate, "misses_with_prefill": whole.misses,
        "misses_since_load": system.misses_since_load,
        "disk_read_bytes_per_token": sum(r["disk_read_bytes"] for r in rounds) / decoded,
        "tokens_match_reference": all(r["tokens"] == reference for r in rounds),
    }


def _sweep_verdict(runs: list[dict], default_policy: str) -> dict:
    """At the 25% budget: each policy's hit rate minus per-layer lru's and its speed over lru's, and the issue's two
    targets for the default policy."""
    at = {r["policy"]: r for r in runs if abs(r["fraction"] - SWEEP_VERDICT_AT) < 1e-9}
    if not at:
        return {"fraction": SWEEP_VERDICT_AT, "note": f"no {SWEEP_VERDICT_AT:.0%} budget in this sweep"}
    if "lru" not in at:
        return {"fraction": SWEEP_VERDICT_AT,
                "note": "per-layer lru was not among the policies: nothing to compare with"}
    lru = at["lru"]
    policies = {}
    for name, r in at.items():
        gain = (r["hit_rate"] - lru["hit_rate"]) if r["hit_rate"] is not None and lru["hit_rate"] is not None else None
        kept = r.get("kept_rate"), lru.get("kept_rate")
        policies[name] = {"hit_rate": r["hit_rate"], "hit_rate_minus_lru": gain, "decode_tok_s": r["decode_tok_s"],
                          "speed_vs_lru": r["decode_tok_s"] / lru["decode_tok_s"],
                          "kept_minus_lru": kept[0] - kept[1] if None not in kept else None,
                          "bytes_vs_lru": (r["bytes_per_token"] / lru["bytes_per_token"]
                                           if lru["bytes_per_token"] else None)}
    out = {"fraction": SWEEP_VERDICT_AT, "expert_memory": lru["expert_memory"], "against": "lru",
           "policies": policies, "default_policy": default_policy, "targets": dict(SWEEP_TARGETS)}
    if default_policy in policies:
        d = policies[default_policy]
        out["default_hit_rate_gain_met"] = d["hit_rate_minus_lru"] is not None and \
            d["hit_rate_minus_lru"] >= SWEEP_TARGETS["hit_rate_gain"]
        out["default_speed_ratio_met"] = d["speed_vs_lru"] >= SWEEP_TARGETS["speed_ratio"]
    return out


def run_budget_sweep(args) -> dict:
    """Decode at each budget (a fraction of all experts' bytes, in their compute form) with each policy. Within a
    budget the policies are built, warmed up and timed in interleaved rounds as `run_benchmark` times systems; then
    they are closed before the next budget is built (so memory holds one budget's caches at a time)."""
    from ..offload_core import OffloadConfig, QuantConfig, load_model
    from ..offload_core.model import planned_format

    spec, ckpt, workdir = bench_checkpoint(args)
    layers, experts = spec.num_hidden_layers, spec.num_local_experts
    quant = QuantConfig(expert_bits=args.expert_bits, attn_bits=args.attn_bits)
    slot_bytes = planned_format(ckpt, OffloadConfig(device=args.device, dtype=args.dtype, quant=quant)) \
        .compute_layout.nbytes
    total = slot_bytes * layers * experts  # every expert resident, in the form it is computed in
    quant_cache = workdir / "quant-cache"
    files = [quant_cache] if quant.experts_quantized else data_files(ckpt)
    cold = args.protocol == "cold"
    prompt = torch.randint(3, spec.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))

    def build(system: _System):
        def go():
            return load_model(ckpt, expert_memory=system.expert_memory, policy=system.policy, prefetch=args.prefetch,
                              store=args.store, drop_page_cache=cold, device=args.device, dtype=args.dtype,
                              quant=quant, cache_dir=quant_cache)
        return go

    runs, reference, load = [], None, {}
    for fraction in args.budget_sweep:
        memory = round(fraction * total)
        load[fraction] = _load_average()  # other work on the machine slows every policy of a budget alike
        systems = []
        for policy in args.policies:
            system = _System(f"{policy} {fraction:.0%}", None, files=files, expert_bits=args.expert_bits,
                             attn_bits=args.attn_bits, policy=policy, expert_memory=memory)
            system.build = build(system)
            systems.append(system)
        need = memory * len(systems)  # at most: each policy's slots fit in the budget (checked once built)
        available = psutil.virtual_memory().available
        if need > 0.8 * available:
            raise RuntimeError(f"the {fraction:.0%} budget's {len(systems)} caches need {need / 2**30:.1f} GiB and "
                               f"{available / 2**30:.1f} GiB is available: sweep fewer policies or lower budgets")
        try:
            for system in systems:
                logger.info("building %s", system.name)
                system.built = system.build()
                system.rows = system.built.runtime.local.rows
                if system.rows * slot_bytes > memory:
                    raise RuntimeError(f"{system.name}: {system.rows} slots of {slot_bytes} bytes exceed the budget "
                                       f"of {memory} bytes: load_model did not size the slots from expert_memory")
                system.decode(prompt, args.warmup)
            gc.collect()
            if cold:
                mapped = mapped_files(_cold_files(systems[0]))
                if mapped:
                    raise RuntimeError(f"the cold protocol cannot hold: this process maps {len(mapped)} offloaded "
                                       f"file(s), e.g. {mapped[0]}")
            for r in range(args.repeats):
                for system in systems if r % 2 == 0 else systems[::-1]:
                    system.rounds.append(_round(system, prompt, args.tokens, cold=cold))
                print(f"budget {fraction:.0%} ({memory / 2**20:.1f} MiB), round {r + 1}/{args.repeats}: " + ", ".join(
                    f"{s.policy} {1 / statistics.median(s.rounds[-1]['step_s']):.2f} tok/s "
                    f"hit {s.rounds[-1]['decode_counters'].hit_rate or 0:.3f}" for s in systems), flush=True)
            for system in systems:
                system.misses_since_load = system.built.stats().total.misses
        finally:
            for system in systems:
                if system.built is not None:
                    system.shutdown()
        if reference is None:  # every policy computes the same experts: the cache must not change the tokens
            reference = systems[0].rounds[0]["tokens"]
        runs += [_sweep_summary(s, fraction, args.tokens, args.prompt_tokens, layers, reference) for s in systems]
    return {
        "kind": "budget-sweep",
        "model": {**asdict(spec), "kind": args.model_kind, "expert_bytes": slot_bytes, "experts": layers * experts,
                  "total_expert_bytes": total},
        "quantization": {"expert_bits": args.expert_bits, "attn_bits": args.attn_bits,
                         "dtype": args.dtype or spec.dtype},
        "budgets": [{"fraction": f, "expert_memory": round(f * total), "load_average_at_start": load[f]}
                    for f in args.budget_sweep],
        "load_average_at_end": _load_average(),
        "budget_note": "expert_memory = fraction x bytes of every expert in its compute form; per-layer policies "
                       "(lru, router) split it evenly over the layers, global ones share it",
        "policies": list(args.policies), "prefetch": args.prefetch, "store": args.store,
        "protocol": {"name": args.protocol, "description": "page cache of offloaded files dropped before each decode "
                                                           "step" if cold else "page cache allowed"},
        "method": {"repeats": args.repeats, "warmup_steps": args.warmup, "decode_tokens": args.tokens,
                   "prompt_tokens": args.prompt_tokens,
                   "order": "per budget: every policy built and warmed up, then interleaved rounds (alternating "
                            "direction); budgets one after the other",
                   "figure": "median over rounds of each round's median step time; spread = min..max over rounds; "
                             "hit rate over the timed decode steps (prefill excluded)"},
        "machine": _machine(args),
        "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
        "verdict": _sweep_verdict(runs, DEFAULT_POLICY),
    }


def _load_average() -> float | None:
    """The machine's 1-minute load average (runnable processes), where the system reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _memory_unit(total: int) -> tuple[str, int]:
    return ("GiB", 2**30) if total >= 2**30 else ("MiB", 2**20)


def format_sweep(report: dict) -> str:
    m = report["model"]
    unit, scale = _memory_unit(m["total_expert_bytes"])
    lines = [f"budget sweep: {m['kind']}, {m['experts']} experts of {m['expert_bytes'] / 2**20:.2f} MiB "
             f"({m['total_expert_bytes'] / scale:.2f} {unit} in all), prefetch {report['prefetch']}, "
             f"{report['protocol']['name']} protocol, store {report['store']}, {report['method']['repeats']} rounds of "
             f"{report['method']['decode_tokens']} tokens",
             f"{'budget':>6} {unit:>7} {'policy':>12} {'slots':>10} {'decode tok/s':>12} {'spread':>13} "
             f"{'hit rate':>8} {'spread':>11} {'kept':>5} {'MB/token':>8} {'same tokens':>11}"]
    for r in report["runs"]:
        s, h = r["decode_tok_s_spread"], r["hit_rate_spread"]
        slots = f"{r['slots_per_layer']}/layer" if r["slots_per_layer"] is not None else f"{r['rows']} shared"
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        hs = "-" if h is None else f"{h['min']:.3f}-{h['max']:.3f}"
        lines.append(f"{r['fraction']:6.0%} {r['expert_memory'] / scale:7.2f} {r['policy']:>12} {slots:>10} "
                     f"{r['decode_tok_s']:12.2f} {s['min']:6.2f}-{s['max']:<6.2f} {hit:>8} {hs:>11} "
                     f"{'-' if r['kept_rate'] is None else format(r['kept_rate'], '.3f'):>5} "
                     f"{r['bytes_per_token'] / 1e6:8.1f} {str(r['tokens_match_reference']):>11}")
    lines.append("hit rate: needed experts resident or loading when a decode step asked (prefill excluded); kept: "
                 "those the cache had kept from an earlier use (not brought by a prefetch); MB/token: expert bytes "
                 "loaded per decoded token")
    loads = [b["load_average_at_start"] for b in report["budgets"]] + [report["load_average_at_end"]]
    if None not in loads:
        lines.append(f"load average (1 min) at each budget's start, then at the end: "
                     f"{', '.join(f'{x:.1f}' for x in loads)} ({report['machine']['cpu_count']} CPUs)")
    v = report["verdict"]
    if "note" in v:
        lines.append(f"verdict: {v['note']}")
        return "\n".join(lines)
    lines.append(f"at the {v['fraction']:.0%} budget ({v['expert_memory'] / scale:.2f} {unit}), against per-layer lru "
                 f"(default policy: {v['default_policy']}):")
    t = v["targets"]
    for name, d in v["policies"].items():
        if name == "lru":
            continue
        gain = d["hit_rate_minus_lru"]
        lines.append(f"  {name}{' (the default)' if name == v['default_policy'] else ''}: hit rate "
                     + ("-" if gain is None else f"{d['hit_rate']:.3f}, {gain:+.3f} vs lru (target >= "
                        f"+{t['hit_rate_gain']:.2f}: {'met' if gain >= t['hit_rate_gain'] else 'not met'})")
                     + f"; decode {d['speed_vs_lru']:.2f}x lru's (target >= {t['speed_ratio']:.1f}x: "
                       f"{'met' if d['speed_vs_lru'] >= t['speed_ratio'] else 'not met'})"
                     + (f"; kept {d['kept_minus_lru']:+.3f}" if d["kept_minus_lru"] is not None else "")
                     + (f", bytes loaded {d['bytes_vs_lru']:.2f}x lru's" if d["bytes_vs_lru"] is not None else ""))
    if v["default_policy"] == "lru":
        lines.append("  the default policy (offload_core/config.py DEFAULT_POLICY) is per-layer lru itself: the "
                     "targets are read for the policies above")
    elif v["default_policy"] not in v["policies"]:
        lines.append(f"  the default policy ({v['default_policy']}) was not swept")
    return "\n".join(lines)


def plot_sweep(report: dict, path: Path) -> bool:
    """Two panels against expert memory (bottom axis in MiB or GiB, top in % of every expert): decode tokens/s
    (median, min..max) and hit rate, one line per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install 'moeshard[bench]'); the table and JSON are",
              flush=True)
        return False
    total = report["model"]["total_expert_bytes"]
    unit, scale = _memory_unit(total)
    fig, (speed, hits) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in report["policies"]:
        runs = [r for r in report["runs"] if r["policy"] == policy]
        x = [r["expert_memory"] / scale for r in runs]
        y = [r["decode_tok_s"] for r in runs]
        err = [[v - r["decode_tok_s_spread"]["min"] for v, r in zip(y, runs)],
               [r["decode_tok_s_spread"]["max"] - v for v, r in zip(y, runs)]]
        speed.errorbar(x, y, yerr=err, marker="o", capsize=3, label=policy)
        hits.plot(x, [r["hit_rate"] for r in runs], marker="o", label=policy)
    for ax, label in ((speed, "decode tokens/s (median, min..max)"), (hits, "expert-cache hit rate (decode)")):
        ax.set_xlabel(f"expert memory ({unit})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_xlim(0, total / scale * 1.05)
        top = ax.secondary_xaxis("top", functions=(lambda v: 100 * v * scale / total,
                                                   lambda p: p * total / scale / 100))
        top.set_xlabel("% of every expert's bytes")
        ax.legend()
    hits.set_ylim(0, 1.02)
    m = report["model"]
    q = report["quantization"]
    bits = f"{q['dtype']}" + (f", experts {q['expert_bits']}-bit" if q["expert_bits"] != 16 else "")
    fig.suptitle(f"{m['kind']} ({bits}): {report['protocol']['name']} protocol, prefetch {report['prefetch']}, "
                 f"{report['machine']['device']}, {report['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _main_sweep(args) -> int:
    from .cli import SWEEP_POLICIES

    given = [flag for flag, value in (("--systems", args.systems), ("--concurrency", args.concurrency),
                                      ("--slots-per-layer", args.slots_per_layer), ("--push", args.push or None),
                                      ("--shared-prefix", getattr(args, "shared_prefix", None))) if value is not None]
    if given:
        raise ValueError(f"--budget-sweep sets the memory itself and compares cache policies (--policies): it does "
                         f"not take {', '.join(given)}")
    args.policies = args.policies or SWEEP_POLICIES
    report = run_budget_sweep(args)
    stem = f"budget-sweep-{args.model_kind}"
    json_path = args.json or _workdir(args) / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(format_sweep(report))
    print(f"wrote {json_path}", flush=True)
    png = args.plot or _workdir(args) / f"{stem}.png"
    if plot_sweep(report, png):
        print(f"wrote {png}", flush=True)
    return 0


def main(args) -> int:
    if getattr(args, "budget_sweep", None) is not None:
        return _main_sweep(args)
    if getattr(args, "policies", None) is not None:
        raise ValueError("--policies chooses the policies of a budget sweep: give --budget-sweep too")
    explicit = args.systems is not None
    args.systems = [s.strip() for s in (args.systems or ",".join(DEFAULT_SYSTEMS)).split(",") if s.strip()]
    for name in args.systems:
        parse_system(name)  # a clear error for an unknown system or bad bits, before anything loads
    if len(set(args.systems)) != len(args.systems):
        raise ValueError("--systems lists a system twice: rounds already repeat each system (--repeats)")
    if getattr(args, "shared_prefix", None) and args.concurrency is None:
        raise ValueError("--shared-prefix is a scenario of the concurrency bench: give --concurrency too (for example "
                         "--concurrency 1,4 --shared-prefix 512)")
    args.skipped = {}
    if any(base_name(s) == "llama.cpp" for s in args.systems):
        from .llamacpp import missing

        reason = missing()
        if reason is not None:
            args.skipped = {s: reason for s in args.systems if base_name(s) == "llama.cpp"}
            args.systems = [s for s in args.systems if s not in args.skipped]
            print(f"skipping {', '.join(args.skipped)}: {reason}", flush=True)
    if args.concurrency is not None:
        from .concurrency import format_concurrency, parse_levels, run_concurrency

        levels = parse_levels(args.concurrency)
        spec, ckpt, _ = bench_checkpoint(args)
        if not explicit:
            args.systems = ["resident", "lru+prefetch"]
        report = run_concurrency(args, ckpt, spec, args.slots_per_layer, levels)
        report.update(model={**asdict(spec), "kind": args.model_kind}, date=time.strftime("%Y-%m-%d"),
                      machine={"cpu_count": psutil.cpu_count(), "platform": platform.platform(), "device": args.device,
                               "torch_threads": torch.get_num_threads()})
        print(format_concurrency(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    report = run_benchmark(args)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, args.plot)
    return 0
