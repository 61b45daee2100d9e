"""Experts a coordinator pushed to this worker, kept on its disk so that a restart receives nothing again.

`cache_dir/<fingerprint>/` holds `model.msgpack` (what the coordinator said the model is: its config.json, the
expert format, the packed size of one expert), one file per expert (`L-E.bin`: written under a temporary
name as chunks arrive; once its SHA-256 matched the sender's it waits to be committed: fsynced, renamed and
logged with the others of its group, up to 64 MiB at a time and at the end of every push, so that the disk
writes one group while the next arrives instead of stalling on every expert), and `held.msgpack`, an
append-only log of verified experts (`{"layer", "expert", "sha256"}` records; a crash mid-append leaves a cut
last record, which is ignored). Opening re-hashes what the log lists: a truncated or corrupted file is
dropped, never used, and the coordinator is told to send it again. It is also the `ExpertSource` the worker's
store reads from. Nothing here knows gRPC.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import msgpack
import torch

from ..offload_core.checkpoint import pread_into
from ..offload_core.experts import ExpertKey
from ..offload_core.quantized_cache import atomic_write

logger = logging.getLogger(__name__)

MODEL_FILE = "model.msgpack"
LOG_FILE = "held.msgpack"
_VERSION = 1
_CHUNK = 1 << 22  # bytes hashed per read when verifying
_GROUP_BYTES = 64 << 20  # verified experts committed together (one wait on the disk per group, not per expert)
_GROUP_EXPERTS = 64  # ... and at most this many (each holds its file open until then)


class ReceiveError(ValueError):
    """A pushed expert that does not fit what was announced (offset, size, hash); the message says which."""


def dir_bytes(root: Path) -> int:
    """Bytes of every file under `root` (every model's received experts)."""
    root = Path(root)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


class _Incoming:
    """One expert being received: its temporary file, the bytes so far, their running hash."""

    __slots__ = ("fd", "path", "received", "digest")

    def __init__(self, fd: int, path: Path):
        self.fd, self.path, self.received, self.digest = fd, path, 0, hashlib.sha256()


class ReceivedExperts:
    def __init__(self, folder: Path, description: dict, nbytes: int):
        self.folder, self.description, self.nbytes = Path(folder), description, int(nbytes)
        self._held: dict[ExpertKey, str] = {}  # verified experts -> sha256
        self._incoming: dict[ExpertKey, _Incoming] = {}
        self._verified: list[tuple[ExpertKey, str, _Incoming]] = []  # complete and verified, not yet committed
        self._fds: dict[ExpertKey, int] = {}
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self.bytes_read = 0

    @classmethod
    def open(cls, root: Path, fingerprint: str, description: dict, nbytes: int) -> ReceivedExperts:
        """The folder of `fingerprint` under `root`: created, or reopened with every listed expert re-verified."""
        folder = Path(root).expanduser() / fingerprint
        folder.mkdir(parents=True, exist_ok=True)
        model = folder / MODEL_FILE
        record = {"version": _VERSION, "fingerprint": fingerprint, "model": description, "expert_bytes": nbytes}
        if model.is_file():
            try:
                stored = msgpack.unpackb(model.read_bytes(), raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException) as exc:
                stored = {"error": str(exc)}
            if stored != record:
                logger.warning("received experts in %s were for another description of the model: starting over", folder)
                shutil.rmtree(folder)
                folder.mkdir(parents=True)
        if not model.is_file():
            atomic_write(model, msgpack.packb(record, use_bin_type=True))
        for stale in folder.glob("*.part"):  # experts a killed worker was receiving: received again from the start
            stale.unlink(missing_ok=True)
        cache = cls(folder, description, nbytes)
        cache._load_log()
        return cache

    # -- what is held ---------------------------------------------------------------------------
    def _expert_path(self, key: ExpertKey) -> Path:
        return self.folder / f"{key.layer}-{key.expert}.bin"

    def _load_log(self) -> None:
        path = self.folder / LOG_FILE
        if not path.is_file():
            return
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(path.read_bytes())
        listed: dict[ExpertKey, str] = {}
        try:
            for rec in unpacker:  # a cut last record (a crash mid-append) simply ends the iteration
                if isinstance(rec, dict) and {"layer", "expert", "sha256"} <= rec.keys():
                    listed[ExpertKey(int(rec["layer"]), int(rec["expert"]))] = str(rec["sha256"])
        except (ValueError, msgpack.UnpackException) as exc:
            logger.warning("%s: unreadable record (%s); the experts after it will be received again", path, exc)
        for key, sha in listed.items():
            if self._verify(key, sha):
                self._held[key] = sha
        # Rewrite the log with exactly what was verified, so that dropped experts stay dropped.
        atomic_write(path, b"".join(_record(k, s) for k, s in sorted(self._held.items())))

    def _verify(self, key: ExpertKey, sha: str) -> bool:
        path = self._expert_path(key)
        try:
            if path.stat().st_size != self.nbytes:
                logger.warning("received expert %s is %d bytes, expected %d: it will be received again", tuple(key),
                               path.stat().st_size, self.nbytes)
                return False
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except OSError:
            return False
        if digest.hexdigest() != sha:
            logger.warning("received expert %s does not match its SHA-256: it will be received again", tuple(key))
            return False
        return True

    def held(self) -> frozenset[ExpertKey]:
        with self._lock:
            return frozenset(self._held)

    def missing(self, keys) -> list[ExpertKey]:
        held = self.held()
        return sorted(k for k in keys if k not in held)

    # -- receiving ------------------------------------------------------------------------------
    def write(self, key: ExpertKey, offset: int, data: bytes, sha256: str = "") -> bool:
        """Write one chunk in order; with `sha256` (the expert's last chunk) verify the expert, which the next
        `commit()` makes held. Returns True when an expert was completed. A chunk out of order, past the end, or a
        hash that does not match drops what was received of that expert and raises ReceiveError."""
        with self._lock:
            inc = self._incoming.get(key)
            if inc is None:
                if offset != 0:
                    raise ReceiveError(f"expert {tuple(key)}: first chunk at offset {offset}, expected 0")
                if any(k == key for k, _, _ in self._verified):
                    raise ReceiveError(f"expert {tuple(key)} was already received in this push")
                tmp = self._expert_path(key).with_suffix(f".{os.getpid()}.part")
                inc = self._incoming[key] = _Incoming(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), tmp)
        try:
            if offset != inc.received or offset + len(data) > self.nbytes:
                raise ReceiveError(f"expert {tuple(key)}: chunk at offset {offset} of {len(data)} bytes, expected "
                                   f"offset {inc.received} and at most {self.nbytes} bytes in all")
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.pwrite(inc.fd, view[done:], offset + done)
            inc.received += len(data)
            inc.digest.update(data)
            if not sha256:
                return False
            if inc.received != self.nbytes or inc.digest.hexdigest() != sha256:
                raise ReceiveError(f"expert {tuple(key)}: {inc.received} bytes with SHA-256 {inc.digest.hexdigest()}, "
                                   f"expected {self.nbytes} bytes with {sha256}")
            with self._lock:
                self._incoming.pop(key, None)
                self._verified.append((key, sha256, inc))
                due = len(self._verified) >= _GROUP_EXPERTS or len(self._verified) * self.nbytes >= _GROUP_BYTES
        except BaseException:
            self.abort(key)
            raise
        if due:
            self.commit()
        return True

    def commit(self) -> int:
        """Make every verified expert durable and held: each file fsynced and renamed into place, then one append
        to the log, fsynced. Returns how many were committed. A crash before this loses only what was not yet
        committed (its temporary files are removed at the next start and the coordinator sends it again)."""
        with self._commit_lock:
            with self._lock:
                group, self._verified = self._verified, []
            if not group:
                return 0
            for key, _, inc in group:
                os.fsync(inc.fd)
                os.close(inc.fd)
                os.replace(inc.path, self._expert_path(key))
            with self._lock:
                stale = [self._fds.pop(key) for key, _, _ in group if key in self._fds]
                for key, sha, _ in group:
                    self._held[key] = sha
                with open(self.folder / LOG_FILE, "ab") as log:
                    log.write(b"".join(_record(key, sha) for key, sha, _ in group))
                    log.flush()
                    os.fsync(log.fileno())
            for fd in stale:  # a damaged copy that was open for reading
                os.close(fd)
            return len(group)

    def abort(self, key: ExpertKey | None = None) -> None:
        """Drop what was received of `key` (or of every expert still incomplete)."""
        with self._lock:
            keys = [key] if key is not None else list(self._incoming)
            dropped = [self._incoming.pop(k) for k in keys if k in self._incoming]
        for inc in dropped:
            os.close(inc.fd)
            inc.path.unlink(missing_ok=True)

    # -- reading (the ExpertSource of the worker's store) ----------------------------------------
    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        if out.dtype != torch.uint8 or out.numel() != self.nbytes:
            raise ValueError(f"out must be a uint8 tensor of {self.nbytes} bytes, got {out.dtype} x {out.numel()}")
        with self._lock:
            if key not in self._held:
                raise KeyError(f"expert {tuple(key)} has not been received")
            fd = self._fds.get(key)
            if fd is None:
                fd = self._fds[key] = os.open(self._expert_path(key), os.O_RDONLY)
            self.bytes_read += self.nbytes
        direct = out.device.type == "cpu" and out.is_contiguous()
        target = out if direct else torch.empty(self.nbytes, dtype=torch.uint8)
        pread_into(fd, memoryview(target.numpy()), 0)
        if not direct:
            out.copy_(target)

    def close(self) -> None:
        self.abort()
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def _record(key: ExpertKey, sha256: str) -> bytes:
    return msgpack.packb({"layer": key.layer, "expert": key.expert, "sha256": sha256}, use_bin_type=True)
