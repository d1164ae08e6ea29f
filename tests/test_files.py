"""The file server: URL → file mapping (traversal corpus) and HTTP semantics."""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from websocketserver.http_port.files import LISTING_LIMIT, FileServer, content_type

Client = TestClient[web.Request, web.Application]

TRAVERSAL = [
    "/../secret.txt",
    "/..%2fsecret.txt",
    "/..%2Fsecret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/%2e%2e%2fsecret.txt",
    "/sub/../../secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt",
    "/sub%2f..%2f..%2fsecret.txt",
    "/..\\secret.txt",
    "/..%5csecret.txt",
    "/sub\\..\\..\\secret.txt",
    "/%252e%252e/secret.txt",
    "/secret.txt%00.html",
    "/index.html%00",
    "/.%2e/secret.txt",
    "/%c0%ae%c0%ae/secret.txt",
    "/link_out/secret.txt",
    "/link_out",
    "/link_file_out",
    "//etc/passwd",
    "/" + "%2e%2e/" * 10 + "etc/passwd",
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with files, a subfolder, and symlinks in and out; a secret beside root."""
    (tmp_path / "secret.txt").write_text("SECRET")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<h1>index</h1>")
    (root / "app.js").write_text("export {}")
    (root / "mod.mjs").write_text("export {}")
    (root / "code.wasm").write_bytes(b"\0asm")
    (root / "style.css").write_text("body{}")
    (root / "data.json").write_text("{}")
    (root / "sub" / "big.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "a b.txt").write_text("spaced")
    (root / "link_out").symlink_to(tmp_path)
    (root / "link_file_out").symlink_to(tmp_path / "secret.txt")
    (root / "link_in.txt").symlink_to(root / "sub" / "a b.txt")
    (root / "empty.txt").write_bytes(b"")
    (root / "evil.example.com").mkdir()
    (root / ".env").write_text("SECRET")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("SECRET")
    (root / "env_link").symlink_to(root / ".env")
    (root / ".well-known").mkdir()
    (root / ".well-known" / "security.txt").write_text("Contact: x")
    install = tmp_path / "install" / "ansys261" / "nexus"
    install.mkdir(parents=True)
    (install / "x.js").write_text("ansys")
    return root


@pytest.mark.parametrize("url", TRAVERSAL)
def test_traversal_never_leaves_root(tree: Path, url: str) -> None:
    files = FileServer(tree, tree.parent / "install")
    try:
        found = files.locate(url)
    except UnicodeDecodeError:
        found = None
    assert found is None or found.is_relative_to(tree.resolve())


def test_locate_maps_inside_paths(tree: Path) -> None:
    files = FileServer(tree)
    assert files.locate("/sub/a%20b.txt") == (tree / "sub" / "a b.txt").resolve()
    assert files.locate("/link_in.txt") == (tree / "sub" / "a b.txt").resolve()
    assert files.locate("/./sub//big.bin") == (tree / "sub" / "big.bin").resolve()
    assert files.locate("/ansys261/nexus/x.js") is None  # no install root: from root


def test_ansys_prefix_maps_to_install_root(tree: Path) -> None:
    files = FileServer(tree, tree.parent / "install")
    located = files.locate("/ansys261/nexus/x.js")
    assert located is not None and located.read_text() == "ansys"
    assert files.locate("/ansys261/../secret.txt") is None
    assert files.locate("/app.js") == (tree / "app.js").resolve()


def test_each_ansys_folder_is_contained_to_itself(tree: Path) -> None:
    """A link in ``ansys261`` to a sibling of it (``../nexus_launcher/``) is not followed,
    though the sibling lies inside the install root (issue 22.13)."""
    install = tree.parent / "install"
    (install / "nexus_launcher").mkdir()
    (install / "nexus_launcher" / "websocketserver.py").write_text("launcher")
    (install / "ansys261" / "launcher").symlink_to("../nexus_launcher")
    (install / "ansys261" / "own").symlink_to("nexus")
    files = FileServer(tree, install)
    assert files.locate("/ansys261/launcher/websocketserver.py") is None
    assert files.locate("/ansys/launcher/websocketserver.py") is None
    assert files.locate("/ansys261/own/x.js") == (install / "ansys261" / "nexus" / "x.js")
    assert files.locate("/ansys/nexus/x.js") == (install / "ansys261" / "nexus" / "x.js")


@pytest.mark.parametrize("name, expected", [
    ("a.js", "text/javascript; charset=utf-8"),
    ("a.mjs", "text/javascript; charset=utf-8"),
    ("a.wasm", "application/wasm"),
    ("a.css", "text/css; charset=utf-8"),
    ("a.html", "text/html; charset=utf-8"),
    ("a.json", "application/json; charset=utf-8"),
    ("a.unknownext", "application/octet-stream"),
])
def test_content_types(name: str, expected: str) -> None:
    assert content_type(Path(name)) == expected


@pytest.fixture
async def client(tree: Path) -> AsyncIterator[Client]:
    files = FileServer(tree)
    app = web.Application()
    app.router.add_get("/{tail:.*}", files.handle)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_serves_index_and_listing(client: Client) -> None:
    response = await client.get("/")
    assert await response.text() == "<h1>index</h1>"
    response = await client.get("/sub/")
    listing = await response.text()
    assert response.status == 200 and "a%20b.txt" in listing and "big.bin" in listing
    response = await client.get("/sub", allow_redirects=False)
    assert response.status == 301 and response.headers["Location"] == "/sub/"


async def test_range_etag_and_conditional_get(client: Client, tree: Path) -> None:
    body = (tree / "sub" / "big.bin").read_bytes()
    response = await client.get("/sub/big.bin?cache=bust")
    assert await response.read() == body
    etag, modified = response.headers["ETag"], response.headers["Last-Modified"]
    response = await client.get("/sub/big.bin", headers={"Range": "bytes=10-19"})
    assert response.status == 206 and await response.read() == body[10:20]
    response = await client.get("/sub/big.bin", headers={"If-None-Match": etag})
    assert response.status == 304
    response = await client.get("/sub/big.bin", headers={"If-Modified-Since": modified})
    assert response.status == 304


async def raw_get(port: int | None, target: str) -> tuple[int, str]:
    """Send the request target byte for byte (no client-side normalisation)."""
    assert port is not None  # a started TestClient's
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    response = (await reader.read()).decode("latin-1")
    writer.close()
    status = int(response.split(" ", 2)[1])
    return status, response


@pytest.mark.parametrize("url", TRAVERSAL)
async def test_traversal_over_http_is_refused(client: Client, url: str) -> None:
    status, text = await raw_get(client.port, url)
    assert "SECRET" not in text and "root:" not in text
    assert status in (400, 404)
    assert "/tmp" not in text  # no absolute paths disclosed


@pytest.mark.parametrize("url", ["/.env", "/.git/config", "/%2egit/config", "/env_link",
                                 "/sub/../.env", "/.git/"])
async def test_dotfiles_are_not_served(client: Client, url: str) -> None:
    status, text = await raw_get(client.port, url)
    assert status == 404 and "SECRET" not in text


async def test_dotfiles_are_not_listed_but_well_known_is_served(client: Client,
                                                                tree: Path) -> None:
    (tree / "index.html").unlink()
    listing = await (await client.get("/")).text()
    assert ".env" not in listing and ".git" not in listing and "env_link" not in listing
    assert ".well-known/" in listing and "sub/" in listing
    response = await client.get("/.well-known/security.txt")
    assert response.status == 200 and await response.text() == "Contact: x"


async def test_listing_says_nothing_about_outside_targets(client: Client,
                                                         tree: Path) -> None:
    """A link out of the root is left out whether or not its target exists (issue 12.8)."""
    sub = tree / "sub"
    outside = sub.parent.parent / "outside.txt"
    outside.write_text("x" * 12345)
    (sub / "out_file").symlink_to(outside)
    (sub / "out_dir").symlink_to(sub.parent.parent)
    (sub / "passwd").symlink_to("/etc/passwd")
    (sub / "dangling").symlink_to(sub.parent.parent / "nothing-here")
    (sub / "dangling_in").symlink_to(sub / "no-such-file")
    os.mkfifo(sub / "fifo")
    first = await (await client.get("/sub/")).text()
    outside.unlink()
    second = await (await client.get("/sub/")).text()
    assert first == second
    for name in ("out_file", "out_dir", "passwd", "dangling", "fifo", "12,345"):
        assert name not in first
    assert "big.bin" in first and "a%20b.txt" in first


@pytest.mark.parametrize("url", ["/app.js/", "/sub/big.bin/", "/link_in.txt/", "/app.js//"])
async def test_a_file_named_as_a_folder_is_not_found(client: Client, url: str) -> None:
    """``/app.js/`` is not ``/app.js`` (issue 22.13)."""
    assert (await raw_get(client.port, url))[0] == 404


async def test_a_listing_shows_at_most_the_limit(client: Client, tree: Path) -> None:
    """Folders first, then files by name, the first LISTING_LIMIT; a note counts the rest
    (issue 22.12)."""
    many = tree / "many"
    (many / "zz_folder").mkdir(parents=True)
    for number in range(LISTING_LIMIT + 2):
        (many / f"f{number:05}").touch()
    listing = await (await client.get("/many/")).text()
    assert listing.count("<tr>") == LISTING_LIMIT + 1  # and ../
    assert "zz_folder/" in listing and f"f{LISTING_LIMIT - 2:05}" in listing
    assert f"f{LISTING_LIMIT - 1:05}" not in listing
    assert "3 more entries are not listed (a listing shows the first 10,000)" in listing


@pytest.mark.parametrize("target, location", [
    ("//evil.example.com", "/evil.example.com/"),
    ("///evil.example.com", "/evil.example.com/"),
    ("/.//evil.example.com", "/evil.example.com/"),
    ("//evil.example.com?a=1&b=/x", "/evil.example.com/?a=1&b=/x"),
    ("/sub?host=h&port=9", "/sub/?host=h&port=9"),
    ("http://evil.example.com//evil.example.com", "/evil.example.com/"),
])
async def test_directory_redirect_stays_on_this_server(client: Client, target: str,
                                                        location: str) -> None:
    """Location is one absolute path, never ``//host`` (issue 12.9)."""
    status, response = await raw_get(client.port, target)
    assert status == 301
    assert f"\r\nLocation: {location}\r\n" in response


@pytest.mark.parametrize("target", ["/\\evil.example.com", "/%5Cevil.example.com",
                                    "/%2Fevil.example.com", "/%2F%2Fevil.example.com"])
async def test_no_redirect_through_escaped_slashes(client: Client, target: str) -> None:
    status, _ = await raw_get(client.port, target)
    assert status == 404


BODY = bytes(range(256)) * 40  # sub/big.bin, 10240 bytes
RANGES = [  # Range header, status, body expected, Content-Range expected
    ("bytes=10-19", 206, BODY[10:20], "bytes 10-19/10240"),
    ("bytes=10-", 206, BODY[10:], "bytes 10-10239/10240"),
    ("bytes=-10", 206, BODY[-10:], "bytes 10230-10239/10240"),
    ("bytes=-99999", 206, BODY, "bytes 0-10239/10240"),
    ("bytes=0-99999", 206, BODY, "bytes 0-10239/10240"),
    ("BYTES=0-0", 206, BODY[:1], "bytes 0-0/10240"),
    ("bytes=-0", 416, b"", "bytes */10240"),
    ("bytes=10240-", 416, b"", "bytes */10240"),
    ("bytes=99999999999999999999-", 416, b"", "bytes */10240"),
    ("bytes=10240-, -0", 416, b"", "bytes */10240"),
    ("bytes=0-1, 20000-", 206, BODY[:2], "bytes 0-1/10240"),
    ("bytes=5-2", 200, BODY, None),
    ("bytes=0-1,5-6", 200, BODY, None),
    ("bytes=0-1,1-2", 200, BODY, None),
    ("bytes=0-1,5-2", 200, BODY, None),
    ("items=0-1", 200, BODY, None),
    ("bytes=", 200, BODY, None),
    ("bytes=-", 200, BODY, None),
    ("bytes=1" + "0" * 5000 + "-", 200, BODY, None),
]


@pytest.mark.parametrize("header, status, body, content_range", RANGES)
async def test_range_semantics(client: Client, header: str, status: int, body: bytes,
                               content_range: str | None) -> None:
    """RFC 9110 §14: suffix 0 is unsatisfiable, invalid or multiple ranges give 200."""
    response = await client.get("/sub/big.bin", headers={"Range": header})
    assert response.status == status
    assert await response.read() == body
    assert response.headers.get("Content-Range") == content_range


async def test_range_of_empty_file(client: Client) -> None:
    response = await client.get("/empty.txt", headers={"Range": "bytes=0-"})
    assert response.status == 416 and response.headers["Content-Range"] == "bytes */0"
    response = await client.get("/empty.txt", headers={"Range": "bytes=-5"})
    assert response.status == 200 and await response.read() == b""


@pytest.fixture
def old_big(tree: Path) -> float:
    """sub/big.bin last modified 100 s ago, on a whole second: its Last-Modified is strong."""
    mtime = float(int(time.time()) - 100)
    os.utime(tree / "sub" / "big.bin", (mtime, mtime))
    return mtime


@pytest.mark.parametrize("if_range, partial", [
    ("{etag}", True),
    ("{date}", True),
    ('"not-the-etag"', False),
    ("W/{etag}", False),
    ("{later}", False),
    ("{earlier}", False),
    ("not a validator", False),
])
async def test_if_range(client: Client, old_big: float, if_range: str,
                        partial: bool) -> None:
    """RFC 9110 §13.1.5: only the current strong ETag or exact date keeps the Range."""
    etag = (await client.head("/sub/big.bin")).headers["ETag"]
    value = if_range.format(etag=etag, date=formatdate(old_big, usegmt=True),
                            later=formatdate(old_big + 86400, usegmt=True),
                            earlier=formatdate(old_big - 86400, usegmt=True))
    response = await client.get("/sub/big.bin",
                                headers={"Range": "bytes=10-19", "If-Range": value})
    assert response.status == (206 if partial else 200)
    assert await response.read() == (BODY[10:20] if partial else BODY)


async def test_if_range_date_of_this_second_is_weak(client: Client, tree: Path) -> None:
    """A file changed within the last second may change again within its Last-Modified."""
    (tree / "app.js").write_text("export {}")
    response = await client.get("/app.js")
    response = await client.get("/app.js", headers={
        "Range": "bytes=0-0", "If-Range": response.headers["Last-Modified"]})
    assert response.status == 200


async def test_preconditions_come_before_range(client: Client) -> None:
    etag = (await client.head("/sub/big.bin")).headers["ETag"]
    response = await client.get("/sub/big.bin",
                                headers={"Range": "bytes=-0", "If-None-Match": etag})
    assert response.status == 304
    response = await client.get("/sub/big.bin",
                                headers={"Range": "bytes=0-0", "If-Match": '"other"'})
    assert response.status == 412


async def test_precompressed_sibling_is_not_substituted(client: Client,
                                                        tree: Path) -> None:
    """The file named is the file sent, so Range and validators refer to it."""
    (tree / "app.js.gz").write_bytes(gzip.compress(b"stale"))
    response = await client.get("/app.js", headers={"Accept-Encoding": "gzip"})
    assert await response.text() == "export {}"
    assert "Content-Encoding" not in response.headers
