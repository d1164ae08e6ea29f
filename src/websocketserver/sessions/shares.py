"""Sharing a session: share tokens (``/v1/share/{token}``) and what a viewer's websocket
joins (:mod:`.viewers`).

A share token is a credential like a reservation token, kept in the store so that any
instance of a cluster knows it; a viewer's websocket goes to the instance that runs the
session (forwarded like any websocket), which opens the viewer's own TCP connection to
the running instance. ``view`` needs a service that declares ``"protocol": "rfb"``:
the proxy then drops the viewer's input (core/rfb.py); ``control`` passes it on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import Refused
from ..core.rfb import SECURITY_NONE, SECURITY_VNC
from ..settings import Settings
from .reservations import Reservation, ReservationStore, may_use
from .service import Elsewhere, Service
from .session import Session

MODES = ("view", "control")


@dataclass(frozen=True)
class Viewing:
    """What a websocket with a share token joins: ``session``, in ``mode``."""

    share: str
    mode: str
    session: Session


class Shares:
    """The share tokens of the sessions (``services`` by name, ``sessions`` here by
    token, shared with the manager)."""

    def __init__(self, settings: Settings, store: ReservationStore,
                 services: dict[str, Service], sessions: dict[str, Session]) -> None:
        self.settings = settings
        self.store = store
        self.services = services
        self._sessions = sessions

    async def share(self, reservation: Reservation, mode: str) -> str:
        """A new share token of ``reservation`` (the caller may see it) in ``mode``."""
        if mode not in MODES:
            raise Refused(400, f"mode must be one of {', '.join(MODES)}, not {mode[:20]!r}")
        config = self.services[reservation.service].config
        if config.max_viewers == 0:
            raise Refused(409, f"sharing is off for service {config.name} (max_viewers 0)")
        if mode == "view" and config.protocol != "rfb":
            raise Refused(409, f"view-only sharing needs a service that declares "
                               f"\"protocol\": \"rfb\" ({config.name} does not)")
        session = self._sessions.get(reservation.token)
        offered = session.rfb_offered if session is not None else None
        if offered is not None and not offered & {SECURITY_NONE, SECURITY_VNC}:
            raise Refused(409, f"the VNC server of {config.name} offers security types "
                               f"{sorted(offered)}, neither None nor VNC authentication: "
                               "its session cannot be shared")
        share = await self.store.add_share(reservation.token, mode)
        if share is None:
            raise Refused(404, "unknown or expired token")
        return share

    async def revoke(self, share: str, user: str | None, admin: bool) -> Reservation | None:
        """Revoke ``share`` (``/v1/release/{share}``) and close its viewers here (another
        instance's are told by the store); None if it is no share token."""
        found = await self.store.find_share(share)
        if found is None:
            return None
        if not admin and not may_use(found, user):
            raise Refused(403, f"token is reserved by another user than {user}")
        await self.store.remove_share(share)
        self.close(share)
        return found

    def close(self, share: str) -> bool:
        """Close the viewers of revoked ``share`` here; False if it has none here."""
        return any([session.viewers.close("share revoked", share)
                    for session in self._sessions.values()])

    async def claim(self, share: str, user: str | None) -> Viewing | Elsewhere | None:
        """What a websocket with ``share`` joins (None: it is no share token). Refused
        (403 another user's, 409 the session has not started or ended, 429 all the
        viewer places taken) otherwise."""
        found = await self.store.find_share(share)
        if found is None:
            return None
        if not may_use(found, user):
            raise Refused(403, f"token is reserved by another user than {user}")
        if found.node not in (None, self.settings.node_name):
            return Elsewhere(found.node or "?")
        session = self._sessions.get(found.token)
        if session is None or session.address is None:
            raise Refused(409, "the shared session is not running yet (or any more): "
                               "open this page again once it is")
        session.viewers.check()
        return Viewing(share, found.shares[share], session)
