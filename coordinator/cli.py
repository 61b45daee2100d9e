"""`moe-coordinator`'s parser: generate, chat, demo, info, perplexity and serve on an offloaded MoE model.

argparse builds the options here, importing nothing heavy; the commands (and the model machinery they
need) live in `commands.py` and are imported only after the arguments parsed, so `--help` and a bad flag
answer at once. Errors from bad input are one line on stderr and exit 2. The model defaults to the
bundled demo model, so every command works on a fresh install. The entry point that adds `bench` is
`moeshard.cli`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from .. import __version__
from ..offload_core.config import ALLOWED_BITS, DEFAULT_POLICY, KERNELS, POLICIES, parse_size
from .errors import UsageError

logger = logging.getLogger("moeshard")

DEMO_PROMPT = "def fibonacci(n):"


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


def _expert_memory(text: str) -> int | str | tuple:
    """A size or auto; with several devices, one per device, comma-separated (8GiB,6GiB)."""
    if "," in text:
        return tuple(_expert_memory(part) for part in text.split(","))
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (or auto)") from None


def _bonus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, e.g. 1.0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = off), got {text!r}")
    return value


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and offloading")
    g.add_argument("--model", default=None, metavar="FOLDER|REPO",
                   help="Hugging Face MoE checkpoint folder (config.json, *.safetensors, tokenizer) or repository "
                        "id (e.g. Qwen/Qwen3-30B-A3B, from the local Hugging Face cache or downloaded); "
                        "default: the bundled demo model")
    g.add_argument("--device", default=None,
                   help="primary device for attention, routers and expert slots: cpu, cuda, cuda:N; several GPUs of "
                        "one machine, comma-separated (cuda:0,cuda:1), share the expert slots, layers placed by each "
                        "one's --expert-memory (one size for all, or one each) (default: cuda if available, else cpu)")
    g.add_argument("--expert-memory", type=_expert_memory, default=None, metavar="SIZE",
                   help="memory for expert slots on the device, e.g. 12GiB, in the format experts are computed in (a "
                        "4-bit expert takes a quarter of a bf16 one); 'auto' sizes it from the device's free memory, "
                        "less headroom, stated at start (default auto, unless --slots-per-layer is given)")
    g.add_argument("--slots-per-layer", type=_positive_int, default=None, metavar="K",
                   help="instead of --expert-memory: experts kept on the device per layer (1..experts per layer)")
    g.add_argument("--prefetch", type=_nonnegative_int, default=1, metavar="M",
                   help="experts of the next layer to load speculatively per step (0 = off; default 1)")
    g.add_argument("--policy", choices=list(POLICIES), default=None,
                   help="slot eviction: global-lru (one cache for all layers, least recently used goes), global-lfru "
                        "(one cache, fewest recent uses goes), lru (k slots per layer, the paper's), router (per "
                        "layer; keep what the router favours, stream the rest), none (naive: reload every expert every "
                        f"step) (default {DEFAULT_POLICY})")
    g.add_argument("--cache-aware-routing", type=_bonus, default=0.0, metavar="LAMBDA",
                   help="add LAMBDA to the router logits of experts already in a slot before top-k, so tokens prefer "
                        "them (their weights stay the router's): faster offloaded, at some cost in quality, measured "
                        "in the README; 0 = off, the model's own routing (default 0)")
    g.add_argument("--store", choices=["ram", "disk"], default=None,
                   help="where experts wait when not in a slot (default: ram on CUDA, disk on CPU)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    g.add_argument("--attn-bits", type=int, choices=ALLOWED_BITS, default=16,
                   help="HQQ bits for attention projections (16 = not quantized; the paper uses 4) (default 16)")
    g.add_argument("--attn-group", type=_positive_int, default=64, help="attention quantization group (default 64)")
    g.add_argument("--expert-bits", type=int, choices=ALLOWED_BITS, default=16,
                   help="HQQ bits for experts (16 = not quantized; the paper uses 3 or 2); quantized once, "
                        "cached on disk (default 16)")
    g.add_argument("--expert-group", type=_positive_int, default=None,
                   help="expert quantization group (default: 16 at 2 bits, 64 otherwise)")
    g.add_argument("--quant-kernel", choices=list(KERNELS), default="auto",
                   help="auto: compute quantized weights from their packed codes with moeshard's CPU kernels (built "
                        "once with the system C compiler); reference: dequantize on every call (slow; for checking) "
                        "(default auto)")
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


def add_batching_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batching (several sequences decoded together, each expert loaded once per step)")
    g.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                   help="sequences decoded together in one step (default 8)")
    g.add_argument("--step-tokens", type=_positive_int, default=None, metavar="N",
                   help="tokens one step computes at most: long prompts are prefilled in chunks of this, so they "
                        "hold the others back by at most one step (default: 256, or --max-batch if larger)")
    g.add_argument("--kv-tokens", type=_positive_int, default=None, metavar="N",
                   help="size of the paged KV cache in tokens, shared by the batch (default: --max-batch x the "
                        "model's context, at most 4096 per sequence)")
    g.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="attention computed per sequence, so that a greedy request gets the tokens it gets alone in "
                        "any dtype (bf16 too); measured cost: none on Qwen3-30B-A3B's layer shape, 6%% of batched "
                        "throughput on the 5 M-parameter demo model (default on)")
    g.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="requests that begin with the same tokens (a system prompt, a growing conversation) reuse the "
                        "KV cache of the whole pages already computed instead of recomputing them (default on)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="moe-coordinator", allow_abbrev=False,
        description="Run Mixture-of-Experts models that do not fit on one GPU: experts offloaded to RAM or disk "
                    "behind a per-layer LRU cache with speculative prefetch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", allow_abbrev=False, help="generate text from one prompt or a batch of prompts",
                       description="Generate text from a prompt, streamed to the terminal, ending with tokens/s, cache "
                                   "hit rate and prefetch recall. Several prompts (--prompt repeated, or "
                                   "--prompt-file) are decoded together as one batch.")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="the prompt text; '-' reads it from stdin; repeat for a batch")
    p.add_argument("--prompt-file", type=Path, default=None, metavar="FILE",
                   help="a UTF-8 file with one prompt per line (empty lines skipped), decoded as one batch")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true",
                   help='print {"text", "token_ids", "stats"} (the new tokens only, without the prompt) instead; '
                        'one JSON line per prompt, with its "index", for several')
    add_batching_args(p)
    add_model_args(p)

    p = sub.add_parser("chat", allow_abbrev=False, help="interactive chat (the tokenizer's chat template, or plain continuation)",
                       description="Interactive chat on stdin/stdout; an empty line or /exit ends it.")
    add_sampling_args(p, max_new_tokens=128)
    add_model_args(p)

    p = sub.add_parser("demo", allow_abbrev=False, help="the main job on the demo model: generate, then print expert-cache stats",
                       description="Generate from a Python prompt on the bundled demo model and show how the "
                                   "expert cache and prefetch behaved.")
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"the prompt (default {DEMO_PROMPT!r})")
    p.add_argument("--local-workers", type=_nonnegative_int, default=2, metavar="N",
                   help="moe-worker processes to start on this machine and spread experts over (default 2; 0 = none)")
    add_sampling_args(p, max_new_tokens=96)
    add_model_args(p)
    p = sub.add_parser("perplexity", allow_abbrev=False, help="perplexity of the model on a text file (quality under quantization)",
                       description="Mean next-token cross-entropy over non-overlapping windows of a text file.")
    p.add_argument("--text", type=Path, default=None,
                   help="UTF-8 text file (default: the demo model's held-out text)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"perplexity", "tokens", ...}')
    add_model_args(p)

    p = sub.add_parser("info", allow_abbrev=False, help="what a checkpoint is and what fits in a memory budget",
                       description="Print the family, MoE layers, experts, top-k, shared experts, dense bytes, bytes "
                                   "per expert at each bit width, and how many experts per layer fit in --memory.")
    p.add_argument("--model", default=None, metavar="FOLDER|REPO",
                   help="checkpoint folder or Hugging Face repository id (default: the bundled demo model)")
    p.add_argument("--memory", default=None, metavar="SIZE", help="a memory budget, e.g. 24GiB: what fits in it")
    p.add_argument("--expert-memory", type=_expert_memory, default=None, metavar="SIZE",
                   help="an --expert-memory budget, e.g. 4GiB: how many experts it holds at each bit width, and the "
                        "equivalent slots per layer")
    p.add_argument("--routing", type=Path, default=None, metavar="JSON",
                   help="with --expert-memory: routing statistics of this model (the JSON `python -m "
                        "moeshard.benchmarks.routing --model M --json FILE` writes) to read each policy's expected hit "
                        "rate at that budget from")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="log details (and tracebacks on errors)")

    p = sub.add_parser("serve", allow_abbrev=False, help="an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
                       description="Serve /v1/models, /v1/completions, /v1/chat/completions, /health and /metrics. "
                                   "With an API key, a client without it gets 401 and nothing else (only /health, "
                                   "and /metrics with --public-metrics, answer it); off loopback a key is required.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; any other address needs "
                        "--api-key or --insecure-no-api-key)")
    p.add_argument("--port", type=_nonnegative_int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in /v1/models and in requests (default: the Hugging Face id given to "
                        "--model, else the folder's name; moeshard-demo for the bundled model)")
    g = p.add_argument_group("HTTP access and limits")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' (default: $MOESHARD_API_KEY, better than the "
                        "flag, which other users can see in the process list)")
    g.add_argument("--insecure-no-api-key", action="store_true",
                   help="serve on a non-loopback --host without an API key: anyone who reaches the port can generate")
    g.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (default: /metrics needs it; /health never does)")
    g.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="certificate chain for HTTPS on the API (with --tls-key; --tls-ca is for workers)")
    g.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--max-body-bytes", type=_positive_int, default=4 << 20, metavar="N",
                   help="larger request bodies get 413, refused from Content-Length before reading, or as soon as a "
                        "chunked body passes it (default 4194304 = 4 MiB)")
    g.add_argument("--max-prompt-chars", type=_positive_int, default=None, metavar="N",
                   help="longer prompts (chat: all messages' text) get 400 before tokenizing (default: 16 characters "
                        "per token of the model's context length)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a connection that has not sent a whole request head within this is closed (default 10)")
    g.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a request body not received within this after its head gets 408 (default 60)")
    g.add_argument("--max-connections", type=_positive_int, default=256, metavar="N",
                   help="open connections at most; one more closes the oldest that has not sent its request yet, or "
                        "gets 503 when all are in requests (8 more are kept for /health) (default 256)")
    g.add_argument("--max-connections-per-client", type=_positive_int, default=128, metavar="N",
                   help="the same, per client address (default 128)")
    add_batching_args(p)
    g = p.add_argument_group("requests")
    g.add_argument("--max-queue", type=_nonnegative_int, default=64, metavar="N",
                   help="requests waiting for a place in the batch; more get 429 with Retry-After (default 64)")
    g.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                   help="the largest max_tokens a request may ask for; more gets 400 (default: the model's context)")
    add_model_args(p)
    return parser, sub


def configure_logging(args) -> None:
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()


LOADS_A_MODEL = ("generate", "chat", "demo", "perplexity", "serve")


def precheck(args) -> None:
    """What can be checked before torch is imported (seconds) or a model loads (minutes): the device name, what
    --model names, the files given, and for serve its settings and its port, bound now."""
    from ..offload_core.config import OffloadConfig, check_device_name
    from ..offload_core.hub import check_model_argument

    if getattr(args, "device", None):
        devices = [d.strip() for d in args.device.split(",")]
        for device in devices:
            check_device_name(device)
        if len(devices) > 1:
            OffloadConfig(device=devices[0], expert_devices=tuple(devices))  # several: GPUs of one machine only
    if getattr(args, "model", None) is not None:
        check_model_argument(args.model)
    if args.command == "serve":
        from .http_security import serve_config

        args.serve_config = serve_config(args)  # a missing API key off loopback, bad limits: refused now
    for name in ("text", "prompt_file", "cluster", "tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            raise UsageError(f"--{name.replace('_', '-')} {str(path)!r}: no such file")
    if args.command == "serve":
        from .http_security import listen_socket

        args.listen_socket = listen_socket(args.serve_config.host, args.serve_config.port)


def in_flags(exc: Exception) -> str:
    """An error as the command line says it: a setting the engine names (`SettingError.setting`) is the flag that
    sets it."""
    setting = getattr(exc, "setting", None)
    return f"--{setting.replace('_', '-')}: {exc}" if setting else str(exc)


def run(args, extra: dict[str, Callable] | None = None) -> int:
    """Run the parsed command; bad input of every kind is one line on stderr and exit 2."""
    try:
        precheck(args)
    except (UsageError, ValueError) as exc:
        print(f"moe-coordinator: error: {in_flags(exc)}", file=sys.stderr)
        return 2
    if args.command in LOADS_A_MODEL and not args.quiet:
        where = f" on {args.device}" if args.device else ""
        print(f"moe-coordinator {args.command}: loading {args.model or 'the bundled demo model'}{where} ...",
              file=sys.stderr, flush=True)
    configure_logging(args)
    from ..offload_core.checkpoint import CheckpointError
    from . import commands

    table = {**commands.COMMANDS, **(extra or {})}
    try:
        return table[args.command](args)
    except (UsageError, CheckpointError, ValueError, OSError, RuntimeError) as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"moe-coordinator: error: {in_flags(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
