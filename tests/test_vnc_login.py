"""core/vnc_login.py: the proxy logs in to a VNC server for the browser, fed bytes.

Each version's conversation, the server's part cut at every point; the answers to the
challenge are vnc_auth's (its own tests check them against a real x11vnc)."""

from __future__ import annotations

import struct

import pytest

from websocketserver.core.rfb import Violation
from websocketserver.core.vnc_auth import vnc_response
from websocketserver.core.vnc_login import ServerLogin

PASSWORD = "s3cretPw"
CHALLENGE = bytes(range(16))
OK = bytes(4)


def pieces(data: bytes, cut: int) -> list[bytes]:
    return [data[:cut], data[cut:]] if 0 < cut < len(data) else [data]


def server(login: ServerLogin, data: bytes, cut: int = 0) -> tuple[bytes, bytes]:
    to_browser, to_server = b"", b""
    for piece in pieces(data, cut):
        out = login.from_server(piece)
        assert not isinstance(out, Violation), out
        to_browser += out[0]
        to_server += out[1]
    return to_browser, to_server


@pytest.mark.parametrize(("version", "types", "choice", "result_to_browser"), [
    (b"RFB 003.008\n", b"\x02\x01\x02", b"\x01", OK),  # 3.8: the result is passed on
    (b"RFB 003.007\n", b"\x01\x02", b"\x01", b""),  # 3.7: None has no result
    (b"RFB 003.003\n", struct.pack("!I", 2), b"", b""),  # 3.3: the server picks
])
def test_the_browser_gets_none_and_the_proxy_answers_the_challenge(
        version: bytes, types: bytes, choice: bytes, result_to_browser: bytes) -> None:
    rest = types + CHALLENGE + OK + b"SERVERINIT"
    for cut in range(len(rest) + 1):
        login = ServerLogin(PASSWORD)
        assert server(login, version) == (version, b"")
        assert login.from_browser(version) == version
        to_browser, to_server = server(login, rest[:len(types)], cut)
        offered = struct.pack("!I", 1) if version.endswith(b"3\n") else b"\x01\x01"
        assert (to_browser, to_server) == (offered, b"")
        if choice:
            assert login.from_browser(choice) == b"\x02"  # VNC auth, for the browser
        to_browser, to_server = server(login, rest[len(types):], max(0, cut - len(types)))
        assert to_server == vnc_response(PASSWORD, CHALLENGE)
        assert to_browser == result_to_browser + b"SERVERINIT"
        assert login.done
        assert login.from_browser(b"\x01") == b"\x01"  # ClientInit and on: untouched
        assert login.from_server(b"more") == (b"more", b"")


def test_what_cannot_be_logged_in_is_a_violation() -> None:
    version = b"RFB 003.008\n"
    login = ServerLogin(PASSWORD)
    server(login, version)
    login.from_browser(version)
    refused = login.from_server(b"\x01\x01")  # the server offers None only
    assert isinstance(refused, Violation) and refused.code == 1014
    assert login.from_browser(b"x") == refused  # and stays so

    login = ServerLogin(PASSWORD)
    server(login, version)
    login.from_browser(version)
    server(login, b"\x01\x02")
    wrong = login.from_browser(b"\x02")  # the browser would log in itself
    assert isinstance(wrong, Violation) and wrong.code == 1008

    login = ServerLogin(PASSWORD)
    server(login, version)
    login.from_browser(version)
    server(login, b"\x01\x02")
    login.from_browser(b"\x01")
    server(login, CHALLENGE)
    reason = b"password check failed!"
    failed = login.from_server(struct.pack("!I", 1) + struct.pack("!I", len(reason)) + reason)
    assert isinstance(failed, Violation) and failed.code == 1014
    assert "password check failed!" in failed.reason
