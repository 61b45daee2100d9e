"""The cold-read protocol: offloaded files are dropped from the page cache before every decode step.

On a machine with plenty of RAM, the page cache quietly keeps an "offloaded" checkpoint in memory and
every offloading system looks free. `drop_page_cache` evicts files with POSIX_FADV_DONTNEED, and
`read_bandwidth` measures a read of a file, cold (dropped first) or warm, so the protocol is shown to
work by the figures it produces.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_CHUNK = 1 << 24


def data_files(*folders: Path) -> list[Path]:
    files = []
    for folder in folders:
        if folder is not None and Path(folder).is_dir():
            files += [p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".dat", ".bin")]
    return files


def drop_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd) if os.access(path, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def mapped_files(files: list[Path]) -> list[Path]:
    """Those of `files` that this process has memory-mapped (Linux; [] elsewhere). The kernel keeps a mapped page
    in the page cache whatever posix_fadvise says, so a system that maps a file makes every other system's reads
    of it warm: transformers maps the safetensors it loads and keeps tensors that need no conversion on the map."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line}
    except OSError:
        return []
    return [f for f in files if str(Path(f).resolve()) in mapped]


def own_memory(model) -> None:
    """Copy every CPU parameter and buffer of a transformers model that still lives on the checkpoint's memory map
    into memory of its own, so that the model no longer maps the file (see `mapped_files`)."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def read_bandwidth(path: Path, cold: bool, limit_bytes: int = 1 << 30) -> float:
    """Bytes per second reading up to `limit_bytes` of `path` (after dropping it from the page cache if cold)."""
    if cold:
        drop_page_cache([path])
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    done, start = 0, time.perf_counter()
    try:
        while done < limit_bytes:
            n = os.preadv(fd, [view], done)
            if n <= 0:
                break
            done += n
    finally:
        os.close(fd)
    return done / (time.perf_counter() - start)


def write_bandwidth(folder: Path, nbytes: int = 512 << 20) -> float:
    """Bytes per second writing `nbytes` sequentially into a new file in `folder`, fsync included (then removed)."""
    buf = os.urandom(_CHUNK)
    path = Path(folder) / ".moeshard-write-test"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.perf_counter()
    try:
        for offset in range(0, nbytes, _CHUNK):
            os.pwrite(fd, buf[: min(_CHUNK, nbytes - offset)], offset)
        os.fsync(fd)
        return nbytes / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def h2d_bandwidth(device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second copying a pinned host buffer to `device` (best of `repeats`)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = max(best, nbytes / (time.perf_counter() - start))
    return best


def memory_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second this process reads from RAM with torch's threads (a sum over a buffer far larger than
    the caches, written first so that its pages are real): the floor under a decode step that reads its weights
    from memory is the bytes it reads over this."""
    import statistics

    import torch

    buf = torch.ones(nbytes // 4)
    buf.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)
