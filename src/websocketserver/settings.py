"""Validated settings: what the command line and the service config file say.

Everything here is checked once, at start-up, so that a mistake is reported as one
clear line before any socket is opened (see :class:`SettingsError`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import ssl
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema

BUILTIN_APPS = ("ensight", "envision")


class SettingsError(Exception):
    """A start-up problem the user must fix; its message is one line."""


@dataclass(frozen=True)
class ServiceConfig:
    """One service type of ``--remote_session_config`` (or a built-in one)."""

    name: str
    script: Path | None  # None for the built-in applications and "command" services
    count: int
    options: dict[str, Any]
    builtin_app: str | None = None
    reconnect_grace: float | None = None  # None: --reconnect_grace
    cluster_scope: bool = False  # "scope": "cluster": count slots for the whole cluster
    command: tuple[str, ...] | None = None  # a "command" service's command line
    directory: Path | None = None  # where a "command" service runs: its config's folder
    slurm: SlurmConfig | None = None  # run as a Slurm job (see docs/slurm.md)
    start: str = "connect"  # "reserve": a batch job is submitted at /v1/reserve
    queue_timeout: float = 3600.0  # seconds a websocket waits for a queued job
    protocol: str | None = None  # "rfb": the proxy may parse it (view-only sharing)
    max_viewers: int = 4  # viewers of shares per instance (0: no sharing)


@dataclass(frozen=True)
class SlurmConfig:
    """A service's ``"slurm"`` object: its command runs as a Slurm job."""

    sbatch: tuple[str, ...] = ()  # more sbatch arguments; {index} and options substituted
    user_prefix: tuple[str, ...] = ()  # e.g. sudo -n -u {user}: Slurm's commands as the user


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to run; built by :mod:`websocketserver.cli`."""

    ws_port: int  # -1: no websocket listener
    http_directory: Path | None = None
    http_port: int = 9090
    cert: Path | None = None
    key: Path | None = None
    remote_session_config: Path | None = None
    client_hostname: str = "localhost"
    client_port: int | None = None
    timeout: float = 300.0
    local_sessions: tuple[tuple[str, int], ...] = ()
    verbose: int = 0
    log_file: Path | None = None
    log_format: str = "text"  # "json": one JSON object a line (logs.JsonFormatter)
    security_token: str | None = None
    add_headers: tuple[tuple[str, str], ...] = ()
    grpc_port: int | None = None
    listen_address: str | None = None
    ansys_install_root: Path | None = None
    start_timeout: float = 60.0
    stop_timeout: float = 10.0
    max_message_size: int = 64 * 1024 * 1024
    max_upstream_buffer: int = 64 * 1024 * 1024
    local_app_root: Path | None = None
    local_app_command: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    user_header: str = "X-Remote-User"
    users_file: Path | None = None
    groups_file: Path | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # --allowed_host: names besides the machine's own
    host_names: frozenset[str] | None = None  # every name answered to (cli); None: any
    max_tunnels: int = 10000
    max_tunnels_per_client: int = 1000
    max_tunnels_per_user: int = 100
    max_header_size: int = 8190
    max_http_connections: int = 1000
    handshake_timeout: float = 10.0
    ping_interval: float | None = None
    idle_timeout: float | None = None
    relay_processes: int = 1
    reconnect_grace: float = 0.0  # seconds a started instance outlives its websocket
    redis: str | None = None  # the cluster's shared store; None: one server, in memory
    node_name: str = ""  # this instance in the cluster (cli: hostname:ws_port)
    node_address: str = ""  # where the other instances reach its websocket port
    cluster_secret: str | None = None  # authenticates instance-to-instance forwards
    heartbeat_ttl: float = 6.0  # an instance silent this long is suspected dead
    job_report_url: str = ""  # where Slurm jobs report their port ("": no Slurm service)
    services: tuple[ServiceConfig, ...] = field(default=())
    install_notes: tuple[str, ...] = ()  # where /ansys... and the built-in apps come from
    warnings: tuple[str, ...] = ()  # options that do nothing as given, logged at start-up

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server context (TLS >= 1.2) for both listeners, or None for plain ws/http."""
        if self.cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            names = f"{self.cert}" + (f" / {self.key}" if self.key else "")
            raise SettingsError(f"cannot load TLS certificate {names}: {_reason(exc)}") from None
        return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


_SERVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["count"],
    "properties": {
        "script": {"type": "string", "minLength": 1},
        "command": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "count": {"type": "integer", "minimum": 1},
        "reconnect_grace": {"type": "number", "minimum": 0},
        "scope": {"enum": ["node", "cluster"]},
        "slurm": {
            "type": "object",
            "properties": {
                "sbatch": {"type": "array", "items": {"type": "string"}},
                "user_prefix": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            },
        },
        "start": {"enum": ["connect", "reserve"]},
        "protocol": {"enum": ["rfb"]},
        "max_viewers": {"type": "integer", "minimum": 0},
        "queue_timeout": {"type": "number", "exclusiveMinimum": 0},
        "options": {  # free-form: the script's own options beside the server's two
            "type": "object",
            "properties": {
                "group": {"type": "string", "minLength": 1},
                "file_ext": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}
SERVICE_FIELDS = tuple(_SERVICE_SCHEMA["properties"])
"""Every field of a service entry; any other is a mistake (see :func:`unknown_field`)."""
SLURM_FIELDS = tuple(_SERVICE_SCHEMA["properties"]["slurm"]["properties"])


def unknown_field(entry: dict[str, Any]) -> str | None:
    """What is wrong with the first field of a service entry (or of its ``"slurm"``)
    that no feature reads, with the field it was probably meant to be; None if none.

    A misspelled field would otherwise do nothing, silently, or be reported as the
    required field it misspells (``"scrip"``: "'script' is required").
    """
    checks = [("", entry, SERVICE_FIELDS)]
    if isinstance(entry.get("slurm"), dict):
        checks.append(("slurm.", entry["slurm"], SLURM_FIELDS))
    for prefix, fields, known in checks:
        for key in fields:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = (f"did you mean {prefix + close[0]!r}?" if close
                        else f"known: {', '.join(known)}")
                return f"unknown field {prefix + key!r} ({hint})"
    return None


def load_service_config(path: Path) -> tuple[ServiceConfig, ...]:
    """Read and validate ``--remote_session_config``; errors name the service and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read --remote_session_config {path}: {_reason(exc)}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"--remote_session_config {path} is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(
            f"--remote_session_config {path}: invalid JSON at line {exc.lineno} "
            f"column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(document, dict):
        raise SettingsError(
            f"--remote_session_config {path}: expected a JSON object of services, "
            f"got {type(document).__name__}"
        )
    import jsonschema  # imported here: ~60 ms, needed only with a services file

    validator = jsonschema.Draft202012Validator(_SERVICE_SCHEMA)
    services = []
    for name, entry in document.items():
        where = f"--remote_session_config {path}: service {name!r}"
        unknown = unknown_field(entry) if isinstance(entry, dict) else None
        if unknown is not None:  # before "required": "scrip" is no missing "script"
            raise SettingsError(f"{where}: {unknown}")
        error = jsonschema.exceptions.best_match(validator.iter_errors(entry))
        if error is not None:
            field_name = ".".join(str(p) for p in error.absolute_path) or _missing_field(error)
            raise SettingsError(f"{where}: field {field_name!r}: {_schema_message(error)}")
        if "script" not in entry and "command" not in entry:
            raise SettingsError(f"{where}: field 'script': is required (or 'command')")
        if "script" in entry and "command" in entry:
            raise SettingsError(f"{where}: give 'script' or 'command', not both")
        directory = path.resolve().parent
        script = command = None
        if "script" in entry:
            script = Path(entry["script"])
            if not script.is_absolute():
                script = directory / script
        else:
            command = tuple(entry["command"])
            vnc = entry.get("protocol") == "rfb" and "slurm" not in entry
            if not vnc and any("{vnc_password" in argument for argument in command):
                raise SettingsError(f"{where}: field 'command': {{vnc_password}} and "
                                    "{vnc_password_file} need \"protocol\": \"rfb\" (the "
                                    "proxy logs in with them), and no \"slurm\"")
            _check_command(where, command, entry.get("options", {}), directory,
                           on_node="slurm" in entry, vnc=vnc)
        slurm = None
        if "slurm" in entry:
            if command is None:
                raise SettingsError(f"{where}: field 'slurm': needs a 'command' (a script "
                                    "subclasses SlurmService instead)")
            slurm = _slurm_config(where, entry["slurm"], entry.get("options", {}))
        elif "start" in entry or "queue_timeout" in entry:
            field_name = "start" if "start" in entry else "queue_timeout"
            raise SettingsError(f"{where}: field {field_name!r}: only a service with "
                                "'slurm' has it")
        services.append(
            ServiceConfig(
                name=name,
                script=script,
                count=entry["count"],
                options=dict(entry.get("options", {})),
                reconnect_grace=entry.get("reconnect_grace"),
                cluster_scope=entry.get("scope") == "cluster",
                command=command,
                directory=directory if command is not None else None,
                slurm=slurm,
                start=entry.get("start", "connect"),
                queue_timeout=float(entry.get("queue_timeout", 3600.0)),
                protocol=entry.get("protocol"),
                max_viewers=entry.get("max_viewers", 4),
            )
        )
    return tuple(services)


def _slurm_config(where: str, entry: dict[str, Any], options: dict[str, Any]) -> SlurmConfig:
    """Check ``"slurm"``: a placeholder in ``"sbatch"`` may only be the value of an option
    the config writes (``--partition={queue}``), never a whole argument: a reservation's
    value must not become an sbatch option of its own choosing (``--uid=0``)."""
    known = ["index", *command_values(options)]
    sbatch = tuple(entry.get("sbatch", ()))
    for position, argument in enumerate(sbatch):
        field_name = f"slurm.sbatch[{position}]"
        names = _known_placeholders(where, field_name, argument, known)
        option, equals, _ = argument.partition("=")
        if names and not (option.startswith("--") and equals and not placeholders(option)):
            raise SettingsError(f"{where}: field {field_name!r}: a placeholder may only be "
                                f"the value of a fixed option (--name={{value}}), not "
                                f"{argument}")
    prefix = tuple(entry.get("user_prefix", ()))
    for position, argument in enumerate(prefix):
        try:
            names = placeholders(argument)
        except ValueError as exc:
            raise SettingsError(f"{where}: field 'slurm.user_prefix[{position}]': {exc}"
                                ) from None
        if any(name != "user" for name in names):
            raise SettingsError(f"{where}: field 'slurm.user_prefix[{position}]': the only "
                                "placeholder is {user}")
    if prefix and not any("{user}" in argument for argument in prefix):
        raise SettingsError(f"{where}: field 'slurm.user_prefix': names no {{user}}")
    return SlurmConfig(sbatch=sbatch, user_prefix=prefix)


COMMAND_FIELDS = ("port", "index")
"""Placeholders every "command" service has; the others are its options' names."""
VNC_FIELDS = ("vnc_password", "vnc_password_file")
"""Placeholders of an RFB "command" service: a password the proxy logs in with."""

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def placeholders(argument: str) -> list[str]:
    """The ``{name}`` placeholders of one command-line argument (``{{`` and ``}}`` are
    literal braces); ValueError for anything but plain names (``{a.b}``, ``{a:5}``)."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(argument):
        if name is None:
            continue
        if spec or conversion or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a plain {{name}}")
        names.append(name)
    return names


def command_values(options: dict[str, Any]) -> dict[str, str]:
    """The option values a command line may use: those that are text, numbers or
    booleans (a list or object has no single command-line form)."""
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in options.items()
            if isinstance(value, str | int | float | bool)
            and key not in (*COMMAND_FIELDS, *VNC_FIELDS)}


def _check_command(where: str, command: tuple[str, ...], options: dict[str, Any],
                   directory: Path, on_node: bool = False, vnc: bool = False) -> None:
    """Every placeholder is known and the program is fixed and exists, checked at
    start-up (``on_node``: it runs on a compute node, where this host cannot look)."""
    known = [*COMMAND_FIELDS, *(VNC_FIELDS if vnc else ()), *command_values(options)]
    for position, argument in enumerate(command):
        _known_placeholders(where, f"command[{position}]", argument, known,
                            "; an option becomes one when \"options\" gives it a text or "
                            "number value")
    program = command[0]
    if not program:
        raise SettingsError(f"{where}: field 'command[0]': the program must not be empty")
    if placeholders(program):  # else a reservation's option would choose what runs
        raise SettingsError(f"{where}: field 'command[0]': the program must be fixed, not "
                            f"a placeholder ({program}): a reservation's options could "
                            "choose what runs")
    if on_node:
        return
    if os.sep in program or (os.altsep and os.altsep in program):
        found = (directory / program).is_file() and os.access(directory / program, os.X_OK)
        if not found:
            raise SettingsError(f"{where}: field 'command[0]': {directory / program} is "
                                "not an executable file (a relative program is relative to "
                                "the config file's folder)")
    elif shutil.which(program) is None:
        raise SettingsError(f"{where}: field 'command[0]': program {program!r} not found "
                            "on PATH")


def _known_placeholders(where: str, field_name: str, argument: str, known: list[str],
                        hint: str = "") -> list[str]:
    """The placeholders of ``argument``; a SettingsError for a malformed or unknown one
    (``hint`` ends its message)."""
    try:
        names = placeholders(argument)
    except ValueError as exc:
        raise SettingsError(f"{where}: field {field_name!r}: {exc}") from None
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SettingsError(
            f"{where}: field {field_name!r}: unknown placeholder {{{unknown[0]}}} "
            f"(known: {', '.join('{' + name + '}' for name in known)}{hint})")
    return names


def _missing_field(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        return str(error.message).split("'")[1]
    return "(service)"


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        return "is required"
    if error.validator == "type":
        return f"must be of type {error.validator_value}"
    if error.validator == "minimum":
        return f"must be >= {error.validator_value}"
    if error.validator in ("minLength", "minItems"):
        return "must not be empty"
    return str(error.message)
