"""Services that run as Slurm jobs, end to end: a real server, a real single-node Slurm
(tests/slurm_support.py), the shipped in-job launcher, a websocket through the tunnel.

Every job's processes carry the server's ``WSTEST_MARK``; "no process left" is checked
on that mark. Every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import websockets

pytest.register_assert_rewrite("slurm_support", "e2e.slurm_sessions")
from slurm_support import SlurmCluster  # noqa: E402

if TYPE_CHECKING:
    from cluster_support import RedisServer

from e2e.slurm_sessions import (  # noqa: E402
    closed_by_the_job,
    echo,
    echo_and_release,
    instance,
    job_processes,
    reserve,
    start,
    wait_no_job_process,
    wait_state,
    write_config,
)
from support import StartServer, free_port, received_close, recv_bytes, wait_until  # noqa: E402
from websocketserver.sessions.job_launcher import HEADER, Report, make_report  # noqa: E402

pytest_plugins = ["slurm_support", "cluster_support"]


@pytest.fixture(autouse=True)
def clean_queue(slurm: SlurmCluster) -> Iterator[None]:
    yield
    slurm.cancel_all(timeout=15)


def test_reserve_queues_the_job_then_the_websocket_echoes_through_it(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """Reserve submits (``"start": "reserve"``); a second session waits for the licence
    (reason ``Licenses``) until the first is released, which closes its websocket,
    cancels its job and leaves no process on the node."""
    server, mark = start(start_server, slurm, write_config(tmp_path / "svc", slurm))
    first = reserve(server)
    wait_until(lambda: instance(server, first)["job_node"] == "node1", 20)

    async def scenario() -> None:
        async with websockets.connect(server.ws_url(token=first), open_timeout=30) as ws:
            await ws.send(b"ping")
            assert await asyncio.wait_for(recv_bytes(ws), 30) == b"ping"
            assert instance(server, first)["state"] == "active"
            first_processes = job_processes(server, mark)
            assert first_processes  # the launcher and the echo server, on the node
            second = reserve(server)
            queued = await asyncio.to_thread(wait_state, server, second, "queued")
            assert queued["job_id"] not in (None, instance(server, first)["job_id"])
            assert queued["job_node"] is None
            await asyncio.to_thread(wait_until, lambda: instance(
                server, second)["queue_reason"] == "Licenses", 10)
            dashboard = server.get("/v1/status_view")[2].decode()
            assert f"job {queued['job_id']}: Licenses" in dashboard
            assert "job_node" not in dashboard and "class='state queued'" in dashboard

            assert server.get_json(f"/v1/release/{first}")[0] == 200
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
            assert received_close(closed.value).reason == "reservation released"
            await asyncio.to_thread(wait_until, lambda: not (
                job_processes(server, mark) & first_processes), 15)
            await asyncio.to_thread(wait_state, server, second, "starting")
            assert await echo(server, second, b"second") == b"second"
    asyncio.run(scenario())
    wait_no_job_process(server, mark)  # the second closed its websocket: its job is cancelled too
    assert first not in server.log()  # tokens are never logged
    assert "viz[0]: echo server on port" in server.log()  # the job's output, from the node


def test_a_websocket_waits_open_while_its_job_is_queued(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """``"start": "connect"``: the websocket submits; queued behind another job's
    licence it stays open (pinged) and relays once the job reports."""
    config = write_config(tmp_path / "svc", slurm, start="connect")
    server, mark = start(start_server, slurm, config, "--ping_interval", "1")
    holder = reserve(server)
    waiter = reserve(server)

    async def scenario() -> None:
        async with websockets.connect(server.ws_url(token=holder), open_timeout=30) as ws1:
            await ws1.send(b"one")
            assert await asyncio.wait_for(recv_bytes(ws1), 30) == b"one"
            async with websockets.connect(server.ws_url(token=waiter),
                                          open_timeout=30) as ws2:
                await asyncio.to_thread(wait_state, server, waiter, "queued")
                await asyncio.sleep(2.5)  # pings keep it open meanwhile
                assert instance(server, waiter)["queue_reason"] == "Licenses"
                await ws2.send(b"early")  # held upstream until the job is up
                await ws1.close()  # its job is cancelled: the licence is free
                assert await asyncio.wait_for(recv_bytes(ws2), 30) == b"early"
    asyncio.run(scenario())
    wait_no_job_process(server, mark)
    wait_until(lambda: not slurm.run("squeue", "-h", "-o", "%i").strip(), 15)


def test_a_job_that_ends_closes_its_websocket_with_the_jobs_state(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """An administrator's scancel (as the time limit, a node failure): the websocket
    closes with ``job N ended: STATE`` and the slot is free again."""
    server, mark = start(start_server, slurm, write_config(tmp_path / "svc", slurm,
                                                           count=1))
    token = reserve(server)
    job_id, close, _ = closed_by_the_job(server, token,
                                         lambda job_id: slurm.run("scancel", job_id), 20)
    assert (close.code, close.reason) == (1001, f"job {job_id} ended: CANCELLED")
    wait_until(lambda: reserve(server), 10)  # the one slot is free again
    wait_no_job_process(server, mark)


def test_forged_replayed_and_misdirected_reports_are_refused(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """Only the job's own secret, from the job's node, newer than the last: else 403,
    logged; a job no session wants is told so (410, its launcher then ends it)."""
    server, mark = start(start_server, slurm, write_config(tmp_path / "svc", slurm))
    token = reserve(server)
    job = wait_state(server, token, "starting")
    job_id = job["job_id"]
    url = f"http://127.0.0.1:{server.http_port}/v1/job_report"

    def post(body: bytes, signature: str) -> int:
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={HEADER: signature})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    forged = make_report(b"a guessed secret", Report(job_id, "node1", 22, time.time()))
    assert post(*forged) == 403
    assert post(*make_report(b"x", Report("999999", "node1", 22, time.time()))) == 410
    assert post(b"not json", "1 2") == 400
    # a real report, replayed: the launcher's own secret is only in the job's
    # environment, so take a report the job sent as it went by
    environ = next(p.environ() for p in marked_launchers(job_id, mark))
    secret = environ["WEBSOCKETSERVER_JOB_SECRET"].encode()
    first = make_report(secret, Report(job_id, "node1", 22, time.time() - 1000))
    assert post(*first) == 403  # too old
    elsewhere = make_report(secret, Report(job_id, "node7", 22, time.time()))
    assert post(*elsewhere) == 403  # not the job's node
    fresh = make_report(secret, Report(job_id, "node1", job_port(slurm, job_id),
                                       time.time()))
    assert post(*fresh) == 200
    assert post(*fresh) == 403  # the same one again
    log = server.log()
    assert log.count("refused a report for job") == 4
    assert secret.decode() not in log


def marked_launchers(job_id: str, mark: str) -> list[psutil.Process]:
    """The job's in-job launcher (its environment holds the job's secret); ``mark``
    tells it from the same job id of the other tests' clusters."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if (env.get("SLURM_JOB_ID") == job_id and env.get("WSTEST_MARK") == mark
                and "WEBSOCKETSERVER_JOB_SECRET" in env):
            found.append(proc)
    assert found, f"no launcher of job {job_id}"
    return found


def job_port(slurm: SlurmCluster, job_id: str) -> int:
    """The port the job reported, once the server accepted its report: the launcher
    says so in the job's output."""
    output = slurm.directory / "jobs" / f"{job_id}.out"

    def reported() -> str | None:
        text = output.read_text() if output.exists() else ""
        return next((line for line in text.splitlines() if "reported port" in line), None)
    return int(wait_until(reported, 20).split("reported port ")[1].split()[0])


def test_release_of_a_queued_reservation_cancels_its_job(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    server, mark = start(start_server, slurm, write_config(tmp_path / "svc", slurm))
    holder, waiting = reserve(server), reserve(server)
    job_id = wait_state(server, waiting, "queued")["job_id"]
    assert server.get_json(f"/v1/release/{waiting}")[0] == 200
    wait_until(lambda: job_id not in slurm.run("squeue", "-h", "-o", "%i"), 15)
    ended = json.loads(server.get("/v1/status")[2])
    assert all(i["token"] != waiting for s in ended for i in s["instances"])
    assert server.get_json(f"/v1/release/{holder}")[0] == 200
    wait_no_job_process(server, mark)


def test_jobs_run_through_the_user_prefix_and_never_for_anonymous_callers(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """``"user_prefix"`` runs Slurm's commands as the reserving user (here ``env``
    stands in for ``sudo -n -u {user}``, whose effect the job shows); a caller the
    server cannot name is refused (403), at reserve and at connect."""
    config = write_config(tmp_path / "svc", slurm, user_prefix=("env", "WSTEST_USER={user}"))
    data = json.loads(config.read_text())
    data["connect"] = {**data["viz"], "start": "connect"}
    config.write_text(json.dumps(data))
    server, mark = start(start_server, slurm, config, "--trusted_proxy", "127.0.0.1")
    status, body = server.get_json("/v1/reserve/viz")
    assert (status, body) == (403, {"error": "service viz runs jobs as the reserving user; "
                                             "the caller is anonymous"})
    status, body = server.get_json("/v1/reserve/viz", headers={"X-Remote-User": "alice"})
    assert status == 200, body
    job_id = wait_state(server, body["token"], "starting")["job_id"]
    launcher = marked_launchers(job_id, mark)[0]
    assert launcher.environ()["WSTEST_USER"] == "alice"
    assert launcher.username() == "root"  # env switches no user; sudo -u would
    status, body = server.get_json("/v1/reserve/connect")  # no user yet: reserving is fine
    assert status == 200

    async def connect_anonymously() -> int:
        try:
            async with websockets.connect(server.ws_url(token=body["token"]),
                                          open_timeout=30):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
    assert asyncio.run(connect_anonymously()) == 403


def test_in_a_cluster_any_instance_takes_the_report_shows_the_job_and_releases_it(
        start_server: StartServer, slurm: SlurmCluster, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """Instance a submits the job; its report goes to b (a's --job_report_url names b's
    HTTP port, as a load balancer could); b checks it against the job's record in the
    shared reservation and logs the job's output, a picks up the port; a websocket to
    b is forwarded to a and echoes; a release through b cancels the job."""
    config = write_config(tmp_path / "svc", slurm)
    b_http = free_port()
    common = ("--redis", redis_server.url, "--cluster_secret", "s3cret",
              "--relay_processes", "0")
    a, mark = start(start_server, slurm, config, *common, "--node_name", "a",
                    "--job_report_url", f"http://127.0.0.1:{b_http}/v1/job_report")
    b, _ = start(start_server, slurm, config, *common, "--node_name", "b",
                 http_port=b_http)
    token = reserve(a)
    seen_by_b = wait_state(b, token, "starting")
    # a writes the state (queued -> starting) and then the job's record (its node): b
    # may read the reservation in between
    seen_by_b = wait_until(lambda: (seen := instance(b, token))["job_node"] and seen)
    assert seen_by_b["node"] == "a" and seen_by_b["job_node"] == "node1"
    assert seen_by_b["state"] == "starting"
    wait_until(lambda: "viz[0]: echo server on port" in b.log(), 20)  # the job's output
    assert asyncio.run(echo_and_release(b, token, b"through b")) == (b"through b", 200)
    assert "refused a report" not in a.log() + b.log()
    wait_until(lambda: seen_by_b["job_id"] not in slurm.run("squeue", "-h", "-o", "%i"), 15)
    wait_no_job_process(a, mark)


def test_in_a_cluster_a_dead_instances_job_is_adopted_not_cancelled(
        start_server: StartServer, slurm: SlurmCluster, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """SIGKILL of instance a (and its supervisor): its job is the cluster's, so it is
    not cancelled; b adopts the session (its slot, its job) and the page's websocket
    reaches the job through b; a release through b ends it."""
    config = write_config(tmp_path / "svc", slurm)
    b_http = free_port()
    common = ("--redis", redis_server.url, "--cluster_secret", "s3cret",
              "--relay_processes", "0", "--heartbeat_ttl", "1",
              "--job_report_url", f"http://127.0.0.1:{b_http}/v1/job_report")
    a, mark = start(start_server, slurm, config, *common, "--node_name", "a")
    b, _ = start(start_server, slurm, config, *common, "--node_name", "b", http_port=b_http)
    token = reserve(a)
    job_id = wait_state(a, token, "starting")["job_id"]
    wait_until(lambda: "viz[0]: echo server on port" in b.log(), 20)  # it reported
    os.kill(a.serving_pid(), signal.SIGSTOP)
    os.kill(a.pid, signal.SIGKILL)  # the supervisor, then the server
    os.kill(a.serving_pid(), signal.SIGKILL)
    adopted = wait_until(lambda: (found := instance(b, token))["node"] == "b" and found, 15)
    assert (adopted["job_id"], adopted["state"]) == (job_id, "starting")
    assert job_id in slurm.run("squeue", "-h", "-o", "%i").split()
    assert asyncio.run(echo_and_release(b, token, b"adopted")) == (b"adopted", 200)
    assert f"adopted job {job_id}" in b.log()
    wait_until(lambda: job_id not in slurm.run("squeue", "-h", "-o", "%i").split(), 15)
    wait_no_job_process(a, mark)


def test_a_slurm_service_script_and_an_expected_start(
        start_server: StartServer, slurm: SlurmCluster, tmp_path: Path) -> None:
    """A script subclassing SlurmService (like CommandService) instead of a "command";
    a job waiting for the node's CPUs shows Slurm's expected start (when the first
    job's --time is up)."""
    folder = tmp_path / "svc"
    write_config(folder, slurm)  # its echo.py
    jobs = slurm.directory / "jobs"
    (folder / "viz.py").write_text(f"""
from websocketserver import SlurmService

class Viz(SlurmService):
    start_mode = "reserve"

    def command(self, index, options):
        return ["python3", "echo.py", "{{port}}"]

    def sbatch(self, index, options):
        return ["--cpus-per-task=8", "--time=00:10:00", "--output={jobs}/%j.out"]
""")
    config = folder / "scripted.json"
    config.write_text(json.dumps({"viz": {"script": "viz.py", "count": 2}}))
    server, mark = start(start_server, slurm, config)
    first, second = reserve(server), reserve(server)
    wait_state(server, first, "starting")
    waiting = wait_until(lambda: (found := instance(server, second))["expected_start"]
                         and found["queue_reason"] == "Resources" and found, 15)
    assert waiting["state"] == "queued"
    expected = datetime.fromisoformat(waiting["expected_start"]) - datetime.now().astimezone()
    assert timedelta(minutes=9) < expected <= timedelta(minutes=10, seconds=5), expected
    assert asyncio.run(echo(server, first, b"scripted")) == b"scripted"  # the job's cwd:
    assert server.get_json(f"/v1/release/{second}")[0] == 200  # the script's folder
    wait_no_job_process(server, mark)
