"""The command line: the original manual's options, plus the newer ones clients pass.

Usage errors print one line naming the problem and exit with status 2; start-up
problems (unreadable certificate, bad service config, port in use) exit with 1.

What the parsed options mean, the :class:`~.settings.Settings` they make, is
:mod:`.options`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .options import CLUSTER_SECRET_ENV, REDIS_ENV, TOKEN_ENV, settings_from
from .settings import Settings, SettingsError
from .startup import program_name


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and never a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {value}")
    return value


def _ws_port(text: str) -> int:
    if text.strip() == "-1":
        return -1
    return _port(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text}")
    return value


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}: {text}")
    return value


def _count(text: str) -> int:
    return _whole(text, 1)


def _count_or_zero(text: str) -> int:
    return _whole(text, 0)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t:\r\n") or any(c in value for c in "\r\n"):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address or network: {text!r}") from None


EPILOG = """\
REST API on the HTTP port: /v1/stop, /v1/status, /v1/status_view, /v1/metrics,
/v1/health, /v1/reserve/{service}, /v1/release/{token}. See docs/reference.md and
docs/rest-api.md.

examples:
  %(prog)s --client_port 5900 8080
      tunnel websockets on port 8080 to the VNC server on localhost:5900
  %(prog)s --http_directory novnc --http_port 9090 --client_port 5900 8080
      the same, and serve noVNC at http://localhost:9090/vnc.html?host=localhost&port=8080
  %(prog)s --http_directory www --http_port 9090 --remote_session_config services.json 8080
      start services on demand: GET /v1/reserve/NAME, then a websocket with ?token=
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser; its help text follows the original manual."""
    parser = _Parser(
        prog=program_name(sys.argv[0]),
        description="Nexus websocket proxy server",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("ws_server_port", type=_ws_port, metavar="ws_server_port",
        help="The port the server accepts incoming websocket connection requests over "
        "(-1: no websocket listener)")
    # the package's name, however it was run (usage errors name what was run)
    add("--version", action="version", version=f"websocketserver {__version__}")
    add("--http_directory", metavar="http_directory", type=Path,
        help="Directory to serve up files from via http. It enables HTTP services.")
    add("--http_port", metavar="http_server_port", type=_port,
        help="Port to support http file serving on. Default:9090")
    add("--cert", metavar="ssl_certificate_filename", type=Path,
        help="Filename of the ssl certificate")
    add("--key", metavar="ssl_key_filename", type=Path, help="Filename of the ssl key")
    add("--remote_session_config", metavar="remote_config.json", type=Path,
        help="Name of the remote session configuration file")
    add("--client_hostname", metavar="client_hostname",
        help="Hostname of the socket to serve using the websocket protocol on ws_server_port")
    add("--client_port", metavar="client_port", type=_port,
        help="Port number of the socket to serve using the websocket protocol on "
        "ws_server_port")
    add("--timeout", metavar="timeout_seconds", type=_positive, default=300.0,
        help="Number of seconds before an unused reservation is reclaimed. Default:300")
    add("--local_session", metavar=("appname", "count"), nargs=2, action="append", default=[],
        help="Specify some number of locally executed, built-in sessions. These are "
        "specified by strings in the form 'appname count' where appname can be 'ensight' or "
        "'envision'. The count is the maximum number of instances of that application "
        "websocketserver may have reserved/running simultaneously. This argument may be "
        "repeated.")
    add("--verbose", metavar="verbose_level", type=int, default=0,
        help="Enable debugging information (0 quiet, 1 one line per tunnel, 2+ debug)")
    add("--log_file", metavar="log_filename", type=Path,
        help="Save program output to the named log file instead of stdout")
    add("--log_format", choices=("text", "json"), default="text",
        help="text: one line a record; json: one JSON object a line (time, level, logger, "
        "message), for log shippers. Default:text")
    add("--security_token", metavar="token",
        help=f"Shared secret required by the REST API. Default: ${TOKEN_ENV}")
    add("--add_header", metavar="NAME=VALUE", type=_header, action="append", default=[],
        help="Add this header to every HTTP response. May be repeated.")
    grpc = parser.add_argument_group(
        "EnSight REST bridge", "Accepted for compatibility; requests under /ensight/ answer 501.")
    grpc.add_argument("--grpc_port", metavar="port", type=_port)
    grpc.add_argument("--grpc_use_tcp_sockets", action="store_true")
    grpc.add_argument("--grpc_allow_network_connections", action="store_true")
    grpc.add_argument("--grpc_disable_tls", action="store_true")
    grpc.add_argument("--grpc_uds_pathname", metavar="path")
    grpc.add_argument("--separate_loops", action="store_true",
                      help="Accepted for compatibility (the original ran REST and websockets on "
                      "separate event loops); changes nothing here")
    extra = parser.add_argument_group("websocketserver options (not in the original)")
    extra.add_argument("--listen_address", metavar="address",
                       help="Address both listeners bind to. Default: all interfaces")
    extra.add_argument("--ansys_install_root", metavar="directory", type=Path,
                       help="Serve /ansysNNN/... URLs from directory/ansysNNN/... "
                       "Default: the install tree the server lives in or the environment "
                       "names ($PYENSIGHT_ANSYS_INSTALLATION, $CEI_HOME, $AWP_ROOTnnn), else "
                       "--http_directory like any path")
    extra.add_argument("--reconnect_grace", metavar="seconds", type=_seconds, default=0.0,
                       help="Keep a started service instance this long after its websocket "
                       "closes, for a reconnect with the same token (a page reload); a "
                       "service's \"reconnect_grace\" in --remote_session_config overrides "
                       "it. Default:0 (stop at once)")
    extra.add_argument("--start_timeout", metavar="seconds", type=_positive, default=60.0,
                       help="How long a service may take to start and listen. Default:60")
    extra.add_argument("--job_report_url", metavar="url",
                       help="Where the Slurm jobs of \"slurm\" services report their port: "
                       "this server's HTTP port as the compute nodes reach it. Default: "
                       "http(s)://LISTEN_ADDRESS_OR_FQDN:HTTP_PORT/v1/job_report")
    extra.add_argument("--max_message_size", metavar="bytes", type=_count,
                       default=64 * 1024 * 1024,
                       help="Largest websocket message accepted from a client. "
                       "Default:67108864")
    extra.add_argument("--local_app_root", metavar="directory", type=Path,
                       help="Install directory of EnSight/EnVision for --local_session "
                       "(bin/APP or CEI/bin/APP below it). Default: $WEBSOCKETSERVER_APP_ROOT, "
                       "else the install found as for --ansys_install_root")
    extra.add_argument("--local_app_command", metavar="command",
                       help="Command line launching a --local_session application; "
                       "{app}, {root}, {port} and {target_pathname} are substituted")
    extra.add_argument("--trusted_proxy", metavar="address", type=_network, action="append",
                       default=[], help="Front end (IP or network) whose --user_header is "
                       "trusted. May be repeated.")
    extra.add_argument("--user_header", metavar="name", default="X-Remote-User",
                       help="Header naming the authenticated user, set by a trusted front "
                       "end. Default: X-Remote-User")
    extra.add_argument("--users_file", metavar="users.json", type=Path,
                       help="Stand-alone identity: JSON object of user name -> user key")
    extra.add_argument("--groups_file", metavar="groups.json", type=Path,
                       help="JSON object of group -> [user names]. Default: the operating "
                       "system's groups")
    limits = parser.add_argument_group("limits (see SECURITY.md)")
    limits.add_argument("--allowed_origin", metavar="origin", action="append", default=[],
                        help="Browser Origin allowed to open websockets, e.g. "
                        "https://portal.example.com; repeatable. Default: any origin")
    limits.add_argument("--allowed_host", metavar="name", action="append", default=[],
                        help="Host name (or address) this server also answers to, besides "
                        "loopback, this machine's names and addresses and --listen_address: "
                        "the name a front end or a DNS alias gives it; other Host headers get "
                        "421. Repeatable; '*': any")
    limits.add_argument("--max_tunnels", metavar="n", type=_count, default=10000,
                        help="Most tunnels at once (beyond: 503). Default:10000")
    limits.add_argument("--max_tunnels_per_client", metavar="n", type=_count, default=1000,
                        help="Most tunnels from one client address (beyond: 429). "
                        "Default:1000")
    limits.add_argument("--max_tunnels_per_user", metavar="n", type=_count, default=100,
                        help="Most tunnels of one known user (beyond: 429). Default:100")
    limits.add_argument("--max_header_size", metavar="bytes", type=_count, default=8190,
                        help="Longest HTTP request line or header (beyond: 400). "
                        "Default:8190")
    limits.add_argument("--max_http_connections", metavar="n", type=_count, default=1000,
                        help="Most connections the HTTP port holds at once (beyond: new "
                        "ones wait until one closes). Default:1000")
    limits.add_argument("--handshake_timeout", metavar="seconds", type=_positive,
                        default=10.0, help="Time a new connection has for its TLS handshake "
                        "and request headers. Default:10")
    limits.add_argument("--ping_interval", metavar="seconds", type=_positive,
                        help="Ping a browser that has sent nothing for this long; close "
                        "when no pong comes within half of it. Default: off")
    limits.add_argument("--max_upstream_buffer", metavar="bytes", type=_count,
                        default=64 * 1024 * 1024,
                        help="Most bytes the tunnels of one process hold from browsers "
                        "beyond 1 MiB each (large frames, a stalled backend); a tunnel that "
                        "would exceed it is closed with 1009. Default:67108864")
    limits.add_argument("--idle_timeout", metavar="seconds", type=_positive,
                        help="Close a tunnel after this long without traffic. Default: off")
    cluster = parser.add_argument_group("cluster (see docs/cluster.md)")
    cluster.add_argument("--redis", metavar="url",
                         help="Share reservations with other instances through Redis at url "
                         "(redis://[user:pass@]host:port/db, rediss://, unix://path). "
                         f"Default: ${REDIS_ENV}, else one server, reservations in memory")
    cluster.add_argument("--node_name", metavar="name",
                         help="This instance's name in the cluster. Default: hostname:port")
    cluster.add_argument("--node_address", metavar="host",
                         help="Address the other instances reach this one's websocket port "
                         "at. Default: --listen_address when specific, else the host name")
    cluster.add_argument("--cluster_secret", metavar="secret",
                         help="Key authenticating instance-to-instance traffic; required "
                         f"with --redis. Default: ${CLUSTER_SECRET_ENV}")
    cluster.add_argument("--heartbeat_ttl", metavar="seconds", type=_positive, default=6.0,
                         help="An instance silent this long is suspected dead; it is "
                         "cleared after one more. Default:6")
    tuning = parser.add_argument_group("performance")
    tuning.add_argument("--relay_processes", metavar="n", type=_count_or_zero,
                        default=1 if (os.cpu_count() or 1) > 1 else 0,
                        help="Processes that relay basic-mode ws tunnels beside the main one "
                        "(0: all in the main process; not used with TLS). Default:1 (0 on "
                        "a machine with one CPU)")
    return parser


def parse_settings(argv: Sequence[str] | None = None, location: Path | None = None) -> Settings:
    """Parse the command line into :class:`Settings`, exiting with status 2 on bad usage.

    ``location`` is the server's own path (argv[0]): an install tree around it is used
    when no option names one (see :mod:`websocketserver.install`).
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    unknown = _unknown_options(parser, argv)
    if unknown:  # else argparse may take "--foo VALUE"'s value for the port
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args = parser.parse_args(argv)
    try:
        return settings_from(args, location)
    except SettingsError as exc:
        parser.error(str(exc))


_NUMBER = re.compile(r"-\d+|-\d*\.\d+")


def _unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Arguments shaped like options that name none of ``parser``'s (abbreviations of
    a long option count, as argparse takes them)."""
    known = parser._option_string_actions
    unknown = []
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or _NUMBER.fullmatch(arg):
            continue
        name = arg.partition("=")[0]
        if name not in known and not (name.startswith("--")
                                      and any(o.startswith(name) for o in known)):
            unknown.append(name)
    return unknown


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``websocketserver`` command."""
    settings = parse_settings(argv, Path(sys.argv[0]))
    for secret in (TOKEN_ENV, CLUSTER_SECRET_ENV, REDIS_ENV):  # read: the services
        os.environ.pop(secret, None)  # this server starts do not inherit them
    from .server import run  # imported late: `-h` and usage errors stay fast

    sys.exit(run(settings))
