"""A service whose start() never returns (a blocking call, run in a thread)."""

import time
from typing import Any

from websocketserver import RemoteServiceScript


class Hanging(RemoteServiceScript):
    def start(self, index: int, options: dict[str, Any]) -> tuple[str, int]:
        time.sleep(3600)
        raise RuntimeError("still starting after an hour")

    def stop(self, index: int) -> None:
        pass
