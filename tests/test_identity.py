"""Identity: trusted front-end header, stand-alone user keys, groups."""

from __future__ import annotations

import grp
import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from websocketserver.identity import Identity
from websocketserver.settings import Settings, SettingsError


class _Transport:
    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 50000) if name == "peername" else default


def request(path: str = "/", peer: str = "127.0.0.1",
            headers: dict[str, str] | None = None) -> web.Request:
    return make_mocked_request("GET", path, headers=headers or {},
                               transport=_Transport(peer))


def test_trusted_header_only_from_trusted_proxies() -> None:
    identity = Identity(Settings(ws_port=1, trusted_proxies=("10.0.0.0/8",)))
    header = {"X-Remote-User": "merlin"}
    assert identity.user(request(peer="10.1.2.3", headers=header)) == "merlin"
    assert identity.user(request(peer="192.168.1.1", headers=header)) is None
    assert identity.user(request(peer="10.1.2.3")) is None
    assert Identity(Settings(ws_port=1)).user(request(headers=header)) is None


def test_user_keys(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"merlin": "k1", "arthur": "k2"}))
    identity = Identity(Settings(ws_port=1, users_file=users))
    assert identity.user(request("/?user_key=k2")) == "arthur"
    assert identity.user(request(headers={"X-User-Key": "k1"})) == "merlin"
    assert identity.user(request("/?user_key=k3")) is None
    assert identity.user(request()) is None


def test_groups_file(tmp_path: Path) -> None:
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"wizards": ["merlin"]}))
    identity = Identity(Settings(ws_port=1, groups_file=groups))
    assert identity.is_member("merlin", "wizards")
    assert not identity.is_member("arthur", "wizards")
    assert not identity.is_member(None, "wizards")
    assert not identity.is_member("merlin", "knights")


def test_operating_system_groups() -> None:
    identity = Identity(Settings(ws_port=1))
    me = pwd.getpwuid(os.getuid())
    primary = grp.getgrgid(me.pw_gid).gr_name
    assert identity.is_member(me.pw_name, primary)
    assert not identity.is_member(me.pw_name, "no-such-group-here")
    assert not identity.is_member("no-such-user-here", primary)


@pytest.mark.parametrize("option, content, message", [
    ("users_file", "[]", "expected a JSON object"),
    ("users_file", '{"u": 3}', "key must be a non-empty string"),
    ("groups_file", '{"g": "u"}', "expected a list of user names"),
    ("groups_file", "{", "invalid JSON"),
])
def test_bad_files(tmp_path: Path, option: str, content: str, message: str) -> None:
    path = tmp_path / "f.json"
    path.write_text(content)
    options: dict[str, Any] = {option: path}
    with pytest.raises(SettingsError, match=message):
        Identity(Settings(ws_port=1, **options))
