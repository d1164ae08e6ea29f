"""The command line: the manual's options and defaults, and one-line usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import LAUNCHER
from websocketserver.cli import parse_settings


def test_manual_defaults() -> None:
    settings = parse_settings(["9090"])
    assert settings.ws_port == 9090
    assert settings.http_port == 9090 and settings.http_directory is None
    assert settings.client_hostname == "localhost" and settings.client_port is None
    assert settings.timeout == 300 and settings.verbose == 0
    assert settings.local_sessions == () and settings.services == ()


def test_port_first_or_last_and_local_session_last(tmp_path: Path) -> None:
    first = parse_settings(["8000", "--http_directory", str(tmp_path), "--http_port", "8001",
                            "--local_session", "envision", "5"])
    last = parse_settings(["--http_directory", str(tmp_path), "--http_port", "8001",
                           "--local_session", "envision", "5", "8000"])
    assert first == last
    assert first.ws_port == 8000 and first.local_sessions == (("envision", 5),)
    assert [s.name for s in first.services] == ["local_envision"]


def test_repeatable_options_and_token_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("WEBSOCKETSERVER_SECURITY_TOKEN", "from-env")
    settings = parse_settings(["--add_header", "a=1", "--add_header", "b=x=y",
                               "--local_session", "ensight", "2",
                               "--local_session", "envision", "1", "-1"])
    assert settings.ws_port == -1
    assert settings.add_headers == (("a", "1"), ("b", "x=y"))
    assert settings.security_token == "from-env"
    assert [s.name for s in settings.services] == ["local_ensight", "local_envision"]
    assert parse_settings(["--security_token", "cli", "1"]).security_token == "cli"


def test_grpc_flags_are_accepted() -> None:
    settings = parse_settings(["--grpc_port", "12345", "--grpc_use_tcp_sockets",
                               "--grpc_allow_network_connections", "--grpc_disable_tls",
                               "--grpc_uds_pathname", "/tmp/x", "1"])
    assert settings.grpc_port == 12345


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["70000"], "port out of range"),
    (["abc"], "not a port number"),
    ([], "the following arguments are required: ws_server_port"),
    (["--local_session", "word", "2", "1"], "unknown appname 'word'"),
    (["--local_session", "ensight", "zero", "1"], "count must be a whole number"),
    (["--cert", "/nonexistent.pem", "1"], "--cert /nonexistent.pem"),
    (["--key", "k.pem", "1"], "--key needs --cert"),
    (["--http_directory", "/nonexistent", "1"], "not a directory"),
    (["--add_header", "novalue", "1"], "expected NAME=VALUE"),
    (["--timeout", "-5", "1"], "must be > 0"),
    (["--trusted_proxy", "nonsense", "1"], "not an IP address"),
    (["--remote_session_config", "/nonexistent.json", "1"], "cannot read"),
    (["--relay_processes", "-1", "1"], "must be >= 0"),
])
def test_usage_errors_are_one_line_exit_2(argv: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, str(LAUNCHER), *argv], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("websocketserver.py: error: ") and message in lines[0]


def test_help_reads_like_the_manual() -> None:
    result = subprocess.run([sys.executable, str(LAUNCHER), "-h"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    for text in ("ws_server_port", "--http_directory http_directory",
                 "--http_port http_server_port", "--local_session appname count",
                 "--remote_session_config remote_config.json", "Default:9090"):
        assert text in result.stdout


def test_module_and_console_entry_points() -> None:
    for argv in ([sys.executable, "-m", "websocketserver", "--version"],
                 [str(Path(sys.executable).with_name("websocketserver")), "--version"]):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "websocketserver.py 0." in result.stdout


def test_launcher_compatibility_flags_are_accepted() -> None:
    """Every flag the PyEnSight launchers (0.11, 0.12) pass, ``--separate_loops`` and a
    ``-1`` port included, in both of their orders."""
    local = parse_settings(["--http_directory", ".", "--http_port", "8001", "--client_port", "2",
                            "--grpc_port", "3", "--grpc_use_tcp_sockets",
                            "--grpc_allow_network_connections", "--grpc_disable_tls",
                            "--grpc_uds_pathname", "/tmp/p", "--local_session", "envision",
                            "5", "--separate_loops", "--security_token", "K", "-1"])
    container = parse_settings(["-1", "--http_directory", ".", "--http_port", "8001",
                                "--separate_loops", "--security_token", "K", "--client_port",
                                "1999", "--add_header", "instance_name=N", "--grpc_port", "3",
                                "--local_session", "envision", "5"])
    for settings in (local, container):
        assert settings.ws_port == -1 and settings.local_sessions == (("envision", 5),)
