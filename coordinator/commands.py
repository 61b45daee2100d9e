"""The `moe-coordinator` commands: each takes the parsed arguments and returns an exit status.

Settings are built here, once, from the arguments: an `OffloadConfig` for the model and a `ClusterConfig`
for the workers; every check that needs no model runs before the model loads.
"""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import torch

from ..offload_core.config import DEFAULT_POLICY, OffloadConfig, QuantConfig, parse_size
from ..offload_core.counters import RuntimeStats
from ..offload_core.demo import demo_model_path
from ..offload_core.hub import resolve_model
from ..protos.access import token_from_env
from .cluster import ClusterConfig, Unavailable
from .engine import Engine, SamplingParams
from .errors import UsageError
from .local_workers import LocalWorkers
from .placement import ClusterSpec
from .remote import ClientConfig


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_folder(args) -> Path:
    """The checkpoint folder for `--model` (a folder or a Hugging Face repository id; default the demo model)."""
    if args.model is None:
        return demo_model_path()
    return resolve_model(args.model, progress=not getattr(args, "quiet", False))


def context_length(path: Path) -> int:
    """max_position_embeddings from config.json (0 when absent), read without building the model."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    text = config.get("text_config") or config
    return int(text.get("max_position_embeddings") or 0)


def tokenizer_folder(path: Path) -> Path:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UsageError(f"no tokenizer in {str(path)!r}: expected tokenizer.json or tokenizer_config.json "
                         "beside config.json")
    return path


def offload_config(args) -> OffloadConfig:
    # The memory knob: --expert-memory (default auto) unless --slots-per-layer is given; not both.
    if args.expert_memory is not None and args.slots_per_layer is not None:
        raise UsageError("give --expert-memory or --slots-per-layer, not both: one sizes the expert slots in bytes, "
                         "the other in experts per layer")
    memory = None if args.slots_per_layer is not None else (args.expert_memory or "auto")
    devices = [d.strip() for d in (args.device or default_device()).split(",")]
    return OffloadConfig(device=devices[0], expert_devices=tuple(devices) if len(devices) > 1 else (),
                         slots_per_layer=args.slots_per_layer or 2, expert_memory=memory,
                         cache_aware_routing=args.cache_aware_routing, prefetch=args.prefetch, store=args.store,
                         dtype=args.dtype, policy=args.policy or DEFAULT_POLICY,
                         quant=QuantConfig(attn_bits=args.attn_bits, attn_group=args.attn_group,
                                           expert_bits=args.expert_bits, expert_group=args.expert_group,
                                           kernel=args.quant_kernel),
                         cache_dir=args.cache_dir)


def unavailable_policy(args) -> Unavailable:
    if args.drop_unavailable_experts and not args.no_local_fallback:
        raise UsageError("--drop-unavailable-experts only applies with --no-local-fallback")
    if args.drop_unavailable_experts:
        return Unavailable.DROP
    return Unavailable.FAIL if args.no_local_fallback else Unavailable.LOCAL


def cluster_config(args, extra_workers: list[str] = ()) -> ClusterConfig | None:
    if args.workers and args.cluster:
        raise UsageError("give --workers or --cluster, not both")
    if args.rpc_timeout <= 0:
        raise UsageError(f"--rpc-timeout must be > 0 seconds, got {args.rpc_timeout}")
    if args.cluster:
        spec = ClusterSpec.from_file(args.cluster)
    else:
        addresses = ",".join([*(extra_workers or []), *([args.workers] if args.workers else [])])
        if not addresses:
            unavailable_policy(args)  # the flag combination is checked even without workers
            return None
        spec = ClusterSpec.from_addresses(addresses, args.local_share, args.replicas)
    tls_ca = None
    if args.tls_ca is not None:
        try:
            tls_ca = args.tls_ca.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read --tls-ca {str(args.tls_ca)!r}: {exc.strerror}") from exc
    client = ClientConfig(rpc_timeout_s=args.rpc_timeout, token=args.token or token_from_env(), tls_ca=tls_ca)
    return ClusterConfig(spec, client, unavailable_policy(args))


DEMO_NAME = "moeshard-demo"  # the bundled demo model's name to clients


def served_name(args, path: Path) -> str:
    """The model's name to API clients: --served-model-name, else the Hugging Face id given to --model, the
    folder's name, or moeshard-demo for the bundled model."""
    name = getattr(args, "served_model_name", None)
    if name is not None:
        if not name.strip() or len(name) > 256 or not name.isprintable():
            raise UsageError(f"--served-model-name {name[:60]!r}: expected 1 to 256 printable characters")
        return name
    if args.model is None:
        return DEMO_NAME
    return path.name if Path(str(args.model)).expanduser().is_dir() else str(args.model)


def load_engine(args, extra_workers: list[str] = ()) -> Engine:
    offload = offload_config(args)  # checked before anything loads
    cluster = cluster_config(args, extra_workers)
    path = model_folder(args)
    tokenizer_folder(path)
    engine = Engine.load(path, offload, cluster, progress=not args.quiet, name=served_name(args, path))
    if not args.quiet and not getattr(args, "json", False):
        for line in engine.om.runtime.local.memory_lines():
            print(f"moe-coordinator: {line}", file=sys.stderr, flush=True)
    return engine


def sampling(args) -> SamplingParams:
    try:
        return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    except ValueError as exc:
        raise UsageError(str(exc).replace("max_new_tokens", "--max-new-tokens").replace("top_p", "--top-p")
                         .replace("temperature", "--temperature")) from None


def batch_config(args, max_queue: int = 0):
    from .batching import BatchConfig

    step_tokens = args.step_tokens if args.step_tokens is not None else max(256, args.max_batch)
    try:
        return BatchConfig(max_batch=args.max_batch, max_queue=max_queue, step_tokens=step_tokens,
                           kv_tokens=args.kv_tokens, batch_invariant=args.batch_invariant,
                           prefix_cache=args.prefix_cache)
    except ValueError as exc:
        names = {"max_batch": "--max-batch", "step_tokens": "--step-tokens", "kv_tokens": "--kv-tokens",
                 "page_size": "the page size"}
        message = str(exc)
        for field, flag in names.items():
            message = message.replace(field, flag)
        raise UsageError(message) from None


def read_prompts(args) -> list[str]:
    """The prompts of `generate`: each --prompt ('-' = all of stdin), then --prompt-file's lines."""
    prompts = []
    for text in args.prompt or ():
        if text == "-":
            if "-" in prompts:
                raise UsageError("--prompt - (stdin) can be given once")
            text = sys.stdin.read()
            if not text:
                raise UsageError("--prompt -: stdin was empty: expected the prompt text")
        prompts.append(text)
    if args.prompt_file is not None:
        try:
            lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --prompt-file {str(args.prompt_file)!r}: expected a UTF-8 text file with "
                             f"one prompt per line ({exc})") from None
        prompts += [line for line in lines if line.strip()]
        if not lines or not any(line.strip() for line in lines):
            raise UsageError(f"--prompt-file {str(args.prompt_file)!r} has no prompts: expected one per line")
    if not prompts:
        raise UsageError("give a prompt: --prompt TEXT, --prompt - (from stdin), or --prompt-file FILE (one per line)")
    return prompts


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_line(stats: dict) -> str:
    line = (f"{stats['new_tokens']} tokens in {stats['wall_s']:.2f} s | prefill {_fmt(stats['prefill_tok_s'], '.1f')} tok/s"
            f" | decode {_fmt(stats['decode_tok_s'], '.1f')} tok/s | expert cache hit rate {_fmt(stats['hit_rate'])}"
            + (" (all places)" if stats.get("workers") else "")
            + f" | prefetch recall {_fmt(stats['prefetch_recall'])}")
    for address, w in stats.get("workers", {}).items():
        line += (f"\n  worker {address}: {w['requests']} requests, {w['tokens']} tokens, RPC p50 {_fmt(w['rpc_p50_ms'])} ms"
                 f" p99 {_fmt(w['rpc_p99_ms'])} ms, {(w['bytes_sent'] + w['bytes_received']) / 1e6:.2f} MB on the wire,"
                 f" its cache: {w.get('run_hits', 'n/a')} hits, {w.get('run_misses', 'n/a')} misses")
    return line


def cmd_generate(args) -> int:
    params = sampling(args)
    prompts = read_prompts(args)
    # every prompt past --max-batch waits in the queue for a place (none is refused)
    batch = batch_config(args, max_queue=len(prompts)) if len(prompts) > 1 else None
    engine = load_engine(args)
    try:
        if batch is not None:
            return _generate_batch(engine, prompts, params, batch, args.json)
        prompt_ids = engine.encode_prompt(prompts[0])
        if args.json:
            result = engine.generate(prompt_ids, params)
            print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats}))
            return 0
        out = sys.stdout
        out.write(prompts[0])
        out.flush()
        result = engine.generate(prompt_ids, params, on_text=lambda t: (out.write(t), out.flush()))
        out.write("\n\n" + summary_line(result.stats) + "\n")
        return 0
    finally:
        engine.close()


def _generate_batch(engine: Engine, prompts: list[str], params: SamplingParams, batch, as_json: bool) -> int:
    """Several prompts decoded as one batch, `--max-batch` at a time; printed in prompt order, each as soon as it
    and those before it have finished (JSON: one line each, with its index)."""
    import asyncio

    from .batching import Batcher

    ids = [engine.encode_prompt(p) for p in prompts]
    for i, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise UsageError(f"prompt {i + 1} is empty: expected text that makes at least one token")
        if engine.context_length and len(prompt_ids) + params.max_new_tokens > engine.context_length:
            raise UsageError(f"prompt {i + 1} ({len(prompt_ids)} tokens) + --max-new-tokens ({params.max_new_tokens}) "
                             f"exceeds the model's context length of {engine.context_length} tokens")

    def done(i: int, result) -> None:
        if as_json:
            print(json.dumps({"index": i, "text": result.text, "token_ids": result.token_ids, "stats": result.stats}),
                  flush=True)
        else:
            print(f"--- prompt {i + 1} of {len(prompts)} ---\n{prompts[i]}{result.text}\n", flush=True)

    batcher = Batcher(engine, batch)
    before = engine.om.stats().total
    batcher.start()
    start = time.perf_counter()
    try:
        results = asyncio.run(batcher.generate_many(ids, params, done))
    finally:
        batcher.close()
    seconds = time.perf_counter() - start
    if not as_json:
        delta = engine.om.stats().total - before
        tokens = sum(len(r.token_ids) for r in results)
        steps = batcher.step_stats
        print(f"{len(prompts)} prompts, {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tok/s together | "
              f"{steps.steps} steps, {steps.sequences / max(steps.steps, 1):.1f} sequences per step | expert cache hit "
              f"rate {_fmt(delta.hit_rate)} | {delta.bytes_loaded / max(steps.steps, 1) / 2**20:.2f} MiB of experts "
              "moved per step")
    return 0


def cache_tables(engine: Engine, prefetch: int) -> str:
    """The expert caches of this run, one table per place: the coordinator's (with the predictions it made for
    every owner) and each worker's (the hits and misses its replies to this coordinator reported)."""
    om = engine.om
    top_k = om.layout.top_k
    ceiling = min(prefetch, top_k) / top_k
    legend = (f"Expert caches, this run. hit_rate = hits / (hits + misses). recall = share of the experts a layer "
              f"needed that the layer before predicted: at most prefetch / top-k = {min(prefetch, top_k)}/{top_k} = "
              f"{ceiling:.2f} here; precision = share of the predictions that were needed; '-' = nothing predicted "
              "(the first MoE layer has no layer before it).")
    lines = [textwrap.fill(legend, 110), "",
             f"On the coordinator ({om.runtime.local.describe()['compute']} experts, {om.config.slots_per_layer} "
             "slots per layer):", om.runtime.local_stats().table()]
    if engine.cluster is not None:
        described = engine.cluster.describe()
        for name, backend in engine.cluster.workers.items():
            hosted = described[name]["hosted"]
            lines += ["", f"On worker {name} ({hosted} experts, {backend.slots_per_layer} slots per layer):",
                      RuntimeStats(backend.layer_counters(), {}).table(("hits", "misses", "hit_rate"))]
    return "\n".join(lines)


def cmd_demo(args) -> int:
    if args.expert_memory is None and args.slots_per_layer is None:
        args.slots_per_layer = 2  # the demo model fits anywhere: a small cache shows offloading at work
    offload_config(args)  # bad settings fail before workers start
    model = model_folder(args)
    if args.workers or args.cluster or args.local_workers == 0:
        return _run_demo(args, load_engine(args))
    print(f"starting {args.local_workers} local moe-worker processes on 127.0.0.1 ...", flush=True)
    # The workers' slots: as many per layer as the coordinator's, or (with --expert-memory) what their memory buys
    cap = ("--slots-per-layer", str(args.slots_per_layer)) if args.slots_per_layer is not None else ()
    with LocalWorkers(args.local_workers, model, extra_args=cap) as w:
        args.local_share = args.local_share or 1.0 / (args.local_workers + 1)
        return _run_demo(args, load_engine(args, extra_workers=w.addresses))


def _run_demo(args, engine: Engine) -> int:
    try:
        where = ""
        if engine.cluster is not None:
            hosted = {name: d["hosted"] for name, d in engine.cluster.describe().items()}
            where = "; " + ", ".join(f"{n} experts on worker {name}" for name, n in hosted.items()) + ", the rest local"
        print(f"moeshard demo: {engine.name} on {engine.device}, {engine.om.config.slots_per_layer} expert slots per "
              f"layer ({engine.om.config.policy}), "
              f"prefetch {args.prefetch}{where}\n")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        result = engine.generate(engine.encode_prompt(args.prompt), sampling(args),
                                 on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        print("\n\n" + summary_line(result.stats) + "\n")
        print(cache_tables(engine, args.prefetch))
        return 0
    finally:
        engine.close()


def cmd_chat(args) -> int:
    params = sampling(args)
    engine = load_engine(args)
    try:
        templated = bool(getattr(engine.tokenizer, "chat_template", None))
        messages: list[dict] = []
        transcript = ""
        print(f"moeshard chat on {engine.name} ({'chat template' if templated else 'plain continuation'}); "
              "Ctrl-C stops a reply; an empty line, /exit or Ctrl-C at the prompt ends the chat.", file=sys.stderr)
        while True:
            print("> ", end="", file=sys.stderr, flush=True)
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 0
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
            result, stopped = _interruptible(engine, ids, params)
            sys.stdout.write("\n")
            sys.stdout.flush()
            if stopped:
                print("[reply stopped; the conversation goes on]", file=sys.stderr)
            if templated:
                messages.append({"role": "assistant", "content": result.text})
            else:
                transcript += result.text + "\n"
    finally:
        engine.close()


def _interruptible(engine: Engine, ids: list[int], params: SamplingParams):
    """A reply streamed to stdout that Ctrl-C stops at the next token (generation runs on a thread; the main
    thread takes the interrupt and tells it to stop): (the result so far, whether it was stopped)."""
    import threading

    cancel, done, box = threading.Event(), threading.Event(), {}

    def work():
        try:
            box["result"] = engine.generate(ids, params, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                                            cancel=cancel)
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="moeshard-chat", daemon=True).start()
    while not done.is_set():  # an Event, not Thread.join: an interrupted join can leave is_alive() wrong (3.11)
        try:
            done.wait(0.1)
        except KeyboardInterrupt:
            cancel.set()
    if "error" in box:
        raise box["error"]
    return box["result"], cancel.is_set()


def cmd_perplexity(args) -> int:
    from ..offload_core.evaluate import cross_entropy

    text_path = args.text or demo_model_path() / "heldout.txt"
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --text {str(text_path)!r}: expected a UTF-8 text file ({exc})") from exc
    context = context_length(model_folder(args))
    if context and args.seq_len > context:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the model's context of {context} tokens "
                         "(max_position_embeddings): its perplexity there would measure positions it was never "
                         f"trained on; use --seq-len {context} or less")
    engine = load_engine(args)
    try:
        start = time.perf_counter()
        result = cross_entropy(engine.model, engine.tokenizer, text, args.seq_len, progress=not args.quiet)
        size = engine.om.size_bytes()
    finally:
        engine.close()
    report = {**result, "seconds": time.perf_counter() - start, "attn_bits": args.attn_bits,
              "expert_bits": args.expert_bits, "size_bytes": size, "text": str(text_path)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f} nats/token) over "
              f"{result['tokens']} tokens of {text_path.name}; attention {args.attn_bits}-bit, experts "
              f"{args.expert_bits}-bit, model size {size / 2**20:.2f} MiB")
    return 0


def cmd_info(args) -> int:
    from ..offload_core.model_info import describe_checkpoint, format_info

    memory = None
    if args.memory is not None:
        try:
            memory = parse_size(args.memory)
        except ValueError as exc:
            raise UsageError(f"--memory: {exc}") from None
    if args.expert_memory == "auto" or isinstance(args.expert_memory, tuple):
        raise UsageError("info --expert-memory takes one size (e.g. 4GiB): 'auto' depends on the machine that runs it")
    if args.routing is not None and args.expert_memory is None:
        raise UsageError("--routing needs --expert-memory: the hit rates it holds are read at that budget")
    routing = None
    if args.routing is not None:
        try:
            routing = json.loads(args.routing.read_text())["cache"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--routing {str(args.routing)!r}: expected the JSON report of moeshard.benchmarks.routing "
                             f"(with its \"cache\" section): {exc}") from None
    report = describe_checkpoint(model_folder(args), memory, args.expert_memory, routing)
    print(json.dumps(report) if args.json else format_info(report))
    return 0


def cmd_serve(args) -> int:
    from .http_security import listen_socket, serve_config
    from .server import build_server

    cfg = getattr(args, "serve_config", None) or serve_config(args)  # checked before anything loads (cli.precheck)
    sock = getattr(args, "listen_socket", None) or listen_socket(cfg.host, cfg.port)
    batch = batch_config(args, args.max_queue)
    engine = load_engine(args)
    try:
        server = build_server(engine, cfg, log_level="warning" if args.quiet else "info", batch=batch,
                              max_tokens=args.max_tokens)
        scheme = "https" if cfg.tls_cert is not None else "http"
        port = sock.getsockname()[1]
        print(f"moe-coordinator: serving {engine.name} at {scheme}://{cfg.host}:{port}/v1 "
              f"({'API key required' if cfg.api_key else 'no API key'})", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        engine.close()
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "demo": cmd_demo, "perplexity": cmd_perplexity,
            "info": cmd_info, "serve": cmd_serve}
