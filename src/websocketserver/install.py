"""Finding the application install tree the server lives in, as the original did.

The original server was a file of the install, ``{CEI}/nexusNNN/nexus_launcher/
websocketserver.py``, and its clients rely on what that placement gave it without
passing any install directory: the pages they write load ``/ansysNNN/nexus/...``
(older ones ``/ansys/ensight/...``) from ``{CEI}/nexusNNN/ansysNNN/``, and
``--local_session envision 5`` runs ``{CEI}/bin/envision``. When no option names the
tree, :func:`discover` looks, in this order, at

1. the server's own location: ``argv[0]`` (as given, then with symlinks resolved)
   inside ``{CEI}/nexusNNN/nexus_launcher/``, where the clients' launchers find and
   run it, so the tree that holds it is the one whose pages they write;
2. the environment the launchers run it in: ``$PYENSIGHT_ANSYS_INSTALLATION`` (a
   version directory ``.../v261`` whose tree is ``v261/CEI``, or a tree itself),
   ``$CEI_HOME`` (a tree), ``$AWP_ROOTnnn`` (version directories, newest first).

An environment value counts when it, or its ``CEI`` folder, holds ``bin/ensight``,
``bin/envision`` or a ``nexusNNN`` folder.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .settings import BUILTIN_APPS, Settings

log = logging.getLogger("websocketserver.install")

_NEXUS = re.compile(r"nexus(\d+)")
_ANSYS = re.compile(r"ansys(\d*)")
_AWP_ROOT = re.compile(r"AWP_ROOT(\d+)")
TREE_ENVIRONMENT = ("PYENSIGHT_ANSYS_INSTALLATION", "CEI_HOME")
"""Variables naming an install, read in this order (then ``AWP_ROOTnnn``)."""


@dataclass(frozen=True)
class Install:
    """Where an install was found, and how (for the start-up log)."""

    app_root: Path  # the applications are {app_root}/bin/APP or {app_root}/CEI/bin/APP
    web_root: Path | None  # {CEI}/nexusNNN, whose ansysNNN/ folders /ansysNNN/... name
    found_by: str


def discover(location: Path | None, environ: Mapping[str, str]) -> Install | None:
    """The install tree at ``location`` (the server's argv[0]) or named by ``environ``."""
    if location is not None:
        found = _from_location(location)
        if found is not None:
            return found
    for name, value in _environment(environ):
        for tree in (Path(value), Path(value) / "CEI"):
            if _is_tree(tree):
                return Install(Path(value), _nexus_in(tree), f"${name}={value}")
    return None


def _from_location(location: Path) -> Install | None:
    placed = Path(os.path.abspath(location))
    for path in dict.fromkeys((placed, placed.resolve())):
        for folder in path.parents:
            if folder.name == "nexus_launcher" and _NEXUS.fullmatch(folder.parent.name):
                nexus = folder.parent
                return Install(nexus.parent, nexus, f"the server's location {path}")
    return None


def _environment(environ: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    for name in TREE_ENVIRONMENT:
        if environ.get(name):
            yield name, environ[name]
    versions = sorted(((int(match[1]), name) for name in environ
                       if (match := _AWP_ROOT.fullmatch(name)) and environ[name]), reverse=True)
    for _, name in versions:
        yield name, environ[name]


def _is_tree(path: Path) -> bool:
    return any((path / "bin" / app).is_file() for app in BUILTIN_APPS) or \
        _nexus_in(path) is not None


def _nexus_in(tree: Path) -> Path | None:
    """The newest ``nexusNNN`` folder of ``tree``, one that holds web files first."""
    try:
        folders = [(version_folder(path) is not None, int(match[1]), path)
                   for path in tree.iterdir()
                   if (match := _NEXUS.fullmatch(path.name)) and path.is_dir()]
    except OSError:
        return None
    return max(folders)[2] if folders else None


def version_folder(web_root: Path) -> str | None:
    """The folder of ``web_root`` that ``/ansys/...`` (no version, older clients) names.

    A folder ``ansys`` itself if there is one, else the version of ``nexusNNN``
    (``ansysNNN``), else the newest ``ansysNNN``.
    """
    try:
        names = {path.name: match[1] for path in web_root.iterdir()
                 if (match := _ANSYS.fullmatch(path.name)) and path.is_dir()}
    except OSError:
        return None
    if "ansys" in names:
        return "ansys"
    nexus = _NEXUS.fullmatch(web_root.name)
    if nexus is not None and f"ansys{nexus[1]}" in names:
        return f"ansys{nexus[1]}"
    return max(names, key=lambda name: int(names[name]), default=None)


def log_install(settings: Settings) -> None:
    """Say where ``/ansys…`` URLs and built-in applications come from: at ``--verbose 1``
    when the install tree matters, else only at ``--verbose 2``.

    It matters when one is used (found, or named by an option: ``/ansys…`` then is not
    the ``--http_directory`` path it looks like) or when ``--local_session`` needs one.
    Otherwise "no install found" is just what a plain server is, not news worth the
    first line of its log.
    """
    matters = settings.ansys_install_root is not None or bool(settings.local_sessions)
    for line in settings.install_notes:
        log.log(logging.INFO if matters else logging.DEBUG, "%s", line)
