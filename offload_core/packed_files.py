"""Packed experts on disk: one format for every place that keeps them (the quantized cache, a worker's received
experts), and the hashing and atomic writes that go with it.

A packed-experts file is plain safetensors (no pickle): one U8 tensor per packed expert, named "L.E" (layer and
expert), each `nbytes` long with the data section aligned to 64 bytes, and string metadata: `format`
(`FORMAT`), `expert_bytes`, whatever the writer adds (a fingerprint, a layer), and `sha256.L.E`, the SHA-256 of
each expert's bytes. It is written under a temporary name, synced and renamed: a file exists whole or not at
all, and any expert read from it can be checked against its hash.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .checkpoint import CheckpointError, read_safetensors_header
from .experts import ExpertKey

FORMAT = "moeshard-packed-experts/1"
_ALIGN = 64
_HASH_PLACEHOLDER = "0" * 64


class DamagedFile(CheckpointError):
    """A packed-experts file that is not what its header or its reader expects; the message says what differs."""


def tensor_name(key: ExpertKey) -> str:
    return f"{key.layer}.{key.expert}"


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """`data` in `path` whole or not at all (a temp file, synced, then renamed over it)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _header(keys: list[ExpertKey], nbytes: int, metadata: dict[str, str], hashes: dict[ExpertKey, str]) -> bytes:
    meta = {**metadata, "format": FORMAT, "expert_bytes": str(nbytes)}
    meta.update({f"sha256.{tensor_name(k)}": hashes.get(k, _HASH_PLACEHOLDER) for k in keys})
    header: dict = {"__metadata__": meta}
    header.update({tensor_name(k): {"dtype": "U8", "shape": [nbytes], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
                   for i, k in enumerate(keys)})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)  # safetensors allows trailing spaces; aligns the data section
    return len(raw).to_bytes(8, "little") + raw


def file_bytes(keys: list[ExpertKey], nbytes: int, metadata: dict[str, str] | None = None) -> int:
    """The size of the packed-experts file `PackedWriter` makes of `keys` (its header included)."""
    return len(_header(list(keys), nbytes, dict(metadata or {}), {})) + len(keys) * nbytes


class PackedWriter:
    """Writes `keys`' packed experts, in that order, into `path`: each one's bytes by `add` (whole) or `write`
    (chunks in order, each expert completed before the next begins), then `commit` (synced and renamed into place;
    `publish=False` leaves the rename to `publish()`). Closing without committing leaves nothing behind."""

    def __init__(self, path: Path, keys: list[ExpertKey], nbytes: int, metadata: dict[str, str] | None = None):
        self.path, self.keys, self.nbytes = Path(path), list(keys), int(nbytes)
        self.metadata = dict(metadata or {})
        self.hashes: dict[ExpertKey, str] = {}
        self._digest, self._written = hashlib.sha256(), 0  # of the expert being written
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{id(self):x}.tmp")
        self._file = open(self.tmp, "wb")
        header = _header(self.keys, self.nbytes, self.metadata, {})  # hashes filled in at commit: the same length
        self._file.write(header)
        # where each expert's bytes start in the file
        self.offsets = {k: len(header) + i * self.nbytes for i, k in enumerate(self.keys)}

    @property
    def current(self) -> ExpertKey | None:
        """The expert whose bytes come next (None once all are written)."""
        return self.keys[len(self.hashes)] if len(self.hashes) < len(self.keys) else None

    def write(self, key: ExpertKey, chunk) -> str | None:
        """The next bytes of `key` (the current expert); returns its SHA-256 once its `nbytes` are written."""
        if key != self.current:
            raise ValueError(f"expert {tuple(key)} written out of order: expected {self.current}")
        view = memoryview(chunk).cast("B")
        if self._written + len(view) > self.nbytes:
            raise ValueError(f"expert {tuple(key)}: {self._written + len(view)} bytes, more than {self.nbytes}")
        self._file.write(view)
        self._digest.update(view)
        self._written += len(view)
        if self._written < self.nbytes:
            return None
        self.hashes[key] = self._digest.hexdigest()
        self._digest, self._written = hashlib.sha256(), 0
        return self.hashes[key]

    def add(self, key: ExpertKey, data) -> str:
        """One whole expert's bytes (a buffer of `nbytes`); returns its SHA-256."""
        if len(memoryview(data).cast("B")) != self.nbytes or self._written:
            raise ValueError(f"expert {tuple(key)}: expected {self.nbytes} bytes, whole")
        return self.write(key, data)

    def park(self) -> None:
        """Close the file until `commit` (every expert written): a writer waiting to be committed holds no
        descriptor."""
        if len(self.hashes) != len(self.keys):
            raise ValueError(f"{len(self.hashes)} of {len(self.keys)} experts written")
        self._file.close()

    def commit(self, publish: bool = True) -> dict[ExpertKey, str]:
        """Fill in the hashes, sync, and (with `publish`) rename into place; returns each expert's SHA-256."""
        if len(self.hashes) != len(self.keys):
            raise ValueError(f"{len(self.hashes)} of {len(self.keys)} experts written")
        if self._file.closed:
            self._file = open(self.tmp, "r+b")
        self._file.seek(0)
        self._file.write(_header(self.keys, self.nbytes, self.metadata, self.hashes))  # the same length
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if publish:
            self.publish()
        return dict(self.hashes)

    def publish(self) -> None:
        os.replace(self.tmp, self.path)

    def close(self) -> None:
        """Drop what was not committed (and published)."""
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> PackedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PackedFile:
    """One packed-experts file's header, checked: where each expert lives, its hash, the writer's metadata.
    `expect` (metadata the reader requires, such as a fingerprint) and `nbytes` must match."""

    def __init__(self, path: Path, nbytes: int, expect: dict[str, str] | None = None):
        self.path, self.nbytes = Path(path), int(nbytes)
        data_start, header = read_safetensors_header(self.path)
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DamagedFile(f"{self.path.name}: not a packed-experts file ({FORMAT})")
        wanted = {"expert_bytes": str(self.nbytes), **(expect or {})}
        wrong = {k: meta.get(k) for k, v in wanted.items() if meta.get(k) != v}
        if wrong:
            raise DamagedFile(f"{self.path.name}: metadata {wrong} where {{{', '.join(wrong)}}} should be "
                              f"{ {k: wanted[k] for k in wrong} }")
        self.metadata = meta
        self.offsets: dict[ExpertKey, int] = {}
        self.hashes: dict[ExpertKey, str] = {}
        for name, info in header.items():
            key = _key(name)
            if key is None or not isinstance(info, dict) or info.get("dtype") != "U8" \
                    or info.get("shape") != [self.nbytes]:
                raise DamagedFile(f"{self.path.name}: tensor {name!r} is not a packed expert of {self.nbytes} bytes")
            start, end = info.get("data_offsets", [None, None])
            if not isinstance(start, int) or end != start + self.nbytes or start % self.nbytes:
                raise DamagedFile(f"{self.path.name}: tensor {name!r} has offsets {info.get('data_offsets')}")
            digest = meta.get(f"sha256.{name}")
            if not isinstance(digest, str) or len(digest) != 64:
                raise DamagedFile(f"{self.path.name}: no SHA-256 for {name!r}")
            self.offsets[key], self.hashes[key] = data_start + start, digest
        size = self.path.stat().st_size
        if size != data_start + len(self.offsets) * self.nbytes:
            raise DamagedFile(f"{self.path.name}: {size} bytes, its header describes "
                              f"{data_start + len(self.offsets) * self.nbytes}")

    @property
    def keys(self) -> Iterable[ExpertKey]:
        return self.offsets.keys()

    def verify(self) -> list[ExpertKey]:
        """Re-hash every expert (one read of the file); returns those whose bytes differ from their hash."""
        bad = []
        with open(self.path, "rb") as f:
            for key, offset in self.offsets.items():
                f.seek(offset)
                if sha256_hex(f.read(self.nbytes)) != self.hashes[key]:
                    bad.append(key)
        return bad


def _key(name: str) -> ExpertKey | None:
    layer, dot, expert = name.partition(".")
    if not dot or not layer.isdigit() or not expert.isdigit():
        return None
    return ExpertKey(int(layer), int(expert))
