"""A service whose start() raises."""

from websocketserver import RemoteServiceScript


class Raising(RemoteServiceScript):
    def start(self, index, options):
        raise RuntimeError("this service is broken on purpose")

    def stop(self, index):
        pass
