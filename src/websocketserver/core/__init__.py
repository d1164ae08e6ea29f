"""The sans-I/O core: frames, the upgrade decision, the lifecycle table, errors and the
upstream queue.

Nothing here imports asyncio, aiohttp, picows or redis (``tests/test_layering.py``
checks it): each part is driven with values and bytes.
"""
