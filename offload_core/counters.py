"""One counters type for the expert plane, with its derived rates computed in one place.

Slots count hits, misses, loads and time per layer; the runtime counts prediction; remote backends report
their workers' hits and misses. The CLI summary, `serve`'s metrics and `bench` all read `ExpertCounters`
(and deltas of it, `after - before`), never their own formulas.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ExpertCounters:
    hits: int = 0  # needed experts already resident (or loading) when the layer asked for them
    misses: int = 0  # needed experts that had to be loaded on demand
    prefetch_issued: int = 0  # loads started by a prefetch
    prefetch_used: int = 0  # prefetched experts that were then needed before being evicted
    evictions: int = 0
    bytes_loaded: int = 0  # expert bytes moved into slots
    wait_s: float = 0.0  # compute thread blocked on a load
    compute_s: float = 0.0  # expert FFN time (on CUDA: launch time unless synchronised)
    predicted: int = 0  # experts named by next-layer predictions that were then scored
    predicted_needed: int = 0  # of those, needed by the layer
    needed_after_prediction: int = 0  # experts needed by layers that had a prediction

    def __add__(self, other: ExpertCounters) -> ExpertCounters:
        return ExpertCounters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: ExpertCounters) -> ExpertCounters:
        return ExpertCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def hit_rate(self) -> float | None:
        return _ratio(self.hits, self.hits + self.misses)

    @property
    def prefetch_recall(self) -> float | None:
        """Needed experts that had been predicted."""
        return _ratio(self.predicted_needed, self.needed_after_prediction)

    @property
    def prefetch_precision(self) -> float | None:
        """Predicted experts that were needed."""
        return _ratio(self.predicted_needed, self.predicted)

    @property
    def prefetch_useful(self) -> float | None:
        """Prefetched loads that were used before eviction."""
        return _ratio(self.prefetch_used, self.prefetch_issued)

    RATES = ("hit_rate", "prefetch_recall", "prefetch_precision", "prefetch_useful")

    def as_dict(self) -> dict:
        """The counters and their rates (None where undefined), for JSON and tables."""
        return {**asdict(self), **{rate: getattr(self, rate) for rate in self.RATES}}

    @classmethod
    def total(cls, items) -> ExpertCounters:
        out = cls()
        for item in items:
            out = out + item
        return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass
class RuntimeStats:
    """A snapshot of one model's expert plane: counters per MoE layer and in total, and per backend."""

    layers: dict[int, ExpertCounters]
    backends: dict[str, dict]

    @property
    def total(self) -> ExpertCounters:
        return ExpertCounters.total(self.layers.values())

    def as_dict(self) -> dict:
        return {"layers": {layer: c.as_dict() for layer, c in sorted(self.layers.items())},
                "total": self.total.as_dict(), "backends": self.backends}

    def table(self, columns: tuple[str, ...] | None = None) -> str:
        """A fixed-width table: one row per layer and a total row; `columns` picks some (default all)."""
        heads = {"hits": "hits", "misses": "misses", "hit_rate": "hit_rate", "prefetch_issued": "pf_issued",
                 "prefetch_used": "pf_used", "prefetch_recall": "recall", "prefetch_precision": "precision",
                 "bytes_loaded": "MB_loaded", "wait_s": "wait_s", "compute_s": "compute_s"}
        cols = list(columns or heads)
        rows = []
        for name, c in [*((str(k), v) for k, v in sorted(self.layers.items())), ("total", self.total)]:
            d = c.as_dict()
            rows.append([name, *(f"{d[k] / 1e6:.2f}" if k == "bytes_loaded" else _fmt(d[k]) for k in cols)])
        titles = ["layer", *(heads[k] for k in cols)]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(titles)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(titles, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)
