"""Slot eviction policies: strategy objects behind one small interface, each with its own state.

A policy answers three questions for one layer's slots (`LayerSlots`):
- `reuses`: may an expert stay resident from one call to the next (False only for the naive baseline)?
- `plan(needed, resident)`: at the start of a call, which experts to keep afterwards (`None` = keep what
  fits, LRU style); an expert needed now but not kept streams through a slot instead of displacing one;
- `victim(candidates)`: which evictable expert goes when a slot is needed (candidates come LRU first).
"""
from __future__ import annotations

from typing import Protocol

import torch

from .config import POLICIES

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

    def plan(self, needed: list[int], resident: list[int], capacity: int) -> set[int]:
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


def make_policy(name: str, num_experts: int) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "none":
        return NoReusePolicy()
    if name == "router":
        return RouterPolicy(num_experts)
    raise ValueError(f"eviction policy must be one of {list(POLICIES)}, got {name!r}")
