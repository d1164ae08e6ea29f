"""The websocket port: reading upgrades, deciding, tunnelling (the hot path), and the
relay processes."""
