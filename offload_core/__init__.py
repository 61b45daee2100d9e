"""moeshard's offload core: checkpoint reading, family adapters, expert store, LRU cache, prefetch, MoE layer.

It knows nothing about the network; the worker and the coordinator build on it.
"""
from .checkpoint import Checkpoint, CheckpointError
from .model import OffloadConfig, load_model
from .quant import QuantConfig
from .store import ExpertKey

__all__ = ["Checkpoint", "CheckpointError", "ExpertKey", "OffloadConfig", "QuantConfig", "load_model"]
