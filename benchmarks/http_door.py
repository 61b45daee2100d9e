"""`python -m moeshard.benchmarks.http_door`: what a hostile client does to everyone else's service.

Starts `moe-coordinator serve` on the demo model as its own process with its default limits, then measures from
this process: `/health` latency (p50/p99/max over `--probes` probes, and how many failed) and whether small
completions are served, first on a quiet server, then while one client keeps `--sockets` connections open that
never finish their head (half silent, half sending a header byte by byte, re-opened as they are closed), then
while `--bodies` clients send 3.7 MB chat bodies of 110,000 tiny messages, over and over. A table, one row per
scenario. (The figures in the README come from this.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, body: bytes | None = None, timeout: float = 10) -> int:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            reply.read()
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def _idle_sockets(port: int, count: int, stop: threading.Event) -> None:
    socks: list[socket.socket] = []
    opened = 0
    while not stop.is_set():
        alive = []
        for sock in socks:
            try:
                if opened % 2:
                    sock.send(b"a")
                alive.append(sock)
            except OSError:
                sock.close()
        socks = alive
        while len(socks) < count and not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                break
            opened += 1
            if opened % 2:
                with contextlib.suppress(OSError):
                    sock.send(b"GET /health HTTP/1.1\r\nx-slow: ")
            socks.append(sock)
        time.sleep(0.05)
    for sock in socks:
        sock.close()


def _large_bodies(base: str, clients: int, stop: threading.Event) -> None:
    body = json.dumps({"model": "moeshard-demo", "messages": [{"role": "user", "content": "x"}] * 110_000}).encode()

    def client():
        while not stop.is_set():
            _get(f"{base}/v1/chat/completions", body, timeout=60)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _measure(base: str, probes: int) -> dict:
    latencies, failed, completions = [], 0, []
    body = json.dumps({"model": "moeshard-demo", "prompt": "def f(", "max_tokens": 4}).encode()
    with ThreadPoolExecutor(1) as pool:
        pending = []
        for i in range(probes):
            start = time.perf_counter()
            status = _get(f"{base}/health")
            latencies.append(time.perf_counter() - start)
            failed += status != 200
            if i % 20 == 0:
                pending.append(pool.submit(_get, f"{base}/v1/completions", body, 60))
            time.sleep(0.02)
        completions = [f.result() for f in pending]
    latencies.sort()
    return {"p50_ms": statistics.median(latencies) * 1e3, "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
            "max_ms": latencies[-1] * 1e3, "failed": failed, "probes": probes,
            "completions_ok": sum(s == 200 for s in completions), "completions": len(completions)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeshard.benchmarks.http_door", description=__doc__.split("\n\n")[0])
    p.add_argument("--probes", type=int, default=200)
    p.add_argument("--sockets", type=int, default=300, help="idle or slow connections held by one client")
    p.add_argument("--bodies", type=int, default=8, help="clients sending large bodies at once")
    args = p.parse_args(argv)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "moeshard.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _get(f"{base}/health", timeout=2) != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not start")
            time.sleep(0.5)
        rows = []
        for name, attack in (("quiet", None),
                             (f"{args.sockets} idle/slow sockets", lambda s: _idle_sockets(port, args.sockets, s)),
                             (f"{args.bodies} clients x 3.7 MB bodies", lambda s: _large_bodies(base, args.bodies, s))):
            stop = threading.Event()
            thread = threading.Thread(target=attack, args=(stop,), daemon=True) if attack else None
            if thread:
                thread.start()
                time.sleep(2.0)
            rows.append((name, _measure(base, args.probes)))
            stop.set()
            if thread:
                thread.join(timeout=60)
            time.sleep(1.0)
        print("| scenario | /health p50 | p99 | max | /health failed | completions served |")
        print("|---|---|---|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['max_ms']:.1f} ms | "
                  f"{r['failed']}/{r['probes']} | {r['completions_ok']}/{r['completions']} |")
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
