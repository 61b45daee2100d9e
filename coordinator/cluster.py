"""Workers joined to a model: connect, check identity, place experts, assign, and plug in the backends.

Placement is of whole experts, balanced over the workers by the memory each reports; what does not fit
(or the share asked to stay home) is computed by the coordinator from its own copy of the checkpoint.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from offload_core import ExpertKey

from .remote import ClientConfig, RemoteExperts, WorkerClient, WorkerInfo

logger = logging.getLogger(__name__)

LOCAL = "local"


class ClusterError(ValueError):
    """A worker that cannot join: unreachable, another model, or a bad cluster file."""


def plan_placement(keys: list[ExpertKey], workers: list[WorkerInfo], local_share: float = 0.0) -> dict[ExpertKey, str]:
    """Experts -> owner address. Each worker gets a share proportional to its capacity (never above it),
    spread over every layer; `local_share` of the experts, and whatever does not fit, stay local."""
    if not 0.0 <= local_share <= 1.0:
        raise ValueError(f"local_share must be in [0, 1], got {local_share}")
    capacity = {w.address: max(0, w.capacity_bytes // max(w.expert_bytes, 1) - w.num_layers * w.slots_per_layer)
                for w in workers}
    remote_total = min(round(len(keys) * (1.0 - local_share)), sum(capacity.values()))
    weight = sum(capacity.values()) or 1
    target = {a: min(capacity[a], round(remote_total * capacity[a] / weight)) for a in capacity}
    placement: dict[ExpertKey, str] = {}
    assigned = dict.fromkeys(capacity, 0)
    # Walk expert-major (expert 0 of every layer, then expert 1, ...) so every worker gets every layer.
    for key in sorted(keys, key=lambda k: (k.expert, k.layer)):
        open_ = [a for a in capacity if assigned[a] < target[a]]
        if not open_ or sum(assigned.values()) >= remote_total:
            placement[key] = LOCAL
            continue
        owner = min(open_, key=lambda a: (assigned[a] / target[a], a))
        placement[key] = owner
        assigned[owner] += 1
    return placement


@dataclass(frozen=True)
class ClusterSpec:
    workers: tuple[str, ...]  # worker addresses, HOST:PORT
    placement: dict[ExpertKey, str] | None = None  # explicit owners; None = balanced by reported memory
    local_share: float = 0.0  # with balanced placement: share of experts the coordinator keeps

    @classmethod
    def from_file(cls, path: Path) -> ClusterSpec:
        """A JSON cluster file: {"workers": [{"address": "h:p", "experts": [[layer, expert], ...]}, ...],
        "local_share": 0.0}; "experts" is optional (balanced placement when no worker lists any)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ClusterError(f"cannot read cluster file {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("workers"), list) or not data["workers"]:
            raise ClusterError(f"cluster file {str(path)!r}: expected {{\"workers\": [{{\"address\": \"HOST:PORT\"}}, ...]}}")
        addresses, placement = [], {}
        for i, w in enumerate(data["workers"]):
            if not isinstance(w, dict) or not isinstance(w.get("address"), str):
                raise ClusterError(f"cluster file {str(path)!r}: workers[{i}] needs an \"address\": \"HOST:PORT\"")
            addresses.append(w["address"])
            for pair in w.get("experts", []):
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
                    raise ClusterError(f"cluster file {str(path)!r}: workers[{i}].experts must be [[layer, expert], ...]")
                placement[ExpertKey(*pair)] = w["address"]
        return cls(tuple(addresses), placement or None, float(data.get("local_share", 0.0)))

    @classmethod
    def from_addresses(cls, text: str, local_share: float = 0.0) -> ClusterSpec:
        addresses = tuple(a.strip() for a in text.split(",") if a.strip())
        for a in addresses:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ClusterError(f"worker address {a!r}: expected HOST:PORT, e.g. 192.168.1.20:50051")
        if not addresses:
            raise ClusterError("--workers is empty: expected HOST:PORT[,HOST:PORT...]")
        return cls(addresses, None, local_share)


def attach_workers(model, spec: ClusterSpec, cfg: ClientConfig = ClientConfig(),
                   connect_timeout_s: float = 30.0) -> dict[str, WorkerInfo]:
    """Connect every worker, check it serves the same model, place and assign experts, plug in backends."""
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
        placement = plan_placement(adapter_keys, list(infos.values()), spec.local_share)
    unknown = sorted({owner for owner in placement.values()} - set(infos) - {LOCAL})
    if unknown:
        raise ClusterError(f"placement names workers that are not in the cluster: {unknown}")
    for address, client in clients.items():
        keys = [k for k, owner in placement.items() if owner == address]
        client.assign(keys)
        runtime.backends[address] = RemoteExperts(client, model.config.hidden_size)
        logger.info("worker %s (%s) hosts %d experts", address, infos[address].device, len(keys))
    runtime.placement = {k: v for k, v in placement.items() if v != LOCAL}
    return infos
