#!/usr/bin/env python3
"""A slow stand-in for `cutover proxy`, ONLY for testing the bench scripts'
plumbing (start, readiness, SIGUSR1 switching, SIGTERM, RSS sampling) before
the real binary exists. Its numbers mean nothing; never publish them.

    CUTOVER_BIN=bench/helpers/mock_cutover.py bench/switching.sh

Same command line as the real binary:
    mock_cutover.py proxy --listen 127.0.0.1:P --blue 127.0.0.1:A[,127.0.0.1:B] \
        --green 127.0.0.1:C --workers 1 [--drain-timeout 5s]
HTTP/1.1 keep-alive with Content-Length bodies only (enough for the nginx
backend the scripts start).
"""
import argparse
import asyncio
import itertools
import re
import signal
import sys

state = {"live": "blue"}
CL = re.compile(rb"(?im)^content-length:\s*(\d+)\r?$")
CLOSE = re.compile(rb"(?im)^connection:\s*close\r?$")


def addrs(s):
    out = []
    for a in s.split(","):
        h, _, p = a.strip().rpartition(":")
        out.append((h, int(p)))
    return out


async def read_msg(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    m = CL.search(head)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return head, body


async def handle(reader, writer, pools):
    up = None  # (colour, reader, writer)
    try:
        while True:
            try:
                head, body = await read_msg(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            colour = state["live"]
            if up is None or up[0] != colour:
                if up:
                    up[2].close()
                host, port = next(pools[colour])
                ur, uw = await asyncio.open_connection(host, port)
                up = (colour, ur, uw)
            up[2].write(head + body)
            rhead, rbody = await read_msg(up[1])
            writer.write(rhead + rbody)
            await writer.drain()
            if CLOSE.search(rhead):
                up[2].close()
                up = None
            if CLOSE.search(head):
                break
    except Exception as e:  # noqa: BLE001
        print(f"connection error: {e!r}", file=sys.stderr)
    finally:
        if up:
            up[2].close()
        writer.close()


async def main(a):
    pools = {"blue": itertools.cycle(addrs(a.blue)), "green": itertools.cycle(addrs(a.green))}
    host, _, port = a.listen.rpartition(":")
    server = await asyncio.start_server(lambda r, w: handle(r, w, pools), host, int(port), backlog=4096)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def flip():
        state["live"] = "green" if state["live"] == "blue" else "blue"
        print(f"switched live colour to {state['live']}", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, flip)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"listening on {a.listen}, live=blue", flush=True)
    await stop.wait()
    server.close()
    print("shutting down", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("proxy")
    s.add_argument("--listen", required=True)
    s.add_argument("--blue", required=True)
    s.add_argument("--green", required=True)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--drain-timeout", default="5s")
    asyncio.run(main(p.parse_args()))
