"""websocketserver: put a TCP service (a VNC desktop, a 3D application) into a web page.

The public API for service scripts is :class:`RemoteServiceScript` (and the
:class:`CommandService` and :class:`SlurmService` helpers); everything else is the
server's own. It is loaded on first use, so that importing a part of the server (the
sans-I/O ``core``) loads only that part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .scripts import CommandService, RemoteServiceScript, free_port
    from .slurm_service import SlurmService

__all__ = ["CommandService", "RemoteServiceScript", "SlurmService", "free_port",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("CommandService", "RemoteServiceScript", "free_port"):
        from . import scripts
        return getattr(scripts, name)
    if name == "SlurmService":
        from .slurm_service import SlurmService
        return SlurmService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
