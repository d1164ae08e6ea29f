"""websocketserver: put a TCP service (a VNC desktop, a 3D application) into a web page.

The public API for service scripts is :class:`RemoteServiceScript` (and the
:class:`CommandService` helper); everything else is the server's own.
"""

__version__ = "0.1.0"

from .scripts import CommandService, RemoteServiceScript, free_port  # noqa: E402

__all__ = ["CommandService", "RemoteServiceScript", "free_port", "__version__"]
