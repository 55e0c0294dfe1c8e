#!/usr/bin/env python3
"""The load of bench/restarts.sh, and its report.

  run     keep-alive HTTP/1.1 clients and HTTP/2 clients (h2c, prior knowledge; each connection
          with several streams at once) sending GET to 127.0.0.1:PORT without pause until
          SIGTERM/SIGINT, --deadline seconds or --max-requests, whichever comes first. Every
          client reconnects after a connection error. Writes when each request succeeded and
          how each one failed to --out (JSON).
  report  splits one run's record at the restart marks the driver wrote (lines
          "EPOCH_NS restart I" ... "EPOCH_NS end") and prints one JSON line per restart.
  markdown  the tables of bench/restarts.sh from those JSON lines.

A request succeeds when it gets 200 with a body starting with --expect. A failure has a kind:
  refused   the connect was refused (the client waits --retry-pause, then connects again: each
            refused connect counts once, so the count grows with the time the port is closed)
  reset     ECONNRESET/EPIPE while the request was out
  eof       the connection closed before the whole response
  timeout   no whole response within --timeout
  goaway    HTTP/2: the server's GOAWAY says the stream was not processed
  rst N     HTTP/2: the stream was reset with error code N
  NNN TEXT  an HTTP status other than 200 (5xx, ...), with the first line of its body
  body      200, but not the expected body
"reset" and "eof" get " (retryable)" when they came on a reused HTTP/1.1 connection before any byte of
the response: a client that resends idempotent requests then (as browsers and most HTTP
libraries do) would not have shown them to its user.

The gap of a restart is the longest interval between two successful requests (of any client)
that ends after the restart began and before the next one began (or the load ended).
"""
import argparse
import asyncio
import errno
import json
import os
import re
import signal
import sys
import time


def now_ms():
    return time.time_ns() / 1e6


class Record:
    """Everything the clients saw, with wall-clock times (ms since the epoch), so that the
    driver's marks (date +%s%N) can be laid over them."""

    def __init__(self, max_requests):
        self.ok = []
        self.failed = []  # [t, proto, kind]
        self.max_requests = max_requests
        self.stop = asyncio.Event()

    def done(self):
        return self.stop.is_set()

    def count(self):
        n = len(self.ok) + len(self.failed)
        if n >= self.max_requests:
            self.stop.set()

    def success(self):
        self.ok.append(round(now_ms(), 1))
        self.count()

    def failure(self, proto, kind):
        self.failed.append([round(now_ms(), 1), proto, kind])
        self.count()


class Failed(Exception):
    def __init__(self, kind):
        super().__init__(kind)
        self.kind = kind


def first_line(body):
    """The first line of an error body, with addresses and numbers in parentheses left out, so
    that one cause counts as one kind."""
    line = body.decode("utf-8", "replace").strip().split("\n", 1)[0]
    line = line.split(" (", 1)[0]
    line = re.sub(r"\b\d+\.\d+\.\d+\.\d+:\d+\b", "ADDR", line)
    return line[:80]


def judge(rec, proto, status, body, expect):
    if status == 200 and body.startswith(expect.encode()):
        rec.success()
    elif status == 200:
        rec.failure(proto, "body")
    else:
        rec.failure(proto, f"{status} {first_line(body)}".strip())


async def connect(a, rec, proto):
    """Connects, or records a refused connect (and waits) and returns None."""
    try:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", a.port), a.timeout)
    except ConnectionRefusedError:
        rec.failure(proto, "refused")
    except asyncio.TimeoutError:
        rec.failure(proto, "timeout")
    except OSError as e:
        rec.failure(proto, errno.errorcode.get(e.errno, "error").lower())
    await asyncio.sleep(a.retry_pause)
    return None


def close(writer):
    if writer is not None:
        try:
            writer.transport.abort()
        except Exception:
            pass


# ---------------------------------------------------------------- HTTP/1.1


async def read_response(reader, got):
    """Reads one response; `got` is set to True once any byte of it arrived."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        got[0] = bool(e.partial)
        raise Failed("eof")
    except asyncio.LimitOverrunError:
        raise Failed("head too long")
    got[0] = True
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise Failed("bad status line")
    status = int(parts[1])
    hdrs = {}
    for ln in lines[1:]:
        k, sep, v = ln.partition(":")
        if sep:
            hdrs[k.strip().lower()] = v.strip()
    keep = hdrs.get("connection", "").lower() != "close"
    try:
        if "content-length" in hdrs:
            body = await reader.readexactly(int(hdrs["content-length"]))
        elif "chunked" in hdrs.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    # trailers, if any, end with an empty line
                    while chunk != b"\r\n":
                        chunk = await reader.readuntil(b"\r\n")
                    break
                body += chunk[:-2]
        else:
            body = await reader.read()
            keep = False
    except asyncio.IncompleteReadError:
        raise Failed("eof")
    return status, body, keep


async def h1_client(a, rec):
    req = f"GET {a.path} HTTP/1.1\r\nHost: 127.0.0.1:{a.port}\r\nUser-Agent: restart-bench\r\n\r\n".encode()
    reader = writer = None
    reused = False
    while not rec.done():
        if writer is None:
            conn = await connect(a, rec, "h1")
            if conn is None:
                continue
            reader, writer = conn
            reused = False
        got = [False]
        try:
            writer.write(req)
            status, body, keep = await asyncio.wait_for(read_response(reader, got), a.timeout)
        except asyncio.TimeoutError:
            rec.failure("h1", "timeout")
            keep = False
        except (Failed, ConnectionResetError, BrokenPipeError, OSError) as e:
            kind = e.kind if isinstance(e, Failed) else "reset"
            if reused and not got[0] and kind in ("eof", "reset"):
                kind += " (retryable)"
            rec.failure("h1", kind)
            keep = False
        else:
            judge(rec, "h1", status, body, a.expect)
        reused = True
        if not keep:
            close(writer)
            reader = writer = None


# ---------------------------------------------------------------- HTTP/2


def graceful_goaway_machine():
    """h2's connection state machine, except that a GOAWAY leaves the connection open.

    h2 closes the whole connection on the first GOAWAY it receives and then refuses every later
    frame as a protocol error. A server that stops gracefully sends GOAWAY, then a PING, and lets
    the streams up to the GOAWAY's last stream id finish: with h2's own machine those streams
    would fail in this client, not in the server. The client still opens no stream on a
    connection after a GOAWAY (H2Conn.closed)."""
    from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine

    class GracefulGoaway(H2ConnectionStateMachine):
        _transitions = {
            **H2ConnectionStateMachine._transitions,
            (ConnectionState.IDLE, ConnectionInputs.RECV_GOAWAY): (None, ConnectionState.IDLE),
            (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY): (None, ConnectionState.CLIENT_OPEN),
        }

    return GracefulGoaway()


class H2Conn:
    """One h2c connection: a reader task feeding h2's state machine, and futures per stream."""

    def __init__(self, reader, writer, a):
        import h2.config
        import h2.connection

        self.reader, self.writer, self.a = reader, writer, a
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.state_machine = graceful_goaway_machine()
        self.conn.initiate_connection()
        self.streams = {}  # id -> [future, status, body]
        self.closed = None  # why no new stream may start
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def fail_all(self, kind, above=0):
        for sid, st in list(self.streams.items()):
            if sid > above and not st[0].done():
                st[0].set_exception(Failed(kind))
                self.streams.pop(sid, None)

    async def run(self):
        import h2.events
        import h2.exceptions

        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.closed = self.closed or "eof"
                    self.fail_all("eof")
                    return
                for ev in self.conn.receive_data(data):
                    st = self.streams.get(getattr(ev, "stream_id", 0) or 0)
                    if isinstance(ev, h2.events.ResponseReceived) and st:
                        st[1] = int(dict(ev.headers).get(":status", "0"))
                    elif isinstance(ev, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if st:
                            st[2] += ev.data
                    elif isinstance(ev, h2.events.StreamEnded) and st:
                        self.streams.pop(ev.stream_id, None)
                        if not st[0].done():
                            st[0].set_result((st[1], st[2]))
                    elif isinstance(ev, h2.events.StreamReset) and st:
                        self.streams.pop(ev.stream_id, None)
                        if not st[0].done():
                            st[0].set_exception(Failed(f"rst {int(ev.error_code)}"))
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        self.closed = "goaway"
                        # Streams above last_stream_id were not processed: safe to send again.
                        self.fail_all("goaway", above=ev.last_stream_id or 0)
                self.flush()
        except (ConnectionResetError, BrokenPipeError, OSError):
            self.closed = "reset"
            self.fail_all("reset")
        except h2.exceptions.ProtocolError as e:
            self.closed = "protocol"
            self.fail_all(f"h2 {type(e).__name__}: {str(e)[:60]}")

    async def request(self):
        if self.closed:
            raise Failed(self.closed)
        sid = self.conn.get_next_available_stream_id()
        fut = asyncio.get_running_loop().create_future()
        self.streams[sid] = [fut, 0, b""]
        self.conn.send_headers(
            sid,
            [(":method", "GET"), (":scheme", "http"), (":authority", f"127.0.0.1:{self.a.port}"),
             (":path", self.a.path), ("user-agent", "restart-bench")],
            end_stream=True,
        )
        self.flush()
        try:
            return await asyncio.wait_for(fut, self.a.timeout)
        except asyncio.TimeoutError:
            self.streams.pop(sid, None)
            try:
                self.conn.reset_stream(sid)
                self.flush()
            except Exception:
                pass
            raise Failed("timeout")


async def h2_stream(c, a, rec):
    while not rec.done() and not c.closed:
        try:
            status, body = await c.request()
        except Failed as e:
            rec.failure("h2", e.kind)
            continue
        judge(rec, "h2", status, body, a.expect)


async def h2_client(a, rec):
    while not rec.done():
        conn = await connect(a, rec, "h2")
        if conn is None:
            continue
        c = H2Conn(*conn, a)
        reader = asyncio.create_task(c.run())
        await asyncio.gather(*(h2_stream(c, a, rec) for _ in range(a.streams)))
        reader.cancel()
        close(conn[1])


async def run(a):
    rec = Record(a.max_requests)
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, rec.stop.set)
    loop.call_later(a.deadline, rec.stop.set)
    started = now_ms()
    tasks = [asyncio.create_task(h1_client(a, rec)) for _ in range(a.h1)]
    tasks += [asyncio.create_task(h2_client(a, rec)) for _ in range(a.h2)]
    print(f"load: {a.h1} HTTP/1.1 clients, {a.h2} HTTP/2 connections x {a.streams} streams on port {a.port}",
          file=sys.stderr, flush=True)
    # A client that dies of a bug ends the load at once, so that a broken client is never
    # mistaken for a quiet server.
    stopper = asyncio.create_task(rec.stop.wait())
    await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    crashed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
    # Requests still out when the load stops are neither successes nor failures.
    for t in tasks:
        t.cancel()
    stopper.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    if crashed:
        import traceback

        traceback.print_exception(crashed[0].exception())
        print("load: a client failed (above); no results written", file=sys.stderr)
        return 1
    out = {"started": started, "stopped": now_ms(), "ok": rec.ok, "failed": rec.failed,
           "clients": {"h1": a.h1, "h2": a.h2, "streams": a.streams}}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, a.out)
    print(f"load: {len(rec.ok)} ok, {len(rec.failed)} failed", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def load_marks(path):
    marks = []
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) >= 2:
                marks.append((int(p[0]) / 1e6, p[1], p[2] if len(p) > 2 else ""))
    return marks


def cmd_report(a):
    import bisect

    with open(a.raw) as f:
        raw = json.load(f)
    ok = sorted(raw["ok"])
    failed = sorted(raw["failed"])
    marks = load_marks(a.marks)
    starts = [m[0] for m in marks if m[1] == "restart"]
    ends = [m[0] for m in marks if m[1] == "end"]
    end = ends[0] if ends else raw["stopped"]
    windows = [("before", raw["started"], starts[0] if starts else end)]
    for i, s in enumerate(starts):
        windows.append((str(i + 1), s, starts[i + 1] if i + 1 < len(starts) else end))
    extra = json.loads(a.extra) if a.extra else {}
    for name, lo, hi in windows:
        kinds = {}
        for t, proto, kind in failed:
            if lo <= t < hi:
                kinds[f"{proto} {kind}"] = kinds.get(f"{proto} {kind}", 0) + 1
        i = bisect.bisect_left(ok, lo)
        j = bisect.bisect_left(ok, hi)
        gap, open_gap, gap_end = 0.0, False, None
        if name != "before":
            # Intervals between two successes that end in this restart's window: the one that
            # ends with the first success after the restart began starts before it.
            prev = ok[i - 1] if i > 0 else raw["started"]
            for t in ok[i:j]:
                if t - prev > gap:
                    gap, gap_end = t - prev, t
                prev = t
            if j == i or (j == len(ok) and hi - prev > gap):
                # nothing succeeded from `prev` to the end of the window
                gap, open_gap, gap_end = hi - prev, True, None
        row = {"mode": a.mode, "label": a.label, "round": a.round, "restart": name,
               "ok": j - i, "failed": kinds, "gap_ms": round(gap, 1), "gap_open": open_gap,
               "gap_end_ms": round(gap_end - lo, 1) if gap_end is not None else None,
               "window_s": round((hi - lo) / 1000, 2)}
        row.update(extra.get(name, {}))
        print(json.dumps(row))


def fmt_kinds(kinds):
    if not kinds:
        return "0"
    return ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


def cmd_markdown(a):
    rows = [json.loads(l) for l in open(a.file) if l.strip()]
    order = []
    for r in rows:
        key = (r["mode"], r["label"])
        if key not in order:
            order.append(key)
    summary = ["| mode | binary | restarts | requests OK | failed (all kinds) | of which refused connects "
               "| failed per restart | max gap | median gap |",
               "|---|---|---|---|---|---|---|---|---|"]
    detail = ["| mode | binary | round | restart | refused connects | other failed requests (by kind) "
              "| gap | gap ended, after the restart began | requests OK |",
              "|---|---|---|---|---|---|---|---|---|"]
    warm = []
    for mode, label in order:
        rs = [r for r in rows if r["mode"] == mode and r["label"] == label]
        uns = [r for r in rs if r.get("unsupported")]
        if uns:
            summary.append(f"| {mode} | {label} | - | - | not supported by this binary: {uns[0]['unsupported']} | - | - | - | - |")
            continue
        errs = [r for r in rs if r.get("error")]
        for r in errs:
            warm.append(f"- {mode}, {label}, round {r['round']}: {r['error']}")
        rr = [r for r in rs if r.get("restart") not in (None, "before") and not r.get("error")]
        for r in rs:
            if r.get("restart") == "before" and r["failed"]:
                warm.append(f"- {mode}, {label}, round {r['round']}: before the first restart: {fmt_kinds(r['failed'])}")
        if not rr:
            continue
        tot = sum(sum(r["failed"].values()) for r in rr)
        refused = sum(n for r in rr for k, n in r["failed"].items() if k.endswith(" refused"))
        gaps = sorted(r["gap_ms"] for r in rr)
        med = gaps[len(gaps) // 2] if len(gaps) % 2 else (gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2
        anyopen = any(r["gap_open"] for r in rr)
        summary.append(
            f"| {mode} | {label} | {len(rr)} | {sum(r['ok'] for r in rr):,} | {tot:,} | {refused:,} "
            f"| {tot / len(rr):,.1f} | {max(gaps):,.0f} ms{' (open)' if anyopen else ''} | {med:,.0f} ms |")
        for r in rr:
            ref = sum(n for k, n in r["failed"].items() if k.endswith(" refused"))
            other = {k: n for k, n in r["failed"].items() if not k.endswith(" refused")}
            took = f"{r['gap_end_ms']:,.0f} ms" if r.get("gap_end_ms") is not None else "-"
            gap = f"{r['gap_ms']:,.0f} ms" + (" (nothing succeeded after it)" if r["gap_open"] else "")
            detail.append(f"| {mode} | {label} | {r['round']} | {r['restart']} | {ref:,} | {fmt_kinds(other)} "
                          f"| {gap} | {took} | {r['ok']:,} |")
    print("\n".join(summary))
    print()
    print("Per restart:")
    print()
    print("\n".join(detail))
    if warm:
        print()
        print("\n".join(warm))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("run")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--path", default="/")
    s.add_argument("--expect", default="", help="a successful body starts with this")
    s.add_argument("--h1", type=int, default=8, help="keep-alive HTTP/1.1 clients")
    s.add_argument("--h2", type=int, default=2, help="HTTP/2 connections")
    s.add_argument("--streams", type=int, default=4, help="concurrent streams per HTTP/2 connection")
    s.add_argument("--timeout", type=float, default=15, help="seconds for a connect or a whole response")
    s.add_argument("--retry-pause", type=float, default=0.01, help="seconds after a failed connect")
    s.add_argument("--deadline", type=float, required=True, help="stop after this many seconds at most")
    s.add_argument("--max-requests", type=int, default=5_000_000)
    s.add_argument("--out", required=True)
    s.set_defaults(f=lambda a: asyncio.run(run(a)))
    s = sp.add_parser("report")
    s.add_argument("--raw", required=True); s.add_argument("--marks", required=True)
    s.add_argument("--mode", required=True); s.add_argument("--label", required=True)
    s.add_argument("--round", type=int, default=1)
    s.add_argument("--extra", default="", help="JSON {restart: {key: value}} merged into its row")
    s.set_defaults(f=cmd_report)
    s = sp.add_parser("markdown"); s.add_argument("file"); s.set_defaults(f=cmd_markdown)
    a = p.parse_args()
    sys.exit(a.f(a) or 0)


if __name__ == "__main__":
    main()
