"""How Slurm sessions end when nobody releases them: the job's time limit, and a server
killed with SIGKILL (its supervisor cancels its jobs; a server started after one that
left jobs cancels them). A module of its own, with a Slurm cluster of its own, so that
its minute-long time-limit test runs beside the other tests, not after them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

pytest.register_assert_rewrite("slurm_support", "e2e.slurm_sessions")
from slurm_support import SlurmCluster  # noqa: E402

from e2e.slurm_sessions import (  # noqa: E402
    closed_by_the_job,
    instance,
    reserve,
    start,
    wait_no_job_process,
    wait_state,
    write_config,
)
from support import StartServer, received_close, wait_until  # noqa: E402

pytest_plugins = ["slurm_support"]


@pytest.fixture(autouse=True)
def clean_queue(slurm: SlurmCluster) -> Iterator[None]:
    yield
    slurm.cancel_all(timeout=15)


def queue(slurm: SlurmCluster) -> list[str]:
    """The ids of the jobs Slurm has not finished with."""
    return slurm.run("squeue", "-h", "-o", "%i").split()


@pytest.mark.timeout(240)
def test_a_job_past_its_time_limit_closes_its_websocket_with_the_reason(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """``--time=1``: Slurm ends the job after a minute (its check runs every ~30 s);
    the websocket closes with ``job N ended: TIMEOUT``."""
    config = write_config(tmp_path / "svc", slurm, count=1, sbatch=("--time=1",))
    server, mark = start(start_server, slurm, config)
    token = reserve(server)
    job_id, close, seconds = closed_by_the_job(server, token, lambda _: None, 150)
    assert (close.code, close.reason) == (1001, f"job {job_id} ended: TIMEOUT")
    assert seconds > 50
    wait_no_job_process(server, mark)
    wait_until(lambda: reserve(server), 10)  # its slot is free again


def test_killing_the_server_cancels_its_jobs_and_a_new_one_cancels_what_is_left(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """SIGKILL of the server process: its supervisor runs scancel for the run's jobs.
    SIGKILL of the supervisor too (nothing of the server is left to cancel them): the
    next server of that instance cancels them at its start."""
    config = write_config(tmp_path / "svc", slurm)
    server, mark = start(start_server, slurm, config)
    queued = [reserve(server), reserve(server)]  # one runs, one waits for the licence
    wait_state(server, queued[1], "queued")
    assert len(queue(slurm)) == 2
    os.kill(server.serving_pid(), signal.SIGKILL)
    wait_until(lambda: not queue(slurm), 15)
    wait_until(lambda: server.proc.poll() is not None, 15)
    wait_no_job_process(server, mark)

    second, mark = start(start_server, slurm, config)
    reserve(second)
    wait_until(lambda: queue(slurm), 10)
    left = queue(slurm)
    os.kill(second.serving_pid(), signal.SIGSTOP)  # the supervisor first, then it
    os.kill(second.pid, signal.SIGKILL)
    os.kill(second.serving_pid(), signal.SIGKILL)
    assert queue(slurm) == left  # nothing cancelled them
    third = start_server("--remote_session_config", str(config),
                         ws_port=second.ws_port, env=slurm.env)
    wait_until(lambda: not queue(slurm), 15)
    wait_until(lambda: "left by a previous run" in third.log(), 10)


def test_a_websocket_waits_at_most_the_queue_timeout_and_an_unused_job_is_reclaimed(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """``"queue_timeout": 2``: the websocket of a job still waiting for the licence is
    closed with the reason and its job cancelled. ``--timeout 2`` counts from the
    report: the running job no websocket used is cancelled then, not before."""
    config = write_config(tmp_path / "svc", slurm, queue_timeout=2)
    server, mark = start(start_server, slurm, config, "--timeout", "2")
    holder, waiter = reserve(server), reserve(server)
    holder_job = wait_state(server, holder, "starting")["job_id"]
    waiter_job = wait_state(server, waiter, "queued")["job_id"]
    wait_until(lambda: instance(server, waiter)["queue_reason"] == "Licenses", 10)

    async def scenario() -> None:
        async with websockets.connect(server.ws_url(token=waiter), open_timeout=30) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
            close = received_close(closed.value)
            assert (close.code, close.reason) == (
                1011, f"job {waiter_job} still queued after 2 s (Licenses)")
    began = time.monotonic()
    asyncio.run(scenario())
    wait_until(lambda: waiter_job not in queue(slurm), 15)
    # the holder's job reported within a second or two of running; unused, it ends
    # --timeout (2 s) after that report, and its slot with it
    wait_until(lambda: holder_job not in queue(slurm), 20)
    assert time.monotonic() - began > 1.5
    status, services = server.get_json("/v1/status")
    assert services[0]["instances"] == []
    wait_no_job_process(server, mark)
