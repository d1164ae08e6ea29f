"""sessions/slurm.py against a real single-node Slurm (tests/slurm_support.py).

The tests share one cluster per module (and pytest-xdist worker); each leaves it as it
found it, every job cancelled (``clean_queue``). Every wait is a bounded poll: a job
starts about a second after it can (the controller's scheduling pass).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

pytest.register_assert_rewrite("slurm_support")  # before it is imported: its asserts too
from slurm_support import LICENSE, NODE, SlurmCluster, marked, started_cluster, wait_gone  # noqa: E402, I001 - after the hook

from support import free_port, wait_until  # noqa: E402
from websocketserver.sessions.slurm import JobState, SchedulerError, Slurm  # noqa: E402

pytest_plugins = ["slurm_support"]

T = TypeVar("T")
WAIT = 10.0
"""Seconds any one change may take (a job starts or ends in about one)."""


@pytest.fixture(autouse=True)
def clean_queue(slurm: SlurmCluster) -> Iterator[None]:
    yield
    slurm.cancel_all(timeout=WAIT)


@pytest.fixture
def scheduler(slurm: SlurmCluster) -> Slurm:
    return Slurm(env=slurm.env, timeout=10)


def job_args(slurm: SlurmCluster, *more: str) -> list[str]:
    """Options every test job gets: its folder and output file there, not the repo's."""
    jobs = slurm.directory / "jobs"
    return [f"--chdir={jobs}", f"--output={jobs}/%j.out", *more]


def script(body: str) -> str:
    return f"#!/bin/sh\n{body}\n"


async def until(probe: Callable[[], Awaitable[T | None]], accept: Callable[[T], bool],
                what: str, timeout: float = WAIT) -> T:
    """Poll ``probe`` until ``accept`` takes what it returns; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await probe()
        if last is not None and accept(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s: last {last}")
        await asyncio.sleep(0.1)


async def running(scheduler: Slurm, job_id: str) -> JobState:
    return await until(lambda: scheduler.state(job_id), lambda s: s.running, "running")




async def test_a_job_runs_on_the_node_slurm_names_and_cancel_ends_its_processes(
        slurm: SlurmCluster, scheduler: Slurm) -> None:
    mark = uuid.uuid4().hex
    # the script's secret goes through the environment: no command line shows it
    job_id = await scheduler.submit(
        script('echo "secret=$WSTEST_SECRET"\nsleep 60'), job_args(slurm),
        name=f"wstest-{mark}", comment="websocketserver test", env={
            "WSTEST_MARK": mark, "WSTEST_SECRET": mark[::-1]})
    state = await running(scheduler, job_id)
    assert (state.job_id, state.nodes, state.batch_host) == (job_id, NODE, NODE)
    assert state.reason is None and state.expected_start is None
    assert state.name == f"wstest-{mark}"
    assert await scheduler.node_address(NODE) == "127.0.0.1"
    output = slurm.directory / "jobs" / f"{job_id}.out"

    async def written() -> str | None:
        return output.read_text() if output.exists() else None
    await until(written, lambda text: f"secret={mark[::-1]}" in text, "the script's output")
    sleeping = [p for p in marked(mark) if p.name() == "sleep"]
    assert len(sleeping) == 1, marked(mark)
    assert all(mark[::-1] not in " ".join(p.cmdline()) for p in marked(mark))

    await scheduler.cancel(job_id)
    wait_gone(mark)  # the script's shell and its sleep, within KillWait (1 s)
    ended = await until(lambda: scheduler.state(job_id), lambda s: s.state == "CANCELLED",
                        "cancelled")
    assert ended.ended and not ended.running
    await scheduler.cancel(job_id)  # once more: no error


async def test_a_job_waits_for_the_licence_and_starts_when_it_is_freed(
        slurm: SlurmCluster, scheduler: Slurm) -> None:
    first = await scheduler.submit(script("sleep 60"), job_args(
        slurm, f"--licenses={LICENSE}:1"), name="wstest-licence")
    await running(scheduler, first)
    second = await scheduler.submit(script("sleep 60"), job_args(
        slurm, f"--licenses={LICENSE}:1"), name="wstest-licence")
    waiting = await until(lambda: scheduler.state(second), lambda s: s.reason == "Licenses",
                          "waiting for the licence")
    assert waiting.pending and waiting.state == "PENDING"
    assert (waiting.nodes, waiting.batch_host) == ("", None)
    # (no expected start: Slurm 22.05's backfill does not plan licences; 23.02's
    # SchedulerParameters=bf_licenses does)

    await scheduler.cancel(first)
    started = await running(scheduler, second)
    assert started.batch_host == NODE and started.reason is None


async def test_a_job_waiting_for_cpus_has_an_expected_start(
        slurm: SlurmCluster, scheduler: Slurm) -> None:
    first = await scheduler.submit(script("sleep 60"), job_args(slurm, "--time=00:10:00"),
                                   name="wstest-cpus")
    await running(scheduler, first)
    whole_node = await scheduler.submit(script("sleep 60"), job_args(
        slurm, "--cpus-per-task=8", "--time=00:10:00"), name="wstest-cpus")
    waiting = await until(lambda: scheduler.state(whole_node),
                          lambda s: s.reason == "Resources" and s.expected_start is not None,
                          "waiting for CPUs with an expected start")
    # the backfill scheduler expects it when the first one's --time is up
    assert waiting.expected_start is not None and waiting.expected_start.tzinfo is not None
    expected = waiting.expected_start - datetime.now().astimezone()
    assert timedelta(minutes=9) < expected <= timedelta(minutes=10, seconds=5), expected


async def test_jobs_named_lists_the_unended_jobs_of_a_name_prefix(
        slurm: SlurmCluster, scheduler: Slurm) -> None:
    prefix = f"wsmark-{uuid.uuid4().hex[:8]}-"
    ours = [await scheduler.submit(script("sleep 60"), job_args(slurm), name=prefix + str(n))
            for n in range(2)]
    pending = await scheduler.submit(script("sleep 60"), job_args(slurm, "--hold"),
                                     name=prefix + "held")
    other = await scheduler.submit(script("sleep 60"), job_args(slurm), name="someone-else")
    assert sorted(await scheduler.jobs_named(prefix)) == sorted(
        (job, "root") for job in [*ours, pending])
    assert await scheduler.jobs_named(prefix, user="root") != []
    assert await scheduler.jobs_named(prefix, user="nobody") == []
    await scheduler.cancel(ours[0])
    await until(lambda: scheduler.jobs_named(prefix),
                lambda jobs: ours[0] not in dict(jobs), "the cancelled job unlisted")
    assert other not in dict(await scheduler.jobs_named(prefix))


async def test_a_job_slurm_has_never_known_has_no_state(scheduler: Slurm) -> None:
    assert await scheduler.state("987654") is None


async def test_failures_raise_with_the_tools_message(slurm: SlurmCluster,
                                                     scheduler: Slurm) -> None:
    with pytest.raises(SchedulerError, match=r"sbatch failed \(exit 1\):.*[Pp]artition"):
        await scheduler.submit(script("true"), job_args(slurm, "--partition=nope"), name="x")
    with pytest.raises(SchedulerError, match="scontrol failed.*nope not found"):
        await scheduler.node_address("nope")
    for bad in ("-u root", "12 13", ""):
        with pytest.raises(SchedulerError, match="not a job id"):
            await scheduler.state(bad)
        with pytest.raises(SchedulerError, match="not a job id"):
            await scheduler.cancel(bad)
    with pytest.raises(SchedulerError, match="not a node name"):
        await scheduler.node_address("--all")
    missing = Slurm(env={**slurm.env, "PATH": "/nonexistent"})
    with pytest.raises(SchedulerError, match="squeue: cannot run it"):
        await missing.jobs_named("x")


async def test_a_controller_that_does_not_answer_is_a_bounded_failure(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    # a "controller" that accepts and never answers: the commands would wait for
    # MessageTimeout (10 s) and retry; each call ends after its own timeout
    with socket.socket() as silent:
        port = free_port()
        silent.bind(("127.0.0.1", port))
        silent.listen()
        conf = tmp_path / "slurm.conf"
        conf.write_text("".join(
            f"SlurmctldPort={port}\n" if line.startswith("SlurmctldPort=") else line + "\n"
            for line in slurm.conf.read_text().splitlines()))
        stuck = Slurm(env={**slurm.env, "SLURM_CONF": str(conf)}, timeout=1)
        started = time.monotonic()
        with pytest.raises(SchedulerError, match=r"squeue: no answer within 1 s"):
            await stuck.state("1")
        with pytest.raises(SchedulerError, match=r"sbatch: no answer within 1 s"):
            await stuck.submit(script("true"), name="x")
        assert time.monotonic() - started < 4
    assert [p for p in psutil.Process().children() if p.name() in ("squeue", "sbatch")] == []


def test_the_fixture_leaves_no_process_even_when_slurmd_died() -> None:
    """The cluster's close() after slurmd's SIGKILL: Slurm cannot end the job then, and
    slurmstepd and the job's processes would stay without its sweep."""
    mark = uuid.uuid4().hex
    with started_cluster() as cluster:
        job_id = cluster.run("sbatch", "--parsable", f"--chdir={cluster.directory}",
                             "--output=/dev/null", "--wrap=sleep 60",
                             env={"WSTEST_MARK": mark}).strip()
        wait_until(lambda: cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").strip()
                   == "RUNNING", timeout=WAIT)
        # RUNNING is the allocation: the script's processes follow a moment later
        wait_until(lambda: [p for p in marked(mark) if p.name() == "sleep"], timeout=WAIT)
        cluster.procs["slurmd"].kill()
        cluster.procs["slurmd"].wait()
    assert cluster.leftovers() == []
    wait_gone(mark, timeout=2)
