"""`ExpertShard`: the experts one worker hosts, with their own store, LRU slots and prefetch.

Its experts come from one of two places: the worker's own copy of the checkpoint (`--model`: headers only
at open, then just the assigned experts), or a coordinator that pushed them (`from_push`: the model's
description and the packed experts, kept in `ReceivedExperts` on disk). Either way it computes them for
a coordinator, validates what it is asked (layers, experts, shapes, sizes, memory and disk) and knows
nothing about gRPC: the servicer maps its exceptions to status codes.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from ..offload_core.checkpoint import Checkpoint
from ..offload_core.config import OffloadConfig, QuantConfig, resolve_device, resolve_dtype
from ..offload_core.counters import ExpertCounters
from ..offload_core.experts import ExpertKey, check_finite
from ..offload_core.families import FamilyLayout, build_meta_model, open_layout
from ..offload_core.formats import expert_format
from ..offload_core.local_experts import LocalExperts, expert_fingerprint, open_local_experts
from ..offload_core.settings import cache_root_from_env
from ..protos.wire import WIRE_DTYPES, WorkerInfo, WorkerStats, quote
from .disk import DiskBudget
from .received import Incoming, NotHeld, ReceivedExperts

logger = logging.getLogger(__name__)

_MEMORY_HEADROOM = 0.8  # share of free memory a worker offers when no --memory is given
_SMALL_REQUEST_BYTES = 64 << 20  # activations below this are not checked against free memory
# Sane bounds on a pushed model's description, checked before anything is built from it.
_MAX_LAYERS = 1024  # the deepest released models have ~130 layers
_MAX_HIDDEN = 1 << 17  # the widest have ~16k
_MAX_EXPERTS = 1 << 14  # experts per layer: the most in a released model is 512
_WIRE_ITEMSIZE = max(dtype.itemsize for dtype in WIRE_DTYPES.values())  # hidden states travel in at most this


class UnknownExpert(LookupError):
    """An expert this worker does not host (NOT_FOUND on the wire)."""


class FingerprintMismatch(Exception):
    """The coordinator runs another model or expert format (FAILED_PRECONDITION on the wire)."""


class OverCapacity(Exception):
    """The request would exceed this worker's memory or disk (RESOURCE_EXHAUSTED on the wire)."""


@dataclass(frozen=True)
class ShardConfig:
    model: Path | None = None  # this worker's own copy of the checkpoint; None = the coordinator pushes the experts
    # The expert settings, as the coordinator's own (device, slots per layer, store, dtype, expert bits, cache
    # dir): with --model, dtype and expert bits must match the coordinator's; without, the coordinator's apply.
    offload: OffloadConfig = field(default_factory=lambda: OffloadConfig(store="ram", prefetch=0))
    memory_bytes: int | None = None  # memory offered for hosted experts; None = 80% of what is free now
    disk_bytes: int | None = None  # disk offered for received experts (every model's); None = no limit but the disk's
    max_tokens: int = 8192  # most rows one RunExperts may carry
    allow_model_switch: bool = False  # a coordinator of another model may take over a worker that received one
    # --slots-per-layer: the most slots per layer a coordinator may ask for; None = as many as it asks (within
    # memory). Until a coordinator joins, offload.slots_per_layer applies.
    max_slots_per_layer: int | None = None

    def __post_init__(self):
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"memory must be > 0 bytes, got {self.memory_bytes}")
        if self.disk_bytes is not None and self.disk_bytes <= 0:
            raise ValueError(f"disk must be > 0 bytes, got {self.disk_bytes}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_slots_per_layer is not None and self.max_slots_per_layer < 1:
            raise ValueError(f"slots per layer must be >= 1, got {self.max_slots_per_layer}")

    @property
    def store(self) -> str:
        return self.offload.store or "ram"

    @property
    def received_root(self) -> Path:
        """Where pushed experts are kept: `<cache dir>/received/<fingerprint>/`."""
        return (self.offload.cache_dir or cache_root_from_env()) / "received"


def free_memory(device: torch.device) -> int:
    """What a worker offers when no --memory is given: 80% of the memory free now (of the GPU and the host)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free, psutil.virtual_memory().available) * _MEMORY_HEADROOM)
    return int(psutil.virtual_memory().available * _MEMORY_HEADROOM)


class ExpertShard:
    def __init__(self, cfg: ShardConfig, layout: FamilyLayout, backend: LocalExperts, fingerprint: str,
                 dtype: torch.dtype, device: torch.device, origin: str, received: ReceivedExperts | None = None):
        self.cfg, self.layout, self.backend, self.fingerprint = cfg, layout, backend, fingerprint
        self.dtype, self.device, self.origin, self.received = dtype, device, origin, received
        self.expert_bytes = backend.format.layout.nbytes
        self.capacity_bytes = cfg.memory_bytes or self._free_memory()
        self.moe_layers = set(layout.sparse_layers)
        self.hosted: frozenset[ExpertKey] = frozenset()
        self.share: frozenset[ExpertKey] = frozenset()  # what the last Join announced
        self._lock = threading.Lock()  # caches and store are driven by one request at a time
        self.counters = dict(requests=0, tokens=0)

    @classmethod
    def from_checkpoint(cls, cfg: ShardConfig) -> ExpertShard:
        device = resolve_device(cfg.offload.device)
        ckpt = Checkpoint(cfg.model)
        config, layout = open_layout(ckpt)
        cfg.offload.check_model(layout.num_experts)
        dtype = resolve_dtype(cfg.offload.dtype, config)
        offload = dataclasses.replace(cfg.offload, store=cfg.store)
        backend = open_local_experts(ckpt, layout, offload, device, dtype, progress=True)
        return cls(cfg, layout, backend, expert_fingerprint(ckpt, layout, backend.format), dtype, device,
                   origin=ckpt.path.name)

    @classmethod
    def from_push(cls, cfg: ShardConfig, fingerprint: str, description: dict,
                  disk: DiskBudget | None = None) -> ExpertShard:
        """A shard for the model a coordinator describes; its experts are those received (now or before). The
        description's sizes are checked against sane bounds and this worker's memory before anything is allocated:
        the model is built on the meta device (no weights, no buffers), the slots only once they fit."""
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig

        try:
            config_dict, format_desc = dict(description["config"]), dict(description["format"])
            nbytes = int(description["expert_bytes"])
            config = AutoConfig.for_model(**config_dict)
        except (KeyError, TypeError, ValueError, StrictDataclassError) as exc:
            raise ValueError(f"the model description is not one this worker can read ({quote(str(exc), 200)}): "
                             "expected a transformers model's config.json, the expert format and its size") from exc
        text = config.get_text_config()
        for name, limit in (("num_hidden_layers", _MAX_LAYERS), ("hidden_size", _MAX_HIDDEN)):
            value = getattr(text, name, None)
            if not isinstance(value, int) or not 1 <= value <= limit:
                raise ValueError(f"the model description has {name} {quote(value)}: expected a whole number in "
                                 f"1..{limit}")
        if nbytes < 1:
            raise ValueError(f"expert_bytes {nbytes}: expected the size in bytes of one packed expert")
        capacity = cfg.memory_bytes or free_memory(resolve_device(cfg.offload.device))
        if nbytes > capacity:
            raise OverCapacity(f"one expert of this model is {nbytes / 2**20:.2f} MiB, more than this worker's budget "
                               f"of {capacity / 2**20:.2f} MiB (raise its --memory)")
        try:
            with torch.device("meta"):  # nothing is allocated, whatever sizes the description holds
                layout = FamilyLayout(build_meta_model(config), None)
        except (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"transformers cannot build a model from this description ({quote(str(exc), 200)}): "
                             "expected the config.json the coordinator's checkpoint has") from exc
        if not 1 <= layout.num_experts <= _MAX_EXPERTS:
            raise ValueError(f"the model description has {layout.num_experts} experts per layer: expected 1.."
                             f"{_MAX_EXPERTS}")
        cfg.offload.check_model(layout.num_experts)
        device = resolve_device(cfg.offload.device)
        dtype = resolve_dtype(str(format_desc.get("dtype")), None) if format_desc.get("dtype") in (
            "float32", "bfloat16", "float16") else None
        if dtype is None:
            raise ValueError(f"expert format {quote(format_desc)} has no dtype this worker computes in")
        quant = QuantConfig(expert_bits=int(format_desc.get("bits", 16)), expert_group=format_desc.get("group_size"),
                            kernel=cfg.offload.quant.kernel) if format_desc.get("format") == "hqq" else QuantConfig()
        fmt = expert_format(layout.tensors, quant, dtype, quant_device=None, device=device)
        if fmt.describe() != format_desc or fmt.layout.nbytes != nbytes:
            raise FingerprintMismatch(f"this worker packs the coordinator's experts as {fmt.describe()} "
                                      f"({fmt.layout.nbytes} bytes), the coordinator sends {quote(format_desc, 200)} "
                                      f"({nbytes} bytes): run the same moeshard version on both")
        # The slots are allocated now: as many per layer as asked, as long as at least one per layer fits.
        layers, slot_bytes = len(layout.sparse_layers), fmt.compute_layout.nbytes
        fits = capacity // max(layers * slot_bytes, 1)
        if fits < 1:
            raise OverCapacity(f"this model needs {layers * slot_bytes / 2**20:.2f} MiB of memory for 1 device slots "
                               f"in each of {layers} layers ({slot_bytes / 2**20:.2f} MiB each), more than this "
                               f"worker's budget of {capacity / 2**20:.2f} MiB (raise its --memory)")
        slots = min(cfg.offload.slots_per_layer, fits, layout.num_experts)
        received = ReceivedExperts.open(cfg.received_root, fingerprint, description, nbytes,
                                        disk if disk is not None else DiskBudget(cfg.received_root, cfg.disk_bytes))
        try:
            backend = LocalExperts(received, fmt, layout.math, device, layout.sparse_layers, layout.num_experts,
                                   slots, cfg.store, cfg.offload.policy)
        except BaseException:
            received.close()
            raise
        name = f"{config_dict.get('model_type', 'model')} (received)"
        return cls(cfg, layout, backend, fingerprint, dtype, device, origin=name, received=received)

    def _free_memory(self) -> int:
        return free_memory(self.device)

    @property
    def expert_format(self) -> str:
        return self.backend.format.label

    @property
    def own_checkpoint(self) -> bool:
        return self.received is None

    def info(self, version: str) -> WorkerInfo:
        return WorkerInfo(fingerprint=self.fingerprint, hosted=self.hosted, device=str(self.device),
                          capacity_bytes=self.capacity_bytes, expert_bytes=self.expert_bytes, version=version,
                          num_layers=len(self.moe_layers), num_experts=self.layout.num_experts,
                          hidden_size=self.layout.hidden_size, slots_per_layer=self.backend.slots_per_layer,
                          expert_format=self.expert_format, max_tokens=self.cfg.max_tokens,
                          own_checkpoint=self.own_checkpoint, disk_bytes=self.cfg.disk_bytes or 0,
                          max_slots_per_layer=self.cfg.max_slots_per_layer or 0)

    # -- validation ----------------------------------------------------------------------------
    def check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            # A worker with its own copy must be started on the coordinator's model; one that received its experts
            # serves whichever model reached it first, until it is restarted or allowed to switch.
            fix = ("start both on the same checkpoint with the same dtype and quantization" if self.own_checkpoint
                   else "restart this worker (it keeps what it received for each model), or start it with "
                        "--allow-model-switch so that a coordinator of another model may take it over")
            raise FingerprintMismatch(
                f"fingerprint mismatch: this worker serves {self.fingerprint} ({self.origin}, "
                f"{self.expert_format}) but the coordinator sent {quote(fingerprint) if fingerprint else '(none)'}: "
                f"{fix}"
            )

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def max_assign(self) -> int:
        """Most experts one Assign may name: every expert of every MoE layer."""
        return len(self.moe_layers) * self.layout.num_experts

    def check_key(self, layer: int, expert: int) -> ExpertKey:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} out of range: expected an MoE layer in 0..{max(self.moe_layers)}")
        if not 0 <= expert < self.layout.num_experts:
            raise ValueError(f"expert {expert} out of range: expected 0..{self.layout.num_experts - 1}")
        return ExpertKey(layer, expert)

    # -- operations ----------------------------------------------------------------------------
    def _memory_needed(self, count: int, slots_per_layer: int) -> tuple[int, int]:
        """(bytes of `count` hosted experts in RAM, bytes of the device slots) at `slots_per_layer`."""
        held = count * self.expert_bytes if self.cfg.store == "ram" else 0
        return held, len(self.moe_layers) * slots_per_layer * self.backend.slot_bytes

    def _check_memory(self, count: int, what: str, slots_per_layer: int | None = None) -> None:
        k = slots_per_layer or self.backend.slots_per_layer
        held, slots = self._memory_needed(count, k)
        if held + slots > self.capacity_bytes:
            mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
            raise OverCapacity(f"{what} {count} experts needs {mib(held + slots)} of memory ({mib(held)} of experts in "
                               f"RAM + {mib(slots)} for {k} device slots in each of "
                               f"{len(self.moe_layers)} layers), more than this worker's budget of "
                               f"{mib(self.capacity_bytes)} (raise its --memory, lower its --slots-per-layer, or give "
                               "it fewer experts)")

    def slots_for(self, keys) -> int:
        """The slots per layer to compute hosted `keys` with: the memory left once their RAM copies are counted buys
        slots, bytes not a count, as the coordinator's --expert-memory does (whatever the coordinator planned room
        for: a worker with more memory computes with more, one with less with fewer); never more than it hosts in a
        layer, nor its --slots-per-layer, and at least 1."""
        most = max(Counter(key.layer for key in keys).values(), default=1)
        k = min(self.cfg.max_slots_per_layer or most, most)
        held, per_slot = self._memory_needed(len(keys), 1)
        room = (self.capacity_bytes - held) // max(per_slot, 1)
        return max(1, min(k, room))

    def join(self, keys: list[ExpertKey], slots_per_layer: int = 0, policy: str = "") -> tuple[list[ExpertKey], int,
                                                                                                  int]:
        """A coordinator's share for this worker, and the slots per layer it asks for (0: keep this worker's):
        checked against memory (and disk, for what must still be received) before anything moves. Returns
        (experts to receive, bytes already held, slots per layer computed with from now on)."""
        keys = frozenset(self.check_key(*k) for k in keys)
        k = self.slots_for(keys) if slots_per_layer > 0 else self.backend.slots_per_layer
        self._check_memory(len(keys), "hosting", k)
        missing = self.received.missing(keys) if self.received is not None else []
        if missing:  # other models' folders are removed if that makes room; each write reserves its own again
            self.received.disk.room(len(missing) * self.received.file_bytes, self.fingerprint, f"{len(missing)} experts")
        self.share = keys
        policy = policy or self.backend.policy
        if (k, policy) != (self.backend.slots_per_layer, self.backend.policy):
            logger.info("computing with %d slots per layer, what its --memory buys (the coordinator planned for %d), "
                        "evicting by %s as the coordinator does", k, slots_per_layer, policy)
            with self._lock:
                self.backend.set_slots(k, policy)
        return missing, (len(keys) - len(missing)) * self.expert_bytes, k

    def incoming(self) -> Incoming:
        """The state of one push stream (see `ReceivedExperts`)."""
        if self.received is None:
            raise FingerprintMismatch("this worker serves its own checkpoint (--model): it receives no experts")
        return self.received.incoming()

    def receive(self, push: Incoming, key: ExpertKey, offset: int, data: bytes, sha256: str) -> bool:
        """One chunk of a pushed expert (of the announced share); True when the expert is complete and verified."""
        key = self.check_key(*key)
        if key not in self.share:
            raise ValueError(f"expert {tuple(key)} is not in the share this worker joined with")
        return push.write(key, offset, data, sha256)

    def assign(self, keys: list[ExpertKey], progress: bool = False) -> frozenset[ExpertKey]:
        """Host exactly `keys` from now on; with the RAM store, read them now (idempotent)."""
        keys = frozenset(self.check_key(*k) for k in keys)
        self._check_memory(len(keys), "assigning")
        if self.received is not None:
            absent = sorted(keys - self.received.held())
            if absent:
                raise UnknownExpert(f"{len(absent)} assigned experts have not been received, e.g. {tuple(absent[0])}: "
                                    "push them first")
        with self._lock:
            if keys == self.hosted:
                return self.hosted
            self.backend.store.retain(keys)
            if self.cfg.store == "ram":
                for key in tqdm(sorted(keys), desc="loading assigned experts", disable=not progress, unit="expert"):
                    self.backend.store.host_buffer(key)  # NotHeld if damaged: dropped, and missing at the next Join
            self.hosted = keys
        logger.info("hosting %d experts (%.1f MiB)", len(keys), len(keys) * self.expert_bytes / 2**20)
        return self.hosted

    def run(self, layer: int, experts: list[int], counts: list[int], hidden: torch.Tensor,
            hint: tuple[int, list[int]] | None = None) -> tuple[torch.Tensor, int, int]:
        """Compute `experts` on their rows of `hidden` [sum(counts), D]; returns (outputs, hits, misses)."""
        if not experts:
            raise ValueError("experts is empty: expected at least one expert per request")
        if len(experts) > self.layout.num_experts:
            raise ValueError(f"{len(experts)} experts in one request: expected at most {self.layout.num_experts}")
        if len(experts) != len(counts):
            raise ValueError(f"{len(experts)} experts but {len(counts)} counts: expected one count per expert")
        if len(set(experts)) != len(experts):
            raise ValueError(f"experts has {len(experts) - len(set(experts))} duplicate ids: expected distinct ids")
        if any(c < 1 for c in counts):
            raise ValueError(f"counts must all be >= 1, got {min(counts)}")
        rows = sum(counts)
        if rows > self.cfg.max_tokens:
            raise ValueError(f"{rows} rows exceed this worker's limit of {self.cfg.max_tokens} per request")
        if hidden.dim() != 2 or hidden.shape[0] != rows or hidden.shape[1] != self.layout.hidden_size:
            raise ValueError(f"hidden has shape {list(hidden.shape)}, expected [{rows}, {self.layout.hidden_size}] "
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
            stats = self.backend.slots[layer].counters
            hits, misses = stats.hits, stats.misses
            if hint is not None:
                hint = (hint[0], self._hosted_only(*hint))
            try:
                outputs = self.backend.submit(layer, groups, hint).result()
            except NotHeld as exc:
                self._forget(exc.key, layer)
                raise
            hits, misses = stats.hits - hits, stats.misses - misses
            self.counters["requests"] += 1
            self.counters["tokens"] += rows
        check_finite(layer, outputs, self.dtype)  # an error naming the expert, never NaN sent back
        return torch.cat([outputs[e] for e in experts]).cpu(), hits, misses

    def _forget(self, key: ExpertKey, layer: int) -> None:
        """`key` turned out damaged (or gone) when it was read: it is no longer hosted, so that requests for it get
        NOT_FOUND until it is received again, and the slots of its layer (and of `layer`) start empty, since the
        slot its load failed in would fail every load after it."""
        logger.warning("expert %s is no longer hosted: it failed its check when read (it is received again at the "
                       "coordinator's next Join)", tuple(key))
        self.hosted = self.hosted - {key}
        backend = self.backend
        for l in {key.layer, layer}:  # noqa: E741
            backend.reset_layer(l)

    @property
    def max_request_bytes(self) -> int:
        """The largest RunExperts message this model can need: `max_tokens` rows of hidden states in the widest dtype
        on the wire, with the ids of every expert of a layer (experts, counts and a hint) and the envelope."""
        return self.cfg.max_tokens * self.layout.hidden_size * _WIRE_ITEMSIZE + 3 * 11 * self.layout.num_experts + 1024

    def _check_activation_memory(self, rows: int) -> None:
        # The largest expert's intermediates for all rows, in fp32, with room for the output: refuse what
        # cannot fit rather than be killed by the OOM killer (or a CUDA OOM) halfway through. Small requests
        # (every decode step) skip the memory query, which would otherwise cost a system call per request.
        need = rows * (self._activation_width + 2 * self.layout.hidden_size) * 4
        if need < _SMALL_REQUEST_BYTES:
            return
        free = free_memory(self.device) / _MEMORY_HEADROOM
        if need > free:
            raise OverCapacity(f"{rows} rows need about {need / 2**20:.0f} MiB of activations, but only "
                               f"{free / 2**20:.0f} MiB are free on {self.device}: send fewer tokens per request")

    def _hosted_only(self, layer: int, experts: list[int]) -> list[int]:
        if layer not in self.moe_layers:
            return []
        return [e for e in experts if ExpertKey(layer, e) in self.hosted]

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """A hint: unknown layers and unhosted experts are ignored, never an error. Returns the loads started."""
        experts = self._hosted_only(layer, experts)
        if not experts:
            return 0
        with self._lock:
            counters = self.backend.slots[layer].counters
            before = counters.prefetch_issued
            self.backend.prefetch(layer, experts)
            return counters.prefetch_issued - before

    @property
    def _activation_width(self) -> int:
        """Intermediate values per row: the up projection's output (2I with a gate) and the gated half."""
        up = next(t for t in self.layout.tensors if t.name == self.layout.math.up)
        out_features = up.shape[1] if up.transposed else up.shape[0]
        return out_features * 3 // 2 if self.layout.math.has_gate else out_features

    def stats(self) -> WorkerStats:
        total = ExpertCounters.total(self.backend.counters().values())
        return WorkerStats(requests=self.counters["requests"], tokens=self.counters["tokens"], hits=total.hits,
                           misses=total.misses, prefetch_issued=total.prefetch_issued,
                           prefetch_used=total.prefetch_used, bytes_loaded=total.bytes_loaded,
                           busy_s=total.compute_s + total.wait_s)

    def close(self) -> None:
        self.backend.close()

