"""The sans-I/O core: frames, the upgrade decision, the lifecycle table, errors, the
upstream queue, the RFB (VNC) stream of a browser and the proxy's VNC login.

Nothing here imports asyncio, aiohttp, picows or redis (``tests/test_layering.py``
checks it): each part is driven with values and bytes.
"""
