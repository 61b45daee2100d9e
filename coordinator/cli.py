"""`moe-coordinator`: generate, chat and demo on an offloaded MoE model.

argparse builds the options; errors from bad input are one line on stderr and a non-zero exit.
The model defaults to the bundled demo model, so every command works on a fresh install.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from offload_core import CheckpointError, QuantConfig
from offload_core.evaluate import cross_entropy
from offload_core.model import model_size_bytes
from offload_core.quant import ALLOWED_BITS
from offload_core.demo import demo_model_path

from offload_core.settings import token_from_env

from .cluster import ClusterSpec
from .engine import Engine, SamplingParams
from .local_workers import LocalWorkers
from .remote import ClientConfig

logger = logging.getLogger("moeshard")

DEMO_PROMPT = "def fibonacci(n):"


class UsageError(Exception):
    """Bad input from the user; printed as one line."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and offloading")
    g.add_argument("--model", type=Path, default=None,
                   help="Hugging Face MoE checkpoint folder (config.json, *.safetensors, tokenizer); "
                        "default: the bundled demo model")
    g.add_argument("--device", default=None,
                   help="primary device for attention, routers and expert slots: cpu, cuda, cuda:N "
                        "(default: cuda if available, else cpu)")
    g.add_argument("--slots-per-layer", type=_positive_int, default=2, metavar="K",
                   help="experts kept on the device per layer, an LRU cache (1..experts per layer; default 2)")
    g.add_argument("--prefetch", type=_nonnegative_int, default=1, metavar="M",
                   help="experts of the next layer to load speculatively per step (0 = off; default 1)")
    g.add_argument("--store", choices=["ram", "disk"], default=None,
                   help="where experts wait when not in a slot (default: ram on CUDA, disk on CPU)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    g.add_argument("--attn-bits", type=int, choices=ALLOWED_BITS, default=16,
                   help="HQQ bits for attention projections (16 = not quantized; the paper uses 4)")
    g.add_argument("--attn-group", type=_positive_int, default=64, help="attention quantization group (default 64)")
    g.add_argument("--expert-bits", type=int, choices=ALLOWED_BITS, default=16,
                   help="HQQ bits for experts (16 = not quantized; the paper uses 3 or 2); quantized once, "
                        "cached on disk")
    g.add_argument("--expert-group", type=_positive_int, default=None,
                   help="expert quantization group (default: 16 at 2 bits, 64 otherwise)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where quantized experts are cached (default: $MOESHARD_CACHE_DIR or ~/.cache/moeshard)")
    g = p.add_argument_group("remote workers")
    g.add_argument("--workers", default=None, metavar="HOST:PORT[,...]",
                   help="moe-worker addresses; experts are spread over them by the memory each reports")
    g.add_argument("--cluster", type=Path, default=None, metavar="FILE",
                   help="JSON cluster file: workers and, optionally, which experts each hosts (see deploy/)")
    g.add_argument("--local-share", type=float, default=0.0, metavar="F",
                   help="share of experts the coordinator computes itself when workers are used (default 0)")
    g.add_argument("--replicas", type=_positive_int, default=1, metavar="R",
                   help="workers hosting each remote expert, for failover (default 1)")
    g.add_argument("--rpc-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="deadline of one expert request; past it the step falls back to a replica or the "
                        "coordinator (default 10)")
    g.add_argument("--token", default=None,
                   help="shared secret the workers expect (default: $MOESHARD_TOKEN)")
    g.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="CA certificate to verify TLS workers against (connect with TLS)")
    g.add_argument("--no-local-fallback", action="store_true",
                   help="never compute a remote expert on the coordinator: a step whose expert has no live "
                        "worker fails with an error naming it")
    g.add_argument("--drop-unavailable-experts", action="store_true",
                   help="with --no-local-fallback: drop an expert with no live worker and re-weight the others "
                        "(changes the output; off by default)")
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    g.add_argument("--verbose", action="store_true", help="log lifecycle details (and tracebacks on errors)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, metavar="N",
                   help=f"tokens to generate at most (default {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default 0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-coordinator",
        description="Run Mixture-of-Experts models that do not fit on one GPU: experts offloaded to RAM or disk "
                    "behind a per-layer LRU cache with speculative prefetch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal",
                       description="Generate text from a prompt; ends with tokens/s, cache hit rate and prefetch recall.")
    p.add_argument("--prompt", required=True, help="the prompt text")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"} instead')
    add_model_args(p)

    p = sub.add_parser("chat", help="interactive chat (the tokenizer's chat template, or plain continuation)",
                       description="Interactive chat on stdin/stdout; an empty line or /exit ends it.")
    add_sampling_args(p, max_new_tokens=128)
    add_model_args(p)

    p = sub.add_parser("demo", help="the main job on the demo model: generate, then print expert-cache stats",
                       description="Generate from a Python prompt on the bundled demo model and show how the "
                                   "expert cache and prefetch behaved.")
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"the prompt (default {DEMO_PROMPT!r})")
    p.add_argument("--local-workers", type=_nonnegative_int, default=2, metavar="N",
                   help="moe-worker processes to start on this machine and spread experts over (default 2; 0 = none)")
    add_sampling_args(p, max_new_tokens=96)
    add_model_args(p)
    p = sub.add_parser("perplexity", help="perplexity of the model on a text file (quality under quantization)",
                       description="Mean next-token cross-entropy over non-overlapping windows of a text file.")
    p.add_argument("--text", type=Path, default=None,
                   help="UTF-8 text file (default: the demo model's held-out text)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"perplexity", "tokens", ...}')
    add_model_args(p)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
                       description="Serve /v1/models, /v1/completions, /v1/chat/completions, /health and /metrics.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_nonnegative_int, default=8000, help="port (default 8000)")
    add_model_args(p)
    return parser


def configure_logging(args) -> None:
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()


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
                       dtype=args.dtype, quant=quant_config(args), cache_dir=args.cache_dir, progress=not args.quiet)


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
    from offload_core.demo import demo_model_path

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


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "demo": cmd_demo, "perplexity": cmd_perplexity,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, CheckpointError, ValueError, OSError, RuntimeError) as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"moe-coordinator: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
