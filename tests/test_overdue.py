"""The auto-overdue job: which notices, to whom, once only, on which days.

A real sqlite file and the real spool in tmp_path; "now" is injected (the
run's `now` argument, and the Gateway's clock), so days pass without waiting."""

import datetime as dt
import email
import email.policy
import json
import re
import time
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import REPO, write_ini
from test_import import LOAN_HEADER, PATRON_HEADER, csv_text, write_csv

DAY = dt.date(2026, 3, 2)                                  # a Monday


def at(day: dt.date, hour: int = 7, minute: int = 0) -> float:
    return dt.datetime.combine(day, dt.time(hour, minute)).timestamp()


def days(n: int) -> dt.date:
    return DAY + dt.timedelta(days=n)


PATRONS = [
    ["P1", "Ann Smith", "ann@example.org", "", "7A", "yes"],
    ["P2", "Bob Jones", "bob@example.org", "", "7A", "no"],           # not enabled
    ["P3", "Cy Young", "", "cy.parent@example.org", "7B", "yes"],     # guardian only
]
# On DAY (defaults: warning 3 days ahead, overdue 1 day ago, reminder 3 days ago):
LOANS = [
    ["P1", "B1", "Matilda", days(3)],          # warning
    ["P1", "B2", "Holes", days(3)],            # warning, in the same message
    ["P1", "B3", "Wonder", days(-1)],          # overdue
    ["P1", "B4", "Coraline", days(-3)],        # reminder
    ["P1", "B5", "Not yet", days(17)],         # nothing
    ["P2", "B6", "Dune", days(3)],             # not enabled
    ["P3", "B7", "Emma", days(-1)],            # no email of their own
]


class Clock:
    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now


def setup(folder: Path, loans=LOANS, imported=None, **overrides):
    """Settings and a Journal, with patrons and loans imported at `imported`."""
    settings, _ = bg.ensure_layout(write_ini(folder, **overrides))
    assert settings.problems == ()
    import_data(settings, folder, loans, imported or at(DAY, 5))
    return settings, bg.Journal(settings.database, Clock(imported or at(DAY, 5)))


def import_data(settings, folder, loans, now, patrons=PATRONS):
    bg.import_csv(settings, "patrons", write_csv(folder / "patrons.csv", PATRON_HEADER, patrons), now=now)
    rows = [[p, b, t, d.isoformat()] for p, b, t, d in loans]
    bg.import_csv(settings, "loans", write_csv(folder / "loans.csv", LOAN_HEADER, rows), now=now)


def queued(settings) -> dict:
    """file name -> parsed message, for every waiting file."""
    return {p.name: email.message_from_bytes(p.read_bytes().replace(b"\r\n", b"\n"),
                                             policy=email.policy.default)
            for p in sorted(settings.spool.glob("*.TMP"))}


def by_kind(settings) -> dict:
    return {name.split("-")[0]: msg for name, msg in queued(settings).items()}


def ledger(settings):
    db = bg.open_db(settings.database)
    try:
        return sorted(tuple(r) for r in db.execute(
            "SELECT patron_id, barcode, kind, due_date FROM notices"))
    finally:
        db.close()


def events(settings, kind):
    db = bg.open_db(settings.database)
    try:
        return [r["detail"] for r in db.execute("SELECT detail FROM events WHERE kind = ? "
                                                "ORDER BY id", (kind,))]
    finally:
        db.close()


# -- one day ---------------------------------------------------------------------

def test_one_message_per_patron_and_kind_listing_all_items(tmp_path):
    settings, journal = setup(tmp_path)
    run = bg.run_overdue(settings, journal, DAY, at(DAY))
    assert [(n.kind, n.patron["patron_id"], len(n.loans)) for n in run.notices] == [
        ("warning", "P1", 2), ("overdue", "P1", 1), ("reminder", "P1", 1)]
    assert (run.no_email, run.not_enabled) == ({"P3"}, {"P2"})
    messages = by_kind(settings)
    assert sorted(messages) == ["overdue", "reminder", "warning"]
    warning = messages["warning"]
    assert warning["To"] == "Ann Smith <ann@example.org>"
    assert warning["Subject"] == "Test School Library: library items due back on 2026-03-05"
    assert warning["Auto-Submitted"] == "auto-generated" and warning["Date"] and warning["Message-ID"]
    body = warning.get_content()
    assert "- Holes (barcode B2), due 2026-03-05\n- Matilda (barcode B1), due 2026-03-05\n" in body
    assert "- Wonder (barcode B3), due 2026-03-01, 1 day overdue" in messages["overdue"].get_content()
    assert "- Coraline (barcode B4), due 2026-02-27, 3 days overdue" in messages["reminder"].get_content()
    assert all("cy.parent" not in str(m) for m in messages.values())      # never the guardian
    assert ledger(settings) == [("P1", "B1", "warning", "2026-03-05"),
                                ("P1", "B2", "warning", "2026-03-05"),
                                ("P1", "B3", "overdue", "2026-03-01"),
                                ("P1", "B4", "reminder", "2026-02-27")]
    assert events(settings, "overdue_run") == [
        "auto-overdue for 2026-03-02 (by hand): queued 1 warning, 1 overdue, 1 reminder "
        "(4 item(s)); not sent: 1 patron(s) without an email address, 1 not enabled for "
        "auto-overdue"]


def test_running_a_day_again_queues_nothing_twice(tmp_path):
    settings, journal = setup(tmp_path)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    for hour in (8, 9, 10):
        again = bg.run_overdue(settings, journal, DAY, at(DAY, hour))
        assert again.notices == []
    assert len(queued(settings)) == 3 and len(ledger(settings)) == 4


def test_a_crash_between_queueing_and_recording_duplicates_nothing(tmp_path, sink):
    settings, journal = setup(tmp_path, **{"smtp__port": sink.port})
    bg.run_overdue(settings, journal, DAY, at(DAY))
    # The sender delivers one of the three (it moves to the sent ledger) ...
    bg.Sender(settings, journal).check(limit=1)
    waiting = sorted(queued(settings))
    assert len(sink.messages) == 1 and len(waiting) == 2
    # ... and the ledger rows are lost, as if the run had died before recording them.
    with journal.db:
        journal.db.execute("DELETE FROM notices")
    again = bg.run_overdue(settings, journal, DAY, at(DAY, 8))
    assert len(again.notices) == 3                     # the run sees them as new ...
    assert sorted(queued(settings)) == waiting          # ... but queues no file again
    assert len(ledger(settings)) == 4                   # and records them
    bg.Sender(settings, journal).check(limit=0)
    assert len(sink.messages) == 3                      # each sent exactly once


def test_a_spool_that_cannot_be_written_loses_nothing(tmp_path):
    settings, journal = setup(tmp_path)
    plan = bg.run_overdue(settings, journal, DAY, at(DAY), dry_run=True)
    blocked = settings.spool / f".{plan.notices[1].file_name(DAY)}{bg.PART_SUFFIX}"
    blocked.mkdir()                  # where a notice's file must go: it cannot be written
    with pytest.raises(bg.SpoolError, match="the notices not queued are queued at the next run"):
        bg.run_overdue(settings, journal, DAY, at(DAY))
    assert queued(settings) == {} and ledger(settings) == []
    assert list(settings.spool.glob(".*.part")) == [blocked]        # no half-written file left
    blocked.rmdir()
    assert len(bg.run_overdue(settings, journal, DAY, at(DAY, 8)).notices) == 3
    assert len(queued(settings)) == 3 and len(ledger(settings)) == 4


def test_a_renewal_is_a_new_notice_and_a_returned_loan_gets_none(tmp_path):
    settings, journal = setup(tmp_path)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    # Next day's snapshot: Matilda renewed to a week later, Holes returned.
    renewed = [["P1", "B1", "Matilda", days(10)]] + [r for r in LOANS if r[1] not in ("B1", "B2")]
    import_data(settings, tmp_path, renewed, at(days(1), 5))
    assert bg.run_overdue(settings, journal, DAY, at(days(1))).notices == []
    import_data(settings, tmp_path, renewed, at(days(7), 5))
    run = bg.run_overdue(settings, journal, days(7), at(days(7)))   # 3 days before the new date
    assert [(n.kind, [l["barcode"] for l in n.loans]) for n in run.notices] == [("warning", ["B1"])]
    assert ("P1", "B1", "warning", days(10).isoformat()) in ledger(settings)
    # Returned: Wonder (B3) was overdue on DAY, and its reminder is due on day +2 ...
    dry = bg.run_overdue(settings, journal, days(2), at(days(8)), dry_run=True)
    assert [(n.kind, [l["barcode"] for l in n.loans]) for n in dry.notices] == [("reminder", ["B3"])]
    # ... but it came back first: the snapshot no longer has it, and no reminder goes.
    import_data(settings, tmp_path, [r for r in renewed if r[1] != "B3"], at(days(8), 5))
    assert bg.run_overdue(settings, journal, days(2), at(days(8))).notices == []


def test_a_name_with_cr_lf_cannot_add_a_header(tmp_path, sink):
    settings, journal = setup(tmp_path, **{"smtp__port": sink.port})
    with journal.db:
        journal.db.execute("UPDATE patrons SET name = ? WHERE patron_id = 'P1'",
                           ("Ann\r\nBcc: evil@example.org\r\nSubject: pwned",))
    bg.run_overdue(settings, journal, DAY, at(DAY))
    for msg in queued(settings).values():
        assert msg["Bcc"] is None and len(msg.get_all("Subject")) == 1
        assert len(msg.get_all("To")) == 1 and msg["To"].addresses[0].addr_spec == "ann@example.org"
    assert bg.Sender(settings, journal).check(limit=0).sent == 3
    assert {tuple(m.rcpt_tos) for m in sink.messages} == {("ann@example.org",)}
    body = sink.messages[0].message.get_content()
    assert "Dear Ann Bcc: evil@example.org Subject: pwned," in body


def test_stale_loans_are_refused_loudly(tmp_path):
    settings, journal = setup(tmp_path, imported=at(DAY) - 37 * 3600)
    with pytest.raises(bg.StaleData) as caught:
        bg.run_overdue(settings, journal, DAY, at(DAY))
    assert "imported 37 hours ago" in str(caught.value)
    assert "max_data_age_hours = 36" in str(caught.value)
    assert queued(settings) == {} and ledger(settings) == []
    dry = bg.run_overdue(settings, journal, DAY, at(DAY), dry_run=True)   # a dry run still shows
    assert len(dry.notices) == 3 and queued(settings) == {}


def test_no_loans_imported_yet_is_refused(tmp_path):
    settings, _ = bg.ensure_layout(write_ini(tmp_path))
    with pytest.raises(bg.StaleData, match="no loans have been imported yet"):
        bg.run_overdue(settings, bg.Journal(settings.database), DAY, at(DAY))


def test_dates_in_messages_follow_date_format(tmp_path):
    settings, journal = setup(tmp_path, library__date_format="%d/%m/%Y")
    bg.run_overdue(settings, journal, DAY, at(DAY))
    body = by_kind(settings)["overdue"].get_content()
    assert "- Wonder (barcode B3), due 01/03/2026, 1 day overdue" in body
    assert "Our records on 02/03/2026" in body


def test_render_items_and_notice_values(tmp_path):
    settings, _ = bg.ensure_layout(write_ini(tmp_path, library__date_format="%d.%m.%Y"))
    loans = [{"title": "Holes", "barcode": "B2", "due_date": "2026-03-05"},
             {"title": "Wonder\r\n", "barcode": "B3", "due_date": "2026-02-20"}]
    assert bg.render_items(loans, settings, DAY) == (
        "- Holes (barcode B2), due 05.03.2026\n- Wonder (barcode B3), due 20.02.2026, 10 days overdue")
    values = bg.notice_values(settings, {"patron_id": "P1", "name": "Ann\nSmith"}, loans, DAY)
    assert values == {"library_name": "Test School Library", "patron_name": "Ann Smith",
                      "patron_id": "P1", "items": bg.render_items(loans, settings, DAY),
                      "item_count": 2, "today": "02.03.2026", "earliest_due": "20.02.2026"}
    assert set(values) == bg.NOTICE_FIELDS


# -- the daily schedule ----------------------------------------------------------

def gateway_at(folder, clock, **overrides):
    overrides.setdefault("overdue__enabled", True)
    return bg.Gateway(write_ini(folder, **overrides), clock=clock)


def day_of(detail: str) -> str:
    return re.search(r"auto-overdue for (\d{4}-\d\d-\d\d)", detail)[1]


def overdue_days_run(settings):
    return [day_of(d) for d in events(settings, "overdue_run")]


def test_the_first_run_waits_for_run_at_and_never_goes_back(tmp_path):
    clock = Clock(at(DAY, 6, 0))
    settings, _ = setup(tmp_path, imported=at(DAY, 5))
    gateway = gateway_at(tmp_path, clock)
    bg.overdue_task(gateway, clock())
    assert overdue_days_run(settings) == []            # 06:00: not yet; yesterday: never
    clock.now = at(DAY, 6, 30)
    bg.overdue_task(gateway, clock())
    bg.overdue_task(gateway, clock())
    assert overdue_days_run(settings) == ["2026-03-02"]
    assert "(scheduled)" in events(settings, "overdue_run")[0]
    assert len(queued(settings)) == 3
    activity = bg.daily_summary(gateway, "2026-03-02")["activity"]     # in the daily log
    assert "auto-overdue for 2026-03-02 (scheduled): queued 1 warning, 1 overdue, 1 reminder" \
        in activity


def test_days_missed_while_off_are_caught_up_with_true_dates(tmp_path):
    loans = LOANS + [["P1", "B8", "Paddington", days(2)]]   # due Wednesday, overdue Thursday
    settings, _ = setup(tmp_path, loans=loans, imported=at(DAY, 5))
    clock = Clock(at(DAY, 7))
    bg.overdue_task(gateway_at(tmp_path, clock), clock())      # Monday, then off
    # Friday: the nightly export arrived; the gateway starts again at 09:00.
    import_data(settings, tmp_path, loans, at(days(4), 5))
    clock.now = at(days(4), 9)
    bg.overdue_task(gateway_at(tmp_path, clock), clock())
    assert overdue_days_run(settings) == ["2026-03-02", "2026-03-03", "2026-03-04",
                                          "2026-03-05", "2026-03-06"]
    details = events(settings, "overdue_run")
    assert "(caught up)" in details[1] and "(scheduled)" in details[4]
    late = [m for n, m in queued(settings).items() if n.startswith("overdue-2026-03-05")]
    body = late[0].get_content()         # written on Friday: the true count of days
    assert "- Paddington (barcode B8), due 2026-03-04, 2 days overdue" in body
    assert "Our records on 2026-03-06" in body
    bg.overdue_task(gateway_at(tmp_path, clock), clock())       # and only once
    assert len(events(settings, "overdue_run")) == 5


def test_a_warning_caught_up_after_its_due_date_is_left_out(tmp_path):
    settings, journal = setup(tmp_path, imported=at(days(5), 5))
    run = bg.run_overdue(settings, journal, DAY, at(days(5)), how="caught up")
    assert [n.kind for n in run.notices] == ["overdue", "reminder"]
    assert run.too_late == 3 and "3 warning(s) for items already past due" in run.summary()


def test_catch_up_goes_back_at_most_a_week():
    now = dt.datetime.combine(days(14), dt.time(7))
    assert bg.days_to_run(days(0).isoformat(), now, dt.time(6, 30)) == [days(n) for n in range(7, 15)]
    assert bg.days_to_run(days(13).isoformat(), now, dt.time(6, 30)) == [days(14)]
    assert bg.days_to_run(days(13).isoformat(), now, dt.time(8, 0)) == []
    assert bg.days_to_run(days(14).isoformat(), now, dt.time(6, 30)) == []
    assert bg.days_to_run(None, now, dt.time(6, 30)) == [days(14)]
    assert bg.days_to_run(None, now, dt.time(8, 0)) == []


def test_closed_days_have_no_run(tmp_path):
    settings, _ = setup(tmp_path, imported=at(days(6), 5))
    clock = Clock(at(DAY - dt.timedelta(days=1), 7))
    gateway = gateway_at(tmp_path, clock, overdue__closed="sat, Sunday, 2026-03-03..2026-03-04")
    bg.overdue_task(gateway, clock())                  # Sunday 1 March: closed
    clock.now = at(days(6), 7)                         # the next Sunday
    bg.overdue_task(gateway, clock())
    ran = events(settings, "overdue_run")
    closed = [day_of(d) for d in ran if "closed" in d]
    assert closed == ["2026-03-01", "2026-03-03", "2026-03-04", "2026-03-07", "2026-03-08"]
    assert [day_of(d) for d in ran if "queued" in d] == ["2026-03-02", "2026-03-05", "2026-03-06"]
    assert {tuple(n.split("-", 4)[:4]) for n in queued(settings)} == {
        ("overdue", "2026", "03", "02"), ("reminder", "2026", "03", "02"),
        ("overdue", "2026", "03", "06")}


def test_disabled_means_no_run_and_enabling_starts_afresh(tmp_path):
    settings, _ = setup(tmp_path)
    clock = Clock(at(DAY, 7))
    bg.overdue_task(gateway_at(tmp_path, clock, overdue__enabled=False), clock())
    assert overdue_days_run(settings) == []
    bg.overdue_task(gateway_at(tmp_path, clock), clock())
    clock.now = at(days(3), 7)
    bg.overdue_task(gateway_at(tmp_path, clock, overdue__enabled=False), clock())
    import_data(settings, tmp_path, LOANS, at(days(5), 5))
    clock.now = at(days(5), 7)
    bg.overdue_task(gateway_at(tmp_path, clock), clock())
    assert overdue_days_run(settings) == ["2026-03-02", "2026-03-07"]   # not the days it was off


def test_stale_data_holds_the_schedule_says_so_once_then_catches_up(tmp_path):
    settings, _ = setup(tmp_path, imported=at(DAY) - 40 * 3600)
    clock = Clock(at(DAY, 7))
    gateway = gateway_at(tmp_path, clock)
    for minute in range(0, 30, 6):          # tried every 5 minutes; said once
        clock.now = at(DAY, 7, minute)
        bg.overdue_task(gateway, clock())
    refused = events(settings, "overdue_refused")
    assert len(refused) == 1 and "imported 40 hours ago" in refused[0]
    held = json.loads(gateway.journal.db.execute(
        "SELECT value FROM state WHERE key = 'overdue_held'").fetchone()[0])
    assert held[3] == at(DAY, 7, 24) + bg.HOLD_SECONDS
    assert queued(settings) == {}
    status = bg.status_auto_overdue(gateway.settings, gateway.journal.db)
    assert "HELD BACK" in status and "max_data_age_hours" in status
    assert "imported 40 hours ago" in bg.daily_summary(gateway, "2026-03-02")["activity"]
    import_data(settings, tmp_path, LOANS, at(DAY, 8))           # the export arrives
    clock.now = at(DAY, 8, 1)
    bg.overdue_task(gateway, clock())
    assert overdue_days_run(settings) == ["2026-03-02"] and len(queued(settings)) == 3
    assert "HELD BACK" not in bg.status_auto_overdue(gateway.settings, gateway.journal.db)


def test_run_tick_imports_then_runs_then_the_sender_delivers(tmp_path, sink):
    """The whole way: a loans.csv dropped in the import folder before run_at,
    the daily run, and the sender relaying the notices to a real SMTP server."""
    clock = Clock(at(DAY, 6, 20))
    gateway = gateway_at(tmp_path, clock, smtp__port=sink.port)
    folder = gateway.settings.import_folder
    folder.mkdir(exist_ok=True)
    (folder / "patrons.csv").write_text(csv_text(PATRON_HEADER, PATRONS), encoding="utf-8")
    rows = [[p, b, t, d.isoformat()] for p, b, t, d in LOANS]
    (folder / "loans.csv").write_text(csv_text(LOAN_HEADER, rows), encoding="utf-8")
    for minute in range(20, 33):                       # 06:20 to 06:32, a tick a minute
        clock.now = at(DAY, 6, minute)
        gateway.tick()
        gateway.next_check = clock.now                 # check the spool at every tick
    messages = sink.wait_for(3)
    assert {m.message["Subject"] for m in messages} == {
        "Test School Library: library items due back on 2026-03-05",
        "Test School Library: overdue library items",
        "Test School Library: reminder, library items still overdue"}
    warning = [m for m in messages if "due back" in m.message["Subject"]][0]
    assert warning.rcpt_tos == ["ann@example.org"]
    assert warning.message.get_content() == (
        "Dear Ann Smith,\n\n"
        "This is a friendly reminder from Test School Library: these items on your\n"
        "library account are due back soon.\n\n"
        "- Holes (barcode B2), due 2026-03-05\n"
        "- Matilda (barcode B1), due 2026-03-05\n\n"
        "Please bring them back, or ask at the library desk to renew them, by the\n"
        "date shown.\n\n"
        "Thank you,\nTest School Library\n\n"
        "(Sent automatically for library account P1.)\n")
    assert list(gateway.settings.spool.glob("*.TMP")) == []


# -- settings and templates ------------------------------------------------------

@pytest.mark.parametrize("key, value, words", [
    ("closed", "sat, fryday", "'fryday' is not a weekday"),
    ("closed", "2026-12-18..2026-12-01", "ends before it starts"),
    ("closed", "2026-02-30", "'2026-02-30' is not a weekday"),
    ("closed", "2026-12-18..xmas", "not a range of dates"),
    ("run_at", "6:75", "not a time of day"),
    ("run_at", "half past six", "HH:MM"),
    ("enabled", "maybe", "must be yes or no"),
    ("warning_days", "-1", "out of range"),
    ("reminder_days", "three", "not a number"),
    ("max_data_age_hours", "0", "out of range"),
])
def test_bad_overdue_settings_name_the_key_and_the_fix(tmp_path, key, value, words):
    settings = bg.load_settings(write_ini(tmp_path, **{f"overdue__{key}": value}))
    problems = [p for p in settings.problems if f"[overdue] {key} = {value!r}" in p]
    assert len(problems) == 1 and words in problems[0]
    assert settings.overdue.problems == tuple(problems)
    with pytest.raises(bg.SettingsError):
        bg.run_overdue(settings, bg.Journal(settings.database), DAY, at(DAY))


def test_good_overdue_settings_are_read(tmp_path):
    settings = bg.load_settings(write_ini(
        tmp_path, overdue__enabled="Yes", overdue__run_at="7:05", overdue__warning_days=0,
        overdue__closed="sat,SUN  2026-04-03, 2026-12-18 .. 2027-01-28"))
    ov = settings.overdue
    assert settings.problems == ()
    assert (ov.enabled, ov.run_at, ov.warning_days) == (True, dt.time(7, 5), 0)
    assert ov.closed(dt.date(2026, 3, 7)) and ov.closed(dt.date(2026, 3, 8))
    assert ov.closed(dt.date(2026, 4, 3)) and ov.closed(dt.date(2027, 1, 1))
    assert not ov.closed(dt.date(2026, 4, 2)) and not ov.closed(dt.date(2027, 1, 29))


def test_a_date_format_that_cannot_read_its_own_dates_is_refused(tmp_path):
    settings = bg.load_settings(write_ini(tmp_path, library__date_format="%d/%m"))
    assert any("[library] date_format = '%d/%m'" in p and "read back" in p
               for p in settings.problems)


def test_repo_templates_are_the_defaults():
    for kind, text in bg.DEFAULT_TEMPLATES.items():
        assert (REPO / "templates" / f"{kind}.txt").read_text(encoding="utf-8") == text, kind


@pytest.mark.parametrize("kind", bg.NOTICE_KINDS)
def test_notice_templates_list_their_placeholders_and_check(kind, tmp_path):
    text = bg.DEFAULT_TEMPLATES[kind]
    notes = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    assert text.startswith("# ")
    for field in bg.NOTICE_FIELDS:
        assert "${%s}" % field in notes
    bg.parse_template(kind, text, Path(f"{kind}.txt"))


# -- the commands ----------------------------------------------------------------

def gateway_with_data(gateway, tmp_path, imported):
    settings = bg.load_settings(gateway.ini)
    today = dt.date.today()
    rows = [["P1", "B1", "Matilda", today + dt.timedelta(days=3)],
            ["P1", "B3", "Wonder", today - dt.timedelta(days=1)]]
    import_data(settings, tmp_path, rows, imported)
    return settings


def test_dry_run_prints_who_would_get_what_and_changes_nothing(gateway, tmp_path):
    settings = gateway_with_data(gateway, tmp_path, time.time())
    proc = gateway.cli("overdue", "--dry-run", check=0)
    assert "warning to Ann Smith <ann@example.org> (P1):\n    - Matilda (barcode B1)" in proc.stdout
    assert "overdue to Ann Smith" in proc.stdout and "1 day overdue" in proc.stdout
    assert "would queue 1 warning, 1 overdue, 0 reminder" in proc.stdout
    assert queued(settings) == {} and ledger(settings) == []
    assert events(settings, "overdue_run") == []


def test_overdue_date_runs_that_day_alone_and_status_shows_it(gateway, tmp_path):
    settings = gateway_with_data(gateway, tmp_path, time.time())
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    proc = gateway.cli("overdue", "--date", tomorrow, check=0)
    assert proc.stdout.startswith(f"auto-overdue for {tomorrow} (by hand): queued 0 warning, "
                                  "0 overdue, 0 reminder")
    proc = gateway.cli("overdue", check=0)          # today, although enabled = no
    assert "queued 1 warning, 1 overdue, 0 reminder" in proc.stdout
    assert len(queued(settings)) == 2
    info = json.loads(gateway.cli("status", "--json").stdout)
    assert info["last_overdue_run"].startswith(f"auto-overdue for {dt.date.today()} (by hand): "
                                               "queued 1 warning")
    assert info["loans_data"].startswith("2 loans, imported ")
    assert info["auto_overdue"].startswith("off")
    assert "YYYY-MM-DD" in gateway.cli("overdue", "--date", "2026-02-30", check=2).stderr


def test_overdue_command_refuses_stale_data(gateway, tmp_path):
    settings = gateway_with_data(gateway, tmp_path, time.time() - 50 * 3600)
    proc = gateway.cli("overdue", check=1)
    assert "Auto-overdue did not run: the loans were imported 50 hours ago" in proc.stderr
    assert queued(settings) == {}
    assert "TOO OLD FOR AUTO-OVERDUE" in gateway.cli("status").stdout
    assert len(events(settings, "overdue_refused")) == 1
