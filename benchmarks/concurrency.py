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

With `--shared-prefix N`, the shared-prefix scenario instead: every chat starts with the same N-token system prompt
and its own `--prompt-tokens` user message, and each system is served twice, with the prefix cache and without;
one request first shows each server the system prompt (its TTFT reported apart), so every request in the table
repeats it. Per level: time to first token p50/p95, the prompt tokens reused (usage's cached_tokens), the tokens computed and the expert bytes
loaded per request; the target is the TTFT without the cache over the TTFT with it.
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

    def __init__(self, name: str, engine, max_batch: int, prefix_cache: bool = True):
        from ..coordinator.batching import BatchConfig
        from ..coordinator.http_security import ServeConfig
        from ..coordinator.server import build_server

        self.name, self.engine = name, engine
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        batch = BatchConfig(max_batch=max_batch, max_queue=max_batch, step_tokens=max(256, max_batch),
                            prefix_cache=prefix_cache)
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


def _stream(client, model: str, messages: list[dict], tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if first is None and chunk.choices:
            first = now
        if chunk.choices and chunk.choices[0].delta.content:
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    last = last or first
    details = getattr(usage, "prompt_tokens_details", None)
    return {"start": start, "first": first, "last": last, "tokens": usage.completion_tokens if usage else 0,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (details.cached_tokens or 0) if details is not None else 0}


def _chats(texts: list[str], system: str | None = None) -> list[list[dict]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return [head + [{"role": "user", "content": text}] for text in texts]


def _level(served: _Served, chats: list[list[dict]], concurrency: int, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=600)
    before = served.metrics()
    with ThreadPoolExecutor(concurrency) as pool:
        streams = list(pool.map(lambda i: _stream(client, served.engine.name, chats[i % len(chats)], tokens),
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
        "prompt_tokens": [s["prompt_tokens"] for s in streams], "cached_tokens": [s["cached_tokens"] for s in streams],
        "computed_tokens": d.get("moeshard_step_tokens_sum", 0.0),  # prefill and decode, over every stream
        "expert_bytes": d.get("moeshard_expert_bytes_loaded_total", 0.0),
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


def _systems(args, spec, budget_slots: int) -> dict[str, dict]:
    """The systems --systems names that --concurrency serves, with their offload settings."""
    names = [s for s in args.systems if s in CONCURRENT_SYSTEMS]
    if not names:
        raise ValueError(f"--concurrency serves {', '.join(CONCURRENT_SYSTEMS)}: --systems names none of them")
    E = spec.num_local_experts
    settings = {"resident": dict(slots_per_layer=E, prefetch=0, store="ram"),
                "lru": dict(slots_per_layer=budget_slots, prefetch=0, store=args.store),
                "lru+prefetch": dict(slots_per_layer=budget_slots, prefetch=args.prefetch, store=args.store)}
    return {name: settings[name] for name in names}


def _serve(name: str, system: str, settings: dict, args, ckpt: Path, max_batch: int,
           prefix_cache: bool = True) -> _Served:
    from ..coordinator.engine import Engine
    from ..offload_core.config import OffloadConfig

    engine = Engine.load(ckpt, OffloadConfig(device=args.device, dtype=args.dtype, **settings), progress=False)
    if system == "resident":
        engine.om.runtime.local.warm()
    return _Served(name, engine, max_batch, prefix_cache)


def _heldout_tokens(ckpt: Path):
    """The checkpoint's tokenizer and the demo model's held-out text in its tokens: where prompts are cut from."""
    from transformers import AutoTokenizer

    from ..offload_core.demo import demo_model_path

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    return tokenizer, tokenizer((demo_model_path() / "heldout.txt").read_text(encoding="utf-8"))["input_ids"]


def run_concurrency(args, ckpt: Path, spec, budget_slots: int, levels: list[int]) -> dict:
    _with_tokenizer(ckpt, spec.vocab_size)
    if getattr(args, "shared_prefix", None):
        return run_shared_prefix(args, ckpt, spec, budget_slots, levels)
    systems = _systems(args, spec, budget_slots)
    tokenizer, heldout = _heldout_tokens(ckpt)
    n = args.prompt_tokens
    chats = _chats([tokenizer.decode(heldout[i * n:(i + 1) * n]) for i in range(max(levels))])
    served: list[_Served] = []
    try:
        for name, settings in systems.items():
            served.append(_serve(name, name, settings, args, ckpt, max(levels)))
            _level(served[-1], chats, max(levels), min(args.tokens, 8))  # warm-up, untimed
        for r in range(args.repeats):
            for level in levels:
                for s in (served if r % 2 == 0 else served[::-1]):
                    result = _level(s, chats, level, args.tokens)
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
            "prompt_tokens": args.prompt_tokens, "budget_slots_per_layer": budget_slots,
            "experts_per_layer": spec.num_local_experts, "top_k": spec.num_experts_per_tok}


CACHE_MODES = {True: "prefix cache", False: "no prefix cache"}


def _prefix_summary(runs: list[dict]) -> dict:
    ttft = [t for r in runs for t in r["ttft_s"]]
    requests = len(ttft)
    return {"ttft_p50_s": _percentile(ttft, 0.5), "ttft_p95_s": _percentile(ttft, 0.95),
            "prompt_tokens": statistics.median(t for r in runs for t in r["prompt_tokens"]),
            "cached_tokens": statistics.median(t for r in runs for t in r["cached_tokens"]),
            "computed_tokens_per_request": sum(r["computed_tokens"] for r in runs) / requests,
            "expert_bytes_per_request": sum(r["expert_bytes"] for r in runs) / requests, "rounds": len(runs)}


def run_shared_prefix(args, ckpt: Path, spec, budget_slots: int, levels: list[int]) -> dict:
    """The shared-prefix scenario (the module's docstring): every system with the prefix cache and without, the same
    requests to each, the servers' order alternating between rounds."""
    systems = _systems(args, spec, budget_slots)
    tokenizer, heldout = _heldout_tokens(ckpt)
    N, n = args.shared_prefix, args.prompt_tokens
    needed = N + n * (1 + sum(levels) * args.repeats)  # the system prompt, then a user message of its own per request
    if len(heldout) < needed:
        raise ValueError(f"--shared-prefix {N} and --prompt-tokens {n} over {sum(levels)} streams x {args.repeats} "
                         f"rounds need {needed} tokens of held-out text; it has {len(heldout)}")
    system = tokenizer.decode(heldout[:N])
    messages = (tokenizer.decode(heldout[N + i * n:N + (i + 1) * n]) for i in range(needed))
    served: dict[str, dict[bool, _Served]] = {}
    first: dict[str, dict[str, float]] = {}
    try:
        for name, settings in systems.items():
            served[name] = {cache: _serve(f"{name} ({CACHE_MODES[cache]})", name, settings, args, ckpt, max(levels),
                                          cache) for cache in CACHE_MODES}
        # the system prompt's first request on each server (the cache's miss): timed apart, not in the table
        chats = _chats([next(messages)], system)
        for name, pair in served.items():
            first[name] = {CACHE_MODES[c]: _level(s, chats, 1, min(args.tokens, 8))["ttft_s"][0]
                           for c, s in pair.items()}
        everyone = [s for pair in served.values() for s in pair.values()]
        for r in range(args.repeats):
            for level in levels:
                chats = _chats([next(messages) for _ in range(level)], system)  # the same requests to every server
                for s in (everyone if r % 2 == 0 else everyone[::-1]):
                    result = _level(s, chats, level, args.tokens)
                    s.runs.setdefault(level, []).append(result)
                    print(f"round {r + 1}/{args.repeats}: {s.name} x{level}: TTFT p50 "
                          f"{_percentile(result['ttft_s'], 0.5):.2f} s, "
                          f"{statistics.median(result['cached_tokens']):.0f} prompt tokens cached", flush=True)
    finally:
        for pair in served.values():
            for s in pair.values():
                s.close()
    table = {name: {CACHE_MODES[c]: {str(level): _prefix_summary(runs) for level, runs in s.runs.items()}
                    for c, s in pair.items()} for name, pair in served.items()}
    targets = {}
    for name, modes in table.items():
        for level in modes[CACHE_MODES[True]]:
            with_cache, without = modes[CACHE_MODES[True]][level], modes[CACHE_MODES[False]][level]
            targets[f"{name}_x{level}_ttft_p50_without_vs_with_prefix_cache"] = (without["ttft_p50_s"]
                                                                                 / with_cache["ttft_p50_s"])
    return {"scenario": "shared-prefix", "shared_prefix_tokens": N, "levels": levels, "systems": table,
            "first_request_ttft_s": first, "targets": targets, "decode_tokens": args.tokens,
            "prompt_tokens": args.prompt_tokens, "budget_slots_per_layer": budget_slots,
            "experts_per_layer": spec.num_local_experts, "top_k": spec.num_experts_per_tok}


def format_shared_prefix(report: dict) -> str:
    lines = [f"every chat: the same {report['shared_prefix_tokens']}-token system prompt + its own "
             f"{report['prompt_tokens']}-token message; {report['decode_tokens']} tokens decoded",
             f"{'system':>13} {'cache':>15} {'streams':>7} {'TTFT p50':>8} {'TTFT p95':>8} {'prompt':>6} "
             f"{'cached':>6} {'computed/req':>12} {'MB experts/req':>14}"]
    for name, modes in report["systems"].items():
        for mode, by_level in modes.items():
            for level, r in by_level.items():
                lines.append(f"{name:>13} {mode:>15} {level:>7} {r['ttft_p50_s']:8.3f} {r['ttft_p95_s']:8.3f} "
                             f"{r['prompt_tokens']:6.0f} {r['cached_tokens']:6.0f} "
                             f"{r['computed_tokens_per_request']:12.1f} {r['expert_bytes_per_request'] / 1e6:14.1f}")
    lines.append("first request (the cache's miss), TTFT: " + ", ".join(
        f"{name} {mode} {t:.3f} s" for name, modes in report["first_request_ttft_s"].items()
        for mode, t in modes.items()))
    lines.append("targets: " + ", ".join(f"{k} = {v:.2f}" for k, v in report["targets"].items()))
    return "\n".join(lines)


def format_concurrency(report: dict) -> str:
    if report.get("scenario") == "shared-prefix":
        return format_shared_prefix(report)
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
