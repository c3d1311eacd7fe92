"""Kill the gateway with SIGKILL again and again while it drains a queue; count
what was lost and what was sent twice.

2,000 messages, each with its own Message-ID, wait in the spool. An aiosmtpd
server on 127.0.0.1 (in this process, on its own thread) takes about 20 ms per
message and records every Message-ID it accepts. `bibliogate.py run`, as a
subprocess with no throttle, is killed with SIGKILL at random moments (25 by
default) and started again each time; after the last kill it runs until the
spool is empty and is then stopped with Ctrl+C. Lost = queued Message-IDs the
server never accepted (must be 0); sent twice = extra copies (must be no more
than the number of kills: only the message in its SMTP transaction may go
again). Linux only (SIGKILL); a smaller version of this is
tests/test_crash.py.

    python bench/crash.py [--messages 2000] [--kills 25] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiosmtpd.controller import Controller

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from drain import fill  # noqa: E402  (the same ~2 KB letters as the drain benchmark)

HOST = "127.0.0.1"
#: Nothing here may run for ever: the whole benchmark stops after this long.
DEADLINE_SECONDS = 900


class SlowRecorder:
    """An SMTP handler that takes `delay` seconds per message and keeps its Message-ID."""

    def __init__(self, delay: float):
        self.delay = delay
        self.ids: collections.Counter = collections.Counter()
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        mid = email.message_from_bytes(envelope.content)["Message-ID"]
        with self.lock:
            self.ids[mid] += 1
        return "250 OK"

    def total(self) -> int:
        with self.lock:
            return sum(self.ids.values())


def write_ini(folder: Path, port: int) -> Path:
    ini = folder / "bibliogate.ini"
    ini.write_text(
        f"[smtp]\nhost = {HOST}\nport = {port}\ntimeout_seconds = 10\n"
        "[gateway]\nfrom_address = library@school.example\n"
        "minutes_between_checks = 0.05\nmessages_per_check = 10000\n"
        "[web]\nport = 0\n", encoding="utf-8")
    return ini


def start_run(ini: Path, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini), "run"],
                            stdout=log, stderr=subprocess.STDOUT)


def waiting(spool: Path) -> int:
    return sum(1 for p in spool.iterdir() if p.name.upper().endswith(".TMP"))


def crash_run(messages: int, kills: int, seed: int, delay: float) -> dict:
    rng = random.Random(seed)
    folder = Path(tempfile.mkdtemp(prefix="bibliogate-crash-"))
    recorder = SlowRecorder(delay)
    with socket.socket() as probe:                       # a free port on 127.0.0.1
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    controller = Controller(recorder, hostname=HOST, port=port, server_hostname="sink.bench")
    controller.start()
    started = time.monotonic()
    try:
        ini = write_ini(folder, port)
        (folder / "spool").mkdir()
        fill(folder / "spool", messages)
        queued = {f"<bench-{n}@school.example>" for n in range(messages)}
        with open(folder / "run.log", "w", encoding="utf-8") as log:
            done_kills = 0
            while done_kills < kills and waiting(folder / "spool"):
                proc = start_run(ini, log)
                time.sleep(rng.uniform(0.3, 2.5))          # a random moment of the drain
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                done_kills += 1
            proc = start_run(ini, log)
            while waiting(folder / "spool") and time.monotonic() - started < DEADLINE_SECONDS:
                time.sleep(0.2)
            time.sleep(1.0)                                   # the last reply on its way
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        ids = recorder.ids
        bad = [p.name for p in (folder / "spool").iterdir() if p.name.upper().endswith(".BAD")]
        return {
            "messages": messages, "kills": done_kills, "seconds": round(time.monotonic() - started, 1),
            "accepted": recorder.total(), "lost": len(queued - set(ids)),
            "sent_twice": sum(c - 1 for c in ids.values() if c > 1),
            "still_waiting": waiting(folder / "spool"), "bad": len(bad),
            "strangers": len(set(ids) - queued),
        }
    finally:
        controller.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    if os.name == "nt":
        print("bench/crash.py needs SIGKILL (Linux); see tests/test_crash.py.", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds per message at the server")
    args = parser.parse_args()
    result = crash_run(args.messages, args.kills, args.seed, args.delay)
    for key, value in result.items():
        print(f"{key:>14}: {value}")
    ok = result["lost"] == 0 and result["sent_twice"] <= result["kills"] and not result["still_waiting"]
    print("PASS" if ok else "FAIL: messages were lost or sent more than once per kill")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
