#!/usr/bin/env python3
"""How BiblioGate copes with a big school district's circulation data.

Makes 200,000 patrons and 1,000,000 loans as CSV files in a temporary folder
(deleted at the end unless --keep), then times, each in a process of its own
so that its peak memory and CPU time (user + system) can be read:

  1. `import patrons` and `import loans`, beside the bare load of the same
     files: the sqlite3 command line's `.import` where it is installed, else
     a plain csv + executemany script;
  2. `import loans` of the next night's file (a few percent changed);
  3. `overdue --dry-run`, then `overdue` for today: every notice composed and
     written to the spool;
  4. `overdue` again: nothing new to queue (the ledger has it all).

Each program given with --program (e.g. before=old/bibliogate.py) runs every
step in a fresh folder, in turn with the others, --repeat times; the medians
are reported, of wall time and (where the system tells) of the processor
time each command used, user and system. Not part of the tests. Run:
  python bench/overdue.py [--patrons N] [--loans N] [--program NAME=PATH ...] [--repeat 3]
Results are printed as a table and saved in bench/out/.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROGRAM = HERE.parent / "bibliogate.py"
SQLITE3 = shutil.which("sqlite3")

FIRST = ["Ann", "Bob", "Cy", "Di", "Ed", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lee",
         "Mia", "Ned", "Ola", "Pat", "Quin", "Ray", "Sue", "Tom", "Uma", "Vic", "Wen", "Zoe"]
LAST = ["Smith", "Jones", "Brown", "Taylor", "Wilson", "Davies", "Evans", "Thomas", "Roberts",
        "Walker", "Wright", "Hughes", "Green", "Hall", "Wood", "Clarke", "Lewis", "Young"]
WORDS = ["River", "Secret", "Garden", "Star", "Dragon", "Winter", "Island", "Clock", "Moon",
         "Forest", "Letter", "Journey", "Silver", "Lantern", "Storm", "Castle", "Map", "Fox"]


def make_patrons(path: Path, count: int, rng: random.Random) -> None:
    """90% have an email address, 40% a guardian's, 75% are enabled for auto-overdue."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["patron_id", "name", "email", "guardian_email", "group", "auto_overdue"])
        for n in range(count):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            mail = f"{first.lower()}.{last.lower()}{n}@students.example.org" if rng.random() < 0.9 else ""
            guardian = f"parent{n}@home.example.org" if rng.random() < 0.4 else ""
            out.writerow([f"S{n:07d}", f"{first} {last}", mail, guardian,
                          f"Year {7 + n % 6}", "yes" if rng.random() < 0.75 else "no"])


def make_loans(path: Path, count: int, patrons: int, today: dt.date, rng: random.Random) -> None:
    """Four-week loans issued evenly: 70% fall due in the next four weeks
    (today included), 30% are overdue by 1 to 120 days."""
    dates = {offset: (today + dt.timedelta(days=offset)).isoformat() for offset in range(-120, 28)}
    with open(path, "w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["patron_id", "barcode", "title", "due_date"])
        for n in range(count):
            offset = rng.randint(0, 27) if rng.random() < 0.7 else -rng.randint(1, 120)
            title = f"The {rng.choice(WORDS)} of the {rng.choice(WORDS)}, book {n % 40 + 1}"
            out.writerow([f"S{rng.randrange(patrons):07d}", f"B{n:08d}", title, dates[offset]])


def make_next_night(source: Path, path: Path, patrons: int, rng: random.Random) -> None:
    """The next night's export: 3% of the loans returned, 2% renewed for two
    more weeks, 3% new."""
    with open(source, encoding="utf-8", newline="") as fh, \
            open(path, "w", encoding="utf-8", newline="") as out_fh:
        rows, out = csv.reader(fh), csv.writer(out_fh)
        out.writerow(next(rows))
        count = 0
        for row in rows:
            count += 1
            chance = rng.random()
            if chance < 0.03:
                continue
            if chance < 0.05:
                row[3] = (dt.date.fromisoformat(row[3]) + dt.timedelta(days=14)).isoformat()
            out.writerow(row)
        due = (dt.date.today() + dt.timedelta(days=27)).isoformat()
        for n in range(count * 3 // 100):
            out.writerow([f"S{rng.randrange(patrons):07d}", f"N{n:08d}", f"New book {n}", due])


def measure(argv: list[str], cwd: Path) -> dict:
    """Run a command; its wall time, peak memory (MB, where the system tells),
    the processor time it used (user and system seconds, where the system
    tells: on a shared machine less disturbed by the others than the wall
    time) and output."""
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out_file, stderr=err_file)
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            peak = usage.ru_maxrss * scale / 1e6
            cpu = {"user": round(usage.ru_utime, 2), "sys": round(usage.ru_stime, 2)}
        else:                                                # Windows: time only
            proc.wait()
            peak, cpu = None, {"user": None, "sys": None}
        seconds = time.perf_counter() - start
        out_file.seek(0)
        err_file.seek(0)
        out = out_file.read().decode("utf-8", "replace")
        err = err_file.read().decode("utf-8", "replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{out}\n{err}")
    return {"seconds": round(seconds, 2), "peak_mb": round(peak, 1) if peak else None,
            "user_s": cpu["user"], "sys_s": cpu["sys"],
            "cpu_seconds": round(cpu["user"] + cpu["sys"], 2) if cpu["user"] is not None else None,
            "output": out.strip().splitlines()[-1] if out.strip() else ""}


BARE_LOAD = """
import csv, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
with open(sys.argv[2], encoding="utf-8-sig", newline="") as fh:
    rows = csv.reader(fh)
    header = next(rows)
    columns = ", ".join('"%s" TEXT' % name for name in header)
    conn.execute(f"CREATE TABLE bare ({columns})")
    conn.executemany(f"INSERT INTO bare VALUES ({', '.join('?' * len(header))})", rows)
conn.commit()
"""


def bare_loads(work: Path, csv_file: Path) -> dict:
    """The reference: sqlite3's own `.import` where the command is installed,
    else (only then) a plain csv + executemany script."""
    if SQLITE3:
        db = work / f"bare-cli-{csv_file.stem}.db"
        return {"sqlite3 .import": measure([SQLITE3, str(db), f".import --csv {csv_file} bare"],
                                           work)}
    db = work / f"bare-py-{csv_file.stem}.db"
    return {"csv + executemany": measure([sys.executable, "-c", BARE_LOAD, str(db),
                                          str(csv_file)], work)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patrons", type=int, default=200_000)
    parser.add_argument("--loans", type=int, default=1_000_000)
    parser.add_argument("--program", action="append", metavar="NAME=PATH",
                        help="a bibliogate.py to measure (several: side by side, in turn); "
                             "default: this folder's")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; medians reported")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if not (1 <= args.patrons <= 2_000_000 and 1 <= args.loans <= 10_000_000):
        parser.error("at most 2,000,000 patrons and 10,000,000 loans")
    programs = dict(p.split("=", 1) for p in args.program) if args.program \
        else {"this": str(PROGRAM)}
    work = Path(tempfile.mkdtemp(prefix="bibliogate-bench-"))
    try:
        results = run(work, args.patrons, args.loans, programs, max(1, min(args.repeat, 9)))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(results)
    return 0


def run(work: Path, patrons: int, loans: int, programs: dict, repeat: int) -> dict:
    today = dt.date.today()
    rng = random.Random(2026)
    started = time.perf_counter()
    data = work / "data"
    data.mkdir()
    make_patrons(data / "patrons.csv", patrons, rng)
    make_loans(data / "loans.csv", loans, patrons, today, rng)
    make_next_night(data / "loans.csv", data / "loans-next.csv", patrons, rng)
    print(f"made {patrons:,} patrons and {loans:,} loans in {time.perf_counter() - started:.0f} s "
          f"({(data / 'loans.csv').stat().st_size / 1e6:.0f} MB of loans) in {work}", flush=True)
    runs: dict = {name: [] for name in programs}
    files: dict = {}
    for n in range(repeat):
        for name, program in programs.items():      # in turn, so both see the same load
            folder = work / f"{name}-{n}"
            folder.mkdir()
            runs[name].append(one_run(folder, data, Path(program).resolve(), f"{name} run {n + 1}"))
            files[name] = runs[name][-1].pop("files_queued")
            shutil.rmtree(folder, ignore_errors=True)
    return {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "patrons": patrons,
            "loans": loans, "files_queued": files, "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "sqlite3": SQLITE3, "runs": runs, "repeat": repeat,
            "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def one_run(work: Path, data: Path, program: Path, label: str) -> dict:
    """Every step once, against a fresh folder: imports (each beside its bare
    load, under the same load), the job as a dry run, the job, the job again."""
    ini = work / "bibliogate.ini"
    ini.write_text("[smtp]\nhost = 127.0.0.1\n[gateway]\nfrom_address = library@school.example\n"
                   "[library]\nname = District Libraries\n", encoding="utf-8")
    cli = [sys.executable, str(program), "--config", str(ini)]
    steps: dict = {}

    def step(name, argv):
        steps[name] = measure(argv, work)
        print(f"{label}: {name}: {steps[name]['seconds']} s (processor: {steps[name]['user_s']} s "
              f"user, {steps[name]['sys_s']} s system), peak {steps[name]['peak_mb']} MB: "
              f"{steps[name]['output'][:100]}", flush=True)

    for name in ("patrons", "loans"):
        csv_file = data / f"{name}.csv"
        for how, figures in bare_loads(work, csv_file).items():
            steps[f"bare load of {name}: {how}"] = figures
            print(f"{label}: bare load of {name} ({how}): {figures['seconds']} s", flush=True)
        step(f"import {name}", cli + ["import", name, str(csv_file)])
    step("import loans, next night (8% changed)", cli + ["import", "loans",
                                                         str(data / "loans-next.csv")])
    step("overdue --dry-run", cli + ["overdue", "--dry-run"])
    step("overdue (today)", cli + ["overdue"])
    spool = work / "spool"
    steps["files_queued"] = sum(1 for p in spool.iterdir() if p.suffix.upper() == ".TMP")
    step("overdue again (nothing new)", cli + ["overdue"])
    steps.setdefault("files_queued", 0)
    return steps


def median(values: list) -> float:
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def report(results: dict) -> None:
    bare_name = "sqlite3 .import" if results["sqlite3"] else "csv + executemany"
    load = f", load average {results['load']:.1f}" if results.get("load") is not None else ""
    print(f"\nBiblioGate bench, {results['date']}: {results['patrons']:,} patrons, "
          f"{results['loans']:,} loans, Python {results['python']}, {results['cpus']} CPUs{load}; "
          f"medians of {results['repeat']}; reference: {bare_name}")
    names = list(results["runs"])
    print("| step | " + " | ".join(f"{n} s | {n} MB | {n} ratio | {n} CPU s | {n} CPU ratio"
                                   for n in names) + " |")
    print("|---|" + "---:|---:|---:|---:|---:|" * len(names))
    steps = [k for k in results["runs"][names[0]][0]]
    for step in steps:
        cells = []
        for name in names:
            runs = results["runs"][name]
            seconds = median([r[step]["seconds"] for r in runs])
            peak = median([r[step]["peak_mb"] for r in runs])
            what = step.split()[1].strip(",") if step.startswith("import") else None
            ratio = cpu_ratio = ""
            cpu = median([r[step].get("cpu_seconds") for r in runs])
            if what:
                ratios = [r[step]["seconds"] / r[f"bare load of {what}: {bare_name}"]["seconds"]
                          for r in runs]
                ratio = f"{median(ratios):.1f}x"
                bare = f"bare load of {what}: {bare_name}"
                cpu_ratios = [r[step]["cpu_seconds"] / r[bare]["cpu_seconds"] for r in runs
                              if r[step].get("cpu_seconds") and r[bare].get("cpu_seconds")]
                cpu_ratio = f"{median(cpu_ratios):.1f}x" if cpu_ratios else ""
            cells.append(f"{seconds:.2f} | {peak:.0f} | {ratio} | {cpu:.2f} | {cpu_ratio}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    print("\nProcessor time, medians (user s / system s):")
    print("| step | " + " | ".join(f"{n} user s | {n} sys s" for n in names) + " |")
    print("|---|" + "---:|---:|" * len(names))
    for step in steps:
        if not all("user_s" in r[step] for name in names for r in results["runs"][name]):
            continue                                    # from an older run's json
        cells = [f"{median([r[step]['user_s'] for r in results['runs'][name]]):.2f} | "
                 f"{median([r[step]['sys_s'] for r in results['runs'][name]]):.2f}" for name in names]
        print(f"| {step} | " + " | ".join(cells) + " |")
    for name in names:
        print(f"{name}: overdue queued {results['files_queued'][name]:,} messages")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    path = out / f"overdue-{results['date'].replace(' ', '-').replace(':', '')}-{results['loans']}.json"
    path.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
