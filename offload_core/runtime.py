"""The expert side of one model: its local backend, an optional remote plane, prediction bookkeeping, stats.

`ExpertRuntime` is what every `MoELayer` of a model talks to. Built whole around its `LocalExperts`; a
remote plane (the coordinator's workers) joins through `join()`. Per layer it sends the plane the groups
of the experts it owns (first, so those requests are in flight while local experts compute), runs the
rest locally, and splits prefetch hints the same way, each owner taking as many as its own slots hold.
It does no routing and no arithmetic, and knows nothing about workers, networks or their failures: the
plane re-routes around its own failures (see `coordinator/cluster.py`).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable, Protocol

import torch

from .counters import ExpertCounters, RuntimeStats
from .local_experts import Hint, LocalExperts

logger = logging.getLogger(__name__)

LOCAL = "local"  # the coordinator's own backend, as stats name it


class Pending(Protocol):
    def result(self) -> dict[int, torch.Tensor]: ...


class RemotePlane(Protocol):
    """Experts that live elsewhere. Its pending results may omit experts only when its policy for an expert
    without a live owner is to drop it (the MoE layer then re-weights the others)."""

    def partition(self, layer: int, experts: Iterable[int]) -> tuple[list[int], list[int]]:
        """(remote, local): experts it computes, and experts the coordinator computes itself; an expert with no
        live owner is in `local` (fallback), in neither (dropped), or raises (no fallback)."""

    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None) -> tuple[Pending, list[int]]:
        """Send the groups (and the hint's experts to their owners); returns the pending result and the hinted
        experts, each owner's share capped at its slots."""

    def prefetch(self, layer: int, experts: list[int], already: Iterable[int] = ()) -> list[int]:
        """Hint `experts` (those not `already` hinted) to their owners; returns the experts it counts as hinted."""

    def counters(self) -> dict[int, ExpertCounters]: ...

    def describe(self) -> dict[str, dict]: ...

    def close(self) -> None: ...


class _Merged:
    def __init__(self, local: Pending | None, remote: Pending | None):
        self.local, self.remote = local, remote

    def result(self) -> dict[int, torch.Tensor]:
        outputs: dict[int, torch.Tensor] = {}
        if self.local is not None:  # computed while the remote requests are in flight
            outputs.update(self.local.result())
        if self.remote is not None:
            outputs.update(self.remote.result())
        return outputs


class ExpertRuntime:
    def __init__(self, local: LocalExperts):
        self.local = local
        self.remote: RemotePlane | None = None
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its next call
        self._prediction: dict[int, ExpertCounters] = defaultdict(ExpertCounters)

    def join(self, remote: RemotePlane) -> None:
        """Let `remote` compute the experts it owns from now on."""
        if self.remote is not None:
            raise RuntimeError("a remote plane has already joined this runtime")
        self.remote = remote

    # -- one layer call -----------------------------------------------------------------------
    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None = None) -> Pending:
        """Start every owner's work for `groups` (remote first) and hint the next layer's likely experts."""
        self._score_prediction(layer, groups.keys())
        if self.remote is None:
            pending = self.local.submit(layer, groups)
            if hint is not None:
                self._predicted[hint[0]] = set(self.local.prefetch(*hint))
            return pending
        remote_ids, local_ids = self.remote.partition(layer, groups)
        local_hint, remote_hint = self._split(hint)
        remote_pending, hinted = None, []
        if remote_ids or remote_hint:
            remote_pending, hinted = self.remote.submit(layer, {e: groups[e] for e in remote_ids}, remote_hint)
        local_pending = self.local.submit(layer, {e: groups[e] for e in local_ids}) if local_ids else None
        if local_hint is not None:
            hinted = [*self.local.prefetch(*local_hint), *hinted]
        if hint is not None:
            self._predicted[hint[0]] = set(hinted)
        return _Merged(local_pending, remote_pending)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """The prediction for `layer` is now `experts` (ranked, refined): load those not hinted already by the
        earlier guess for that layer. A hint, never an error."""
        already = self._predicted.get(layer, set())
        local_hint, remote_hint = self._split((layer, experts)) if self.remote is not None else ((layer, experts), None)
        predicted = []
        if local_hint is not None:
            predicted += self.local.prefetch(layer, local_hint[1], skip=already)
        if remote_hint is not None:
            predicted += self.remote.prefetch(layer, remote_hint[1], already)
        self._predicted[layer] = set(predicted)

    def _split(self, hint: Hint | None) -> tuple[Hint | None, Hint | None]:
        if hint is None:
            return None, None
        layer, experts = hint
        remote, local = self.remote.partition(layer, experts)
        order = {e: i for i, e in enumerate(experts)}  # keep the prediction's ranking within each share
        local, remote = sorted(local, key=order.get), sorted(remote, key=order.get)
        return ((layer, local) if local else None), ((layer, remote) if remote else None)

    def _score_prediction(self, layer: int, needed) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        needed = set(needed)
        counts = self._prediction[layer]
        counts.predicted += len(predicted)
        counts.predicted_needed += len(predicted & needed)
        counts.needed_after_prediction += len(needed)

    def reset_prediction(self) -> None:
        """Forget predictions not yet scored (a forward pass that ended early)."""
        self._predicted.clear()

    # -- reporting ----------------------------------------------------------------------------
    def local_stats(self) -> RuntimeStats:
        """This process's slots and the predictions it made (for every owner), per layer: workers' own caches are
        counted in `stats()` and per worker by the remote plane."""
        return RuntimeStats(_merged([self.local.counters(), self._prediction]), {LOCAL: self.local.describe()})

    def stats(self) -> RuntimeStats:
        """Counters per layer (local slots, workers' own slots, prediction) and per backend."""
        sources = [self.local.counters(), self._prediction]
        if self.remote is not None:
            sources.append(self.remote.counters())
        layers = _merged(sources)
        backends = {LOCAL: self.local.describe()}
        if self.remote is not None:
            backends.update(self.remote.describe())
        return RuntimeStats(layers, backends)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        self.local.close()


def _merged(sources: list[dict[int, ExpertCounters]]) -> dict[int, ExpertCounters]:
    """Per-layer counters of several sources added together."""
    layers: dict[int, ExpertCounters] = defaultdict(ExpertCounters)
    for per_layer in sources:
        for layer, counters in list(per_layer.items()):
            layers[layer] = layers[layer] + counters
    return dict(layers)
