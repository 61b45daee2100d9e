"""The experts side of one model: backends, who owns which expert, prediction bookkeeping and stats.

`ExpertRuntime` is what every `MoELayer` of a model talks to. It splits a layer's groups by owner
(remote owners first, so their requests are in flight while local experts compute), forwards prefetch
hints, and merges counters into one stats dict. It does no routing and no arithmetic.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .store import ExpertKey

_COUNTERS = ("hits", "misses", "prefetch_issued", "prefetch_used", "evictions", "bytes_loaded",
             "wait_s", "compute_s", "predicted", "predicted_needed", "needed_after_prediction")


class _MergedPending:
    def __init__(self, pendings):
        self.pendings = pendings

    def result(self) -> dict[int, torch.Tensor]:
        outputs: dict[int, torch.Tensor] = {}
        for pending in reversed(self.pendings):  # local work (submitted last) first, remote replies after
            outputs.update(pending.result())
        return outputs


class ExpertRuntime:
    def __init__(self, backends: dict, placement: dict[ExpertKey, str] | None = None, local: str = "local"):
        self.backends = backends
        self.placement = placement or {}
        self.local = local
        self._predicted: dict[int, set[int]] = {}
        self._prediction = defaultdict(lambda: {"predicted": 0, "predicted_needed": 0, "needed_after_prediction": 0})

    def owner(self, layer: int, expert: int) -> str:
        return self.placement.get(ExpertKey(layer, expert), self.local)

    def submit(self, layer: int, groups: dict[int, torch.Tensor],
               hint: tuple[int, list[int]] | None = None) -> _MergedPending:
        """Send each owner its groups (remote first, local last), each with its share of the prefetch hint."""
        self._score_prediction(layer, groups.keys())
        by_owner: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        for expert, x in groups.items():
            by_owner[self.owner(layer, expert)][expert] = x
        hints: dict[str, list[int]] = defaultdict(list)
        if hint is not None:
            self._predicted[hint[0]] = set(hint[1])
            for expert in hint[1]:
                hints[self.owner(hint[0], expert)].append(expert)
        pendings = []
        for name in sorted(set(by_owner) | set(hints), key=lambda n: n == self.local):  # remote first
            owned_hint = (hint[0], hints[name]) if hints.get(name) else None
            if name in by_owner:
                pendings.append(self.backends[name].submit(layer, by_owner[name], owned_hint))
            else:
                self.backends[name].prefetch(*owned_hint)
        return _MergedPending(pendings)

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
        for backend in self.backends.values():
            close = getattr(backend, "close", None)
            if close is not None:
                close()


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
