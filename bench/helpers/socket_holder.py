#!/usr/bin/env python3
"""Socket activation as systemd does it, for bench/restarts.sh: this process creates the
listening socket(s) and keeps them open; it runs a command (`cutover serve ...`) with them as
fds 3, 4, ... and LISTEN_FDS=N, LISTEN_FDNAMES=name:name..., LISTEN_PID=the command's own pid
(set through `sh -c 'LISTEN_PID=$$ exec "$@"'`, as the child's pid is not known before it runs).

  SIGHUP           stop the command with SIGTERM, wait for it to exit (SIGKILL after
                   --stop-timeout), and start it again. The sockets stay open throughout, so
                   clients that connect meanwhile wait in the listen backlog.
  SIGTERM, SIGINT  stop the command the same way and exit.

The command's pid is written to --pid-file (rewritten at each start); every start and exit is
logged on stderr with its time. A command that exits by itself is not restarted: the holder
says so and waits (bounded by --max-seconds) for SIGHUP or SIGTERM.

Usage: socket_holder.py --listen 127.0.0.1:8080 [--name proxy] --pid-file F -- CMD ARGS...
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

FIRST_FD = 3  # SD_LISTEN_FDS_START


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] holder: {msg}", file=sys.stderr, flush=True)


def listener(addr):
    host, _, port = addr.rpartition(":")
    fam = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host.strip("[]"), int(port)))
    s.listen(4096)
    return s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", action="append", required=True, help="IP:PORT; repeat for more sockets")
    p.add_argument("--name", action="append", default=[], help="LISTEN_FDNAMES entry per --listen")
    p.add_argument("--pid-file", required=True)
    p.add_argument("--stop-timeout", type=float, default=30)
    p.add_argument("--max-seconds", type=float, default=3600, help="exit (stopping the command) after this")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command given")
    names = a.name + ["proxy"] * (len(a.listen) - len(a.name))

    socks = [listener(x) for x in a.listen]
    log(f"listening on {', '.join(a.listen)} (fds {FIRST_FD}..{FIRST_FD + len(socks) - 1} in the command)")
    fds = [s.fileno() for s in socks]

    def place_fds():
        # In the child, before exec: the sockets at 3, 4, ...; dup2 clears close-on-exec.
        # Copies first, so that moving one cannot overwrite another still to be moved.
        tmp = [os.dup(fd) for fd in fds]
        for i, fd in enumerate(tmp):
            os.dup2(fd, FIRST_FD + i)
        for fd in tmp:
            if fd >= FIRST_FD + len(tmp):
                os.close(fd)

    env = dict(os.environ)
    env.pop("LISTEN_PID", None)
    env.update(LISTEN_FDS=str(len(socks)), LISTEN_FDNAMES=":".join(names[: len(socks)]))

    events = []
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: events.append(s))

    def start():
        child = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *cmd],
            env=env,
            preexec_fn=place_fds,
            pass_fds=tuple(range(FIRST_FD, FIRST_FD + len(socks))),
        )
        with open(a.pid_file + ".tmp", "w") as f:
            f.write(f"{child.pid}\n")
        os.replace(a.pid_file + ".tmp", a.pid_file)
        log(f"started pid {child.pid}: {' '.join(cmd)}")
        return child

    def stop(child):
        if child is None or child.poll() is not None:
            return
        t0 = time.monotonic()
        child.send_signal(signal.SIGTERM)
        try:
            rc = child.wait(timeout=a.stop_timeout)
            log(f"pid {child.pid} exited {rc} {1000 * (time.monotonic() - t0):.0f} ms after SIGTERM")
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            log(f"pid {child.pid} still running {a.stop_timeout:.0f} s after SIGTERM; killed")

    child = start()
    deadline = time.monotonic() + a.max_seconds
    while time.monotonic() < deadline:
        while events:
            sig = events.pop(0)
            if sig == signal.SIGHUP:
                stop(child)
                child = start()
            else:
                stop(child)
                log("stopped; exiting")
                return 0
        if child is not None and child.poll() is not None:
            log(f"pid {child.pid} exited by itself with {child.returncode}; not restarted")
            child = None
        time.sleep(0.01)
    stop(child)
    log(f"--max-seconds {a.max_seconds:.0f} reached; exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
