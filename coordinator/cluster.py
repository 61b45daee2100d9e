"""The coordinator's remote plane: its workers, which expert lives where, and what happens when one fails.

`Cluster` is what offload_core's `ExpertRuntime` joins as its `RemotePlane`. Per layer it sends each live
worker one request with all of its groups (and its share of the prefetch hint, capped at that worker's own
slots). A worker whose request fails, or passes its deadline, is marked down; its groups are re-run on the
next live replica or, when none is left, as `Unavailable` says: computed by the coordinator from its own
copy (LOCAL, the default), the step fails naming the expert (FAIL), or the expert is dropped and the token's
other experts re-weighted (DROP, explicit: it changes the output). `WorkerMonitor` probes down workers with
backoff and brings them back. `join_workers` connects, checks identity and places experts; a worker without
the model receives its share (only what it lacks) before it is assigned. A worker that does not answer at
start is simply down from the start: its experts are computed elsewhere until the monitor brings it up.
"""
from __future__ import annotations

import enum
import logging
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Iterable

import grpc
import torch
from tqdm.auto import tqdm

from ..offload_core.counters import ExpertCounters
from ..offload_core.experts import ExpertKey
from ..offload_core.local_experts import Hint, LocalExperts
from ..protos.wire import WorkerInfo
from .placement import ClusterError, ClusterSpec, hosted_by, plan_placement
from .remote import ClientConfig, HandshakeFailed, RemoteExperts, WorkerClient

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
    connect_timeout_s: float = 5.0  # a worker that has not answered by then starts down (and is probed)
    probe_max_s: float = 30.0  # longest wait between two health probes of a down worker


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


class Cluster:
    """Workers, placement (expert -> owners in order of preference) and failure state. Experts that are not
    placed are the coordinator's own."""

    def __init__(self, workers: dict[str, RemoteExperts], placement: dict[ExpertKey, tuple[str, ...]],
                 local: LocalExperts, unavailable: Unavailable = Unavailable.LOCAL, probe_max_s: float = 30.0,
                 joiner: Joiner | None = None):
        unknown = sorted({o for owners in placement.values() for o in owners} - set(workers))
        if unknown:
            raise ClusterError(f"placement names workers that are not in the cluster: {unknown}")
        self.workers, self.placement, self.local = workers, dict(placement), local
        self.unavailable = Unavailable(unavailable)
        self.joiner = joiner  # gives a (re)joining worker its share; None: only Assign
        self.down: set[str] = set()
        self.failures: dict[str, int] = defaultdict(int)
        self.states: dict[str, WorkerState] = {name: WorkerState("serving") for name in workers}
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
    def mark_down(self, name: str, exc: Exception | None = None, count: bool = True) -> None:
        """`name` failed (`count`: a failure of a call, not a worker that was down from the start)."""
        if name not in self.down:
            logger.warning("worker %s %s (%s): its experts go to replicas or the coordinator until it is back",
                           name, "failed" if count else "is not answering", describe_error(exc))
        self.down.add(name)
        self.states[name].enter("down", describe_error(exc) if exc is not None else "")
        if count:
            self.failures[name] += 1
        self.monitor.notify(name)

    def mark_up(self, name: str) -> None:
        if name in self.down:  # good news: INFO, not a warning
            logger.info("worker %s is up and serves its experts", name)
        self.down.discard(name)
        self.states[name].enter("serving")

    def bring_up(self, name: str, progress: bool = False) -> None:
        """(Re)join `name`: its share (the experts it lacks pushed, when it has no model of its own), then Assign.
        Raises on any failure; the caller keeps it down."""
        backend = self.workers[name]
        owned = hosted_by(self.placement, name)
        if self.joiner is not None:
            self.states[name].enter("joining")
            owned = self.joiner.share(self, name, owned)
            self.joiner.join(self, name, owned, progress)
        backend.client.assign(owned)

    # -- reporting ----------------------------------------------------------------------------
    def counters(self) -> dict[int, ExpertCounters]:
        out: dict[int, ExpertCounters] = defaultdict(ExpertCounters)
        for backend in self.workers.values():
            for layer, c in backend.layer_counters().items():
                out[layer] = out[layer] + c
        return dict(out)

    def describe(self) -> dict[str, dict]:
        out = {}
        for name, backend in self.workers.items():
            state = self.states[name]
            out[name] = {**backend.describe(), "failures": self.failures.get(name, 0), "down": name in self.down,
                         "hosted": len(hosted_by(self.placement, name)), "state": state.state,
                         "since": state.since, "detail": state.detail, "pushed_bytes": state.pushed_bytes,
                         "push_s": state.push_s}
        return out

    @property
    def degraded(self) -> bool:
        """Some worker is not serving (its experts are computed elsewhere, or fail the steps that need them)."""
        return bool(self.down) or any(s.state != "serving" for s in self.states.values())

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
            if client.is_serving(timeout_s=2.0):
                self.cluster.bring_up(name)
                with self._lock:
                    self._next.pop(name, None)
                self.cluster.mark_up(name)
                return
        except (grpc.RpcError, ClusterError) as exc:
            logger.debug("worker %s not back yet: %s", name, describe_error(exc))
            self.cluster.states[name].enter("down", describe_error(exc))
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
    if isinstance(exc, grpc.FutureTimeoutError):
        return "no answer"
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Joiner:
    """How a worker gets its share of one model: the model's description, the coordinator's packed experts to
    push from, and the check that a worker serves (or may receive) this model."""

    def __init__(self, om):
        from ..worker.shard import model_description

        self.om = om
        self.fingerprint = om.fingerprint
        self.description = model_description(om.checkpoint.config_dict, om.runtime.local.format)
        self.expert_bytes = om.runtime.local.format.layout.nbytes
        self.slot_bytes = om.runtime.local.slot_bytes  # a worker on the same kind of device computes alike
        self._read_lock = threading.Lock()  # pushes to two workers at once read the source one at a time

    def check(self, name: str, info: WorkerInfo) -> None:
        if info.fingerprint and info.fingerprint != self.fingerprint and info.own_checkpoint:
            raise ClusterError(f"worker {name} serves fingerprint {info.fingerprint} ({info.expert_format}) from its "
                               f"own checkpoint, but this coordinator has {self.fingerprint} "
                               f"({self.om.runtime.local.format.label}): start both on the same checkpoint, dtype and "
                               "quantization, or start the worker without --model to receive the experts")

    def slots_for(self, info: WorkerInfo) -> int:
        """The slots per layer a worker will compute with: this coordinator's, within the worker's cap."""
        return min(self.om.config.slots_per_layer, info.max_slots_per_layer or self.om.config.slots_per_layer,
                   self.om.layout.num_experts)

    def share(self, cluster: Cluster, name: str, owned: list[ExpertKey]) -> list[ExpertKey]:
        """What of `owned` fits the worker's memory now; the rest leave its placement (computed elsewhere)."""
        backend = cluster.workers[name]
        info = backend.client.info()
        self.check(name, info)
        # It will compute with this coordinator's slots per layer, within its own cap: room for those first.
        slots = self.slots_for(info)
        layers = len(self.om.layout.sparse_layers)
        fits = max(0, (info.capacity_bytes - layers * slots * self.slot_bytes) // self.expert_bytes)
        if len(owned) <= fits:
            return owned
        keep, drop = owned[:fits], set(owned[fits:])
        logger.warning("worker %s has room for %d of the %d experts placed on it: the other %d are computed "
                       "elsewhere", name, fits, len(owned), len(drop))
        cluster.placement = {k: tuple(o for o in owners if not (o == name and k in drop))
                             for k, owners in cluster.placement.items()}
        cluster.placement = {k: owners for k, owners in cluster.placement.items() if owners}
        return keep

    def join(self, cluster: Cluster, name: str, owned: list[ExpertKey], progress: bool) -> int:
        """Join `name` with `owned`; push what it lacks. Returns the bytes pushed."""
        backend = cluster.workers[name]
        client = backend.client
        asked = self.om.config.slots_per_layer
        try:
            missing, held, slots = client.join(self.description, owned, asked)
        except grpc.RpcError as exc:
            raise ClusterError(f"worker {name} refused to join: {describe_error(exc)}") from exc
        backend.slots_per_layer = slots or backend.slots_per_layer  # prefetch hints to it are capped at its slots
        if slots and slots < asked:
            logger.warning("worker %s computes with %d slots per layer, not the %d asked for (its --slots-per-layer "
                           "or --memory): expect fewer cache hits there", name, slots, asked)
        else:
            logger.info("worker %s computes with %d slots per layer", name, slots)
        if not missing:
            logger.info("worker %s holds its %d experts already (%.1f MiB): nothing to send", name, len(owned),
                        held / 2**20)
            return 0
        state = cluster.states[name]
        state.enter("receiving", f"{len(missing)} experts, {len(missing) * self.expert_bytes / 2**20:.1f} MiB")
        logger.info("sending worker %s the %d of its %d experts it lacks (%.1f MiB)", name, len(missing), len(owned),
                    len(missing) * self.expert_bytes / 2**20)
        source = self.om.runtime.local.store.source

        def read_into(key, buf):
            with self._read_lock:
                source.read_into(key, buf)

        start = time.perf_counter()
        experts, sent = client.push(missing, read_into, self.expert_bytes, progress=progress)
        state.push_s += time.perf_counter() - start
        state.pushed_bytes += sent
        if experts != len(missing):
            raise ClusterError(f"worker {name} verified {experts} of the {len(missing)} experts sent to it")
        return sent


def check_worker_formats(cfg: ClusterConfig, planned_format: str) -> None:
    """Before the model loads (and its experts are quantized, which takes hours on a large model): a worker that
    serves its own checkpoint in another expert format is refused now, with both sides' settings. Workers that
    do not answer at once are left to `join_workers`."""
    for address in cfg.spec.workers:
        client = WorkerClient(address, "", replace(cfg.client, control_timeout_s=min(
            cfg.client.control_timeout_s, cfg.connect_timeout_s)))
        try:
            info = client.info()
        except grpc.RpcError:
            continue
        finally:
            client.close()
        if info.own_checkpoint and info.expert_format and info.expert_format != planned_format:
            raise ClusterError(
                f"worker {address} serves its own checkpoint with experts as {info.expert_format!r}, but this "
                f"coordinator's settings make them {planned_format!r}: give both the same --dtype, --expert-bits and "
                "--expert-group, or start the worker without --model to receive the coordinator's experts")


def join_workers(om, cfg: ClusterConfig, progress: bool = False) -> Cluster:
    """Connect every worker of `cfg.spec`, check it serves (or may receive) the same model, place experts, give
    each worker its share and join them to `om`'s runtime. A worker that does not answer within
    `cfg.connect_timeout_s` starts down: its experts are computed elsewhere until the monitor brings it up."""
    keys = [ExpertKey(layer, e) for layer in om.layout.sparse_layers for e in range(om.layout.num_experts)]
    joiner = Joiner(om)
    infos: dict[str, WorkerInfo | None] = {}
    clients: dict[str, WorkerClient] = {}
    reasons: dict[str, Exception] = {}
    try:
        for address in cfg.spec.workers:
            client = clients[address] = WorkerClient(address, om.fingerprint, cfg.client)
            try:
                client.wait_ready(cfg.connect_timeout_s)
                info = client.info()
            except (grpc.FutureTimeoutError, grpc.RpcError, ConnectionError) as exc:
                refusal = _misconfigured(address, exc, cfg)
                if refusal is not None:
                    raise refusal from exc
                infos[address], reasons[address] = None, exc
                continue
            joiner.check(address, info)
            infos[address] = info
        placement = cfg.spec.placement
        if placement is None:
            placement = plan_placement(keys, _assumed(infos, om, joiner.expert_bytes), cfg.spec.local_share,
                                       cfg.spec.replicas)
        assumed = _assumed(infos, om, joiner.expert_bytes)
        workers = {address: RemoteExperts(client, om.layout.hidden_size, assumed[address].slots_per_layer)
                   for address, client in clients.items()}
        cluster = Cluster(workers, placement, om.runtime.local, cfg.unavailable, cfg.probe_max_s, joiner)
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    try:
        for address in tqdm(clients, desc="joining workers", unit="worker", disable=not progress or len(clients) < 2):
            if infos[address] is None:
                cluster.mark_down(address, reasons[address], count=False)
                continue
            try:
                cluster.bring_up(address, progress=progress)
                cluster.mark_up(address)
                logger.info("worker %s (%s) hosts %d experts", address, infos[address].device,
                            len(hosted_by(cluster.placement, address)))
            except grpc.RpcError as exc:  # it answered a moment ago: treat it like a worker that failed now
                cluster.mark_down(address, exc)
    except BaseException:
        cluster.close()
        raise
    om.runtime.join(cluster)
    return cluster


def _assumed(infos: dict[str, WorkerInfo | None], om, expert_bytes: int) -> dict[str, WorkerInfo]:
    """Every worker's info for planning: a worker that did not answer is planned like the median one that did (or,
    with none, given an equal share), so that the plan holds when it comes up."""
    known = [i for i in infos.values() if i is not None]
    layers = len(om.layout.sparse_layers)
    total = layers * om.layout.num_experts * expert_bytes
    capacity = int(statistics.median(i.capacity_bytes for i in known)) if known else total
    k = om.config.slots_per_layer  # workers compute with the coordinator's slots, within their own caps
    slots = min(k, known[0].max_slots_per_layer or k) if known else k
    stand_in = WorkerInfo("", frozenset(), "?", capacity, expert_bytes, "?", layers, om.layout.num_experts,
                          om.layout.hidden_size, slots, "", 0)
    out = {}
    for name, info in infos.items():
        if info is None:
            out[name] = stand_in
        elif info.waiting or info.expert_bytes != expert_bytes:  # it learns the model at Join: size in ours
            out[name] = replace(info, expert_bytes=expert_bytes, num_layers=layers,
                                slots_per_layer=min(k, info.max_slots_per_layer or k))
        else:
            out[name] = replace(info, slots_per_layer=min(k, info.max_slots_per_layer or k))
    return out


def _misconfigured(address: str, exc: Exception, cfg: ClusterConfig) -> ClusterError | None:
    """A worker that answered, but not as this coordinator was told to talk to it: a clear error now, not a
    worker 'down' forever."""
    if isinstance(exc, HandshakeFailed):
        if cfg.client.tls_ca is None:
            return ClusterError(f"worker {address} accepts connections but not this coordinator's plaintext: it "
                                "probably speaks TLS: pass --tls-ca with the certificate of the CA that signed its "
                                "--tls-cert")
        return ClusterError(f"worker {address} accepts connections but the TLS handshake failed: its certificate is "
                            "not signed by --tls-ca, not made for this address (subjectAltName), or it does not "
                            "speak TLS (started without --tls-cert)")
    if not isinstance(exc, grpc.RpcError) or not callable(getattr(exc, "code", None)):
        return None
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if not cfg.client.token:
            return ClusterError(f"worker {address} requires a token and this coordinator has none: start it with the "
                                "worker's --token (or the same MOESHARD_TOKEN)")
        return ClusterError(f"worker {address} refused this coordinator's token: it is not the worker's --token; "
                            "give both the same (or the same MOESHARD_TOKEN)")
    if code == grpc.StatusCode.UNAVAILABLE and cfg.client.tls_ca is None and "Socket closed" in details:
        return ClusterError(f"worker {address} closed the connection: it may speak TLS (pass --tls-ca with the "
                            "certificate of its CA)")
    return None
