"""The quantized cache on disk: experts are quantized once per (checkpoint, settings), then read by offset.

`QuantizedCache.open` reuses a valid cache folder, or (re)builds the layer files that are missing or
corrupt, a batch of experts at a time. Files are plain safetensors (one per MoE layer, tensor `expert.{e}` =
one packed expert) plus `manifest.json`: no pickle. `QuantizedCacheSource` reads one expert's bytes with
`os.preadv` straight into a host buffer. This module neither chooses the format nor knows the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, CheckpointError, open_for_expert_reads, pread_into, read_safetensors_header
from .experts import ExpertKey
from .settings import CACHE_ENV, cache_root_from_env
from .stores import CheckpointSource, ExpertSource

logger = logging.getLogger(__name__)

_MANIFEST = "manifest.json"
_VERSION = 1  # of the folder layout and manifest
_ALIGN = 64  # the data section starts aligned, and every packed expert is a multiple of 64 bytes
_CHUNK = 1 << 24  # bytes hashed per read when verifying
_BATCH_BYTES = 512 << 20  # float32 weights quantized together (a batch of experts; at least one)


class CorruptCacheError(ValueError):
    """A cache file does not match its manifest; the message says what differs."""


def default_cache_root() -> Path:
    """Where quantized caches live: $MOESHARD_CACHE_DIR, else ~/.cache/moeshard."""
    return cache_root_from_env()


def _layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def _safetensors_header(num_experts: int, nbytes: int, metadata: dict[str, str]) -> bytes:
    header = {"__metadata__": metadata}
    header.update({f"expert.{e}": {"dtype": "U8", "shape": [nbytes], "data_offsets": [e * nbytes, (e + 1) * nbytes]}
                   for e in range(num_experts)})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)  # safetensors allows trailing spaces; aligns the data section
    return len(raw).to_bytes(8, "little") + raw


def atomic_write(path: Path, data: bytes) -> None:
    """`data` in `path` whole or not at all (a temp file, synced, then renamed over it)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class QuantizedCache:
    """One folder of packed experts for one (checkpoint, format); `offset(key)` says where each one lives."""

    experts_quantized = 0  # experts encoded by every cache in this process: shows a restart did not re-quantize

    def __init__(self, folder: Path, source: ExpertSource, fmt, layers: list[int], num_experts: int,
                 fingerprint: str):
        self.folder, self.source, self.format = Path(folder), source, fmt
        self.layers, self.num_experts, self.fingerprint = list(layers), num_experts, fingerprint
        self.nbytes: int = fmt.layout.nbytes
        self.built_layers: list[int] = []  # layers quantized by this open (empty when the cache was reused)
        self.build_s = 0.0  # seconds spent quantizing them
        self._entries: dict[int, dict] = {}  # layer -> {"file", "size", "sha256"}
        self._offsets: dict[int, list[int]] = {}  # layer -> absolute file offset of each expert

    @classmethod
    def open(cls, folder: Path, source: ExpertSource, fmt, layers: list[int], num_experts: int, fingerprint: str,
             *, progress: bool = False, verify: bool = True) -> QuantizedCache:
        """Reuse the cache in `folder`, rebuilding what is missing or corrupt (never using it).

        `verify` re-hashes every file against the manifest (catches flipped bytes; costs one read of the
        cache); without it, sizes and headers are still checked.
        """
        cache = cls(folder, source, fmt, layers, num_experts, fingerprint)
        manifest = cache._read_manifest()
        stale = []
        for layer in cache.layers:
            entry = manifest["layers"].get(str(layer)) if manifest else None
            if entry is None:
                stale.append(layer)
                continue
            try:
                cache._check_layer(layer, entry, verify)
            except (OSError, CorruptCacheError, CheckpointError) as exc:
                logger.warning("quantized cache file for layer %d is unusable (%s): rebuilding it", layer, exc)
                stale.append(layer)
        if stale:
            cache.build(stale, progress=progress)
        else:
            logger.info("reusing quantized cache %s (%d layers x %d experts, %.1f MiB)", cache.folder,
                        len(cache.layers), num_experts, len(cache.layers) * num_experts * cache.nbytes / 2**20)
        return cache

    @property
    def reused(self) -> bool:
        return not self.built_layers

    def layer_path(self, layer: int) -> Path:
        return self.folder / _layer_file(layer)

    def offset(self, key: ExpertKey) -> int:
        """Absolute byte offset of `key`'s packed buffer in `layer_path(key.layer)`."""
        offsets = self._offsets.get(key.layer)
        if offsets is None or not 0 <= key.expert < len(offsets):
            raise ValueError(f"expert {tuple(key)} is not in the quantized cache "
                             f"(layers {self.layers}, experts 0..{self.num_experts - 1})")
        return offsets[key.expert]

    # -- manifest ----------------------------------------------------------------------------
    def _expected(self) -> dict:
        return {
            "version": _VERSION, "fingerprint": self.fingerprint, "format": self.format.describe(),
            "expert_nbytes": self.nbytes, "num_experts": self.num_experts,
            "layout": self.format.layout.describe(),
        }

    def _read_manifest(self) -> dict | None:
        path = self.folder / _MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            logger.warning("quantized cache manifest %s is unreadable (%s): rebuilding the cache", path, exc)
            return None
        # The folder name is the fingerprint, so a mismatch here means a damaged or foreign manifest.
        expected = self._expected()
        if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict) or any(
                manifest.get(k) != v for k, v in expected.items()):
            logger.warning("quantized cache manifest %s does not match these settings: rebuilding the cache", path)
            return None
        return manifest

    def _write_manifest(self) -> None:
        manifest = self._expected()
        manifest["layers"] = {str(layer): self._entries[layer] for layer in self.layers if layer in self._entries}
        atomic_write(self.folder / _MANIFEST, json.dumps(manifest, indent=1).encode())

    # -- checking ----------------------------------------------------------------------------
    def _check_layer(self, layer: int, entry: dict, verify: bool) -> None:
        path = self.layer_path(layer)
        if not isinstance(entry, dict) or entry.get("file") != path.name:
            raise CorruptCacheError(f"manifest entry {entry!r} does not name {path.name}")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CorruptCacheError(f"{path.name} has {size} bytes, the manifest says {entry.get('size')}")
        data_start, header = read_safetensors_header(path)
        offsets = []
        for e in range(self.num_experts):
            info = header.get(f"expert.{e}")
            expected = {"dtype": "U8", "shape": [self.nbytes], "data_offsets": [e * self.nbytes, (e + 1) * self.nbytes]}
            if info != expected:
                raise CorruptCacheError(f"{path.name}: header entry expert.{e} is {info!r}, expected {expected!r}")
            offsets.append(data_start + e * self.nbytes)
        if data_start + self.num_experts * self.nbytes != size:
            raise CorruptCacheError(f"{path.name}: {size} bytes, but its header describes "
                                    f"{data_start + self.num_experts * self.nbytes}")
        if verify:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != entry.get("sha256"):
                raise CorruptCacheError(f"{path.name}: sha256 differs from the manifest")
        self._entries[layer], self._offsets[layer] = entry, offsets

    # -- building ----------------------------------------------------------------------------
    def build(self, layers: list[int], progress: bool = False) -> None:
        """Quantize every expert of `layers` from the source into fresh files (temp file, then rename). The
        manifest is rewritten after each layer, so an interrupted build (Ctrl-C, a crash) resumes where it
        stopped; a folder left with nothing in it is removed."""
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._build(layers, progress)
        except BaseException:
            done = [layer for layer in layers if layer in self._entries]
            if created and not any(self.folder.iterdir()):
                self.folder.rmdir()
            elif done:
                logger.warning("quantizing stopped after %d of %d layers; they are kept in %s and the next start "
                               "resumes from there", len(done), len(layers), self.folder)
            raise

    def _build(self, layers: list[int], progress: bool) -> None:
        needed = len(layers) * self.num_experts * self.nbytes
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            raise OSError(f"quantized cache needs {needed / 2**30:.2f} GiB in {self.folder}, only "
                          f"{free / 2**30:.2f} GiB free: set {CACHE_ENV} to a larger disk")
        start = time.perf_counter()
        with tqdm(total=len(layers) * self.num_experts, desc="quantizing experts", unit="expert",
                  disable=not progress) as bar:
            for layer in layers:
                self._build_layer(layer, bar)
                # Offsets come from the file just written, read back like any other open would.
                self._check_layer(layer, self._entries[layer], verify=False)
                self._write_manifest()
        self.built_layers += layers
        self.build_s += time.perf_counter() - start
        logger.info("quantized %d experts (%d layers) into %s in %.1fs", len(layers) * self.num_experts,
                    len(layers), self.folder, time.perf_counter() - start)

    def _build_layer(self, layer: int, bar: tqdm) -> None:
        path = self.layer_path(layer)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        metadata = {"format": "moeshard-quantized-experts", "fingerprint": self.fingerprint, "layer": str(layer)}
        header = _safetensors_header(self.num_experts, self.nbytes, metadata)
        digest = hashlib.sha256(header)
        # Experts are quantized a batch at a time (one optimiser call over all their groups, on every core).
        batch = max(1, min(self.num_experts, _BATCH_BYTES // max(1, self.source.dense_bytes)))
        bufs = torch.zeros(batch, self.nbytes, dtype=torch.uint8)  # formats never write the alignment padding
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                for first in range(0, self.num_experts, batch):
                    keys = [ExpertKey(layer, e) for e in range(first, min(first + batch, self.num_experts))]
                    self.source.read_many_into(keys, list(bufs[: len(keys)]))
                    for i in range(len(keys)):
                        data = memoryview(bufs[i].numpy())
                        f.write(data)
                        digest.update(data)
                    QuantizedCache.experts_quantized += len(keys)
                    bar.update(len(keys))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._entries[layer] = {"file": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def open_quantized_cache(ckpt: Checkpoint, layout, fmt, fingerprint: str, *, root: str | Path | None = None,
                         progress: bool = False, verify: bool = True) -> QuantizedCache:
    """The cache of `ckpt`'s experts in `fmt`, in `root / fingerprint`, built if needed.

    `fingerprint` must cover the checkpoint's content and `fmt.describe()` (`expert_fingerprint` does);
    `root` defaults to `default_cache_root()`.
    """
    folder = (Path(root).expanduser() if root is not None else default_cache_root()) / fingerprint
    return QuantizedCache.open(folder, CheckpointSource(ckpt, layout, fmt), fmt, layout.sparse_layers,
                               layout.num_experts, fingerprint, progress=progress, verify=verify)


class QuantizedCacheSource:
    """Reads packed experts from a `QuantizedCache` with positional reads: the disk tier's source.

    `drop_page_cache` tells the kernel to forget each expert after reading it, so that a machine with
    less RAM than the model keeps its memory for the slots instead of the page cache.
    """

    def __init__(self, cache: QuantizedCache, drop_page_cache: bool = False):
        if drop_page_cache and not hasattr(os, "posix_fadvise"):
            raise ValueError("drop_page_cache needs os.posix_fadvise, which this platform lacks")
        self.cache, self.drop_page_cache = cache, drop_page_cache
        self.nbytes: int = cache.nbytes
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds = {layer: open_for_expert_reads(cache.layer_path(layer)) for layer in cache.layers}

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        if out.dtype != torch.uint8 or out.numel() != self.nbytes:
            raise ValueError(f"out must be a uint8 tensor of {self.nbytes} bytes, got {out.dtype} x {out.numel()}")
        offset = self.cache.offset(key)
        fd = self._fds[key.layer]
        direct = out.device.type == "cpu" and out.is_contiguous()
        target = out if direct else torch.empty(self.nbytes, dtype=torch.uint8)
        pread_into(fd, memoryview(target.numpy()), offset)
        if self.drop_page_cache:
            os.posix_fadvise(fd, offset, self.nbytes, os.POSIX_FADV_DONTNEED)
        if not direct:
            out.copy_(target)
        with self._lock:
            self.bytes_read += self.nbytes

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
