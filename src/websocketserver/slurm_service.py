"""The plugin API of services whose instances run as Slurm jobs: :class:`SlurmService`
(a script subclasses it) and the ``"command"`` services with a ``"slurm"`` object.

Beside :mod:`.scripts` (the base class, the command helper), which the server's Slurm
part (:mod:`.sessions.jobs`) does not need.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from .scripts import RemoteServiceScript, defining_folder, substitute
from .settings import ServiceConfig, command_values


class SlurmService(RemoteServiceScript):
    """Base class of a service whose instances run as Slurm jobs (docs/slurm.md).

    The server submits one job per instance, with the shipped in-job launcher as its
    script: on the node that launcher picks a free port, runs :meth:`command` with
    ``{port}`` in it replaced, and reports the port back; the server tunnels to the
    node Slurm allocated. So the server, not this object, starts and stops instances
    (``start``/``stop``/``alive`` are not called); a subclass says what runs and how.
    """

    start_mode = "connect"
    """``"connect"``: submit when the websocket arrives (the manual's rule);
    ``"reserve"``: at ``/v1/reserve``, so the job queues while the page loads."""
    queue_timeout = 3600.0
    """Seconds a websocket waits for a queued job before it is closed (and the job
    cancelled)."""
    user_prefix: tuple[str, ...] = ()
    """Slurm's commands run through this (``("sudo", "-n", "-u", "{user}")``) so the job
    is the reserving user's; refused for anonymous callers. Empty: the server's user."""

    def command(self, index: int, options: dict[str, Any]) -> list[str]:
        """The command line run on the node; ``{port}`` marks the port (``{{``/``}}``
        are single braces there)."""
        raise NotImplementedError

    def sbatch(self, index: int, options: dict[str, Any]) -> list[str]:
        """More ``sbatch`` arguments (partition, ``--time``, ``--licenses``, GPUs)."""
        return []

    def environment(self, index: int, options: dict[str, Any]) -> dict[str, str]:
        """Extra environment variables for the command (through sbatch's)."""
        return {}

    def working_directory(self) -> Path | None:
        """Where the job starts (sbatch's ``--chdir``): the subclass's folder."""
        return defining_folder(self)

    def start(self, index: int, options: dict[str, Any]) -> tuple[str, int]:
        raise RuntimeError("a SlurmService's instances are started by the server, in Slurm")

    def stop(self, index: int) -> None:
        raise RuntimeError("a SlurmService's instances are stopped by the server, in Slurm")


class ConfiguredSlurmCommand(SlurmService):
    """A ``"command"`` service with a ``"slurm"`` object: its command as a Slurm job;
    ``{index}`` and option values are substituted here, ``{port}`` on the node."""

    def __init__(self, service: ServiceConfig) -> None:
        super().__init__(dict(service.options))
        assert service.command is not None and service.slurm is not None
        self._template = service.command
        self._sbatch = service.slurm.sbatch
        self._directory = service.directory
        self.start_mode = service.start
        self.queue_timeout = service.queue_timeout
        self.user_prefix = service.slurm.user_prefix

    def _values(self, index: int, options: dict[str, Any]) -> dict[str, str]:
        values = command_values(self._common_options)
        values.update({key: str(value) for key, value in options.items() if key in values})
        values["index"] = str(index)
        return values

    def command(self, index: int, options: dict[str, Any]) -> list[str]:
        values = {name: _braces(value) for name, value in self._values(index, options).items()}
        values["port"] = "{port}"
        return ["".join(_braces(literal) + (values[name] if name is not None else "")
                        for literal, name, _, _ in string.Formatter().parse(argument))
                for argument in self._template]

    def sbatch(self, index: int, options: dict[str, Any]) -> list[str]:
        values = self._values(index, options)
        return [substitute(argument, values) for argument in self._sbatch]

    def working_directory(self) -> Path | None:
        return self._directory


def _braces(text: str) -> str:
    """``text`` with its braces doubled: literal for the in-job launcher's ``{port}``."""
    return text.replace("{", "{{").replace("}", "}}")
