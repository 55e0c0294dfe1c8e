#!/usr/bin/env python3
"""Timing of switches in a fleet of `cutover serve` nodes, for bench/fleet.sh.

Subcommands:
  ports N                 N free 127.0.0.1 ports in 20000-31999
  etcd-ready URL...       waits (bounded) until every etcd member reports itself healthy
  leader                  the fleet's leader, read from etcd
  switches                performs the switches and times each one (JSON lines out)
  idle-cpu                CPU time of processes over idle windows (JSON out)
  report                  the Markdown tables from the JSON files

Everything talks to 127.0.0.1 only; every loop is bounded in count and time. Times are unix
microseconds from this host's clock, which the nodes share.
"""
import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time


def now_us():
    return time.time_ns() // 1000


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s):
    return base64.b64decode(s or "")


def host_port(url):
    u = url.split("://", 1)[-1].rstrip("/")
    h, p = u.rsplit(":", 1)
    if h not in ("127.0.0.1", "localhost"):
        sys.exit(f"not a loopback address: {url}")
    return "127.0.0.1", int(p)


# ---------------------------------------------------------------- ports / etcd


def cmd_ports(a):
    rng = random.Random()
    socks, ports = [], []
    try:
        for _ in range(2000):
            if len(ports) == a.n:
                break
            p = rng.randint(20000, 31999)
            if p in ports:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(p)
    finally:
        for s in socks:
            s.close()
    if len(ports) < a.n:
        sys.exit("not enough free ports in 20000-31999")
    print(" ".join(map(str, ports)))


def etcd_post(url, path, body, timeout=3.0):
    h, p = host_port(url)
    c = http.client.HTTPConnection(h, p, timeout=timeout)
    try:
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise OSError(f"etcd {path}: {r.status} {data[:200]!r}")
        return json.loads(data)
    finally:
        c.close()


def etcd_get(url, key):
    """(value bytes or None, header revision)."""
    resp = etcd_post(url, "/v3/kv/range", {"key": b64(key)})
    kvs = resp.get("kvs") or []
    rev = int(resp.get("header", {}).get("revision", 0))
    return (unb64(kvs[0].get("value")) if kvs else None), rev


def cmd_etcd_ready(a):
    deadline = time.monotonic() + a.timeout
    pending = list(a.urls)
    while pending and time.monotonic() < deadline:
        still = []
        for u in pending:
            h, p = host_port(u)
            try:
                c = http.client.HTTPConnection(h, p, timeout=1.0)
                c.request("GET", "/health")
                ok = json.loads(c.getresponse().read()).get("health") in ("true", True)
                c.close()
            except (OSError, ValueError):
                ok = False
            if not ok:
                still.append(u)
        pending = still
        if pending:
            time.sleep(0.2)
    if pending:
        sys.exit(f"etcd members not healthy within {a.timeout}s: {' '.join(pending)}")


def cmd_leader(a):
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        try:
            v, _ = etcd_get(a.etcd, f"{a.prefix}/leader")
        except OSError:
            v = None
        if v:
            print(v.decode())
            return
        time.sleep(0.1)
    sys.exit(f"no leader in etcd within {a.timeout}s")


# ---------------------------------------------------------------- etcd watcher


class Watcher(threading.Thread):
    """Watches every key under the prefix through etcd's JSON gateway and records, with the
    instant each event arrived here: the service's route states (revision, live colour) and the
    nodes' acknowledgements."""

    def __init__(self, url, prefix, service):
        super().__init__(daemon=True)
        self.url, self.prefix, self.service = url, prefix, service
        self.lock = threading.Lock()
        self.states = []  # (revision, seen_us, live colour or None)
        self.acks = []  # (node, acked revision, applied_at_us or None, seen_us, put revision)
        self.error = None
        self.ready = threading.Event()
        self.stop = False

    def run(self):
        try:
            _, rev = etcd_get(self.url, self.prefix + "/")
            h, p = host_port(self.url)
            c = http.client.HTTPConnection(h, p, timeout=None)
            end = self.prefix + "0"  # the end of the range of keys under prefix + "/"
            body = {"create_request": {"key": b64(self.prefix + "/"), "range_end": b64(end), "start_revision": rev + 1}}
            c.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                raise OSError(f"watch: {r.status}")
            self.ready.set()
            state_key = f"{self.prefix}/services/{self.service}/state"
            ack_prefix = f"{self.prefix}/acks/{self.service}/"
            while not self.stop:
                line = r.readline()
                if not line:
                    raise OSError("etcd ended the watch")
                seen = now_us()
                if not line.strip():
                    continue
                msg = json.loads(line)
                res = msg.get("result") or {}
                for ev in res.get("events") or []:
                    if ev.get("type") == "DELETE":
                        continue
                    kv = ev.get("kv") or {}
                    key = unb64(kv.get("key")).decode()
                    val = unb64(kv.get("value"))
                    mod = int(kv.get("mod_revision", 0))
                    if key == state_key:
                        try:
                            live = (json.loads(val).get("live") or {}).get("colour")
                        except ValueError:
                            live = None
                        with self.lock:
                            self.states.append((mod, seen, live))
                    elif key.startswith(ack_prefix):
                        try:
                            ack = json.loads(val)
                        except ValueError:
                            continue
                        with self.lock:
                            self.acks.append(
                                (key[len(ack_prefix):], int(ack["revision"]), ack.get("applied_at_us"), seen, mod)
                            )
        except Exception as e:  # reported by the main thread
            self.error = repr(e)
            self.ready.set()


# ---------------------------------------------------------------- probers


def prober(name, port, hot, stop, gap_us, out):
    """Sends GET / on one keep-alive connection while `hot` is set (as fast as answers come,
    or `gap_us` apart), recording each change of the answer's body: (received_us, sent_us,
    body), plus the send time of the last request before it. Idle while not hot."""
    changes, last, n, errors = [], None, 0, 0
    sock, buf = None, b""
    deadline = time.monotonic() + 3600
    prev_sent = 0
    while not stop.is_set() and time.monotonic() < deadline:
        if not hot.is_set():
            hot.wait(0.05)
            continue
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            sent = now_us()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            while b"\r\n\r\n" not in buf:
                d = sock.recv(65536)
                if not d:
                    raise OSError("closed")
                buf += d
            head, _, buf = buf.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if not m:
                raise OSError("no content-length")
            ln = int(m.group(1))
            while len(buf) < ln:
                d = sock.recv(65536)
                if not d:
                    raise OSError("closed")
                buf += d
            body, buf = buf[:ln], buf[ln:]
            got = now_us()
            n += 1
            status = head.split(b" ", 2)[1]
            text = body.decode(errors="replace").strip() if status == b"200" else f"status {status.decode()}"
            if text != last:
                changes.append((got, sent, prev_sent, text))
                last = text
            prev_sent = sent
            if re.search(rb"(?i)\r\nconnection:\s*close", head):
                sock.close()
                sock = None
        except OSError:
            errors += 1
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.01)
        if gap_us:
            time.sleep(gap_us / 1e6)
    out.put((name, changes, n, errors))


def get_body(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            return None
        return body.decode(errors="replace").strip()
    except OSError:
        return None


# ---------------------------------------------------------------- switches


def cmd_switches(a):
    fronts = dict(x.split("=", 1) for x in a.front)
    fronts = {k: int(v) for k, v in fronts.items()}
    w = Watcher(a.etcd, a.prefix, a.service)
    w.start()
    if not w.ready.wait(10) or w.error:
        sys.exit(f"cannot watch etcd: {w.error}")
    ctx = mp.get_context("fork")
    hot, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=prober, args=(n, p, hot, stop, a.gap_us, out), daemon=True) for n, p in fronts.items()]
    for p in procs:
        p.start()
    bodies = {"v1": a.body_v1, "v2": a.body_v2}
    current = None
    for n, p in fronts.items():
        b = get_body(p)
        if b not in bodies.values():
            sys.exit(f"node {n} answers {b!r}, neither {a.body_v1!r} nor {a.body_v2!r}")
        current = b if current is None else current
        if b != current:
            sys.exit("the nodes do not serve the same version before the first switch")
    records = []
    started = time.monotonic()
    deploys = 0
    fails = 0
    i = 0
    while len(records) < a.count and i < a.count * 3 and time.monotonic() - started < a.max_seconds:
        i += 1
        to_v2 = current == a.body_v1
        new_body = a.body_v2 if to_v2 else a.body_v1
        # From v1 to v2: a deploy of v2 (a new version name each time); back: an instant rollback.
        if to_v2:
            deploys += 1
            cmd = [a.bin, "deploy", a.service, "--version", f"v2-{deploys}", "--upstream", a.v2, "-c", a.config]
            kind = "deploy"
        else:
            cmd = [a.bin, "rollback", a.service, "-c", a.config]
            kind = "rollback"
        with w.lock:
            n_states = len(w.states)
        hot.set()
        time.sleep(0.02)  # the probers' connections are open and answering
        t_cmd = now_us()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.switch_timeout)
            said, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            said, rc = f"timed out: {e}", -1
        # The switching revision: the first route state after the command began that names
        # another live colour than the one before it.
        deadline = time.monotonic() + a.switch_timeout
        rev = seen = None
        while time.monotonic() < deadline:
            with w.lock:
                prev = w.states[n_states - 1][2] if n_states else None
                for rv, sn, live in w.states[n_states:]:
                    if prev is not None and live is not None and live != prev:
                        rev, seen = rv, sn
                        break
                    prev = live if live is not None else prev
            if rev is not None or rc != 0:
                break
            time.sleep(0.005)
        ok = rev is not None
        acks_done = False
        while ok and time.monotonic() < deadline:
            with w.lock:
                have = {}
                for node, arev, _, sn, _ in w.acks:
                    if arev >= rev:
                        have.setdefault(node, sn)
            if all(n in have for n in fronts):
                acks_done = True
                break
            time.sleep(0.005)
        served = False
        while ok and time.monotonic() < deadline:
            if all(get_body(p) == new_body for p in fronts.values()):
                served = True
                break
            time.sleep(0.005)
        time.sleep(0.02)
        hot.clear()
        time.sleep(0.06)  # the probers are idle before the next command
        if not (ok and acks_done and served):
            fails += 1
            print(f"switch {i} ({kind}) incomplete: rc={rc} revision={rev} acks={acks_done} served={served}: {said.strip()[-300:]}", file=sys.stderr)
            if fails >= 3:
                break
            # Back to a known state: what the nodes serve now.
            current = get_body(next(iter(fronts.values())))
            continue
        records.append({"i": len(records), "kind": kind, "revision": rev, "cmd_us": t_cmd, "seen_us": seen,
                        "new_body": new_body})
        current = new_body
        if len(records) % 10 == 0:
            print(f"  {len(records)} switches", file=sys.stderr)
    stop.set()
    hot.set()
    results = {}
    for _ in procs:
        name, changes, n, errors = out.get(timeout=30)
        results[name] = {"changes": changes, "requests": n, "errors": errors}
    for p in procs:
        p.join(5)
    w.stop = True
    with w.lock:
        acks = list(w.acks)
    # Per switch: the commit's instant (t0), each node's acknowledgement and first answer from
    # the new version.
    for k, r in enumerate(records):
        nxt = records[k + 1]["cmd_us"] if k + 1 < len(records) else float("inf")
        rev = r["revision"]
        leader_ack = [ap for node, arev, ap, sn, mod in acks if node == a.leader and arev == rev and ap]
        r["leader_ack_us"] = leader_ack[0] if leader_ack else None
        lch = results.get(a.leader, {}).get("changes", [])
        leader_served = next((got for got, sent, prev, body in lch if body == r["new_body"] and r["cmd_us"] <= got < nxt), None)
        r["leader_serve_us"] = leader_served
        # The commit came before each of these: the earliest is the closest to it.
        t0 = min(x for x in (r["seen_us"], r["leader_ack_us"], leader_served) if x is not None)
        r["t0_us"] = t0
        r["nodes"] = {}
        for n in fronts:
            first = next(((node, arev, ap, sn) for node, arev, ap, sn, mod in acks if node == n and arev >= rev), None)
            ch = results[n]["changes"]
            served = next(((got, sent, prev) for got, sent, prev, body in ch if body == r["new_body"] and r["cmd_us"] <= got < nxt), None)
            r["nodes"][n] = {
                "ack_seen_us": first[3] if first else None,
                "ack_applied_us": first[2] if first else None,
                "serve_us": served[0] if served else None,
                "serve_sent_us": served[1] if served else None,
                "last_old_sent_us": served[2] if served else None,
            }
    with w.lock:
        states = list(w.states)
    json.dump({"switches": records, "acks": acks, "states": states, "probers": {n: {"requests": v["requests"], "errors": v["errors"],
                                                     "changes": len(v["changes"])} for n, v in results.items()},
               "incomplete": fails, "seconds": time.monotonic() - started}, open(a.out, "w"))
    if len(records) < a.count:
        sys.exit(f"only {len(records)} of {a.count} switches completed")


# ---------------------------------------------------------------- idle CPU


def cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    # utime, stime (fields 14 and 15 of the whole line)
    return (int(fields[11]) + int(fields[12])) * 1000.0 / tck


def cmd_idle_cpu(a):
    """Every process is sampled over the same windows, so that what else runs on the machine
    meanwhile weighs on each alike."""
    pids = dict(x.split("=", 1) for x in a.pid)
    rounds = []
    for r in range(a.rounds):
        c0, t0 = {n: cpu_ms(p) for n, p in pids.items()}, time.monotonic()
        time.sleep(a.seconds)
        c1, t1 = {n: cpu_ms(p) for n, p in pids.items()}, time.monotonic()
        row = {n: (c1[n] - c0[n]) * 60.0 / (t1 - t0) for n in pids}
        print(f"  round {r + 1}: " + ", ".join(f"{n} {v:.0f}" for n, v in row.items()) + " ms CPU per minute", file=sys.stderr)
        rounds.append(row)
    json.dump({"seconds": a.seconds, "rounds": rounds, "tick_ms": 1000.0 / os.sysconf("SC_CLK_TCK")}, open(a.out, "w"))


# ---------------------------------------------------------------- report


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    # nearest rank: the smallest value with at least p% of the values at or below it
    k = max(0, min(len(xs) - 1, -(-p * len(xs) // 100) - 1))
    return xs[k]


def ms(us):
    return "n/a" if us is None or us != us else f"{us / 1000:.1f} ms"


def cmd_report(a):
    d = json.load(open(a.switches))
    sw = d["switches"]
    rows = {"ack": [], "ack_applied": [], "serve": [], "serve_sent": [], "waited": [], "commit_lag": []}
    # The leader's notice of each switch: "every node of the fleet serves green (revision 37): ...
    # acknowledged in 15.5ms".
    waited = {}
    scale = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
    for m in re.finditer(r"\(revision (\d+)\): [^\n]*acknowledged in ([\d.]+)(ns|µs|us|ms|s)\b",
                         open(a.leader_log, errors="replace").read() if a.leader_log else ""):
        waited[int(m.group(1))] = float(m.group(2)) * scale[m.group(3)]
    early, early_by = 0, 0
    missing = 0
    per_node_serve = {}
    for r in sw:
        t0 = r["t0_us"]
        nodes = r["nodes"]
        if any(v["ack_seen_us"] is None or v["serve_us"] is None for v in nodes.values()):
            missing += 1
            continue
        rows["ack"].append(max(v["ack_seen_us"] for v in nodes.values()) - t0)
        if all(v["ack_applied_us"] for v in nodes.values()):
            rows["ack_applied"].append(max(v["ack_applied_us"] for v in nodes.values()) - t0)
        rows["serve"].append(max(v["serve_us"] for v in nodes.values()) - t0)
        rows["serve_sent"].append(max(v["serve_sent_us"] for v in nodes.values()) - t0)
        for n, v in nodes.items():
            per_node_serve.setdefault(n, []).append(v["serve_us"] - t0)
            # The commit came before t0 by an unknown part of a millisecond or more: a follower
            # whose watch was quicker answers from the new version before t0.
            if v["serve_us"] < t0:
                early += 1
                early_by = max(early_by, t0 - v["serve_us"])
        if r["revision"] in waited:
            rows["waited"].append(waited[r["revision"]])
        if r["leader_ack_us"] is not None:
            rows["commit_lag"].append(r["seen_us"] - r["leader_ack_us"])
    print("| from the commit of the switching revision to ... | switches | p50 | p99 | max |")
    print("|---|---|---|---|---|")
    labels = [
        ("ack", "the last node's acknowledgement, as etcd delivers it to a watcher"),
        ("ack_applied", "the last node's acknowledgement, as the node timed it (applied, before its write)"),
        ("serve", "the last node answering from the new version (first such answer received)"),
        ("serve_sent", "the same, by the send time of that request"),
    ]
    for k, label in labels:
        xs = rows[k]
        print(f"| {label} | {len(xs)} | {ms(pct(xs, 50))} | {ms(pct(xs, 99))} | {ms(max(xs) if xs else None)} |")
    xs = rows["waited"]
    print(f"| (the leader's own wait for every acknowledgement, from its table switch: its notice \"acknowledged in\") | {len(xs)} | {ms(pct(xs, 50))} | {ms(pct(xs, 99))} | {ms(max(xs) if xs else None)} |")
    print()
    kinds = {}
    for r in sw:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print("Switches: " + ", ".join(f"{v} by {k}" for k, v in sorted(kinds.items()))
          + f"; {d['incomplete']} incomplete and retried; {missing} without a complete record; "
          + f"run took {d['seconds']:.0f} s. In {early} of {3 * len(rows['serve'])} cases a node answered from the new version "
          + f"before t0 (by at most {ms(early_by)}): the commit's first sign arrived later than that node's watch did.")
    print()
    # Where a follower's time goes: from the commit to having applied the revision (its own
    # timestamp in the acknowledgement), then the acknowledgement's write until etcd delivers it.
    applied, write = {}, []
    for r in sw:
        for n, v in r["nodes"].items():
            if v["ack_applied_us"] and v["ack_seen_us"]:
                applied.setdefault(n, []).append(v["ack_applied_us"] - r["t0_us"])
                write.append(v["ack_seen_us"] - v["ack_applied_us"])
    by_kind = {}
    for r in sw:
        if all(v["serve_us"] for v in r["nodes"].values()):
            by_kind.setdefault(r["kind"], []).append(max(v["serve_us"] for v in r["nodes"].values()) - r["t0_us"])
    print("From the commit to the last node answering from the new version, by kind of switch: "
          + "; ".join(f"{k} p50 {ms(pct(v, 50))}, p99 {ms(pct(v, 99))}" for k, v in sorted(by_kind.items())) + ".")
    gaps = {}
    for r in sw:
        before = [seen for rev, seen, live in d.get("states", []) if rev < r["revision"]]
        if before:
            gaps.setdefault(r["kind"], []).append(r["seen_us"] - before[-1])
    if gaps:
        print("The route state written before the switching one came, before it: "
              + "; ".join(f"{k} p50 {ms(pct(v, 50))}, least {ms(min(v))}" for k, v in sorted(gaps.items())) + ".")
    print()
    if write:
        print("Where the time goes, per node: from the commit to the node having applied the revision (the time in "
              "its acknowledgement): " + "; ".join(f"{n} p50 {ms(pct(v, 50))}, p99 {ms(pct(v, 99))}" for n, v in sorted(applied.items()))
              + f". From there to etcd delivering the acknowledgement (its write), all nodes: p50 {ms(pct(write, 50))}, "
              + f"p99 {ms(pct(write, 99))}, max {ms(max(write))}.")
        print()
    print("Per node, from the commit to its first answer from the new version: "
          + "; ".join(f"{n} p50 {ms(pct(v, 50))}, p99 {ms(pct(v, 99))}" for n, v in sorted(per_node_serve.items())) + ".")
    print("Probers: " + "; ".join(f"{n} {v['requests']} requests, {v['errors']} errors" for n, v in sorted(d["probers"].items())) + ".")
    if rows["commit_lag"]:
        xs = rows["commit_lag"]
        print(f"The watcher saw each switching revision {ms(pct(xs, 50))} (p50) after the leader's own acknowledgement time of it "
              "(negative: before).")
    if a.idle:
        c = json.load(open(a.idle))
        names = list(c["rounds"][0])
        print()
        print(f"| idle process ({c['seconds']:.0f} s windows, {len(c['rounds'])} rounds) | ms CPU per minute, median | per round | against the single node |")
        print("|---|---|---|---|")
        med = {n: sorted(r[n] for r in c["rounds"])[len(c["rounds"]) // 2] if len(c["rounds"]) % 2 else
               sum(sorted(r[n] for r in c["rounds"])[len(c["rounds"]) // 2 - 1:len(c["rounds"]) // 2 + 1]) / 2 for n in names}
        base = med.get(a.baseline)
        for n in names:
            ratio = f"{med[n] / base:.2f}x" if base else "n/a"
            print(f"| {n} | {med[n]:.0f} | {', '.join(f'{r[n]:.0f}' for r in c['rounds'])} | {ratio} |")
        print()
        print(f"CPU time is utime + stime from /proc/PID/stat, in ticks of {c['tick_ms']:.0f} ms.")


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("ports"); s.add_argument("n", type=int); s.set_defaults(f=cmd_ports)
    s = sp.add_parser("etcd-ready"); s.add_argument("urls", nargs="+"); s.add_argument("--timeout", type=float, default=30)
    s.set_defaults(f=cmd_etcd_ready)
    s = sp.add_parser("leader"); s.add_argument("--etcd", required=True); s.add_argument("--prefix", required=True)
    s.add_argument("--timeout", type=float, default=20); s.set_defaults(f=cmd_leader)
    s = sp.add_parser("switches")
    s.add_argument("--etcd", required=True); s.add_argument("--prefix", required=True)
    s.add_argument("--service", default="api"); s.add_argument("--front", action="append", required=True)
    s.add_argument("--leader", required=True); s.add_argument("--bin", required=True); s.add_argument("--config", required=True)
    s.add_argument("--v2", required=True); s.add_argument("--body-v1", required=True); s.add_argument("--body-v2", required=True)
    s.add_argument("--count", type=int, default=100); s.add_argument("--switch-timeout", type=float, default=20)
    s.add_argument("--max-seconds", type=float, default=900); s.add_argument("--gap-us", type=int, default=0)
    s.add_argument("--out", required=True); s.set_defaults(f=cmd_switches)
    s = sp.add_parser("idle-cpu"); s.add_argument("--pid", action="append", required=True)
    s.add_argument("--seconds", type=float, default=60); s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--out", required=True); s.set_defaults(f=cmd_idle_cpu)
    s = sp.add_parser("report"); s.add_argument("switches"); s.add_argument("--idle"); s.add_argument("--leader-log")
    s.add_argument("--baseline", default="single"); s.set_defaults(f=cmd_report)
    a = ap.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
