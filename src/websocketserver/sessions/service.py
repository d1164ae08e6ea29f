"""A service type: its configuration and the one script object that runs its instances;
and where a token's session runs when not here (:class:`Elsewhere`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..scripts import CommandService, ConfiguredCommand, RemoteServiceScript, load_script
from ..settings import ServiceConfig, Settings
from ..slurm_service import ConfiguredSlurmCommand, SlurmService
from .local_apps import LocalApplication


@dataclass(frozen=True)
class Service:
    """A service type: its configuration and its one script object."""

    config: ServiceConfig
    script: RemoteServiceScript

    @classmethod
    def configured(cls, config: ServiceConfig, settings: Settings) -> Service:
        """The service ``config`` describes, with its script object made (a user's
        script is imported: a SettingsError if it cannot be)."""
        script: RemoteServiceScript
        if config.builtin_app is not None:
            script = LocalApplication(config.builtin_app, settings.local_app_root,
                                      settings.local_app_command, settings.start_timeout)
        elif config.slurm is not None:
            script = ConfiguredSlurmCommand(config)
        elif config.command is not None:
            script = ConfiguredCommand(config, settings.start_timeout)
        else:
            script = load_script(config)
        if isinstance(script, CommandService):
            script.service_name = config.name  # its output is logged as name[index]
        return cls(config, script)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def group(self) -> str | None:
        return self.config.options.get("group")

    @property
    def batch(self) -> SlurmService | None:
        """The script, if the service runs as Slurm jobs."""
        return self.script if isinstance(self.script, SlurmService) else None


@dataclass(frozen=True)
class Elsewhere:
    """What a claim answers when the token's reservation runs on another instance of the
    cluster (``node``) and this one has no free slot to take it over (or its Slurm job
    is that instance's): forward its websocket there."""

    node: str
