"""Protocol conformance: the Autobahn TestSuite cases, run by kosoku, against the server.

The server runs on its real command line in basic mode in front of the TCP echo
backend, and kosoku (a native port of Autobahn's fuzzing client, driving Autobahn's
own case files) runs categories 1-7 and 10 against it: framing, pings, reserved bits
and opcodes, fragmentation, UTF-8, the closing handshake, auto-fragmentation. Every
case whose outcome is the server's own (a close, a pong, a failed connection) must be
right by kosoku's verdict. The echo cases expect an echo *server*; a proxy in front of
a TCP echo keeps only the bytes, in order, so the cases in :data:`PROXY_INHERENT` are
judged on that (``autobahn_support.judge``). Afterwards the server must still tunnel
and serve, with no traceback in its log.

kosoku's report (``index.html``) is left in the test's ``tmp_path``/autobahn.
``bench/autobahn.py`` runs the same cases against websockify for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from websockets.sync.client import connect

from e2e.autobahn_support import CATEGORIES, Case, case_key, category, judge, run_cases
from support import EchoBackend, ServerProcess

RUN_TIMEOUT = 90.0
"""Seconds for the whole kosoku run (about 11 s: its slowest cases wait 10 s)."""

KNOWN_DEFECTS: dict[str, str] = {}
"""Real defects, failing today. The test fails when one of them passes: remove it then."""


def _ids(prefix: str, numbers: Iterable[int]) -> list[str]:
    return [f"{prefix}.{number}" for number in numbers]


TEXT = ("the echo of a text message comes back binary: the proxy relays bytes to the "
        "backend and sends what the backend answers as binary frames")
FRAGMENTS = ("a fragmented message is relayed fragment by fragment, never reassembled: "
             "its echo comes back binary, as one message or several, where the backend's "
             "reads cut it")
EMPTY = "an empty message carries no bytes: nothing reaches the backend, nothing comes back"
STREAMED = ("the valid first fragment of a text message reaches the backend, and its echo "
            "the browser, before the invalid fragment after it fails the connection "
            "(1007): fragments are relayed as they arrive, never buffered")
RACE = ("a text message, then a frame the server must fail: kosoku accepts the echo "
        "(OK) or none (NON-STRICT, what happens today, both frames arriving in one read), "
        "but an echo that comes back binary before the failure fails its opcode check")

PROXY_INHERENT: dict[str, str] = {
    **dict.fromkeys(["1.1.1", "1.2.1", "6.1.1", "6.1.2"], EMPTY),
    **dict.fromkeys(_ids("1.1", range(2, 9)), TEXT),
    **dict.fromkeys(["6.2.1", *_ids("6.5", range(1, 6)), *_ids("6.6", (2, 5, 7, 9, 11)),
                     *_ids("6.7", range(1, 5)), *_ids("6.9", range(1, 5)),
                     *_ids("6.11", range(1, 5)), *_ids("6.22", range(1, 35)),
                     *_ids("6.23", range(1, 8)), "7.1.1"], TEXT),
    **dict.fromkeys([*_ids("5", (3, 4, 5, 6, 7, 8, 19, 20)), "6.1.3",
                     *_ids("6.2", (2, 3, 4)), "10.1.1"], FRAGMENTS),
    **dict.fromkeys(["6.4.1", "6.4.2"], STREAMED),
    **dict.fromkeys([*_ids("3", (2, 3, 4)), *_ids("4.1", (3, 4, 5)), *_ids("4.2", (3, 4, 5)),
                     "5.15"], RACE),
}
"""Cases kosoku cannot (or, for RACE, not reliably) pass for a ws-to-TCP proxy, with why;
each is judged on what a byte stream keeps instead. Any other case must pass by
kosoku's own verdict (OK, NON-STRICT or INFORMATIONAL)."""


def failures(cases: dict[str, Case]) -> dict[str, str]:
    """Each case that failed, with why (known defects included)."""
    found = {}
    for case_id, case in cases.items():
        reason = judge(case, as_proxy=case_id in PROXY_INHERENT,
                       streamed=PROXY_INHERENT.get(case_id) == STREAMED)
        if reason is not None:
            found[case_id] = reason
    return found


def assert_serving(server: ServerProcess) -> None:
    """The server is alive, a fresh tunnel echoes, the API answers, no traceback."""
    assert server.proc.poll() is None, f"server exited with {server.proc.returncode}"
    with connect(server.ws_url(), open_timeout=5, close_timeout=5) as ws:
        ws.send(b"still there?")
        assert ws.recv(timeout=5) == b"still there?"
    status, _ = server.get_json("/v1/status")
    assert status == 200
    log = server.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]


def test_autobahn_cases(start_server: Callable[..., ServerProcess], echo: EchoBackend,
                        tmp_path: Path) -> None:
    server = start_server("--client_port", str(echo.port))
    cases = run_cases(f"127.0.0.1:{server.ws_port}", tmp_path / "autobahn",
                      timeout=RUN_TIMEOUT)

    ran = {category(case_id) for case_id in cases}
    assert ran == {pattern.split(".")[0] for pattern in CATEGORIES}, sorted(ran)
    assert not set(PROXY_INHERENT) - set(cases), "listed cases that did not run"
    assert not set(KNOWN_DEFECTS) - set(cases), "listed defects that did not run"
    failed = failures(cases)
    unexpected = {case_id: reason for case_id, reason in failed.items()
                  if case_id not in KNOWN_DEFECTS}
    fixed = sorted(set(KNOWN_DEFECTS) - set(failed), key=case_key)
    assert not unexpected, "\n".join(f"{case_id}: {cases[case_id]['description'][:80]}: "
                                     f"{reason}" for case_id, reason in
                                     sorted(unexpected.items(), key=lambda i: case_key(i[0])))
    assert not fixed, f"known defects pass now, remove them from KNOWN_DEFECTS: {fixed}"
    assert_serving(server)
