"""Who is in the cluster and with what: connecting workers, checking they serve (or may receive) the model,
placing experts, and giving each worker its share (the experts it lacks pushed before it is assigned).

`Membership` holds what a worker's share is made of (the model's description, its packed experts and their source) and brings a worker
up, at start and whenever the monitor finds a down one answering again; it writes the roster only through its
methods. (`cluster.join_workers` connects a model's workers and builds its cluster with one.)
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import replace

import grpc

from ..offload_core.experts import ExpertKey
from ..protos.wire import WorkerInfo, model_description
from .placement import ClusterError
from .remote import ClientConfig, HandshakeFailed, RemoteExperts, WorkerClient, describe_error
from .roster import Roster

logger = logging.getLogger(__name__)


class Membership:
    """How a worker gets its share of one model (`om`): the model's description, the coordinator's packed experts
    to push from, and the check that a worker serves (or may receive) this model."""

    def __init__(self, om, roster: Roster | None = None, workers: dict[str, RemoteExperts] | None = None):
        self.fingerprint = om.fingerprint
        fmt = om.expert_format
        self.format_label = fmt.label
        self.description = model_description(om.checkpoint.config_dict, fmt)
        self.expert_bytes = fmt.layout.nbytes
        self.slot_bytes = om.slot_bytes  # a worker on the same kind of device computes alike
        self.slots_per_layer = om.config.slots_per_layer
        self.policy = om.config.policy  # workers evict as the coordinator does
        self.num_experts, self.num_layers = om.layout.num_experts, len(om.layout.sparse_layers)
        self.hidden_size = om.layout.hidden_size
        self.source = om.expert_source()
        self.roster, self.workers = roster, workers  # set by `attach` once the cluster exists
        self._read_lock = threading.Lock()  # pushes to two workers at once read the source one at a time

    def attach(self, roster: Roster, workers: dict[str, RemoteExperts]) -> None:
        self.roster, self.workers = roster, workers

    def check(self, name: str, info: WorkerInfo) -> None:
        if info.fingerprint and info.fingerprint != self.fingerprint and info.own_checkpoint:
            raise ClusterError(f"worker {name} serves fingerprint {info.fingerprint} ({info.expert_format}) from its "
                               f"own checkpoint, but this coordinator has {self.fingerprint} ({self.format_label}): "
                               "start both on the same checkpoint, dtype and quantization, or start the worker "
                               "without --model to receive the experts")

    def slots_for(self, info: WorkerInfo) -> int:
        """The slots per layer a worker will compute with: this coordinator's, within the worker's cap."""
        k = self.slots_per_layer
        return min(k, info.max_slots_per_layer or k, self.num_experts)

    def bring_up(self, name: str, progress: bool = False) -> None:
        """(Re)join `name`: its share (the experts it lacks pushed, when it has no model of its own), then Assign.
        Raises on any failure; the caller keeps it down."""
        self.roster.enter(name, "joining")
        owned = self.share(name, self.roster.hosted(name))
        self.join(name, owned, progress)
        self.workers[name].client.assign(owned)

    def share(self, name: str, owned: list[ExpertKey]) -> list[ExpertKey]:
        """What of `owned` fits the worker's memory now; the rest leave its placement (computed elsewhere)."""
        info = self.workers[name].client.info()
        self.check(name, info)
        # It will compute with this coordinator's slots per layer, within its own cap: room for those first.
        slots = self.slots_for(info)
        fits = max(0, (info.capacity_bytes - self.num_layers * slots * self.slot_bytes) // self.expert_bytes)
        if len(owned) <= fits:
            return owned
        keep, drop = owned[:fits], set(owned[fits:])
        logger.warning("worker %s has room for %d of the %d experts placed on it: the other %d are computed "
                       "elsewhere", name, fits, len(owned), len(drop))
        self.roster.release(name, drop)
        return keep

    def join(self, name: str, owned: list[ExpertKey], progress: bool) -> int:
        """Join `name` with `owned`; push what it lacks. Returns the bytes pushed."""
        backend = self.workers[name]
        client = backend.client
        asked = self.slots_per_layer
        try:
            missing, held, slots = client.join(self.description, owned, asked, self.policy)
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
        self.roster.enter(name, "receiving",
                          f"{len(missing)} experts, {len(missing) * self.expert_bytes / 2**20:.1f} MiB")
        logger.info("sending worker %s the %d of its %d experts it lacks (%.1f MiB)", name, len(missing), len(owned),
                    len(missing) * self.expert_bytes / 2**20)

        def read_into(key, buf):
            with self._read_lock:
                self.source.read_into(key, buf)

        start = time.perf_counter()
        experts, sent = client.push(missing, read_into, self.expert_bytes, progress=progress)
        self.roster.count_push(name, sent, time.perf_counter() - start)
        if experts != len(missing):
            raise ClusterError(f"worker {name} verified {experts} of the {len(missing)} experts sent to it")
        return sent


def check_worker_formats(cfg, planned_format: str) -> None:
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


def assumed_infos(infos: dict[str, WorkerInfo | None], membership: Membership) -> dict[str, WorkerInfo]:
    """Every worker's info for planning: a worker that did not answer is planned like the median one that did (or,
    with none, given an equal share), so that the plan holds when it comes up."""
    known = [i for i in infos.values() if i is not None]
    m = membership
    total = m.num_layers * m.num_experts * m.expert_bytes
    capacity = int(statistics.median(i.capacity_bytes for i in known)) if known else total
    k = m.slots_per_layer  # workers compute with the coordinator's slots, within their own caps
    slots = min(k, known[0].max_slots_per_layer or k) if known else k
    stand_in = WorkerInfo("", frozenset(), "?", capacity, m.expert_bytes, "?", m.num_layers, m.num_experts,
                          m.hidden_size, slots, "", 0)
    out = {}
    for name, info in infos.items():
        if info is None:
            out[name] = stand_in
        elif info.waiting or info.expert_bytes != m.expert_bytes:  # it learns the model at Join: size in ours
            out[name] = replace(info, expert_bytes=m.expert_bytes, num_layers=m.num_layers,
                                slots_per_layer=min(k, info.max_slots_per_layer or k))
        else:
            out[name] = replace(info, slots_per_layer=min(k, info.max_slots_per_layer or k))
    return out


def misconfigured(address: str, exc: Exception, client: ClientConfig) -> ClusterError | None:
    """A worker that answered, but not as this coordinator was told to talk to it: a clear error now, not a
    worker 'down' forever."""
    if isinstance(exc, HandshakeFailed):
        if client.tls_ca is None:
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
        if not client.token:
            return ClusterError(f"worker {address} requires a token and this coordinator has none: start it with the "
                                "worker's --token (or the same MOESHARD_TOKEN)")
        return ClusterError(f"worker {address} refused this coordinator's token: it is not the worker's --token; "
                            "give both the same (or the same MOESHARD_TOKEN)")
    if code == grpc.StatusCode.UNAVAILABLE and client.tls_ca is None and "Socket closed" in details:
        return ClusterError(f"worker {address} closed the connection: it may speak TLS (pass --tls-ca with the "
                            "certificate of its CA)")
    return None
