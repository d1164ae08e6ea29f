"""Run the demo: the ticker service, and websocketserver in front of it.

``python demo/run.py [--ws_port 8080] [--http_port 9090]``: then open
http://127.0.0.1:9090/?port=8080 and watch the ticker's lines arrive through the
websocket. Ctrl-C stops both.

``python demo/run.py --desktop``: the server with the example desktop service
(Xvfb + x11vnc, ``examples/desktop_services.json``) and a noVNC page,
``demo/www/embed.html``, that reserves a desktop, shows it and releases it when the
page is left. Needs Xvfb, x11vnc and xsetroot (and tkinter for the desktop's clock),
and noVNC's library (the npm package ``@novnc/novnc``): taken from ``.test-deps/`` or
``$NOVNC_DIR``, else installed there with npm.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from websocketserver.scripts import free_port, wait_listening

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DESKTOP_CONFIG = ROOT / "examples" / "desktop_services.json"
NOVNC_VERSION = "1.7.0"  # as scripts/install-test-deps
NOVNC_PREFIX = ROOT / ".test-deps"
NOVNC_DEFAULT = NOVNC_PREFIX / "node_modules" / "@novnc" / "novnc"
X_PROGRAMS = {"Xvfb": "xvfb", "x11vnc": "x11vnc", "xsetroot": "x11-xserver-utils"}


def find_novnc() -> Path:
    """noVNC's library (``core/rfb.js``): ``$NOVNC_DIR``, ``.test-deps/``, or npm it there."""
    where = Path(os.environ.get("NOVNC_DIR") or NOVNC_DEFAULT)
    if (where / "core" / "rfb.js").is_file():
        return where
    if "NOVNC_DIR" in os.environ:
        sys.exit(f"demo: no noVNC library at $NOVNC_DIR={where} (core/rfb.js missing)")
    if shutil.which("npm") is None:
        sys.exit("demo: --desktop needs noVNC: install npm (Debian: apt install npm), "
                 "or set NOVNC_DIR to a noVNC checkout or the npm package @novnc/novnc")
    print(f"demo: installing noVNC {NOVNC_VERSION} (npm @novnc/novnc) into {NOVNC_PREFIX}/",
          flush=True)
    subprocess.run(["npm", "install", "--prefix", str(NOVNC_PREFIX), "--no-audit",
                    "--no-fund", "--loglevel=error", f"@novnc/novnc@{NOVNC_VERSION}"],
                   check=True)
    return where


def desktop_site(where: Path) -> Path:
    """A web root: the demo's pages beside noVNC's ``core/`` and ``vendor/``.

    Copies, not symlinks: the file server never follows a link out of its root.
    """
    missing = [name for name in X_PROGRAMS if shutil.which(name) is None]
    if missing:
        packages = " ".join(sorted({X_PROGRAMS[name] for name in missing}))
        sys.exit(f"demo: --desktop needs {', '.join(missing)} (Debian: apt install {packages})")
    novnc = find_novnc()
    shutil.copytree(HERE / "www", where)
    for part in ("core", "vendor"):
        shutil.copytree(novnc / part, where / part)
    return where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws_port", type=int, default=8080)
    parser.add_argument("--http_port", type=int, default=9090)
    parser.add_argument("--desktop", action="store_true",
                        help="reserve an X desktop and view it in noVNC instead")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up as for Ctrl-C
    children: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="websocketserver-demo-") as scratch:
        try:
            if args.desktop:
                site = desktop_site(Path(scratch) / "www")
                backend = ["--remote_session_config", str(DESKTOP_CONFIG)]
                page = f"embed.html?port={args.ws_port}"
            else:
                site, backend_port = HERE / "www", free_port()
                children.append(subprocess.Popen(
                    [sys.executable, str(HERE / "ticker.py"), str(backend_port)]))
                wait_listening(backend_port, 10, children[0])
                backend = ["--client_port", str(backend_port)]
                page = f"?port={args.ws_port}"
            print(f"demo: open http://127.0.0.1:{args.http_port}/{page} "
                  "in a browser (Ctrl-C stops)", flush=True)
            children.append(subprocess.Popen([
                sys.executable, "-m", "websocketserver", "--http_directory", str(site),
                "--http_port", str(args.http_port), *backend,
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
