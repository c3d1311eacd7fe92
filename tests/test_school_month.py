"""A school month through the real scheduler, compared with what should happen.

The `run` loop (Gateway.tick with an injected clock) steps through 36 days:
weekends and a week of holiday closed, 300 pupils in 12 classes, about 900
loans exported by the "library system" every night into the import folder
(with returns, renewals and new loans from a seeded random.Random), the SMTP
server (a real aiosmtpd on 127.0.0.1) off for two days, the nightly export
missing for two days. Every notice that reaches the server is compared with
an expectation computed here, independently, from the same snapshots and the
rules of the issue and the README:

* a notice's day is due - warning_days (warning), due + overdue_days
  (overdue), due + reminder_days (reminder);
* a run happens on each open day at run_at when the loans are fresh (not
  older than max_data_age_hours); it covers every notice day since the last
  run (at most a week back, further across closed days); a warning whose day
  falls before the next open day goes in it, if the item is not yet past due;
* a reminder goes only when the overdue notice went on an earlier day; a
  loan that never had one gets the overdue notice instead; one whose
  overdue notice goes in the same run gets nothing more;
* send_to = patron_else_guardian; pupils not enabled get nothing; pupils
  with no address at all are named in the run's summary.
"""

import datetime as dt
import random
import re
from collections import Counter, defaultdict

import bibliogate as bg
from conftest import Clock, write_ini
from test_import import LOAN_HEADER, PATRON_HEADER, csv_text

START = dt.date(2026, 3, 2)                         # a Monday
DAYS = 36
HOLIDAY = (dt.date(2026, 3, 23), dt.date(2026, 3, 27))
SERVER_OFF = {START + dt.timedelta(days=n) for n in (15, 16)}       # Tue, Wed
EXPORT_MISSING = {START + dt.timedelta(days=n) for n in (9, 10)}    # Wed, Thu
WARN, OVERDUE, REMIND = 3, 1, 3
LIBRARY = "library@school.example"
HEADINGS = {"Now overdue:": "overdue",
            "Still overdue (we wrote to you about these before):": "reminder",
            "Also overdue:": "listed", "Due back soon:": "warning"}
ITEM_RE = re.compile(r"^- (?P<title>.+?)(?: \(barcode \S+\))?, due (?P<due>\d{4}-\d\d-\d\d)"
                     r"(?:.*\(we wrote on (?P<wrote>\d{4}-\d\d-\d\d)\))?")
#: Before one message held every kind, the subject said which (kept so that
#: this test shows what the old scheduler lost, not only that it differs).
OLD_SUBJECTS = (("reminder", "reminder"), ("overdue", "overdue"), ("due back", "warning"))


def at(day, hour=0, minute=0, second=0):
    return dt.datetime.combine(day, dt.time(hour, minute, second)).timestamp()


def closed(day):
    return day.weekday() >= 5 or HOLIDAY[0] <= day <= HOLIDAY[1]


# -- the library's data ---------------------------------------------------------

def make_patrons(rnd):
    groups = [f"{year}{cls}" for year in (3, 4, 5, 6) for cls in "ABC"]
    patrons = []
    for n in range(300):
        pid = f"S{n:03}"
        kind = rnd.random()
        own = "" if kind < 0.22 else f"pupil{n}@school.example"
        guardian = "" if 0.20 <= kind < 0.22 or kind > 0.8 else f"family{n}@home.example"
        enabled = "no" if n % 29 == 0 else "yes"
        if n >= 280:                    # brothers and sisters, with one parent's address
            own, guardian = "", f"family{n // 2 * 2}@home.example"
        patrons.append([pid, f"Pupil{n:03} Surname{n % 17}", own, guardian, groups[n % 12], enabled])
    return patrons


def first_loans(rnd, patrons):
    loans = {}
    for n in range(900):
        pid = patrons[rnd.randrange(len(patrons))][0]
        due = START + dt.timedelta(days=rnd.randrange(-12, 30))
        loans[f"B{n:04}"] = [pid, f"B{n:04}", f"Book {n:04}", due]
    return loans


def next_night(rnd, loans, patrons, day, counter):
    """The loans after a day at the library: returns, renewals, new loans."""
    for barcode in list(loans):
        pid, _, title, due = loans[barcode]
        roll = rnd.random()
        if roll < 0.06:
            del loans[barcode]                                  # returned
        elif roll < 0.08:
            loans[barcode][3] = max(due, day) + dt.timedelta(days=14)   # renewed
    for _ in range(25):
        counter[0] += 1
        n = counter[0]
        pid = patrons[rnd.randrange(len(patrons))][0]
        loans[f"B{n:04}"] = [pid, f"B{n:04}", f"Book {n:04}", day + dt.timedelta(days=rnd.randrange(7, 22))]


# -- the expectation, computed here -----------------------------------------------

def last_open(day):
    day -= dt.timedelta(days=1)
    while closed(day):
        day -= dt.timedelta(days=1)
    return day


def next_open(day):
    day += dt.timedelta(days=1)
    while closed(day):
        day += dt.timedelta(days=1)
    return day


def reachable(patron):
    _, _, own, guardian, _, enabled = patron
    return enabled == "yes" and bool(own or guardian)


def expected_notices(runs, patrons, everyone=False):
    """{(barcode, due, kind): run day} for the runs [(day, snapshot)]
    (everyone: as if every pupil could be reached)."""
    by_id = {p[0]: p for p in patrons}
    sent, last = {}, None
    for day, loans in runs:
        floor = day - dt.timedelta(days=7)
        while closed(floor):
            floor -= dt.timedelta(days=1)
        after = last_open(day) if last is None else max(last, floor)
        before = next_open(day)
        for pid, barcode, _, due in loans:
            if not (everyone or reachable(by_id[pid])):
                continue
            key = (barcode, due)
            if after < due - dt.timedelta(days=WARN) < before and due >= day \
                    and (*key, "warning") not in sent:
                sent[(*key, "warning")] = day
            if after < due + dt.timedelta(days=OVERDUE) <= day and (*key, "overdue") not in sent:
                sent[(*key, "overdue")] = day
            if after < due + dt.timedelta(days=REMIND) <= day and (*key, "reminder") not in sent \
                    and (*key, "reminder-done") not in sent:
                wrote = sent.get((*key, "overdue"))
                if wrote is None:
                    sent[(*key, "overdue")] = day
                if wrote is not None and wrote < day:
                    sent[(*key, "reminder")] = day
                else:
                    sent[(*key, "reminder-done")] = day
        last = day
    return {k: v for k, v in sent.items() if k[2] != "reminder-done"}


# -- what arrived -------------------------------------------------------------------

def parse(received):
    """(recipients, day written, [{kind: [(title, due)]}, one per pupil])."""
    msg = received.message
    day = dt.datetime.strptime(msg["Date"][5:16], "%d %b %Y").date()
    blocks = [defaultdict(list)]
    groups, current = blocks[0], None
    for line in msg.get_content().splitlines():
        if line.startswith("For ") and line.endswith(":"):    # a message about several pupils
            if any(groups.values()):
                blocks.append(defaultdict(list))
                groups = blocks[-1]
        elif line in HEADINGS:
            current = HEADINGS[line]
        elif current and (m := ITEM_RE.match(line)):
            groups[current].append((m["title"], dt.date.fromisoformat(m["due"])))
            if m["wrote"]:
                groups["wrote"].append((m["title"], dt.date.fromisoformat(m["wrote"])))
        elif not line.strip():
            current = None
    if not any(groups.values()):
        kind = next(k for word, k in OLD_SUBJECTS if word in msg["Subject"])
        groups[kind] = [(m["title"], dt.date.fromisoformat(m["due"]))
                        for m in map(ITEM_RE.match, msg.get_content().splitlines()) if m]
    return tuple(sorted(received.rcpt_tos)), day, blocks


def test_a_school_month_through_the_scheduler(tmp_path, sink):
    rnd = random.Random(20260302)
    patrons = make_patrons(rnd)
    loans = first_loans(rnd, patrons)
    closed_text = f"sat, sun, {HOLIDAY[0]}..{HOLIDAY[1]}"
    ini = write_ini(tmp_path, sink, overdue__enabled=True, overdue__closed=closed_text,
                    overdue__send_to="patron_else_guardian", gateway__messages_per_check=5000,
                    gateway__minutes_between_checks=1)
    clock = Clock(at(START - dt.timedelta(days=1), 23))
    gateway = bg.Gateway(ini, clock=clock)
    folder = gateway.settings.import_folder
    folder.mkdir(exist_ok=True)

    def tick(when):
        clock.now = when
        gateway.tick()

    runs, snapshot, snapshot_at, counter = [], None, None, [2000]
    for n in range(DAYS):
        day = START + dt.timedelta(days=n)
        if n:
            next_night(rnd, loans, patrons, day, counter)
        if day in SERVER_OFF and sink.running:
            sink.stop()
        if day not in SERVER_OFF and not sink.running:
            sink.start()
        tick(at(day, 0, 30))                              # the daily log
        if day not in EXPORT_MISSING:
            (folder / "patrons.csv").write_text(csv_text(PATRON_HEADER, patrons), encoding="utf-8")
            rows = [[p, b, t, d.isoformat()] for p, b, t, d in loans.values()]
            (folder / "loans.csv").write_text(csv_text(LOAN_HEADER, rows), encoding="utf-8")
            snapshot = [tuple(x) for x in loans.values()]
            snapshot_at = at(day, 1, 0, 5)
        tick(at(day, 1))
        tick(at(day, 1, 0, 5))                            # settled: imported
        if not closed(day) and at(day, 6, 30) - snapshot_at <= 36 * 3600:
            runs.append((day, snapshot))
        for hour, minute in ((6, 30), (6, 31), (9, 0), (13, 0), (18, 0)):
            tick(at(day, hour, minute))
    assert sink.running and not list(gateway.settings.spool.glob("*.TMP"))

    # What arrived, and what should have.
    titles = {}
    for _, snap in runs:
        titles.update({t: b for _, b, t, _ in snap})
    got, per_recipient_day = Counter(), Counter()
    lists = []
    for received in sink.messages:
        if received.rcpt_tos == [LIBRARY]:
            continue                                      # the daily log
        rcpt, day, blocks = parse(received)
        for address in rcpt:
            per_recipient_day[(address, day)] += 1
        for groups in blocks:
            for kind in ("warning", "overdue", "reminder"):
                for title, due in groups.get(kind, ()):
                    got[(titles[title], due, kind)] += 1
        lists.append((day, rcpt, blocks))
    expected = expected_notices(runs, patrons)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    twice = sorted(k for k, count in got.items() if count > 1)
    assert len(expected) > 600 and {k[2] for k in expected} == {"warning", "overdue", "reminder"}
    assert missing == [], f"{len(missing)} notices never arrived, e.g. {missing[:5]}"
    assert extra == [], f"{len(extra)} notices not expected, e.g. {extra[:5]}"
    assert twice == [], f"{len(twice)} notices arrived twice, e.g. {twice[:5]}"
    crowded = [k for k, count in per_recipient_day.items() if count > 1]
    assert crowded == [], f"{len(crowded)} recipients got several messages a day: {crowded[:3]}"

    # Each notice went on the day of its run, and a message about overdue
    # items lists every item the pupil had overdue that day.
    days_sent = {}
    by_pid = {p[0]: p for p in patrons}
    snapshots = dict(runs)
    families = 0
    for day, rcpt, blocks in lists:
        owners = set()
        for groups in blocks:
            for kind in ("warning", "overdue", "reminder"):
                for title, due in groups.get(kind, ()):
                    days_sent[(titles[title], due, kind)] = day
            mine = {t for items in groups.values() for t, _ in items}
            [pid] = {p for p, _, t, _ in snapshots[day] if t in mine}
            owners.add(pid)
            if groups.get("overdue") or groups.get("reminder"):
                listed = {t for kind in ("overdue", "reminder", "listed")
                          for t, _ in groups.get(kind, ())}
                everything = {t for p, _, t, due in snapshots[day] if p == pid and due < day}
                assert listed == everything, (day, pid)
        families += len(owners) > 1
        assert rcpt == tuple(sorted({by_pid[p][2] or by_pid[p][3] for p in owners}))
    assert families >= 3                                 # one message to a shared address
    assert days_sent == expected
    # ... and each reminder names the day the overdue notice was written.
    wrote = {(titles[t], day) for _, _, blocks in lists for g in blocks for t, day in g["wrote"]}
    assert wrote == {(b, expected[(b, due, "overdue")]) for (b, due, kind) in expected
                     if kind == "reminder"}
    # "We wrote to you" is true: the overdue notice went on an earlier day.
    for (barcode, due, kind), day in expected.items():
        if kind == "reminder":
            assert expected[(barcode, due, "overdue")] < day

    # The pupils it could not reach are named, with the reason.
    runs_logged = " ".join(r["detail"] for r in gateway.journal.db.execute(
        "SELECT detail FROM events WHERE kind = 'overdue_run'"))
    owner = {b: p for _, snap in runs for p, b, _, _ in snap}
    would = {owner[b] for b, _, _ in expected_notices(runs, patrons, everyone=True)}
    lost = [p for p in patrons if p[5] == "yes" and not (p[2] or p[3]) and p[0] in would]
    assert lost
    for p in lost:
        assert f"{p[1]} ({p[0]}, {p[4]}): no email address and no guardian email address" \
            in runs_logged
