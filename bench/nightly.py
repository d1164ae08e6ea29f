"""Nightly: the long property-based run that ``scripts/test`` shortens.

Usage: ``python bench/nightly.py [pytest arguments]``.

Runs ``tests/e2e/test_fuzz.py`` with the Hypothesis profile ``full``
(``WEBSOCKETSERVER_FUZZ=full``, tests/conftest.py): 6,000 HTTP requests and 6,000
websocket frame sequences, each against a long-running server, instead of the few
hundred of ``scripts/test``; both tests side by side on two pytest-xdist workers,
about two minutes on two cores. The inputs are derandomized, the same every night, so
a failure reproduces with the same command. Pytest arguments replace the default
target, e.g. ``tests`` for the whole suite under the full profile. Needs the ``test``
extra. Exit status: pytest's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FUZZ_TESTS = ["-rP", "tests/e2e/test_fuzz.py"]
"""The default target; ``-rP`` shows each test's tally of answers."""


def main(argv: Sequence[str]) -> None:
    """Replace this process with pytest under the full profile."""
    os.chdir(REPO)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
               *(argv or FUZZ_TESTS)]
    os.execve(sys.executable, command, {**os.environ, "WEBSOCKETSERVER_FUZZ": "full"})


if __name__ == "__main__":
    main(sys.argv[1:])
