"""The config page under load, beside a sender keeping its pace.

What it does, in a temporary folder that is removed at the end:

1. starts a real SMTP sink (aiosmtpd, in a process of its own) on 127.0.0.1;
2. fills the spool folder with --messages small valid messages (100,000 by
   default) and the patrons table with --patrons patrons;
3. starts `python bibliogate.py run` (sender and config page, one process)
   with a short cadence: --minutes between checks, --per-check messages;
4. quiet phase (--quiet seconds): one probe client asks each page in turn,
   a second apart, to time each page on its own;
5. load phase (--seconds): --clients threads, each with its own session
   cookie and (by default) its own loopback address, as browsers on as many
   computers, ask for Settings, Queue, Patrons and /health back to back over
   http.client, a new connection for each request;
6. reads the sender's checks of each phase from the gateway's event log,
   and prints, per page and for all pages: the answers (200, or /health's
   own 503 that says the gateway is not ok), the page's "busy" answers (503
   with Retry-After) and the failures (any other status, or no answer: a
   connection refused or closed), each counted apart; the answers' p50, p95,
   p99 and max; and the sender's cadence in each phase, with the ratio
   load / quiet.

Run from the repository folder (needs aiosmtpd, from requirements-dev.txt):

    python bench/page_load.py                      # the figures in bench/README.md
    python bench/page_load.py --messages 2000 --seconds 10 --quiet 10   # a quick look
    python bench/page_load.py --program OLD/bibliogate.py              # another version
    python bench/page_load.py --addresses 1        # every client from 127.0.0.1

The page serves at most 32 connections from one address at once (its
connection cap), so with --addresses 1 and more than 32 clients the rest are
closed at once: counted as failures, as they should be.

On Linux it also reports the CPU time the gateway process used in each phase.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import math
import os
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

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
#: The pages asked for, in this order, by every client.
PAGES = (("Settings", "/"), ("Queue", "/queue"), ("Patrons", "/patrons"), ("Health", "/health"))
#: Each wait for a process to come up is bounded by this.
START_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} stopped at start (exit {proc.returncode}).")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {HOST}:{port} within {START_SECONDS:g} s.")


def write_ini(folder: Path, smtp_port: int, web_port: int, minutes: float, per_check: int) -> Path:
    ini = folder / "bibliogate.ini"
    ini.write_text(f"""\
[smtp]
host = {HOST}
port = {smtp_port}
timeout_seconds = 30

[gateway]
spool_folder = spool
from_address = library@school.example
test_to_address = librarian@school.example
minutes_between_checks = {minutes}
messages_per_check = {per_check}

[library]
name = Bench School Library

[web]
address = {HOST}
port = {web_port}
""", encoding="utf-8")
    return ini


def fill_spool(spool: Path, count: int) -> float:
    """count small valid messages, oldest first, settled (two minutes old)."""
    spool.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stamp = time.time() - 120 - count / 1000
    for n in range(count):
        path = spool / f"letter-{n:06d}.TMP"
        path.write_bytes(b"To: Pat Reader %d <patron%d@example.org>\nSubject: Your books, "
                         b"letter %d\n\nPlease bring your books back.\n" % (n, n, n))
        os.utime(path, (stamp + n / 1000, stamp + n / 1000))
    return time.perf_counter() - start


def add_patrons(database: Path, count: int) -> None:
    """Patrons straight into the gateway's own tables (the schema `run` makes)."""
    sys.path.insert(0, str(REPO))
    import bibliogate
    db = bibliogate.open_db(database)
    with db:
        db.executemany("INSERT INTO patrons(patron_id, name, email, guardian_email, grp, "
                       "auto_overdue) VALUES (?,?,?,?,?,?)",
                       [(f"p{n:05d}", f"Reader {n:05d}", f"reader{n}@example.org" if n % 7 else "",
                         "", f"{7 + n % 6}{'ABC'[n % 3]}", n % 2) for n in range(count)])
    db.close()


# -- clients ------------------------------------------------------------------------------

#: What became of a request: an answer (200, or /health's own 503 saying the gateway is not
#: ok), the page's overload answer (503 with Retry-After), or a failure (anything else).
ANSWERED, BUSY = "answered", "busy"


def outcome(path: str, status: int, retry_after: str | None) -> str:
    if status == 200 or (status == 503 and path == "/health" and retry_after is None):
        return ANSWERED
    if status == 503 and retry_after is not None:
        return BUSY
    return f"status {status}"


class Client:
    """One browser: its own session cookie, its own client address (source),
    requests back to back, a new connection for each."""

    def __init__(self, port: int, login: list[str] | None = None, source: str = HOST):
        self.port, self.cookie, self.source = port, "", source
        if login:
            self.log_in(login)

    def log_in(self, command: list[str]) -> None:
        """Log in as the librarian does: `bibliogate.py page --print` gives a
        one-time link. (An older bibliogate.py without `page` needs no login.)"""
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        link = done.stdout.strip()
        if done.returncode == 0 and "/login?once=" in link:
            self.get(link.split(f":{self.port}", 1)[1])

    def get(self, path: str) -> tuple[int, float, str]:
        """(status, seconds, outcome); status 0 when no answer came (outcome:
        the exception's name)."""
        start = time.perf_counter()
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60,
                                          source_address=(self.source, 0))
        try:
            conn.request("GET", path, headers={"Host": f"{HOST}:{self.port}",
                                               **({"Cookie": self.cookie} if self.cookie else {})})
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as exc:     # refused, closed, timed out
            return 0, time.perf_counter() - start, f"no answer ({type(exc).__name__})"
        finally:
            conn.close()
        took = time.perf_counter() - start
        cookie = resp.getheader("Set-Cookie")
        if cookie:
            self.cookie = cookie.split(";")[0]
        return resp.status, took, outcome(path, resp.status, resp.getheader("Retry-After"))


def client_addresses(count: int) -> list[str]:
    """`count` loopback addresses to send from (127.0.0.1, .2, ...), as that
    many computers; 127.0.0.1 alone where the others cannot be used."""
    found = []
    for n in range(1, count + 1):
        address = f"127.0.0.{n}" if n < 255 else f"127.0.{n // 254}.{n % 254 + 1}"
        try:
            with socket.socket() as s:
                s.bind((address, 0))
        except OSError:
            print(f"{address} cannot be used here: every client sends from 127.0.0.1")
            return [HOST]
        found.append(address)
    return found


def run_clients(logged_in: list[Client], seconds: float) -> list[tuple]:
    """(page, seconds, status, started, outcome) of every request made by
    the clients, a thread each, within `seconds`."""
    results: list[tuple] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def work(n: int) -> None:
        client, mine = logged_in[n], []
        for i in range(1_000_000):                   # bounded; the clock ends it first
            if time.monotonic() >= stop_at:
                break
            name, path = PAGES[(n + i) % len(PAGES)]
            started = time.time()
            status, took, what = client.get(path)
            mine.append((name, took, status, started, what))
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(logged_in))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return results


def probe(client: Client, seconds: float) -> list[tuple]:
    """One client, one page a second: each page timed on its own."""
    results = []
    stop_at = time.monotonic() + seconds
    for i in range(100_000):                          # bounded; the clock ends it first
        if time.monotonic() >= stop_at:
            break
        name, path = PAGES[i % len(PAGES)]
        started = time.time()
        status, took, what = client.get(path)
        results.append((name, took, status, started, what))
        time.sleep(max(0.0, 1.0 - took))
    return results


# -- figures ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q of
    them at or below it (p99 of 100 values is the 99th)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def latency_table(quiet: list[tuple], load: list[tuple]) -> list[str]:
    """Per page and for all pages: the quiet phase's answers, and under load
    the answers, busy answers and failures counted apart, with the answers'
    percentiles. A busy answer or a failure is never in the percentiles."""
    lines = ["| page | quiet p50 | quiet max | answered | busy (503) | failed | p50 | p95 | p99 "
             "| max |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in [n for n, _ in PAGES] + ["All pages"]:
        mine = (lambda rows: rows) if name == "All pages" else \
            (lambda rows, name=name: [r for r in rows if r[0] == name])
        q = [r[1] for r in mine(quiet) if r[4] == ANSWERED]
        got = mine(load)
        ok = [r[1] for r in got if r[4] == ANSWERED]
        busy = sum(1 for r in got if r[4] == BUSY)
        failed = len(got) - len(ok) - busy
        cells = [ms(statistics.median(q)), ms(max(q))] if q else ["-", "-"]
        cells += [str(len(ok)), str(busy), str(failed)]
        cells += [ms(percentile(ok, x)) for x in (0.5, 0.95, 0.99)] + [ms(max(ok))] if ok \
            else ["-"] * 4
        label = f"**{name}**" if name == "All pages" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def outcome_lines(load: list[tuple]) -> list[str]:
    """What the busy answers took, what failed and how, and /health's own 503s."""
    lines = []
    busy = [r[1] for r in load if r[4] == BUSY]
    if busy:
        lines.append(f"busy answers (503, Retry-After): {len(busy)}, p50 {ms(percentile(busy, 0.5))}, "
                     f"max {ms(max(busy))}")
    failures = collections.Counter(r[4] for r in load if r[4] not in (ANSWERED, BUSY))
    if failures:
        lines.append("failed: " + ", ".join(f"{n} x {what}" for what, n in failures.most_common()))
    not_ok = sum(1 for r in load if r[0] == "Health" and r[2] == 503 and r[4] == ANSWERED)
    if not_ok:
        lines.append(f"/health answered 503 (the gateway not ok) {not_ok} times: counted as answers")
    return lines


def checks(database: Path, start: float, end: float) -> list[tuple[float, int]]:
    """(time, messages sent) of each check the gateway logged in [start, end)."""
    db = sqlite3.connect(str(database), timeout=60)
    try:
        rows = db.execute("SELECT at, detail FROM events WHERE kind = 'check' AND at >= ? "
                          "AND at < ? ORDER BY at", (start, end)).fetchall()
        sent = db.execute("SELECT at FROM events WHERE kind = 'sent' AND at >= ? AND at < ? "
                          "ORDER BY at", (start, end)).fetchall()
    finally:
        db.close()
    found, times = [], [at for (at,) in sent]
    previous = start
    for at, detail in rows:
        mine = [t for t in times if previous <= t <= at]
        found.append((at, int(detail.split("check: ", 1)[1].split(" ", 1)[0]),
                      at - mine[0] if mine else 0.0))
        previous = at
    return found


def cadence_table(quiet: list, load: list, interval: float) -> list[str]:
    def figures(rows):
        gaps = [b[0] - a[0] for a, b in zip(rows, rows[1:])]
        return {"checks": len(rows),
                "gap": statistics.mean(gaps) if gaps else float("nan"),
                "gap_max": max(gaps) if gaps else float("nan"),
                "sent": statistics.mean(r[1] for r in rows) if rows else float("nan"),
                "sending": statistics.mean(r[2] for r in rows) if rows else float("nan")}
    q, l_ = figures(quiet), figures(load)
    return ["| sender | quiet | under load | ratio |", "|---|---:|---:|---:|",
            f"| checks seen | {q['checks']} | {l_['checks']} | |",
            f"| time between checks, mean (set: {interval:g} s) | {q['gap']:.2f} s | "
            f"{l_['gap']:.2f} s | {l_['gap'] / q['gap']:.2f} |",
            f"| time between checks, max | {q['gap_max']:.2f} s | {l_['gap_max']:.2f} s | "
            f"{l_['gap_max'] / q['gap_max']:.2f} |",
            f"| messages per check, mean | {q['sent']:.1f} | {l_['sent']:.1f} | "
            f"{l_['sent'] / q['sent']:.2f} |",
            f"| first to last message of a check, mean | {q['sending']:.2f} s | "
            f"{l_['sending']:.2f} s | {l_['sending'] / max(q['sending'], 1e-9):.2f} |"]


# -- the run ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux only; else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_lines(cpu: list, t: list, load: list) -> list[str]:
    """cpu, t: at the start and end of the quiet phase, then of the load phase."""
    if None in cpu:
        return []
    q, l_ = cpu[1] - cpu[0], cpu[3] - cpu[2]
    return [f"gateway CPU: quiet {q / (t[1] - t[0]) * 100:.0f}% of a core, under load "
            f"{l_ / (t[3] - t[2]) * 100:.0f}% of a core, {l_ / max(len(load), 1) * 1000:.1f} ms "
            "per request (its checks included)"]


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000, help="files waiting in the spool")
    p.add_argument("--patrons", type=int, default=2_000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--addresses", type=int, default=0,
                   help="client addresses the clients send from (default: one each, as many "
                        "computers; 1: all from 127.0.0.1)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the load phase")
    p.add_argument("--quiet", type=float, default=30.0, help="length of the quiet phase")
    p.add_argument("--minutes", type=float, default=0.1, help="minutes_between_checks")
    p.add_argument("--per-check", type=int, default=10, help="messages_per_check")
    p.add_argument("--program", type=Path, default=REPO / "bibliogate.py",
                   help="the bibliogate.py to run (default: this repository's)")
    args = p.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="bibliogate-bench-"))
    sink = gateway = log = None
    try:
        smtp_port, web_port = free_port(), free_port()
        sink = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"{HOST}:{smtp_port}",
                                 "-c", "aiosmtpd.handlers.Sink"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(smtp_port, sink, "The aiosmtpd sink")
        ini = write_ini(folder, smtp_port, web_port, args.minutes, args.per_check)
        took = fill_spool(folder / "spool", args.messages)
        print(f"{args.messages} messages written to the spool in {took:.1f} s")
        add_patrons(folder / "bibliogate.db", args.patrons)
        log = open(folder / "run-output.txt", "w", encoding="utf-8")
        gateway = subprocess.Popen([sys.executable, str(args.program.resolve()), "--config",
                                    str(ini), "run"], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(web_port, gateway, "bibliogate.py run")
        time.sleep(args.minutes * 60 + 1)      # past the first check, made at start

        login = [sys.executable, str(args.program.resolve()), "--config", str(ini), "page",
                 "--print"]
        prober = Client(web_port, login)
        t0, cpu = time.time(), [cpu_seconds(gateway.pid)]
        print(f"quiet phase: {args.quiet:g} s, one probe request a second")
        quiet = probe(prober, args.quiet)
        t_quiet, cpu_quiet = time.time(), cpu_seconds(gateway.pid)
        addresses = client_addresses(args.addresses or args.clients)
        clients = [Client(web_port, login, addresses[n % len(addresses)])   # logged in, untimed
                   for n in range(args.clients)]
        t1 = time.time()
        cpu += [cpu_quiet, cpu_seconds(gateway.pid)]
        print(f"load phase: {args.seconds:g} s, {args.clients} clients back to back")
        load = run_clients(clients, args.seconds)
        t2 = time.time()
        cpu.append(cpu_seconds(gateway.pid))
        quiet_checks = checks(folder / "bibliogate.db", t0, t_quiet)
        load_checks = checks(folder / "bibliogate.db", t1, t2)
        waiting = sum(1 for _ in (folder / "spool").glob("*.TMP"))
        print()
        print(f"{len(load)} requests under load ({len(load) / (t2 - t1):.0f} a second); "
              f"{waiting} messages still waiting at the end")
        print("\n".join(cpu_lines(cpu, [t0, t_quiet, t1, t2], load)))
        print(f"clients sent from {len(addresses)} address(es); load average at the end: "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "")
        print()
        print("\n".join(latency_table(quiet, load)))
        print("\n".join(outcome_lines(load)))
        print()
        print("\n".join(cadence_table(quiet_checks, load_checks, args.minutes * 60)))
        return 0
    finally:
        stop(gateway)
        stop(sink)
        if log is not None:
            log.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
