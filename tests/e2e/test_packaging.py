"""What a site installs: the sdist and wheel ``python -m build`` makes, checked by
``twine check``, installed into a fresh venv and run from there.

Nothing here needs the network. The build uses the backend in this venv
(``--no-isolation``), and the fresh venv gets its dependencies from a wheelhouse
packed from this venv's installed distributions (``pip --no-index``, pip's
configuration ignored), so the test says whether the wheel and its metadata are
complete, not whether an index is reachable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support import ROOT, free_port, wait_port

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PACKAGE = ROOT / "src" / "websocketserver"
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*_cache", "build",
                                 "dist")
_NOT_SOURCES = {".venv", ".git", ".test-deps", "bench", "tests", "test-artifacts", "demo",
                "node_modules"}
_INSTALLER_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def package_files() -> set[str]:
    """The package's files (code and data) as paths below ``src/``."""
    return {path.relative_to(ROOT / "src").as_posix() for path in PACKAGE.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


def run(*argv: str | Path, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> str:
    """Run a command; its output, or a failure showing it."""
    done = subprocess.run([str(arg) for arg in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


def sources(into: Path) -> Path:
    """A copy of the project without what a build neither needs nor should touch: the
    build writes its egg-info beside the sources, which here are shared with others."""
    def ignore(directory: str, names: list[str]) -> set[str]:
        top = _NOT_SOURCES & set(names) if Path(directory) == ROOT else set()
        return top | SKIPPED(directory, names)
    return Path(shutil.copytree(ROOT, into, ignore=ignore))


def requirement_closure(name: str) -> Iterator[metadata.Distribution]:
    """The installed distributions ``name`` needs here (itself left out)."""
    seen: set[str] = set()
    wanted: list[tuple[Requirement, set[str]]] = [
        (Requirement(text), set()) for text in metadata.requires(name) or ()]
    while wanted:
        requirement, extras = wanted.pop()  # extras: those asked of whoever needs it
        marker, key = requirement.marker, canonicalize_name(requirement.name)
        if key in seen or (marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in ("", *extras))):
            continue
        seen.add(key)
        distribution = metadata.distribution(requirement.name)
        yield distribution
        wanted += [(Requirement(text), requirement.extras)
                   for text in distribution.requires or ()]


def repack(distribution: metadata.Distribution, wheelhouse: Path) -> Path:
    """A wheel of an installed distribution: its files as installed below
    site-packages (scripts, which pip makes again from the entry points, left out),
    with a RECORD of its own."""
    files = [file for file in distribution.files or ()
             if file.parts[0] != ".." and "__pycache__" not in file.parts
             and not (file.parts[0].endswith(".dist-info") and file.name in _INSTALLER_FILES)]
    info = next(file.parts[0] for file in files if file.parts[0].endswith(".dist-info"))
    tags = [line.split(":", 1)[1].strip()
            for line in (distribution.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    wheel = wheelhouse / f"{info.removesuffix('.dist-info')}-{tags[0]}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for file in files:
            data = Path(str(distribution.locate_file(file))).read_bytes()
            archive.writestr(file.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{file.as_posix()},sha256={digest.decode()},{len(data)}")
        record.append(f"{info}/RECORD,,")
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


def offline_pip_env() -> dict[str, str]:
    """This environment without pip's configuration (its find-links or index)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PIP_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_wheel_and_sdist_build_check_install_and_run(tmp_path: Path) -> None:
    source = sources(tmp_path / "source")
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source)
    sdist, = dist.glob("websocketserver-*.tar.gz")
    wheel, = dist.glob("websocketserver-*.whl")
    assert sdist.name == f"websocketserver-{VERSION}.tar.gz"
    assert wheel.name == f"websocketserver-{VERSION}-py3-none-any.whl"
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)

    # the wheel was built from the sdist (build's default), so the sdist is enough to
    # build it; these say that nothing was left out of either
    top = f"websocketserver-{VERSION}/"
    with tarfile.open(sdist) as archive:
        in_sdist = {name.removeprefix(top) for name in archive.getnames()}
    wanted = {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"}
    assert wanted | {f"src/{name}" for name in package_files()} <= in_sdist
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = set(archive.namelist())
        info = f"websocketserver-{VERSION}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert package_files() <= in_wheel, package_files() - in_wheel
    assert any(name.endswith(".lua") for name in in_wheel)
    assert f"{info}/licenses/LICENSE" in in_wheel
    assert "websocketserver = websocketserver.cli:main" in entry_points

    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    for distribution in requirement_closure("websocketserver"):
        repack(distribution, wheelhouse)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    env = offline_pip_env()
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
        "--quiet", "--no-index", "--find-links", wheelhouse, wheel, env=env)

    command = venv / "bin" / "websocketserver"
    assert run(command, "--version", cwd=tmp_path, env=env).split() == [
        "websocketserver", VERSION]
    where = run(venv / "bin" / "python", "-c", "import websocketserver; "
                "print(websocketserver.__file__)", cwd=tmp_path, env=env)
    assert Path(where.strip()).is_relative_to(venv), where
    ws_port, http_port = free_port(), free_port()
    (tmp_path / "www").mkdir()
    log = tmp_path / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [command, "--listen_address", "127.0.0.1", "--http_directory", tmp_path / "www",
             "--http_port", str(http_port), "--security_token", "K", str(ws_port)],
            cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_port(http_port, proc=server)
        wait_port(ws_port, proc=server)
        url = f"http://127.0.0.1:{http_port}/v1/status?security_token=K"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert (answer.status, json.load(answer)) == (200, [])
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
