"""Shared fixtures: an echo backend and a factory for real server processes.

Also the Hypothesis profiles: ``quick`` (the default) keeps ``scripts/test`` fast,
``full`` (``WEBSOCKETSERVER_FUZZ=full``, run nightly by ``bench/nightly.py``) is the long
run. Both are derandomized: the same inputs on every run, so a failure reproduces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

_ORIGINAL_DONTWRITEBYTECODE = "WEBSOCKETSERVER_TESTS_DONTWRITEBYTECODE"
"""Set for pytest-xdist's workers when :func:`pytest_configure` let them write bytecode."""


if _ORIGINAL_DONTWRITEBYTECODE in os.environ:  # a worker started as pytest_configure says:
    # what it starts gets the environment as it was (support.BYTECODE, read below, too)
    os.environ["PYTHONDONTWRITEBYTECODE"] = os.environ.pop(_ORIGINAL_DONTWRITEBYTECODE)
    del os.environ["PYTHONPYCACHEPREFIX"]

pytest.register_assert_rewrite("cluster_support")  # imported by test modules for fixtures

from support import BYTECODE, EchoBackend, ServerProcess, StartServer  # noqa: E402 - after the rewrite hook

FUZZ_ENV = "WEBSOCKETSERVER_FUZZ"
"""Environment variable naming the Hypothesis profile: ``quick`` (default) or ``full``."""
_COMMON: dict[str, Any] = {"deadline": None, "derandomize": True, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much]}
settings.register_profile("quick", max_examples=400, **_COMMON)
settings.register_profile("full", max_examples=6000, **_COMMON)
settings.load_profile(os.environ.get(FUZZ_ENV) or "quick")


LONG_FIRST = ("test_slurm_endings.py", "test_cluster.py", "test_autobahn.py", "test_fuzz.py",
              "test_redis_store.py", "test_demo_desktop.py", "test_novnc_browser.py",
              "test_command_services.py", "test_slurm_sessions.py", "test_slurm_desktop.py",
              "test_packaging.py")
"""Modules whose tests take seconds each: started first, so that the four workers end
together instead of one finishing a long test alone (about 10 s of the suite's time)."""


def pytest_configure(config: pytest.Config) -> None:
    """Where ``PYTHONDONTWRITEBYTECODE`` is set, let pytest-xdist's workers keep bytecode
    (their rewritten test modules) in a cache outside the tree (``BYTECODE``): else each
    worker compiles every test module again, ~2.7 s of each one's ~4.7 s of collection.
    The workers give what they start the environment as it was (below)."""
    workers = config.getoption("numprocesses", None)
    if BYTECODE and workers and "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ[_ORIGINAL_DONTWRITEBYTECODE] = os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ.update(BYTECODE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """LONG_FIRST's modules first, in its order (the longest first); the rest after, in
    their order (the sort is stable)."""
    rank = {name: position for position, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))


@pytest.fixture(scope="session")
def shared_echo() -> Iterator[EchoBackend]:
    backend = EchoBackend()
    yield backend
    backend.close()


@pytest.fixture
def echo(shared_echo: EchoBackend) -> EchoBackend:
    """The echo backend, one for all the tests of a worker (it keeps no state): alive."""
    assert shared_echo.proc.poll() is None, "the shared echo backend died"
    return shared_echo


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start ``ServerProcess.start(*args, **kwargs)``; each is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs: Any) -> ServerProcess:
        kwargs.setdefault("log_dir", tmp_path)
        server = ServerProcess.start(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
