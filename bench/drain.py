"""How fast BiblioGate drains its spool, and what a check costs with a huge queue.

Two measurements, both against a local aiosmtpd server that runs in its own
process (so it does not share the interpreter lock with the sender):

drain   2,000 queued ~2 KB messages sent unthrottled, three ways, alternating
        within each round: `bibliogate.py send --all` as a subprocess, the same
        check in this process (Sender.check(limit=0)), and a bare smtplib loop
        that reads each file and sends it over one connection. Reported: the
        median of bare_time / gateway_time over the rounds (goal >= 0.8), and
        the CPU time of each way (steadier than wall time on a busy machine).

backlog one ordinary check (messages_per_check = 10) with 100,000 files waiting,
        against the same check with only 10 waiting: the time beyond sending
        (goal < 0.5 s) and the peak memory of `send` as a subprocess
        (VmHWM, the peak resident set) and of the check in this process
        (tracemalloc) (goal < 100 MB).

Usage (Linux, from the repository folder; needs aiosmtpd, as the tests do):

    python bench/drain.py                 # both, default sizes
    python bench/drain.py drain --rounds 5 --messages 2000
    python bench/drain.py backlog --waiting 100000

Only 127.0.0.1 is used; every temporary folder is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import resource
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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


def drain_subprocess(settings: bg.Settings) -> None:
    cmd = [sys.executable, str(REPO / "bibliogate.py"), "--config", str(settings.ini_path),
           "send", "--all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"send --all failed: {proc.stdout} {proc.stderr}")


def drain_in_process(settings: bg.Settings) -> None:
    bg.setup_logging(settings, console=False)       # as the command line does
    journal = bg.Journal(settings.database)
    result = bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    journal.close()
    if result.problem or result.bad or result.deferred:
        raise RuntimeError(f"in-process check: {result.summary()}")


def drain_bare(spool: Path, port: int) -> None:
    """The floor: read each file and hand it to smtplib over one connection."""
    files = sorted(spool.glob("*.TMP"))
    with smtplib.SMTP(HOST, port, timeout=30) as smtp:
        for path in files:
            data = path.read_bytes().replace(b"\n", b"\r\n")
            n = int(path.stem[1:])
            smtp.sendmail(FROM, [f"patron{n}@example.org"], data)
            path.unlink()


SUBPROCESS, IN_PROCESS, BARE = "send --all (subprocess)", "Sender.check (in process)", "bare smtplib"


def run_drain(rounds: int, count: int) -> dict:
    """{way: [(seconds, CPU seconds), ...]}, one pair per round."""
    sink = SinkProcess()
    tmp = Path(tempfile.mkdtemp(prefix="bibliogate-bench-"))
    try:
        settings = make_gateway(tmp / "gw", sink.port)
        ways = {SUBPROCESS: lambda: drain_subprocess(settings),
                IN_PROCESS: lambda: drain_in_process(settings),
                BARE: lambda: drain_bare(settings.spool, sink.port)}
        got = {name: [] for name in ways}
        order = list(ways)
        for r in range(rounds):
            for name in order[r % 3:] + order[:r % 3]:          # alternate who goes first
                fresh_database(settings)
                fill(settings.spool, count)
                before = sink.count
                started, cpu = time.perf_counter(), cpu_seconds()
                ways[name]()
                got[name].append((time.perf_counter() - started, cpu_seconds() - cpu))
                sink.wait_for(before + count)
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

#: Runs `bibliogate.py send`, then prints the process's CPU time and its peak
#: resident memory: VmHWM, and ru_maxrss for comparison (on Linux ru_maxrss
#: keeps the parent's peak from before exec, so it can read too high).
CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import bibliogate
code = bibliogate.main(["--config", sys.argv[2], "send"])
with open("/proc/self/status", encoding="ascii") as fh:
    hwm = [line.split()[1] for line in fh if line.startswith("VmHWM:")][0]
use = resource.getrusage(resource.RUSAGE_SELF)
print("measured", use.ru_utime + use.ru_stime, int(hwm) / 1024, use.ru_maxrss / 1024)
sys.exit(code)
"""


def child_send(settings: bg.Settings) -> tuple:
    """(seconds, CPU seconds, VmHWM MB, ru_maxrss MB) of `bibliogate.py send`
    in a fresh process."""
    cmd = [sys.executable, "-c", CHILD, str(REPO), str(settings.ini_path)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or "10 sent" not in proc.stdout:
        raise RuntimeError(f"send failed: {proc.stdout} {proc.stderr}")
    cpu, hwm, maxrss = map(float, proc.stdout.split("measured")[1].split())
    return elapsed, cpu, hwm, maxrss


def check_in_process(settings: bg.Settings, trace: bool = False) -> tuple:
    """(seconds, CPU seconds, tracemalloc peak MB) of one ordinary check."""
    bg.setup_logging(settings, console=False)       # as the command line does
    journal = bg.Journal(settings.database)
    sender = bg.Sender(settings, journal)
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


def run_backlog(backlog: int, repeats: int) -> dict:
    """Each check sends the 10 oldest files; the same 10 are put back before
    the next one, so every check sees the same queue."""
    sink = SinkProcess()
    tmp = Path(tempfile.mkdtemp(prefix="bibliogate-bench-"))
    base = time.time() - 3600
    try:
        small = make_gateway(tmp / "small", sink.port)
        big = make_gateway(tmp / "big", sink.port)
        print(f"backlog: writing {backlog:,} files ...", flush=True)
        fill(big.spool, backlog, base=base)
        ways = {
            "check, 10 waiting": lambda: check_in_process(small),
            f"check, {backlog:,} waiting": lambda: check_in_process(big),
            "send, 10 waiting": lambda: child_send(small),
            f"send, {backlog:,} waiting": lambda: child_send(big),
        }
        got = {name: [] for name in ways}
        for r in range(repeats):
            for name, way in ways.items():
                fill(small.spool, 10, base=base)
                fill(big.spool, 10, base=base)              # the 10 oldest, back again
                got[name].append(way())
        fill(small.spool, 10, base=base)
        fill(big.spool, 10, base=base)
        got["tracemalloc, 10 waiting"] = [check_in_process(small, trace=True)[2]]
        got[f"tracemalloc, {backlog:,} waiting"] = [check_in_process(big, trace=True)[2]]
        return got
    finally:
        stop_logging()
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=("drain", "backlog", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  Python {platform.python_version()}  "
          f"{platform.platform()}  {os.cpu_count()} cores  load {os.getloadavg()}")
    if args.what in ("drain", "both"):
        print(f"drain: {args.messages:,} messages, {args.rounds} rounds")
        got = run_drain(args.rounds, args.messages)
        for name, pairs in got.items():
            wall = statistics.median(p[0] for p in pairs)
            cpu = statistics.median(p[1] for p in pairs)
            print(f"  {name:26s} median {wall:6.2f} s ({args.messages / wall:5.0f} msg/s), "
                  f"CPU {cpu:5.2f} s")
        for name in (SUBPROCESS, IN_PROCESS):
            ratio = statistics.median(b[0] / g[0] for b, g in zip(got[BARE], got[name]))
            print(f"  bare / gateway, {name:26s} median ratio {ratio:.2f} (goal >= 0.8)")
    if args.what in ("backlog", "both"):
        got = run_backlog(args.waiting, args.repeats)
        names = list(got)
        med = {name: [statistics.median(x[i] for x in got[name]) for i in range(len(got[name][0]))]
               for name in names[:4]}
        for name in names[:4]:
            print(f"  {name:28s} median {med[name][0]:6.3f} s, CPU {med[name][1]:6.3f} s"
                  + (f", VmHWM {med[name][2]:5.1f} MB, ru_maxrss {med[name][3]:5.1f} MB"
                     if len(med[name]) > 3 else ""))
        for small, big, where in ((0, 1, "in process"), (2, 3, "subprocess")):
            a, b = med[names[small]], med[names[big]]
            print(f"  {where}: {b[0] - a[0]:.3f} s beyond the sending ({b[1] - a[1]:.3f} s CPU)")
        for name in names[4:]:
            print(f"  {name:28s} peak {got[name][0]:6.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
