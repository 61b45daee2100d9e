"""The cluster's one record: which workers host which experts (placement), who is up, and since when.

The router reads it on every layer call; the monitor and membership write it, only through its methods. It
knows nothing of gRPC, tensors or the model.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..offload_core.experts import ExpertKey
from .placement import ClusterError, hosted_by

logger = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """What the coordinator knows of one worker, for /health and /metrics."""

    state: str = "down"  # "serving", "down", "receiving" (its experts are being pushed) or "joining"
    since: float = field(default_factory=time.time)  # when it entered that state (epoch seconds)
    detail: str = ""  # why it is down, or what is being received
    pushed_bytes: int = 0  # expert bytes sent to it, since this coordinator started
    push_s: float = 0.0  # seconds spent sending them (the transfer alone, without joining)

    def enter(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state, self.since = state, time.time()
        self.detail = detail


class Roster:
    """Placement (expert -> its workers in order of preference; an expert not placed is the coordinator's own),
    the workers that are down, their failures and states."""

    def __init__(self, names: Iterable[str], placement: dict[ExpertKey, tuple[str, ...]]):
        names = list(names)
        unknown = sorted({o for owners in placement.values() for o in owners} - set(names))
        if unknown:
            raise ClusterError(f"placement names workers that are not in the cluster: {unknown}")
        self.names = names
        self.placement = dict(placement)
        self.down: set[str] = set()
        self.failures: dict[str, int] = defaultdict(int)
        self.states: dict[str, WorkerState] = {name: WorkerState("serving") for name in names}
        self._on_down: list[Callable[[str], None]] = []
        self._lock = threading.Lock()  # placement is rewritten whole (copy on write): readers never lock

    # -- reads ----------------------------------------------------------------------------------
    def placed(self, layer: int, experts) -> dict[int, tuple[tuple[str, ...], str | None]]:
        """For each of `experts` of `layer`: its owners and the first live one (None: none is up), in one call."""
        placement, down = self.placement, self.down
        out = {}
        for e in experts:
            owners = placement.get(ExpertKey(layer, e), ())
            out[e] = owners, next((o for o in owners if o not in down), None)
        return out

    def hosted(self, name: str) -> list[ExpertKey]:
        return hosted_by(self.placement, name)

    @property
    def degraded(self) -> bool:
        """Some worker is not serving (its experts are computed elsewhere, or fail the steps that need them)."""
        return bool(self.down) or any(s.state != "serving" for s in self.states.values())

    # -- writes ---------------------------------------------------------------------------------
    def on_down(self, listener: Callable[[str], None]) -> None:
        """Call `listener(name)` whenever a worker is marked down (the monitor, to probe it)."""
        self._on_down.append(listener)

    def mark_down(self, name: str, why: str, count: bool = True) -> None:
        """`name` failed (`count`: a failure of a call, not a worker that was down from the start)."""
        if name not in self.down:
            logger.warning("worker %s %s (%s): its experts go to replicas or the coordinator until it is back",
                           name, "failed" if count else "is not answering", why)
        self.down.add(name)
        self.states[name].enter("down", why)
        if count:
            self.failures[name] += 1
        for listener in self._on_down:
            listener(name)

    def mark_up(self, name: str) -> None:
        if name in self.down:  # good news: INFO, not a warning
            logger.info("worker %s is up and serves its experts", name)
        self.down.discard(name)
        self.states[name].enter("serving")

    def enter(self, name: str, state: str, detail: str = "") -> None:
        self.states[name].enter(state, detail)

    def count_push(self, name: str, sent: int, seconds: float) -> None:
        state = self.states[name]
        state.pushed_bytes += sent
        state.push_s += seconds

    def release(self, name: str, experts: set[ExpertKey]) -> None:
        """`experts` leave `name`'s placement (it has no room for them): computed by their other owners, or by
        the coordinator when none is left."""
        with self._lock:
            placement = {k: tuple(o for o in owners if not (o == name and k in experts))
                         for k, owners in self.placement.items()}
            self.placement = {k: owners for k, owners in placement.items() if owners}
