"""An aiohttp WebSocket echo server, the upstream of crates/proxy/tests/websocket_close.rs.

The application is written the way aiohttp's documentation writes one: autoclose and autoping
on, an `async for` over the messages, one write per message (each binary message is sent back).
It prints "listening PORT" once it listens on 127.0.0.1, then one line per WebSocket as it ends:

    report id=ID received=N echoed=N close_code=CODE write_errors=N exception=NAME

`close_code` is the status of the Close frame the server received (1006 if the connection ended
without a closing handshake, as aiohttp reports it); `write_errors` counts echoes that failed;
`exception` is the class of the error the socket ended with, or None. The details of each error
go to stderr. The server exits when its stdin closes, so that it does not outlive its test.
"""

import asyncio
import os
import socket
import sys

from aiohttp import WSMsgType, web


async def websocket(request):
    # A small send buffer keeps most of each 1 MB echo in aiohttp's own buffer, so that sending
    # it waits until the client has read it (aiohttp's drain): a Close arriving meanwhile waits
    # in the reader, as it would behind any slow write or other work of the application.
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    ws = web.WebSocketResponse(max_msg_size=4 << 20)
    await ws.prepare(request)
    conn = request.query.get("id", "?")
    received = echoed = write_errors = 0
    async for msg in ws:
        if msg.type != WSMsgType.BINARY:
            print(f"id={conn}: unexpected {msg.type} {msg.data!r}", file=sys.stderr, flush=True)
            continue
        received += 1
        try:
            await ws.send_bytes(msg.data)
            echoed += 1
        except Exception as e:  # noqa: BLE001 - every failed write is what the test counts
            write_errors += 1
            print(f"id={conn}: echo {received} failed: {e!r}", file=sys.stderr, flush=True)
    exc = ws.exception()
    if exc is not None:
        print(f"id={conn}: ended with {exc!r}", file=sys.stderr, flush=True)
    print(
        f"report id={conn} received={received} echoed={echoed} close_code={ws.close_code} "
        f"write_errors={write_errors} exception={type(exc).__name__ if exc else None}",
        flush=True,
    )
    return ws


async def main():
    app = web.Application()
    app.router.add_get("/ws", websocket)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"listening {runner.addresses[0][1]}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    os._exit(0)


asyncio.run(main())
