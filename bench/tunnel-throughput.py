#!/usr/bin/env python3
"""Throughput of a WebSocket tunnel through `cutover proxy`: an upstream sends GiB of whole binary
frames (64 KiB each) after a 101, a client reads them through the proxy, and the rate is printed
per build and round. Builds are interleaved, so compare them within one run.

Usage: bench/tunnel-throughput.py [BIN ...]   (default: target/release/cutover)
Knobs (env): ROUNDS=3  GIB=2
Everything runs on 127.0.0.1; each transfer is bounded by its size and a 120 s timeout.
"""
import os
import socket
import struct
import subprocess
import sys
import threading
import time

ROUNDS = int(os.environ.get("ROUNDS", "3"))
TOTAL = int(float(os.environ.get("GIB", "2")) * (1 << 30))
PAYLOAD = 64 * 1024
FRAME = bytes([0x82, 127]) + struct.pack(">Q", PAYLOAD) + os.urandom(PAYLOAD)
BLOCK = FRAME * 64  # about 4 MiB of whole frames


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def upstream(lst):
    c, _ = lst.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(4096)
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
              b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
    sent = 0
    while sent < TOTAL:
        c.sendall(BLOCK)
        sent += len(BLOCK)
    c.shutdown(socket.SHUT_WR)
    try:
        while c.recv(65536):
            pass
    except OSError:
        pass
    c.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(port, proc, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit(f"cutover exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("cutover did not listen in time")


def run(binary):
    blue, green = listener(), listener()
    port = free_port()
    proc = subprocess.Popen(
        [binary, "proxy", "--listen", f"127.0.0.1:{port}",
         "--blue", f"127.0.0.1:{blue.getsockname()[1]}", "--green", f"127.0.0.1:{green.getsockname()[1]}"],
        stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        # The readiness probe above was one connection the proxy saw close; the upstream's
        # accept below is the tunnel's.
        threading.Thread(target=upstream, args=(blue,), daemon=True).start()
        c = socket.create_connection(("127.0.0.1", port), timeout=120)
        c.sendall(b"GET /ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(1)
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit(f"no 101: {head!r}")
        buf = bytearray(1 << 20)
        got, t0 = 0, time.time()
        while True:
            n = c.recv_into(buf)
            if n == 0:
                break
            got += n
        dt = time.time() - t0
        c.close()
        if got < TOTAL:
            sys.exit(f"{binary}: only {got} of {TOTAL} bytes arrived")
        return got / dt / 1e6
    finally:
        proc.terminate()
        proc.wait()
        blue.close()
        green.close()


def main():
    bins = sys.argv[1:] or ["target/release/cutover"]
    for b in bins:
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} is not an executable file")
    print(f"# bench/tunnel-throughput.py {' '.join(bins)}  (ROUNDS={ROUNDS} GIB={TOTAL / (1 << 30):g})")
    for r in range(1, ROUNDS + 1):
        for b in bins:
            print(f"round {r}  {b}: {run(b):.0f} MB/s", flush=True)


if __name__ == "__main__":
    main()
