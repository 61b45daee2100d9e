"""`moe-coordinator`: the coordinator's commands plus `bench`, composed here so that the coordinator never
imports the benchmarks (which import the coordinator to measure it). Nothing heavy is imported before the
arguments are parsed."""
from __future__ import annotations

import sys

from .benchmarks.cli import add_bench_command
from .coordinator.cli import build_parser, run
from .protos.access import quiet_grpc_core


def _bench(args) -> int:
    from .benchmarks.bench import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    quiet_grpc_core()
    parser, commands = build_parser()
    add_bench_command(commands)
    args = parser.parse_args(argv)
    return run(args, {"bench": _bench})


if __name__ == "__main__":
    sys.exit(main())
