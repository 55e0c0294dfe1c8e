#!/usr/bin/env python3
"""Small helpers for the bench/*.sh scripts (stdlib only, Python >= 3.9).

Subcommands:
  ports N                       print N free TCP ports on 127.0.0.1
  wait-ready --pid --port ...   poll (bounded) until a server answers GET / with 200
  probe --port                  print the body of one GET / (or an error)
  quiet-check                   loadavg + 1 s CPU sample; first line is a summary
  parse-wrk FILE [--tag k=v]    wrk output -> one JSON object
  rss --pid P                   RSS/PSS/fds of P and its descendants (JSON)
  sample --pid P --while-pid W  peak RSS/PSS/fds of P's tree while W runs (JSON)
  switch --method ...           flip the live colour every --interval seconds
  report-throughput FILE        markdown tables from JSON lines
  report-switching FILE
  report-memory FILE
  md-update --file F --section S --content C   replace/append a marked section
"""
import argparse
import json
import math
import os
import re
import signal
import socket
import statistics
import sys
import time

# ---------------------------------------------------------------- ports/ready


def cmd_ports(a):
    socks, ports = [], []
    try:
        while len(ports) < a.n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            socks.append(s)
            if p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    print(" ".join(map(str, ports)))


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def http_get(port, timeout=2.0, path="/"):
    """One HTTP/1.1 GET with Connection: close. Returns (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if m and len(body) >= int(m.group(1)):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"bad response: {status_line!r}")
    return int(parts[1]), body.decode("latin-1")


def cmd_wait_ready(a):
    deadline = time.monotonic() + a.timeout
    last = "no attempt"
    listening = False
    while time.monotonic() < deadline:
        if a.pid and not pid_alive(a.pid):
            print(f"process {a.pid} exited before serving on port {a.port}", file=sys.stderr)
            return 1
        try:
            if not listening:
                socket.create_connection(("127.0.0.1", a.port), timeout=0.5).close()
                listening = True
            st, body = http_get(a.port, timeout=2.0)
            if st == 200 and body.startswith(a.expect):
                return 0
            last = f"status {st}, body {body[:40]!r}"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.05)
    print(
        f"port {a.port}: not ready after {a.timeout}s "
        f"(listening={listening}, last: {last}, wanted 200 + body starting {a.expect!r})",
        file=sys.stderr,
    )
    return 1


def cmd_probe(a):
    try:
        st, body = http_get(a.port, timeout=a.timeout)
        print(f"{st} {body.strip()[:20]}")
        return 0
    except OSError as e:
        print(f"error {type(e).__name__}")
        return 1


def _cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle


def cmd_quiet_check(a):
    with open("/proc/loadavg") as f:
        la = f.read().split()
    t1, i1 = _cpu_times()
    time.sleep(1.0)
    t2, i2 = _cpu_times()
    busy = 100.0 * (1 - (i2 - i1) / max(1, t2 - t1))
    ncpu = os.cpu_count() or 1
    # Busy processes by CPU over the sample are hard to get cheaply; list
    # running compilers, which are the usual culprit here.
    hogs = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    c = f.read().strip()
            except OSError:
                continue
            if c in ("rustc", "cargo", "cc", "ld", "cc1", "cc1plus", "lld", "ld.lld", "wrk"):
                hogs.add(c)
    summary = f"loadavg {' '.join(la[:3])}, CPU busy {busy:.0f}% over 1 s"
    # The instantaneous CPU sample decides; loadavg lags (it still includes
    # a benchmark that just finished) and only counts when clearly high.
    noisy = busy > 15 or float(la[0]) > 0.75 * ncpu
    print(summary + (f", running: {','.join(sorted(hogs))}" if hogs else ""))
    if noisy or hogs:
        print("NOISY")


# ---------------------------------------------------------------- wrk parsing

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(tok):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", tok)
    if not m:
        return None
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text):
    r = {
        "requests": 0, "rps": 0.0, "seconds": None,
        "p50_ms": None, "p75_ms": None, "p90_ms": None, "p99_ms": None,
        "lat_avg_ms": None, "lat_max_ms": None,
        "err_connect": 0, "err_read": 0, "err_write": 0, "err_timeout": 0,
        "non2xx3xx": 0, "ok": False,
    }
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", s)
        if m:
            r["requests"] = int(m.group(1))
            r["seconds"] = _ms(m.group(2) + m.group(3)) / 1e3
            continue
        m = re.match(r"Requests/sec:\s+([\d.]+)", s)
        if m:
            r["rps"] = float(m.group(1))
            r["ok"] = True
            continue
        m = re.match(r"(50|75|90|99)%\s+(\S+)", s)
        if m:
            r[f"p{m.group(1)}_ms"] = _ms(m.group(2))
            continue
        m = re.match(r"Latency\s+(\S+)\s+\S+\s+(\S+)", s)
        if m:
            r["lat_avg_ms"], r["lat_max_ms"] = _ms(m.group(1)), _ms(m.group(2))
            continue
        m = re.match(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", s)
        if m:
            r["err_connect"], r["err_read"], r["err_write"], r["err_timeout"] = map(int, m.groups())
            continue
        m = re.match(r"Non-2xx or 3xx responses:\s+(\d+)", s)
        if m:
            r["non2xx3xx"] = int(m.group(1))
            continue
        m = re.match(r"LUA (.*)", s)
        if m:
            for kv in m.group(1).split():
                k, _, v = kv.partition("=")
                r["lua_" + k] = int(v)
    r["socket_errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    return r


def cmd_wrk_line(a):
    r = json.loads(sys.stdin.readline())
    print(f"{r['rps']:,.0f} req/s, p50 {_ms_fmt(r['p50_ms'])}, p99 {_ms_fmt(r['p99_ms'])}, "
          f"non-2xx/3xx {r['non2xx3xx']}, socket errors {r['socket_errors']}, requests {r['requests']:,}")


def cmd_parse_wrk(a):
    with open(a.file, errors="replace") as f:
        r = parse_wrk(f.read())
    for kv in a.tag or []:
        k, _, v = kv.partition("=")
        r[k] = int(v) if v.isdigit() else v
    print(json.dumps(r))


# ---------------------------------------------------------------- memory


def tree_pids(pid):
    out, todo = [], [pid]
    while todo and len(out) < 10000:
        p = todo.pop()
        if not pid_alive(p):
            continue
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def proc_mem(pid):
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except OSError:
        pass
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return rss, pss, fds


def tree_mem(pid):
    rss = pss = fds = 0
    pids = tree_pids(pid)
    for p in pids:
        m = proc_mem(p)
        if m:
            rss += m[0]
            pss += m[1]
            fds += m[2]
    return {"rss_kb": rss, "pss_kb": pss, "fds": fds, "procs": len(pids)}


def cmd_rss(a):
    print(json.dumps(tree_mem(a.pid)))


def cmd_sample(a):
    peak = {"rss_kb": 0, "pss_kb": 0, "fds": 0, "procs": 0, "samples": 0}
    deadline = time.monotonic() + a.max_seconds
    while time.monotonic() < deadline and pid_alive(a.while_pid):
        m = tree_mem(a.pid)
        for k in ("rss_kb", "pss_kb", "fds", "procs"):
            peak[k] = max(peak[k], m[k])
        peak["samples"] += 1
        time.sleep(a.interval)
    print(json.dumps(peak))


# ---------------------------------------------------------------- switching


def _haproxy_cmd(sock_path, cmd, timeout=2.0):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(cmd.encode() + b"\n")
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def cmd_switch(a):
    """Flip blue<->green every a.interval s for a.duration s (bounded count)."""
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    live = "blue"
    attempted = ok = 0
    failures = []
    max_n = int(a.duration / a.interval) + 1
    t0 = time.monotonic()
    nxt = t0 + a.interval
    if a.method == "nginx":
        with open(a.conf) as f:
            conf = f.read()
        pat = re.compile(r"server 127\.0\.0\.1:\d+; # live")
        if not pat.search(conf):
            print("nginx conf has no '# live' server line", file=sys.stderr)
            return 2
    while not stop["flag"] and attempted < max_n:
        now = time.monotonic()
        if now - t0 >= a.duration:
            break
        if now < nxt:
            time.sleep(min(nxt - now, 0.05))
            continue
        nxt += a.interval
        if nxt < now:  # fell behind: do not burst to catch up
            nxt = now + a.interval
        target = "green" if live == "blue" else "blue"
        attempted += 1
        try:
            if a.method == "cutover":
                os.kill(a.pid, signal.SIGUSR1)
            elif a.method == "nginx":
                port = a.green_port if target == "green" else a.blue_port
                conf = pat.sub(f"server 127.0.0.1:{port}; # live", conf)
                tmp = a.conf + ".tmp"
                with open(tmp, "w") as f:
                    f.write(conf)
                os.replace(tmp, a.conf)
                os.kill(a.pid, signal.SIGHUP)
            elif a.method == "haproxy":
                # enable the new one first, then disable the old: never zero servers
                resp = _haproxy_cmd(a.sock, f"enable server be/{target}; disable server be/{live}")
                if resp.strip():
                    raise RuntimeError(resp.strip()[:200])
            ok += 1
            live = target
        except Exception as e:  # noqa: BLE001 - report and keep going (bounded)
            failures.append(f"{type(e).__name__}: {e}")
            if a.method == "cutover" and isinstance(e, ProcessLookupError):
                break
    elapsed = time.monotonic() - t0
    print(json.dumps({
        "attempted": attempted, "performed": ok, "final_colour": live,
        "elapsed_s": round(elapsed, 3), "failures": len(failures),
        "first_failure": failures[0] if failures else "",
    }))


# ---------------------------------------------------------------- reports


def _load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _fmt(x, nd=0):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def _ms_fmt(x):
    if x is None:
        return "n/a"
    return f"{x * 1000:.0f} µs" if x < 1 else f"{x:.2f} ms"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cmd_report_throughput(a):
    rows = _load(a.file)
    order = [c for c in a.order.split() if any(r["contender"] == c for r in rows)]
    med = {}
    tab = []
    for c in order:
        rs = sorted((r for r in rows if r["contender"] == c), key=lambda r: r["round"])
        good = [r for r in rs if r["ok"]]
        m = {
            "rps": _median([r["rps"] for r in good]),
            "p50": _median([r["p50_ms"] for r in good]),
            "p99": _median([r["p99_ms"] for r in good]),
        }
        med[c] = m
        tab.append([
            c, _fmt(m["rps"]), " / ".join(_fmt(r["rps"]) if r["ok"] else "failed" for r in rs),
            _ms_fmt(m["p50"]), _ms_fmt(m["p99"]),
            _fmt(sum(r["non2xx3xx"] for r in rs)),
            "/".join(_fmt(sum(r[k] for r in rs)) for k in ("err_connect", "err_read", "err_write", "err_timeout")),
            _fmt(sum(r["requests"] for r in rs)),
        ])
    print(_table(
        ["contender", "req/s (median)", "req/s per round", "p50 (median)", "p99 (median)",
         "non-2xx/3xx", "socket errors c/r/w/t", "requests (all rounds)"],
        tab))
    print()

    def ratio(x, y):
        mx, my = med.get(x, {}).get("rps"), med.get(y, {}).get("rps")
        if not mx or not my:
            return None
        return mx / my

    def p99(c):
        return _ms_fmt(med.get(c, {}).get("p99")) if c in med else "n/a"

    pairs = [("cutover", "haproxy"), ("cutover", "nginx"), ("cutover", "direct"),
             ("haproxy", "direct"), ("nginx", "direct"), ("cutover", "cutover-nometrics"),
             ("cutover", "cutover-nopreempt"), ("cutover-nopreempt", "haproxy"), ("cutover-alt", "haproxy"),
             ("cutover-alt", "cutover"), ("cutover", "haproxy-headers"), ("cutover", "nginx-headers"),
             ("haproxy-headers", "haproxy"), ("nginx-headers", "nginx"), ("haproxy-headers", "direct"),
             ("nginx-headers", "direct")]
    tab = []
    for x, y in pairs:
        if x not in med or y not in med:
            continue
        r = ratio(x, y)
        tab.append([f"{x} / {y}", "n/a" if r is None else f"{r:.3f}", f"{p99(x)} vs {p99(y)}"])
    print(_table(["ratio of median req/s", "value", "p99 side by side"], tab))

    # The same pairs round by round: both ran in the same round, minutes apart at most, so a
    # round's ratio is less exposed to the machine's slow and fast phases than the medians are.
    by = {(r["contender"], r["round"]): r for r in rows if r["ok"]}
    rounds = sorted({r["round"] for r in rows})
    tab = []
    for x, y in pairs:
        both = [(by[(x, n)], by[(y, n)]) for n in rounds if (x, n) in by and (y, n) in by]
        if x not in med or y not in med or len(both) < 2:
            continue
        rr = [bx["rps"] / by_["rps"] for bx, by_ in both]
        pr = [bx["p99_ms"] / by_["p99_ms"] for bx, by_ in both if bx["p99_ms"] and by_["p99_ms"]]
        tab.append([
            f"{x} / {y}", " / ".join(f"{v:.3f}" for v in rr), f"{_geomean(rr):.3f}",
            _interval(rr),
            f"{sum(v >= 1 for v in rr)} of {len(rr)}",
            f"{_geomean(pr):.3f}" if pr else "n/a",
            _interval(pr),
            f"{sum(bx['p99_ms'] <= by_['p99_ms'] for bx, by_ in both)} of {len(both)}",
        ])
    if tab:
        print()
        print(_table(["round by round", "req/s ratio per round", "req/s ratio, geometric mean",
                      "req/s ratio, 95% interval", "rounds with req/s at least the second's",
                      "p99 ratio, geometric mean", "p99 ratio, 95% interval",
                      "rounds with p99 at most the second's"], tab))
        print()
        print("The 95% intervals are Student's t intervals of the geometric mean, computed on the "
              "logarithms of the per-round ratios, so they treat rounds as independent samples. "
              "A ratio is shown to be above 1 only when its whole interval is.")


# Two-sided 95% quantiles of Student's t distribution for 1 to 30 degrees of freedom.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def _interval(values):
    """The 95% interval of the geometric mean of positive ratios, as "low-high"."""
    n = len(values)
    if n < 2:
        return "n/a"
    logs = [math.log(v) for v in values]
    mean = sum(logs) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.960
    half = t * sd / math.sqrt(n)
    return f"{math.exp(mean - half):.3f}-{math.exp(mean + half):.3f}"


def _geomean(values):
    """Geometric mean of positive ratios: the typical per-round ratio, where a round at 0.8 and
    one at 1.25 cancel out."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def cmd_report_switching(a):
    rows = _load(a.file)
    tab = []
    for r in rows:
        sw = r.get("switch", {})
        tab.append([
            r["contender"], _fmt(r["requests"]), _fmt(r["rps"]),
            _fmt(r["socket_errors"]),
            "/".join(_fmt(r[k]) for k in ("err_connect", "err_read", "err_write", "err_timeout")),
            _fmt(r["non2xx3xx"]),
            _fmt(r.get("lua_non2xx")),
            f"{_fmt(r.get('lua_blue'))} / {_fmt(r.get('lua_green'))} / {_fmt(r.get('lua_other'))}",
            f"{sw.get('performed', 'n/a')} of {sw.get('attempted', 'n/a')}",
            r.get("confirmed", "n/a"),
            r.get("final_check", "n/a"),
        ])
    print(_table(
        ["method", "requests", "req/s", "socket errors", "connect/read/write/timeout",
         "non-2xx/3xx (wrk)", "non-2xx (lua)", "bodies blue / green / other",
         "switches performed", "confirmed by proxy", "live colour at end"],
        tab))


def _mib(kb):
    return "n/a" if kb is None else f"{kb / 1024:.1f} MiB"


def cmd_report_memory(a):
    rows = _load(a.file)
    tab = []
    for r in rows:
        idle, peak = r["idle"], r["peak"]
        tab.append([
            r["contender"], str(idle["procs"]), _mib(idle["rss_kb"]), _mib(peak["rss_kb"]),
            _mib(idle["pss_kb"]), _mib(peak["pss_kb"]), _fmt(peak["fds"]),
            _fmt(r["requests"]), _fmt(r["socket_errors"]), _fmt(r["non2xx3xx"]),
            _fmt(peak["samples"]),
        ])
    print(_table(
        ["proxy", "processes", "RSS idle", "RSS peak under load", "PSS idle", "PSS peak",
         "open fds peak", "requests during load", "socket errors", "non-2xx/3xx", "samples"],
        tab))


# ---------------------------------------------------------------- markdown


def cmd_md_update(a):
    begin, end = f"<!-- BEGIN {a.section} -->", f"<!-- END {a.section} -->"
    with open(a.content) as f:
        body = f.read().strip("\n")
    block = f"{begin}\n{body}\n{end}"
    try:
        with open(a.file) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = f"# {a.title}\n"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(doc):
        doc = pat.sub(lambda _: block, doc, count=1)
    elif a.first:
        # after the H1 title line if there is one, else at the top
        m = re.match(r"(# [^\n]*\n)", doc)
        if m:
            doc = m.group(1) + "\n" + block + "\n" + doc[m.end():]
        else:
            doc = block + "\n\n" + doc
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    doc = re.sub(r"\n{3,}", "\n\n", doc)
    tmp = a.file + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, a.file)


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("ports"); s.add_argument("n", type=int); s.set_defaults(f=cmd_ports)
    s = sp.add_parser("wait-ready")
    s.add_argument("--pid", type=int, default=0); s.add_argument("--port", type=int, required=True)
    s.add_argument("--expect", default=""); s.add_argument("--timeout", type=float, default=20)
    s.set_defaults(f=cmd_wait_ready)
    s = sp.add_parser("probe"); s.add_argument("--port", type=int, required=True)
    s.add_argument("--timeout", type=float, default=2); s.set_defaults(f=cmd_probe)
    s = sp.add_parser("quiet-check"); s.set_defaults(f=cmd_quiet_check)
    s = sp.add_parser("parse-wrk"); s.add_argument("file"); s.add_argument("--tag", action="append")
    s.set_defaults(f=cmd_parse_wrk)
    s = sp.add_parser("wrk-line"); s.set_defaults(f=cmd_wrk_line)
    s = sp.add_parser("rss"); s.add_argument("--pid", type=int, required=True); s.set_defaults(f=cmd_rss)
    s = sp.add_parser("sample"); s.add_argument("--pid", type=int, required=True)
    s.add_argument("--while-pid", type=int, required=True)
    s.add_argument("--interval", type=float, default=0.1)
    s.add_argument("--max-seconds", type=float, default=120); s.set_defaults(f=cmd_sample)
    s = sp.add_parser("switch"); s.add_argument("--method", choices=["cutover", "nginx", "haproxy"], required=True)
    s.add_argument("--pid", type=int); s.add_argument("--conf"); s.add_argument("--sock")
    s.add_argument("--blue-port", type=int); s.add_argument("--green-port", type=int)
    s.add_argument("--interval", type=float, default=0.1); s.add_argument("--duration", type=float, required=True)
    s.set_defaults(f=cmd_switch)
    for name, f in (("report-throughput", cmd_report_throughput), ("report-switching", cmd_report_switching),
                    ("report-memory", cmd_report_memory)):
        s = sp.add_parser(name); s.add_argument("file"); s.add_argument("--order", default="")
        s.set_defaults(f=f)
    s = sp.add_parser("md-update"); s.add_argument("--file", required=True)
    s.add_argument("--section", required=True); s.add_argument("--content", required=True)
    s.add_argument("--title", default="Benchmarks"); s.add_argument("--first", action="store_true")
    s.set_defaults(f=cmd_md_update)
    a = p.parse_args()
    sys.exit(a.f(a) or 0)


if __name__ == "__main__":
    main()
