"""The expert side of one model: the plane that computes its experts, prediction bookkeeping, stats.

`ExpertRuntime` is what every `MoELayer` of a model talks to. It holds exactly one `ExpertPlane`: a
`LocalPlane` (every expert computed by this process's `LocalExperts`) until workers join, then the cluster's
plane (`coordinator/router.py`), which computes what the coordinator keeps with the same `LocalExperts`. Per
layer call it hands the plane the groups and the next layer's early prefetch guess once (`submit`), and the
refined guess once (`prefetch`); the plane decides who computes each expert, once, and returns a
`LayerOutputs`. The runtime does no routing and no arithmetic, and knows nothing about workers, networks or
their failures.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from .counters import ExpertCounters, RuntimeStats
from .local_experts import Hint, LocalExperts

logger = logging.getLogger(__name__)

LOCAL = "local"  # the coordinator's own backend, as stats name it


@dataclass(frozen=True)
class LayerOutputs:
    """One layer call's expert outputs ([t, D] per expert), and the experts the plane dropped: no live owner and
    the policy for those is to drop them (the MoE layer then re-weights the token's other experts)."""

    outputs: dict[int, torch.Tensor]
    dropped: frozenset[int] = frozenset()


class Pending(Protocol):
    def result(self) -> LayerOutputs: ...


class ExpertPlane(Protocol):
    """Where a model's experts are computed."""

    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None) -> tuple[Pending, list[int]]:
        """Start computing `groups` ({expert: [t, D] rows}) and loading the hint's experts (the next layer's early
        guess, ranked); returns the pending outputs and the hinted experts it counts as predicted."""

    def prefetch(self, layer: int, ranked: list[int], already: Iterable[int] = ()) -> list[int]:
        """Load `ranked` (those not `already` hinted) where they will be computed; returns the experts it counts as
        predicted. A hint, never an error."""

    def counters(self) -> dict[int, ExpertCounters]:
        """Cache counters per layer of every backend it computes with."""

    def backends(self) -> dict[str, dict]:
        """Per backend (LOCAL, and each worker by name): what it is and how it is doing."""

    def close(self) -> None:
        """Release what the plane holds beyond the `LocalExperts` (which its runtime closes)."""


class _Outputs:
    def __init__(self, pending):
        self.pending = pending

    def result(self) -> LayerOutputs:
        return LayerOutputs(self.pending.result())


class LocalPlane:
    """Every expert computed here: a model's plane before any worker joins."""

    def __init__(self, local: LocalExperts):
        self.local = local

    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None) -> tuple[Pending, list[int]]:
        pending = _Outputs(self.local.submit(layer, groups))  # demand loads first
        return pending, (self.local.prefetch(*hint) if hint is not None else [])

    def prefetch(self, layer: int, ranked: list[int], already: Iterable[int] = ()) -> list[int]:
        return self.local.prefetch(layer, ranked, skip=already)

    def counters(self) -> dict[int, ExpertCounters]:
        return self.local.counters()

    def backends(self) -> dict[str, dict]:
        return {LOCAL: self.local.describe()}

    def close(self) -> None:
        pass


class ExpertRuntime:
    def __init__(self, local: LocalExperts):
        self.local = local
        self.plane: ExpertPlane = LocalPlane(local)
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its next call
        self._prediction: dict[int, ExpertCounters] = defaultdict(ExpertCounters)

    def join(self, plane: ExpertPlane) -> None:
        """Compute with `plane` from now on (a cluster's, which computes the experts it keeps with `self.local`)."""
        if not isinstance(self.plane, LocalPlane):
            raise RuntimeError("a cluster has already joined this runtime")
        self.plane = plane

    # -- one layer call -----------------------------------------------------------------------
    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None = None) -> Pending:
        """Start the plane's work for `groups` and hint the next layer's likely experts."""
        self._score_prediction(layer, groups.keys())
        pending, hinted = self.plane.submit(layer, groups, hint)
        if hint is not None:
            self._predicted[hint[0]] = set(hinted)
        return pending

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """The prediction for `layer` is now `experts` (ranked, refined): load those not hinted already by the
        earlier guess for that layer. A hint, never an error."""
        already = self._predicted.get(layer, set())
        self._predicted[layer] = set(self.plane.prefetch(layer, experts, already))

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
        counted in `stats()` and per worker by the plane."""
        return RuntimeStats(_merged([self.local.counters(), self._prediction]), {LOCAL: self.local.describe()})

    def stats(self) -> RuntimeStats:
        """Counters per layer (every backend's slots, and prediction) and per backend."""
        return RuntimeStats(_merged([self.plane.counters(), self._prediction]), self.plane.backends())

    def close(self) -> None:
        self.plane.close()
        self.local.close()


def _merged(sources: list[dict[int, ExpertCounters]]) -> dict[int, ExpertCounters]:
    """Per-layer counters of several sources added together."""
    layers: dict[int, ExpertCounters] = defaultdict(ExpertCounters)
    for per_layer in sources:
        for layer, counters in list(per_layer.items()):
            layers[layer] = layers[layer] + counters
    return dict(layers)
