"""Shared fixtures: an echo backend and a factory for real server processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import EchoBackend, ServerProcess


@pytest.fixture
def echo() -> Iterator[EchoBackend]:
    backend = EchoBackend()
    yield backend
    backend.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Start ``ServerProcess.start(*args, **kwargs)``; each is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        kwargs.setdefault("log_dir", tmp_path)
        server = ServerProcess.start(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
