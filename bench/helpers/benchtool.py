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
  parse-load FILE --kind K      wrk / h2load / tls-load output (+ CPU snapshots) -> one JSON object
  load-line                     one parse-load line (stdin) -> a short summary
  report-tls FILE               bench/tls.sh's markdown tables from JSON lines
  md-update --file F --section S --content C   replace/append a marked section
"""
import argparse
import json
import math
import os
import re
import signal
import socket
import ssl
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


def _tls_client(sock):
    """TLS over `sock` for a readiness probe: any certificate, HTTP/1.1 by ALPN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(sock, server_hostname="localhost")


def http_get(port, timeout=2.0, path="/", tls=False):
    """One HTTP/1.1 GET with Connection: close (over TLS with tls=True). Returns (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        s = _tls_client(raw) if tls else raw
        s.settimeout(timeout)
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ssl.SSLEOFError:
                break  # closed without close_notify: what came before still counts
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
            st, body = http_get(a.port, timeout=2.0, tls=a.tls)
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


# ---------------------------------------------------------------- TLS (bench/tls.sh)


def _percentiles(values_ms):
    """p50, p90, p99 (nearest rank) of a list of milliseconds."""
    v = sorted(values_ms)
    if not v:
        return None, None, None

    def at(p):
        i = max(1, math.ceil(p / 100 * len(v)))
        return v[i - 1]
    return at(50), at(90), at(99)


def parse_h2load(text, log_path):
    r = {"ok": False, "rate": 0.0, "requests": 0, "errors": 0, "p50_ms": None, "p90_ms": None,
         "p99_ms": None, "tls": {}}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    if m:
        r["rate"] = float(m.group(1))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    if m:
        total, _, _, ok, failed, errored, tout = map(int, m.groups())
        r["requests"] = ok
        r["errors"] = failed + errored + tout
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        r["errors"] += int(m.group(3)) + int(m.group(4))
    for key, pat in (("protocol", r"TLS Protocol: (.+)"), ("cipher", r"Cipher: (.+)"),
                     ("group", r"Server Temp Key: (\S+)"), ("alpn", r"Application protocol: (.+)")):
        m = re.search(pat, text)
        if m:
            r["tls"][key] = m.group(1).strip()
    lat = []
    if log_path:
        try:
            with open(log_path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[2].isdigit():
                        lat.append(int(parts[2]) / 1000)
        except OSError:
            pass
    r["p50_ms"], r["p90_ms"], r["p99_ms"] = _percentiles(lat)
    r["ok"] = r["rate"] > 0 and r["requests"] > 0
    return r


def parse_tls_load(text):
    r = {"ok": False, "rate": 0.0, "requests": 0, "errors": 0, "p50_ms": None, "p90_ms": None,
         "p99_ms": None, "tls": {}}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        r.update(ok=bool(d["ok"]), rate=d["rate"], requests=d["connections"],
                 errors=d["err_connect"] + d["err_tls"] + d["err_http"] + d["err_timeout"],
                 p50_ms=d["p50_ms"], p90_ms=d["p90_ms"], p99_ms=d["p99_ms"], resumed=d["resumed"],
                 errors_by_kind={k: d[k] for k in ("err_connect", "err_tls", "err_http", "err_timeout")})
        r["tls"] = {"protocol": d["protocol"], "cipher": d["cipher"], "group": d["group"], "alpn": d["alpn"]}
    return r


def cmd_parse_load(a):
    with open(a.file, errors="replace") as f:
        text = f.read()
    if a.kind == "wrk":
        w = parse_wrk(text)
        r = {"ok": w["ok"], "rate": w["rps"], "requests": w["requests"],
             "errors": w["socket_errors"] + w["non2xx3xx"], "p50_ms": w["p50_ms"], "p90_ms": w["p90_ms"],
             "p99_ms": w["p99_ms"], "tls": {}}
    elif a.kind == "h2load":
        r = parse_h2load(text, a.log)
    else:
        r = parse_tls_load(text)
    # CPU over the measuring window: "user sys" ticks of the proxy, the load generator and the backend.
    if a.cpu_before and a.cpu_after and a.window_ns:
        b = [int(x) for x in a.cpu_before.split()]
        e = [int(x) for x in a.cpu_after.split()]
        secs = a.window_ns / 1e9
        for i, who in enumerate(("proxy", "client", "backend")):
            if len(b) < 2 * i + 2 or len(e) < 2 * i + 2:
                continue
            u = (e[2 * i] - b[2 * i]) / a.hz
            sy = (e[2 * i + 1] - b[2 * i + 1]) / a.hz
            reqs = r["rate"] * secs
            r[who] = {"busy": (u + sy) / secs,
                      "user_us": u * 1e6 / reqs if reqs else None,
                      "sys_us": sy * 1e6 / reqs if reqs else None}
        # Then "busy nice total" ticks of CPU 0 and CPU 1 (busy without nice).
        for n, i in ((0, 6), (1, 9)):
            if len(b) >= i + 3 and len(e) >= i + 3 and e[i + 2] > b[i + 2]:
                total = e[i + 2] - b[i + 2]
                r[f"cpu{n}_busy"] = (e[i] - b[i]) / total
                r[f"cpu{n}_nice"] = (e[i + 1] - b[i + 1]) / total
    for kv in a.tag or []:
        k, _, v = kv.partition("=")
        r[k] = int(v) if v.isdigit() else v
    print(json.dumps(r))


def cmd_load_line(a):
    r = json.loads(sys.stdin.readline())
    extra = ""
    if "resumed" in r:
        extra += f", resumed {r['resumed']:,}"
    if "proxy" in r and r["proxy"].get("user_us") is not None:
        p = r["proxy"]
        extra += (f", proxy {p['user_us']:.0f}+{p['sys_us']:.0f} µs/req user+sys, busy {100 * p['busy']:.0f}%")
    if "client" in r:
        extra += f", load generator busy {100 * r['client']['busy']:.0f}%"
    print(f"{r['rate']:,.0f}/s, p50 {_ms_fmt(r['p50_ms'])}, p99 {_ms_fmt(r['p99_ms'])}, "
          f"errors {r['errors']}, done {r['requests']:,}{extra}")


_TLS_MEASURES = {
    "full": ("New TLS connections per second, full handshakes", "handshakes/s"),
    "resumed": ("New TLS connections per second, resumed handshakes", "handshakes/s"),
    "keepalive": ("Keep-alive HTTPS, HTTP/1.1", "req/s"),
    "h2": ("HTTP/2 over TLS", "req/s"),
}


def _spread(xs):
    xs = [x for x in xs if x]
    if len(xs) < 2:
        return "n/a"
    return f"{100 * (max(xs) - min(xs)) / statistics.median(xs):.0f}%"


def cmd_report_tls(a):
    rows = _load(a.file)
    order = a.order.split()
    pairs = [(x, y) for x, y in (("cutover", "haproxy"), ("cutover", "nginx"), ("haproxy", "nginx"),
                                 ("cutover-alt", "cutover"), ("cutover-alt", "haproxy"),
                                 ("cutover", "haproxy-headers"), ("cutover", "nginx-headers"))
             if x in order and y in order]
    medians = {}
    pinned = bool(rows) and all(r.get("pinned") == 1 for r in rows)
    if a.negotiated:
        _report_negotiated(rows, order, a.measures.split())
        return
    for m in a.measures.split():
        title, unit = _TLS_MEASURES[m]
        mrows = [r for r in rows if r.get("measure") == m]
        if not mrows:
            continue
        print(f"### {title}")
        print()
        handshakes = m in ("full", "resumed")
        tab = []
        for c in order:
            rs = sorted((r for r in mrows if r["contender"] == c), key=lambda r: r["round"])
            if not rs:
                continue
            good = [r for r in rs if r["ok"]]
            med = {"rate": _median([r["rate"] for r in good]), "p50": _median([r["p50_ms"] for r in good]),
                   "p99": _median([r["p99_ms"] for r in good])}
            medians[(m, c)] = med

            def cpu(who, key):
                return _median([r[who][key] for r in good if who in r and r[who].get(key) is not None])
            pu, ps = cpu("proxy", "user_us"), cpu("proxy", "sys_us")
            row = [c, _fmt(med["rate"]), " / ".join(_fmt(r["rate"]) if r["ok"] else "failed" for r in rs),
                   _spread([r["rate"] for r in good]), _ms_fmt(med["p50"]), _ms_fmt(med["p99"]),
                   _fmt(sum(r["errors"] for r in rs))]
            if handshakes:
                done = sum(r["requests"] for r in rs)
                row.append(f"{sum(r.get('resumed', 0) for r in rs):,} of {done:,}")
            row.append("n/a" if pu is None else f"{pu:.0f} + {ps:.0f} = {pu + ps:.0f}")
            pb, bb, cb = cpu("proxy", "busy"), cpu("backend", "busy"), cpu("client", "busy")
            # The rest: the CPU's busy time (without nice) that none of ours was charged with.
            rest1 = _median([r["cpu1_busy"] - r["proxy"]["busy"] - r["backend"]["busy"] for r in good
                             if "cpu1_busy" in r and "proxy" in r and "backend" in r])
            rest0 = _median([r["cpu0_busy"] - r["client"]["busy"] for r in good if "cpu0_busy" in r and "client" in r])
            n1, n0 = _median([r.get("cpu1_nice") for r in good]), _median([r.get("cpu0_nice") for r in good])

            def pct(x):
                return f"{100 * max(0.0, x):.0f}"
            if pinned and None not in (pb, bb, cb, rest1, rest0, n1, n0):
                row.append(f"{pct(pb)} / {pct(bb)} / {pct(n1)} / {pct(rest1)}")
                row.append(f"{pct(cb)} / {pct(n0)} / {pct(rest0)}")
            else:
                row.append("n/a" if pb is None else f"{100 * pb:.0f}%")
                row.append("n/a" if cb is None else f"{100 * cb:.0f}%")
            tab.append(row)
        head = ["contender", f"{unit} (median)", f"{unit} per round", "spread (max-min)/median",
                "p50 (median)", "p99 (median)", "errors (all rounds)"]
        if handshakes:
            head.append("resumed handshakes")
        head.append("proxy CPU per " + ("connection" if handshakes else "request") + ", user + sys µs (median)")
        if pinned:
            head += ["CPU 1, % of its time: proxy / backend / niced / rest (medians)",
                     "CPU 0, % of its time: load generator / niced / rest (medians)"]
        else:
            head += ["proxy CPU busy (median)", "load generator CPU busy (median)"]
        print(_table(head, tab))
        print()
        by = {(r["contender"], r["round"]): r for r in mrows if r["ok"]}
        rounds = sorted({r["round"] for r in mrows})
        tab = []
        for x, y in pairs:
            mx, my = medians.get((m, x)), medians.get((m, y))
            if not mx or not my or not mx["rate"] or not my["rate"]:
                continue
            both = [(by[(x, n)], by[(y, n)]) for n in rounds if (x, n) in by and (y, n) in by]
            rr = [bx["rate"] / b_["rate"] for bx, b_ in both]
            pr = [bx["p99_ms"] / b_["p99_ms"] for bx, b_ in both if bx["p99_ms"] and b_["p99_ms"]]
            tab.append([
                f"{x} / {y}", f"{mx['rate'] / my['rate']:.3f}",
                " / ".join(f"{v:.3f}" for v in rr), f"{_geomean(rr):.3f}" if rr else "n/a", _interval(rr),
                f"{sum(v >= 1 for v in rr)} of {len(rr)}",
                f"{_ms_fmt(mx['p99'])} vs {_ms_fmt(my['p99'])}",
                f"{_geomean(pr):.3f}" if pr else "n/a", _interval(pr),
                f"{sum(bx['p99_ms'] <= b_['p99_ms'] for bx, b_ in both if bx['p99_ms'] and b_['p99_ms'])} of {len(pr)}",
            ])
        if tab:
            print(_table(["ratio", f"{unit}, ratio of medians", f"{unit} ratio per round",
                          "per round, geometric mean", "per round, 95% interval", "rounds at least the second's",
                          "p99 (medians)", "p99 ratio per round, geometric mean", "p99 ratio, 95% interval",
                          "rounds with p99 at most the second's"], tab))
            print()
    # The bar: keep-alive req/s at least HAProxy's, with a p99 no worse.
    c, h = medians.get(("keepalive", "cutover")), medians.get(("keepalive", "haproxy"))
    if c and h and c["rate"] and h["rate"] and c["p99"] and h["p99"]:
        rate_ok, p99_ok = c["rate"] >= h["rate"], c["p99"] <= h["p99"]
        verdict = "met" if rate_ok and p99_ok else "not met"
        by = {(r["contender"], r["round"]): r for r in rows if r.get("measure") == "keepalive" and r["ok"]}
        both = [(by[("cutover", n)], by[("haproxy", n)]) for n in sorted({n for _, n in by})
                if ("cutover", n) in by and ("haproxy", n) in by]
        ahead = sum(x["rate"] >= y["rate"] for x, y in both)
        lower = sum(x["p99_ms"] <= y["p99_ms"] for x, y in both if x["p99_ms"] and y["p99_ms"])
        print(f"**Bar (keep-alive HTTPS req/s at least HAProxy's, p99 no worse), on the medians of this run: "
              f"{verdict}.** cutover {_fmt(c['rate'])} req/s against {_fmt(h['rate'])} "
              f"({c['rate'] / h['rate']:.3f}), {'at least' if rate_ok else 'below'}; p99 {_ms_fmt(c['p99'])} "
              f"against {_ms_fmt(h['p99'])}, {'no worse' if p99_ok else 'worse'}. Round by round, cutover's "
              f"req/s was at least HAProxy's in {ahead} of {len(both)} rounds, and its p99 at most HAProxy's "
              f"in {lower} of {len(both)}.")
        print()


def _report_negotiated(rows, order, measures):
    """What was negotiated, as each load generator reported it."""
    seen = {}
    for r in rows:
        t = r.get("tls") or {}
        if t:
            key = (r["contender"], r["measure"])
            seen.setdefault(key, set()).add(tuple(t.get(k, "?") for k in ("protocol", "cipher", "group", "alpn")))
    if seen:
        tab = []
        for c in order:
            for m in measures:
                for t in sorted(seen.get((c, m), ())):
                    tab.append([c, m, *t])
        print(_table(["contender", "measure", "protocol", "cipher suite", "key exchange", "ALPN"], tab))
        print()


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
    s.add_argument("--tls", action="store_true"); s.set_defaults(f=cmd_wait_ready)
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
    s = sp.add_parser("parse-load"); s.add_argument("file")
    s.add_argument("--kind", choices=["wrk", "h2load", "tls-load"], required=True)
    s.add_argument("--log", default=""); s.add_argument("--tag", action="append")
    s.add_argument("--cpu-before", default=""); s.add_argument("--cpu-after", default="")
    s.add_argument("--window-ns", type=int, default=0); s.add_argument("--hz", type=int, default=100)
    s.set_defaults(f=cmd_parse_load)
    s = sp.add_parser("load-line"); s.set_defaults(f=cmd_load_line)
    s = sp.add_parser("report-tls"); s.add_argument("file"); s.add_argument("--order", default="")
    s.add_argument("--measures", default="full resumed keepalive h2")
    s.add_argument("--negotiated", action="store_true", help="only the table of what was negotiated")
    s.set_defaults(f=cmd_report_tls)
    s = sp.add_parser("md-update"); s.add_argument("--file", required=True)
    s.add_argument("--section", required=True); s.add_argument("--content", required=True)
    s.add_argument("--title", default="Benchmarks"); s.add_argument("--first", action="store_true")
    s.set_defaults(f=cmd_md_update)
    a = p.parse_args()
    sys.exit(a.f(a) or 0)


if __name__ == "__main__":
    main()
