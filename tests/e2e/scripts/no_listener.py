"""A service that returns a port nobody listens on (async start/stop)."""

from typing import Any

from websocketserver import RemoteServiceScript, free_port


class NoListener(RemoteServiceScript):
    async def start(self, index: int, options: dict[str, Any]) -> tuple[str, int]:  # type: ignore[override]  # async is allowed (scripts.call)
        return "127.0.0.1", free_port()

    async def stop(self, index: int) -> None:  # type: ignore[override]  # async is allowed (scripts.call)
        pass
