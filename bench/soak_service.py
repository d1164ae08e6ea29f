"""The soak test's service: every instance is the soak's shared echo backend.

No process per instance, so the soak can churn a hundred reserve/connect/close
cycles a second through the whole reservation machinery on two cores.
"""

from typing import Any

from websocketserver import RemoteServiceScript


class SharedBackend(RemoteServiceScript):
    async def start(self, index: int, options: dict[str, Any]) -> tuple[str, int]:  # type: ignore[override]  # async is allowed (scripts.call)
        return "127.0.0.1", int(self._common_options["port"])

    async def stop(self, index: int) -> None:  # type: ignore[override]  # async is allowed (scripts.call)
        pass
