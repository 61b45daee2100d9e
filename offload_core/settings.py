"""The environment variables moeshard reads, all here, so that no other module reads os.environ."""
from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "MOESHARD_TOKEN"  # shared secret between a coordinator and its workers
CACHE_ENV = "MOESHARD_CACHE_DIR"  # where quantized caches are written (default ~/.cache/moeshard)
API_KEY_ENV = "MOESHARD_API_KEY"  # the key HTTP clients of `serve` must send (Authorization: Bearer <key>)
GRPC_VERBOSITY_ENV = "GRPC_VERBOSITY"  # gRPC core's own log level (its lines bypass Python's logging)
COMPILER_ENV = "CC"  # the C compiler for the CPU kernels (default: cc, gcc or clang on the PATH)


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def cache_root_from_env() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moeshard").expanduser()


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def compiler_from_env() -> str | None:
    """The C compiler that builds moeshard's CPU kernels (the usual CC variable); None = cc, gcc or clang."""
    return os.environ.get(COMPILER_ENV) or None


def quiet_grpc_core() -> None:
    """gRPC's C core prints its own lines (a failed TLS handshake at INFO, before our clear error): keep errors
    only, unless the user chose a level. Call before grpc is imported."""
    os.environ.setdefault(GRPC_VERBOSITY_ENV, "ERROR")
