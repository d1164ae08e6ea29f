"""The built-in services of ``--local_session ensight N`` / ``envision N``.

Each instance launches the application with its embedded VNC server on a free port,
as the original did::

    {root}/bin/ensight -batch -vnc vnc://%3Frfb_port={port}%26use_auth=0 [target_pathname]

``{root}`` is ``--local_app_root`` or the install found at start-up (see
:mod:`.install`), or its ``CEI`` folder: an install's version directory (``.../v261``,
as ``$PYENSIGHT_ANSYS_INSTALLATION`` names it) holds the application under
``v261/CEI/bin``. ``--local_app_command`` replaces the whole command line, so that any
VNC-serving program can stand in for the application.
A missing installation is not a start-up error (launchers always pass
``--local_session envision 5``): it is reported when a reservation is activated.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ..scripts import CommandService

DEFAULT_COMMAND = "{root}/bin/{app} -batch -vnc vnc://%3Frfb_port={port}%26use_auth=0"


class LocalApplication(CommandService):
    """Runs EnSight or EnVision (or the configured stand-in) per instance."""

    def __init__(self, app: str, root: Path | None, command: str | None,
                 start_timeout: float) -> None:
        super().__init__({})
        self.app = app
        self.root = root
        self.template = command or DEFAULT_COMMAND
        self.start_timeout = start_timeout

    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        if self.root is None and "{root}" in self.template:
            raise RuntimeError(f"{self.app} is not installed here: no install directory "
                               "(set --local_app_root or $WEBSOCKETSERVER_APP_ROOT)")
        roots = [self.root, self.root / "CEI"] if self.root is not None else [None]
        tried: list[str] = []
        for root in roots:
            argv = self._argv(root, options, port)
            if shutil.which(argv[0]) is not None or os.access(argv[0], os.X_OK):
                return argv
            tried.append(argv[0])
        programs = list(dict.fromkeys(tried))  # the same when the command has no {root}
        raise RuntimeError(f"{self.app} is not installed here: " + (
            f"neither {programs[0]} nor {programs[1]} exists" if len(programs) > 1
            else f"{programs[0]} not found"))

    def working_directory(self) -> Path | None:
        """The server's: a relative ``--local_app_command`` program or ``target_pathname``
        means what it means on the server's command line."""
        return None

    def _argv(self, root: Path | None, options: dict[str, Any], port: int) -> list[str]:
        target = options.get("target_pathname", "")
        fields = {"app": self.app, "root": str(root), "port": str(port),
                  "target_pathname": target}
        argv = [arg.format(**fields) for arg in shlex.split(self.template)]
        argv = [arg for arg in argv if arg]  # an empty {target_pathname} adds nothing
        if target and "{target_pathname}" not in self.template:
            argv.append(target)
        return argv
