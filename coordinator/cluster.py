"""Workers joined to a model: connect, check identity, place experts, assign, and plug in the backends.

Placement is of whole experts, balanced over the workers by the memory each reports; what does not fit
(or the share asked to stay home) is computed by the coordinator from its own copy of the checkpoint.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from tqdm.auto import tqdm

from offload_core import ExpertKey

from .remote import ClientConfig, RemoteExperts, WorkerClient, WorkerInfo

logger = logging.getLogger(__name__)

LOCAL = "local"  # the coordinator's own backend (offload_core.LocalExperts)


class ClusterError(ValueError):
    """A worker that cannot join: unreachable, another model, or a bad cluster file."""


def plan_placement(keys: list[ExpertKey], workers: list[WorkerInfo], local_share: float = 0.0,
                   replicas: int = 1) -> dict[ExpertKey, tuple[str, ...]]:
    """Experts -> owner addresses (`replicas` distinct workers each, when there are that many). Each worker
    gets a share proportional to its capacity (never above it), spread over every layer; `local_share` of
    the experts, and whatever does not fit, stay on the coordinator (absent from the result)."""
    if not 0.0 <= local_share <= 1.0:
        raise ValueError(f"local_share must be in [0, 1], got {local_share}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    capacity = {w.address: max(0, w.capacity_bytes // max(w.expert_bytes, 1) - w.num_layers * w.slots_per_layer)
                for w in workers}
    copies = min(replicas, len(capacity))
    if copies == 0:
        return {}
    remote_keys = min(round(len(keys) * (1.0 - local_share)), sum(capacity.values()) // copies)
    weight = sum(capacity.values()) or 1
    target = {a: min(capacity[a], -(-remote_keys * copies * capacity[a] // weight)) for a in capacity}
    assigned = dict.fromkeys(capacity, 0)
    placement: dict[ExpertKey, tuple[str, ...]] = {}
    # Walk expert-major (expert 0 of every layer, then expert 1, ...) so every worker gets every layer.
    for key in sorted(keys, key=lambda k: (k.expert, k.layer))[:remote_keys]:
        owners: list[str] = []
        for _ in range(copies):
            open_ = [a for a in capacity if assigned[a] < target[a] and a not in owners]
            if not open_:
                break
            owner = min(open_, key=lambda a: (assigned[a] / target[a], a))
            owners.append(owner)
            assigned[owner] += 1
        if owners:
            placement[key] = tuple(owners)
    return placement


@dataclass(frozen=True)
class ClusterSpec:
    workers: tuple[str, ...]  # worker addresses, HOST:PORT
    placement: dict[ExpertKey, tuple[str, ...]] | None = None  # explicit owners; None = balanced by memory
    local_share: float = 0.0  # with balanced placement: share of experts the coordinator keeps
    replicas: int = 1  # with balanced placement: workers hosting each remote expert

    @classmethod
    def from_file(cls, path: Path) -> ClusterSpec:
        """A JSON cluster file: {"workers": [{"address": "h:p", "experts": [[layer, expert], ...]}, ...],
        "local_share": 0.0, "replicas": 1}. Either every worker lists its experts (explicit placement; an
        expert listed under two workers has a replica) or none does (balanced by memory)."""
        where = f"cluster file {str(path)!r}"
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ClusterError(f"cannot read {where}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("workers"), list) or not data["workers"]:
            raise ClusterError(f'{where}: expected {{"workers": [{{"address": "HOST:PORT"}}, ...]}}')
        _no_unknown_keys(data, {"workers", "local_share", "replicas"}, where)
        addresses, placement, explicit = [], {}, []
        for i, w in enumerate(data["workers"]):
            if not isinstance(w, dict) or not isinstance(w.get("address"), str):
                raise ClusterError(f'{where}: workers[{i}] needs an "address": "HOST:PORT"')
            _no_unknown_keys(w, {"address", "experts"}, f"{where}: workers[{i}]")
            addresses.append(_check_address(w["address"]))
            explicit.append("experts" in w)
            for pair in w.get("experts", []):
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
                    raise ClusterError(f"{where}: workers[{i}].experts must be [[layer, expert], ...]")
                key = ExpertKey(*pair)
                placement[key] = (*placement.get(key, ()), w["address"])  # listed twice = a replica
        if any(explicit) and not all(explicit):
            raise ClusterError(f'{where}: either every worker lists its "experts" (explicit placement) or none '
                               "does (balanced by reported memory)")
        try:
            local_share, replicas = float(data.get("local_share", 0.0)), int(data.get("replicas", 1))
        except (TypeError, ValueError) as exc:
            raise ClusterError(f"{where}: local_share must be a number and replicas a whole number") from exc
        if any(explicit) and ("local_share" in data or "replicas" in data):
            raise ClusterError(f"{where}: local_share and replicas apply to balanced placement only; with explicit "
                               "experts, list an expert under two workers to replicate it")
        return cls(tuple(addresses), placement or None, local_share, replicas)

    @classmethod
    def from_addresses(cls, text: str, local_share: float = 0.0, replicas: int = 1) -> ClusterSpec:
        addresses = tuple(_check_address(a.strip()) for a in text.split(",") if a.strip())
        if not addresses:
            raise ClusterError("--workers is empty: expected HOST:PORT[,HOST:PORT...]")
        return cls(addresses, None, local_share, replicas)


class WorkerMonitor:
    """Brings failed workers back: probes each down worker's health service with exponential backoff; one
    that answers SERVING with the same fingerprint is given its experts again and rejoins the placement."""

    def __init__(self, runtime, clients: dict[str, WorkerClient], initial_s: float = 0.25, max_s: float = 30.0):
        self.runtime, self.clients = runtime, clients
        self.initial_s, self.max_s = initial_s, max_s
        self._next: dict[str, tuple[float, float]] = {}  # worker -> (next probe time, current backoff)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
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
        client = self.clients[name]
        try:
            if client.is_serving(timeout_s=2.0) and client.info().fingerprint == client.fingerprint:
                client.assign(hosted_by(self.runtime.placement, name))
                with self._lock:
                    self._next.pop(name, None)
                self.runtime.mark_up(name)
                return
        except grpc.RpcError as exc:
            logger.debug("worker %s not back yet: %s", name, exc.code())
        with self._lock:
            _, backoff = self._next.get(name, (0, self.initial_s))
            backoff = min(backoff * 2, self.max_s)
            self._next[name] = (time.monotonic() + backoff, backoff)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"worker address {address!r}: expected HOST:PORT, e.g. 192.168.1.20:50051")
    return address


def _no_unknown_keys(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ClusterError(f"{where}: unknown keys {unknown}; expected only {sorted(known)}")


def attach_workers(model, spec: ClusterSpec, cfg: ClientConfig = ClientConfig(), connect_timeout_s: float = 30.0,
                   probe_max_s: float = 30.0, progress: bool = False) -> dict[str, WorkerInfo]:
    """Connect every worker, check it serves the same model, place and assign experts, plug in backends,
    and start the monitor that brings failed workers back."""
    runtime, fingerprint = model.moeshard, model.moeshard_fingerprint
    adapter_keys = [ExpertKey(layer, e) for layer in runtime.backends[LOCAL].caches
                    for e in range(model.config.num_local_experts)]
    infos: dict[str, WorkerInfo] = {}
    clients: dict[str, WorkerClient] = {}
    for address in spec.workers:
        client = WorkerClient(address, fingerprint, cfg)
        try:
            client.wait_ready(connect_timeout_s)
            info = client.info()
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            client.close()
            detail = exc.details() if isinstance(exc, grpc.RpcError) else "no answer"
            raise ClusterError(f"worker {address} did not answer within {connect_timeout_s:.0f} s ({detail}): "
                               "is moe-worker running there, and reachable?") from exc
        if info.fingerprint != fingerprint:
            client.close()
            raise ClusterError(f"worker {address} serves fingerprint {info.fingerprint} ({info.expert_format}) but "
                               f"this coordinator has {fingerprint}: start both on the same checkpoint, dtype and "
                               "quantization")
        infos[address], clients[address] = info, client
    placement = spec.placement
    if placement is None:
        placement = plan_placement(adapter_keys, list(infos.values()), spec.local_share, spec.replicas)
    unknown = sorted({o for owners in placement.values() for o in owners} - set(infos))
    if unknown:
        raise ClusterError(f"placement names workers that are not in the cluster: {unknown}")
    for address, client in tqdm(clients.items(), desc="assigning experts to workers", unit="worker",
                                disable=not progress):
        keys = hosted_by(placement, address)
        client.assign(keys)  # the worker reads its experts now: this is the slow part of joining
        runtime.backends[address] = RemoteExperts(client, model.config.hidden_size)
        logger.info("worker %s (%s) hosts %d experts", address, infos[address].device, len(keys))
    runtime.placement = dict(placement)
    monitor = WorkerMonitor(runtime, clients, max_s=probe_max_s)
    runtime.on_down = monitor.notify
    runtime.closers.append(monitor.close)
    return infos


def hosted_by(placement: dict[ExpertKey, tuple[str, ...]], address: str) -> list[ExpertKey]:
    return sorted(k for k, owners in placement.items() if address in owners)
