"""Run the Autobahn TestSuite cases (with kosoku) against a websocket port, and judge them
as a websocket-to-TCP proxy in front of an echo backend can be judged.

The Autobahn echo cases expect a websocket *echo server*: each message comes back as
one message of the same type. A proxy only carries bytes to a TCP backend and back,
so its echo comes back as binary frames, cut where the backend's reads cut it, and an
empty message carries no bytes at all. :func:`judge` therefore accepts kosoku's own
verdict, or else (for the cases the caller lists) compares what a byte stream keeps:
the bytes of all messages in order, and the ping/pong frames in order.

kosoku's report files cut payloads to 64 characters, too short to compare echoes, so
:func:`main` runs kosoku through its Python API in a subprocess of its own and writes,
beside kosoku's usual report (``index.html``, per-case JSON and HTML), ``cases.json``
with every payload in full (hex). The test and ``bench/autobahn.py`` run it as::

    python tests/e2e/autobahn_support.py HOST:PORT OUTDIR [--parallelism N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CATEGORIES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*")
"""Framing, pings, reserved bits and opcodes, fragments, UTF-8, closing, auto-fragments:
everything but limits/performance (9), compression (12, 13) and 8 (no cases)."""
SLOW = ("10.*",)
"""Run beside the others rather than after them: 10.1.1 waits 10 s for its echo."""
PARALLELISM = 64
"""Cases at once; the run then lasts little more than its slowest case (10 s)."""
ACCEPTED = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
"""kosoku verdicts of a conforming peer (NON-STRICT: a SHOULD not followed)."""
ACCEPTED_CLOSE = frozenset({"OK", "INFORMATIONAL"})

Case = dict[str, Any]
"""One entry of ``cases.json``: kosoku's result, payloads as hex."""


# -- judging -----------------------------------------------------------------------------


def category(case_id: str) -> str:
    return case_id.split(".", 1)[0]


def case_key(case_id: str) -> tuple[int, ...]:
    """Sort key: case ids in suite order (1.1.10 after 1.1.9)."""
    return tuple(int(part) for part in case_id.split("."))


def kosoku_accepts(case: Case) -> bool:
    return case["behavior"] in ACCEPTED and case["behaviorClose"] in ACCEPTED_CLOSE


def byte_stream(events: Iterable[Sequence[Any]]) -> tuple[bytes, list[tuple[str, str]]]:
    """What a byte-stream proxy keeps of a list of events: the bytes of all messages in
    order, and the pings/pongs in order (they are the server's own frames)."""
    data = bytearray()
    controls = []
    for event in events:
        if event[0] == "message":
            data += bytes.fromhex(event[1])
        elif event[0] in ("ping", "pong"):
            controls.append((event[0], event[1]))
    return bytes(data), controls


def _close_ok(case: Case) -> bool:
    """The closing handshake was right, or it is kosoku's to start and never started.

    kosoku sends its close only once what came back equals an expected outcome, which
    an echo that comes back binary (or, for an empty message, not at all) never does;
    it then waits for its timer and drops the connection. Acceptable when the server
    had sent no close frame of its own meanwhile.
    """
    if case["behaviorClose"] in ACCEPTED_CLOSE:
        return True
    return bool(case["expectedClose"].get("closedByMe") and not case["closedByMe"]
                and case["droppedByMe"] and case["remoteCloseCode"] is None)


def judge(case: Case, *, as_proxy: bool, streamed: bool = False) -> str | None:
    """Why ``case`` failed, or ``None`` if it passed.

    ``as_proxy``: judge as a byte stream when kosoku's verdict is not accepted.
    ``streamed``: the bytes received may instead be the data sent in the frames before
    the one that failed the connection (fragments are relayed as they arrive).
    """
    if kosoku_accepts(case):
        return None
    verdict = (f"kosoku: {case['behavior']}/{case['behaviorClose']}: {case['result']}"
               f" / {case['resultClose']} (close code {case['remoteCloseCode']})")
    if not as_proxy:
        return verdict
    if not _close_ok(case):
        return f"{verdict}; close: {case['resultClose']}"
    data, controls = byte_stream(case["received"])
    outcomes = [byte_stream(events) for events in case["expected"].values()]
    if any(outcome == (data, controls) for outcome in outcomes):
        return None
    if streamed and case["sent"] is not None and case["behaviorClose"] in ACCEPTED_CLOSE:
        sent = [bytes.fromhex(payload) for payload in case["sent"]]
        prefixes = {b"".join(sent[:count]) for count in range(len(sent))}
        if data in prefixes and any(controls == expected for _, expected in outcomes):
            return None
    return (f"{verdict}; as a byte stream: received {data[:40]!r} ({len(data)} bytes), "
            f"{controls}; expected one of "
            f"{[(d[:40], len(d), c) for d, c in outcomes]}")


def tally(cases: Mapping[str, Case], proxy_cases: Mapping[str, str],
          streamed: Iterable[str] = ()) -> dict[str, tuple[int, int, int]]:
    """Per category: (right per kosoku, right as a proxy, total)."""
    streamed = set(streamed)
    counts: dict[str, list[int]] = {}
    for case_id, case in cases.items():
        row = counts.setdefault(category(case_id), [0, 0, 0])
        row[0] += kosoku_accepts(case)
        row[1] += judge(case, as_proxy=case_id in proxy_cases,
                        streamed=case_id in streamed) is None
        row[2] += 1
    return {name: (row[0], row[1], row[2])
            for name, row in sorted(counts.items(), key=lambda item: int(item[0]))}


# -- running kosoku ------------------------------------------------------------------------


def run_cases(address: str, outdir: Path, *, timeout: float,
              parallelism: int = PARALLELISM) -> dict[str, Case]:
    """Run the cases against ``address`` in a subprocess; the cases by id."""
    outdir.mkdir(parents=True, exist_ok=True)
    log = outdir / "kosoku.log"
    with open(log, "wb") as out:
        done = subprocess.run([sys.executable, __file__, address, str(outdir),
                               "--parallelism", str(parallelism)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"kosoku run failed ({done.returncode}): {log.read_text()[-3000:]}")
    cases: list[Case] = json.loads((outdir / "cases.json").read_text())
    return {case["id"]: case for case in cases}


def _payload(value: str | bytes, utf8: bool) -> str:
    """A kosoku payload as hex: text as UTF-8, binary strings as latin-1 (one char a
    byte, as kosoku keeps them)."""
    if isinstance(value, bytes):
        return value.hex()
    if not utf8:
        try:
            return value.encode("latin-1").hex()
        except UnicodeEncodeError:
            pass
    return value.encode("utf-8").hex()


def _event(event: Sequence[Any]) -> list[Any]:
    kind = event[0]
    if kind == "message":
        return [kind, _payload(event[1], utf8=not event[2]), bool(event[2])]
    if kind in ("ping", "pong"):
        return [kind, _payload(event[1], utf8=False)]
    return [kind, *(str(part) for part in event[1:])]


def _sent_data(wirelog: Sequence[Sequence[Any]]) -> list[str] | None:
    """Payloads (hex) of the data frames kosoku sent; ``None`` if the log cut one."""
    sent = []
    for entry in wirelog:
        if entry[0] != "TF" or entry[2] not in (0, 1, 2):
            continue
        length, shown = entry[1]
        if shown.endswith(" ..."):  # cut to 64 characters
            return None
        data = bytes.fromhex(shown[2:]) if shown.startswith("0x") else shown.encode("utf-8")
        if len(data) != length:
            return None
        sent.append(data.hex())
    return sent


def _case(result: Any) -> Case:
    return {
        "id": result.case_id,
        "description": result.description,
        "behavior": result.behavior.value,
        "behaviorClose": result.behavior_close.value,
        "result": result.result,
        "resultClose": result.result_close,
        "expected": {verdict: [_event(event) for event in events]
                     for verdict, events in (result.expected or {}).items()},
        "expectedClose": result.expected_close or {},
        "received": [_event(event) for event in result.received or []],
        "sent": _sent_data(result.wirelog or []),
        "remoteCloseCode": result.remote_close_code,
        "remoteCloseReason": result.remote_close_reason,
        "closedByMe": result.closed_by_me,
        "droppedByMe": result.dropped_by_me,
        "failedByMe": result.failed_by_me,
        "wasClean": result.was_clean,
    }


async def _run(address: str, parallelism: int) -> list[Any]:
    from kosoku import FailureError, run_fuzzingclient

    async def part(include: list[str]) -> list[Any]:
        try:
            return list(await run_fuzzingclient(address, include, None,
                                                concurrency=parallelism))
        except FailureError as failure:  # some case did not pass: the results are there
            return list(failure.results)

    rest = [pattern for pattern in CATEGORIES if pattern not in SLOW]
    parts = await asyncio.gather(part(list(SLOW)), part(rest))
    return [result for results in parts for result in results]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of the websocket server")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--parallelism", type=int, default=PARALLELISM)
    args = parser.parse_args(argv)
    from kosoku._report import write_reports

    results = asyncio.run(_run(args.address, args.parallelism))
    args.outdir.mkdir(parents=True, exist_ok=True)
    write_reports(results, str(args.outdir))
    cases = sorted((_case(result) for result in results), key=lambda c: case_key(c["id"]))
    (args.outdir / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"{len(cases)} cases, report in {args.outdir}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
