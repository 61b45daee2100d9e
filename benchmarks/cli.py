"""`moe-coordinator bench`'s arguments (argparse only: `--help` imports nothing heavy)."""
from __future__ import annotations

import argparse
from pathlib import Path

SYSTEMS = ("resident", "lru", "lru+prefetch", "naive", "workers", "hf-eager", "accelerate-offload")


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", allow_abbrev=False,
                            help="side-by-side speed benchmark against transformers and accelerate",
                            description="Decode the same prompt with every system on a generated benchmark "
                                        "checkpoint, in one run; print a table, write JSON and a PNG plot.")
    add_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--verbose", action="store_true", help="log each system as it runs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="draw decode tokens/s per system")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--protocol", choices=["cold", "warm"], default="cold",
                   help="cold: drop offloaded files from the page cache before each decode step (default)")
    p.add_argument("--device", default="cpu", help="primary device for every system (default cpu)")
    p.add_argument("--store", choices=["disk", "ram"], default="disk",
                   help="where offloaded experts wait: disk (default; the cold protocol applies) or host RAM (GPU)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the benchmark model's)")
    p.add_argument("--model-dtype", default="float32", help="dtype the benchmark checkpoint is written in")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--slots-per-layer", type=int, default=4, help="the memory budget, in experts per layer")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed per system")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before the timed ones")
    p.add_argument("--workdir", type=Path, default=None, help="where the benchmark model is written (reused)")
