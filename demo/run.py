"""Run the demo: the ticker service, and websocketserver in front of it.

``python demo/run.py [--ws_port 8080] [--http_port 9090]``: then open
http://localhost:9090/ and watch the ticker's lines arrive through the websocket.
Ctrl-C stops both.
"""

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from websocketserver.scripts import free_port, wait_listening

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws_port", type=int, default=8080)
    parser.add_argument("--http_port", type=int, default=9090)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up as for Ctrl-C
    backend_port = free_port()
    children = [subprocess.Popen([sys.executable, str(HERE / "ticker.py"), str(backend_port)])]
    try:
        wait_listening(backend_port, 10, children[0])
        print(f"demo: open http://127.0.0.1:{args.http_port}/?port={args.ws_port} "
              "in a browser (Ctrl-C stops)", flush=True)
        children.append(subprocess.Popen([
            sys.executable, "-m", "websocketserver", "--http_directory", str(HERE / "www"),
            "--http_port", str(args.http_port), "--client_port", str(backend_port),
            "--listen_address", "127.0.0.1", "--verbose", "1", str(args.ws_port)]))
        return children[-1].wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            child.terminate()
            child.wait()


if __name__ == "__main__":
    sys.exit(main())
