"""The HTTP file server: read-only files and directory listings under a root.

Range requests, ETag / Last-Modified and conditional GETs come from aiohttp's
``FileResponse``. This module's own job is to map a URL to a file without ever
leaving the root: every percent-decoded segment is checked (no ``..``, no ``/`` or
``\\`` or NUL hidden in an escape), and the final path, symlinks resolved, must
still lie inside the root. Anything else is a plain 404, which says nothing about
what exists outside.
"""

from __future__ import annotations

import html
import mimetypes
import re
import stat
import time
from pathlib import Path
from urllib.parse import quote, unquote

from aiohttp import web

_TYPES = mimetypes.MimeTypes()
for _type, _ext in (
    ("text/javascript", ".js"),
    ("text/javascript", ".mjs"),
    ("application/wasm", ".wasm"),
    ("text/css", ".css"),
    ("text/html", ".html"),
    ("text/html", ".htm"),
    ("application/json", ".json"),
    ("image/svg+xml", ".svg"),
    ("application/octet-stream", ".evsn"),
):
    _TYPES.add_type(_type, _ext)

_ANSYS = re.compile(r"ansys\d+")
_BAD_CHARS = ("/", "\\", "\0")


def content_type(path: Path) -> str:
    """The Content-Type served for ``path`` (javascript, wasm, ... always right)."""
    kind, _ = _TYPES.guess_type(path.name, strict=False)
    if kind is None:
        return "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/json", "image/svg+xml"):
        return f"{kind}; charset=utf-8"
    return kind


class FileServer:
    """Serves ``root``; ``/ansysNNN/...`` from ``ansys_root`` when that is configured."""

    def __init__(self, root: Path, ansys_root: Path | None = None) -> None:
        self.root = root.resolve()
        self.ansys_root = ansys_root.resolve() if ansys_root is not None else None

    def locate(self, raw_path: str) -> Path | None:
        """The file or directory a raw (still percent-encoded) URL path names, or None."""
        segments = []
        for raw in raw_path.split("/"):
            segment = unquote(raw, errors="strict") if "%" in raw else raw
            if segment in ("", "."):
                continue
            if segment == ".." or any(c in segment for c in _BAD_CHARS):
                return None
            segments.append(segment)
        base = self.root
        if self.ansys_root is not None and segments and _ANSYS.fullmatch(segments[0]):
            base = self.ansys_root
        try:
            path = base.joinpath(*segments).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return None
        return path if path.is_relative_to(base) else None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            path = self.locate(request.rel_url.raw_path)  # also for absolute-form targets
        except UnicodeDecodeError:
            path = None
        if path is None:
            return _not_found()
        try:
            mode = path.stat().st_mode
        except OSError:
            return _not_found()
        if stat.S_ISDIR(mode):
            if not request.path.endswith("/"):
                return web.Response(status=301, headers={"Location": quote(request.path) + "/"})
            index = path / "index.html"
            if index.is_file() and index.resolve().is_relative_to(path):
                path = index
            else:
                return _listing(request.path, path)
        elif not stat.S_ISREG(mode):
            return _not_found()
        return web.FileResponse(path, headers={"Content-Type": content_type(path)})


def _not_found() -> web.Response:
    return web.Response(status=404, text="404: Not Found")


def _listing(url_path: str, directory: Path) -> web.Response:
    """A plain HTML index of ``directory``: folders first, then files, by name."""
    try:
        entries = sorted(directory.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower()))
    except OSError:
        return _not_found()
    title = html.escape(url_path)
    rows = []
    if url_path != "/":
        rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
    for entry in entries:
        try:
            info = entry.stat()
        except OSError:
            continue  # a dangling symlink: nothing to serve
        is_dir = stat.S_ISDIR(info.st_mode)
        name = entry.name + ("/" if is_dir else "")
        size = "" if is_dir else f"{info.st_size:,}"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.st_mtime))
        rows.append(
            f'<tr><td><a href="{quote(name)}">{html.escape(name)}</a></td>'
            f'<td class="size">{size}</td><td>{when}</td></tr>'
        )
    body = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Index of {title}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em}td{padding:.2em 1.5em .2em 0}"
        ".size{text-align:right}</style></head><body>"
        f"<h1>Index of {title}</h1><table>{''.join(rows)}</table></body></html>"
    )
    return web.Response(text=body, content_type="text/html")
