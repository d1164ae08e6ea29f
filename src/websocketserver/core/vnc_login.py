"""The proxy logs in to a VNC server for the browser: no page holds a VNC password.

Without I/O, between the browser and a VNC server that asks for VNC Authentication
with a password only the proxy and the server know (:mod:`.vnc_auth`): the browser is
offered security type None; the proxy picks VNC Authentication with the server and
answers its challenge; then every byte passes both ways untouched. Each direction's
bytes go through it in order, in whatever pieces they come:

* :meth:`ServerLogin.from_server` -> (bytes for the browser, bytes for the server);
* :meth:`ServerLogin.from_browser` -> bytes for the server.

Per version (the browser's, which the server follows): 3.7 and 3.8 list the types,
the browser picks one and the server answers the choice; 3.3 has the server pick. The
browser's None has a SecurityResult in 3.8 only, so the server's result is passed on in
3.8 and swallowed in 3.3 and 3.7 (where a failure, which the browser cannot be told,
closes it). A server that does not offer VNC Authentication, or a browser that does not
take None, is a :class:`~.rfb.Violation` (1014 or 1008).
"""

from __future__ import annotations

import struct

from .rfb import BAD_GATEWAY, POLICY_VIOLATION, SECURITY_NONE, SECURITY_VNC, Violation
from .vnc_auth import CHALLENGE_SIZE, vnc_response

_VERSION_SIZE = 12
# Where the login is; each state reads the server's next part.
_S_VERSION, _S_TYPES, _S_TYPE33, _S_CHALLENGE, _S_RESULT, _S_REASON, _DONE = range(7)


class ServerLogin:
    """Logs the browser in to a VNC server with ``password`` (see the module)."""

    def __init__(self, password: str) -> None:
        self._password = password
        self._state = _S_VERSION
        self._server = b""  # server bytes of the part being read
        self._browser = b""  # browser bytes held until their version is known
        self._minor = 0  # the browser's version (3.x): 0 until it sent it
        self._browser_done = False  # the browser's part of the login is over
        self.failure: Violation | None = None

    @property
    def done(self) -> bool:
        """Both ways pass untouched from now on."""
        return self._state == _DONE and self._browser_done

    def from_browser(self, data: bytes) -> bytes | Violation:
        """What of the browser's ``data`` goes to the server."""
        if self.failure is not None or self._browser_done:
            return self.failure or data
        self._browser += data
        if self._minor == 0:
            if len(self._browser) < _VERSION_SIZE:
                return b""
            self._minor = int(self._browser[8:11]) if self._browser[8:11].isdigit() else 8
            out, self._browser = self._browser[:_VERSION_SIZE], self._browser[_VERSION_SIZE:]
            if self._minor == 3:  # the server picks: the browser says nothing more
                self._browser_done = True
                return out + self._browser
            choice = self._choice()
            return choice if isinstance(choice, Violation) else out + choice
        return self._choice()

    def _choice(self) -> bytes | Violation:
        """The browser's one security byte (3.7, 3.8): None, sent on as VNC auth."""
        if not self._browser:
            return b""
        choice, rest = self._browser[0], self._browser[1:]
        self._browser, self._browser_done = b"", True
        if choice != SECURITY_NONE:
            return self._fail(POLICY_VIOLATION, f"the browser chose security type {choice}, "
                                                "not None (the proxy logs in)")
        return bytes([SECURITY_VNC]) + rest

    def from_server(self, data: bytes) -> tuple[bytes, bytes] | Violation:
        """What of the server's ``data`` goes to the browser, and what the proxy sends
        the server (its answer to the challenge)."""
        if self.failure is not None:
            return self.failure
        if self._state == _DONE:
            return data, b""
        self._server += data
        to_browser, to_server = b"", b""
        while self._state != _DONE and (need := self._need()) is not None and (
                len(self._server) >= need):
            part, self._server = self._server[:need], self._server[need:]
            step = self._step(part)
            if isinstance(step, Violation):
                return step
            to_browser += step[0]
            to_server += step[1]
        if self._state == _DONE:
            to_browser, self._server = to_browser + self._server, b""
        return to_browser, to_server

    def _need(self) -> int | None:
        """Bytes of the server's next part (None: it depends on the browser's version,
        not known yet)."""
        if self._state == _S_VERSION:
            return _VERSION_SIZE
        if self._state == _S_TYPES:
            if self._minor == 0:
                return None  # 3.3 sends a u32, 3.7+ a count and a list
            return 4 if self._minor == 3 else 1 + (self._server[0] if self._server else 0)
        if self._state == _S_REASON:  # the result, the reason's length, the reason
            return 8 + (struct.unpack("!I", self._server[4:8])[0]
                        if len(self._server) >= 8 else 0)
        return {_S_CHALLENGE: CHALLENGE_SIZE, _S_RESULT: 4}[self._state]

    def _step(self, part: bytes) -> tuple[bytes, bytes] | Violation:
        if self._state == _S_VERSION:
            self._state = _S_TYPES
            return part, b""
        if self._state == _S_TYPES:
            types = ([struct.unpack("!I", part)[0]] if self._minor == 3 else list(part[1:]))
            if SECURITY_VNC not in types:
                return self._fail(BAD_GATEWAY, "the VNC server does not offer VNC "
                                               f"authentication (offers {types})")
            self._state = _S_CHALLENGE
            offer = struct.pack("!I", SECURITY_NONE) if self._minor == 3 else b"\x01\x01"
            return offer, b""
        if self._state == _S_CHALLENGE:
            self._state = _S_RESULT
            return b"", vnc_response(self._password, part)
        if self._state == _S_RESULT:
            if part != bytes(4):
                if self._minor >= 8:
                    self._state = _S_REASON
                    self._server = part + self._server  # the reason follows
                    return b"", b""
                return self._fail(BAD_GATEWAY, "the VNC server refused the proxy's login")
            self._state = _DONE
            return (part if self._minor >= 8 else b""), b""
        return self._fail(BAD_GATEWAY, "the VNC server refused the proxy's login: "
                                       + part[8:].decode("utf-8", "replace")[:200])

    def _fail(self, code: int, reason: str) -> Violation:
        self.failure = Violation(code, reason)
        return self.failure
