"""`ExpertShard`: the experts one worker hosts, with their own store, LRU slots and prefetch.

It opens its own copy of the checkpoint (headers only), reads just the experts it is assigned, and
computes them for a coordinator. It validates what it is asked (layers, experts, shapes) and knows
nothing about gRPC: the servicer maps its exceptions to status codes.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from offload_core import Checkpoint, ExpertKey, QuantConfig
from offload_core.families import adapter_for
from offload_core.experts import build_local_experts, expert_fingerprint, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

_MEMORY_HEADROOM = 0.8  # share of free memory a worker offers when no --memory is given
_SMALL_REQUEST_BYTES = 64 << 20  # activations below this are not checked against free memory


class UnknownExpert(LookupError):
    """An expert this worker does not host (NOT_FOUND on the wire)."""


class FingerprintMismatch(Exception):
    """The coordinator runs another model or expert format (FAILED_PRECONDITION on the wire)."""


class OverCapacity(Exception):
    """The request would exceed this worker's memory (RESOURCE_EXHAUSTED on the wire)."""


@dataclass(frozen=True)
class ShardConfig:
    model: Path  # this worker's own copy of the checkpoint folder
    device: str = "cpu"  # where the expert slots live and experts compute: cpu, cuda, cuda:N
    slots_per_layer: int = 2  # experts resident on the device per layer (LRU); the rest wait in the store
    store: str = "ram"  # "ram": hosted experts read once into (pinned) RAM; "disk": read on every miss
    dtype: str | None = None  # expert compute dtype; None = the checkpoint's (must match the coordinator's)
    memory_bytes: int | None = None  # memory offered for hosted experts; None = 80% of what is free now
    max_tokens: int = 8192  # most rows one RunExperts may carry
    quant: QuantConfig = QuantConfig()  # expert bits (must match the coordinator's); attention is not here
    cache_dir: Path | None = None  # quantized cache location; None = $MOESHARD_CACHE_DIR or ~/.cache/moeshard

    def __post_init__(self):
        if self.slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1, got {self.slots_per_layer}")
        if self.store not in ("ram", "disk"):
            raise ValueError(f"store must be 'ram' or 'disk', got {self.store!r}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"memory must be > 0 bytes, got {self.memory_bytes}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class ExpertShard:
    def __init__(self, cfg: ShardConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.ckpt = Checkpoint(cfg.model)
        config = AutoConfig.from_pretrained(self.ckpt.path)
        self.adapter = adapter_for(config)
        self.adapter.validate(self.ckpt)
        if cfg.slots_per_layer > self.adapter.num_experts:
            raise ValueError(f"slots_per_layer must be <= {self.adapter.num_experts}, got {cfg.slots_per_layer}")
        self.dtype = resolve_dtype(cfg.dtype, config)
        self.backend = build_local_experts(self.ckpt, config, self.adapter, self.device, cfg.slots_per_layer,
                                           cfg.store, self.dtype, cfg.quant, cfg.cache_dir, progress=True)
        self.fingerprint = expert_fingerprint(self.ckpt, self.adapter, self.backend.format)
        self.expert_bytes = self.backend.format.layout.nbytes
        self.capacity_bytes = cfg.memory_bytes or self._free_memory()
        self.moe_layers = set(self.adapter.moe_layers())
        self.hosted: frozenset[ExpertKey] = frozenset()
        self._lock = threading.Lock()  # caches and store are driven by one request at a time
        self.counters = dict(requests=0, tokens=0, errors=0)

    def _free_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(min(free, psutil.virtual_memory().available) * _MEMORY_HEADROOM)
        return int(psutil.virtual_memory().available * _MEMORY_HEADROOM)

    @property
    def expert_format(self) -> str:
        return " ".join(str(v) for v in self.backend.format.describe().values())

    # -- validation ----------------------------------------------------------------------------
    def check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise FingerprintMismatch(
                f"fingerprint mismatch: this worker serves {self.fingerprint} ({self.ckpt.path.name}, "
                f"{self.expert_format}) but the coordinator sent {fingerprint or '(none)'}: start both on the same "
                "checkpoint with the same dtype and quantization"
            )

    def check_key(self, layer: int, expert: int) -> ExpertKey:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} out of range: expected an MoE layer in 0..{max(self.moe_layers)}")
        if not 0 <= expert < self.adapter.num_experts:
            raise ValueError(f"expert {expert} out of range: expected 0..{self.adapter.num_experts - 1}")
        return ExpertKey(layer, expert)

    # -- operations ----------------------------------------------------------------------------
    def assign(self, keys: list[ExpertKey], progress: bool = False) -> frozenset[ExpertKey]:
        """Host exactly `keys` from now on; with the RAM store, read them now (idempotent)."""
        keys = frozenset(self.check_key(*k) for k in keys)
        need = len(keys) * self.expert_bytes if self.cfg.store == "ram" else 0
        need += len(self.moe_layers) * self.cfg.slots_per_layer * self.expert_bytes
        if need > self.capacity_bytes:
            raise OverCapacity(f"assigning {len(keys)} experts needs {need / 2**20:.1f} MiB, more than this worker's "
                               f"{self.capacity_bytes / 2**20:.1f} MiB (raise --memory or assign fewer experts)")
        with self._lock:
            if keys == self.hosted:
                return self.hosted
            self.backend.store.retain(keys)
            if self.cfg.store == "ram":
                for key in tqdm(sorted(keys), desc="loading assigned experts", disable=not progress, unit="expert"):
                    self.backend.store.host_buffer(key)
            self.hosted = keys
        logger.info("hosting %d experts (%.1f MiB)", len(keys), len(keys) * self.expert_bytes / 2**20)
        return self.hosted

    def run(self, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor,
            hint: tuple[int, list[int]] | None = None) -> tuple[torch.Tensor, int, int]:
        """Compute `experts` on their rows of `hidden` [sum(counts), D]; returns (outputs, hits, misses)."""
        if not experts:
            raise ValueError("experts is empty: expected at least one expert per request")
        if len(experts) != len(counts):
            raise ValueError(f"{len(experts)} experts but {len(counts)} counts: expected one count per expert")
        if len(set(experts)) != len(experts):
            raise ValueError(f"experts {experts} has duplicates: expected distinct expert ids")
        if any(c < 1 for c in counts):
            raise ValueError(f"counts {counts} must all be >= 1")
        rows = sum(counts)
        if rows > self.cfg.max_tokens:
            raise ValueError(f"{rows} rows exceed this worker's limit of {self.cfg.max_tokens} per request")
        if hidden.dim() != 2 or hidden.shape[0] != rows or hidden.shape[1] != self.adapter.hidden_size:
            raise ValueError(f"hidden has shape {list(hidden.shape)}, expected [{rows}, {self.adapter.hidden_size}] "
                             "(sum of counts x hidden size)")
        if not torch.isfinite(hidden).all():
            raise ValueError("hidden contains NaN or Inf: expected finite hidden states")
        for e in experts:
            key = self.check_key(layer, e)
            if key not in self.hosted:
                raise UnknownExpert(f"expert (layer {layer}, expert {e}) is not hosted by this worker")
        self._check_activation_memory(rows)
        groups = dict(zip(experts, hidden.to(self.device).split(counts)))
        with self._lock:
            stats = self.backend.caches[layer].stats
            hits, misses = stats.hits, stats.misses
            if hint is not None:
                hint = (hint[0], self._hosted_only(*hint))
            outputs = self.backend.submit(layer, groups, hint).result()
            hits, misses = stats.hits - hits, stats.misses - misses
            self.counters["requests"] += 1
            self.counters["tokens"] += rows
        return torch.cat([outputs[e] for e in experts]).cpu(), hits, misses

    def _check_activation_memory(self, rows: int) -> None:
        # The largest expert's intermediates for all rows, in fp32, with room for the output: refuse what
        # cannot fit rather than be killed by the OOM killer (or a CUDA OOM) halfway through. Small requests
        # (every decode step) skip the memory query, which would otherwise cost a system call per request.
        need = rows * (3 * self.adapter.intermediate_size + 2 * self.adapter.hidden_size) * 4
        if need < _SMALL_REQUEST_BYTES:
            return
        free = self._free_memory() / _MEMORY_HEADROOM
        if need > free:
            raise OverCapacity(f"{rows} rows need about {need / 2**20:.0f} MiB of activations, but only "
                               f"{free / 2**20:.0f} MiB are free on {self.device}: send fewer tokens per request")

    def _hosted_only(self, layer: int, experts: list[int]) -> list[int]:
        if layer not in self.moe_layers:
            return []
        return [e for e in experts if ExpertKey(layer, e) in self.hosted]

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """A hint: unknown layers and unhosted experts are ignored, never an error."""
        experts = self._hosted_only(layer, experts)
        if not experts:
            return 0
        with self._lock:
            return self.backend.prefetch(layer, experts)

    def stats(self) -> dict:
        layers = self.backend.stats()["layers"].values()
        total = {k: sum(s[k] for s in layers) for k in ("hits", "misses", "prefetch_issued", "prefetch_used",
                                                          "bytes_loaded", "compute_s", "wait_s")}
        return {**self.counters, **total}

    def close(self) -> None:
        self.backend.close()
