"""Slot eviction policies: strategy objects behind one small interface, each with its own state.

A policy answers three questions for one layer's slots (`LayerSlots`):
- `reuses`: may an expert stay resident from one call to the next (False only for the naive baseline)?
- `plan(needed, resident)`: at the start of a call, which experts to keep afterwards (`None` = keep what
  fits, LRU style); an expert needed now but not kept streams through a slot instead of displacing one;
- `victim(candidates)`: which evictable expert goes when a slot is needed (candidates come LRU first).

A global policy (`GlobalPolicy`) evicts for a cache that every layer shares (`slots.SlotPool`): it hears each layer
call's experts (`used`) and picks a victim among (layer, expert) entries, least recently used first.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Protocol

import torch

from .config import GLOBAL_POLICIES, POLICIES

LFRU_WINDOW = 32  # global-lfru: the least recently used evictable experts it chooses a victim among
LFRU_HALF_LIFE = 256  # global-lfru: decode steps after which use counts halve
TRANSITION_DECAY = 0.98  # router policy: per-step forgetting of old transitions (tuned on the demo model's trace)


class EvictionPolicy(Protocol):
    reuses: bool

    def plan(self, needed: list[int], resident: list[int], capacity: int) -> set[int] | None: ...

    def victim(self, candidates: list[int]) -> int: ...


class LRUPolicy:
    """The paper's cache: keep what fits, evict the least recently used."""

    reuses = True

    def plan(self, needed: list[int], resident: list[int], capacity: int) -> None:
        return None

    def victim(self, candidates: list[int]) -> int:
        return candidates[0]


class NoReusePolicy(LRUPolicy):
    """The naive baseline: nothing is reused from one call to the next; every needed expert is loaded."""

    reuses = False


class RouterPolicy:
    """Keep the experts that the routing history says come next.

    Learns, online, how often expert b is routed to right after expert a (decayed counts); after each call
    keeps the `capacity` experts, among the resident and the needed, most likely to follow the ones just
    used (recency breaks ties), and evicts the least likely first.
    """

    reuses = True

    def __init__(self, num_experts: int, decay: float = TRANSITION_DECAY):
        if num_experts < 1:
            raise ValueError(f"the router policy needs the number of experts, got {num_experts}")
        self.decay = decay
        self.transitions = torch.ones(num_experts, num_experts)  # [E, E] smoothed counts of a -> b
        self.scores = [0.0] * num_experts  # P(next) per expert, from the last plan(); all equal before the first
        self._last: list[int] = []

    def plan(self, needed: list[int], resident: list[int], capacity: int) -> set[int] | None:
        if capacity >= len(self.scores):  # every expert fits: nothing to choose, nothing to learn for it
            return None
        counts = self.transitions
        counts.mul_(self.decay)
        for a in self._last:
            counts[a, needed] += 1.0
        self._last = list(needed)
        rows = counts[needed] / counts[needed].sum(dim=1, keepdim=True)  # [len(needed), E]: P(next | each used now)
        self.scores = rows.sum(dim=0).tolist()  # [E]
        return self.favoured(needed, resident, capacity)

    def favoured(self, needed: list[int], resident: list[int], capacity: int) -> set[int]:
        recency = {e: i for i, e in enumerate(resident)}
        pool = set(resident) | set(needed)
        ranked = sorted(pool, key=lambda e: (-self.scores[e], -recency.get(e, len(recency))))
        return set(ranked[:capacity])

    def victim(self, candidates: list[int]) -> int:
        # LRU order is the tie-break: `min` keeps the first (least recent) among equal scores.
        return min(candidates, key=lambda e: self.scores[e])


class GlobalPolicy(Protocol):
    """Victims for a cache shared by every layer (`slots.SlotPool`): entries are (layer, expert)."""

    def used(self, layer: int, experts: list[int]) -> None: ...

    def victim(self, candidates: Iterable[tuple[int, int]]) -> tuple[int, int] | None: ...


class GlobalLRUPolicy:
    """One cache for all layers: the least recently used expert of any layer goes."""

    def used(self, layer: int, experts: list[int]) -> None:
        pass

    def victim(self, candidates: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
        return next(iter(candidates), None)


class GlobalLFRUPolicy:
    """One cache for all layers: among the `window` least recently used evictable experts, the one with the fewest
    recent uses goes (ties: the least recent). Use counts halve every `half_life` decode steps (layer calls / layers),
    so an expert popular long ago does not stay forever. Looking only at the LRU end keeps a victim O(window)."""

    def __init__(self, layers: int, window: int = LFRU_WINDOW, half_life: int = LFRU_HALF_LIFE):
        self.window, self.halve_after = window, max(1, half_life * layers)
        self.counts: dict[tuple[int, int], float] = {}
        self._calls = 0

    def used(self, layer: int, experts: list[int]) -> None:
        counts = self.counts
        for e in experts:
            counts[(layer, e)] = counts.get((layer, e), 0.0) + 1.0
        self._calls += 1
        if self._calls >= self.halve_after:
            self._calls = 0
            self.counts = {k: v / 2 for k, v in counts.items() if v >= 0.25}

    def victim(self, candidates: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
        best, fewest = None, float("inf")
        for key in islice(candidates, self.window):
            uses = self.counts.get(key, 0.0)
            if uses < fewest:
                best, fewest = key, uses
        return best


def make_global_policy(name: str, layers: int) -> GlobalPolicy:
    if name == "global-lru":
        return GlobalLRUPolicy()
    if name == "global-lfru":
        return GlobalLFRUPolicy(layers)
    raise ValueError(f"global cache policy must be one of {list(GLOBAL_POLICIES)}, got {name!r}")


def make_policy(name: str, num_experts: int) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "none":
        return NoReusePolicy()
    if name == "router":
        return RouterPolicy(num_experts)
    if name in GLOBAL_POLICIES:
        raise ValueError(f"{name!r} is a global cache policy: build its slots with slots.build_slots")
    raise ValueError(f"eviction policy must be one of {list(POLICIES)}, got {name!r}")
