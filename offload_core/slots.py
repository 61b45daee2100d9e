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
from .policies import EvictionPolicy, LRUPolicy

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
    __slots__ = ("index", "buffer", "expert", "pending", "prefetched", "free_event")

    def __init__(self, index: int, buffer: torch.Tensor):
        self.index, self.buffer = index, buffer
        self.expert: int | None = None
        self.pending: Future | None = None
        self.prefetched = False
        self.free_event = None


class LayerSlots:
    """k slots for one layer's experts, evicted by `policy` (LRU by default).

    Protocol for one layer call: `order = begin(needed)`, then for each expert in `order`:
    `acquire(e)` (waits for its load), compute, `release(e)`. `begin` counts hits and misses and starts
    as many loads as there are evictable slots; the rest start in `acquire` once slots are released.
    Recency: hits are touched in ascending expert order, then misses in ascending order.
    """

    def __init__(self, layer: int, capacity: int, loader: Loader, nbytes: int, policy: EvictionPolicy | None = None):
        if capacity < 1:
            raise ValueError(f"slots per layer must be >= 1, got {capacity}")
        self.layer, self.capacity, self.loader, self.nbytes = layer, capacity, loader, nbytes
        self.policy = policy if policy is not None else LRUPolicy()
        self.slab = torch.empty(capacity, nbytes, dtype=torch.uint8, device=loader.device)  # [k, nbytes]
        self._free = [_Slot(i, self.slab[i]) for i in reversed(range(capacity))]  # pop() takes slot 0 first
        self._resident: OrderedDict[int, _Slot] = OrderedDict()  # LRU first, MRU last
        self._pinned: set[int] = set()
        self.counters = ExpertCounters()

    def resident(self) -> list[int]:
        """Resident experts, least recently used first."""
        return list(self._resident)

    def slot_of(self, expert: int) -> int:
        """The slot (row of `slab`) holding a resident expert."""
        return self._resident[expert].index

    def begin(self, needed) -> list[int]:
        if not self.policy.reuses:  # the naive baseline: nothing is reused from one call to the next
            while self._resident:
                self._free.append(self._resident.popitem(last=False)[1])
        needed = sorted(set(needed))
        hits = [e for e in needed if e in self._resident]
        misses = [e for e in needed if e not in self._resident]
        self.counters.hits += len(hits)
        self.counters.misses += len(misses)
        self._pinned = set(needed)
        for e in hits:
            slot = self._resident[e]
            self._resident.move_to_end(e)
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
        spare = len(self._free) + sum(1 for e in self._resident if e not in keep and e not in self._pinned)
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
        self._pinned.discard(expert)
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
                self._resident.move_to_end(e)
            elif self._start_load(e, prefetched=True, protect=protect):
                issued += 1
        self.counters.prefetch_issued += issued
        return issued

    def _victim(self, protect: set[int]) -> _Slot | None:
        if self._free:
            return self._free.pop()
        candidates = [e for e in self._resident if e not in self._pinned and e not in protect]
        if not candidates:
            return None
        self.counters.evictions += 1
        return self._resident.pop(self.policy.victim(candidates))

    def _start_load(self, expert: int, prefetched: bool, protect: set[int] = frozenset()) -> bool:
        slot = self._victim(protect)
        if slot is None:
            return False
        slot.expert, slot.prefetched = expert, prefetched
        slot.pending = self.loader.submit(ExpertKey(self.layer, expert), slot.buffer, slot.free_event, slot.pending)
        self._resident[expert] = slot
        self.counters.bytes_loaded += self.nbytes
        return True
