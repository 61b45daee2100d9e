"""`LocalExperts`: experts computed on this process's device, through source, store, slots and loader.

The coordinator computes the experts it keeps (or falls back to) with one; a worker wraps one in its
`ExpertShard`. `submit(layer, groups, hint)` starts the loads now (and then the prefetch `hint` for the
next layer, so demand loads go first) and returns a pending result whose `result()` computes. Resident
experts of a layer are computed together, one call per projection over the layer's slot slab (dense: a
grouped matmul over strided views; quantized: moeshard's packed kernels), not one Python call per expert.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import torch

from .checkpoint import Checkpoint
from .config import OffloadConfig
from .counters import ExpertCounters
from .experts import ExpertMath
from .formats import expert_format
from .policies import make_policy
from .slots import LayerSlots, Loader
from .stores import CheckpointSource, DiskStore, ExpertSource, RamStore

logger = logging.getLogger(__name__)

# t = tokens routed to one expert, S = rows of a grouped call, k = slots per layer, D = hidden size

Hint = tuple[int, list[int]]  # (layer, experts) to prefetch


class _LocalPending:
    def __init__(self, backend: LocalExperts, layer: int, groups: dict[int, torch.Tensor], order: list[int]):
        self.backend, self.layer, self.groups, self.order = backend, layer, groups, order

    def result(self) -> dict[int, torch.Tensor]:
        return self.backend._compute(self.layer, self.groups, self.order)


class LocalExperts:
    """Experts computed on `device`, each layer with its own `slots_per_layer` slots and eviction policy."""

    def __init__(self, source: ExpertSource, fmt, math: ExpertMath, device: torch.device, layers: list[int],
                 num_experts: int, slots_per_layer: int, store: str = "ram", policy: str = "lru"):
        self.source, self.format, self.math, self.device = source, fmt, math, device
        self.num_experts, self.slots_per_layer = num_experts, slots_per_layer
        self.store = RamStore(source, pin_memory=device.type == "cuda") if store == "ram" else DiskStore(source)
        # A slot holds the format's compute form; filling it converts from the stored form where they differ.
        converts = fmt.compute_layout is not fmt.layout
        self.loader = Loader(self.store, device, fill=fmt.fill if converts else None)
        self.slot_bytes = fmt.compute_layout.nbytes
        self._policy = policy
        self.slots = {layer: LayerSlots(layer, slots_per_layer, self.loader, self.slot_bytes,
                                        make_policy(policy, num_experts)) for layer in layers}
        # One call per projection for all the resident experts of a layer (dense: grouped matmul over strided
        # views of the slot slab; quantized on CPU: moeshard's kernels), where the device allows.
        self.grouped = fmt.grouped(device)

    def set_slots(self, slots_per_layer: int) -> None:
        """Compute with `slots_per_layer` slots per layer from now on (a worker told so by its coordinator): every
        layer's slots start empty; the store keeps what it holds."""
        if slots_per_layer < 1 or slots_per_layer > self.num_experts:
            raise ValueError(f"slots per layer must be in 1..{self.num_experts}, got {slots_per_layer}")
        if slots_per_layer == self.slots_per_layer:
            return
        self.slots_per_layer = slots_per_layer
        self.slots = {layer: LayerSlots(layer, slots_per_layer, self.loader, self.slot_bytes,
                                        make_policy(self._policy, self.num_experts)) for layer in self.slots}

    # -- the backend interface ----------------------------------------------------------------
    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None = None) -> _LocalPending:
        order = self.slots[layer].begin(groups)  # starts the loads now; compute happens in result()
        if hint is not None:
            self.prefetch(*hint)
        return _LocalPending(self, layer, groups, order)

    def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.submit(layer, groups).result()

    def prefetch(self, layer: int, experts: list[int], skip: Iterable[int] = ()) -> list[int]:
        """Start loading the first `experts` of `layer` that fit its slots (a hint, best first), except those in
        `skip` (hinted already); returns the ones that fit. No predicted expert is evicted for another: with
        several sequences in a step most experts are predicted, and the resident ones are needed too."""
        slots = self.slots.get(layer)
        if slots is None:
            return []
        ranked = list(dict.fromkeys(experts))
        wanted = ranked[: slots.capacity]
        skip = set(skip)
        slots.prefetch([e for e in wanted if e not in skip], protect=ranked)
        return wanted

    def counters(self) -> dict[int, ExpertCounters]:
        return {layer: slots.counters for layer, slots in self.slots.items()}

    def describe(self) -> dict:
        return {"store": self.store.kind, "store_resident_bytes": self.store.resident_bytes,
                "loader_busy_s": self.loader.busy_s, "grouped": self.grouped, "compute": self.format.compute,
                "slot_bytes": self.slot_bytes}

    # -- compute ------------------------------------------------------------------------------
    def _compute(self, layer: int, groups: dict[int, torch.Tensor], order: list[int]) -> dict[int, torch.Tensor]:
        slots = self.slots[layer]
        outputs: dict[int, torch.Tensor] = {}
        if not self.grouped:
            for expert in order:
                buf = slots.acquire(expert)
                start = time.perf_counter()
                x = groups[expert].to(self.device, non_blocking=True)
                outputs[expert] = self.format.forward(self.math, buf, x).to(x.dtype)
                slots.counters.compute_s += time.perf_counter() - start
                slots.release(expert)
            return outputs
        # Waves: every expert that holds a slot is computed together; an expert deferred by begin() (more
        # needed than slots) waits for the wave before it to release its slots.
        wave: list[int] = []
        for expert in order:
            if wave and not slots.has_slot(expert):
                self._run_wave(slots, wave, groups, outputs)
                wave = []
            slots.acquire(expert)
            wave.append(expert)
        if wave:
            self._run_wave(slots, wave, groups, outputs)
        return outputs

    def _run_wave(self, slots: LayerSlots, wave: list[int], groups: dict[int, torch.Tensor],
                  outputs: dict[int, torch.Tensor]) -> None:
        start = time.perf_counter()
        wave = sorted(wave, key=slots.slot_of)  # rows grouped by slot, slots ascending
        index = [slots.slot_of(e) for e in wave]
        counts = [int(groups[e].shape[0]) for e in wave]
        dtype = groups[wave[0]].dtype
        x = torch.cat([groups[e] for e in wave]).to(self.device, non_blocking=True)  # [S, D]
        y = self.format.forward_grouped(self.math, slots.slab, index, counts, x)  # [S, D]
        for e, part in zip(wave, y.split(counts)):
            outputs[e] = part.to(dtype)
        slots.counters.compute_s += time.perf_counter() - start
        for e in wave:
            slots.release(e)

    def warm(self) -> None:
        """Fill every layer's slots (all experts when k = E) and wait for the loads: no first-use misses."""
        for slots in self.slots.values():
            experts = list(range(slots.capacity))
            slots.prefetch(experts)
            for e in experts:
                slots.acquire(e)
                slots.release(e)
            slots.counters = ExpertCounters()  # warming is not part of any run's counters

    def close(self) -> None:
        self.loader.close()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def open_local_experts(ckpt: Checkpoint, layout, cfg: OffloadConfig, device: torch.device, dtype: torch.dtype,
                       progress: bool = False, layers: list[int] | None = None) -> LocalExperts:
    """The expert side of a model from its checkpoint (shared by the coordinator and the worker).

    Dense experts are read from the checkpoint itself; quantized ones from the quantized cache, which is
    built on first use (on the GPU when there is one: quantizing is much faster there)."""
    fmt = expert_format(layout.tensors, cfg.quant, dtype, quant_device=device if device.type == "cuda" else None,
                        device=device)
    if cfg.quant.experts_quantized:
        from .quantized_cache import QuantizedCacheSource, open_quantized_cache

        cache = open_quantized_cache(ckpt, layout, fmt, expert_fingerprint(ckpt, layout, fmt), root=cfg.cache_dir,
                                     progress=progress)
        source: ExpertSource = QuantizedCacheSource(cache, drop_page_cache=ckpt.drop_page_cache)
    else:
        source = CheckpointSource(ckpt, layout, fmt)
    return LocalExperts(source, fmt, layout.math, device, layers if layers is not None else layout.sparse_layers,
                        layout.num_experts, cfg.slots_per_layer, cfg.store_for(device.type), cfg.policy)


def expert_fingerprint(ckpt: Checkpoint, layout, fmt) -> str:
    """What a coordinator and a worker must agree on: the checkpoint (a sample of its bytes too), the
    family's expert structure and arithmetic, the expert format, and who chose the quantized codes."""
    experts = fmt.describe()
    if getattr(fmt, "quantized", False):
        experts = {**experts, "quantizer": fmt.quantizer}
    return ckpt.fingerprint({"experts": experts, "family": layout.describe()}, sample=layout.fingerprint_sample())
