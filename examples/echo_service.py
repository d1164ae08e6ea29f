"""Example service script: one TCP echo server process per instance.

Config (``--remote_session_config services.json``)::

    {"echo": {"script": "echo_service.py", "count": 2, "options": {}}}
"""

import sys
from pathlib import Path

from websocketserver import CommandService


class EchoService(CommandService):
    """Runs examples/echo_server.py on a free port for each reserved instance."""

    def command(self, index, options, port):
        return [sys.executable, str(Path(__file__).with_name("echo_server.py")), str(port)]
