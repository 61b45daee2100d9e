"""moeshard's offload core: checkpoints, family layouts, expert formats and quantization, the host store,
device slots with eviction policies and prefetch, the expert runtime and the offloaded MoE layer.

It knows nothing about the network; the worker and the coordinator build on it. Names are imported on
first use (torch and transformers take seconds to import), so `config` can be read by a CLI that has not
decided yet whether it needs them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"Checkpoint": "checkpoint", "CheckpointError": "checkpoint", "ExpertKey": "experts",
            "OffloadConfig": "config", "QuantConfig": "config", "OffloadedModel": "model", "load_model": "model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
