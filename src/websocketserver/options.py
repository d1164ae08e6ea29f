"""What the parsed command line means: the :class:`~.settings.Settings` it makes.

The parser (:mod:`.cli`) checks each value's form; here the options are checked
together (a certificate and its key, the cluster's options, the install tree), the
services file is loaded, and warnings name options that do nothing as given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from .install import discover
from .settings import BUILTIN_APPS, ServiceConfig, Settings, SettingsError, load_service_config
from .startup import host_name, is_loopback, machine_names

TOKEN_ENV = "WEBSOCKETSERVER_SECURITY_TOKEN"
CLUSTER_SECRET_ENV = "WEBSOCKETSERVER_CLUSTER_SECRET"
REDIS_ENV = "WEBSOCKETSERVER_REDIS"
APP_ROOT_ENV = "WEBSOCKETSERVER_APP_ROOT"


def _check_pem(cert: Path | None, key: Path | None) -> None:
    """The certificate file holds a certificate, and it or ``--key`` a usable private
    key: said here in one line rather than as OpenSSL's ``[SSL] PEM lib``."""
    if cert is None:
        return
    text = cert.read_bytes().decode("latin-1")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise SettingsError(f"--cert {cert}: no certificate in it (expected a PEM "
                            "'-----BEGIN CERTIFICATE-----' block)")
    if key is None:
        if "PRIVATE KEY-----" not in text:
            raise SettingsError(f"--cert {cert}: no private key in it: give the key file "
                                "with --key, or append the key to the certificate file")
        where = f"--cert {cert}"
    else:
        text = key.read_bytes().decode("latin-1")
        if "PRIVATE KEY-----" not in text:
            raise SettingsError(f"--key {key}: no private key in it (expected a PEM "
                                "'-----BEGIN PRIVATE KEY-----' block)")
        where = f"--key {key}"
    if "ENCRYPTED" in text:
        raise SettingsError(f"{where}: the private key is encrypted; give an unencrypted "
                            "copy (openssl pkey -in KEY -out PLAIN), readable only by the "
                            "server's user")


def _warnings(args: argparse.Namespace, services: list[ServiceConfig],
              token: str | None) -> tuple[str, ...]:
    """Options that do nothing as given, and a REST API open to anyone: said at
    start-up, since nothing else would."""
    found = []
    listen = args.listen_address
    if (args.http_directory is not None and token is None and args.users_file is None
            and not args.trusted_proxy and not (listen and is_loopback(host_name(listen)))):
        port = 9090 if args.http_port is None else args.http_port
        found.append(f"the REST API on port {port} is open to anyone who reaches it (no "
                     "--security_token, no --users_file or --trusted_proxy) and it listens "
                     "beyond loopback: anyone can stop the server or reserve its services; "
                     "set a security token, or --listen_address 127.0.0.1")
    if args.http_directory is None:
        if args.http_port is not None:
            found.append(f"--http_port {args.http_port} does nothing without "
                         "--http_directory: there is no HTTP port (no files, no REST API)")
        if args.security_token is not None:
            found.append("--security_token does nothing without --http_directory: there "
                         "is no REST API")
        if services:
            given = ("--remote_session_config" if args.remote_session_config is not None
                     else "--local_session")
            found.append(f"{given}: services cannot be reserved without --http_directory "
                         "(the REST API is on the HTTP port)")
    if args.client_hostname is not None and args.client_port is None:
        found.append(f"--client_hostname {args.client_hostname} does nothing without "
                     "--client_port")
    if args.local_app_command is not None and not args.local_session:
        found.append("--local_app_command does nothing without --local_session")
    if args.ws_server_port != -1 and args.client_port is None and not services:
        found.append(f"ws port {args.ws_server_port} has nothing to tunnel to: give "
                     "--client_port (basic mode) or services (--remote_session_config, "
                     "--local_session)")
    return tuple(found)


def settings_from(args: argparse.Namespace, location: Path | None) -> Settings:
    local_sessions = []
    for app, count in args.local_session:
        if app not in BUILTIN_APPS:
            raise SettingsError(f"--local_session: unknown appname {app!r} "
                                f"(choose from {', '.join(BUILTIN_APPS)})")
        if not count.isdigit() or int(count) < 1:
            raise SettingsError(f"--local_session {app}: count must be a whole number >= 1, "
                                f"got {count!r}")
        local_sessions.append((app, int(count)))
    if args.key is not None and args.cert is None:
        raise SettingsError("--key needs --cert")
    for option in ("cert", "key", "users_file", "groups_file"):
        path = getattr(args, option)
        if path is not None and not os.access(path, os.R_OK):
            raise SettingsError(f"--{option} {path}: file not found or not readable")
    _check_pem(args.cert, args.key)
    http_port = 9090 if args.http_port is None else args.http_port
    token = os.environ.get(TOKEN_ENV) if args.security_token is None else args.security_token
    if args.http_directory is not None and not args.http_directory.is_dir():
        raise SettingsError(f"--http_directory {args.http_directory}: not a directory")
    if args.ansys_install_root is not None and not args.ansys_install_root.is_dir():
        raise SettingsError(f"--ansys_install_root {args.ansys_install_root}: not a directory")
    if args.http_directory is not None and http_port == args.ws_server_port:
        raise SettingsError(f"--http_port {http_port} is also the ws_server_port")
    if token is not None and not token.strip():
        raise SettingsError("--security_token must not be empty")
    services: list[ServiceConfig] = []
    if args.remote_session_config is not None:
        services.extend(load_service_config(args.remote_session_config))
    for app, count in local_sessions:
        name = f"local_{app}"
        if any(s.name == name for s in services):
            raise SettingsError(f"--local_session {app}: service {name!r} is already defined")
        services.append(ServiceConfig(name=name, script=None, count=count, options={},
                                      builtin_app=app, protocol="rfb"))
    web_root, app_root, notes = _install(args, location, bool(local_sessions))
    cluster = _cluster(args)
    report_url = _job_report_url(args, services, http_port)
    derived = {
        **cluster,
        "job_report_url": report_url,
        "ws_port": args.ws_server_port,
        "local_sessions": tuple(local_sessions),
        "add_headers": tuple(args.add_header),
        "trusted_proxies": tuple(args.trusted_proxy),
        "allowed_origins": tuple(args.allowed_origin),
        "allowed_hosts": tuple(args.allowed_host),
        "host_names": _host_names(args, cluster["node_address"],
                                  urllib.parse.urlsplit(report_url).hostname or ""),
        "ansys_install_root": web_root,
        "local_app_root": app_root,
        "install_notes": notes,
        "services": tuple(services),
        "http_port": http_port,
        "client_hostname": args.client_hostname or "localhost",
        "security_token": token,
        "warnings": _warnings(args, services, token),
    }
    as_given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
                if f.name in vars(args) and f.name not in derived}
    return Settings(**as_given, **derived)


def _job_report_url(args: argparse.Namespace, services: list[ServiceConfig],
                    http_port: int) -> str:
    """Where Slurm jobs report (``""``: nowhere, without the HTTP port, which a service
    with ``"slurm"`` needs; a script's is checked once loaded)."""
    if args.http_directory is None:
        if any(service.slurm is not None for service in services):
            raise SettingsError("a service with \"slurm\" needs the HTTP port "
                                "(--http_directory): its jobs report there")
        if args.job_report_url is not None:
            raise SettingsError("--job_report_url needs the HTTP port (--http_directory)")
        return ""
    if args.job_report_url is not None:
        parts = urllib.parse.urlsplit(args.job_report_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"--job_report_url {args.job_report_url!r}: not an http:// "
                                "or https:// URL")
        return str(args.job_report_url)
    specific = args.listen_address not in (None, "", "0.0.0.0", "::")
    host = args.listen_address if specific else socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if args.cert is not None else "http"
    return f"{scheme}://{host}:{http_port}/v1/job_report"


def _host_names(args: argparse.Namespace, node_address: str,
                report_host: str) -> frozenset[str] | None:
    """The names a ``Host`` header may give (loopback ones are always allowed): the
    machine's, the listen and node addresses, the jobs' report URL's, ``--allowed_host``;
    None with ``*``."""
    if "*" in args.allowed_host:
        return None
    for name in args.allowed_host:
        if not name.strip() or "/" in name or " " in name.strip():
            raise SettingsError(f"--allowed_host {name!r}: give a host name or address "
                                "(viz.example.com, 10.0.0.5), not a URL")
    given = [*args.allowed_host, args.listen_address or "", node_address, report_host]
    return machine_names() | {host_name(name) for name in given if name}


def _cluster(args: argparse.Namespace) -> dict[str, Any]:
    """The cluster options, checked: with --redis a secret and a name are needed."""
    secret = (os.environ.get(CLUSTER_SECRET_ENV) if args.cluster_secret is None
              else args.cluster_secret)
    url = os.environ.get(REDIS_ENV) or None if args.redis is None else args.redis
    if url is None:
        for option in ("node_name", "node_address", "cluster_secret"):
            if getattr(args, option) is not None:
                raise SettingsError(f"--{option} needs --redis")
        return {"redis": None, "node_name": "", "node_address": "", "cluster_secret": None}
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError("--redis: not a redis://, rediss:// or unix:// URL")
    if not secret:
        raise SettingsError(f"--redis needs --cluster_secret (or ${CLUSTER_SECRET_ENV}): "
                            "it authenticates the instances to each other")
    if args.ws_server_port == -1:
        raise SettingsError("--redis needs a websocket port (not -1)")
    host = socket.gethostname()
    specific = args.listen_address not in (None, "", "0.0.0.0", "::")
    return {"redis": url, "node_name": args.node_name or f"{host}:{args.ws_server_port}",
            "node_address": args.node_address or (args.listen_address if specific else host),
            "cluster_secret": secret}


def _install(args: argparse.Namespace, location: Path | None,
             local: bool) -> tuple[Path | None, Path | None, tuple[str, ...]]:
    """The ``/ansys…`` root, the built-in applications' root, and start-up log lines
    saying where each comes from. Options and ``$WEBSOCKETSERVER_APP_ROOT`` win; else
    the install found around the server or in the environment."""
    found = discover(location, os.environ)
    notes = []
    web_root, web_from = args.ansys_install_root, "--ansys_install_root"
    if web_root is None and found is not None and found.web_root is not None:
        web_root, web_from = found.web_root, found.found_by
    if args.http_directory is not None:
        notes.append(f"/ansys... URLs are served from {web_root} ({web_from})"
                     if web_root is not None else
                     "/ansys... URLs are served from --http_directory: no install found "
                     "around the server or in $PYENSIGHT_ANSYS_INSTALLATION, $CEI_HOME, "
                     "$AWP_ROOTnnn")
    app_root, app_from = args.local_app_root, "--local_app_root"
    if app_root is None and os.environ.get(APP_ROOT_ENV):
        app_root, app_from = Path(os.environ[APP_ROOT_ENV]), f"${APP_ROOT_ENV}"
    if app_root is None and found is not None:
        app_root, app_from = found.app_root, found.found_by
    if app_root is None and os.environ.get("PYENSIGHT_ANSYS_INSTALLATION"):
        app_root = Path(os.environ["PYENSIGHT_ANSYS_INSTALLATION"])  # named in the error
        app_from = "$PYENSIGHT_ANSYS_INSTALLATION, which holds no install"
    if local:
        notes.append(f"built-in applications run from {app_root}/bin or {app_root}/CEI/bin "
                     f"({app_from})" if app_root is not None else
                     "built-in applications: no install found (set --local_app_root)")
    return web_root, app_root, tuple(notes)
