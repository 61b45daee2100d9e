"""Start `moe-worker` processes on this machine (for `demo`, benchmarks and tests), and stop them.

Each listens on 127.0.0.1 with an ephemeral port and reports it through a ready file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker_command() -> list[str]:
    """This Python running moe-worker, with the current folder kept off sys.path: a user's own `moeshard.py`
    or `worker.py` beside them cannot be run instead."""
    code = "import sys; del sys.path[0]; from moeshard.worker.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code]


class LocalWorkers:
    """A context manager: `with LocalWorkers(2, model) as w: w.addresses`."""

    def __init__(self, count: int, model: Path | None, extra_args: tuple[str, ...] = (), timeout_s: float = 120.0,
                 log_dir: Path | None = None, threads: int = 1, cache_dirs: list[Path] | None = None):
        """`model` None: the workers start empty and receive their experts from the coordinator that joins them
        (each into its own `cache_dirs[i]` when given: two workers never share a cache folder)."""
        self.count, self.extra_args, self.timeout_s = count, extra_args, timeout_s
        self.cache_dirs = [Path(d) for d in cache_dirs] if cache_dirs is not None else None
        self.model = Path(model) if model is not None else None
        self.threads = threads  # compute threads per worker: 1 by default, as they share this machine's cores
        self._dir = tempfile.TemporaryDirectory(prefix="moeshard-workers-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._dir.name)
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def _ready_file(self, i: int) -> Path:
        return Path(self._dir.name) / f"worker{i}.addr"

    def _spawn(self, i: int, listen: str) -> subprocess.Popen:
        self._ready_file(i).unlink(missing_ok=True)
        with open(self.log_dir / f"worker{i}.log", "ab") as log:
            model = ["--model", str(self.model)] if self.model is not None else []
            cache = ["--cache-dir", str(self.cache_dirs[i])] if self.cache_dirs is not None else []
            cmd = [*worker_command(), *model, *cache, "--listen", listen, "--ready-file", str(self._ready_file(i)),
                   *self.extra_args]
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def _wait_ready(self, i: int) -> str:
        deadline = time.monotonic() + self.timeout_s
        path = self._ready_file(i)
        while not path.exists():
            if self.procs[i].poll() is not None:
                log = (self.log_dir / f"worker{i}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moe-worker {i} exited with {self.procs[i].returncode}:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"moe-worker {i} not ready after {self.timeout_s:.0f} s")
            time.sleep(0.05)
        return path.read_text().strip()

    def __enter__(self) -> LocalWorkers:
        try:
            self.procs = [self._spawn(i, "127.0.0.1:0") for i in range(self.count)]
            self.addresses = [self._wait_ready(i) for i in range(self.count)]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def restart(self, i: int, wait: bool = True) -> None:
        """Start worker `i` again on the same address (after it died or was killed)."""
        if self.procs[i].poll() is None:
            self.procs[i].kill()
        self.procs[i].wait()
        self.procs[i] = self._spawn(i, self.addresses[i])
        if wait:
            self._wait_ready(i)

    def stop(self, i: int) -> None:
        """Stop worker `i` (SIGTERM, then SIGKILL) and keep its address for a later `restart`."""
        if self.procs[i].poll() is None:
            self.procs[i].send_signal(signal.SIGTERM)
            try:
                self.procs[i].wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.procs[i].kill()
                self.procs[i].wait()

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._dir.cleanup()
