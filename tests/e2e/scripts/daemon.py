"""A service whose command double-forks a daemon that then serves the port.

The instance's own process exits at once; only the daemon (re-parented away from
its starter) keeps running, so stop() has to find it by its marker.
"""

import sys
from pathlib import Path
from typing import Any

from websocketserver import CommandService

ECHO = Path(__file__).resolve().parents[3] / "examples" / "echo_server.py"
DAEMONIZE = (
    "import os, sys\n"
    "if os.fork(): sys.exit(0)\n"
    "os.setsid()\n"
    "if os.fork(): sys.exit(0)\n"
    "os.execv(sys.executable, [sys.executable, sys.argv[1], sys.argv[2]])\n"
)


class Daemon(CommandService):
    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        return [sys.executable, "-c", DAEMONIZE, str(ECHO), str(port)]
