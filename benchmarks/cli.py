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
# --budget-sweep: fractions of all experts' bytes (in the form they are computed in), and the policies compared
DEFAULT_SWEEP = (0.1, 0.25, 0.5, 0.75, 1.0)
SWEEP_POLICIES = ("lru", "router", "global-lru", "global-lfru")


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


def parse_fractions(text: str) -> tuple[float, ...]:
    """'0.1,0.25,1' or '10%,25%,100%' -> (0.1, 0.25, 1.0): budgets as fractions of all experts' bytes, each in (0, 1],
    ascending, none twice."""
    out = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        try:
            value = float(item[:-1]) / 100 if item.endswith("%") else float(item)
        except ValueError:
            raise ValueError(f"--budget-sweep: expected fractions of the experts' bytes such as 0.1,0.25,1.0 (or "
                             f"10%,25%,100%), got {item!r}") from None
        if not 0.0 < value <= 1.0:  # also refuses nan and inf
            raise ValueError(f"--budget-sweep: a budget is a fraction of all experts' bytes in (0, 1] (1.0 = every "
                             f"expert resident), got {item!r}")
        out.append(value)
    if not out:
        raise ValueError("--budget-sweep: expected at least one fraction, e.g. 0.1,0.25,0.5,0.75,1.0")
    if len(set(out)) != len(out):
        raise ValueError(f"--budget-sweep lists a budget twice: {text!r}")
    return tuple(sorted(out))


def parse_policies(text: str) -> tuple[str, ...]:
    """'lru,global-lru' -> the policies the sweep compares, each known and keeping experts between steps."""
    from ..offload_core.config import POLICIES

    names = tuple(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    if not names:
        raise ValueError(f"--policies: expected a comma-separated list, e.g. {','.join(SWEEP_POLICIES)}")
    for name in names:
        if name == "none":
            raise ValueError("--policies: 'none' keeps no expert between steps, so a budget means nothing to it")
        if name not in POLICIES:
            raise ValueError(f"--policies: unknown policy {name!r}: expected some of "
                             f"{[p for p in POLICIES if p != 'none']}")
    return names


def _argparse_type(parse):
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            message = str(e)  # argparse names the flag itself: drop ours
            raise argparse.ArgumentTypeError(message.split(" ", 1)[1].removeprefix(": ") if message.startswith("--")
                                             else message) from None
    wrapped.__name__ = parse.__name__.removeprefix("parse_")  # argparse names the type in its messages
    return wrapped


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
    p.add_argument("--budget-sweep", type=_argparse_type(parse_fractions), nargs="?", default=None,
                   const=DEFAULT_SWEEP, metavar="FRACTIONS",
                   help="instead: decode at several expert-memory budgets, as fractions of all experts' bytes in the "
                        "form they are computed in (10%%,25%% also read), with each of --policies, interleaved "
                        "within each budget; prints tokens/s and hit rate per budget and policy, the 25%% budget's "
                        "verdict against per-layer lru, and writes JSON and a two-panel PNG (default fractions: "
                        f"{','.join(map(str, DEFAULT_SWEEP))}; --json / --plot default to the work folder)")
    p.add_argument("--policies", type=_argparse_type(parse_policies), default=None, metavar="LIST",
                   help=f"with --budget-sweep: the cache policies compared (default {','.join(SWEEP_POLICIES)}); "
                        "lru and router split the bytes evenly over the layers, global-* share them; each prefetches "
                        "--prefetch experts")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the benchmark model is written and reused (default: the system's temp dir)")
