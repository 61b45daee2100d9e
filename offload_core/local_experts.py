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
from dataclasses import dataclass, replace
from typing import Iterable

import torch

from .checkpoint import Checkpoint
from .config import GLOBAL_POLICIES, OffloadConfig, SettingError, human_bytes, resolve_device
from .counters import ExpertCounters
from .experts import ExpertMath
from .formats import expert_format
from .slots import LayerSlots, Loader, build_slots
from .stores import CheckpointSource, DiskStore, ExpertSource, RamStore

logger = logging.getLogger(__name__)

# t = tokens routed to one expert, S = rows of a grouped call, k = slots per layer, D = hidden size

Hint = tuple[int, list[int]]  # (layer, experts) to prefetch


class _LocalPending:
    def __init__(self, backend: LocalExperts, layer: int, groups: dict[int, torch.Tensor], order: list[int]):
        self.backend, self.layer, self.groups, self.order = backend, layer, groups, order

    def result(self) -> dict[int, torch.Tensor]:
        return self.backend._compute(self.layer, self.groups, self.order)


@dataclass(frozen=True)
class Placement:
    """Layers whose expert slots live on one device: `rows` slots in all (a byte budget), or None = k per layer."""

    device: torch.device
    layers: tuple[int, ...]
    rows: int | None = None
    budget: ExpertMemory | None = None  # how `rows` was sized, for the start-up line


class LocalExperts:
    """Experts computed through slots on this process's device(s): `slots_per_layer` per layer, or `rows` in all (a
    byte budget divided by one slot's bytes), shared by every layer under a global policy, split evenly under a
    per-layer one. With several devices (`spread`), each holds the slots of some layers, with its own budget and
    loader; outputs come back to `device`, the primary one."""

    def __init__(self, source: ExpertSource, fmt, math: ExpertMath, device: torch.device, layers: list[int],
                 num_experts: int, slots_per_layer: int, store: str = "ram", policy: str = "lru",
                 rows: int | None = None, spread: list[Placement] | None = None):
        self.source, self.format, self.math, self.device = source, fmt, math, device
        self.num_experts, self.layers = num_experts, list(layers)
        self.store = RamStore(source, pin_memory=device.type == "cuda") if store == "ram" else DiskStore(source)
        self.placements = spread or [Placement(device, tuple(layers), rows)]
        # A slot holds the format's compute form; filling it converts from the stored form where they differ.
        converts = fmt.compute_layout is not fmt.layout
        self.loaders = {str(p.device): Loader(self.store, p.device, fill=fmt.fill if converts else None)
                        for p in self.placements}
        self.loader = self.loaders[str(self.placements[0].device)]
        self.slot_bytes = fmt.compute_layout.nbytes
        self.policy = policy
        self._build(slots_per_layer=None if self.placements[0].rows is not None else slots_per_layer)
        # One call per projection for all the resident experts of a layer (dense: grouped matmul over strided
        # views of the slot slab; quantized on CPU: moeshard's kernels), where the device allows.
        self.grouped = fmt.grouped(device)

    def _build(self, slots_per_layer: int | None = None) -> None:
        self.slots = {}
        for p in self.placements:
            self.slots.update(build_slots(list(p.layers), self.loaders[str(p.device)], self.slot_bytes, self.policy,
                                          self.num_experts, slots_per_layer=slots_per_layer,
                                          rows=None if slots_per_layer is not None else p.rows))
        first = next(iter(self.slots.values()), None)
        # k: a layer's own slots, or its fair share of a global cache (what a prefetch for it may fill)
        self.slots_per_layer = first.capacity if first is not None else (slots_per_layer or 1)
        pools = {id(s.pool): s.pool.rows for s in self.slots.values()}
        self.rows = sum(pools.values())  # slots in all, on every device

    def memory_lines(self) -> list[str]:
        """What each device's expert-memory budget bought (none when slots per layer were given)."""
        return [p.budget.line(self.policy, len(p.layers)) + (f" on {p.device}, layers {p.layers[0]}-{p.layers[-1]}"
                                                             if len(self.placements) > 1 else "")
                for p in self.placements if p.budget is not None and p.layers]

    @property
    def expert_memory(self) -> int:
        """Bytes of device slots for experts."""
        return self.rows * self.slot_bytes

    def set_slots(self, slots_per_layer: int, policy: str | None = None) -> None:
        """Compute with `slots_per_layer` slots per layer (a global cache: as many in all), evicted by `policy` (None:
        the current one), from now on (a worker told so by its coordinator): when either changes, every layer's slots
        start empty; the store keeps what it holds."""
        if slots_per_layer < 1 or slots_per_layer > self.num_experts:
            raise ValueError(f"slots per layer must be in 1..{self.num_experts}, got {slots_per_layer}")
        if slots_per_layer == self.slots_per_layer and policy in (None, self.policy):
            return
        self.policy = policy or self.policy
        self._build(slots_per_layer=slots_per_layer)

    def reset_layer(self, layer: int) -> None:
        """Forget what `layer`'s slots hold (one of its loads failed, which breaks that slot's chain of loads)."""
        if layer in self.slots:
            self.slots[layer].clear()

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
                "loader_busy_s": sum(loader.busy_s for loader in self.loaders.values()), "grouped": self.grouped, "compute": self.format.compute,
                "slot_bytes": self.slot_bytes, "slots": self.rows, "expert_memory": self.expert_memory,
                "policy": self.policy}

    # -- compute ------------------------------------------------------------------------------
    def _compute(self, layer: int, groups: dict[int, torch.Tensor], order: list[int]) -> dict[int, torch.Tensor]:
        slots = self.slots[layer]
        outputs: dict[int, torch.Tensor] = {}
        if not self.grouped:
            for expert in order:
                buf = slots.acquire(expert)
                start = time.perf_counter()
                x = groups[expert].to(slots.loader.device, non_blocking=True)
                outputs[expert] = self.format.forward(self.math, buf, x).to(self.device, x.dtype)
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
        x = torch.cat([groups[e] for e in wave]).to(slots.loader.device, non_blocking=True)  # [S, D]
        y = self.format.forward_grouped(self.math, slots.slab, index, counts, x).to(self.device)  # [S, D]
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
        for loader in self.loaders.values():
            loader.close()
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
    layers = list(layers if layers is not None else layout.sparse_layers)
    store = cfg.store_for(device.type)
    host_bytes = fmt.layout.nbytes if store == "ram" and device.type == "cpu" else 0
    devices = [resolve_device(d) for d in cfg.expert_devices] if len(cfg.expert_devices) > 1 else [device]
    spread = place_layers(cfg, devices, layers, layout.num_experts, fmt.compute_layout.nbytes, host_bytes)
    return LocalExperts(source, fmt, layout.math, device, layers, layout.num_experts, cfg.slots_per_layer, store,
                        cfg.policy, spread=spread)


def place_layers(cfg: OffloadConfig, devices: list[torch.device], layers: list[int], num_experts: int,
                 slot_bytes: int, host_bytes: int = 0, memories: list | None = None) -> list[Placement]:
    """Which layers' slots live on which device, and how many slots each device's budget buys. One device: every
    layer. Several (the GPUs of one machine): consecutive layers, as many on each as its budget's share (an even split
    when slots per layer are given), each device's slots sized from its own budget (`memories`: one per device;
    default the config's)."""
    if len(devices) == 1:
        budget = ExpertMemory.plan(cfg, devices[0], len(layers), num_experts, slot_bytes, host_bytes)
        return [Placement(devices[0], tuple(layers), budget.rows if budget else None, budget)]
    if cfg.expert_memory is None:
        shares = [1.0] * len(devices)
    else:
        # Each device's budget on its own (checked per device once its layers are known, below)
        memories = memories or [cfg.memory_for(i) for i in range(len(devices))]
        plans = [ExpertMemory.plan(replace(cfg, expert_memory=memories[i], expert_devices=(),
                                           policy=GLOBAL_POLICIES[0]), d, len(layers), num_experts, slot_bytes,
                                   host_bytes) for i, d in enumerate(devices)]
        shares = [p.rows for p in plans]
    counts = _split(len(layers), shares)
    out, start = [], 0
    for i, (d, n) in enumerate(zip(devices, counts)):
        mine = tuple(layers[start:start + n])
        start += n
        if cfg.expert_memory is None:
            out.append(Placement(d, mine))
            continue
        rows = min(plans[i].rows, n * num_experts)
        if mine and cfg.policy not in GLOBAL_POLICIES and rows < n:
            raise SettingError("expert_memory", f"{d}'s expert memory holds {rows} experts, fewer than one for each of "
                                                f"its {n} layers")
        budget = ExpertMemory(rows, slot_bytes, n * num_experts, plans[i].how)
        out.append(Placement(d, mine, rows if mine else None, budget))
    return [p for p in out if p.layers]


def _split(n: int, shares: list[float]) -> list[int]:
    """n items in proportion to `shares` (largest remainders), every share > 0 getting at least one while n allows."""
    total = sum(shares) or 1.0
    exact = [n * s / total for s in shares]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i, c in enumerate(counts):  # a device with a budget gets a layer, taken from the one with the most
        if c == 0 and shares[i] > 0 and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


AUTO_HEADROOM = 0.10  # expert memory "auto": this share of the device's memory (at least AUTO_HEADROOM_MIN) is left
AUTO_HEADROOM_MIN = 1 << 30  # for activations, the KV cache and the allocator (host RAM: for everything else too)


@dataclass(frozen=True)
class ExpertMemory:
    """What an expert-memory budget bought on one device: `rows` slots of `slot_bytes`, and how it was sized."""

    rows: int
    slot_bytes: int
    all_experts: int  # experts of the layers this device computes
    how: str  # "asked" or what "auto" saw

    @property
    def bytes(self) -> int:
        return self.rows * self.slot_bytes

    def line(self, policy: str, layers: int) -> str:
        share = self.rows / self.all_experts
        scope = "one cache for all layers" if policy in GLOBAL_POLICIES else f"{self.rows // layers} per layer"
        return (f"expert memory {human_bytes(self.bytes)} ({self.how}): {self.rows} slots of "
                f"{human_bytes(self.slot_bytes)}, {share:.0%} of the {self.all_experts} experts, {scope} ({policy})")

    @classmethod
    def plan(cls, cfg: OffloadConfig, device: torch.device, layers: int, num_experts: int, slot_bytes: int,
             host_store_bytes: int = 0) -> ExpertMemory | None:
        """Slots for `cfg.expert_memory` on `device` (None when `cfg.slots_per_layer` decides). A budget below one
        slot, or below one per layer for a per-layer policy, is an error naming what would do; more than every
        expert is trimmed. `host_store_bytes`: one expert in a RAM store on this same memory (CPU), which "auto"
        leaves room for."""
        memory = cfg.memory_for(0)
        if memory is None or layers == 0:
            return None
        every = layers * num_experts
        if memory == "auto":
            free, total, where = _free_memory(device)
            headroom = max(AUTO_HEADROOM_MIN, int(total * AUTO_HEADROOM))
            offered = free - headroom - every * host_store_bytes
            least = layers if cfg.policy not in GLOBAL_POLICIES else 1
            rows = max(least, min(every, offered // slot_bytes))
            how = (f"auto: {human_bytes(free)} free {where}, less {human_bytes(headroom)} headroom"
                   + (f" and {human_bytes(every * host_store_bytes)} for the RAM store" if host_store_bytes else "")
                   + (", capped at every expert" if rows == every else "")
                   + (f"; below one slot per layer, so {least}" if offered // slot_bytes < least else ""))
            return cls(int(rows), slot_bytes, every, how)
        asked = int(memory)
        rows = asked // slot_bytes
        if rows < 1:
            raise SettingError("expert_memory", f"expert memory of {human_bytes(asked)} holds no expert: one takes "
                                                f"{human_bytes(slot_bytes)} in its compute form")
        if cfg.policy not in GLOBAL_POLICIES and rows < layers:
            raise SettingError("expert_memory", f"expert memory of {human_bytes(asked)} holds {rows} experts of "
                                                f"{human_bytes(slot_bytes)}, fewer than one per MoE layer ({layers}): "
                                                f"give at least {human_bytes(layers * slot_bytes)}, or a global "
                                                f"policy (global-lru), which needs only one")
        return cls(min(rows, every), slot_bytes, every, "asked" if rows <= every else "asked; capped at every expert")


def _free_memory(device: torch.device) -> tuple[int, int, str]:
    """(free, total, where) bytes of the memory the slots would live in."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total), f"on {device}"
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total), "in RAM"


def expert_fingerprint(ckpt: Checkpoint, layout, fmt) -> str:
    """What a coordinator and a worker must agree on: the checkpoint (a sample of its bytes too), the
    family's expert structure and arithmetic, the expert format, and who chose the quantized codes."""
    experts = fmt.describe()
    if getattr(fmt, "quantized", False):
        experts = {**experts, "quantizer": fmt.quantizer}
    return ckpt.fingerprint({"experts": experts, "family": layout.describe()}, sample=layout.fingerprint_sample())
