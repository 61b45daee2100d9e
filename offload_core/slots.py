"""The device tier: one layer's k expert slots, and the loader that fills them off the compute path.

`LayerSlots` decides (on the compute thread) which expert sits in which slot, with an eviction policy
(`policies.py`); `Loader` moves bytes from the host store into a slot on its own threads and, on CUDA,
its own stream, so that loads overlap compute. An expert the current call still needs is pinned and
never evicted; a prefetch never evicts a pinned expert or another expert of the same prefetch. A layer's
slots are rows of one slab [k, nbytes], so resident experts can be viewed together, strided, for one
grouped matmul. On CPU the slots are RAM and the same code runs. Counters are kept here, per layer.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .counters import ExpertCounters
from .experts import ExpertKey
from .config import GLOBAL_POLICIES
from .policies import EvictionPolicy, GlobalPolicy, LRUPolicy, make_global_policy, make_policy

_STAGING_BUFFERS = 2  # pinned bounce buffers per loader thread (disk store on CUDA): read one, copy the other
LOADER_THREADS = 4  # reads in flight at once: a disk (NVMe, virtio) serves several faster than one by one


class Loader:
    """Copies packed experts from a store into slot buffers on background threads (and one CUDA stream).

    Several threads keep several reads in flight, which a disk serves faster than one at a time; a load
    into a slot waits for that slot's previous load, so two loads never write one slot at once.
    """

    def __init__(self, store, device: torch.device, threads: int = LOADER_THREADS, fill=None):
        self.store, self.device = store, device
        # fill(stored, slot): the slot's compute form from a stored buffer; None = the bytes are copied as stored
        self.fill = fill
        self.cuda = device.type == "cuda"
        self.busy_s = 0.0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moeshard-loader")
        self._local = threading.local()  # per thread: pinned bounce buffers for a disk store on CUDA
        if self.cuda:
            self._stream = torch.cuda.Stream(device=device)

    def submit(self, key: ExpertKey, dst: torch.Tensor, free_event, previous: Future | None = None) -> Future:
        return self._pool.submit(self._load, key, dst, free_event, previous)

    def _staging(self):
        local = self._local
        if not hasattr(local, "buffers"):
            local.buffers = [torch.empty(self.store.nbytes, dtype=torch.uint8, pin_memory=True)
                             for _ in range(_STAGING_BUFFERS)]
            local.done, local.next = [None] * _STAGING_BUFFERS, 0
        return local

    def _load(self, key: ExpertKey, dst: torch.Tensor, free_event, previous: Future | None):
        if previous is not None:
            previous.result()  # submitted earlier, so already running or done: no deadlock
        start = time.perf_counter()
        try:
            if not self.cuda:
                if self.fill is None:
                    self.store.read_into(key, dst)
                    return None
                src = self.store.host_buffer(key)
                if src is None:  # disk store: read into this thread's buffer, then convert into the slot
                    local = self._local
                    if not hasattr(local, "host"):
                        local.host = torch.empty(self.store.nbytes, dtype=torch.uint8)
                    src = local.host
                    self.store.read_into(key, src)
                self.fill(src, dst)
                return None
            src = self.store.host_buffer(key)
            local = index = None
            if src is None:  # disk store: read into a pinned bounce buffer, then copy
                local = self._staging()
                index, local.next = local.next, (local.next + 1) % _STAGING_BUFFERS
                if local.done[index] is not None:
                    local.done[index].synchronize()
                src = local.buffers[index]
                self.store.read_into(key, src)
            with torch.cuda.stream(self._stream):
                if free_event is not None:  # the slot's previous expert may still be in use by a kernel
                    self._stream.wait_event(free_event)
                if self.fill is None:
                    dst.copy_(src, non_blocking=True)
                else:  # the stored bytes to the device, converted there into the slot
                    self.fill(src.to(self.device, non_blocking=True), dst)
                done = torch.cuda.Event()
                done.record(self._stream)
            if local is not None:
                local.done[index] = done
            return done
        finally:
            with self._lock:
                self.busy_s += time.perf_counter() - start

    def wait(self, pending: Future) -> None:
        done = pending.result()
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Slot:
    __slots__ = ("index", "buffer", "layer", "expert", "pending", "prefetched", "free_event")

    def __init__(self, index: int, buffer: torch.Tensor):
        self.index, self.buffer = index, buffer
        self.layer: int | None = None
        self.expert: int | None = None
        self.pending: Future | None = None
        self.prefetched = False
        self.free_event = None


class SlotPool:
    """`rows` slots, rows of one slab [rows, nbytes] on the loader's device, drawn on by one layer (k slots per
    layer, the paper's cache) or by every layer (a global cache: one budget, layers take what their routing needs).

    Keeps the recency of every resident (layer, expert), least recent first, and picks victims: a global policy's
    `victim` among the evictable entries of every layer; otherwise the asking layer's own policy among its own.
    """

    def __init__(self, rows: int, loader: Loader, nbytes: int, policy: GlobalPolicy | None = None):
        if rows < 1:
            raise ValueError(f"an expert cache needs at least one slot, got {rows}")
        self.rows, self.policy = rows, policy
        self.slab = torch.empty(rows, nbytes, dtype=torch.uint8, device=loader.device)  # [rows, nbytes]
        self._free = [_Slot(i, self.slab[i]) for i in reversed(range(rows))]  # pop() takes slot 0 first
        self._order: OrderedDict[tuple[int, int], _Slot] = OrderedDict()  # (layer, expert), LRU first
        self._members: dict[int, LayerSlots] = {}

    def join(self, slots: LayerSlots) -> None:
        self._members[slots.layer] = slots

    @property
    def free(self) -> int:
        return len(self._free)

    def touch(self, layer: int, expert: int) -> None:
        self._order.move_to_end((layer, expert))

    def used(self, layer: int, experts) -> None:
        if self.policy is not None:
            self.policy.used(layer, experts)

    def add(self, slot: _Slot) -> None:
        self._order[(slot.layer, slot.expert)] = slot

    def give_back(self, slot: _Slot) -> None:
        """A slot whose expert is dropped without being evicted (a layer clearing itself)."""
        self._order.pop((slot.layer, slot.expert), None)
        slot.layer = slot.expert = None
        slot.prefetched = False
        self._free.append(slot)

    def take(self, asking: LayerSlots, protect: set[int]) -> _Slot | None:
        """A free slot, else one evicted from an expert that no layer call has pinned (and, of the asking layer's,
        none in `protect`); None when there is none."""
        if self._free:
            return self._free.pop()

        if self.policy is None:  # one layer's own slots: its policy decides among them, LRU first
            candidates = [e for (_, e) in self._order if e not in asking.pinned and e not in protect]
            if not candidates:
                return None
            key = (asking.layer, asking.policy.victim(candidates))
        else:
            def evictable(key: tuple[int, int]) -> bool:
                layer, expert = key
                return expert not in self._members[layer].pinned and not (layer == asking.layer and expert in protect)

            key = self.policy.victim(k for k in self._order if evictable(k))
            if key is None:
                return None
        slot = self._order.pop(key)
        self._members[key[0]].evicted(key[1])
        asking.counters.evictions += 1
        return slot


class LayerSlots:
    """One layer's expert slots: `capacity` of its own, evicted by `policy` (LRU by default), or a share of a global
    `pool` whose policy evicts across layers (`capacity` is then the layer's fair share: what a prefetch may fill).

    Protocol for one layer call: `order = begin(needed)`, then for each expert in `order`:
    `acquire(e)` (waits for its load), compute, `release(e)`. `begin` counts hits and misses and starts
    as many loads as there are evictable slots; the rest start in `acquire` once slots are released.
    Recency: hits are touched in ascending expert order, then misses in ascending order.
    """

    def __init__(self, layer: int, capacity: int, loader: Loader, nbytes: int, policy: EvictionPolicy | None = None,
                 pool: SlotPool | None = None):
        if capacity < 1:
            raise ValueError(f"slots per layer must be >= 1, got {capacity}")
        self.layer, self.capacity, self.loader, self.nbytes = layer, capacity, loader, nbytes
        self.policy = policy if policy is not None else LRUPolicy()
        self.pool = pool if pool is not None else SlotPool(capacity, loader, nbytes)
        self.pool.join(self)
        self._resident: OrderedDict[int, _Slot] = OrderedDict()  # this layer's, LRU first, MRU last
        self.pinned: set[int] = set()
        self.counters = ExpertCounters()

    @property
    def slab(self) -> torch.Tensor:
        """The slab whose rows hold this layer's experts (`slot_of` indexes it); shared with other layers in a pool."""
        return self.pool.slab

    def resident(self) -> list[int]:
        """Resident experts, least recently used first."""
        return list(self._resident)

    def slot_of(self, expert: int) -> int:
        """The slot (row of `slab`) holding a resident expert."""
        return self._resident[expert].index

    def clear(self) -> None:
        """Forget every expert of this layer (a load failed: its slot's chain of loads is broken); slots go back."""
        while self._resident:
            slot = self._resident.popitem(last=False)[1]
            if slot.pending is not None:  # a load still writing into the slot finishes first (failed or not)
                slot.pending.exception()
            slot.pending = slot.free_event = None
            self.pool.give_back(slot)
        self.pinned = set()

    def begin(self, needed) -> list[int]:
        if not self.policy.reuses:  # the naive baseline: nothing is reused from one call to the next
            while self._resident:
                self.pool.give_back(self._resident.popitem(last=False)[1])
        needed = sorted(set(needed))
        hits = [e for e in needed if e in self._resident]
        misses = [e for e in needed if e not in self._resident]
        self.counters.hits += len(hits)
        self.counters.misses += len(misses)
        self.pinned = set(needed)
        self.pool.used(self.layer, needed)
        for e in hits:
            slot = self._resident[e]
            self._touch(e)
            if slot.prefetched:
                slot.prefetched = False
                self.counters.prefetch_used += 1
        keep = self.policy.plan(needed, list(self._resident), self.capacity)
        if keep is None:  # keep what fits: load every miss now, as slots allow
            for e in misses:
                if not self._start_load(e, prefetched=False):
                    break  # every slot holds a pinned expert: acquire() loads it after a release
            return hits + misses
        # Experts needed now but not kept stream through a slot that no kept expert needs: a needed hit's
        # slot once computed, or one old slot held back from the kept misses' eager loads.
        streamed = [e for e in misses if e not in keep]
        kept = [e for e in misses if e in keep]
        spare = self.pool.free + sum(1 for e in self._resident if e not in keep and e not in self.pinned)
        if streamed and all(h in keep for h in hits):
            spare -= 1
        eager = kept[: max(spare, 0)]
        for e in eager:
            self._start_load(e, prefetched=False, protect=keep)
        return hits + eager + streamed + kept[len(eager):]

    def acquire(self, expert: int) -> torch.Tensor:
        slot = self._resident.get(expert)
        if slot is None:  # deferred by begin(): streams through any unpinned slot
            if not self._start_load(expert, prefetched=False):
                raise RuntimeError(f"layer {self.layer}: no evictable slot for expert {expert} (release() missing?)")
            slot = self._resident[expert]
        if slot.pending is not None:
            start = time.perf_counter()
            self.loader.wait(slot.pending)
            slot.pending = None
            self.counters.wait_s += time.perf_counter() - start
        return slot.buffer

    def has_slot(self, expert: int) -> bool:
        """Whether `expert` holds a slot (resident or loading); one deferred by `begin` does not yet."""
        return expert in self._resident

    def release(self, expert: int) -> None:
        self.pinned.discard(expert)
        if self.loader.cuda:
            slot = self._resident[expert]
            slot.free_event = torch.cuda.Event()
            slot.free_event.record(torch.cuda.current_stream(self.loader.device))

    def prefetch(self, experts, protect=()) -> int:
        """Start loading `experts` (a hint, at most `capacity` of them), never evicting one of them or of
        `protect`; returns how many loads it started."""
        wanted = list(dict.fromkeys(experts))[: self.capacity]
        protect = set(wanted) | set(protect)
        issued = 0
        for e in wanted:
            if e in self._resident:
                self._touch(e)
            elif self._start_load(e, prefetched=True, protect=protect):
                issued += 1
        self.counters.prefetch_issued += issued
        return issued

    def evicted(self, expert: int) -> None:
        """The pool gave this layer's `expert`'s slot to another load."""
        del self._resident[expert]

    def _touch(self, expert: int) -> None:
        self._resident.move_to_end(expert)
        self.pool.touch(self.layer, expert)

    def _start_load(self, expert: int, prefetched: bool, protect: set[int] = frozenset()) -> bool:
        slot = self.pool.take(self, protect)
        if slot is None:
            return False
        slot.layer, slot.expert, slot.prefetched = self.layer, expert, prefetched
        slot.pending = self.loader.submit(ExpertKey(self.layer, expert), slot.buffer, slot.free_event, slot.pending)
        self._resident[expert] = slot
        self.pool.add(slot)
        self.counters.bytes_loaded += self.nbytes
        return True


def build_slots(layers: list[int], loader: Loader, nbytes: int, policy: str, num_experts: int, *,
                slots_per_layer: int | None = None, rows: int | None = None) -> dict[int, LayerSlots]:
    """Every layer's slots for `policy`: a global policy shares `rows` slots (default `slots_per_layer` per layer)
    among all `layers`; a per-layer one gives each layer `slots_per_layer` (default `rows` split evenly), at most
    one per expert."""
    if (slots_per_layer is None) == (rows is None):
        raise ValueError("give slots_per_layer or rows")
    if not layers:
        return {}
    most = len(layers) * num_experts
    if policy in GLOBAL_POLICIES:
        rows = min(rows if rows is not None else slots_per_layer * len(layers), most)
        pool = SlotPool(rows, loader, nbytes, make_global_policy(policy, len(layers)))
        share = max(1, min(num_experts, rows // len(layers)))
        return {layer: LayerSlots(layer, share, loader, nbytes, LRUPolicy(), pool=pool) for layer in layers}
    k = min(slots_per_layer if slots_per_layer is not None else rows // len(layers), num_experts)
    if k < 1:
        raise ValueError(f"{rows} slots cannot give each of {len(layers)} layers one")
    return {layer: LayerSlots(layer, k, loader, nbytes, make_policy(policy, num_experts)) for layer in layers}
