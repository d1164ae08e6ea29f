"""What the server says as it starts: its name as invoked, one line per listener, why
a listener could not open; and the names it answers to (the ``Host`` check of both
ports, see :mod:`.protocol`).

The lines say what each port serves or tunnels to, so that a newcomer sees at the
default ``--verbose 0`` what the command line they typed amounts to; the warnings
(options that do nothing as given) are found by :mod:`.cli` and logged with them.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
from pathlib import Path

from .settings import Settings


def program_name(argv0: str) -> str:
    """The name the user ran: ``websocketserver`` (the console script),
    ``websocketserver.py`` (the launcher) or ``python -m websocketserver``."""
    name = Path(argv0).name
    if name == "__main__.py":
        return "python -m websocketserver"
    return name if name and name != "-c" else "websocketserver"


def host_name(host: str) -> str:
    """The name or address of a ``Host`` header, lower case, without port or brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761) or a loopback address: names that no
    DNS answer can point elsewhere (browsers resolve them to loopback themselves)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.partition("%")[0]).is_loopback
    except ValueError:
        return False


@functools.cache
def machine_names() -> frozenset[str]:
    """This machine's host name, its fully qualified name and the addresses of its
    interfaces: the ``Host`` names it answers to besides loopback and the options'."""
    import psutil  # imported here: `-h` and usage errors stay fast

    names = {socket.gethostname(), socket.getfqdn()}
    for addresses in psutil.net_if_addrs().values():
        names.update(address.address.partition("%")[0] for address in addresses
                     if address.family in (socket.AF_INET, socket.AF_INET6))
    return frozenset(name.lower().rstrip(".") for name in names if name)


def summary(settings: Settings) -> list[str]:
    """One line per listener: what it serves or tunnels to."""
    secure = settings.cert is not None
    where = f" on {settings.listen_address}" if settings.listen_address else ""
    lines = []
    if settings.http_directory is None:
        lines.append("http port: none (no --http_directory: no files, no REST API)")
    else:
        scheme = "https" if secure else "http"
        dashboard = (f"{scheme}://{_host(settings.listen_address)}:{settings.http_port}"
                     "/v1/status_view")
        if settings.security_token:
            dashboard += " (with the security token)"
        lines.append(f"{scheme} port {settings.http_port}{where}: files from "
                     f"{settings.http_directory.resolve()}, REST API, dashboard {dashboard}")
    if settings.ws_port == -1:
        lines.append("ws port: none (ws_server_port -1)")
    else:
        lines.append(f"{'wss' if secure else 'ws'} port {settings.ws_port}{where}: "
                     f"{_tunnels(settings)}")
    return lines


PORT_NAMES = {"http": "HTTP", "ws": "websocket"}
"""What a start-up error calls each listener (as ``--http_port`` and ``ws_server_port``)."""


def listen_error(name: str, port: int, exc: OSError) -> str:
    """Why listener ``name`` (``http``, ``ws``) could not open ``port``, in the same words
    for both: ``websocket port 8080: address already in use``.

    The operating system's words for the error, not the exception's: asyncio (the
    websocket port) writes a bind failure as "error while attempting to bind on address
    ('0.0.0.0', 8080): address already in use", a plain socket (the HTTP port) as
    "Address already in use".
    """
    code = exc.errno
    reason = (os.strerror(code) if code is not None and code in errno.errorcode
              else exc.strerror or str(exc))  # a getaddrinfo error has its own numbers
    return f"{PORT_NAMES[name]} port {port}: {reason[:1].lower()}{reason[1:]}"


def _tunnels(settings: Settings) -> str:
    parts = []
    if settings.client_port is not None:
        parts.append(f"tunnels to {settings.client_hostname}:{settings.client_port} "
                     "(basic mode)")
    services = settings.services
    if services:
        plural = "s" if len(services) > 1 else ""
        parts.append(f"reservations of {len(services)} service{plural}: "
                     + ", ".join(f"{s.name} (up to {s.count})" for s in services))
    return "; ".join(parts) or ("nothing to tunnel to (no --client_port, no services): "
                                "every websocket is refused")


def _host(address: str | None) -> str:
    """How a browser on this machine reaches ``address``."""
    if not address:
        return "localhost"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # a host name
    if ip.is_unspecified:
        return "localhost"
    return f"[{ip}]" if ip.version == 6 else str(ip)


def log_startup(settings: Settings, log: logging.Logger) -> None:
    """Log the warnings about the command line, then the summary (at INFO: ``log`` is
    the server's logger, which shows start and stop at every ``--verbose``)."""
    for warning in settings.warnings:
        log.warning("%s", warning)
    for line in summary(settings):
        log.info("%s", line)
