"""The HTTP port's memory under unfinished request heads (issue 22, finding 2).

aiohttp alone keeps a request head of up to 128 header lines of 8,190 bytes, about
1 MiB, until it is complete, and the port took any number of connections: 400 such
heads grew the server's process tree by 683 MiB here (782 MiB in the probe), and
706 MiB stayed after they closed. Now a head is bounded as on the websocket port
(4 x --max_header_size in all: 431 beyond), the connections by --max_http_connections,
and the heap is trimmed once the port is idle.
"""

from __future__ import annotations

import json
import socket
import time

from support import StartServer, wait_until

MiB = 1024 * 1024
LINE = b"X-Pad-%03d: " + b"a" * 8100 + b"\r\n"  # under --max_header_size (8190)



def unfinished_head(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def test_400_unfinished_heads_hold_little_memory(start_server: StartServer) -> None:
    server = start_server()
    assert server.http_port is not None
    time.sleep(0.3)  # its start-up allocations settle
    idle = server.tree_rss()
    socks = [unfinished_head(server.http_port) for _ in range(400)]
    for number in range(127):  # 127 lines of 8 KB each: about 1 MiB per head
        for sock in socks:
            try:
                sock.sendall(LINE % number)
            except OSError:
                pass  # refused (431) and closed
    held = server.tree_rss() - idle
    for sock in socks:
        sock.close()
    assert held < 100 * MiB, f"{held / MiB:.0f} MiB"  # 683 MiB before
    wait_until(lambda: server.tree_rss() - idle < 32 * MiB, timeout=5)  # 706 MiB stayed


def test_a_long_head_gets_431_json(start_server: StartServer) -> None:
    server = start_server()
    assert server.http_port is not None
    with unfinished_head(server.http_port) as sock:
        for number in range(5):  # 5 x 8 KB > 4 x 8190
            sock.sendall(LINE % number)
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"431"  # in HTTP/1.0, as aiohttp answers a bad head
    assert json.loads(body) == {"error": "request header fields too large"}


def test_connections_beyond_the_limit_wait(start_server: StartServer) -> None:
    """At --max_http_connections, a new connection is not served until one closes."""
    server = start_server("--max_http_connections", "3")
    assert server.http_port is not None
    held = [unfinished_head(server.http_port) for _ in range(3)]
    late = socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
    late.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    late.settimeout(0.5)
    try:
        late.recv(1)
        raise AssertionError("answered beyond the limit")
    except TimeoutError:
        pass
    held.pop().close()
    late.settimeout(5)
    assert late.recv(12) == b"HTTP/1.1 200"
    for sock in [*held, late]:
        sock.close()
    assert "at its limit of 3 connections (--max_http_connections)" in server.log()
