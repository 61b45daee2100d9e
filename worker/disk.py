"""`DiskBudget`: the disk every model's received experts take on a worker, held to its --disk.

An expert's bytes are reserved before its first byte is written (so that no push, however slow or however many run
at once, puts more than the cap on disk) and given back when it is dropped. When they do not fit, the folders of
other models are removed, least recently opened first. Nothing here knows gRPC or what an expert is.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

FINGERPRINT = re.compile(r"[0-9a-f]{32}")  # a model's folder name under the received-experts cache


class DiskFull(Exception):
    """Receiving would go past --disk, or past what the disk has free."""


def dir_bytes(root: Path) -> int:
    """Bytes of every file under `root`."""
    root = Path(root)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class DiskBudget:
    """The disk every model's received experts take under `root`, against `limit` (--disk; None: the disk's own
    size). An expert's bytes are reserved before its first byte is written and given back if it is dropped. When
    they do not fit, the folders of other models are removed, least recently opened first: never the model being
    received, never a folder another worker has open (each holds a shared lock on its folder)."""

    def __init__(self, root: Path, limit: int | None = None):
        self.root, self.limit = Path(root), limit
        self._held: int | None = None  # bytes of the files under root, measured on first use
        self._reserved = 0  # bytes of experts being received (their temporary files grow towards them)
        self._lock = threading.Lock()

    def room(self, nbytes: int, keep: str, what: str) -> None:
        """Raises DiskFull unless `nbytes` more fit now (other models' folders removed if that makes them fit)."""
        with self._lock:
            self._fit(nbytes, keep, what)

    def reserve(self, nbytes: int, keep: str, what: str) -> None:
        with self._lock:
            self._fit(nbytes, keep, what)
            self._reserved += nbytes

    def release(self, nbytes: int) -> None:
        """A reservation dropped (an incomplete expert, or a second copy discarded)."""
        with self._lock:
            self._reserved -= nbytes

    def settle(self, nbytes: int) -> None:
        """A reservation that became a file."""
        with self._lock:
            self._reserved -= nbytes
            if self._held is not None:
                self._held += nbytes

    def removed(self, nbytes: int) -> None:
        """A file of `nbytes` deleted (a damaged expert)."""
        with self._lock:
            if self._held is not None:
                self._held -= nbytes

    def _fit(self, nbytes: int, keep: str, what: str) -> None:
        if self._held is None and self.limit is not None:
            self._held = self._measure()
        if self._fits(nbytes):
            return
        # The count may have drifted (logs grow, files were removed by hand): measure, then make room.
        self._held = self._measure() if self.limit is not None else None
        if not self._fits(nbytes):
            self._remove_others(keep, nbytes)
            self._held = self._measure() if self.limit is not None else None
        if self.limit is not None and self._held + self._reserved + nbytes > self.limit:
            used = self._held + self._reserved
            raise DiskFull(f"receiving {what} needs {_mib(nbytes)} of disk beside the {_mib(used)} held or being "
                           f"received, more than this worker's --disk {_mib(self.limit)}")
        free = shutil.disk_usage(self.root).free
        if free < nbytes:
            raise DiskFull(f"receiving {what} needs {_mib(nbytes)} of disk, more than the {_mib(free)} free where "
                           "this worker keeps received experts")

    def _fits(self, nbytes: int) -> bool:
        if self.limit is not None and self._held + self._reserved + nbytes > self.limit:
            return False
        return shutil.disk_usage(self.root).free >= nbytes

    def _measure(self) -> int:
        # Temporary files are counted by their reservations, not by what they hold so far.
        root = self.root
        if not root.is_dir():
            return 0
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix != ".tmp")

    def _remove_others(self, keep: str, nbytes: int) -> None:
        folders = []
        for folder in self.root.iterdir():
            if folder.name != keep and FINGERPRINT.fullmatch(folder.name) and folder.is_dir() \
                    and not folder.is_symlink():
                folders.append((folder.stat().st_mtime, folder))
        for _, folder in sorted(folders):
            if self._fits(nbytes):
                return
            try:
                fd = os.open(folder, os.O_RDONLY)
            except OSError as exc:
                logger.warning("could not open %s to make room: %s", folder, exc)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                size = dir_bytes(folder)
                shutil.rmtree(folder)
                if self._held is not None:
                    self._held -= size
                logger.warning("removed the received experts of model %s (%s, unused longest) to make room",
                               folder.name, _mib(size))
            except BlockingIOError:
                logger.info("model %s's received experts are in use by another worker: kept", folder.name)
            except OSError as exc:
                logger.warning("could not remove %s to make room: %s", folder, exc)
            finally:
                os.close(fd)


