"""Identity: who is asking, and which groups they are in.

Two ways to learn the user, tried in order:

1. **Behind a front end** that has already authenticated the user: the header
   ``--user_header`` (default ``X-Remote-User``) is believed only when the request
   comes from a ``--trusted_proxy`` address; from anywhere else it is ignored.
2. **Stand-alone**: ``--users_file`` maps user names to secret user keys; a caller
   proves who it is with ``?user_key=KEY`` or an ``X-User-Key: KEY`` header.

Group membership comes from ``--groups_file`` (``{"group": ["user", ...]}``) or,
without it, from the operating system's group database. A caller nobody vouches
for is anonymous and sees only services without a ``group``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from .settings import Settings, SettingsError

USER_KEY_PARAM = "user_key"
USER_KEY_HEADER = "X-User-Key"


class Request(Protocol):
    """What identity reads from a request: an aiohttp request or an upgrade request."""

    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def query(self) -> Mapping[str, str]: ...
    @property
    def remote(self) -> str | None: ...


def _load_json_object(path: Path, option: str) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{option} {path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{option} {path}: invalid JSON at line {exc.lineno} "
                            f"column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{option} {path}: expected a JSON object")
    return data


class Identity:
    """Answers "who is this request from?" and "is that user in this group?"."""

    def __init__(self, settings: Settings) -> None:
        self._proxies = [ipaddress.ip_network(n) for n in settings.trusted_proxies]
        self._user_header = settings.user_header
        self._keys: list[tuple[bytes, str]] = []
        if settings.users_file is not None:
            users = _load_json_object(settings.users_file, "--users_file")
            for user, key in users.items():
                if not isinstance(key, str) or not key:
                    raise SettingsError(f"--users_file {settings.users_file}: user {user!r}: "
                                        "key must be a non-empty string")
                self._keys.append((key.encode(), user))
        self._groups: dict[str, set[str]] | None = None
        if settings.groups_file is not None:
            groups = _load_json_object(settings.groups_file, "--groups_file")
            self._groups = {}
            for group, members in groups.items():
                if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                    raise SettingsError(f"--groups_file {settings.groups_file}: group "
                                        f"{group!r}: expected a list of user names")
                self._groups[group] = set(members)

    def user(self, request: Request) -> str | None:
        """The authenticated user of ``request``, or None when anonymous."""
        if self._proxies and self._from_trusted_proxy(request):
            name = request.headers.get(self._user_header, "").strip()
            if name:
                return name
        if self._keys:
            key = request.query.get(USER_KEY_PARAM) or request.headers.get(USER_KEY_HEADER)
            if key:  # header text may hold any bytes (surrogate-escaped)
                return self._user_with_key(key.encode("utf-8", "surrogateescape"))
        return None

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._proxies)

    def _from_trusted_proxy(self, request: Request) -> bool:
        return self._trusted(_peer_address(request))

    def client_address(self, request: Request) -> str:
        """The client's address: the peer, or from a trusted proxy its X-Forwarded-For.

        The list is read from the right, skipping trusted proxies, so a client cannot
        pass itself off as someone else by sending its own X-Forwarded-For.
        """
        address = _peer_address(request)
        if not self._proxies or not self._trusted(address):
            return address
        for hop in reversed(request.headers.get("X-Forwarded-For", "").split(",")):
            hop = hop.strip()
            if hop and not self._trusted(hop):
                return hop
        return address

    def _user_with_key(self, key: bytes) -> str | None:
        found = None
        for known, user in self._keys:  # compare with every key: constant time
            if hmac.compare_digest(known, key):
                found = user
        return found

    def is_member(self, user: str | None, group: str) -> bool:
        """Whether ``user`` belongs to ``group`` (anonymous users belong to none)."""
        if user is None:
            return False
        if self._groups is not None:
            return user in self._groups.get(group, ())
        return _os_member(user, group)


def _peer_address(request: Request) -> str:
    return request.remote or "?"


def _os_member(user: str, group: str) -> bool:
    try:
        import grp
        import pwd
    except ImportError:  # not a POSIX system
        return False
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    if user in entry.gr_mem:
        return True
    try:
        return pwd.getpwnam(user).pw_gid == entry.gr_gid
    except KeyError:
        return False
