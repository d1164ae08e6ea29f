"""Profile our server's hot path with py-spy under the benchmark's loads.

Usage: ``python bench/profile_server.py [--seconds 10] [--loads down,up,tunnels]``
(needs ``pip install py-spy``).  For each load, py-spy samples the server
process tree while the picows client keeps the load running; the collapsed
stacks are saved in ``bench/results/profile-*/LOAD.txt`` (open them in
speedscope or flamegraph.pl) and the hottest functions are printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from common import BenchError, raise_nofile_limit
from servers import (
    BENCH_DIR,
    OURS,
    PYTHON,
    Processes,
    Worker,
    make_tls,
    start_backend,
    start_server,
)

PY_SPY = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
KiB = 1024
MiB = 1024 * KiB
TOP = 25


def loads(client: Worker, url: str, cafile: str | None) -> dict[str, Callable[[], object]]:
    """One unit of each load; the profiler repeats it until its time is up."""

    def transfer(op: str, chunk: int) -> Callable[[], object]:
        total = 256 * MiB if chunk > KiB else 32 * MiB
        return lambda: client.request(
            op, url=url, total=total, chunk=chunk, timeout=60, cafile=cafile
        )

    return {
        "down": transfer("down", 64 * KiB),
        "up": transfer("up", 64 * KiB),
        "tunnels": lambda: client.request(
            "tunnels", url=url, parallel=64, duration=2.0, cafile=cafile
        ),
        "down-1k": transfer("down", KiB),
        "up-1k": transfer("up", KiB),
        "up-1m": transfer("up", MiB),
    }


def summarize(collapsed: Path, top: int = TOP) -> str:
    """Top functions by self and by inclusive share of the samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not frame.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"-- top {top} by {title} time")
        lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines)


def profile(
    procs: Processes,
    server_pid: int,
    name: str,
    unit: Callable[[], object],
    seconds: float,
    out_dir: Path,
    native: bool,
) -> str:
    """Sample the server tree with py-spy while ``unit`` runs back to back."""
    output = out_dir / f"{name}.txt"
    spy = procs.spawn(
        f"py-spy-{name}",
        [
            str(PY_SPY),
            "record",
            "--pid",
            str(server_pid),
            "--subprocesses",
            "--rate",
            "250",
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--output",
            str(output),
            *(["--native"] if native else []),
        ],
    )
    time.sleep(0.5)  # let py-spy attach
    runs = 0
    while spy.poll() is None:
        unit()
        runs += 1
    procs.stop(spy)
    if not output.exists():
        raise BenchError(f"py-spy wrote nothing; see {out_dir}/py-spy-{name}.log")
    return f"== {name}: {runs} runs\n{summarize(output)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time per load")
    parser.add_argument("--loads", default="down,up,tunnels", help="also: down-1k, up-1k, up-1m")
    parser.add_argument("--native", action="store_true", help="include C frames (slower)")
    parser.add_argument("--wss", action="store_true", help="profile over TLS")
    args = parser.parse_args(argv)
    if PY_SPY is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 1
    raise_nofile_limit()
    out_dir = BENCH_DIR / "results" / f"profile-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True)
    procs = Processes(out_dir)
    try:
        _backend, backend_port = start_backend(procs)
        tls = make_tls(out_dir) if args.wss else None
        server = start_server(procs, OURS, backend_port, tls)
        client = Worker(procs, "client", [PYTHON, str(BENCH_DIR / "client.py")])
        units = loads(client, server.url, str(tls.ca) if tls else None)
        for name in args.loads.split(","):
            report = profile(
                procs, server.proc.pid, name, units[name], args.seconds, out_dir, args.native
            )
            (out_dir / f"{name}-summary.txt").write_text(report + "\n")
            print(report + "\n", flush=True)
    except BenchError as exc:
        print(f"profiling failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.close()
    print(f"collapsed stacks and summaries in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
