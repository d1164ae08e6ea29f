"""wss and https with a generated certificate pair, and bad certificate files."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
import websockets

from support import LAUNCHER, EchoBackend, StartServer, free_port, recv_bytes


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    return cert_path, key_path


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_wss_and_https(start_server: StartServer, echo: EchoBackend, ca: trustme.CA,
                       cert_files: tuple[Path, Path]) -> None:
    server = start_server("--client_port", str(echo.port), tls=cert_files)
    context = client_context(ca)
    status, _, body = server.get("/index.html", context=context)
    assert status == 200 and b"websocketserver demo" in body
    status, _, _ = server.get("/v1/status", context=context)
    assert status == 200

    async def roundtrip() -> bool:
        async with websockets.connect(server.ws_url(), ssl=context, max_size=None) as ws:
            data = os.urandom(1 << 20)
            await ws.send(data)
            received = bytearray()
            while len(received) < len(data):
                received += await recv_bytes(ws)
            return bytes(received) == data

    assert asyncio.run(roundtrip())


@pytest.mark.parametrize("problem", ["missing", "garbage", "key_mismatch"])
def test_bad_certificate_is_a_one_line_startup_error(problem: str, cert_files: tuple[Path, Path],
                                                     tmp_path: Path, ca: trustme.CA) -> None:
    cert, key = cert_files
    if problem == "missing":
        cert = tmp_path / "nope.pem"
    elif problem == "garbage":
        cert.write_text("not a certificate")
    else:
        other = ca.issue_cert("other")
        other.private_key_pem.write_to_path(key)
        other_cert = tmp_path / "other.pem"
        ca.issue_cert("x").cert_chain_pems[0].write_to_path(other_cert)
        cert = other_cert
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "--listen_address", "127.0.0.1", "--cert", str(cert),
         "--key", str(key), "--client_port", "1", str(free_port())],
        capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.stderr
