"""moeshard: run Mixture-of-Experts models that do not fit on one GPU, offloaded and spread over workers.

The packages live under this one name: `moeshard.offload_core` (the expert plane: checkpoints, families,
quantization, store, slots, prefetch, the MoE layer), `moeshard.coordinator` (`moe-coordinator`: engine,
workers, failover, HTTP API), `moeshard.worker` (`moe-worker`), `moeshard.protos` (the wire) and
`moeshard.benchmarks`. `load_model` is the library's front door.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moeshard")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["OffloadConfig", "OffloadedModel", "QuantConfig", "__version__", "load_model"]


def __getattr__(name: str):
    if name in ("OffloadConfig", "OffloadedModel", "QuantConfig", "load_model"):
        from . import offload_core

        return getattr(offload_core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
