"""The environment variables the engine reads, all here, so that no other module of it reads os.environ (the
programs' credentials are `protos.access`'s)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MOESHARD_CACHE_DIR"  # where quantized caches are written (default ~/.cache/moeshard)
COMPILER_ENV = "CC"  # the C compiler for the CPU kernels (default: cc, gcc or clang on the PATH)


def cache_root_from_env() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moeshard").expanduser()


def compiler_from_env() -> str | None:
    """The C compiler that builds moeshard's CPU kernels (the usual CC variable); None = cc, gcc or clang."""
    return os.environ.get(COMPILER_ENV) or None
