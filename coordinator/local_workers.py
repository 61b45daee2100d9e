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


class LocalWorkers:
    """A context manager: `with LocalWorkers(2, model) as w: w.addresses`."""

    def __init__(self, count: int, model: Path, extra_args: tuple[str, ...] = (), timeout_s: float = 120.0,
                 log_dir: Path | None = None):
        self.count, self.model, self.extra_args, self.timeout_s = count, Path(model), extra_args, timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="moeshard-workers-")
        self.log_dir = Path(log_dir) if log_dir else Path(self._dir.name)
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[str] = []

    def __enter__(self) -> LocalWorkers:
        try:
            ready = [Path(self._dir.name) / f"worker{i}.addr" for i in range(self.count)]
            for i, path in enumerate(ready):
                log = open(self.log_dir / f"worker{i}.log", "wb")
                cmd = [sys.executable, "-m", "worker", "--model", str(self.model), "--listen", "127.0.0.1:0",
                       "--ready-file", str(path), *self.extra_args]
                self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                                       "OMP_NUM_THREADS", "1")}))
                log.close()
            deadline = time.monotonic() + self.timeout_s
            for i, path in enumerate(ready):
                while not path.exists():
                    if self.procs[i].poll() is not None:
                        log = (self.log_dir / f"worker{i}.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"moe-worker {i} exited with {self.procs[i].returncode}:\n{log}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"moe-worker {i} not ready after {self.timeout_s:.0f} s")
                    time.sleep(0.05)
                self.addresses.append(path.read_text().strip())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

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
