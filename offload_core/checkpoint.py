"""Lazy reader for Hugging Face checkpoint folders (config.json + one or many *.safetensors).

Tensors are read one at a time, by name, when asked for; nothing is read at open time but the
safetensors headers. It knows nothing about MoE: the family adapters decide what a name means.
"""
from __future__ import annotations

import hashlib
import json
import math
import logging
import threading
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_SAMPLE_ELEMENTS = 1 << 18  # fingerprint sample tensors up to this size are hashed whole, larger ones by row 0
# Keys that change with the writer, not the model: they must not change the fingerprint.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "output_router_logits", "use_cache")


class CheckpointError(ValueError):
    """The folder is not a usable checkpoint; the message says what was expected."""


class Checkpoint:
    """A checkpoint folder opened lazily. `get(name)` reads one tensor; `bytes_read` counts what was read."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(
                f"model folder {str(self.path)!r} does not exist: expected a Hugging Face model folder "
                "with config.json and *.safetensors"
            )
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{str(config_file)!r} not found: expected a Hugging Face model folder with config.json and *.safetensors"
            )
        try:
            self.config_dict: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{str(config_file)!r} is not valid JSON: {exc}") from exc
        self._files = self._shard_files()
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self._files)):
            handle = self._handle(file)
            for name in handle.keys():
                sl = handle.get_slice(name)
                self._where[name] = file
                self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
        self.bytes_read = 0

    def _shard_files(self) -> list[Path]:
        index = self.path / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = [self.path / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{_INDEX} names shard files that are missing: {missing}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no *.safetensors file in {str(self.path)!r}: expected model.safetensors or shards with {_INDEX} "
                "(.bin/pickle checkpoints are not read, for safety)"
            )
        return files

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return handle

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._require(name)][0]

    def _require(self, name: str) -> str:
        if name not in self._where:
            raise CheckpointError(f"checkpoint {str(self.path)!r} is missing tensor {name!r}")
        return name

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (CPU)."""
        self._require(name)
        with self._lock:
            tensor = self._handle(self._where[name]).get_tensor(name)
            self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """Read `tensor[index]` only, for fused per-expert tensors stored as one [E, ...] array."""
        self._require(name)
        with self._lock:
            tensor = self._handle(self._where[name]).get_slice(name)[index]
            self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def fingerprint(self, extra: dict | None = None, sample: list[str] = ()) -> str:
        """Hash of the config, every tensor's name, shape and dtype, `extra` (e.g. quantization settings),
        and the bytes of the `sample` tensors (their first row when large), so that two fine-tunes of one
        architecture differ. Sample reads are not counted in `bytes_read`."""
        config = {k: v for k, v in self.config_dict.items() if k not in _VOLATILE_CONFIG_KEYS}
        payload = {
            "config": config,
            "tensors": [[n, list(self._meta[n][0]), self._meta[n][1]] for n in self.names],
            "extra": extra or {},
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
        for name in sample:
            self._require(name)
            with self._lock:
                sl = self._handle(self._where[name]).get_slice(name)
                tensor = sl[:] if math.prod(sl.get_shape()) <= _SAMPLE_ELEMENTS else sl[0]
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]
