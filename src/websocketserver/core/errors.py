"""The one error type and the one table of close codes (sans-I/O: no asyncio here).

Whatever refuses a request — the upgrade decision, a limit, the services, the store —
raises (or returns) :class:`Refused` with an HTTP status for an answer before the
upgrade and a close code for after it; the ports map it to an answer in one place
each (``gateway.refuse``/``Tunnel.close`` on the websocket port, ``RestApi.handle`` on
the HTTP port). :data:`CLOSE_CODES` is the table docs/reference.md shows
(:func:`close_code_table`; a test checks that the two agree).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Close(enum.IntEnum):
    """The close codes this server sends (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_TEXT = 1007
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    REFUSED = 4000  # plus the HTTP status the refusal would have had: 4404, 4409, ...


@dataclass(frozen=True)
class CloseCode:
    code: Close
    meaning: str
    when: str


CLOSE_CODES = (
    CloseCode(Close.NORMAL, "normal closure",
              "the backend closed its connection (`backend closed the connection`); a "
              "browser's close frame is answered with it"),
    CloseCode(Close.GOING_AWAY, "going away",
              "the reservation was released (`reservation released`), the server shuts "
              "down (`server shutting down`), the tunnel was idle for `--idle_timeout` "
              "(`idle for N s`), no pong came within half of `--ping_interval`, or this "
              "instance was cleared from its cluster"),
    CloseCode(Close.PROTOCOL_ERROR, "protocol error",
              "a frame that breaks RFC 6455: reserved bits, an unknown opcode, an unmasked "
              "or fragmented control frame, a length not in its shortest form, fragments "
              "out of order, a close code not allowed on the wire"),
    CloseCode(Close.INVALID_TEXT, "invalid data",
              "a text message, or a close reason, that is not UTF-8"),
    CloseCode(Close.MESSAGE_TOO_BIG, "message too big",
              "a message over `--max_message_size`, or a tunnel that would exceed "
              "`--max_upstream_buffer`"),
    CloseCode(Close.INTERNAL_ERROR, "internal error",
              "after the upgrade, the service could not be started (`NAME failed to start: "
              "...`, `NAME did not start within N s`), its reservation ended meanwhile, or "
              "its backend could not be reached or was lost (`cannot connect to backend "
              "HOST:PORT: ...`); the reason says which"),
    CloseCode(Close.REFUSED, "refused: 4000 + the HTTP status (4403, 4404, 4409, 4410)",
              "a browser's websocket (one with an `Origin`) whose token was refused is "
              "answered 101 and closed at once with 4000 + the HTTP status it would have "
              "had and the same reason: 4404 `unknown or expired token`, 4403 a "
              "reservation of another user, 4409 `token is already in use`, 4410 its "
              "instance ended; for a server with an RFB service the reason comes first "
              "as an RFB security failure, which stock noVNC shows (see "
              "[refusals a page can show](#refusals-a-page-can-show))"),
)
"""Every close code the server sends: what it means and when (docs/reference.md)."""


def refused_close(status: int) -> int:
    """The close code of a refusal with HTTP ``status`` after the upgrade."""
    return Close.REFUSED + status


def close_code_table() -> str:
    """:data:`CLOSE_CODES` as the Markdown table of docs/reference.md."""
    rows = [f"| {row.code.value} | {row.meaning} | {row.when} |" for row in CLOSE_CODES]
    return "\n".join(["| code | meaning | when |", "|---|---|---|", *rows])


class Refused(Exception):
    """A request or session this server will not serve, and how to say so.

    ``status``: the HTTP status of an answer before the upgrade (JSON ``{"error":
    reason}``); ``close``: the close code once the websocket is open. Returned as a
    value by pure decisions (``protocol.decide``), raised everywhere else.
    """

    def __init__(self, status: int, reason: str, close: Close = Close.INTERNAL_ERROR) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close

    def __repr__(self) -> str:
        return f"Refused({self.status}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        """Equal refusals say the same (decisions are compared in tests, as values)."""
        return (isinstance(other, Refused) and (self.status, self.reason, self.close)
                == (other.status, other.reason, other.close))

    def __hash__(self) -> int:
        return hash((self.status, self.reason, self.close))


class StoreUnavailable(Refused):
    """A shared store cannot be reached or refused the operation: answer 503, fail
    closed. ``detail`` says why, for the log."""

    def __init__(self, detail: str) -> None:
        super().__init__(503, f"reservation store unavailable: {detail}")
        self.detail = detail
