"""Test helpers: an in-process worker server on its own event loop thread."""
from __future__ import annotations

import asyncio
import threading
import time

from moeshard.worker.server import ServerConfig, WorkerServer
from moeshard.worker.shard import ShardConfig


class InProcessWorker:
    """`with InProcessWorker(cfg, load=False) as w:` — a real grpc.aio server on 127.0.0.1:0."""

    def __init__(self, shard_cfg: ShardConfig, load: bool = True, server_cfg: ServerConfig | None = None,
                 **server_kwargs):
        server_cfg = server_cfg or ServerConfig(listen="127.0.0.1:0", grace_s=2.0)
        self.server = WorkerServer(shard_cfg, server_cfg, **server_kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.load_on_enter = load

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> InProcessWorker:
        self.thread.start()
        self.address = self.call(self.server.start())
        if self.load_on_enter:
            self.load()
        return self

    def load(self) -> None:
        self.call(self.server.load())

    @property
    def shard(self):
        return self.server.servicer.shard

    def __exit__(self, *exc) -> None:
        self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def wait_until(predicate, timeout_s: float, what: str) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_server_in_thread(server, sock, timeout_s: float) -> threading.Thread:
    """Start uvicorn `server` on the bound `sock` in a daemon thread and wait until it serves."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return thread
