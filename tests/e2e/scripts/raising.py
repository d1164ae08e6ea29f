"""A service whose start() raises."""

from typing import Any

from websocketserver import RemoteServiceScript


class Raising(RemoteServiceScript):
    def start(self, index: int, options: dict[str, Any]) -> tuple[str, int]:
        raise RuntimeError("this service is broken on purpose")

    def stop(self, index: int) -> None:
        pass
