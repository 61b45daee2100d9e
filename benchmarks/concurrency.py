"""`moe-coordinator bench --concurrency 1,4,8,16`: `serve` under N concurrent streams, through the HTTP API with
the official openai client, on the benchmark model.

Each system (moeshard all resident; LRU + prefetch at the benchmark's memory budget) runs as a real `serve`
(uvicorn, continuous batching with --max-batch = the largest level) in this process; the streams are chat
completions streamed by `openai.OpenAI` from threads, each with its own prompt, greedy, `--tokens` new tokens.
Method as the main benchmark: every system warmed up first, then `--repeats` rounds, in each round every level
on every system, the systems' order alternating; figures are medians over rounds with min..max. Per level:
aggregate tokens/s (all streams' tokens over the wall time from the first request to the last token, prefill
included), time to first token p50/p95 (to the first chunk, which the server sends when the first token
exists), per-stream decode tokens/s, and from the server's own metrics for the same interval: steps, mean
batch size, expert bytes moved per step and per token, the cache hit rate and the fraction of a layer's experts
that a step needs (what bounds batching's gain when experts are offloaded).
"""
from __future__ import annotations

import logging
import shutil
import socket
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

CONCURRENT_SYSTEMS = ("resident", "lru", "lru+prefetch")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: expected comma-separated whole numbers like 1,4,8,16, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency: expected numbers >= 1, got {text!r}")
    return sorted(set(levels))


def _with_tokenizer(ckpt: Path, vocab_size: int) -> Path:
    """The benchmark checkpoint has no tokenizer: the demo model's (the same 4,096-token vocabulary) is copied in,
    so that the HTTP API can take text."""
    from ..offload_core.demo import demo_model_path

    demo = demo_model_path()
    if vocab_size != 4096:
        raise ValueError(f"--concurrency needs the benchmark model's default vocabulary (4096, the demo tokenizer's), "
                         f"got {vocab_size}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (ckpt / name).is_file():
            shutil.copy(demo / name, ckpt / name)
    return ckpt


class _Served:
    """One system behind a real `serve` on a loopback port."""

    def __init__(self, name: str, engine, max_batch: int):
        from ..coordinator.batching import BatchConfig
        from ..coordinator.http_security import ServeConfig
        from ..coordinator.server import build_server

        self.name, self.engine = name, engine
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        batch = BatchConfig(max_batch=max_batch, max_queue=max_batch, step_tokens=max(256, max_batch))
        self.server = build_server(engine, ServeConfig(port=self.port, max_connections=4 * max_batch + 8),
                                   log_level="warning", batch=batch)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the {name} server did not start")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"
        self.runs: dict[int, list[dict]] = {}

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.base}/metrics", timeout=60) as reply:
            text = reply.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.labels:
                    out[s.name] = s.value
        return out

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.engine.close()


def _stream(client, model: str, prompt: str, tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    usage = 0
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        now = time.perf_counter()
        if first is None and chunk.choices:
            first = now
        if chunk.choices and chunk.choices[0].delta.content:
            last = now
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    last = last or first
    return {"start": start, "first": first, "last": last, "tokens": usage}


def _level(served: _Served, prompts: list[str], concurrency: int, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=600)
    before = served.metrics()
    with ThreadPoolExecutor(concurrency) as pool:
        streams = list(pool.map(lambda i: _stream(client, served.engine.name, prompts[i % len(prompts)], tokens),
                                range(concurrency)))
    after = served.metrics()
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    wall = max(s["last"] for s in streams) - min(s["start"] for s in streams)
    total = sum(s["tokens"] for s in streams)
    steps = d.get("moeshard_batch_size_count", 0.0)
    lookups = d.get("moeshard_expert_hits_total", 0.0) + d.get("moeshard_expert_misses_total", 0.0)
    layout = served.engine.om.layout
    per_stream = [(s["tokens"] - 1) / (s["last"] - s["first"]) for s in streams
                  if s["tokens"] > 1 and s["last"] > s["first"]]
    return {
        "aggregate_tok_s": total / wall, "tokens": total, "wall_s": wall,
        "ttft_s": [s["first"] - s["start"] for s in streams],
        "per_stream_tok_s": statistics.median(per_stream) if per_stream else None,
        "steps": steps, "mean_batch": d.get("moeshard_batch_size_sum", 0.0) / steps if steps else None,
        "bytes_per_step": d.get("moeshard_expert_bytes_loaded_total", 0.0) / steps if steps else None,
        "bytes_per_token": d.get("moeshard_expert_bytes_loaded_total", 0.0) / total if total else None,
        "hit_rate": d.get("moeshard_expert_hits_total", 0.0) / lookups if lookups else None,
        "active_fraction": lookups / (steps * len(layout.sparse_layers) * layout.num_experts) if steps else None,
    }


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _summary(runs: list[dict]) -> dict:
    agg = [r["aggregate_tok_s"] for r in runs]
    ttft = [t for r in runs for t in r["ttft_s"]]

    def med(key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    return {"aggregate_tok_s": statistics.median(agg), "aggregate_tok_s_spread": {"min": min(agg), "max": max(agg)},
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
            "per_stream_tok_s": med("per_stream_tok_s"), "mean_batch": med("mean_batch"),
            "bytes_per_step": med("bytes_per_step"), "bytes_per_token": med("bytes_per_token"),
            "hit_rate": med("hit_rate"), "active_fraction": med("active_fraction"), "rounds": len(runs)}


def run_concurrency(args, ckpt: Path, spec, budget_slots: int, levels: list[int]) -> dict:
    from transformers import AutoTokenizer

    from ..coordinator.engine import Engine
    from ..offload_core.config import OffloadConfig

    _with_tokenizer(ckpt, spec.vocab_size)
    names = [s for s in args.systems if s in CONCURRENT_SYSTEMS]
    if not names:
        raise ValueError(f"--concurrency serves {', '.join(CONCURRENT_SYSTEMS)}: --systems names none of them")
    E = spec.num_local_experts
    settings = {"resident": dict(slots_per_layer=E, prefetch=0, store="ram"),
                "lru": dict(slots_per_layer=budget_slots, prefetch=0, store=args.store),
                "lru+prefetch": dict(slots_per_layer=budget_slots, prefetch=args.prefetch, store=args.store)}
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    from ..offload_core.demo import demo_model_path

    heldout = tokenizer((demo_model_path() / "heldout.txt").read_text(encoding="utf-8"))["input_ids"]
    n = args.prompt_tokens
    prompts = [tokenizer.decode(heldout[i * n:(i + 1) * n]) for i in range(max(levels))]
    served: list[_Served] = []
    try:
        for name in names:
            offload = OffloadConfig(device=args.device, dtype=args.dtype, **settings[name])
            engine = Engine.load(ckpt, offload, progress=False)
            if name == "resident":
                engine.om.runtime.local.warm()
            served.append(_Served(name, engine, max(levels)))
            _level(served[-1], prompts, max(levels), min(args.tokens, 8))  # warm-up, untimed
        for r in range(args.repeats):
            for level in levels:
                for s in (served if r % 2 == 0 else served[::-1]):
                    result = _level(s, prompts, level, args.tokens)
                    s.runs.setdefault(level, []).append(result)
                    print(f"round {r + 1}/{args.repeats}: {s.name} x{level}: {result['aggregate_tok_s']:.1f} tok/s "
                          f"together, TTFT p95 {_percentile(result['ttft_s'], 0.95):.2f} s", flush=True)
    finally:
        for s in served:
            s.close()
    table = {s.name: {str(level): _summary(runs) for level, runs in s.runs.items()} for s in served}
    targets = {}
    for name, by_level in table.items():
        if "1" in by_level and "8" in by_level:
            targets[f"{name}_x8_vs_x1"] = by_level["8"]["aggregate_tok_s"] / by_level["1"]["aggregate_tok_s"]
            targets[f"{name}_ttft_p95_x8_vs_x1"] = by_level["8"]["ttft_p95_s"] / by_level["1"]["ttft_p95_s"]
    return {"levels": levels, "systems": table, "targets": targets, "decode_tokens": args.tokens,
            "prompt_tokens": args.prompt_tokens, "budget_slots_per_layer": budget_slots, "experts_per_layer": E,
            "top_k": spec.num_experts_per_tok}


def format_concurrency(report: dict) -> str:
    head = (f"{'system':>13} {'streams':>7} {'tok/s together':>14} {'spread':>13} {'per stream':>10} "
            f"{'TTFT p50':>8} {'TTFT p95':>8} {'batch':>5} {'MB/step':>7} {'MB/token':>8} {'hit rate':>8} "
            f"{'experts/step':>12}")
    lines = [head]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for name, by_level in report["systems"].items():
        for level, r in by_level.items():
            s = r["aggregate_tok_s_spread"]
            lines.append(f"{name:>13} {level:>7} {r['aggregate_tok_s']:14.1f} {s['min']:6.1f}-{s['max']:<6.1f} "
                         f"{f(r['per_stream_tok_s'], '.1f'):>10} {r['ttft_p50_s']:8.2f} {r['ttft_p95_s']:8.2f} "
                         f"{f(r['mean_batch'], '.1f'):>5} {f(r['bytes_per_step'] and r['bytes_per_step'] / 1e6, '.1f'):>7} "
                         f"{f(r['bytes_per_token'] and r['bytes_per_token'] / 1e6, '.1f'):>8} "
                         f"{f(r['hit_rate'], '.3f'):>8} {f(r['active_fraction'], '.0%'):>12}")
    lines.append("targets: " + ", ".join(f"{k} = {v:.2f}" for k, v in report["targets"].items()))
    return "\n".join(lines)
