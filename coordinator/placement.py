"""Which worker hosts which expert: the cluster's description (`--workers`, `--cluster FILE`) and the plan.

Placement is of whole experts, balanced over the workers by the memory each reports; what does not fit
(or the share asked to stay home) is computed by the coordinator from its own copy of the checkpoint.
Pure data and arithmetic: no network here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..offload_core.experts import ExpertKey
from ..protos.wire import WorkerInfo


class ClusterError(ValueError):
    """A worker that cannot join: unreachable, another model, or a bad cluster file."""


def plan_placement(keys: list[ExpertKey], workers: dict[str, WorkerInfo], local_share: float = 0.0,
                   replicas: int = 1) -> dict[ExpertKey, tuple[str, ...]]:
    """Experts -> owner addresses (`replicas` distinct workers each, when there are that many). Each worker
    gets a share proportional to its capacity (never above it), spread over every layer; `local_share` of
    the experts, and whatever does not fit, stay on the coordinator (absent from the result)."""
    if not 0.0 <= local_share <= 1.0:
        raise ValueError(f"local_share must be in [0, 1], got {local_share}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    capacity = {address: max(0, w.capacity_bytes // max(w.expert_bytes, 1) - w.num_layers * w.slots_per_layer)
                for address, w in workers.items()}
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


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"worker address {address!r}: expected HOST:PORT, e.g. 192.168.1.20:50051")
    return address


def _no_unknown_keys(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ClusterError(f"{where}: unknown keys {unknown}; expected only {sorted(known)}")


def hosted_by(placement: dict[ExpertKey, tuple[str, ...]], address: str) -> list[ExpertKey]:
    return sorted(k for k, owners in placement.items() if address in owners)
