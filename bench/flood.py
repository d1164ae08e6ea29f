"""Memory under pressure: a backend floods 1 GiB toward a browser that stops reading.

    python bench/flood.py [--gib 1] [--seconds 10]

Reports how much the server process's RSS grows while the flood is held back by
backpressure, sampled every 100 ms (the issue's bound: under 64 MB), and how many
bytes the backend managed to push before it was blocked. Stops what it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def main(total: int, seconds: float) -> int:
    pushed = 0
    chunk = os.urandom(1 << 20)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        try:
            while pushed < total:
                writer.write(chunk)
                await writer.drain()
                pushed += len(chunk)
        except ConnectionError:
            pass
        writer.close()

    backend = await asyncio.start_server(flood, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    ws_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "websocketserver", "--listen_address", "127.0.0.1",
         "--client_port", str(backend_port), str(ws_port)],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", ws_port), 1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        processes = psutil.Process(server.pid).children(recursive=True)  # server, relay

        def rss() -> int:
            return sum(proc.memory_info().rss for proc in processes)

        before = rss()
        peak = before
        async with websockets.connect(f"ws://127.0.0.1:{ws_port}/", max_size=None,
                                      max_queue=1, close_timeout=1) as ws:
            await ws.recv()  # the flood has begun; from now on the browser reads nothing
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                peak = max(peak, rss())
                await asyncio.sleep(0.1)
        print(f"flood of {total / 2**30:g} GiB toward a browser that stopped reading, "
              f"held {seconds:g} s ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
        print(f"server RSS before: {before / 1e6:.1f} MB, peak: {peak / 1e6:.1f} MB, "
              f"growth: {(peak - before) / 1e6:.1f} MB (bound: 64 MB)")
        print(f"bytes the backend could push before backpressure stopped it: "
              f"{pushed / 1e6:.1f} MB")
        return 0 if peak - before < 64e6 else 1
    finally:
        server.terminate()
        server.wait(20)
        backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(int(args.gib * 2**30), args.seconds)))
