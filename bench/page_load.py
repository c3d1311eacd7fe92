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
   cookie, ask for Settings, Queue, Patrons and /health back to back over
   http.client;
6. reads the sender's checks of each phase from the gateway's event log,
   and prints latency percentiles per page and the cadence, side by side,
   with the ratio load / quiet.

Run from the repository folder (needs aiosmtpd, from requirements-dev.txt):

    python bench/page_load.py                      # the figures in bench/README.md
    python bench/page_load.py --messages 2000 --seconds 10 --quiet 10   # a quick look
    python bench/page_load.py --program OLD/bibliogate.py              # another version

On Linux it also reports the CPU time the gateway process used in each phase.
"""

from __future__ import annotations

import argparse
import http.client
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

class Client:
    """One browser: its own session cookie, requests back to back."""

    def __init__(self, port: int, login: list[str] | None = None):
        self.port, self.cookie = port, ""
        if login:
            self.log_in(login)

    def log_in(self, command: list[str]) -> None:
        """Log in as the librarian does: `bibliogate.py page --print` gives a
        one-time link. (An older bibliogate.py without `page` needs no login.)"""
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        link = done.stdout.strip()
        if done.returncode == 0 and "/login?once=" in link:
            self.get(link.split(f":{self.port}", 1)[1])

    def get(self, path: str) -> tuple[int, float]:
        start = time.perf_counter()
        conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
        try:
            conn.request("GET", path, headers={"Host": f"{HOST}:{self.port}",
                                               **({"Cookie": self.cookie} if self.cookie else {})})
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        cookie = resp.getheader("Set-Cookie")
        if cookie:
            self.cookie = cookie.split(";")[0]
        return resp.status, time.perf_counter() - start


def run_clients(port: int, clients: int, seconds: float, offset: int = 0,
                login: list[str] | None = None) -> list[tuple]:
    """(page, seconds, status, started) of every request made by `clients`
    threads within `seconds`, each logged in first with `login`."""
    results: list[tuple] = []
    lock = threading.Lock()
    logged_in = [Client(port, login) for _ in range(clients)]
    stop_at = time.monotonic() + seconds

    def work(n: int) -> None:
        client, mine = logged_in[n - offset], []
        for i in range(1_000_000):                   # bounded; the clock ends it first
            if time.monotonic() >= stop_at:
                break
            name, path = PAGES[(n + i) % len(PAGES)]
            started, clock = time.time(), time.perf_counter()
            try:
                status, took = client.get(path)
            except OSError:                         # refused or timed out: counted, not fatal
                status, took = 0, time.perf_counter() - clock
            mine.append((name, took, status, started))
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=work, args=(n + offset,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return results


def probe(port: int, seconds: float, login: list[str] | None = None) -> list[tuple]:
    """One client, one page a second: each page timed on its own."""
    client, results = Client(port, login), []
    stop_at = time.monotonic() + seconds
    for i in range(100_000):                          # bounded; the clock ends it first
        if time.monotonic() >= stop_at:
            break
        name, path = PAGES[i % len(PAGES)]
        started = time.time()
        status, took = client.get(path)
        results.append((name, took, status, started))
        time.sleep(max(0.0, 1.0 - took))
    return results


# -- figures ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_table(quiet: list[tuple], load: list[tuple]) -> list[str]:
    lines = ["| page | quiet p50 | quiet max | load p50 | load p95 | load max | requests | "
             "not 200 | p50 ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _ in PAGES:
        q = [t for n, t, s, _ in quiet if n == name]
        got = [(t, s) for n, t, s, _ in load if n == name]
        times = [t for t, _ in got]
        if not q or not times:
            continue
        bad = sum(1 for _, s in got if s not in (200, 503))
        q50, l50 = statistics.median(q), percentile(times, 0.5)
        lines.append(f"| {name} | {q50 * 1000:.0f} ms | {max(q) * 1000:.0f} ms | "
                     f"{l50 * 1000:.0f} ms | "
                     f"{percentile(times, 0.95) * 1000:.0f} ms | {max(times) * 1000:.0f} ms | "
                     f"{len(times)} | {bad} | {l50 / q50:.1f} |")
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


def cpu_lines(cpu: list, t: list, quiet: list, load: list) -> list[str]:
    if None in cpu:
        return []
    q, l_ = cpu[1] - cpu[0], cpu[2] - cpu[1]
    return [f"gateway CPU: quiet {q / (t[1] - t[0]) * 100:.0f}% of a core, under load "
            f"{l_ / (t[2] - t[1]) * 100:.0f}% of a core, {l_ / max(len(load), 1) * 1000:.0f} ms "
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

        t0, cpu = time.time(), [cpu_seconds(gateway.pid)]
        print(f"quiet phase: {args.quiet:g} s, one probe request a second")
        login = [sys.executable, str(args.program.resolve()), "--config", str(ini), "page",
                 "--print"]
        quiet = probe(web_port, args.quiet, login)
        t1 = time.time()
        cpu.append(cpu_seconds(gateway.pid))
        print(f"load phase: {args.seconds:g} s, {args.clients} clients back to back")
        load = run_clients(web_port, args.clients, args.seconds, login=login)
        t2 = time.time()
        cpu.append(cpu_seconds(gateway.pid))
        quiet_checks = checks(folder / "bibliogate.db", t0, t1)
        load_checks = checks(folder / "bibliogate.db", t1, t2)
        waiting = sum(1 for _ in (folder / "spool").glob("*.TMP"))
        print()
        print(f"{len(load)} requests under load ({len(load) / (t2 - t1):.0f} a second); "
              f"{waiting} messages still waiting at the end")
        print("\n".join(cpu_lines(cpu, [t0, t1, t2], quiet, load)))
        print()
        print("\n".join(latency_table(quiet, load)))
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
