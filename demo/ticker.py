"""The demo's TCP service: ``python ticker.py PORT``.

Every connection gets a line a second (the time and a counter) and every line it
sends comes back upper-cased, so a browser on the other side of the websocket sees
data flow both ways.
"""

import asyncio
import sys
import time


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def tick() -> None:
        count = 0
        while True:
            count += 1
            writer.write(f"tick {count} at {time.strftime('%H:%M:%S')}\n".encode())
            await writer.drain()
            await asyncio.sleep(1)

    ticker = asyncio.create_task(tick())
    try:
        while line := await reader.readline():
            writer.write(b"you said: " + line.upper())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        ticker.cancel()
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
