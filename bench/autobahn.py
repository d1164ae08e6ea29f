"""Autobahn TestSuite conformance of websocketserver and websockify, side by side.

Usage: ``python bench/autobahn.py [--servers ours,websockify] [--checkout DIR]``.

Starts the TCP echo backend (``examples/echo_server.py``) and each server in basic mode
in front of it, on free 127.0.0.1 ports; runs kosoku over Autobahn categories 1-7 and
10 against each (``tests/e2e/autobahn_support.py``, as ``tests/e2e/test_autobahn.py``
does); prints one Markdown table: per category, the cases right by kosoku's own
verdict and right as a ws-to-TCP proxy (the cases a proxy cannot pass judged on the
bytes it keeps, see ``PROXY_INHERENT`` in the test), out of the total; then the cases
still wrong. kosoku's reports go to ``bench/results/autobahn-<date-time>/<server>/``.
Needs the ``test`` and ``bench`` extras (kosoku, websockify). ``--checkout`` runs our
server from another source tree (its ``websocketserver.py``), e.g. a patched copy.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

from common import HOST, BenchError, free_port
from servers import BENCH_DIR, PYTHON, REPO, WEBSOCKIFY, Processes, wait_listening

sys.path.insert(0, str(REPO / "tests"))
from e2e.autobahn_support import (  # noqa: E402 - tests/ is put on the path first
    Case,
    case_key,
    judge,
    run_cases,
    tally,
)
from e2e.test_autobahn import PROXY_INHERENT, STREAMED  # noqa: E402

NAMES = {"1": "framing", "2": "pings/pongs", "3": "reserved bits", "4": "opcodes",
         "5": "fragmentation", "6": "UTF-8", "7": "close handling",
         "10": "auto-fragmentation"}
RUN_TIMEOUT = 300.0
SERVERS = ("ours", "websockify")


def server_argv(name: str, ws_port: int, backend_port: int, checkout: Path) -> list[str]:
    if name == "websockify":
        return WEBSOCKIFY.argv(ws_port, backend_port, None)
    return [PYTHON, str(checkout / "websocketserver.py"), "--listen_address", HOST,
            "--client_hostname", HOST, "--client_port", str(backend_port), str(ws_port)]


def run_server(procs: Processes, name: str, backend_port: int, checkout: Path,
               out_dir: Path) -> dict[str, Case]:
    """Start one server, run the cases against it, stop it; the cases by id."""
    port = free_port()
    proc = procs.spawn(name, server_argv(name, port, backend_port, checkout))
    try:
        wait_listening(proc, port, name, procs.log_dir / f"{name}.log")
        print(f"{name}: running the cases...", file=sys.stderr)
        return run_cases(f"{HOST}:{port}", out_dir / name, timeout=RUN_TIMEOUT)
    finally:
        procs.stop(proc)


def render(results: dict[str, dict[str, Case]]) -> str:
    """The Markdown table, then the cases wrong as a proxy."""
    streamed = [case_id for case_id, why in PROXY_INHERENT.items() if why == STREAMED]
    tallies = {name: tally(cases, PROXY_INHERENT, streamed) for name, cases in results.items()}
    header = "| category |" + "".join(f" {name}: kosoku | {name}: as a proxy |"
                                     for name in results)
    lines = [header, "|---|" + "---:|---:|" * len(results)]
    for number in next(iter(tallies.values())):
        lines.append(f"| {number} {NAMES.get(number, '')} |" + "".join(
            f" {k}/{t} | {p}/{t} |" for k, p, t in (counts[number] for counts in tallies.values())))
    sums = [[sum(column) for column in zip(*counts.values(), strict=True)]
            for counts in tallies.values()]
    lines.append("| **all** |" + "".join(f" **{k}/{t}** | **{p}/{t}** |" for k, p, t in sums))
    for name, cases in results.items():
        wrong = []
        for case_id in sorted(cases, key=case_key):
            reason = judge(cases[case_id], as_proxy=case_id in PROXY_INHERENT,
                           streamed=PROXY_INHERENT.get(case_id) == STREAMED)
            if reason is not None:
                wrong.append(f"* {case_id} ({cases[case_id]['description'][:60]}): "
                             f"{reason[:300]}")
        lines += ["", f"{name}, wrong as a proxy: {len(wrong)}", *wrong]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated: ours,websockify (default: both)")
    parser.add_argument("--checkout", type=Path, default=REPO,
                        help="source tree to run our server from (default: this one)")
    args = parser.parse_args(argv)
    names = [name for name in args.servers.split(",") if name]
    if set(names) - set(SERVERS):
        parser.error(f"--servers: unknown {', '.join(sorted(set(names) - set(SERVERS)))}")
    now = datetime.datetime.now(datetime.UTC)
    out_dir = BENCH_DIR / "results" / f"autobahn-{now:%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True)
    procs = Processes(out_dir)
    try:
        backend_port = free_port()
        backend = procs.spawn("backend", [PYTHON, str(REPO / "examples" / "echo_server.py"),
                                          str(backend_port)])
        wait_listening(backend, backend_port, "backend", out_dir / "backend.log")
        results = {name: run_server(procs, name, backend_port, args.checkout, out_dir)
                   for name in names}
    except (BenchError, RuntimeError) as exc:
        print(f"autobahn run failed: {exc}\n(logs in {out_dir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        procs.close()
    table = render(results)
    print(f"Autobahn cases 1-7 and 10 by kosoku, {now:%Y-%m-%d %H:%M} UTC, basic mode in front "
          f"of a TCP echo backend\n\n{table}")
    (out_dir / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
