"""Expert backends: who computes an expert. `LocalExperts` runs them here, through store, loader and cache.

The interface (shared with the coordinator's `RemoteExperts`): `submit(layer, groups, hint)` starts the
work (and then the prefetch `hint` for the next layer, so demand loads go first) and returns a `Pending`
whose `result()` gives `{expert: [t, D] outputs}`; `run` does both; `prefetch` is a hint and never an
error; `stats()` returns counters. The worker wraps a `LocalExperts` too.
"""
from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.nn.functional as F

from .cache import LayerCache, Loader
from .store import DiskStore, RamStore

# t = tokens routed to one expert, D = hidden size


class Pending(Protocol):
    def result(self) -> dict[int, torch.Tensor]: ...


Hint = tuple[int, list[int]]  # (layer, experts) to prefetch


class ExpertBackend(Protocol):
    name: str

    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None = None) -> Pending: ...

    def prefetch(self, layer: int, experts: list[int]) -> None: ...

    def stats(self) -> dict: ...


# The activations MoE families use, as transformers' ACT2FN defines them; importing ACT2FN itself pulls in
# transformers' kernel hub machinery, seconds of start-up for a worker.
_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class _LocalPending:
    def __init__(self, backend: LocalExperts, layer: int, groups: dict[int, torch.Tensor], order: list[int]):
        self.backend, self.layer, self.groups, self.order = backend, layer, groups, order

    def result(self) -> dict[int, torch.Tensor]:
        return self.backend._compute(self.layer, self.groups, self.order)


class LocalExperts:
    """Experts computed on `device`, each layer with its own LRU of `slots_per_layer` slots."""

    name = "local"

    def __init__(self, source, adapter, fmt, device: torch.device, slots_per_layer: int, layers: list[int],
                 store: str = "ram", act_name: str = "silu", policy: str = "lru", num_experts: int = 0):
        if store not in ("ram", "disk"):
            raise ValueError(f"store must be 'ram' or 'disk', got {store!r}")
        self.adapter, self.format, self.device, self.source = adapter, fmt, device, source
        self.store = RamStore(source, pin_memory=device.type == "cuda") if store == "ram" else DiskStore(source)
        self.loader = Loader(self.store, device)
        self.caches = {layer: LayerCache(layer, slots_per_layer, self.loader, source.nbytes, policy, num_experts)
                       for layer in layers}
        self.act = activation(act_name)

    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None = None) -> _LocalPending:
        order = self.caches[layer].begin(groups)  # starts the loads now; compute happens in result()
        if hint is not None:
            self.prefetch(*hint)
        return _LocalPending(self, layer, groups, order)

    def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.submit(layer, groups).result()

    def _compute(self, layer: int, groups: dict[int, torch.Tensor], order: list[int]) -> dict[int, torch.Tensor]:
        cache = self.caches[layer]
        outputs = {}
        for expert in order:
            buf = cache.acquire(expert)
            start = time.perf_counter()
            x = groups[expert].to(self.device, non_blocking=True)
            weights = self.format.decode(buf)
            outputs[expert] = self.adapter.expert_forward(weights, x.to(self.format.dtype), self.act).to(x.dtype)
            cache.stats.compute_s += time.perf_counter() - start
            cache.release(expert)
        return outputs

    def warm(self) -> None:
        """Fill every layer's slots (all experts when k = E) and wait for the loads: no first-use misses."""
        for cache in self.caches.values():
            experts = list(range(cache.capacity))
            cache.prefetch(experts)
            for e in experts:
                cache.acquire(e)
                cache.release(e)
            cache.stats = type(cache.stats)()  # warming is not part of any run's counters

    def prefetch(self, layer: int, experts: list[int]) -> int:
        cache = self.caches.get(layer)
        return cache.prefetch(experts) if cache is not None else 0

    def stats(self) -> dict:
        return {
            "layers": {layer: cache.stats.as_dict() for layer, cache in self.caches.items()},
            "loader_busy_s": self.loader.busy_s,
            "store": self.store.kind,
            "store_resident_bytes": self.store.resident_bytes,
        }

    def close(self) -> None:
        self.loader.close()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
