"""The quantized cache on disk: experts are quantized once per (checkpoint, settings), then read by offset.

`QuantizedCache.open` reuses a valid cache folder, or (re)builds the layer files that are missing or damaged,
a batch of experts at a time. A layer is one packed-experts file (`packed_files`: safetensors, one tensor
per packed expert with its SHA-256 in the metadata, committed by rename, no pickle) whose metadata also holds
the fingerprint and the settings it was built for; a file that is there is complete. `QuantizedCacheSource`
reads one expert's bytes with `os.preadv` straight into a host buffer. This module neither chooses the format
nor knows the model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, CheckpointError, open_for_expert_reads, pread_into
from .experts import ExpertKey
from .packed_files import PackedFile, PackedWriter
from .settings import CACHE_ENV, cache_root_from_env
from .stores import CheckpointSource, ExpertSource

logger = logging.getLogger(__name__)

_BATCH_BYTES = 512 << 20  # float32 weights quantized together (a batch of experts; at least one)


def default_cache_root() -> Path:
    """Where quantized caches live: $MOESHARD_CACHE_DIR, else ~/.cache/moeshard."""
    return cache_root_from_env()


def _layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


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
        self._offsets: dict[int, list[int]] = {}  # layer -> absolute file offset of each expert

    @classmethod
    def open(cls, folder: Path, source: ExpertSource, fmt, layers: list[int], num_experts: int, fingerprint: str,
             *, progress: bool = False, verify: bool = True) -> QuantizedCache:
        """Reuse the cache in `folder`, rebuilding what is missing or damaged (never using it).

        `verify` re-hashes every expert against its file's header (catches flipped bytes; costs one read of the
        cache); without it, headers, settings and sizes are still checked.
        """
        cache = cls(folder, source, fmt, layers, num_experts, fingerprint)
        stale = []
        for layer in cache.layers:
            if not cache.layer_path(layer).is_file():
                stale.append(layer)
                continue
            try:
                cache._check_layer(layer, verify)
            except (OSError, CheckpointError) as exc:
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

    def _metadata(self, layer: int) -> dict[str, str]:
        """What a layer file must say it holds: this cache's fingerprint and settings, and its layer."""
        settings = {"format": self.format.describe(), "layout": self.format.layout.describe(),
                    "num_experts": self.num_experts}
        return {"fingerprint": self.fingerprint, "layer": str(layer),
                "settings": json.dumps(settings, sort_keys=True, separators=(",", ":"))}

    def _check_layer(self, layer: int, verify: bool) -> None:
        path = self.layer_path(layer)
        packed = PackedFile(path, self.nbytes, expect=self._metadata(layer))
        keys = [ExpertKey(layer, e) for e in range(self.num_experts)]
        if set(packed.keys) != set(keys):
            raise CheckpointError(f"{path.name} holds {len(packed.offsets)} experts, not layer {layer}'s "
                                  f"{self.num_experts}")
        if verify:
            bad = packed.verify()
            if bad:
                raise CheckpointError(f"{path.name}: {len(bad)} experts differ from their SHA-256 (first "
                                      f"{tuple(bad[0])})")
        self._offsets[layer] = [packed.offsets[k] for k in keys]

    # -- building ----------------------------------------------------------------------------
    def build(self, layers: list[int], progress: bool = False) -> None:
        """Quantize every expert of `layers` from the source into fresh files (temp file, then rename), one layer
        at a time, so an interrupted build (Ctrl-C, a crash) resumes where it stopped; a folder left with nothing
        in it is removed."""
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._build(layers, progress)
        except BaseException:
            done = [layer for layer in layers if layer in self._offsets]
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
                self._check_layer(layer, verify=False)  # offsets from the file just written, as any open reads them
        self.built_layers += layers
        self.build_s += time.perf_counter() - start
        logger.info("quantized %d experts (%d layers) into %s in %.1fs", len(layers) * self.num_experts,
                    len(layers), self.folder, time.perf_counter() - start)

    def _build_layer(self, layer: int, bar: tqdm) -> None:
        keys = [ExpertKey(layer, e) for e in range(self.num_experts)]
        # Experts are quantized a batch at a time (one optimiser call over all their groups, on every core).
        batch = max(1, min(self.num_experts, _BATCH_BYTES // max(1, self.source.dense_bytes)))
        bufs = torch.zeros(batch, self.nbytes, dtype=torch.uint8)  # formats never write the alignment padding
        with PackedWriter(self.layer_path(layer), keys, self.nbytes, self._metadata(layer)) as out:
            for first in range(0, self.num_experts, batch):
                chunk = keys[first: first + batch]
                self.source.read_many_into(chunk, list(bufs[: len(chunk)]))
                for key, buf in zip(chunk, bufs):
                    out.add(key, buf.numpy())
                QuantizedCache.experts_quantized += len(chunk)
                bar.update(len(chunk))
            out.commit()


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
