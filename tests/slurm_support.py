"""A real single-node Slurm for the tests: ``munged``, ``slurmctld`` and ``slurmd``.

Installed by ``scripts/install-test-deps`` (Debian ``slurm-wlm`` and ``munge``, their
system services kept off). The fixture ``slurm`` (module-scoped: tests that share it
must leave it as they found it, every job cancelled) starts the three daemons as root
in the foreground, each with its state, spool, socket and log in one temporary folder,
on free 127.0.0.1 ports:

* ``munged`` with a key of its own (the system's ``/etc/munge`` is never read);
* ``slurmctld`` and ``slurmd`` with a ``slurm.conf`` whose one node ``node1`` has
  ``NodeAddr=127.0.0.1`` and ``CPUs=8`` (``SlurmdParameters=config_overrides``: more
  concurrent jobs than this machine's cores), one licence ``ensight`` (a second job
  asking for it waits with reason ``Licenses``), ``proctrack/linuxproc`` and
  ``task/none`` (no cgroups needed), ``KillWait=1`` and no accounting.

The commands (``sbatch``, ``squeue``...) find that cluster through ``SLURM_CONF`` in
:attr:`SlurmCluster.env`. Not root, the tests skip (the daemons run as root); root and
a binary missing, they fail (``cluster_support.require``). A cluster that does not
come up fails with the tails of the daemons' logs. Every daemon started is stopped,
and any process left of its jobs killed, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cluster_support import require

from support import free_port

NODE = "node1"
LICENSE = "ensight"
STARTUP_TIMEOUT = 30.0
"""Seconds for the node to be idle after the daemons start (about 1 s here)."""


class SlurmCluster:
    """The running cluster: :attr:`env` for Slurm's commands, :attr:`conf` its file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        if os.geteuid() != 0:  # SlurmUser=root: slurmd runs each job as its user
            pytest.skip("the Slurm tests run its daemons as root")
        self.binaries = {name: require(name) for name in
                         ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue",
                          "scontrol", "scancel", "sinfo")}
        self.conf = directory / "slurm.conf"
        self.munge_socket = directory / "run" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    # -- start-up ---------------------------------------------------------------

    def start(self) -> None:
        """Start munged, slurmctld and slurmd; wait until the node is idle."""
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [self.binaries["slurmctld"], "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [self.binaries["slurmd"], "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait_idle()

    def _start_munge(self) -> None:
        # munged's checks: its key private to its owner, its socket's folder (and every
        # folder above) searchable by all, since any user's commands connect to it
        key_dir, run = self.directory / "munge", self.directory / "run"
        key_dir.mkdir(mode=0o700)
        run.mkdir(mode=0o755)
        self.directory.chmod(0o755)
        key = key_dir / "munge.key"
        subprocess.run([self.binaries["mungekey"], "--create", f"--keyfile={key}"],
                       check=True, capture_output=True, timeout=10)
        self._spawn("munged", [self.binaries["munged"], "--foreground",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={run / 'munged.pid'}",
                               f"--log-file={run / 'munged.log'}",
                               f"--seed-file={key_dir / 'munged.seed'}"])
        self._until(self.munge_socket.exists, "munged's socket")

    def _write_conf(self) -> None:
        d = self.directory
        for sub in ("state", "spool", "jobs"):
            (d / sub).mkdir(mode=0o755)
        (d / "plugstack.conf").write_text("")  # not the system's /etc/slurm one
        lines = {
            "ClusterName": "wstest",
            "SlurmctldHost": "localhost(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": d / "state",
            "SlurmdSpoolDir": d / "spool",
            "SlurmctldPidFile": d / "run" / "slurmctld.pid",
            "SlurmdPidFile": d / "run" / "slurmd.pid",
            "SlurmctldLogFile": d / "slurmctld.log",
            "SlurmdLogFile": d / "slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "PlugStackConfig": d / "plugstack.conf",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "MailProg": "/bin/true",  # the default /usr/bin/mail is not installed
            "SwitchType": "switch/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",  # jobs share the node, one CPU each
            "SchedulerType": "sched/backfill",
            # backfill every second (not 30 s): a pending job gets its expected start
            # at once; a submitted job is scheduled at once, not up to 3 s later (the
            # default batch_sched_delay, for sites that submit thousands a second)
            "SchedulerParameters": "bf_interval=1,batch_sched_delay=0",
            "Licenses": f"{LICENSE}:1",
            "KillWait": 1,
            "ReturnToService": 2,
            "SlurmdParameters": "config_overrides",
            "MinJobAge": 300,  # an ended job stays visible to squeue for 5 minutes
            "InactiveLimit": 0,
            "SlurmdTimeout": 30,
        }
        text = "".join(f"{key}={value}\n" for key, value in lines.items())
        text += (f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=8 "
                 "State=UNKNOWN\n"
                 f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP\n")
        self.conf.write_text(text)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.directory / f"{name}.out"
        self.logs[name] = log
        with log.open("wb") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)

    def _until(self, predicate: Callable[[], object], what: str,
               timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll ``predicate`` until true; fail with the logs' tails if a daemon exits or
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not predicate():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited with {proc.returncode} while waiting for "
                                f"{what}\n{self.log_tails()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout} s\n{self.log_tails()}")
            time.sleep(0.05)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False)
            return out.strip() == "idle"
        self._until(idle, f"idle node {NODE} (sinfo)")

    # -- use --------------------------------------------------------------------

    def run(self, tool: str, *args: str, check: bool = True,
            env: dict[str, str] | None = None) -> str:
        """Run one of Slurm's commands against this cluster (``env`` added); its stdout."""
        done = subprocess.run([self.binaries[tool], *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=20)
        if check and done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def cancel_all(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Cancel every job and wait until none is left (tests sharing the cluster)."""
        self.run("scancel", "--user=root", check=False)
        self._until(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).strip(),
                    "empty queue", timeout)

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for path in [*self.logs.values(), self.directory / "slurmctld.log",
                     self.directory / "slurmd.log"]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # -- shutdown ---------------------------------------------------------------

    def close(self) -> None:
        """Cancel the jobs, stop every daemon started, then kill what is left of them.

        Jobs are cancelled first, while the daemons can still end them as Slurm does.
        What could be left after that is a job's: slurmstepd and the job's processes
        are in sessions of their own and outlive slurmd (:meth:`leftovers`).
        """
        if all(self.procs.get(name) is not None and self.procs[name].poll() is None
               for name in ("munged", "slurmctld", "slurmd")):
            with contextlib.suppress(Exception):
                self.cancel_all(timeout=10)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for left in self.leftovers():
            with contextlib.suppress(psutil.Error):
                left.kill()

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this cluster (but this one): daemons, slurmstepd, jobs.

        The daemons and every job (sbatch passes on its environment) have this
        cluster's ``SLURM_CONF`` in their environment; slurmstepd clears its own, but
        keeps slurmd's log file open.
        """
        found = []
        mine = str(self.directory) + os.sep
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if proc.environ().get("SLURM_CONF") == str(self.conf) or any(
                        f.path.startswith(mine) for f in proc.open_files()):
                    found.append(proc)
        return found


def marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``WSTEST_MARK=mark`` (a test job's)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("WSTEST_MARK") == mark and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def wait_gone(mark: str, timeout: float = 5.0) -> None:
    """Wait until no process marked ``mark`` is left (a job's, after its end)."""
    deadline = time.monotonic() + timeout
    while left := marked(mark):
        assert time.monotonic() < deadline, f"processes of the job left: {left}"
        time.sleep(0.05)


@contextlib.contextmanager
def started_cluster() -> Iterator[SlurmCluster]:
    """A started cluster in a new temporary folder; stopped, and the folder removed."""
    # not tmp_path: munged wants every folder above its socket searchable by all, and
    # pytest's base folder is private to its user
    directory = Path(tempfile.mkdtemp(prefix="wstest-slurm-"))
    try:
        cluster = SlurmCluster(directory)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    """A started single-node cluster, stopped at the module's end."""
    with started_cluster() as cluster:
        yield cluster
