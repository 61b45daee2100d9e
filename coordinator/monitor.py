"""Brings failed workers back: probes each worker the roster marks down, with exponential backoff; one that
answers SERVING is given its experts again (membership's `bring_up`) and marked up."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc

from .placement import ClusterError
from .remote import RemoteExperts, describe_error
from .roster import Roster

logger = logging.getLogger(__name__)


class WorkerMonitor:
    """One thread for all the cluster's down workers. `bring_up(name)` rejoins one that answers (raising keeps
    it down)."""

    def __init__(self, roster: Roster, workers: dict[str, RemoteExperts], bring_up: Callable[[str], None],
                 initial_s: float = 0.25, max_s: float = 30.0):
        self.roster, self.workers, self.bring_up = roster, workers, bring_up
        self.initial_s, self.max_s = initial_s, max_s
        self._next: dict[str, tuple[float, float]] = {}  # worker -> (next probe time, current backoff)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        roster.on_down(self.notify)
        self._thread = threading.Thread(target=self._run, name="moeshard-worker-monitor", daemon=True)
        self._thread.start()

    def notify(self, name: str) -> None:
        with self._lock:
            self._next.setdefault(name, (time.monotonic() + self.initial_s, self.initial_s))
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                due = [n for n, (t, _) in self._next.items() if t <= time.monotonic()]
                wait = min((t for t, _ in self._next.values()), default=time.monotonic() + 60) - time.monotonic()
            for name in due:
                if self._stop.is_set():
                    return
                self._probe(name)
            if not due:
                self._wake.wait(timeout=max(0.01, min(wait, 60)))
                self._wake.clear()

    def _probe(self, name: str) -> None:
        client = self.workers[name].client
        try:
            if client.is_serving(timeout_s=2.0):
                self.bring_up(name)
                with self._lock:
                    self._next.pop(name, None)
                self.roster.mark_up(name)
                return
        except (grpc.RpcError, ClusterError) as exc:
            logger.debug("worker %s not back yet: %s", name, describe_error(exc))
            self.roster.enter(name, "down", describe_error(exc))
        with self._lock:
            _, backoff = self._next.get(name, (0, self.initial_s))
            backoff = min(backoff * 2, self.max_s)
            self._next[name] = (time.monotonic() + backoff, backoff)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
