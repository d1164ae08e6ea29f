"""The command line: the manual's options and defaults, and one-line usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support import LAUNCHER, ROOT
from websocketserver import __version__
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


def test_repeatable_options_and_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
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


@pytest.mark.parametrize("cwd", ["/", str(ROOT)])
def test_module_and_console_entry_points(cwd: str) -> None:
    """``--version`` names the package as installed, however it was run; a usage
    error names what was run."""
    for argv, name in (([sys.executable, "-m", "websocketserver"], "python -m websocketserver"),
                       ([str(Path(sys.executable).with_name("websocketserver"))],
                        "websocketserver"),
                       ([sys.executable, str(LAUNCHER)], "websocketserver.py")):
        result = subprocess.run([*argv, "--version"], capture_output=True, text=True,
                                timeout=30, cwd=cwd)
        assert (result.returncode, result.stdout) == (0, f"websocketserver {__version__}\n")
        if cwd == "/":  # in ROOT, -m runs the launcher, which calls itself by its name
            result = subprocess.run([*argv, "--foo", "1"], capture_output=True, text=True,
                                    timeout=30, cwd=cwd)
            assert result.stderr.startswith(f"{name}: error: "), argv


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


def run_launcher(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LAUNCHER), *argv], capture_output=True,
                          text=True, timeout=30, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    return line


@pytest.mark.parametrize("argv", [["--foo", "bar", "9090"], ["--verbose", "1", "--foo", "x",
                                                             "9090"], ["--foo=3", "-1"]])
def test_an_unknown_option_is_named_whatever_follows_it(argv: list[str]) -> None:
    """Not ``argument ws_server_port: not a port number: 'bar'``."""
    assert one_error_line(run_launcher(*argv)) == \
        "websocketserver.py: error: unrecognized arguments: --foo"
    assert parse_settings(["--client_po", "5900", "-1"]).client_port == 5900  # abbreviated


def test_tls_files_without_what_they_need(tmp_path: Path) -> None:
    """One line naming the file and what is missing, not ``[SSL] PEM lib``."""
    import trustme

    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "both.pem")
    assert one_error_line(run_launcher("--cert", "cert.pem", "9090", cwd=tmp_path)) == (
        "websocketserver.py: error: --cert cert.pem: no private key in it: give the key "
        "file with --key, or append the key to the certificate file")
    assert one_error_line(run_launcher("--cert", "key.pem", "9090", cwd=tmp_path)) == (
        "websocketserver.py: error: --cert key.pem: no certificate in it (expected a PEM "
        "'-----BEGIN CERTIFICATE-----' block)")
    assert one_error_line(run_launcher("--cert", "cert.pem", "--key", "cert.pem", "9090",
                                       cwd=tmp_path)).startswith(
        "websocketserver.py: error: --key cert.pem: no private key in it")
    assert parse_settings(["--cert", str(tmp_path / "both.pem"), "1"]).ssl_context()


def test_help_ends_with_examples() -> None:
    result = run_launcher("--help")
    assert result.returncode == 0
    tail = result.stdout.split("examples:\n", 1)[1]
    assert "  websocketserver.py --client_port 5900 8080\n" in tail
    assert "--remote_session_config services.json 8080\n" in tail


@pytest.mark.parametrize("service, message", [
    ({"command": ["x"], "script": "x.py", "count": 1}, "give 'script' or 'command', not both"),
    ({"count": 1}, "field 'script': is required (or 'command')"),
    ({"scrip": "x.py", "count": 1}, "unknown field 'scrip' (did you mean 'script'?)"),
    ({"command": ["true"], "count": 1, "slurm": {}, "strat": "reserve"},
     "unknown field 'strat' (did you mean 'start'?)"),
    ({"command": [], "count": 1}, "field 'command': must not be empty"),
    ({"command": ["x", 3], "count": 1}, "field 'command.1': must be of type string"),
    ({"command": "x {port}", "count": 1}, "field 'command': must be of type array"),
    ({"command": ["true", "{colour}"], "count": 1, "options": {"color": "red"}},
     "field 'command[1]': unknown placeholder {colour} (known: {port}, {index}, {color};"),
    ({"command": ["true", "{sizes}"], "count": 1, "options": {"sizes": [1]}},
     "field 'command[1]': unknown placeholder {sizes}"),
    ({"command": ["true", "{port:5}"], "count": 1},
     "field 'command[1]': placeholder {port:5} is not a plain {name}"),
    ({"command": ["no-such-program-here", "{port}"], "count": 1},
     "field 'command[0]': program 'no-such-program-here' not found on PATH"),
    ({"command": ["{interp}", "x"], "count": 1, "options": {"interp": "python3"}},
     "field 'command[0]': the program must be fixed, not a placeholder ({interp}): a "
     "reservation's options could choose what runs"),
    ({"command": ["/opt/{version}/app"], "count": 1, "options": {"version": "1"}},
     "field 'command[0]': the program must be fixed, not a placeholder"),
    ({"command": ["bin/app", "{port}"], "count": 1},
     "/bin/app is not an executable file (a relative program is relative to the config "
     "file's folder)"),
])
def test_command_services_are_checked_at_start_up(tmp_path: Path, service: dict[str, Any],
                                                   message: str) -> None:
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"myapp": service}))
    line = one_error_line(run_launcher("--remote_session_config", str(config), "1"))
    assert line.startswith(f"websocketserver.py: error: --remote_session_config {config}: "
                           "service 'myapp': ")
    assert message in line


def test_a_command_service_config(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "app").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "app").chmod(0o755)
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"a": {"command": ["bin/app", "--port={port}", "{color}"],
                                        "count": 2, "options": {"color": "red"}}}))
    [service] = parse_settings(["--remote_session_config", str(config), "1"]).services
    assert service.command == ("bin/app", "--port={port}", "{color}")
    assert service.directory == tmp_path.resolve() and service.script is None


def test_the_host_names_answered_to() -> None:
    """Loopback is always answered to (protocol.host_refusal); the machine's names and
    addresses, the listen address and --allowed_host too (issue 22.6)."""
    import socket

    names = parse_settings(["--allowed_host", "Viz.Example.com", "--allowed_host",
                            "[fd00::9]", "--listen_address", "10.1.2.3", "1"]).host_names
    assert names is not None
    assert {"viz.example.com", "fd00::9", "10.1.2.3", socket.gethostname().lower()} <= names
    assert parse_settings(["--allowed_host", "*", "1"]).host_names is None
    line = one_error_line(run_launcher("--allowed_host", "https://viz.example.com/", "1"))
    assert line == ("websocketserver.py: error: --allowed_host 'https://viz.example.com/': "
                    "give a host name or address (viz.example.com, 10.0.0.5), not a URL")


@pytest.mark.parametrize(("argv", "warned"), [
    ([], True),
    (["--listen_address", "0.0.0.0"], True),
    (["--listen_address", "10.0.0.5"], True),
    (["--listen_address", "127.0.0.1"], False),
    (["--listen_address", "localhost"], False),
    (["--security_token", "K"], False),
    (["--trusted_proxy", "10.0.0.2"], False),
])
def test_a_rest_api_open_to_anyone_is_warned_about(tmp_path: Path, argv: list[str],
                                                   warned: bool) -> None:
    warnings = parse_settings(["--http_directory", str(tmp_path), *argv, "1"]).warnings
    open_api = [w for w in warnings if w.startswith("the REST API on port 9090 is open to "
                                                    "anyone who reaches it")]
    assert len(open_api) == int(warned), warnings
