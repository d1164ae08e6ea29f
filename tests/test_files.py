"""The file server: URL → file mapping (traversal corpus) and HTTP semantics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from websocketserver.files import FileServer, content_type

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
    assert files.locate("/ansys261/nexus/x.js").read_text() == "ansys"
    assert files.locate("/ansys261/../secret.txt") is None
    assert files.locate("/app.js") == (tree / "app.js").resolve()


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
async def client(tree: Path):
    files = FileServer(tree)
    app = web.Application()
    app.router.add_get("/{tail:.*}", files.handle)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_serves_index_and_listing(client: TestClient) -> None:
    response = await client.get("/")
    assert await response.text() == "<h1>index</h1>"
    response = await client.get("/sub/")
    listing = await response.text()
    assert response.status == 200 and "a%20b.txt" in listing and "big.bin" in listing
    response = await client.get("/sub", allow_redirects=False)
    assert response.status == 301 and response.headers["Location"] == "/sub/"


async def test_range_etag_and_conditional_get(client: TestClient, tree: Path) -> None:
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


async def raw_get(port: int, target: str) -> tuple[int, str]:
    """Send the request target byte for byte (no client-side normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    response = (await reader.read()).decode("latin-1")
    writer.close()
    status = int(response.split(" ", 2)[1])
    return status, response


@pytest.mark.parametrize("url", TRAVERSAL)
async def test_traversal_over_http_is_refused(client: TestClient, url: str) -> None:
    status, text = await raw_get(client.port, url)
    assert "SECRET" not in text and "root:" not in text
    assert status in (400, 404)
    assert "/tmp" not in text  # no absolute paths disclosed
