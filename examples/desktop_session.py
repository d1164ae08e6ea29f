"""Example service script: one VNC desktop (Xvfb + x11vnc) per instance.

Config (``--remote_session_config desktop_services.json``)::

    {"desktop": {"script": "desktop_session.py", "count": 2,
                 "options": {"sizes": ["1280x1024", "1600x1200"], "display_base": 100}}}

Common options (all optional):

``sizes``
    Screen sizes ``"WxH"``; instance ``index`` gets ``sizes[index % len(sizes)]``.
    Default ``["1280x1024"]``.
``display_base``
    Instance ``index`` runs on X display ``:display_base+index`` (default 100); when
    that display is taken, Xvfb picks a free one instead.
``vnc_password``
    ``true``: each instance gets a random VNC password that the server logs in with for
    every browser (the service must declare ``"protocol": "rfb"``). Default: none.
``color``
    Background colour of the desktop, anything ``xsetroot -solid`` takes (default
    ``#3366cc``). A reservation may set its own: ``/v1/reserve/desktop?color=red``.

Each instance is this file run as a program: it starts Xvfb, waits until Xvfb is
ready, paints the root window with ``xsetroot``, starts a clock in its lower right
corner and then becomes ``x11vnc``, with Xvfb and the clock as its children (which get
SIGTERM should x11vnc die). The clock is there so that a live desktop can be told from
a frozen view, which one flat colour cannot; it is small, so the desktop is still its
colour almost everywhere (without Python's ``tkinter`` there is no clock). Stopping the
instance ends the whole process tree, so all three go. Run by hand, it serves one
desktop for basic mode (``--client_port 5900``)::

    python desktop_session.py --size 1024x768 --color orange 5900

As a Slurm job (``examples/slurm_services.json``) it runs on a compute node, where
nothing of websocketserver is installed: the program needs Python's standard library
only, and ``--allow HOST`` makes x11vnc listen on the node's interfaces for that host
(the web server) alone, instead of on localhost.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    from websocketserver import CommandService
except ImportError:  # run as a program where the server is not installed (a Slurm job)
    CommandService = object  # type: ignore[misc,assignment]

DEFAULT_SIZE = "1280x1024"
DEFAULT_DISPLAY_BASE = 100
DEFAULT_COLOR = "#3366cc"
XVFB_TIMEOUT = 30.0
_SIZE = re.compile(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}")


class DesktopSession(CommandService):
    """A virtual X desktop served by x11vnc for each reserved instance."""

    def __init__(self, common_options: dict[str, Any]) -> None:
        super().__init__(common_options)
        self._sizes = [str(size) for size in common_options.get("sizes", [DEFAULT_SIZE])]
        bad = [size for size in self._sizes if not _SIZE.fullmatch(size)]
        if not self._sizes or bad:
            raise ValueError(f"option 'sizes' must list sizes like '1600x1200', got {bad}")
        self._display_base = int(common_options.get("display_base", DEFAULT_DISPLAY_BASE))
        self._password = bool(common_options.get("vnc_password", False))

    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        color = options.get("color") or self._common_options.get("color", DEFAULT_COLOR)
        # "--opt=value": a reservation's value cannot pass for an option of its own
        # "vnc_password": a random VNC password per instance, in a file only this user
        # reads; the server logs in with it for every browser ("protocol": "rfb"), so
        # no page or URL holds it
        login = [f"--rfbauth={self.vnc_password_file(index)}"] if self._password else []
        return [sys.executable, str(Path(__file__).resolve()),
                f"--display={self._display_base + index}",
                f"--size={self._sizes[index % len(self._sizes)]}",
                f"--color={color}", f"--name=desktop {index}", *login, str(port)]


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent (later x11vnc) ends."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _display_free(display: int) -> bool:
    return not (Path(f"/tmp/.X{display}-lock").exists()
                or Path(f"/tmp/.X11-unix/X{display}").exists())


def _read_line(fd: int, deadline: float) -> bytes:
    """Read from ``fd`` up to a newline; b"" if it closes or time runs out first."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b""
        chunk = os.read(fd, 64)
        if not chunk:
            return b""
        data += chunk
    return data


def start_clock(display: int) -> None:
    """Show the time, to the second, in the lower right corner of ``:display``, from a
    child process named ``clock`` (it ends with the display or with its parent)."""
    try:
        import tkinter
    except ImportError as exc:  # e.g. a node without python3-tk: a desktop all the same
        print(f"desktop_session: no clock on the desktop: {exc}", file=sys.stderr)
        return
    if os.fork() != 0:
        return
    try:
        _die_with_parent()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(15, b"clock", 0, 0, 0)  # PR_SET_NAME: ps shows "clock"
        root = tkinter.Tk(screenName=f":{display}", className="clock")
        root.overrideredirect(True)  # no window manager: just a box of the time
        label = tkinter.Label(root, font=("TkFixedFont", 12), fg="white", bg="black")
        label.pack()

        def tick() -> None:
            label.configure(text=time.strftime(" %H:%M:%S "))
            root.after(1000 - int(time.time() * 1000) % 1000, tick)

        tick()
        root.geometry("-0-0")
        root.mainloop()
    except Exception as exc:  # the clock's end is never the desktop's
        print(f"desktop_session: clock: {exc}", file=sys.stderr)
    finally:
        os._exit(0)


def start_xvfb(display: int, size: str, timeout: float = XVFB_TIMEOUT
               ) -> tuple[subprocess.Popen[bytes], int]:
    """Start Xvfb on ``:display`` (or a free display if taken); return it and its number.

    ``-displayfd`` makes Xvfb write its display number once it accepts clients, so
    this returns only when the display is ready.
    """
    attempts = ([f":{display}"], []) if _display_free(display) else ([],)
    for explicit in attempts:
        read_fd, write_fd = os.pipe()
        try:
            xvfb = subprocess.Popen(
                ["Xvfb", *explicit, "-screen", "0", f"{size}x24", "-nolisten", "tcp",
                 "-noreset", "-displayfd", str(write_fd)],
                stdin=subprocess.DEVNULL, pass_fds=[write_fd], preexec_fn=_die_with_parent)
        finally:
            os.close(write_fd)
        try:
            number = _read_line(read_fd, time.monotonic() + timeout)
        finally:
            os.close(read_fd)
        if number:
            return xvfb, int(number)
        xvfb.kill()
        xvfb.wait()
    raise RuntimeError(f"Xvfb did not start on :{display} nor on a display of its choice")


def main(argv: list[str] | None = None) -> None:
    """Start Xvfb, paint it, then exec x11vnc on ``port`` (never returns on success)."""
    parser = argparse.ArgumentParser(description="Serve a virtual X desktop over VNC.")
    parser.add_argument("port", type=int, help="VNC port (x11vnc listens on localhost)")
    parser.add_argument("--display", type=int, default=DEFAULT_DISPLAY_BASE,
                        help="preferred X display number")
    parser.add_argument("--size", default=DEFAULT_SIZE, help="screen size WxH")
    parser.add_argument("--color", default=DEFAULT_COLOR, help="background colour")
    parser.add_argument("--name", default="desktop", help="desktop name shown to clients")
    parser.add_argument("--rfbauth", metavar="FILE",
                        help="a VNC password file (vncpasswd's format): clients must log "
                             "in with it (default: no password)")
    parser.add_argument("--allow", metavar="HOST",
                        help="listen on every interface, for connections from HOST only "
                             "(the web server, when this runs on a compute node)")
    args = parser.parse_args(argv)
    if not _SIZE.fullmatch(args.size):
        parser.error(f"bad --size {args.size!r}, expected WxH")
    try:
        _, display = start_xvfb(args.display, args.size)
    except (OSError, RuntimeError) as exc:
        sys.exit(f"desktop_session: {exc}")
    try:
        subprocess.run(["xsetroot", "-display", f":{display}", "-solid", args.color],
                       stdin=subprocess.DEVNULL, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:  # a plain desktop will do
        print(f"desktop_session: cannot paint the desktop: {exc}", file=sys.stderr)
    start_clock(display)
    where = ["-allow", args.allow] if args.allow else ["-localhost"]
    login = ["-rfbauth", args.rfbauth] if args.rfbauth else ["-nopw"]
    try:
        os.execvp("x11vnc", ["x11vnc", "-display", f":{display}", "-rfbport", str(args.port),
                             *where, "-forever", "-shared", *login, "-quiet",
                             "-desktop", args.name])
    except OSError as exc:  # Xvfb gets SIGTERM as this process exits
        sys.exit(f"desktop_session: cannot run x11vnc: {exc.strerror or exc}")


if __name__ == "__main__":
    main()
