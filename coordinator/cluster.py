"""The coordinator's remote plane: its workers, which expert lives where, and what happens when one fails.

`Cluster` is what offload_core's `ExpertRuntime` joins as its `RemotePlane`. Per layer it sends each live
worker one request with all of its groups (and its share of the prefetch hint, capped at that worker's own
slots). A worker whose request fails, or passes its deadline, is marked down; its groups are re-run on the
next live replica or, when none is left, as `Unavailable` says: computed by the coordinator from its own
copy (LOCAL, the default), the step fails naming the expert (FAIL), or the expert is dropped and the token's
other experts re-weighted (DROP, explicit: it changes the output). `WorkerMonitor` probes down workers with
backoff and brings them back. `join_workers` connects, checks identity, places and assigns experts.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import grpc
import torch
from tqdm.auto import tqdm

from ..offload_core.counters import ExpertCounters
from ..offload_core.experts import ExpertKey
from ..offload_core.local_experts import Hint, LocalExperts
from .placement import ClusterError, ClusterSpec, hosted_by, plan_placement
from .remote import ClientConfig, RemoteExperts, WorkerClient

logger = logging.getLogger(__name__)

HERE = ""  # the coordinator itself, as an owner


class Unavailable(str, enum.Enum):
    """What happens to an expert whose workers are all down."""

    LOCAL = "local"  # the coordinator computes it from its own copy of the checkpoint (same tokens, slower)
    FAIL = "fail"  # the step fails with an error naming the expert
    DROP = "drop"  # the expert is dropped and the token's other experts re-weighted (changes the output)


class ExpertUnavailable(RuntimeError):
    """An expert with no live owner, and no fallback allowed."""


class WorkerRefused(ValueError):
    """A worker refused a request as invalid (INVALID_ARGUMENT, e.g. activations that overflow): the step's own
    fault, so no other worker would do better; it fails the step instead of being routed around."""


def _refusal(exc: Exception) -> str | None:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)) \
            and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return exc.details()
    return None


@dataclass(frozen=True)
class ClusterConfig:
    spec: ClusterSpec  # the workers, and optionally who hosts what
    client: ClientConfig = field(default_factory=ClientConfig)  # deadlines, token, TLS
    unavailable: Unavailable = Unavailable.LOCAL  # an expert whose workers are all down
    connect_timeout_s: float = 30.0  # how long a worker may take to answer at start
    probe_max_s: float = 30.0  # longest wait between two health probes of a down worker


class Cluster:
    """Workers, placement (expert -> owners in order of preference) and failure state. Experts that are not
    placed are the coordinator's own."""

    def __init__(self, workers: dict[str, RemoteExperts], placement: dict[ExpertKey, tuple[str, ...]],
                 local: LocalExperts, unavailable: Unavailable = Unavailable.LOCAL, probe_max_s: float = 30.0):
        unknown = sorted({o for owners in placement.values() for o in owners} - set(workers))
        if unknown:
            raise ClusterError(f"placement names workers that are not in the cluster: {unknown}")
        self.workers, self.placement, self.local = workers, dict(placement), local
        self.unavailable = Unavailable(unavailable)
        self.down: set[str] = set()
        self.failures: dict[str, int] = defaultdict(int)
        self.monitor = WorkerMonitor(self, max_s=probe_max_s)

    # -- ownership ----------------------------------------------------------------------------
    def live_owner(self, layer: int, expert: int) -> str | None:
        """The first live worker hosting the expert, if any."""
        for name in self.placement.get(ExpertKey(layer, expert), ()):
            if name not in self.down:
                return name
        return None

    def owner(self, layer: int, expert: int) -> str | None:
        """The first live worker hosting the expert; HERE for the coordinator; None when it is dropped."""
        owners = self.placement.get(ExpertKey(layer, expert))
        if not owners:
            return HERE
        live = self.live_owner(layer, expert)
        if live is not None:
            return live
        if self.unavailable is Unavailable.LOCAL:
            return HERE
        if self.unavailable is Unavailable.DROP:
            return None
        raise ExpertUnavailable(f"expert (layer {layer}, expert {expert}) has no live owner: its workers "
                                f"{list(owners)} are down and local fallback is off (--no-local-fallback)")

    def partition(self, layer: int, experts: Iterable[int]) -> tuple[list[int], list[int]]:
        remote, local = [], []
        for e in experts:
            owner = self.owner(layer, e)
            if owner == HERE:
                local.append(e)
            elif owner is not None:
                remote.append(e)
        return remote, local

    def _hints(self, layer: int, ranked: Iterable[int]) -> dict[str, list[int]]:
        """Each live owner's share of a ranked prediction, capped at that owner's own slots per layer."""
        out: dict[str, list[int]] = defaultdict(list)
        for e in ranked:
            owner = self.live_owner(layer, e)
            if owner is not None and len(out[owner]) < self.workers[owner].slots_per_layer:
                out[owner].append(e)
        return out

    # -- the plane ----------------------------------------------------------------------------
    def submit(self, layer: int, groups: dict[int, torch.Tensor], hint: Hint | None) -> tuple[_ClusterPending, list[int]]:
        by_owner: dict[str | None, dict[int, torch.Tensor]] = defaultdict(dict)
        for e, x in groups.items():
            by_owner[self.owner(layer, e)][e] = x
        hints = self._hints(*hint) if hint is not None else {}
        parts = []
        for owner, owned in by_owner.items():
            if owner is None:
                continue  # dropped: the MoE layer re-weights
            if owner == HERE:
                parts.append((HERE, owned, self.local.submit(layer, owned)))
                continue
            owned_hint = (hint[0], hints[owner]) if hints.get(owner) else None
            try:
                parts.append((owner, owned, self.workers[owner].submit(layer, owned, owned_hint)))
            except Exception as exc:  # could not even send: the same as a failed reply
                self.mark_down(owner, exc)
                parts.append((owner, owned, None))
        for owner, experts in hints.items():
            if owner not in by_owner and experts:
                self._hint(owner, hint[0], experts)
        return _ClusterPending(self, layer, parts), [e for experts in hints.values() for e in experts]

    def prefetch(self, layer: int, experts: list[int], already: Iterable[int] = ()) -> list[int]:
        already = set(already)
        hints = self._hints(layer, experts)
        for owner, owned in hints.items():
            fresh = [e for e in owned if e not in already]
            if fresh:
                self._hint(owner, layer, fresh)
        return [e for owned in hints.values() for e in owned]

    def _hint(self, owner: str, layer: int, experts: list[int]) -> None:
        try:
            self.workers[owner].prefetch(layer, experts)
        except Exception as exc:  # a hint to a failing worker: mark it, never fail the step for it
            self.mark_down(owner, exc)

    def rerun(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Groups whose worker failed: to the next live replica, or as `unavailable` says."""
        return self.submit(layer, groups, None)[0].result()

    # -- failure state ------------------------------------------------------------------------
    def mark_down(self, name: str, exc: Exception | None = None) -> None:
        if name not in self.down:
            logger.warning("worker %s failed (%s): its experts go to replicas or the coordinator until it is back",
                           name, describe_error(exc))
        self.down.add(name)
        self.failures[name] += 1
        self.monitor.notify(name)

    def mark_up(self, name: str) -> None:
        if name in self.down:
            logger.warning("worker %s is back and serves its experts again", name)
        self.down.discard(name)

    # -- reporting ----------------------------------------------------------------------------
    def counters(self) -> dict[int, ExpertCounters]:
        out: dict[int, ExpertCounters] = defaultdict(ExpertCounters)
        for backend in self.workers.values():
            for layer, c in backend.layer_counters().items():
                out[layer] = out[layer] + c
        return dict(out)

    def describe(self) -> dict[str, dict]:
        return {name: {**backend.describe(), "failures": self.failures.get(name, 0), "down": name in self.down,
                       "hosted": len(hosted_by(self.placement, name))}
                for name, backend in self.workers.items()}

    def close(self) -> None:
        self.monitor.close()
        for backend in self.workers.values():
            backend.close()


class _ClusterPending:
    """One layer's requests to the workers. A worker that fails has its groups re-run elsewhere."""

    def __init__(self, cluster: Cluster, layer: int, parts: list[tuple[str, dict, object]]):
        self.cluster, self.layer, self.parts = cluster, layer, parts

    def result(self) -> dict[int, torch.Tensor]:
        outputs: dict[int, torch.Tensor] = {}
        for owner, groups, pending in self.parts:
            if pending is None:  # the request could not be sent
                outputs.update(self.cluster.rerun(self.layer, groups))
                continue
            try:
                outputs.update(pending.result())
            except Exception as exc:  # a worker died, hung past its deadline, or lost its experts
                if owner == HERE:
                    raise
                refused = _refusal(exc)
                if refused is not None:
                    raise WorkerRefused(f"worker {owner} refused layer {self.layer}'s request: {refused}") from exc
                self.cluster.mark_down(owner, exc)
                outputs.update(self.cluster.rerun(self.layer, groups))
        return outputs


class WorkerMonitor:
    """Brings failed workers back: probes each down worker's health service with exponential backoff; one
    that answers SERVING with the same fingerprint is given its experts again and rejoins the placement."""

    def __init__(self, cluster: Cluster, initial_s: float = 0.25, max_s: float = 30.0):
        self.cluster = cluster
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
        client = self.cluster.workers[name].client
        try:
            if client.is_serving(timeout_s=2.0) and client.info().fingerprint == client.fingerprint:
                client.assign(hosted_by(self.cluster.placement, name))
                with self._lock:
                    self._next.pop(name, None)
                self.cluster.mark_up(name)
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


def describe_error(exc: Exception | None) -> str:
    if exc is None:
        return "no detail"
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def join_workers(om, cfg: ClusterConfig, progress: bool = False) -> Cluster:
    """Connect every worker of `cfg.spec`, check it serves the same model, place and assign experts, and join
    them to `om`'s runtime (an `OffloadedModel`)."""
    keys = [ExpertKey(layer, e) for layer in om.layout.sparse_layers for e in range(om.layout.num_experts)]
    infos, clients = {}, {}
    try:
        for address in cfg.spec.workers:
            client = clients[address] = WorkerClient(address, om.fingerprint, cfg.client)
            try:
                client.wait_ready(cfg.connect_timeout_s)
                info = client.info()
            except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
                detail = exc.details() if isinstance(exc, grpc.RpcError) else "no answer"
                raise ClusterError(f"worker {address} did not answer within {cfg.connect_timeout_s:.0f} s ({detail}): "
                                   "is moe-worker running there, and reachable?") from exc
            if info.fingerprint != om.fingerprint:
                raise ClusterError(f"worker {address} serves fingerprint {info.fingerprint} ({info.expert_format}) but "
                                   f"this coordinator has {om.fingerprint} ({om.runtime.local.format.label}): start "
                                   "both on the same checkpoint, dtype and quantization")
            infos[address] = info
        placement = cfg.spec.placement
        if placement is None:
            placement = plan_placement(keys, infos, cfg.spec.local_share, cfg.spec.replicas)
        workers = {}
        for address, client in tqdm(clients.items(), desc="assigning experts to workers", unit="worker",
                                    disable=not progress):
            owned = hosted_by(placement, address)
            client.assign(owned)  # the worker reads its experts now: this is the slow part of joining
            workers[address] = RemoteExperts(client, infos[address])
            logger.info("worker %s (%s) hosts %d experts", address, infos[address].device, len(owned))
        cluster = Cluster(workers, placement, om.runtime.local, cfg.unavailable, cfg.probe_max_s)
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    om.runtime.join(cluster)
    return cluster
