"""Lazy reader for Hugging Face checkpoint folders (config.json + one or many *.safetensors).

Tensors are read one at a time, by name, when asked for; nothing is read at open time but the
safetensors headers. It knows nothing about MoE: the family layouts decide what a name means.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import logging
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_SAMPLE_ELEMENTS = 1 << 18  # fingerprint sample tensors up to this size are hashed whole, larger ones by row 0
# Keys that change with the writer, not the model: they must not change the fingerprint.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "output_router_logits", "use_cache")


class CheckpointError(ValueError):
    """The folder is not a usable checkpoint; the message says what was expected."""


_MAX_HEADER = 1 << 27  # a larger safetensors header length means a corrupt file, not a real one
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def open_for_expert_reads(path: Path) -> int:
    """A read-only descriptor with the kernel's readahead off: experts are read one by one at scattered offsets,
    and readahead past each one read the next expert's bytes for nothing (measured on the benchmark model's disk
    tier: 367 MB read from disk per token for 193 MB of experts; 193 MB with readahead off)."""
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(absolute offset of the data section, header dict) of a safetensors file, checked for sanity."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path.name}: header length {length} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path.name}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    return 8 + length, header


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill `buf` from `fd` at `offset` (positionless, so threads may share the fd)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"unexpected end of file after {offset + done} bytes (truncated file?)")
        done += n


class _Entry:
    __slots__ = ("file", "dtype", "shape", "start", "end")

    def __init__(self, file: Path, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


class Checkpoint:
    """A checkpoint folder opened lazily. `get(name)` reads one tensor with pread (no mmap, so what was read
    is not kept resident behind our back); `bytes_read` counts what was read."""

    def __init__(self, path: str | Path, drop_page_cache: bool = False):
        self.path = Path(path).expanduser()
        self.drop_page_cache = drop_page_cache  # forget what was read (posix_fadvise), for cold-read measurements
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
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        for file in self._shard_files():
            data_start, header = read_safetensors_header(file)
            size = file.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                try:
                    begin, end = info["data_offsets"]
                    entry = _Entry(file, info["dtype"], tuple(int(d) for d in info["shape"]), data_start + begin,
                                   data_start + end)
                except (KeyError, TypeError, ValueError) as exc:
                    raise CheckpointError(f"{file.name}: bad header entry for {name!r}") from exc
                if entry.dtype not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has unsupported dtype {entry.dtype!r}")
                nbytes = math.prod(entry.shape) * SAFETENSORS_DTYPES[entry.dtype].itemsize
                if entry.end - entry.start != nbytes or entry.end > size:
                    raise CheckpointError(f"{file.name}: tensor {name!r} does not fit the file (truncated?)")
                self._entries[name] = entry
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

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = open_for_expert_reads(file)
            return fd

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._require(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._require(name).dtype]

    def _require(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint {str(self.path)!r} is missing tensor {name!r}")
        return entry

    def _span(self, name: str, index: int | None) -> tuple[_Entry, int, int]:
        """(entry, file offset, bytes) of `tensor` or of its row `tensor[index]`."""
        e = self._require(name)
        if index is None:
            return e, e.start, e.end - e.start
        if not 0 <= index < e.shape[0]:
            raise IndexError(f"{name}[{index}] out of range for shape {list(e.shape)}")
        row = (e.end - e.start) // e.shape[0]
        return e, e.start + index * row, row

    def _pread(self, entry: _Entry, start: int, out: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Fill the contiguous CPU tensor `out` from the file at `start` (the one place bytes are read)."""
        nbytes = out.numel() * out.element_size()
        if nbytes:
            fd = self._fd(entry.file)
            pread_into(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), start)
            if self.drop_page_cache:
                os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
        if count:
            with self._lock:
                self.bytes_read += nbytes
        return out

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (CPU)."""
        e, start, nbytes = self._span(name, None)
        return self._pread(e, start, torch.empty(nbytes, dtype=torch.uint8)).view(SAFETENSORS_DTYPES[e.dtype]).view(e.shape)

    def get_rows(self, name: str, index: int) -> torch.Tensor:
        """Read `tensor[index]` only, for fused per-expert tensors stored as one [E, ...] array."""
        e, start, nbytes = self._span(name, index)
        return self._pread(e, start, torch.empty(nbytes, dtype=torch.uint8)).view(SAFETENSORS_DTYPES[e.dtype]).view(e.shape[1:])

    def read_into(self, name: str, out: torch.Tensor, index: int | None = None) -> bool:
        """Read `tensor` (or `tensor[index]`) straight into the contiguous CPU tensor `out`, with no temporary.
        Returns False, reading nothing, when dtype or size differ (the caller then converts)."""
        e, start, nbytes = self._span(name, index)
        if (SAFETENSORS_DTYPES[e.dtype] != out.dtype or out.device.type != "cpu" or not out.is_contiguous()
                or out.numel() * out.element_size() != nbytes):
            return False
        self._pread(e, start, out)
        return True

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def fingerprint(self, extra: dict | None = None, sample: list[str] = ()) -> str:
        """Hash of the config, every tensor's name, shape and dtype, `extra` (e.g. quantization settings),
        and the bytes of the `sample` tensors (their first row when large), so that two fine-tunes of one
        architecture differ. Sample reads are not counted in `bytes_read`."""
        config = {k: v for k, v in self.config_dict.items() if k not in _VOLATILE_CONFIG_KEYS}
        payload = {
            "config": config,
            "tensors": [[n, list(self._entries[n].shape), self._entries[n].dtype] for n in self.names],
            "extra": extra or {},
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
        for name in sample:
            e = self._require(name)
            nbytes = e.end - e.start
            if math.prod(e.shape) > _SAMPLE_ELEMENTS:
                nbytes //= e.shape[0]  # the first row
            digest.update(self._pread(e, e.start, torch.empty(nbytes, dtype=torch.uint8), count=False).numpy().tobytes())
        return digest.hexdigest()[:32]
