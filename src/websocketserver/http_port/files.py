"""The HTTP file server: read-only files and directory listings under a root.

This module's job is to map a URL to a file without ever leaving the root: every
percent-decoded segment is checked (no ``..``, no ``/`` or ``\\`` or NUL hidden in an
escape, no dotfile), and the final path, symlinks resolved, must still lie inside the
root (for ``/ansysNNN/``, inside that one version folder). Anything else is a plain
404, which says nothing about what exists outside. A listing shows exactly the entries
that could be fetched, so it says nothing about outside targets either, and a redirect
only ever names a path on this server. A listing is built in a thread, and shows at
most :data:`LISTING_LIMIT` entries: a folder of 50,000 files took 1.9 s of the event
loop, which every tunnel and ``/v1/health`` waited for.

Sending the file (sendfile, ETag / Last-Modified, conditional GETs) is aiohttp's
``FileResponse``; the Range and If-Range headers are judged here, by RFC 9110, and
aiohttp is handed at most one plain byte range (see :func:`_range_for`).
"""

from __future__ import annotations

import asyncio
import html
import math
import mimetypes
import os
import re
import stat
import time
from pathlib import Path
from urllib.parse import quote, unquote

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from ..install import version_folder

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

_ANSYS = re.compile(r"ansys\d*")
_BAD_CHARS = ("/", "\\", "\0")
_WELL_KNOWN = ".well-known"  # RFC 8615 site metadata: the one dot-name served
_RANGE_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)
# aiohttp answers 416 with ``Content-Range: bytes */LEN`` (LEN from the file it opened)
# to a Range it cannot parse: the way to ask it for a 416 after its precondition checks.
_UNSATISFIABLE = "bytes=*"

LISTING_LIMIT = 10_000
"""Most entries a directory listing shows (folders first, then files, by name); a line
under them says how many more the folder holds."""


def content_type(path: Path) -> str:
    """The Content-Type served for ``path`` (javascript, wasm, ... always right)."""
    kind, _ = _TYPES.guess_type(path.name, strict=False)
    if kind is None:
        return "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/json", "image/svg+xml"):
        return f"{kind}; charset=utf-8"
    return kind


def _hidden(name: str) -> bool:
    """Dotfiles (``.git``, ``.env``, ``.htpasswd``...) are never listed or served."""
    return name.startswith(".") and name != _WELL_KNOWN


def _segments(raw_path: str) -> list[str] | None:
    """The decoded segments of a raw URL path (``//`` and ``.`` dropped), None if refused.

    Raises UnicodeDecodeError for an escape that is not UTF-8.
    """
    segments = []
    for raw in raw_path.split("/"):
        segment = unquote(raw, errors="strict") if "%" in raw else raw
        if segment in ("", "."):
            continue
        if segment == ".." or any(c in segment for c in _BAD_CHARS) or _hidden(segment):
            return None
        segments.append(segment)
    return segments


def _contained(path: Path, base: Path) -> Path | None:
    """``path`` with symlinks resolved if that exists inside ``base`` and is not hidden."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    if not resolved.is_relative_to(base):
        return None
    if any(_hidden(part) for part in resolved.relative_to(base).parts):
        return None
    return resolved


class FileServer:
    """Serves ``root``; ``/ansysNNN/...`` from ``ansys_root`` when that is configured,
    and ``/ansys/...`` (older clients) from its version folder (:func:`version_folder`)."""

    def __init__(self, root: Path, ansys_root: Path | None = None) -> None:
        self.root = root.resolve()
        self.ansys_root = ansys_root.resolve() if ansys_root is not None else None
        self._ansys_folder = (version_folder(self.ansys_root)
                              if self.ansys_root is not None else None)

    def locate(self, raw_path: str) -> Path | None:
        """The file or directory a raw (still percent-encoded) URL path names, or None."""
        segments = _segments(raw_path)
        if segments is None:
            return None
        found = self._lookup(segments)
        return found[1] if found is not None else None

    def _lookup(self, segments: list[str]) -> tuple[Path, Path] | None:
        """(the root the segments are under, the resolved path they name), or None.

        ``/ansysNNN/...`` is contained to that one version folder, not to the whole
        install root: a link in it to ``../nexus_launcher/`` is not followed.
        """
        base: Path | None = self.root
        if self.ansys_root is not None and segments and _ANSYS.fullmatch(segments[0]):
            if segments[0] == "ansys" and self._ansys_folder is not None:
                segments = [self._ansys_folder, *segments[1:]]
            base = _contained(self.ansys_root / segments[0], self.ansys_root)
            segments = segments[1:]
        if base is None:
            return None
        path = _contained(base.joinpath(*segments), base)
        return (base, path) if path is not None else None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path  # also for absolute-form targets
        try:
            segments = _segments(raw_path)
        except UnicodeDecodeError:
            return _not_found()
        found = self._lookup(segments) if segments is not None else None
        if segments is None or found is None:
            return _not_found()
        base, path = found
        try:
            info = path.stat()
            if stat.S_ISDIR(info.st_mode):
                if not raw_path.endswith("/"):
                    return _redirect_to_directory(segments, request.rel_url.raw_query_string)
                index = _contained(path / "index.html", base)
                if index is None or not index.is_relative_to(path) or not index.is_file():
                    return await asyncio.to_thread(_listing, request.path, path, base)
                path, info = index, index.stat()
            elif raw_path.endswith("/"):
                return _not_found()  # a file named as a folder (/app.js/)
        except OSError:
            return _not_found()
        if not stat.S_ISREG(info.st_mode):
            return _not_found()
        return _FileResponse(path, _range_for(request, info))


def _not_found() -> web.Response:
    return web.Response(status=404, text="404: Not Found")


def _redirect_to_directory(segments: list[str], query: str) -> web.Response:
    """301 to the directory's URL with a slash: built from the checked segments, so it
    always starts with exactly one ``/`` and can never name another host (``//host``)."""
    location = "/" + "".join(quote(segment, safe="") + "/" for segment in segments)
    if query:  # kept (e.g. noVNC's ?host=&port=), any byte not allowed in a URI escaped
        location += "?" + quote(query, safe="!$&'()*+,;=:@/?%~")
    return web.Response(status=301, headers={"Location": location})


_HIDDEN = {hdrs.RANGE.upper(), hdrs.IF_RANGE.upper(), hdrs.ACCEPT_ENCODING.upper()}


class _FileResponse(web.FileResponse):
    """aiohttp's FileResponse, shown the request with only the Range judged here.

    Accept-Encoding is hidden from it too: else, for ``x.js``, it would send a sibling
    ``x.js.gz`` or ``x.js.br`` if one exists, a different file from the one named, whose
    length and validators the Range decision was not made on.
    """

    def __init__(self, path: Path, byte_range: str | None) -> None:
        super().__init__(path, headers={"Content-Type": content_type(path)})
        self._byte_range = byte_range

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():  # clone() encodes them as UTF-8:
            if name.upper() not in _HIDDEN:  # a raw non-ASCII byte (a surrogate) becomes
                headers.add(name, value.encode("utf-8", "surrogateescape")  # U+FFFD
                            .decode("utf-8", "replace"))
        if self._byte_range is not None:
            headers[hdrs.RANGE] = self._byte_range
        return await super().prepare(request.clone(headers=headers))


def _etag(info: os.stat_result) -> str:
    """The strong ETag aiohttp's FileResponse sends for a file with this stat."""
    return f'"{info.st_mtime_ns:x}-{info.st_size:x}"'


def _if_range_holds(request: web.BaseRequest, info: os.stat_result) -> bool:
    """RFC 9110 §13.1.5: does the Range apply to the current representation?

    Only a strong ETag equal to the file's, or a date equal to its Last-Modified (which
    aiohttp sends as the mtime rounded up) that has been over for a second, so that the
    file cannot have changed again within it since; a weak ETag never matches.
    """
    values = request.headers.getall(hdrs.IF_RANGE, [])
    if not values:
        return True
    if len(values) > 1:
        return False
    value = values[0].strip()
    if value.startswith(('"', "W/")):
        return value == _etag(info)
    date = request.if_range
    last_modified = math.ceil(info.st_mtime)
    return date is not None and date.timestamp() == last_modified \
        and time.time() >= last_modified + 1


def _range_for(request: web.BaseRequest, info: os.stat_result) -> str | None:
    """The Range aiohttp is to serve: one ``bytes=FIRST-LAST``, :data:`_UNSATISFIABLE`
    (416), or None for the whole file (200). RFC 9110 §14.

    aiohttp alone answers ``bytes=-0`` with the whole file as 206, takes an If-Range
    ETag for no If-Range and any later date as a match, and answers 416 to several
    ranges, to an invalid range and to other units, all of which must be ignored (200).
    Several satisfiable ranges would need multipart/byteranges, which aiohttp cannot
    send: the whole file (200) answers them, as the RFC allows.
    """
    values = request.headers.getall(hdrs.RANGE, [])
    if len(values) != 1 or not _if_range_holds(request, info):
        return None
    unit, equals, range_set = values[0].partition("=")
    if not equals or unit.lower() != "bytes":
        return None
    specs = [spec.strip(" \t") for spec in range_set.split(",")]
    if not any(specs):
        return None
    size = info.st_size
    satisfiable: list[tuple[int, int]] = []
    try:
        for spec in filter(None, specs):  # empty list elements are allowed, and ignored
            match = _RANGE_SPEC.fullmatch(spec)
            if match is None or match.group(0) == "-":
                return None
            first, last = match.groups()
            if first and last and int(last) < int(first):
                return None  # invalid: the whole Range is ignored
            if first and int(first) < size:
                satisfiable.append((int(first), min(int(last), size - 1) if last else size - 1))
            elif not first and int(last) > 0:
                if size == 0:
                    return None  # a suffix of nothing: the (empty) whole file
                satisfiable.append((max(size - int(last), 0), size - 1))
    except ValueError:  # a number past int()'s digit limit: ignored, as the RFC allows
        return None
    if not satisfiable:
        return _UNSATISFIABLE
    if len(satisfiable) > 1:
        return None
    first_byte, last_byte = satisfiable[0]
    return f"bytes={first_byte}-{last_byte}"


def _listing(url_path: str, directory: Path, base: Path) -> web.Response:
    """A plain HTML index of ``directory``: folders first, then files, by name, at most
    :data:`LISTING_LIMIT` of them. Blocking: run in a thread.

    Only what can be fetched is listed: an entry that is hidden, whose target lies
    outside ``base``, dangles, or is neither a file nor a folder is left out, whatever
    (and whether anything) it points to, so nothing outside the root shows here. Only
    links are resolved; an entry's type comes from the folder itself, and only the
    entries shown are stat()ed.
    """
    try:
        with os.scandir(directory) as scan:
            found = [kept for entry in scan if (kept := _entry(entry, base)) is not None]
    except OSError:
        return _not_found()
    found.sort(key=lambda entry: entry[:2])
    title = html.escape(url_path)
    rows = []
    if url_path != "/":
        rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
    for is_file, _, name, target in found[:LISTING_LIMIT]:
        try:
            info = target.stat()
        except OSError:
            continue
        shown = name if is_file else name + "/"
        size = f"{info.st_size:,}" if is_file else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.st_mtime))
        rows.append(
            f'<tr><td><a href="{quote(shown)}">{html.escape(shown)}</a></td>'
            f'<td class="size">{size}</td><td>{when}</td></tr>'
        )
    more = len(found) - LISTING_LIMIT
    note = (f"<p>{more:,} more entries are not listed (a listing shows the first "
            f"{LISTING_LIMIT:,}).</p>" if more > 0 else "")
    body = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Index of {title}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em}td{padding:.2em 1.5em .2em 0}"
        ".size{text-align:right}</style></head><body>"
        f"<h1>Index of {title}</h1><table>{''.join(rows)}</table>{note}</body></html>"
    )
    return web.Response(text=body, content_type="text/html")


def _entry(entry: os.DirEntry[str], base: Path) -> tuple[bool, str, str, Path] | None:
    """(is a file, sort name, name, what to stat) of a listable entry, else None."""
    name = entry.name
    if _hidden(name):
        return None
    try:
        if entry.is_symlink():
            target = _contained(Path(entry.path), base)
            if target is None:
                return None
            mode = target.stat().st_mode
            is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
        else:  # in the folder, so inside the root
            target = Path(entry.path)
            is_dir, is_file = entry.is_dir(), entry.is_file()
    except OSError:
        return None
    if not (is_dir or is_file):
        return None
    return is_file, name.lower(), name, target
