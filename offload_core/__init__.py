"""moeshard's offload core: checkpoint reading, family adapters, expert store, LRU cache, prefetch, MoE layer.

It knows nothing about the network; the worker and the coordinator build on it. `load_model` (and the
transformers model machinery behind it) is imported on first use, so a worker starts quickly.
"""
from .checkpoint import Checkpoint, CheckpointError
from .quant_config import QuantConfig
from .store import ExpertKey

__all__ = ["Checkpoint", "CheckpointError", "ExpertKey", "OffloadConfig", "QuantConfig", "load_model"]


def __getattr__(name: str):
    if name in ("load_model", "OffloadConfig"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'offload_core' has no attribute {name!r}")
