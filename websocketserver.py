#!/usr/bin/env python3
"""Run websocketserver as the manual does: ``python websocketserver.py [options] port``.

Clients recognise a running server by this file's name, so it stays at the
repository root under exactly this name. A copy of it also works where the original
server lived, ``{CEI}/nexusNNN/nexus_launcher/websocketserver.py`` (clients run that
file with the install's ``bin/cpython``): beside a checkout it uses the checkout's
``src``, elsewhere the ``websocketserver`` package installed for the interpreter.
"""

import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    # This file's folder comes first on sys.path, where this file would shadow the
    # package of the same name.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if os.path.isdir(os.path.join(here, "src", "websocketserver")):
        sys.path.insert(0, os.path.join(here, "src"))
    try:
        from websocketserver.cli import main
    except ImportError as exc:
        sys.exit(f"websocketserver.py: error: {sys.executable} cannot import the "
                 f"websocketserver package ({exc}): install it for that interpreter")
    main()
