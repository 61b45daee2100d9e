"""Experts a coordinator pushed to this worker, kept on its disk so that a restart receives nothing again.

`cache_dir/<fingerprint>/` holds `model.json` (what the coordinator said the model is: its config.json, the
expert format, the packed size of one expert) and one packed-experts file per expert (`L-E.safetensors`, the
format the quantized cache uses too: `offload_core.packed_files`, the expert's SHA-256 in its header; a file that
is there was verified and committed whole). Each push stream receives through its own `Incoming`: an expert is
written to a temporary file of that stream's own as its chunks arrive; once its SHA-256 matched the sender's it
waits to be committed (synced and renamed into place with the others of its group, up to 64 MiB at a time and at
the end of the stream, so that the disk writes one group while the next arrives instead of stalling on every
expert). Two streams sending one expert do not meet: the first verified copy committed is kept, the other
discarded.

What is held is checked, never trusted: opening re-hashes every file against its header, a Join re-checks that
each file is still there with its size, and every read is checked against the CRC-32 computed with the SHA-256 (a
checksum, for speed: on one EPYC core CRC-32 adds 0.28 ms per MiB read, SHA-256 0.66 ms, to a read from the page
cache of 0.11 ms; it catches accidental damage). A damaged expert is dropped (`NotHeld`), never served, and asked
for again at the next Join. `DiskBudget` holds every model's received experts to --disk. `ReceivedExperts` is also
the `ExpertSource` the worker's store reads from. Nothing here knows gRPC.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import zlib
from pathlib import Path
from typing import NamedTuple

import torch

from ..offload_core.checkpoint import CheckpointError, pread_into
from ..offload_core.experts import ExpertKey
from ..offload_core.packed_files import PackedFile, PackedWriter, atomic_write, file_bytes
from .disk import DiskBudget

logger = logging.getLogger(__name__)

MODEL_FILE = "model.json"
_VERSION = 2  # 1: raw L-E.bin files and a msgpack log
_CHUNK = 1 << 22  # bytes hashed per read when verifying
_GROUP_BYTES = 64 << 20  # verified experts committed together (one wait on the disk per group, not per expert)
_GROUP_EXPERTS = 64  # ... and at most this many
MAX_INCOMPLETE = 4  # experts one push may have begun and not finished (a coordinator sends one after another)


class ReceiveError(ValueError):
    """A pushed expert that does not fit what was announced (offset, size, hash); the message says which."""


class NotHeld(LookupError):
    """An expert this worker does not hold: never received, or dropped because its file stopped matching its
    checksum. The coordinator computes it elsewhere meanwhile and sends it again at its next Join."""

    def __init__(self, key: ExpertKey, message: str):
        super().__init__(message)
        self.key = key


class CacheError(RuntimeError):
    """The worker's cache folder could not be written; the message names the expert, never the path."""


def _clear(path: Path) -> None:
    """Removes whatever stands at `path` unless it is a regular file (which `os.replace` overwrites): a folder or a
    link left in an expert's place would make it unplaceable for ever."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    elif not stat.S_ISREG(mode):
        os.unlink(path)


class _Sums(NamedTuple):
    sha256: str  # as the sender announced it and the bytes received matched
    crc32: int  # of the same bytes, computed with the hash (kept in memory only): what every read is checked against
    offset: int  # where the expert's bytes start in its file
    size: int  # of its file


class _Partial:
    """One expert being received by one stream: its file being written (None for a copy of an expert already held,
    which is only verified), the bytes so far and their running hash and checksum."""

    __slots__ = ("writer", "received", "digest", "crc")

    def __init__(self, writer: PackedWriter | None):
        self.writer, self.received, self.digest, self.crc = writer, 0, hashlib.sha256(), 0


class ReceivedExperts:
    def __init__(self, folder: Path, description: dict, nbytes: int, disk: DiskBudget):
        self.folder, self.description, self.nbytes, self.disk = Path(folder), description, int(nbytes), disk
        self.fingerprint = self.folder.name
        self.file_bytes = file_bytes([ExpertKey(0, 0)], self.nbytes, self._metadata())  # at least, per expert
        self._held: dict[ExpertKey, _Sums] = {}  # verified experts
        self._fds: dict[ExpertKey, int] = {}
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._folder_fd: int | None = None  # holds a shared lock: no other worker removes this folder meanwhile
        self.bytes_read = 0

    @classmethod
    def open(cls, root: Path, fingerprint: str, description: dict, nbytes: int,
             disk: DiskBudget | None = None) -> ReceivedExperts:
        """The folder of `fingerprint` under `root`: created, or reopened with every expert file re-verified."""
        root = Path(root).expanduser()
        folder = root / fingerprint
        folder.mkdir(parents=True, exist_ok=True)
        model = folder / MODEL_FILE
        record = {"version": _VERSION, "fingerprint": fingerprint, "model": description, "expert_bytes": nbytes}
        stored = None
        try:
            stored = json.loads(model.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            stored = {"error": "unreadable"}
        if stored != record and any(folder.iterdir()):
            logger.warning("received experts in %s were for another description of the model, or another version "
                           "of this folder: starting over", folder)
            shutil.rmtree(folder)
            folder.mkdir(parents=True)
        if stored != record:
            atomic_write(model, json.dumps(record, sort_keys=True).encode())
        for stale in folder.glob("*.tmp"):  # experts a killed worker was receiving: received again from the start
            stale.unlink(missing_ok=True)
        os.utime(folder)  # the most recently used model's folder is the last removed to make room
        cache = cls(folder, description, nbytes, disk if disk is not None else DiskBudget(root))
        cache._folder_fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(cache._folder_fd, fcntl.LOCK_SH)
        cache._load()
        return cache

    def _metadata(self) -> dict[str, str]:
        return {"fingerprint": self.fingerprint}

    # -- what is held ---------------------------------------------------------------------------
    def _expert_path(self, key: ExpertKey) -> Path:
        return self.folder / f"{key.layer}-{key.expert}.safetensors"

    def _load(self) -> None:
        """Every expert file in the folder, verified against its header (SHA-256); a damaged one is removed."""
        for path in sorted(self.folder.glob("*-*.safetensors")):
            layer, _, expert = path.stem.partition("-")
            if not (layer.isdigit() and expert.isdigit()):
                continue
            key = ExpertKey(int(layer), int(expert))
            sums = self._verify(key)
            if sums is not None:
                self._held[key] = sums
            else:
                _clear(path)
                path.unlink(missing_ok=True)

    def _intact(self, key: ExpertKey, size: int) -> bool:
        """The expert's file is there, a regular file of its size (its content is checked when read)."""
        try:
            st = os.stat(self._expert_path(key))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size

    def _verify(self, key: ExpertKey) -> _Sums | None:
        """The sums of an expert file that holds `key` alone and matches the SHA-256 in its header; None (and a
        warning) if it does not."""
        path = self._expert_path(key)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise CheckpointError("not a regular file")
            packed = PackedFile(path, self.nbytes, expect=self._metadata())
            if list(packed.keys) != [key]:
                raise CheckpointError(f"it holds {sorted(tuple(k) for k in packed.keys)[:4]}")
            offset, sha = packed.offsets[key], packed.hashes[key]
            digest, crc = hashlib.sha256(), 0
            with open(path, "rb") as f:
                f.seek(offset)
                left = self.nbytes
                while left and (chunk := f.read(min(_CHUNK, left))):
                    digest.update(chunk)
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
            if digest.hexdigest() != sha:
                raise CheckpointError("its bytes do not match its SHA-256")
        except (OSError, CheckpointError) as exc:
            logger.warning("received expert %s is unusable (%s): it will be received again", tuple(key),
                           exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
            return None
        return _Sums(sha, crc, offset, path.stat().st_size)

    def held(self) -> frozenset[ExpertKey]:
        with self._lock:
            return frozenset(self._held)

    def holds(self, key: ExpertKey) -> bool:
        with self._lock:
            return key in self._held

    def missing(self, keys) -> list[ExpertKey]:
        """Those of `keys` not held. A held expert whose file is gone, is no longer a regular file or has another
        size is dropped here, so that it is sent again (a change of content is found when it is read)."""
        with self._lock:
            held = dict(self._held)
        for key in [k for k in keys if k in held and not self._intact(k, held[k].size)]:
            logger.warning("received expert %s is missing, not a file, or not %d bytes: it will be received again",
                           tuple(key), self.nbytes)
            self._drop(key)
            del held[key]
        return sorted(k for k in keys if k not in held)

    def _drop(self, key: ExpertKey) -> None:
        """Forget a held expert and remove its file."""
        with self._lock:
            if self._held.pop(key, None) is None:
                return
            fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        path = self._expert_path(key)
        try:
            st = os.lstat(path)
            _clear(path)
            path.unlink(missing_ok=True)
            self.disk.removed(st.st_size if stat.S_ISREG(st.st_mode) else 0)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove the damaged expert file %s: %s", path, exc)

    # -- receiving ------------------------------------------------------------------------------
    def incoming(self) -> Incoming:
        """The state of one push stream; `close()` it when the stream ends, however it ends."""
        return Incoming(self)

    def _commit(self, group: list[tuple[ExpertKey, str, int, PackedWriter | None]]) -> int:
        """Make verified experts durable and held: each file synced, then all renamed into place. An expert another
        stream committed first is discarded. Returns how many were placed."""
        with self._commit_lock:
            placed, failed = [], None
            for key, sha, crc, writer in group:
                if writer is None:
                    continue  # a copy of an expert held already: verified, nothing to place
                if self.holds(key):  # another push committed it first
                    writer.close()
                    self.disk.release(self.file_bytes)
                    continue
                target = self._expert_path(key)
                try:
                    writer.commit(publish=False)
                    _clear(target)
                    writer.publish()
                except OSError as exc:
                    logger.warning("could not place received expert %s at %s: %s", tuple(key), target, exc)
                    writer.close()
                    self.disk.release(self.file_bytes)
                    failed = failed or (key, exc)
                    continue
                self.disk.settle(self.file_bytes)
                placed.append((key, _Sums(sha, crc, writer.offsets[key], target.stat().st_size)))
            with self._lock:
                stale = [self._fds.pop(key) for key, _ in placed if key in self._fds]
                self._held.update(placed)
            for fd in stale:  # a damaged copy that was open for reading
                os.close(fd)
        if failed is not None:
            key, exc = failed
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise CacheError(f"expert {tuple(key)} could not be placed in this worker's cache folder ({why}): its "
                             "log says more")
        return len(placed)

    # -- reading (the ExpertSource of the worker's store) ----------------------------------------
    def read_into(self, key: ExpertKey, out: torch.Tensor) -> None:
        """Reads one held expert and checks it against its CRC-32: a damaged one is dropped, never returned."""
        if out.dtype != torch.uint8 or out.numel() != self.nbytes:
            raise ValueError(f"out must be a uint8 tensor of {self.nbytes} bytes, got {out.dtype} x {out.numel()}")
        with self._lock:
            sums = self._held.get(key)
            if sums is None:
                raise NotHeld(key, f"expert {tuple(key)} is not held by this worker (never received, or dropped as "
                                   "damaged): it is received again at the coordinator's next Join")
            fd = self._fds.get(key)
            if fd is None:
                try:
                    fd = self._fds[key] = os.open(self._expert_path(key), os.O_RDONLY)
                except OSError:
                    fd = None
            self.bytes_read += self.nbytes
        direct = out.device.type == "cpu" and out.is_contiguous()
        target = out if direct else torch.empty(self.nbytes, dtype=torch.uint8)
        data = memoryview(target.numpy())
        try:
            if fd is None:
                raise FileNotFoundError
            pread_into(fd, data, sums.offset)
            intact = zlib.crc32(data) == sums.crc32
        except (OSError, CheckpointError):  # gone, cut short, or a folder now
            intact = False
        if not intact:
            logger.warning("received expert %s no longer matches its checksum on disk: dropped, to be received again",
                           tuple(key))
            self._drop(key)
            raise NotHeld(key, f"expert {tuple(key)} failed its checksum on this worker's disk: dropped, and received "
                               "again at the coordinator's next Join")
        if not direct:
            out.copy_(target)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)
        if self._folder_fd is not None:
            os.close(self._folder_fd)  # releases the folder's lock
            self._folder_fd = None


class Incoming:
    """What one push stream is receiving: the experts it began and has not finished (at most `MAX_INCOMPLETE`, each in
    a temporary file of its own), and those verified and not yet committed. Used by one stream, one call at a time;
    `close()` ends it: what is verified is committed, what is incomplete is dropped."""

    def __init__(self, store: ReceivedExperts):
        self.store = store
        self._partial: dict[ExpertKey, _Partial] = {}
        self._verified: list[tuple[ExpertKey, str, int, PackedWriter | None]] = []  # (key, sha256, crc32, file)
        self._done: set[ExpertKey] = set()  # verified in this stream: a second copy in one push is an error

    def write(self, key: ExpertKey, offset: int, data: bytes, sha256: str = "") -> bool:
        """Write one chunk in order; with `sha256` (the expert's last chunk) verify the expert, which the next
        `commit()` makes held. Returns True when an expert was completed and verified. A chunk out of order, past the
        end, or a hash that does not match drops what was received of that expert and raises ReceiveError."""
        inc = self._partial.get(key) or self._begin(key, offset)
        store = self.store
        try:
            if offset != inc.received or offset + len(data) > store.nbytes:
                raise ReceiveError(f"expert {tuple(key)}: chunk at offset {offset} of {len(data)} bytes, expected "
                                   f"offset {inc.received} and at most {store.nbytes} bytes in all")
            if inc.writer is not None:
                inc.writer.write(key, data)  # hashes as it writes
            else:
                inc.digest.update(data)
            inc.received += len(data)
            inc.crc = zlib.crc32(data, inc.crc)
            if not sha256:
                return False
            digest = inc.writer.hashes.get(key, "") if inc.writer is not None else inc.digest.hexdigest()
            if inc.received != store.nbytes or digest != sha256:
                raise ReceiveError(f"expert {tuple(key)}: {inc.received} bytes with SHA-256 {digest or '(incomplete)'},"
                                   f" expected {store.nbytes} bytes with {sha256}")
        except BaseException:
            self._abandon(key)
            raise
        del self._partial[key]
        if inc.writer is not None:
            inc.writer.park()  # synced at commit: a verified expert holds no descriptor while it waits
        self._verified.append((key, sha256, inc.crc, inc.writer))
        self._done.add(key)
        waiting = sum(writer is not None for *_, writer in self._verified)
        if waiting >= _GROUP_EXPERTS or waiting * store.nbytes >= _GROUP_BYTES:
            self.commit()
        return True

    def _begin(self, key: ExpertKey, offset: int) -> _Partial:
        store = self.store
        if offset != 0:
            raise ReceiveError(f"expert {tuple(key)}: first chunk at offset {offset}, expected 0")
        if key in self._done:
            raise ReceiveError(f"expert {tuple(key)} was already received in this push")
        if len(self._partial) >= MAX_INCOMPLETE:
            raise ReceiveError(f"expert {tuple(key)} would be the {len(self._partial) + 1}th expert this push began "
                               f"and did not finish: expected at most {MAX_INCOMPLETE}, each sent whole before the "
                               "next")
        if store.holds(key):  # a copy of an expert held already (a retry, another coordinator): checked, not kept
            inc = _Partial(None)
        else:
            store.disk.reserve(store.file_bytes, store.folder.name, f"expert {tuple(key)}")
            try:
                writer = PackedWriter(store._expert_path(key), [key], store.nbytes, store._metadata())
            except BaseException:
                store.disk.release(store.file_bytes)
                raise
            inc = _Partial(writer)
        self._partial[key] = inc
        return inc

    def _abandon(self, key: ExpertKey) -> None:
        inc = self._partial.pop(key, None)
        if inc is None or inc.writer is None:
            return
        inc.writer.close()
        self.store.disk.release(self.store.file_bytes)

    def incomplete(self) -> list[ExpertKey]:
        return list(self._partial)

    def commit(self) -> int:
        group, self._verified = self._verified, []
        return self.store._commit(group) if group else 0

    def close(self) -> list[ExpertKey]:
        """The stream ended: drop what is incomplete (descriptors closed, temporary files removed), commit what was
        verified. Returns the experts that were dropped incomplete."""
        incomplete = self.incomplete()
        for key in incomplete:
            self._abandon(key)
        self.commit()
        return incomplete
