"""Peak memory and wall time of short commands: `send` with an empty spool, `status`.

In a temporary folder (removed at the end) with an ini pointed at a closed port
(an empty spool never connects), each command is run --rounds times in turn
for every --program given, so two versions share the machine's moments; the
medians are printed side by side, with the ratio to the first program.

Peak memory is the child's ru_maxrss from os.wait4 (the resident set at its
highest, as VmHWM), so this runs on Linux and other POSIX systems only.

    python bench/commands.py                                   # this repository
    python bench/commands.py --program OLD/bibliogate.py --program bibliogate.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = (("send (empty spool)", ["send"]), ("status", ["status"]))

INI = """\
[smtp]
host = 127.0.0.1
port = 9
timeout_seconds = 5

[gateway]
spool_folder = spool
from_address = library@school.example
test_to_address = librarian@school.example

[library]
name = Bench School Library
"""


def run_once(command: list[str]) -> tuple[float, int, int]:
    """(seconds, peak resident KB, exit code) of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    kb = usage.ru_maxrss // (1024 if sys.platform == "darwin" else 1)     # bytes on macOS
    return took, kb, proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--program", type=Path, action="append",
                   help="a bibliogate.py to run (repeat to compare; default: this repository's)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if not hasattr(os, "wait4"):
        raise SystemExit("This measure needs os.wait4 (Linux, macOS).")
    programs = [q.resolve() for q in (args.program or [REPO / "bibliogate.py"])]

    folder = Path(tempfile.mkdtemp(prefix="bibliogate-commands-"))
    try:
        ini = folder / "bibliogate.ini"
        ini.write_text(INI, encoding="utf-8")
        (folder / "spool").mkdir()
        figures: dict = {}
        for program in programs:            # once each first: the database made, .pyc written
            for _, words in COMMANDS:
                run_once([sys.executable, str(program), "--config", str(ini), *words])
        for _ in range(args.rounds):
            for name, words in COMMANDS:
                for program in programs:
                    took, kb, code = run_once([sys.executable, str(program), "--config", str(ini),
                                               *words])
                    figures.setdefault((name, program), []).append((took, kb, code))
        print(f"medians of {args.rounds}; load average at the end: "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print()
        print("| command | program | peak memory | ratio | wall time | ratio | exit codes |")
        print("|---|---|---:|---:|---:|---:|---|")
        for name, _ in COMMANDS:
            first = figures[(name, programs[0])]
            mem0 = statistics.median(kb for _, kb, _ in first)
            time0 = statistics.median(t for t, _, _ in first)
            for program in programs:
                rows = figures[(name, program)]
                mem, took = statistics.median(kb for _, kb, _ in rows), statistics.median(
                    t for t, _, _ in rows)
                codes = sorted({c for _, _, c in rows})
                print(f"| {name} | {program} | {mem / 1024:.1f} MB | {mem / mem0:.2f} | "
                      f"{took * 1000:.0f} ms | {took / time0:.2f} | {codes} |")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
