"""``python -m websocketserver``."""

from .cli import main

main()
