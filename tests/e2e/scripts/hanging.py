"""A service whose start() never returns (a blocking call, run in a thread)."""

import time

from websocketserver import RemoteServiceScript


class Hanging(RemoteServiceScript):
    def start(self, index, options):
        time.sleep(3600)

    def stop(self, index):
        pass
