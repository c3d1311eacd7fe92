"""How fast BiblioGate drains its spool, and what a long queue costs.

drain   2,000 queued ~2 KB messages sent unthrottled, four ways, alternating
        within each round, to two servers in turn: Postfix's `smtp-sink` (as
        fast as a server gets) and aiosmtpd (in its own process; at these rates
        it is the bottleneck). The ways: `bibliogate.py send --all` as a
        subprocess, the same check in this process (Sender.check(limit=0)), a
        bare smtplib loop that reads each file and sends it over one
        connection, and that loop making one fsync'd sqlite commit per message
        (WAL, synchronous = FULL: the price of recording each delivery on disk
        at once). Reported: the median over the rounds of reference_time /
        gateway_time, each ratio taken within one round (goals: >= 0.5 x the
        bare loop and >= 1.0 x the fsync loop to smtp-sink), and every count
        checked at the server.

backlog one ordinary check (messages_per_check = 10) with 1,000 / 10,000 /
        100,000 files waiting against the same check with 10 waiting: the time
        beyond the sending, in process as `run` does it (the spool index kept
        from check to check) and as `send` (a fresh process, a fresh reading),
        and the peak memory (tracemalloc in process; VmHWM of `send`). Also
        `status` and `queue` (its first page) as commands, wall time and output.

Usage (Linux, from the repository folder; needs aiosmtpd, and Postfix's
smtp-sink for that server):

    python bench/drain.py                 # both, default sizes (a few minutes)
    python bench/drain.py drain --rounds 3 --messages 2000 --sink smtp-sink
    python bench/drain.py backlog --waiting 1000,10000,100000

BIBLIOGATE_REPO=/path/to/other/checkout measures that checkout's bibliogate.py
with this script; `drain --before /path/to/other/checkout` measures both in
the same rounds (the other checkout's two ways join the four, in turn), so
before and after are side by side under the same load. Only 127.0.0.1 is
used; every temporary folder is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import re
import resource
import shutil
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(os.environ.get("BIBLIOGATE_REPO") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(REPO))

import bibliogate as bg  # noqa: E402

HOST = "127.0.0.1"
FROM = "library@school.example"


# The sink: aiosmtpd in a process of its own ##################################

def _serve(port: int, ready, count) -> None:
    """Run an SMTP server that counts what it accepts; never stores it."""
    from aiosmtpd.smtp import SMTP

    class Counter:
        async def handle_DATA(self, server, session, envelope):
            with count.get_lock():
                count.value += 1
            return "250 OK"

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(Counter(), hostname="sink.bench", data_size_limit=None, loop=loop),
        HOST, port))
    ready.set()
    try:
        loop.run_forever()
    finally:
        server.close()


class SinkProcess:
    """The server process; ``count`` is the number of messages it accepted."""

    def __init__(self):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        self._count = ctx.Value("l", 0)
        ready = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(self.port, ready, self._count), daemon=True)
        self._proc.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError("the aiosmtpd sink did not start within 30 s")

    @property
    def count(self) -> int:
        return self._count.value

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink got {self.count} of {n} messages")
            time.sleep(0.005)

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.join(10)


SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


class PostfixSink:
    """Postfix's smtp-sink on 127.0.0.1. With `-c` it prints how many messages
    it accepted; on a terminal it prints at once, so it gets a pty."""

    def __init__(self):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        cmd = [SMTP_SINK, "-c", "-4", "-h", "sink.bench"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]             # smtp-sink refuses to run as root
        self._pty, child_end = os.openpty()
        self._proc = subprocess.Popen(cmd + [f"{HOST}:{self.port}", "64"], stdout=child_end,
                                      stderr=child_end)
        os.close(child_end)
        self._count, self._tail = 0, b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as c:
                    if c.recv(100).startswith(b"220"):
                        c.sendall(b"QUIT\r\n")
                        break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("smtp-sink did not start within 20 s") from None
                time.sleep(0.05)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._pty, 65536)
            except OSError:
                return
            if not data:
                return
            self._tail = (self._tail + data)[-200:]
            found = re.findall(rb"mesg=(\d+)", self._tail)
            if found:
                self._count = int(found[-1])

    @property
    def count(self) -> int:
        return self._count

    wait_for = SinkProcess.wait_for

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)
        os.close(self._pty)


# Messages and folders ########################################################

def message(n: int) -> bytes:
    """A ~2 KB letter, as a program would drop it in the spool."""
    lines = [f"  {n:05d}-{i:02d}  The Hobbit (barcode {n:05d}{i:02d}), due 2026-03-{1 + i % 28:02d}"
             for i in range(24)]
    body = "Dear reader,\n\nThese books are overdue:\n\n" + "\n".join(lines) + "\n\nThe library\n"
    head = (f"From: circulation@school.example\nTo: patron{n}@example.org\n"
            f"Subject: Overdue notice {n}\nMessage-ID: <bench-{n}@school.example>\n"
            "Date: Mon, 02 Mar 2026 06:30:00 +0000\n\n")
    return (head + body).encode("ascii")


def fill(spool: Path, count: int, base: float | None = None) -> None:
    """count message files, oldest first, dated in the past so they are stable."""
    base = time.time() - 3600 if base is None else base
    for n in range(count):
        path = spool / f"m{n:06d}.TMP"
        path.write_bytes(message(n))
        os.utime(path, (base + n * 1e-3, base + n * 1e-3))


def make_gateway(folder: Path, port: int, per_check: int = 10) -> bg.Settings:
    folder.mkdir(parents=True, exist_ok=True)
    ini = folder / "bibliogate.ini"
    ini.write_text(
        f"[smtp]\nhost = {HOST}\nport = {port}\ntimeout_seconds = 30\n"
        f"[gateway]\nfrom_address = {FROM}\nmessages_per_check = {per_check}\n"
        "test_to_address = librarian@school.example\n"
        "[library]\nname = Bench School Library\n", encoding="utf-8")
    settings, _ = bg.ensure_layout(ini)
    assert not settings.problems, settings.problems
    return settings


def fresh_database(settings: bg.Settings) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        with_suffix = Path(str(settings.database) + suffix)
        if with_suffix.exists():
            with_suffix.unlink()


def waiting(spool: Path) -> int:
    return sum(1 for name in os.listdir(spool) if name.endswith(".TMP"))


# Drain #######################################################################

def cpu_seconds() -> float:
    """CPU time of this process and of its finished subprocesses."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def load_other(checkout: Path):
    """The bibliogate.py of another checkout, as a module of its own name."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bibliogate_before", checkout / "bibliogate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bibliogate_before"] = module
    spec.loader.exec_module(module)
    return module


def drain_subprocess(settings: bg.Settings, repo: Path = REPO) -> None:
    cmd = [sys.executable, str(repo / "bibliogate.py"), "--config", str(settings.ini_path),
           "send", "--all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"send --all failed: {proc.stdout} {proc.stderr}")


def drain_in_process(settings: bg.Settings, module=bg) -> None:
    module.setup_logging(settings, console=False)       # as the command line does
    journal = module.Journal(settings.database)
    result = module.Sender(settings, journal).check(limit=0, ignore_waits=True)
    journal.close()
    if result.problem or result.bad or result.deferred:
        raise RuntimeError(f"in-process check: {result.summary()}")


def drain_bare(spool: Path, port: int, db_path: Path | None = None) -> None:
    """The floor: read each file and hand it to smtplib over one connection;
    with db_path, also one fsync'd sqlite commit per message."""
    files = sorted(spool.glob("*.TMP"))
    db = None
    if db_path is not None:
        db = sqlite3.connect(str(db_path))
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE IF NOT EXISTS sent (file TEXT PRIMARY KEY, at REAL)")
    with smtplib.SMTP(HOST, port, timeout=30) as smtp:
        for path in files:
            data = path.read_bytes().replace(b"\n", b"\r\n")
            n = int(path.stem[1:])
            smtp.sendmail(FROM, [f"patron{n}@example.org"], data)
            if db is not None:
                with db:
                    db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?)", (path.name, time.time()))
            path.unlink()
    if db is not None:
        db.close()


SUBPROCESS, IN_PROCESS = "send --all (subprocess)", "Sender.check (in process)"
BEFORE = "before: "
BARE, BARE_FSYNC = "bare smtplib", "bare + fsync'd commit"


def run_drain(rounds: int, count: int, sink_kind: str, checkout: Path | None = None) -> dict:
    """{way: [(seconds, CPU seconds), ...]}, one pair per round."""
    sink = PostfixSink() if sink_kind == "smtp-sink" else SinkProcess()
    tmp = Path(tempfile.mkdtemp(prefix="bibliogate-bench-"))
    try:
        settings = make_gateway(tmp / "gw", sink.port)
        ways = {SUBPROCESS: lambda: drain_subprocess(settings),
                IN_PROCESS: lambda: drain_in_process(settings),
                BARE: lambda: drain_bare(settings.spool, sink.port),
                BARE_FSYNC: lambda: drain_bare(settings.spool, sink.port, tmp / "bare.db")}
        if checkout is not None:
            other = load_other(checkout)
            old_settings, _ = other.ensure_layout(settings.ini_path)
            ways[BEFORE + SUBPROCESS] = lambda: drain_subprocess(settings, checkout)
            ways[BEFORE + IN_PROCESS] = lambda: drain_in_process(old_settings, other)
        got = {name: [] for name in ways}
        order = list(ways)
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:   # who goes first
                fresh_database(settings)
                fill(settings.spool, count)
                before = sink.count
                started, cpu = time.perf_counter(), cpu_seconds()
                ways[name]()
                got[name].append((time.perf_counter() - started, cpu_seconds() - cpu))
                sink.wait_for(before + count)
                if sink.count != before + count:
                    raise RuntimeError(f"{name}: the server got {sink.count - before} of {count}")
                if waiting(settings.spool):
                    raise RuntimeError(f"{name} left files behind")
            print(f"  round {r + 1}: " + ", ".join(f"{n} {t[-1][0]:.2f} s ({t[-1][1]:.2f} CPU)"
                                                   for n, t in got.items()), flush=True)
        return got
    finally:
        stop_logging()
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def stop_logging() -> None:
    """Close the log file handlers of a folder that is about to be removed."""
    for handler in list(bg.log.handlers):
        bg.log.removeHandler(handler)
        handler.close()


# Backlog #####################################################################

#: Runs `bibliogate.py ARGS...`, then prints the process's CPU time and its peak
#: resident memory: VmHWM, and ru_maxrss for comparison (on Linux ru_maxrss
#: keeps the parent's peak from before exec, so it can read too high).
CHILD = """
import contextlib, io, resource, sys
sys.path.insert(0, sys.argv[1])
import bibliogate
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = bibliogate.main(["--config", *sys.argv[2:]])
with open("/proc/self/status", encoding="ascii") as fh:
    hwm = [line.split()[1] for line in fh if line.startswith("VmHWM:")][0]
use = resource.getrusage(resource.RUSAGE_SELF)
print(out.getvalue()[-300:])
print("measured", len(out.getvalue()), use.ru_utime + use.ru_stime, int(hwm) / 1024,
      use.ru_maxrss / 1024)
"""


def child(settings: bg.Settings, *args: str, expect: str = "") -> tuple:
    """(seconds, CPU seconds, VmHWM MB, output bytes) of `bibliogate.py ARGS`
    in a fresh process (its output kept in memory, as a pipe would take it)."""
    cmd = [sys.executable, "-c", CHILD, str(REPO), str(settings.ini_path), *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if "measured" not in proc.stdout or expect not in proc.stdout:
        raise RuntimeError(f"{args} failed: {proc.stdout[-500:]} {proc.stderr[-2000:]}")
    size, cpu, hwm, _ = map(float, proc.stdout.split("measured")[1].split())
    return elapsed, cpu, hwm, size


def check_in_process(settings: bg.Settings, index=None, trace: bool = False) -> tuple:
    """(seconds, CPU seconds, tracemalloc peak MB) of one ordinary check."""
    bg.setup_logging(settings, console=False)       # as the command line does
    journal = bg.Journal(settings.database)
    sender = (bg.Sender(settings, journal) if index is None
              else bg.Sender(settings, journal, index=index))
    if trace:
        tracemalloc.start()
    started, cpu = time.perf_counter(), time.process_time()
    result = sender.check()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = 0.0
    if trace:
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    journal.close()
    if result.sent != settings.per_check:
        raise RuntimeError(f"in-process check: {result.summary()}")
    return elapsed, cpu, peak


def run_backlog(sizes: list, repeats: int) -> dict:
    """{size: {what: [measure, ...]}}. Each check sends the 10 oldest files;
    the same 10 are put back before the next one, so every check sees the
    same queue. `run` keeps its index from check to check (if it has one)."""
    sink = SinkProcess()
    tmp = Path(tempfile.mkdtemp(prefix="bibliogate-bench-"))
    base = time.time() - 3600
    results = {}
    try:
        small = make_gateway(tmp / "small", sink.port)
        for size in sizes:
            big = make_gateway(tmp / f"w{size}", sink.port)
            print(f"backlog: writing {size:,} files ...", flush=True)
            fill(big.spool, size, base=base)
            kept = {"small": None, "big": None}
            if hasattr(bg, "SpoolIndex"):
                kept = {"small": bg.SpoolIndex(small.spool), "big": bg.SpoolIndex(big.spool)}
                fill(small.spool, 10, base=base)
                check_in_process(small, kept["small"])      # `run`'s first check reads all
                check_in_process(big, kept["big"])
            ways = {
                "check 10": lambda: check_in_process(small, kept["small"]),
                "check": lambda: check_in_process(big, kept["big"]),    # noqa: B023
                "send 10": lambda: child(small, "send", expect="10 sent"),
                "send": lambda: child(big, "send", expect="10 sent"),   # noqa: B023
                "status": lambda: child(big, "status"),                 # noqa: B023
                "queue": lambda: child(big, "queue"),                   # noqa: B023
            }
            got = {name: [] for name in ways}
            for _ in range(repeats):
                for name, way in ways.items():
                    fill(small.spool, 10, base=base)
                    fill(big.spool, 10, base=base)              # the 10 oldest, back again
                    got[name].append(way())
            fill(small.spool, 10, base=base)
            fill(big.spool, 10, base=base)
            got["tracemalloc 10"] = [check_in_process(small, kept["small"], trace=True)]
            got["tracemalloc"] = [check_in_process(big, kept["big"], trace=True)]
            results[size] = got
            shutil.rmtree(tmp / f"w{size}", ignore_errors=True)
        return results
    finally:
        stop_logging()
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def report_backlog(results: dict) -> None:
    med = lambda rows, i: statistics.median(r[i] for r in rows)     # noqa: E731
    print(f"  {'waiting':>9}  {'check beyond':>12}  {'check CPU':>9}  {'trace peak':>10}  "
          f"{'send beyond':>11}  {'send HWM':>8}  {'status':>7}  {'HWM':>6}  "
          f"{'queue':>7}  {'HWM':>6}  {'output':>9}")
    for size, got in results.items():
        print(f"  {size:>9,}  {med(got['check'], 0) - med(got['check 10'], 0):>10.3f} s"
              f"  {med(got['check'], 1) - med(got['check 10'], 1):>7.3f} s"
              f"  {got['tracemalloc'][0][2]:>7.1f} MB"
              f"  {med(got['send'], 0) - med(got['send 10'], 0):>9.3f} s"
              f"  {med(got['send'], 2):>5.1f} MB"
              f"  {med(got['status'], 0):>5.2f} s  {med(got['status'], 2):>3.0f} MB"
              f"  {med(got['queue'], 0):>5.2f} s  {med(got['queue'], 2):>3.0f} MB"
              f"  {med(got['queue'], 3) / 1e3:>6.0f} kB")
    print("  (check: in process, as `run` does it; send: a fresh process; status, queue: "
          "the commands, wall time from start to exit, python's start included)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("drain", "backlog", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sink", choices=("smtp-sink", "aiosmtpd", "both"), default="both")
    parser.add_argument("--waiting", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout, measured in the same "
                        "rounds (drain only)")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  Python {platform.python_version()}  "
          f"{platform.platform()}  {os.cpu_count()} cores  load {os.getloadavg()}  {REPO}")
    if args.what in ("drain", "both"):
        sinks = ("smtp-sink", "aiosmtpd") if args.sink == "both" else (args.sink,)
        for sink in sinks:
            print(f"drain: {args.messages:,} messages to {sink}, {args.rounds} rounds")
            got = run_drain(args.rounds, args.messages, sink, args.before)
            for name, pairs in got.items():
                wall = statistics.median(p[0] for p in pairs)
                cpu = statistics.median(p[1] for p in pairs)
                print(f"  {name:34s} median {wall:6.2f} s ({args.messages / wall:5.0f} msg/s), "
                      f"CPU {cpu:5.2f} s")
            gateways = [n for n in got if n in (SUBPROCESS, IN_PROCESS) or n.startswith(BEFORE)]
            for name in gateways:
                for ref in (BARE, BARE_FSYNC):
                    ratio = statistics.median(b[0] / g[0] for b, g in zip(got[ref], got[name]))
                    print(f"  {ref} / {name:34s} median ratio {ratio:.2f}")
            for name in (SUBPROCESS, IN_PROCESS):
                if BEFORE + name in got:
                    ratio = statistics.median(b[0] / a[0] for b, a in zip(got[BEFORE + name],
                                                                          got[name]))
                    print(f"  before / after, {name:34s} median ratio {ratio:.2f}")
    if args.what in ("backlog", "both"):
        report_backlog(run_backlog([int(n) for n in args.waiting.split(",")], args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
