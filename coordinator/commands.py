"""The `moe-coordinator` commands: each takes the parsed arguments and returns an exit status."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from offload_core import QuantConfig
from offload_core.demo import demo_model_path
from offload_core.evaluate import cross_entropy
from offload_core.model import model_size_bytes
from offload_core.settings import token_from_env

from .cli import UsageError
from .cluster import ClusterSpec
from .engine import Engine, SamplingParams
from .local_workers import LocalWorkers
from .remote import ClientConfig


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(path: Path | None) -> Path:
    path = demo_model_path() if path is None else path.expanduser()
    if not path.is_dir():
        raise UsageError(f"model folder {str(path)!r} does not exist: expected a Hugging Face MoE checkpoint folder "
                         "(config.json, *.safetensors, tokenizer files)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UsageError(f"no tokenizer in {str(path)!r}: expected tokenizer.json or tokenizer_config.json "
                         "beside config.json")
    return path


def cluster_spec(args, extra_workers: list[str] = ()) -> ClusterSpec | None:
    if args.workers and args.cluster:
        raise UsageError("give --workers or --cluster, not both")
    if args.cluster:
        return ClusterSpec.from_file(args.cluster)
    addresses = ",".join([*(extra_workers or []), *([args.workers] if args.workers else [])])
    return ClusterSpec.from_addresses(addresses, args.local_share, args.replicas) if addresses else None


def client_config(args) -> ClientConfig:
    if args.rpc_timeout <= 0:
        raise UsageError(f"--rpc-timeout must be > 0 seconds, got {args.rpc_timeout}")
    tls_ca = None
    if args.tls_ca is not None:
        try:
            tls_ca = args.tls_ca.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --tls-ca {str(args.tls_ca)!r}: {exc.strerror}") from exc
    return ClientConfig(rpc_timeout_s=args.rpc_timeout, token=args.token or token_from_env(), tls_ca=tls_ca)


def load_engine(args, extra_workers: list[str] = ()) -> Engine:
    if args.drop_unavailable_experts and not args.no_local_fallback:
        raise UsageError("--drop-unavailable-experts only applies with --no-local-fallback")
    return Engine.load(resolve_model(args.model), cluster=cluster_spec(args, extra_workers),
                       client=client_config(args), local_fallback=not args.no_local_fallback,
                       drop_unavailable=args.drop_unavailable_experts, device=args.device or default_device(),
                       slots_per_layer=args.slots_per_layer, prefetch=args.prefetch, store=args.store,
                       dtype=args.dtype, quant=quant_config(args), cache_dir=args.cache_dir, policy=args.policy,
                       progress=not args.quiet)


def quant_config(args) -> QuantConfig:
    return QuantConfig(attn_bits=args.attn_bits, attn_group=args.attn_group, expert_bits=args.expert_bits,
                       expert_group=args.expert_group)


def sampling(args) -> SamplingParams:
    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_line(stats: dict) -> str:
    line = (f"{stats['new_tokens']} tokens in {stats['wall_s']:.2f} s | prefill {_fmt(stats['prefill_tok_s'], '.1f')} tok/s"
            f" | decode {_fmt(stats['decode_tok_s'], '.1f')} tok/s | expert cache hit rate {_fmt(stats['hit_rate'])}"
            f" | prefetch recall {_fmt(stats['prefetch_recall'])}")
    for address, w in stats.get("workers", {}).items():
        worker = w.get("worker", {})
        line += (f"\n  worker {address}: {w['requests']} requests, {w['tokens']} tokens, RPC p50 {_fmt(w['rpc_p50_ms'])} ms"
                 f" p99 {_fmt(w['rpc_p99_ms'])} ms, {(w['bytes_sent'] + w['bytes_received']) / 1e6:.2f} MB on the wire,"
                 f" worker hits {worker.get('hits', 'n/a')} misses {worker.get('misses', 'n/a')}")
    return line


def cmd_generate(args) -> int:
    engine = load_engine(args)
    params = sampling(args)
    prompt_ids = engine.encode_prompt(args.prompt)
    if args.json:
        result = engine.generate(prompt_ids, params)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats}))
        return 0
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    result = engine.generate(prompt_ids, params, on_text=lambda t: (out.write(t), out.flush()))
    out.write("\n\n" + summary_line(result.stats) + "\n")
    return 0


def cmd_demo(args) -> int:
    model = resolve_model(args.model)
    if args.workers or args.cluster or args.local_workers == 0:
        return _run_demo(args, load_engine(args))
    print(f"starting {args.local_workers} local moe-worker processes on 127.0.0.1 ...", flush=True)
    with LocalWorkers(args.local_workers, model, extra_args=("--slots-per-layer", str(args.slots_per_layer))) as w:
        args.local_share = args.local_share or 1.0 / (args.local_workers + 1)
        return _run_demo(args, load_engine(args, extra_workers=w.addresses))


def _run_demo(args, engine: Engine) -> int:
    remote = [n for n in engine.model.moeshard.backends if n != "local"]
    placement = engine.model.moeshard.placement
    where = ", ".join(f"{sum(1 for o in placement.values() if n in o)} experts on worker {n}" for n in remote)
    print(f"moeshard demo: {engine.name} on {engine.device}, {args.slots_per_layer} expert slots per layer, "
          f"prefetch {args.prefetch}" + (f"; {where}, the rest local" if remote else "") + "\n")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    result = engine.generate(engine.encode_prompt(args.prompt), sampling(args),
                             on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    print("\n\n" + summary_line(result.stats) + "\n")
    print("Expert cache on the coordinator, per layer (this run):")
    print(engine.model.moeshard.format_stats())
    engine.close()
    return 0


def cmd_chat(args) -> int:
    engine = load_engine(args)
    params = sampling(args)
    templated = bool(getattr(engine.tokenizer, "chat_template", None))
    messages: list[dict] = []
    transcript = ""
    print(f"moeshard chat on {engine.name} ({'chat template' if templated else 'plain continuation'}); "
          "an empty line or /exit ends it.", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("", "/exit"):
            return 0
        if templated:
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids = engine.encode_chat(messages)
        else:
            transcript += line
            ids = engine.encode_prompt(transcript)
        budget = engine.context_length - params.max_new_tokens if engine.context_length else len(ids)
        ids = ids[-max(budget, 1):]  # keep the most recent context
        result = engine.generate(ids, params, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        sys.stdout.write("\n")
        sys.stdout.flush()
        if templated:
            messages.append({"role": "assistant", "content": result.text})
        else:
            transcript += result.text + "\n"


def cmd_perplexity(args) -> int:
    text_path = args.text or demo_model_path() / "heldout.txt"
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --text {str(text_path)!r}: expected a UTF-8 text file ({exc})") from exc
    engine = load_engine(args)
    start = time.perf_counter()
    result = cross_entropy(engine.model, engine.tokenizer, text, args.seq_len, progress=not args.quiet)
    size = model_size_bytes(engine.model)
    report = {**result, "seconds": time.perf_counter() - start, "attn_bits": args.attn_bits,
              "expert_bits": args.expert_bits, "size_bytes": size, "text": str(text_path)}
    engine.close()
    if args.json:
        print(json.dumps(report))
    else:
        print(f"perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f} nats/token) over "
              f"{result['tokens']} tokens of {text_path.name}; attention {args.attn_bits}-bit, experts "
              f"{args.expert_bits}-bit, model size {size / 2**20:.2f} MiB")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from .server import create_app

    engine = load_engine(args)
    app = create_app(engine)
    print(f"moe-coordinator: serving {engine.name} at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    finally:
        engine.close()
    return 0


def cmd_bench(args) -> int:
    from benchmarks.bench import main as bench_main

    return bench_main(args)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "demo": cmd_demo, "perplexity": cmd_perplexity,
            "serve": cmd_serve, "bench": cmd_bench}


