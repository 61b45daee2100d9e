"""`moe-worker`: host a share of a model's experts on this machine or GPU and compute them for a coordinator.

Listens on loopback unless told otherwise. SIGTERM (or Ctrl-C) drains in-flight requests and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from .. import __version__
from ..offload_core.config import ALLOWED_BITS, KERNELS, OffloadConfig, QuantConfig
from ..offload_core.config import parse_size as _parse_size
from ..protos.access import quiet_grpc_core, token_from_env

logger = logging.getLogger("moeshard.worker")

def parse_size(text: str) -> int:
    try:
        return _parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-worker", allow_abbrev=False,
                                description="Host a share of an MoE model's experts and compute them for a "
                                            "moe-coordinator over gRPC. Activations travel, weights do not.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--model", type=Path, default=None,
                   help="this machine's own copy of the checkpoint folder (optional: without it the worker waits for "
                        "a coordinator to join it and send just its share of the experts, kept under --cache-dir)")
    p.add_argument("--listen", default="127.0.0.1:50051",
                   help="HOST:PORT to listen on (default 127.0.0.1:50051, loopback only; port 0 picks a free one)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--memory", type=parse_size, default=None, metavar="SIZE",
                   help="memory for the experts this worker hosts, e.g. 12GiB: their copies in RAM (--store ram), "
                        "and with the rest its expert slots, in bytes of the form they are computed in, as the "
                        "coordinator's --expert-memory (default: 80%% of what is free)")
    p.add_argument("--disk", type=parse_size, default=None, metavar="SIZE",
                   help="disk offered for received experts, every model's together, e.g. 100GiB (default: no limit "
                        "but the disk's)")
    p.add_argument("--allow-model-switch", action="store_true",
                   help="let a coordinator of another model take this worker over (default: the first coordinator "
                        "to join keeps it until the worker restarts; received experts of other models stay on disk)")
    p.add_argument("--slots-per-layer", type=_positive_int, default=None, metavar="K",
                   help="at most this many expert slots per layer (default: as many as --memory buys, at most the "
                        "experts it hosts in a layer)")
    p.add_argument("--store", choices=["ram", "disk"], default="ram",
                   help="hosted experts in RAM (default) or read from disk on every miss")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="with --model: expert compute dtype, as the coordinator's (default: the checkpoint's); "
                        "without --model the coordinator's format applies")
    p.add_argument("--expert-bits", type=int, choices=ALLOWED_BITS, default=None,
                   help="with --model: HQQ bits for the hosted experts, as the coordinator's (default 16 = none)")
    p.add_argument("--expert-group", type=_positive_int, default=None,
                   help="with --model: expert quantization group (default: 16 at 2 bits, 64 otherwise)")
    p.add_argument("--quant-kernel", choices=list(KERNELS), default="auto",
                   help="auto: compute quantized experts from their packed codes with moeshard's CPU kernels; "
                        "reference: dequantize on every call (slow; for checking) (default auto)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where received and quantized experts are kept (default: $MOESHARD_CACHE_DIR or "
                        "~/.cache/moeshard)")
    p.add_argument("--max-tokens", type=_positive_int, default=8192, help="most rows per request (default 8192)")
    p.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                   help="drain time for in-flight requests on SIGTERM (default 5)")
    p.add_argument("--token", default=None,
                   help="shared secret every request must carry (default: $MOESHARD_TOKEN); required when "
                        "listening off loopback")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="certificate chain: serve TLS only")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="private key for --tls-cert")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write the bound HOST:PORT to this file once SERVING (for scripts and port 0)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror}") from exc


def check_format_flags(args) -> None:
    """--dtype / --expert-bits / --expert-group describe a worker's own copy of the model (--model)."""
    if args.model is None and (args.dtype or args.expert_bits is not None or args.expert_group):
        raise ValueError("--dtype, --expert-bits and --expert-group apply with --model; a worker without --model "
                         "computes in the format its coordinator sends")


def configs(args):
    """(ShardConfig, ServerConfig) from the arguments: every check that needs no model, before anything loads."""
    from .server import ServerConfig
    from .shard import ShardConfig

    check_format_flags(args)
    if args.model is not None and not args.model.expanduser().is_dir():
        raise ValueError(f"--model {str(args.model)!r} is not a folder: expected this machine's copy of the checkpoint "
                         "folder (config.json, *.safetensors), or no --model to receive the experts")
    server_cfg = ServerConfig(listen=args.listen, grace_s=args.grace, token=args.token or token_from_env(),
                              tls_cert=_read(args.tls_cert), tls_key=_read(args.tls_key))
    offload = OffloadConfig(device=args.device or _default_device(), slots_per_layer=args.slots_per_layer or 2,
                            prefetch=0, store=args.store, dtype=args.dtype,
                            quant=QuantConfig(expert_bits=args.expert_bits or 16, expert_group=args.expert_group,
                                              kernel=args.quant_kernel),
                            cache_dir=args.cache_dir)
    shard_cfg = ShardConfig(model=args.model, offload=offload, memory_bytes=args.memory, disk_bytes=args.disk,
                            max_tokens=args.max_tokens, allow_model_switch=args.allow_model_switch,
                            max_slots_per_layer=args.slots_per_layer)
    return shard_cfg, server_cfg


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


async def _serve(args) -> int:
    from .server import WorkerServer

    shard_cfg, server_cfg = configs(args)
    server = WorkerServer(shard_cfg, server_cfg)
    address = await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await server.load()
    except BaseException:
        await server.stop(0)
        raise
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(address)
        os.replace(tmp, args.ready_file)
    what = shard_cfg.model if shard_cfg.model is not None else "experts received from a coordinator"
    print(f"moe-worker: serving {what} on {address}", flush=True)
    if shard_cfg.model is None:
        server.preload()
    await stopping.wait()
    logger.info("shutting down: draining in-flight requests (up to %.1f s)", args.grace)
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_grpc_core()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(args))
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"moe-worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
