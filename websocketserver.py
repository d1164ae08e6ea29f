#!/usr/bin/env python3
"""Run websocketserver from a checkout: ``python websocketserver.py [options] port``.

Clients recognise a running server by this file's name, so it stays at the
repository root under exactly this name.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from websocketserver.cli import main

    main()
