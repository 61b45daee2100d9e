"""The coordinator's workers for one model, as one object: what `Engine`, `serve` and the CLI hold.

A `Cluster` is made of four parts, split by the data each owns:
- `roster.Roster`: placement (expert -> workers), who is down, failures and states; the one record the others
  read, written only through its methods;
- `router.Router`: the model's expert plane once workers join (each layer call's groups to their owners,
  with failover around the workers that fail);
- `monitor.WorkerMonitor`: probes the workers the roster marks down and brings them back;
- `membership.Membership`: joins workers (identity checks, pushes of the experts they lack, placement
  shrunk to what fits) at start and when the monitor finds one back.

`join_workers` connects a model's workers, builds its cluster and joins it to the model's runtime, as its plane.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from tqdm.auto import tqdm

from ..offload_core.experts import ExpertKey
from ..offload_core.local_experts import LocalExperts
from ..protos.wire import WorkerInfo
from .membership import Membership, assumed_infos, check_worker_formats, misconfigured
from .monitor import WorkerMonitor
from .placement import ClusterError, ClusterSpec, plan_placement
from .remote import ClientConfig, RemoteExperts, WorkerClient, describe_error
from .roster import Roster, WorkerState
from .router import HERE, ExpertUnavailable, Router, Unavailable, WorkerRefused

logger = logging.getLogger(__name__)

__all__ = ["HERE", "Cluster", "ClusterConfig", "ClusterError", "ExpertUnavailable", "Unavailable", "WorkerRefused",
           "WorkerState", "check_worker_formats", "describe_error", "join_workers"]


@dataclass(frozen=True)
class ClusterConfig:
    spec: ClusterSpec  # the workers, and optionally who hosts what
    client: ClientConfig = field(default_factory=ClientConfig)  # deadlines, token, TLS
    unavailable: Unavailable = Unavailable.LOCAL  # an expert whose workers are all down
    connect_timeout_s: float = 5.0  # a worker that has not answered by then starts down (and is probed)
    probe_max_s: float = 30.0  # longest wait between two health probes of a down worker


class Cluster:
    """Workers, their roster, the router (the expert plane: `submit`, `prefetch`, `counters` and `backends` are
    the router's own; `describe` its workers'), the monitor and membership. Experts that are not placed are the
    coordinator's own."""

    def __init__(self, workers: dict[str, RemoteExperts], placement: dict[ExpertKey, tuple[str, ...]],
                 local: LocalExperts, unavailable: Unavailable = Unavailable.LOCAL, probe_max_s: float = 30.0,
                 membership: Membership | None = None):
        self.workers = workers
        self.roster = Roster(workers, placement)
        self.router = Router(self.roster, workers, local, unavailable)
        self.membership = membership  # gives a (re)joining worker its share; None: only Assign
        if membership is not None:
            membership.attach(self.roster, workers)
        self.monitor = WorkerMonitor(self.roster, workers, self._bring_up, max_s=probe_max_s)
        router = self.router  # the plane's calls go straight to the router
        self.submit, self.prefetch, self.counters, self.backends, self.describe = (
            router.submit, router.prefetch, router.counters, router.backends, router.describe)

    def _bring_up(self, name: str) -> None:
        if self.membership is not None:
            self.membership.bring_up(name)
        else:
            self.workers[name].client.assign(self.roster.hosted(name))

    # -- what callers read ------------------------------------------------------------------------
    @property
    def placement(self) -> dict[ExpertKey, tuple[str, ...]]:
        return self.roster.placement

    @property
    def down(self) -> set[str]:
        return self.roster.down

    @property
    def failures(self) -> dict[str, int]:
        return self.roster.failures

    @property
    def degraded(self) -> bool:
        return self.roster.degraded

    def mark_down(self, name: str, exc: Exception | None = None) -> None:
        """Take `name` out of routing now (an operator's or a test's decision; failures are the router's)."""
        self.roster.mark_down(name, describe_error(exc) if exc is not None else "marked down")

    def close(self) -> None:
        self.monitor.close()
        self.router.close()


def join_workers(om, cfg: ClusterConfig, progress: bool = False) -> Cluster:
    """Connect every worker of `cfg.spec`, check it serves (or may receive) the same model,
    place experts, give each worker its share and join the cluster to `om`'s runtime. A worker that does not
    answer within `cfg.connect_timeout_s` starts down: its experts are computed elsewhere until the monitor
    brings it up."""
    keys = [ExpertKey(layer, e) for layer in om.layout.sparse_layers for e in range(om.layout.num_experts)]
    membership = Membership(om)
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
                refusal = misconfigured(address, exc, cfg.client)
                if refusal is not None:
                    raise refusal from exc
                infos[address], reasons[address] = None, exc
                continue
            membership.check(address, info)
            infos[address] = info
        assumed = assumed_infos(infos, membership)
        placement = cfg.spec.placement
        if placement is None:
            placement = plan_placement(keys, assumed, cfg.spec.local_share, cfg.spec.replicas)
        workers = {address: RemoteExperts(client, om.layout.hidden_size, assumed[address].slots_per_layer)
                   for address, client in clients.items()}
        cluster = Cluster(workers, placement, om.runtime.local, cfg.unavailable, cfg.probe_max_s, membership)
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    try:
        for address in tqdm(clients, desc="joining workers", unit="worker", disable=not progress or len(clients) < 2):
            if infos[address] is None:
                cluster.roster.mark_down(address, describe_error(reasons[address]), count=False)
                continue
            try:
                membership.bring_up(address, progress=progress)
                cluster.roster.mark_up(address)
                logger.info("worker %s (%s) hosts %d experts", address, infos[address].device,
                            len(cluster.roster.hosted(address)))
            except grpc.RpcError as exc:  # it answered a moment ago: treat it like a worker that failed now
                cluster.roster.mark_down(address, describe_error(exc))
    except BaseException:
        cluster.close()
        raise
    om.runtime.join(cluster)
    return cluster
