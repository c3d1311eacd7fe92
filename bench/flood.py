"""A connection flood against the config page, beside the sender.

What it does, in a temporary folder that is removed at the end:

1. starts a real SMTP sink (aiosmtpd, a process of its own) on 127.0.0.1 and
   fills the spool with --messages small messages;
2. starts `python bibliogate.py run` with a service's usual limit of open
   files (--nofile, 1,024 as systemd and most Linux logins give), sending
   --per-check messages every --minutes;
3. quiet phase (--seconds): counts the messages sent and times /health,
   asked every two seconds;
4. flood phase (--seconds): --connections sockets opened to the page and
   held open (reopened as soon as the page closes one), and the same counts.

Run from the repository folder, on Linux (needs aiosmtpd):

    python bench/flood.py                              # the figures in bench/README.md
    python bench/flood.py --program OLD/bibliogate.py  # another version
"""

from __future__ import annotations

import argparse
import http.client
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from page_load import HOST, REPO, fill_spool, free_port, stop, wait_for_port, write_ini


def sent_between(database: Path, start: float, end: float) -> int:
    db = sqlite3.connect(str(database), timeout=60)
    try:
        return db.execute("SELECT COUNT(*) FROM events WHERE kind = 'sent' AND at >= ? AND at < ?",
                          (start, end)).fetchone()[0]
    finally:
        db.close()


def open_files(pid: int, seconds: float) -> list[int]:
    """The process's open files, counted every half second (Linux: /proc)."""
    counts, stop_at = [], time.monotonic() + seconds
    for _ in range(100_000):                         # bounded; the clock ends it first
        if time.monotonic() >= stop_at:
            break
        try:
            counts.append(len(list(Path(f"/proc/{pid}/fd").iterdir())))
        except OSError:
            break
        time.sleep(0.5)
    return counts


def health_probe(port: int, seconds: float) -> list[float]:
    """The time /health took, asked every two seconds (30 s if it never answers)."""
    took, stop_at = [], time.monotonic() + seconds
    for _ in range(10_000):                          # bounded; the clock ends it first
        if time.monotonic() >= stop_at:
            break
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=30)
            conn.request("GET", "/health", headers={"Host": f"{HOST}:{port}"})
            conn.getresponse().read()
            conn.close()
            took.append(time.perf_counter() - start)
        except OSError:                              # refused or cut off: counted as 30 s
            took.append(30.0)
        time.sleep(max(0.0, 2.0 - (time.perf_counter() - start)))
    return took


def flood(port: int, connections: int, seconds: float, peak: list, threads: int = 8) -> int:
    """Hold `connections` sockets open to the page for `seconds`, from
    `threads` threads; returns how many were opened in all (`peak` gets the
    most held at once)."""
    opened, held_now = [0] * threads, [0] * threads
    stop_at = time.monotonic() + seconds

    def hold(n: int) -> None:
        held: list[socket.socket] = []
        for _ in range(10_000_000):                  # bounded; the clock ends it first
            if time.monotonic() >= stop_at:
                break
            alive = []
            for sock in held:                        # drop the ones the page closed
                try:
                    if sock.recv(1) == b"":
                        sock.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    continue
                alive.append(sock)
            held = alive
            while len(held) < connections // threads and time.monotonic() < stop_at:
                try:
                    sock = socket.create_connection((HOST, port), timeout=2)
                except OSError:
                    break
                sock.setblocking(False)
                held.append(sock)
                opened[n] += 1
            held_now[n] = len(held)
            peak[0] = max(peak[0], sum(held_now))
            time.sleep(0.05)
        for sock in held:
            sock.close()

    peak.append(0)
    workers = [threading.Thread(target=hold, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60)
    return sum(opened)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=0.05, help="minutes_between_checks")
    p.add_argument("--per-check", type=int, default=5)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--nofile", type=int, default=1024, help="the gateway's limit of open files")
    p.add_argument("--program", type=Path, default=REPO / "bibliogate.py")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 256), hard))

    folder = Path(tempfile.mkdtemp(prefix="bibliogate-flood-"))
    sink = gateway = log = None
    try:
        smtp_port, web_port = free_port(), free_port()
        sink = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"{HOST}:{smtp_port}",
                                 "-c", "aiosmtpd.handlers.Sink"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(smtp_port, sink, "The aiosmtpd sink")
        ini = write_ini(folder, smtp_port, web_port, args.minutes, args.per_check)
        fill_spool(folder / "spool", args.messages)
        log = open(folder / "run-output.txt", "w", encoding="utf-8")
        limit = (args.nofile, args.nofile)
        gateway = subprocess.Popen(
            [sys.executable, str(args.program.resolve()), "--config", str(ini), "run"],
            stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit))
        wait_for_port(web_port, gateway, "bibliogate.py run")
        time.sleep(args.minutes * 60 + 1)
        rows = []
        for phase in ("quiet", "flood"):
            t0 = time.time()
            probe: list[float] = []
            prober = threading.Thread(target=lambda out=probe: out.extend(
                health_probe(web_port, args.seconds)))
            prober.start()
            peak: list[int] = []
            fds: list[int] = []
            watch = threading.Thread(target=lambda out=fds: out.extend(
                open_files(gateway.pid, args.seconds)))
            watch.start()
            opened = flood(web_port, args.connections, args.seconds, peak) if phase == "flood" else 0
            watch.join(args.seconds + 60)
            prober.join(args.seconds + 60)
            t1 = time.time()
            sent = sent_between(folder / "bibliogate.db", t0, t1)
            rows.append((phase, sent * 60 / (t1 - t0), statistics.median(probe or [0]),
                         max(probe or [0]), sum(1 for t in probe if t >= 30.0), opened,
                         max(peak or [0]), max(fds or [0]), gateway.poll()))
        print(f"gateway limited to {args.nofile} open files; {args.per_check} messages every "
              f"{args.minutes * 60:g} s ({args.per_check * 60 / (args.minutes * 60):.0f} a minute "
              "at most)")
        print("| phase | sent a minute | /health p50 | /health max | /health refused | "
              "connections opened | held at once | gateway's open files, max | gateway alive |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for phase, rate, p50, worst, refused, opened, held, files, code in rows:
            print(f"| {phase} | {rate:.0f} | {p50 * 1000:.0f} ms | {worst * 1000:.0f} ms | {refused} | "
                  f"{opened} | {held} | {files} | {'yes' if code is None else f'no (exit {code})'} |")
        return 0
    finally:
        stop(gateway)
        stop(sink)
        if log is not None:
            log.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
