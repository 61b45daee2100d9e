"""Test helpers: an in-process worker server on its own event loop thread."""
from __future__ import annotations

import asyncio
import threading

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
