"""``deploy/haproxy.cfg``'s access log never holds a token (issue 22, finding 13).

``option httplog`` logs the whole request line, query string and all: the security
token of ``/v1/...?security_token=`` and the reservation token of a websocket's
``?token=``. The recipe logs method, path and version instead.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import websockets
from cluster_support import HAProxy, start_haproxy

from support import EchoBackend, StartServer, wait_until

__all__ = ["start_haproxy"]  # the fixture used below


async def test_the_access_log_has_no_query_string(start_server: StartServer, echo: EchoBackend,
                                                  start_haproxy: Callable[..., HAProxy]) -> None:
    server = start_server("--client_port", str(echo.port), token="SECRET-TOKEN-1")
    assert server.http_port is not None
    proxy = start_haproxy([(server.ws_port, server.http_port)])
    server.http_port = proxy.http_port  # the requests below go through HAProxy
    assert server.get_json("/v1/status")[0] == 200
    with pytest.raises(websockets.InvalidStatus) as refused:  # no such reservation
        await websockets.connect(f"ws://127.0.0.1:{proxy.ws_port}/websockify"
                                 "?token=RESERVATION-TOKEN-2")
    assert refused.value.response.status_code == 404
    log = wait_until(lambda: (text := proxy.log()).count("GET /") >= 2 and text)
    assert "GET /v1/status HTTP/1.1" in log and "GET /websockify HTTP/1.1" in log
    assert "SECRET-TOKEN-1" not in log and "RESERVATION-TOKEN-2" not in log
    assert "token=" not in log
