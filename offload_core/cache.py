"""The device tier: a per-layer LRU of k expert slots, and the loader that fills them off the compute path.

`LayerCache` decides (on the compute thread) which expert sits in which slot; `Loader` moves bytes from
the host store into a slot on its own thread and, on CUDA, its own stream, so that loads overlap
compute. An expert the current layer still needs is pinned and never evicted; a prefetch never evicts
a pinned expert or another expert of the same prefetch. On CPU the slots are RAM buffers and the same
code runs. Stats are counted here, per layer.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from .store import ExpertKey

_STAGING_BUFFERS = 2  # pinned bounce buffers per loader thread (disk store on CUDA): read one, copy the other
LOADER_THREADS = 4  # reads in flight at once: a disk (NVMe, virtio) serves several faster than one by one
POLICIES = {
    "lru": "evict the least recently used expert (the paper's cache)",
    "router": "keep the experts that the router's own history says follow the ones just used (transition "
              "counts learnt online); an expert needed now but unlikely next streams through a slot instead of "
              "displacing a likely one",
    "none": "keep nothing between calls: every needed expert is loaded every time (the naive baseline)",
}
TRANSITION_DECAY = 0.98  # router policy: per-step forgetting of old transitions (tuned on the demo model's trace)


@dataclass
class LayerStats:
    hits: int = 0  # needed experts already resident (or loading) when the layer asked for them
    misses: int = 0  # needed experts that had to be loaded on demand
    prefetch_issued: int = 0  # loads started by a prefetch
    prefetch_used: int = 0  # prefetched experts that were then needed before being evicted
    evictions: int = 0
    bytes_loaded: int = 0
    wait_s: float = 0.0  # compute thread blocked on a load
    compute_s: float = 0.0  # expert FFN time (on CUDA: launch time unless synchronised)

    def as_dict(self) -> dict:
        return asdict(self)


class Loader:
    """Copies packed experts from a store into slot buffers on background threads (and one CUDA stream).

    Several threads keep several reads in flight, which a disk serves faster than one at a time; a load
    into a slot waits for that slot's previous load, so two loads never write one slot at once.
    """

    def __init__(self, store, device: torch.device, threads: int = LOADER_THREADS):
        self.store, self.device = store, device
        self.cuda = device.type == "cuda"
        self.busy_s = 0.0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moeshard-loader")
        self._local = threading.local()  # per thread: pinned bounce buffers for a disk store on CUDA
        if self.cuda:
            self._stream = torch.cuda.Stream(device=device)

    def submit(self, key: ExpertKey, dst: torch.Tensor, free_event, previous: Future | None = None) -> Future:
        return self._pool.submit(self._load, key, dst, free_event, previous)

    def _staging(self) -> tuple[list, list]:
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
                self.store.read_into(key, dst)
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
                dst.copy_(src, non_blocking=True)
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
    __slots__ = ("buffer", "expert", "pending", "prefetched", "free_event")

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.expert: int | None = None
        self.pending: Future | None = None
        self.prefetched = False
        self.free_event = None


class LayerCache:
    """k slots for one layer's experts, least recently used evicted first.

    Protocol for one layer call: `order = begin(needed)`, then for each expert in `order`:
    `acquire(e)` (waits for its load), compute, `release(e)`. `begin` counts hits and misses and starts
    as many loads as there are evictable slots; the rest start in `acquire` once slots are released.
    Recency: hits are touched in ascending expert order, then misses in ascending order.
    """

    def __init__(self, layer: int, capacity: int, loader: Loader, nbytes: int, policy: str = "lru",
                 num_experts: int = 0):
        if capacity < 1:
            raise ValueError(f"slots per layer must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {list(POLICIES)}, got {policy!r}")
        self.layer, self.capacity, self.loader, self.policy = layer, capacity, loader, policy
        if policy == "router" and num_experts < 1:
            raise ValueError("the router policy needs num_experts")
        # Router policy: counts[a, b] ~ how often expert b was routed to right after expert a (smoothed).
        self._transitions = torch.ones(num_experts, num_experts) if policy == "router" else None
        self._last: list[int] = []
        self._free = [_Slot(torch.empty(nbytes, dtype=torch.uint8, device=loader.device)) for _ in range(capacity)]
        self._resident: OrderedDict[int, _Slot] = OrderedDict()  # LRU first, MRU last
        self._pinned: set[int] = set()
        self.nbytes = nbytes
        self.stats = LayerStats()

    _next_scores: list[float] = []

    def resident(self) -> list[int]:
        """Resident experts, least recently used first."""
        return list(self._resident)

    def begin(self, needed) -> list[int]:
        if self.policy == "none":  # the naive baseline: nothing is reused from one call to the next
            while self._resident:
                self._free.append(self._resident.popitem(last=False)[1])
        needed = sorted(set(needed))
        hits = [e for e in needed if e in self._resident]
        misses = [e for e in needed if e not in self._resident]
        self.stats.hits += len(hits)
        self.stats.misses += len(misses)
        self._pinned = set(needed)
        for e in hits:
            slot = self._resident[e]
            self._resident.move_to_end(e)
            if slot.prefetched:
                slot.prefetched = False
                self.stats.prefetch_used += 1
        if self.policy != "router":
            for e in misses:
                if not self._start_load(e, prefetched=False):
                    break  # every slot holds a pinned expert: acquire() loads it after a release
            return hits + misses
        keep = self._favoured(needed)
        self._last = needed
        # Experts needed now but unlikely next stream through a slot that no kept expert needs: a needed
        # hit's slot once computed, or one old slot held back from the kept misses' eager loads.
        streamed = [e for e in misses if e not in keep]
        kept = [e for e in misses if e in keep]
        spare = len(self._free) + sum(1 for e in self._resident if e not in keep and e not in self._pinned)
        if streamed and all(h in keep for h in hits):
            spare -= 1
        eager = kept[: max(spare, 0)]
        for e in eager:
            self._start_load(e, prefetched=False, protect=keep)
        return hits + eager + streamed + kept[len(eager):]

    def _favoured(self, needed: list[int]) -> set[int]:
        """Learn from this call's routing, then pick the k experts, among the resident and the needed, most
        likely to be routed to next (by the transitions seen so far; recency breaks ties)."""
        counts = self._transitions
        counts.mul_(TRANSITION_DECAY)
        for a in self._last:
            counts[a, needed] += 1.0
        rows = counts[needed] / counts[needed].sum(dim=1, keepdim=True)  # P(next | each expert used now)
        self._next_scores = rows.sum(dim=0).tolist()  # [E]
        recency = {e: i for i, e in enumerate(self._resident)}
        pool = set(self._resident) | set(needed)
        ranked = sorted(pool, key=lambda e: (-self._next_scores[e], -recency.get(e, len(recency))))
        return set(ranked[: self.capacity])

    def _score(self, expert: int) -> float:
        return self._next_scores[expert] if self.policy == "router" else 0.0

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
            self.stats.wait_s += time.perf_counter() - start
        return slot.buffer

    def release(self, expert: int) -> None:
        self._pinned.discard(expert)
        if self.loader.cuda:
            slot = self._resident[expert]
            slot.free_event = torch.cuda.Event()
            slot.free_event.record(torch.cuda.current_stream(self.loader.device))

    def prefetch(self, experts) -> int:
        """Start loading `experts` (a hint); returns how many loads it started."""
        wanted = list(dict.fromkeys(experts))[: self.capacity]
        protect = set(wanted)
        issued = 0
        for e in wanted:
            if e in self._resident:
                self._resident.move_to_end(e)
            elif self._start_load(e, prefetched=True, protect=protect):
                issued += 1
        self.stats.prefetch_issued += issued
        return issued

    def _victim(self, protect: set[int]) -> _Slot | None:
        if self._free:
            return self._free.pop()
        candidates = [e for e in self._resident if e not in self._pinned and e not in protect]
        if not candidates:
            return None
        # LRU order is the tie-break: `min` keeps the first (least recent) among equal scores.
        victim = min(candidates, key=self._score) if self.policy == "router" else candidates[0]
        self.stats.evictions += 1
        return self._resident.pop(victim)

    def _start_load(self, expert: int, prefetched: bool, protect: set[int] = frozenset()) -> bool:
        slot = self._victim(protect)
        if slot is None:
            return False
        slot.expert, slot.prefetched = expert, prefetched
        slot.pending = self.loader.submit(ExpertKey(self.layer, expert), slot.buffer, slot.free_event, slot.pending)
        self._resident[expert] = slot
        self.stats.bytes_loaded += self.nbytes
        return True
