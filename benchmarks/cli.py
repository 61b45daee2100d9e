"""`moe-coordinator bench`'s arguments (argparse only: `--help` imports nothing heavy)."""
from __future__ import annotations

import argparse
from pathlib import Path

KINDS = ("mixtral", "many-experts", "qwen3-30b-a3b")  # the benchmark models (bench_model.py; kept here: that module imports torch)

# transformers with everything in RAM, once per experts implementation (the fastest is the one to beat)
HF_SYSTEMS = {"hf-eager": "eager", "hf-batched_mm": "batched_mm", "hf-grouped_mm": "grouped_mm"}
SYSTEMS = ("resident", "lru", "lru+prefetch", "naive", "worker", "workers", *HF_SYSTEMS, "accelerate-offload",
           "llama.cpp")
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s != "llama.cpp")  # llama.cpp needs an optional extra
OFFLOADED = ("lru", "lru+prefetch", "naive", "accelerate-offload")
MOESHARD = ("resident", "lru", "lru+prefetch", "naive", "worker", "workers")  # take @E[/A] bits
LLAMA_CPP_TYPES = ("BF16", "F32", "Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M")
REAL_LAYERS = {"qwen3-30b-a3b": 48}  # the real model's layer count, to project per-layer rates to


def base_name(system: str) -> str:
    """'resident@4/4' -> 'resident'; 'llama.cpp@Q4_0' -> 'llama.cpp'."""
    return system.partition("@")[0]


def parse_system(system: str, expert_bits: int = 16, attn_bits: int = 16) -> tuple[str, int | str | None, int | None]:
    """A system name -> (base, expert bits or llama.cpp type, attention bits). moeshard systems take '@E' or '@E/A'
    (HQQ bits of experts and attention; default --expert-bits / --attn-bits), llama.cpp '@TYPE' (default Q4_0);
    other systems take nothing."""
    from ..offload_core.config import ALLOWED_BITS

    base, at, suffix = system.partition("@")
    if base not in SYSTEMS:
        raise ValueError(f"unknown system {base!r}: expected one of {list(SYSTEMS)}")
    if base == "llama.cpp":
        kind = suffix.upper() if at else "Q4_0"
        if kind not in LLAMA_CPP_TYPES:
            raise ValueError(f"{system!r}: llama.cpp type must be one of {list(LLAMA_CPP_TYPES)}, got {suffix!r}")
        return base, kind, None
    if not at:
        return (base, expert_bits, attn_bits) if base in MOESHARD else (base, None, None)
    if base not in MOESHARD:
        raise ValueError(f"{system!r}: only moeshard's systems ({', '.join(MOESHARD)}) take @bits")
    e, slash, a = suffix.partition("/")
    try:
        bits = int(e), int(a) if slash else attn_bits
    except ValueError:
        raise ValueError(f"{system!r}: expected @EXPERT_BITS or @EXPERT_BITS/ATTN_BITS, e.g. resident@4/4") from None
    if bits[0] not in ALLOWED_BITS or bits[1] not in ALLOWED_BITS:
        raise ValueError(f"{system!r}: bits must be in {list(ALLOWED_BITS)}")
    return base, bits[0], bits[1]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _nonnegative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", allow_abbrev=False,
                            help="side-by-side speed benchmark against transformers and accelerate",
                            description="Decode the same prompt with every system on a generated benchmark "
                                        "checkpoint, in one run: every system warmed up, then timed in interleaved "
                                        "rounds; prints a table of medians and spreads, writes JSON and a PNG plot.")
    add_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--verbose", action="store_true", help="log each system as it is built")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="draw decode tokens/s per system")
    p.add_argument("--systems", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all but llama.cpp); worker / "
                        "workers: every expert on one / two local moe-worker processes; moeshard's systems take "
                        "@E or @E/A for their expert / attention bits (resident@4/4), llama.cpp takes its GGUF type "
                        f"(@{'|@'.join(LLAMA_CPP_TYPES)}; default Q4_0; needs pip install 'moeshard[llamacpp]')")
    p.add_argument("--expert-bits", type=int, choices=(16, 8, 4, 3, 2), default=16,
                   help="HQQ bits of moeshard's experts where a system names none (default 16)")
    p.add_argument("--attn-bits", type=int, choices=(16, 8, 4, 3, 2), default=16,
                   help="HQQ bits of moeshard's attention where a system names none (default 16)")
    p.add_argument("--model-kind", choices=KINDS, default="mixtral",
                   help="mixtral: 8 experts of 25 MB, top-2 (the paper's); many-experts: Qwen3-MoE, 64 experts of "
                        "1.5 MB, top-8; qwen3-30b-a3b: two layers of that model's real shape (128 experts of 768, "
                        "top-8, bf16), rates projected to its 48 layers (default mixtral)")
    p.add_argument("--repeats", type=_positive, default=3, metavar="N",
                   help="timed rounds per system, interleaved across systems (default 3)")
    p.add_argument("--tokens", type=_positive, default=16, metavar="N", help="decode steps timed per round (default 16)")
    p.add_argument("--warmup", type=_positive, default=2, metavar="N",
                   help="untimed decode steps per system before the first round (default 2)")
    p.add_argument("--protocol", choices=["cold", "warm"], default="cold",
                   help="cold: drop offloaded files from the page cache before each decode step (default cold)")
    p.add_argument("--device", default="cpu", help="primary device for every system (default cpu)")
    p.add_argument("--store", choices=["disk", "ram"], default="disk",
                   help="where offloaded experts wait: disk (default; the cold protocol applies) or host RAM (GPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the benchmark model's)")
    p.add_argument("--model-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype the benchmark checkpoint is written in (default float32)")
    p.add_argument("--hidden", type=_positive, default=None, help="hidden size (default: the kind's: 1024 / 512)")
    p.add_argument("--intermediate", type=_positive, default=None,
                   help="intermediate size of one expert (default: the kind's: 2048 / 256)")
    p.add_argument("--layers", type=_positive, default=None, help="decoder layers (default: the kind's: 8 / 12)")
    p.add_argument("--slots-per-layer", type=_positive, default=None, metavar="K",
                   help="the memory budget, in unquantized experts per layer (default: half the experts, a quarter "
                        "of many); quantized systems get as many slots as fit in the same bytes")
    p.add_argument("--prefetch", type=_nonnegative, default=2, metavar="M",
                   help="experts per token predicted for the next layer by lru+prefetch (default 2)")
    p.add_argument("--prompt-tokens", type=_positive, default=32, metavar="N", help="prompt length (default 32)")
    p.add_argument("--push", action="store_true",
                   help="also push every expert to an empty worker, beside a plain gRPC byte stream of the same size, "
                        "then start a second coordinator against it (which must send nothing)")
    p.add_argument("--concurrency", default=None, metavar="LIST",
                   help="instead: serve each of resident and lru+prefetch (or those of them in --systems) over HTTP "
                        "and decode LIST concurrent streams (e.g. 1,4,8,16) with the official openai client: "
                        "tokens/s together, time to first token, expert bytes per step (needs: pip install openai)")
    p.add_argument("--shared-prefix", type=_positive, default=None, metavar="N",
                   help="with --concurrency: instead, every chat starts with the same N-token system prompt (e.g. "
                        "512) and each system is served with the prefix cache and without: time to first token of "
                        "repeated requests, prompt tokens reused, tokens computed and expert bytes per request")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the benchmark model is written and reused (default: the system's temp dir)")
