"""Peak memory and wall time of short commands: `send` with an empty spool, `status`.

In a temporary folder (removed at the end) with an ini pointed at a closed port
(an empty spool never connects), each command is run --rounds times in turn
for every --program given, so two versions share the machine's moments; the
medians are printed side by side, with the ratio to the first program.

Each command runs two ways: as a script (`python bibliogate.py send`, as the
README says to run it: Python compiles the file at every start, since a
script's bytecode is never cached) and as a module imported from its cached
bytecode (`import bibliogate; bibliogate.main([...])`, the cache kept in the
temporary folder). Compiling 10,000 lines sets the script's peak, before any
module is imported (and the memory it frees is reused by the imports); the
second way shows what the modules a command imports cost.

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
#: Imports bibliogate from sys.argv[1]'s folder (cached bytecode) and runs its main.
AS_MODULE = ("import sys; sys.path.insert(0, sys.argv[1]); import bibliogate; "
             "sys.exit(bibliogate.main(sys.argv[2:]))")

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


def command_line(way: str, program: Path, ini: Path, words: list[str]) -> list[str]:
    if way == "script":
        return [sys.executable, str(program), "--config", str(ini), *words]
    return [sys.executable, "-c", AS_MODULE, str(program.parent), "--config", str(ini), *words]


def run_once(command: list[str], cache: Path) -> tuple[float, int, int]:
    """(seconds, peak resident KB, exit code) of one run."""
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**env, "PYTHONPYCACHEPREFIX": str(cache)})
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
        cache = folder / "pycache"
        ways = ("script", "module")
        for program in programs:            # once each first: the database made, bytecode cached
            for _, words in COMMANDS:
                for way in ways:
                    run_once(command_line(way, program, ini, words), cache)
        for _ in range(args.rounds):
            for name, words in COMMANDS:
                for way in ways:
                    for program in programs:
                        figures.setdefault((name, way, program), []).append(
                            run_once(command_line(way, program, ini, words), cache))
        print(f"medians of {args.rounds}; load average at the end: "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print()
        print("| command | run as | program | peak memory | ratio | wall time | ratio | exit codes |")
        print("|---|---|---|---:|---:|---:|---:|---|")
        for (name, _), way in ((c, w) for c in COMMANDS for w in ways):
            first = figures[(name, way, programs[0])]
            mem0 = statistics.median(kb for _, kb, _ in first)
            time0 = statistics.median(t for t, _, _ in first)
            for program in programs:
                rows = figures[(name, way, program)]
                mem, took = statistics.median(kb for _, kb, _ in rows), statistics.median(
                    t for t, _, _ in rows)
                codes = sorted({c for _, _, c in rows})
                print(f"| {name} | {way} | {program} | {mem / 1024:.1f} MB | {mem / mem0:.3f} | "
                      f"{took * 1000:.0f} ms | {took / time0:.2f} | {codes} |")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
