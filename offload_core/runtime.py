"""The experts side of one model: backends, who owns which expert, prediction bookkeeping and stats.

`ExpertRuntime` is what every `MoELayer` of a model talks to. It splits a layer's groups by owner
(remote owners first, so their requests are in flight while local experts compute), forwards prefetch
hints, and merges counters into one stats dict. It does no routing and no arithmetic.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch

from .store import ExpertKey

logger = logging.getLogger(__name__)

_COUNTERS = ("hits", "misses", "prefetch_issued", "prefetch_used", "evictions", "bytes_loaded",
             "wait_s", "compute_s", "predicted", "predicted_needed", "needed_after_prediction")


class ExpertUnavailable(RuntimeError):
    """An expert with no live owner, and no local copy to fall back on."""


class _MergedPending:
    """The per-owner requests of one layer. A remote owner that fails has its groups re-run elsewhere."""

    def __init__(self, runtime: ExpertRuntime, layer: int, parts: list[tuple[str, dict, object]]):
        self.runtime, self.layer, self.parts = runtime, layer, parts

    def result(self) -> dict[int, torch.Tensor]:
        outputs: dict[int, torch.Tensor] = {}
        for name, groups, pending in reversed(self.parts):  # local work (submitted last) first, remote after
            try:
                outputs.update(pending.result())
            except Exception as exc:  # a worker died, hung past its deadline, or lost its experts
                if name == self.runtime.local:
                    raise
                self.runtime.mark_down(name, exc)
                outputs.update(self.runtime.dispatch(self.layer, groups).result())
        return outputs


class ExpertRuntime:
    """Placement maps an expert to its owners in order of preference (replicas); experts not in it are local.

    Failure handling: a remote owner whose request fails is marked down and its groups go to the next live
    owner, or to the local backend (the coordinator's own copy) when `local_fallback`; with neither, the
    step fails naming the expert, unless `drop_unavailable` (explicit) drops it and re-weights the rest.
    """

    def __init__(self, backends: dict, placement: dict[ExpertKey, tuple[str, ...]] | None = None,
                 local: str = "local", local_fallback: bool = True, drop_unavailable: bool = False):
        self.backends = backends
        self.placement = placement or {}
        self.local = local
        self.local_fallback, self.drop_unavailable = local_fallback, drop_unavailable
        self.down: set[str] = set()
        self.failures: dict[str, int] = defaultdict(int)
        self.on_down = None  # called with a backend name when it is marked down (the cluster probes it)
        self.closers: list = []  # called by close(), e.g. the cluster's monitor thread
        self._predicted: dict[int, set[int]] = {}
        self._prediction = defaultdict(lambda: {"predicted": 0, "predicted_needed": 0, "needed_after_prediction": 0})

    def owner(self, layer: int, expert: int) -> str | None:
        """The first live owner; the local backend when the expert is not placed or as the fallback."""
        owners = self.placement.get(ExpertKey(layer, expert))
        if not owners:
            return self.local
        for name in owners:
            if name not in self.down:
                return name
        return self.local if self.local_fallback else None

    def mark_down(self, name: str, exc: Exception | None = None) -> None:
        if name not in self.down:
            logger.warning("worker %s failed (%s): its experts go to replicas or the coordinator until it is back",
                           name, _describe(exc))
        self.down.add(name)
        self.failures[name] += 1
        if self.on_down is not None:
            self.on_down(name)

    def mark_up(self, name: str) -> None:
        if name in self.down:
            logger.warning("worker %s is back and serves its experts again", name)
        self.down.discard(name)

    def prefetch(self, layer: int, experts: list[int], already=()) -> None:
        """The prediction for `layer` is now `experts`: load those not in `already` (a hint, never an error)."""
        self._predicted[layer] = set(experts)
        by_owner: dict[str, list[int]] = defaultdict(list)
        for expert in experts:
            name = self.owner(layer, expert)
            if expert not in already and name is not None:
                by_owner[name].append(expert)
        for name, owned in by_owner.items():
            try:
                self.backends[name].prefetch(layer, owned)
            except Exception as exc:  # a hint to a failing worker: mark it, never fail the step for it
                if name == self.local:
                    raise
                self.mark_down(name, exc)

    def submit(self, layer: int, groups: dict[int, torch.Tensor],
               hint: tuple[int, list[int]] | None = None) -> _MergedPending:
        """Send each owner its groups (remote first, local last), each with its share of the prefetch hint."""
        self._score_prediction(layer, groups.keys())
        if hint is not None:
            self._predicted[hint[0]] = set(hint[1])
        return self.dispatch(layer, groups, hint)

    def dispatch(self, layer: int, groups: dict[int, torch.Tensor],
                 hint: tuple[int, list[int]] | None = None) -> _MergedPending:
        by_owner: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        for expert, x in groups.items():
            name = self.owner(layer, expert)
            if name is None:
                if self.drop_unavailable:
                    continue  # MoELayer re-weights the token's remaining experts
                raise ExpertUnavailable(
                    f"expert (layer {layer}, expert {expert}) has no live owner: its workers "
                    f"{list(self.placement[ExpertKey(layer, expert)])} are down and local fallback is off"
                )
            by_owner[name][expert] = x
        hints: dict[str, list[int]] = defaultdict(list)
        for expert in hint[1] if hint is not None else ():
            name = self.owner(hint[0], expert)
            if name is not None:
                hints[name].append(expert)
        parts = []
        for name in sorted(set(by_owner) | set(hints), key=lambda n: n == self.local):  # remote first
            owned_hint = (hint[0], hints[name]) if hints.get(name) else None
            try:
                if name in by_owner:
                    parts.append((name, by_owner[name], self.backends[name].submit(layer, by_owner[name], owned_hint)))
                else:
                    self.backends[name].prefetch(*owned_hint)
            except Exception as exc:  # could not even send: same as a failed reply
                if name == self.local:
                    raise
                self.mark_down(name, exc)
                if name in by_owner:
                    parts.append((name, by_owner[name], _Rerun(self, layer, by_owner[name])))
        return _MergedPending(self, layer, parts)

    def _score_prediction(self, layer: int, needed) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        needed = set(needed)
        counts = self._prediction[layer]
        counts["predicted"] += len(predicted)
        counts["predicted_needed"] += len(predicted & needed)
        counts["needed_after_prediction"] += len(needed)

    def reset_prediction(self) -> None:
        """Forget predictions not yet scored (a forward pass that ended early)."""
        self._predicted.clear()

    def stats(self) -> dict:
        """Counters per layer and in total, plus hit rate, prefetch recall and precision."""
        layers: dict[int, dict] = defaultdict(lambda: dict.fromkeys(_COUNTERS, 0))
        backends = {}
        for name, backend in self.backends.items():
            report = backend.stats()
            backends[name] = {k: v for k, v in report.items() if k != "layers"}
            if name != self.local:
                backends[name].update(failures=self.failures.get(name, 0), down=name in self.down)
            for layer, counters in report.get("layers", {}).items():
                for key, value in counters.items():
                    if key in _COUNTERS:
                        layers[int(layer)][key] += value
        for layer, counts in self._prediction.items():
            layers[layer].update(counts)
        total = dict.fromkeys(_COUNTERS, 0)
        for counters in layers.values():
            for key in _COUNTERS:
                total[key] += counters[key]
        for counters in [*layers.values(), total]:
            _add_rates(counters)
        return {"layers": dict(sorted(layers.items())), "total": total, "backends": backends}

    def format_stats(self) -> str:
        return format_stats_table(self.stats())

    def close(self) -> None:
        for close in self.closers:
            close()
        for backend in self.backends.values():
            close = getattr(backend, "close", None)
            if close is not None:
                close()


class _Rerun:
    """A request that could not be sent: dispatched again (to the next owner) when its result is needed."""

    def __init__(self, runtime: ExpertRuntime, layer: int, groups: dict):
        self.runtime, self.layer, self.groups = runtime, layer, groups

    def result(self) -> dict[int, torch.Tensor]:
        return self.runtime.dispatch(self.layer, self.groups).result()


def _describe(exc: Exception | None) -> str:
    if exc is None:
        return "no detail"
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):  # a grpc.RpcError, without importing grpc here
        return f"{code().name}: {details()}"
    return f"{type(exc).__name__}: {exc}"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _add_rates(c: dict) -> None:
    c["hit_rate"] = _ratio(c["hits"], c["hits"] + c["misses"])
    c["prefetch_recall"] = _ratio(c["predicted_needed"], c["needed_after_prediction"])
    c["prefetch_precision"] = _ratio(c["predicted_needed"], c["predicted"])
    c["prefetch_useful"] = _ratio(c["prefetch_used"], c["prefetch_issued"])


def format_stats_table(stats: dict) -> str:
    """A fixed-width table: one row per layer and a total row."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cols = ["hits", "misses", "hit_rate", "prefetch_issued", "prefetch_used", "prefetch_recall",
            "prefetch_precision", "bytes_loaded", "wait_s", "compute_s"]
    heads = ["layer", "hits", "misses", "hit%", "pf_issued", "pf_used", "recall", "precision", "MB_loaded",
             "wait_s", "compute_s"]
    rows = []
    for name, c in [*((str(k), v) for k, v in stats["layers"].items()), ("total", stats["total"])]:
        vals = [fmt(c[k]) if k != "bytes_loaded" else f"{c[k] / 1e6:.2f}" for k in cols]
        rows.append([name, *vals])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
