"""A service that returns a port nobody listens on (async start/stop)."""

from websocketserver import RemoteServiceScript, free_port


class NoListener(RemoteServiceScript):
    async def start(self, index, options):
        return "127.0.0.1", free_port()

    async def stop(self, index):
        pass
