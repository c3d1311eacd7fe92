"""The auto-overdue job: which notices, to whom, once only, on which days.

A real sqlite file and the real spool in tmp_path; "now" is injected (the
run's `now` argument, and the Gateway's clock), so days pass without waiting."""

import dataclasses
import datetime as dt
import email
import email.policy
import email.utils
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

def test_one_message_per_patron_holding_every_kind_grouped(tmp_path):
    settings, journal = setup(tmp_path)
    run = bg.run_overdue(settings, journal, DAY, at(DAY))
    [notice] = run.notices
    assert notice.kind == "overdue" and notice.patron["patron_id"] == "P1"
    assert (run.no_email, run.not_enabled) == ({"P3"}, {"P2"})
    [(name, msg)] = queued(settings).items()
    assert name.startswith("overdue-2026-03-02-")
    assert msg["To"] == "Ann Smith <ann@example.org>"
    assert msg["Subject"] == "Library books to bring back"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["Date"] and msg["Message-ID"]
    body = msg.get_content()
    assert body.startswith("Dear Ann,\n")
    # Coraline's reminder day is today, but no overdue notice ever went for
    # it: it is listed as newly overdue, not with "we wrote to you".
    assert ("Now overdue:\n- Coraline, due 2026-02-27, 3 days overdue\n"
            "- Wonder, due 2026-03-01, 1 day overdue\n\n"
            "Due back soon:\n- Holes, due 2026-03-05\n- Matilda, due 2026-03-05\n") in body
    assert "barcode" not in body and "P1" not in body and "Still overdue" not in body
    assert all("cy.parent" not in str(m) for m in queued(settings).values())  # send_to = patron
    assert ledger(settings) == [("P1", "B1", "warning", "2026-03-05"),
                                ("P1", "B2", "warning", "2026-03-05"),
                                ("P1", "B3", "overdue", "2026-03-01"),
                                ("P1", "B4", "overdue", "2026-02-27"),
                                ("P1", "B4", "reminder", "2026-02-27")]
    assert events(settings, "overdue_run") == [
        "auto-overdue for 2026-03-02 (by hand, notices due 2026-03-02): queued 1 message "
        "(2 due soon, 2 newly overdue, 0 reminders); not sent: 1 not enabled for auto-overdue, "
        "1 could not be reached (Cy Young (P3, 7B): no email address)"]


def test_a_reminder_says_we_wrote_only_after_an_overdue_notice_and_lists_everything(tmp_path):
    settings, journal = setup(tmp_path, loans=[["P1", "B3", "Wonder", days(-1)],
                                               ["P1", "B9", "Old One", days(-20)]])
    bg.run_overdue(settings, journal, DAY, at(DAY))
    import_data(settings, tmp_path, [["P1", "B3", "Wonder", days(-1)],
                                     ["P1", "B9", "Old One", days(-20)],
                                     ["P1", "B5", "New One", days(1)]], at(days(2), 5))
    for path in settings.spool.glob("*.TMP"):
        path.unlink()
    run = bg.run_overdue(settings, journal, days(2), at(days(2)))
    [notice] = run.notices
    assert notice.kind == "reminder"
    body = next(iter(queued(settings).values())).get_content()
    assert ("Now overdue:\n- New One, due 2026-03-03, 1 day overdue\n\n"
            "Still overdue (we wrote to you about these before):\n"
            "- Wonder, due 2026-03-01, 3 days overdue (we wrote on 2026-03-02)\n\n"
            "Also overdue:\n- Old One, due 2026-02-10, 22 days overdue\n") in body
    assert "We wrote to you about your library books" in body


def test_running_a_day_again_queues_nothing_twice(tmp_path):
    settings, journal = setup(tmp_path)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    for hour in (8, 9, 10):
        again = bg.run_overdue(settings, journal, DAY, at(DAY, hour))
        assert again.notices == []
    assert len(queued(settings)) == 1 and len(ledger(settings)) == 5


def enable_bob(journal):
    with journal.db:
        journal.db.execute("UPDATE patrons SET auto_overdue = 1 WHERE patron_id = 'P2'")


def test_a_crash_between_queueing_and_recording_duplicates_nothing(tmp_path, sink):
    settings, journal = setup(tmp_path, **{"smtp__port": sink.port})
    enable_bob(journal)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    # The sender delivers one of the two (it moves to the sent ledger) ...
    bg.Sender(settings, journal).check(limit=1)
    waiting = sorted(queued(settings))
    assert len(sink.messages) == 1 and len(waiting) == 1
    # ... and the ledger rows are lost, as if the run had died before recording them.
    with journal.db:
        journal.db.execute("DELETE FROM notices")
    again = bg.run_overdue(settings, journal, DAY, at(DAY, 8))
    assert len(again.notices) == 2                     # the run sees them as new ...
    assert sorted(queued(settings)) == waiting          # ... but queues no file again
    assert len(ledger(settings)) == 6                   # and records them
    bg.Sender(settings, journal).check(limit=0)
    assert len(sink.messages) == 2                      # each sent exactly once


def test_a_spool_that_cannot_be_written_loses_nothing(tmp_path):
    settings, journal = setup(tmp_path)
    enable_bob(journal)
    plan = bg.run_overdue(settings, journal, DAY, at(DAY), dry_run=True)
    blocked = settings.spool / f".{plan.notices[1].file_name(DAY)}{bg.PART_SUFFIX}"
    blocked.mkdir()                  # where a notice's file must go: it cannot be written
    with pytest.raises(bg.SpoolError, match="the notices not queued are queued at the next run"):
        bg.run_overdue(settings, journal, DAY, at(DAY))
    assert queued(settings) == {} and ledger(settings) == []
    assert list(settings.spool.glob(".*.part")) == [blocked]        # no half-written file left
    blocked.rmdir()
    assert len(bg.run_overdue(settings, journal, DAY, at(DAY, 8)).notices) == 2
    assert len(queued(settings)) == 2 and len(ledger(settings)) == 6


def kinds(run):
    return sorted((kind, loan["barcode"]) for n in run.notices for kind, loan, _ in n.records)


def test_a_renewal_is_a_new_notice_and_a_returned_loan_gets_none(tmp_path):
    settings, journal = setup(tmp_path)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    # Next day's snapshot: Matilda renewed to a week later, Holes returned.
    renewed = [["P1", "B1", "Matilda", days(10)]] + [r for r in LOANS if r[1] not in ("B1", "B2")]
    import_data(settings, tmp_path, renewed, at(days(1), 5))
    assert bg.run_overdue(settings, journal, DAY, at(days(1))).notices == []
    import_data(settings, tmp_path, renewed, at(days(7), 5))
    run = bg.run_overdue(settings, journal, days(7), at(days(7)))   # 3 days before the new date
    assert kinds(run) == [("warning", "B1")]
    assert ("P1", "B1", "warning", days(10).isoformat()) in ledger(settings)
    # Returned: Wonder (B3) was overdue on DAY, and its reminder is due on day +2 ...
    dry = bg.run_overdue(settings, journal, days(2), at(days(2), 5), dry_run=True)
    assert kinds(dry) == [("reminder", "B3")]
    # ... but it came back first: the snapshot no longer has it, and no reminder goes.
    import_data(settings, tmp_path, [r for r in renewed if r[1] != "B3"], at(days(2), 5))
    assert bg.run_overdue(settings, journal, days(2), at(days(2))).notices == []


def test_a_name_with_cr_lf_cannot_add_a_header(tmp_path, sink):
    settings, journal = setup(tmp_path, **{"smtp__port": sink.port})
    with journal.db:
        journal.db.execute("UPDATE patrons SET name = ? WHERE patron_id = 'P1'",
                           ("Ann\r\nBcc: evil@example.org\r\nSubject: pwned",))
    bg.run_overdue(settings, journal, DAY, at(DAY))
    for msg in queued(settings).values():
        assert msg["Bcc"] is None and len(msg.get_all("Subject")) == 1
        assert len(msg.get_all("To")) == 1 and msg["To"].addresses[0].addr_spec == "ann@example.org"
    assert bg.Sender(settings, journal).check(limit=0).sent == 1
    assert {tuple(m.rcpt_tos) for m in sink.messages} == {("ann@example.org",)}
    body = sink.messages[0].message.get_content()
    assert body.startswith("Dear Ann,\n")            # the first name: the part before a space


def test_stale_loans_are_refused_loudly(tmp_path):
    settings, journal = setup(tmp_path, imported=at(DAY) - 37 * 3600)
    with pytest.raises(bg.StaleData) as caught:
        bg.run_overdue(settings, journal, DAY, at(DAY))
    assert "imported 37 hours ago" in str(caught.value)
    assert "max_data_age_hours = 36" in str(caught.value)
    assert queued(settings) == {} and ledger(settings) == []
    dry = bg.run_overdue(settings, journal, DAY, at(DAY), dry_run=True)   # a dry run still shows
    assert len(dry.notices) == 1 and queued(settings) == {}


def test_no_loans_imported_yet_is_refused(tmp_path):
    settings, _ = bg.ensure_layout(write_ini(tmp_path))
    with pytest.raises(bg.StaleData, match="no loans have been imported yet"):
        bg.run_overdue(settings, bg.Journal(settings.database), DAY, at(DAY))


def test_dates_in_messages_follow_date_format(tmp_path):
    settings, journal = setup(tmp_path, library__date_format="%d/%m/%Y")
    bg.run_overdue(settings, journal, DAY, at(DAY))
    body = by_kind(settings)["overdue"].get_content()
    assert "- Wonder, due 01/03/2026, 1 day overdue" in body
    assert "Our records on 02/03/2026" in body


def test_render_items_and_notice_values(tmp_path):
    settings, _ = bg.ensure_layout(write_ini(tmp_path, library__date_format="%d.%m.%Y"))
    loans = [{"title": "Holes", "barcode": "B2", "due_date": "2026-03-05"},
             {"title": "Wonder\r\n", "barcode": "B3", "due_date": "2026-02-20"}]
    assert bg.render_items(loans, settings, DAY) == (
        "- Holes (barcode B2), due 05.03.2026\n- Wonder (barcode B3), due 20.02.2026, 10 days overdue")
    assert bg.render_items(loans, settings, DAY, barcodes=False) == (
        "- Holes, due 05.03.2026\n- Wonder, due 20.02.2026, 10 days overdue")
    values = bg.notice_values(settings, {"patron_id": "P1", "name": "Ann\nSmith"}, loans, DAY)
    assert values == {"library_name": "Test School Library", "patron_name": "Ann Smith",
                      "first_name": "Ann", "patron_id": "P1",
                      "items": bg.render_items(loans, settings, DAY),
                      "items_with_barcodes": bg.render_items(loans, settings, DAY),
                      "item_count": 2, "item_word": "items", "book_word": "books",
                      "it_them": "them", "is_are": "are", "this_these": "these",
                      "today": "02.03.2026", "earliest_due": "20.02.2026"}
    assert set(values) <= bg.NOTICE_FIELDS
    one = bg.notice_values(settings, {"patron_id": "P1", "name": "Ann Smith",
                                      "first_name": "Annie"}, loans[:1], DAY)
    assert (one["first_name"], one["book_word"], one["it_them"], one["is_are"]) == \
        ("Annie", "book", "it", "is")


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
    assert "(scheduled, notices due 2026-03-02)" in events(settings, "overdue_run")[0]
    assert len(queued(settings)) == 1
    activity = bg.daily_summary(gateway, "2026-03-02")["activity"]     # in the daily log
    assert "auto-overdue for 2026-03-02 (scheduled, notices due 2026-03-02): queued 1 message" \
        in activity


def test_days_missed_while_off_are_caught_up_in_one_message_with_true_dates(tmp_path):
    loans = LOANS + [["P1", "B8", "Paddington", days(2)]]   # due Wednesday, overdue Thursday
    settings, _ = setup(tmp_path, loans=loans, imported=at(DAY, 5))
    clock = Clock(at(DAY, 7))
    bg.overdue_task(gateway_at(tmp_path, clock), clock())      # Monday, then off
    # Friday: the nightly export arrived; the gateway starts again at 09:00.
    import_data(settings, tmp_path, loans, at(days(4), 5))
    clock.now = at(days(4), 9)
    bg.overdue_task(gateway_at(tmp_path, clock), clock())
    assert overdue_days_run(settings) == ["2026-03-02", "2026-03-06"]
    details = events(settings, "overdue_run")
    assert "(caught up, notices due 2026-03-03..2026-03-06)" in details[1]
    [late] = [m for n, m in queued(settings).items() if "2026-03-06" in n]
    body = late.get_content()         # written on Friday: the true count of days
    assert "records on 2026-03-06" in body
    lines = body.splitlines()
    assert lines.count("- Paddington, due 2026-03-04, 2 days overdue") == 1
    assert "- Wonder, due 2026-03-01, 5 days overdue (we wrote on 2026-03-02)" in lines
    assert "Still overdue (we wrote to you about these before):" in lines
    bg.overdue_task(gateway_at(tmp_path, clock), clock())       # and only once
    assert len(events(settings, "overdue_run")) == 2


def test_a_warning_caught_up_after_its_due_date_is_left_out(tmp_path):
    settings, journal = setup(tmp_path, imported=at(days(4), 5))
    ov = settings.overdue
    window = bg.run_window(ov, days(4), DAY - dt.timedelta(days=1))
    run = bg.run_overdue(settings, journal, days(4), at(days(4)), how="caught up", window=window)
    assert ("warning", "B1") not in kinds(run) and ("overdue", "B1") in kinds(run)
    assert run.too_late == 2 and "2 warning(s) for items already past due" in run.summary()


def test_the_window_of_a_run():
    weekends = bg.OverdueSettings(closed_weekdays=frozenset({5, 6}))
    monday = days(14)
    assert bg.run_window(weekends, monday, None) == bg.Window(monday, days(11), days(15))
    assert bg.run_window(weekends, monday, days(11)) == bg.Window(monday, days(11), days(15))
    assert bg.run_window(weekends, monday, days(0)).after == days(7)     # a week back at most
    friday = days(11)
    assert bg.run_window(weekends, friday, days(10)) == bg.Window(friday, days(10), days(14))
    holiday = dataclasses.replace(weekends, closed_dates=((days(1), days(11)),))
    # The first open day after a holiday covers all of it, however long.
    assert bg.run_window(holiday, monday, days(0)) == bg.Window(monday, days(0), days(15))
    ranges = bg.run_window(weekends, friday, days(10)).due_ranges(weekends)
    # Friday's warnings: their day is Friday, Saturday or Sunday (due Mon to Wed).
    assert ranges["warning"] == (days(14), days(16))
    assert ranges["overdue"] == (days(10), days(10)) and ranges["reminder"] == (days(8), days(8))


def test_closed_days_move_notices_to_the_next_run_and_warnings_before(tmp_path):
    loans = LOANS + [["P1", "B8", "Bedtime", days(6)],       # due Sunday: warned Thursday
                     ["P1", "B9", "Early", days(4)]]         # warning day Tuesday (closed): Monday
    settings, _ = setup(tmp_path, loans=loans, imported=at(days(4), 5))
    clock = Clock(at(DAY - dt.timedelta(days=1), 7))
    gateway = gateway_at(tmp_path, clock, overdue__closed="sat, Sunday, 2026-03-03..2026-03-04")
    for n in range(-1, 5):                                    # Sunday to Friday, 07:00
        clock.now = at(days(n), 7)
        bg.overdue_task(gateway, clock())
    closed = [re.search(r"no run on (\S+),", d)[1] for d in events(settings, "overdue_closed")]
    assert closed == ["2026-03-01", "2026-03-03", "2026-03-04"]
    assert "overdue notices and reminders falling due today go on 2026-03-05" \
        in events(settings, "overdue_closed")[1]
    assert overdue_days_run(settings) == ["2026-03-02", "2026-03-05", "2026-03-06"]
    by_day = {}
    for name, msg in queued(settings).items():
        by_day[name.split("-", 1)[1][:10]] = msg.get_content()
    assert "- Early, due 2026-03-06" in by_day["2026-03-02"]            # warned early
    assert "- Matilda, due 2026-03-05" in by_day["2026-03-02"]
    # Wonder's reminder day was Wednesday (closed): it goes on Thursday.
    assert "- Wonder, due 2026-03-01, 4 days overdue (we wrote on 2026-03-02)" in by_day["2026-03-05"]
    assert "Due back soon:\n- Bedtime, due 2026-03-08" in by_day["2026-03-05"]
    assert "Now overdue:\n- Holes, due 2026-03-05, 1 day overdue" in by_day["2026-03-06"]
    assert len(ledger(settings)) == 10


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
    assert overdue_days_run(settings) == ["2026-03-02"] and len(queued(settings)) == 1
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
    [message] = sink.wait_for(1)
    assert message.rcpt_tos == ["ann@example.org"]
    assert message.message["Subject"] == "Library books to bring back"
    assert message.message.get_content() == (
        "Dear Ann,\n\n"
        "Our records on 2026-03-02 show that your library books below\n"
        "are late back.\n\n"
        "Now overdue:\n"
        "- Coraline, due 2026-02-27, 3 days overdue\n"
        "- Wonder, due 2026-03-01, 1 day overdue\n\n"
        "Due back soon:\n"
        "- Holes, due 2026-03-05\n"
        "- Matilda, due 2026-03-05\n\n"
        "Please bring them back to the library as soon as you can. If you\n"
        "have already brought them back, thank you, and please ignore this\n"
        "message. If something is lost or damaged, just come and tell us.\n\n"
        "Test School Library\n")
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
    assert "overdue message to Ann Smith <ann@example.org> (P1):\n    Now overdue:\n" \
           "    - Wonder, due " in proc.stdout
    assert "Due back soon:\n    - Matilda, due" in proc.stdout
    assert "would queue 1 message (1 due soon, 1 newly overdue, 0 reminders)" in proc.stdout
    assert queued(settings) == {} and ledger(settings) == []
    assert events(settings, "overdue_run") == []


def test_overdue_date_runs_that_day_alone_and_status_shows_it(gateway, tmp_path):
    settings = gateway_with_data(gateway, tmp_path, time.time())
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    proc = gateway.cli("overdue", "--date", tomorrow, check=0)
    assert proc.stdout.startswith(f"auto-overdue for {tomorrow} (by hand, notices due "
                                  f"{tomorrow}): queued 0 messages")
    proc = gateway.cli("overdue", check=0)          # today, although enabled = no
    assert "queued 1 message (1 due soon, 1 newly overdue, 0 reminders)" in proc.stdout
    assert len(queued(settings)) == 1
    info = json.loads(gateway.cli("status", "--json").stdout)
    assert info["last_overdue_run"].startswith(f"auto-overdue for {dt.date.today()} (by hand, "
                                               f"notices due {dt.date.today()}): queued 1 message")
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


# -- who receives the notices: [overdue] send_to -----------------------------------

FAMILY = [
    ["P1", "Ann Smith", "ann@example.org", "ann.mum@example.org", "7A", "yes"],
    ["P2", "Bob Jones", "bob@example.org", "", "7A", "yes"],
    ["P3", "Cy Young", "", "cy.parent@example.org", "7B", "yes"],
    ["P4", "Di Lost", "", "", "7B", "yes"],
    ["P5", "Ed Typo", "", "", "7C", "yes"],       # its address is made 'ed@' below
]


def typo(db):
    with db:
        db.execute("UPDATE patrons SET email = 'ed@' WHERE patron_id = 'P5'")
FAMILY_LOANS = [[pid, f"B{pid}", f"Book of {pid}", days(-1)] for pid, *_ in FAMILY]


def send_to(tmp_path, sink, choice):
    settings, _ = bg.ensure_layout(write_ini(tmp_path, sink, overdue__send_to=choice))
    assert not settings.problems
    bg.import_csv(settings, "patrons", write_csv(tmp_path / "p.csv", PATRON_HEADER, FAMILY), now=at(DAY, 5))
    rows = [[p, b, t, d.isoformat()] for p, b, t, d in FAMILY_LOANS]
    bg.import_csv(settings, "loans", write_csv(tmp_path / "l.csv", LOAN_HEADER, rows), now=at(DAY, 5))
    journal = bg.Journal(settings.database, Clock(at(DAY)))
    typo(journal.db)
    run = bg.run_overdue(settings, journal, DAY, at(DAY))
    bg.Sender(settings, journal).check(limit=0)
    got = {tuple(sorted(m.rcpt_tos)): m.message for m in sink.wait_for(len(
        [n for n in run.notices if n.sends]))}
    return run, got


@pytest.mark.parametrize("choice, reached, lost", [
    ("patron", [("ann@example.org",), ("bob@example.org",)],
     {"P3": "no email address", "P4": "no email address",
      "P5": "an email address that is not valid ('ed@')"}),
    ("guardian", [("ann.mum@example.org",), ("cy.parent@example.org",)],
     {"P2": "no guardian email address", "P4": "no guardian email address",
      "P5": "no guardian email address"}),
    ("both", [("ann.mum@example.org", "ann@example.org"), ("bob@example.org",),
              ("cy.parent@example.org",)],
     {"P4": "no email address and no guardian email address",
      "P5": "an email address that is not valid ('ed@') and no guardian email address"}),
    ("patron_else_guardian", [("ann@example.org",), ("bob@example.org",), ("cy.parent@example.org",)],
     {"P4": "no email address and no guardian email address",
      "P5": "an email address that is not valid ('ed@') and no guardian email address"}),
])
def test_send_to_chooses_the_recipients_and_names_who_cannot_be_reached(tmp_path, sink, choice,
                                                                         reached, lost):
    run, got = send_to(tmp_path, sink, choice)
    assert sorted(got) == reached                   # one message each, both addresses in one
    assert {pid: why for pid, (_, why) in run.unreachable.items()} == lost
    for pid, why in lost.items():
        name, group = next((p[1], p[4]) for p in FAMILY if p[0] == pid)
        assert f"{name} ({pid}, {group}): {why}" in run.summary()
    if choice == "both":
        ann = got[("ann.mum@example.org", "ann@example.org")]
        assert [a.addr_spec for a in ann["To"].addresses] == ["ann@example.org", "ann.mum@example.org"]
        assert ann.get_content().startswith("Dear Ann,\n")
    if choice in ("guardian", "patron_else_guardian"):
        cy = got[("cy.parent@example.org",)]
        assert cy["To"] == "Parent or guardian of Cy Young <cy.parent@example.org>"
        body = cy.get_content()
        assert body.startswith("Dear parent or guardian of Cy Young,\n")
        assert "show that Cy's library book below\nis late back." in body


def test_a_bad_send_to_is_named_with_the_choices(tmp_path):
    settings = bg.load_settings(write_ini(tmp_path, overdue__send_to="parents"))
    assert any("[overdue] send_to = 'parents': must be patron, guardian, both or "
               "patron_else_guardian" in p for p in settings.problems)


def test_the_dry_run_names_the_pupils_it_cannot_reach(tmp_path, gateway):
    gateway.configure(overdue__send_to="patron_else_guardian")
    settings = bg.load_settings(gateway.ini)
    today = dt.date.today()
    rows = [[pid, f"B{pid}", f"Book of {pid}", (today - dt.timedelta(days=1)).isoformat()]
            for pid, *_ in FAMILY]
    bg.import_csv(settings, "patrons", write_csv(tmp_path / "p.csv", PATRON_HEADER, FAMILY))
    bg.import_csv(settings, "loans", write_csv(tmp_path / "l.csv", LOAN_HEADER, rows))
    typo(bg.open_db(settings.database))
    out = gateway.cli("overdue", "--dry-run", check=0).stdout
    assert ("Could not be reached ([overdue] send_to = patron_else_guardian):\n"
            "    Di Lost (P4, 7B): no email address and no guardian email address\n"
            "    Ed Typo (P5, 7C): an email address that is not valid ('ed@') and no guardian "
            "email address\n") in out
    assert "overdue message to Parent or guardian of Cy Young <cy.parent@example.org>" in out


# -- the start, and --date ------------------------------------------------------------

def test_at_start_the_waiting_loans_file_is_imported_before_the_data_is_called_stale(tmp_path, sink):
    settings, _ = setup(tmp_path, imported=at(DAY) - 72 * 3600, **{"smtp__port": sink.port})
    rows = [[p, b, t, d.isoformat()] for p, b, t, d in LOANS]
    settings.import_folder.mkdir(exist_ok=True)
    write_csv(settings.import_folder / "loans.csv", LOAN_HEADER, rows)
    clock = Clock(at(DAY, 7))
    gateway = gateway_at(tmp_path, clock, smtp__port=sink.port)
    for second in range(0, 6):                         # the first seconds of `run`
        clock.now = at(DAY, 7) + second
        gateway.tick()
    assert events(settings, "overdue_refused") == []
    assert overdue_days_run(settings) == ["2026-03-02"]
    clock.now += 200                                   # the next check sends it
    gateway.tick()
    assert len(sink.wait_for(1)) == 1


def test_overdue_date_is_a_whole_simulation(gateway, tmp_path):
    settings = gateway_with_data(gateway, tmp_path, time.time())
    today = dt.date.today()
    ahead = today + dt.timedelta(days=2)               # Wonder: 3 days overdue by then
    proc = gateway.cli("overdue", "--date", ahead.isoformat(), "--dry-run", check=0)
    assert f"- Wonder, due {today - dt.timedelta(days=1)}, 3 days overdue" in proc.stdout
    assert "a real run would not send anything: the loans were imported 48 hours ago" in proc.stderr
    proc = gateway.cli("overdue", "--date", ahead.isoformat(), check=1)
    assert "the loans were imported 48 hours ago" in proc.stderr
    gateway.configure(overdue__max_data_age_hours=72)
    proc = gateway.cli("overdue", "--date", ahead.isoformat(), check=0)
    [msg] = queued(settings).values()
    assert f"Our records on {ahead}" in msg.get_content()
    assert f"- Wonder, due {today - dt.timedelta(days=1)}, 3 days overdue" in msg.get_content()
    far = (today + dt.timedelta(days=15)).isoformat()
    proc = gateway.cli("overdue", "--date", far, "--dry-run", check=2)
    assert "more than 14 days from today" in proc.stderr and "--force" in proc.stderr
    gateway.cli("overdue", "--date", far, "--dry-run", "--force", check=0)


# -- the daily log ------------------------------------------------------------------

def daily_log_of(gateway, sink, clock, day):
    """Tick just after midnight after `day` and deliver the daily log."""
    gateway.tick()                                     # first tick: starts the daily log's days
    clock.now = at(day + dt.timedelta(days=1), 0, 5)
    gateway.tick()
    bg.Sender(gateway.settings, gateway.journal).check(limit=0)
    [log_message] = [m for m in sink.messages if "daily log" in m.message["Subject"]]
    return log_message.message


def daily_log_after_the_morning(tmp_path, sink):
    """The daily log of DAY, after `run` ticked at 6:00 and at 7:00."""
    clock = Clock(at(DAY, 6))
    gateway = gateway_at(tmp_path, clock, smtp__port=sink.port)
    gateway.tick()
    clock.now = at(DAY, 7)
    gateway.tick()
    return daily_log_of(gateway, sink, clock, DAY)


def test_the_daily_log_says_in_its_subject_when_auto_overdue_did_not_run(tmp_path, sink):
    settings, _ = setup(tmp_path, imported=at(DAY) - 72 * 3600, **{"smtp__port": sink.port})
    msg = daily_log_after_the_morning(tmp_path, sink)
    assert msg["Subject"].startswith("ACTION NEEDED: auto-overdue did not run \u2014 loans are "
                                     "3 days old (check the library system's nightly export")
    body = msg.get_content()
    summary, details = body.split("The details:")
    assert "In short:\n  - 0 messages sent.\n" in summary
    assert "  - Needs you: auto-overdue did not run \u2014 loans are 3 days old" in summary
    assert "Sent:" in details and "Sent:" not in summary


def test_the_daily_log_names_the_pupils_auto_overdue_could_not_reach(tmp_path, sink):
    settings, _ = setup(tmp_path, **{"smtp__port": sink.port})
    msg = daily_log_after_the_morning(tmp_path, sink)
    assert not msg["Subject"].startswith("ACTION NEEDED")
    summary = msg.get_content().split("The details:")[0]
    assert ("  - Auto-overdue notices queued: 2 items due soon, 2 newly overdue, 0 reminders.\n"
            "  - Auto-overdue could not reach 1 pupil ([overdue] send_to = patron): Cy Young "
            "(P3, 7B): no email address.\n") in summary


def test_brothers_and_sisters_with_one_parent_address_get_one_message(tmp_path, sink):
    family = [["P1", "Cy Young", "", "young@example.org", "7B", "yes"],
              ["P2", "Dee Young", "", "young@example.org", "4A", "yes"]]
    settings, _ = bg.ensure_layout(write_ini(tmp_path, sink, overdue__send_to="guardian"))
    bg.import_csv(settings, "patrons", write_csv(tmp_path / "p.csv", PATRON_HEADER, family), now=at(DAY, 5))
    rows = [["P1", "B1", "Emma", days(-1).isoformat()], ["P2", "B2", "Holes", days(3).isoformat()]]
    bg.import_csv(settings, "loans", write_csv(tmp_path / "l.csv", LOAN_HEADER, rows), now=at(DAY, 5))
    journal = bg.Journal(settings.database, Clock(at(DAY)))
    run = bg.run_overdue(settings, journal, DAY, at(DAY))
    bg.Sender(settings, journal).check(limit=0)
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ["young@example.org"] and len(run.notices) == 1
    body = got.message.get_content()
    assert body.startswith("Dear parent or guardian of Cy Young and Dee Young,\n")
    # The words follow the overdue items: one here (Dee's book is only due soon).
    assert "show that Cy's and Dee's library book below is late back." in " ".join(body.split())
    assert ("For Cy:\n\nNow overdue:\n- Emma, due 2026-03-01, 1 day overdue\n\n"
            "For Dee:\n\nDue back soon:\n- Holes, due 2026-03-05\n") in body
    assert len(ledger(settings)) == 2


def test_no_we_wrote_to_you_about_an_overdue_notice_that_failed_for_good(tmp_path, make_sink):
    refusing = make_sink(data_reply="550 5.1.1 Mailbox unavailable")
    settings, journal = setup(tmp_path, loans=[["P1", "B3", "Wonder", days(-1)]],
                              **{"smtp__port": refusing.port})
    bg.run_overdue(settings, journal, DAY, at(DAY))
    bg.Sender(settings, journal).check(limit=0)
    assert len(list(settings.spool.glob("*.BAD"))) == 1             # the overdue notice
    import_data(settings, tmp_path, [["P1", "B3", "Wonder", days(-1)]], at(days(2), 5))
    bg.run_overdue(settings, journal, days(2), at(days(2)))
    [body] = [m.get_content() for m in queued(settings).values()]
    assert "Now overdue:\n- Wonder, due 2026-03-01, 3 days overdue\n" in body
    assert "Still overdue" not in body and "we wrote" not in body.lower()


def test_status_says_when_the_next_run_is():
    weekends = bg.OverdueSettings(closed_weekdays=frozenset({5, 6}))
    friday = dt.datetime.combine(days(4), dt.time(9))
    assert bg.next_run_day(weekends, days(3).isoformat(), friday) == days(4)
    assert bg.next_run_day(weekends, days(4).isoformat(), friday) == days(7)     # Monday
    saturday = dt.datetime.combine(days(5), dt.time(9))
    assert bg.next_run_day(weekends, days(4).isoformat(), saturday) == days(7)


# -- writing a run's files: in batches, recognised from one listing ------------

@pytest.mark.skipif(bg.os.name == "nt", reason="POSIX modes")
def test_notice_files_are_the_owners_only(tmp_path):
    settings, journal = setup(tmp_path)
    enable_bob(journal)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    modes = {p.name: p.stat().st_mode & 0o777 for p in settings.spool.glob("*.TMP")}
    assert len(modes) == 2 and set(modes.values()) == {0o600}


def test_already_queued_comes_from_one_listing_not_a_look_per_notice(tmp_path, monkeypatch):
    settings, journal = setup(tmp_path)
    enable_bob(journal)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    with journal.db:
        journal.db.execute("DELETE FROM notices")          # as if the run died before recording
    looks, listings, real_stat, real_listdir = [], [], bg.os.stat, bg.os.listdir

    def stat(path, *args, **kw):
        if str(path).endswith((bg.WAITING_EXT, bg.BAD_EXT, bg.CLAIM_SUFFIX)):
            looks.append(path)
        return real_stat(path, *args, **kw)

    def listdir(path="."):
        listings.append(path)
        return real_listdir(path)

    monkeypatch.setattr(bg.os, "stat", stat)
    monkeypatch.setattr(bg.os, "listdir", listdir)
    before = sorted(queued(settings))
    again = bg.run_overdue(settings, journal, DAY, at(DAY, 8))
    monkeypatch.undo()
    assert len(again.notices) == 2 and sorted(queued(settings)) == before
    assert looks == [] and [Path(p) for p in listings] == [settings.spool]
    assert len(ledger(settings)) == 6


def test_a_run_writes_its_files_together_and_flushes_them_once(tmp_path, monkeypatch):
    settings, journal = setup(tmp_path)
    enable_bob(journal)
    batches, real = [], bg.flush_together

    def flush_together(fds):
        batches.append(len(fds))
        return real(fds)

    monkeypatch.setattr(bg, "flush_together", flush_together)
    bg.run_overdue(settings, journal, DAY, at(DAY))
    assert batches == [2]                       # both files, one flush
    assert list(settings.spool.glob(".*.part")) == []


@pytest.mark.parametrize("syncfs", [True, False])
def test_flushing_a_batch_is_one_syncfs_on_linux_else_an_fsync_each(tmp_path, monkeypatch, syncfs):
    if syncfs and bg._syncfs() is None:
        pytest.skip("no syncfs here (Linux 5.8 or later)")
    if not syncfs:
        monkeypatch.setattr(bg, "_syncfs", lambda: None)
    synced, real_fsync = [], bg.os.fsync

    def fsync(fd):
        synced.append(fd)
        return real_fsync(fd)

    monkeypatch.setattr(bg.os, "fsync", fsync)
    bg.write_files(tmp_path, [(f"m{n}.TMP", b"To: a@example.org\n\nhi\n") for n in range(3)])
    folder_flush = 0 if bg.os.name == "nt" else 1
    assert len(synced) == (folder_flush if syncfs else 3 + folder_flush)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.TMP", "m1.TMP", "m2.TMP"]


def test_a_long_ledger_does_not_slow_a_run(tmp_path):
    """The ledger grows by thousands of rows a day, and a run reads it by its key
    (the overdue notice each reminder needs), never all of it: with 20,000 more
    rows sqlite does about the same work (counted in its virtual machine's
    steps, never timed)."""
    steps = []
    for extra in (0, 20000):
        folder = tmp_path / f"ledger-{extra}"
        folder.mkdir()
        settings, journal = setup(folder)
        bg.run_overdue(settings, journal, days(-2), at(days(-2)))     # B4's overdue notice
        with journal.db:
            journal.db.executemany(
                "INSERT INTO notices (patron_id, barcode, kind, due_date, queued_at, file) "
                "VALUES (?, ?, 'overdue', '2026-01-05', 0, NULL)",
                ((f"X{n}", f"Z{n}") for n in range(extra)))
        count = [0]
        journal.db.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1), 100)
        run = bg.run_overdue(settings, journal, DAY, at(DAY), dry_run=True)
        journal.db.set_progress_handler(None, 0)
        assert [n.kind for n in run.notices] == ["reminder"]
        steps.append(count[0])
    assert steps[1] < steps[0] * 1.5 + 50, steps


EXACT_PATRONS = [["P1", "Zoë Łukasz", "zoe@example.org", "home@example.org", "7A", "yes"],
          ["P4", 'Sam "Ace" O\'Brien', "", "home@example.org", "7B", "yes"],
          ["P5", 'Dr. Ed "Eddie" Smith', "ed@example.org", "", "8C", "yes"],
          ["P6", "Ann Smith", "ann@example.org", "", "8C", "yes"]]
EXACT_LOANS = [["P1", "B3", "Wonder", days(-1)], ["P1", "B4", "Coraline", days(-3)],
                ["P1", "B8", "Le Petit Prince — édition illustrée", days(-9)],
                ["P4", "B1", "Matilda", days(3)], ["P5", "B2", "Holes", days(3)],
                ["P6", "B5", "Dune", days(-1)]]
#: Every byte of the day's files but the Message-ID's unique part and the
#: Date (the machine's time zone), as the notices have always been written.
EXACT = {
    "overdue-2026-03-02-0d7285036892f024.TMP":
        b'From: Test School Library <library@school.example>\r\nTo: Ann Smith <ann@example.org>\r\n'
        b'Subject: Library book to bring back\r\nDate: DATE\r\n'
        b'Message-ID: <ID.bibliogate@school.example>\r\nAuto-Submitted: auto-generated\r\n'
        b'MIME-Version: 1.0\r\nContent-Type: text/plain; charset="utf-8"\r\n'
        b'Content-Transfer-Encoding: 7bit\r\n\r\nDear Ann,\r\n\r\n'
        b'Our records on 2026-03-02 show that your library book below\r\nis late back.\r\n\r\n'
        b'Now overdue:\r\n- Dune, due 2026-03-01, 1 day overdue\r\n\r\n'
        b'Please bring it back to the library as soon as you can. If you\r\n'
        b'have already brought it back, thank you, and please ignore this\r\n'
        b'message. If something is lost or damaged, just come and tell us.\r\n\r\n'
        b'Test School Library\r\n',
    "reminder-2026-03-02-505e97efba372530.TMP":
        b'From: Test School Library <library@school.example>\r\n'
        b'To: =?utf-8?b?Wm/DqyDFgXVrYXN6?= <zoe@example.org>,\r\n'
        b' =?utf-8?q?Parent_or_guardian_of_Zo=C3=AB_=C5=81ukasz?= <home@example.org>\r\n'
        b'Subject: Library books still not back\r\nDate: DATE\r\n'
        b'Message-ID: <ID.bibliogate@school.example>\r\nAuto-Submitted: auto-generated\r\n'
        b'MIME-Version: 1.0\r\nContent-Type: text/plain; charset="utf-8"\r\n'
        b'Content-Transfer-Encoding: quoted-printable\r\n\r\nDear Zo=C3=AB and Sam,\r\n\r\n'
        b'We wrote to you about your library books a few days ago, and\r\n'
        b'our records on 2026-03-02 show them still out.\r\n\r\nFor Zo=C3=AB:\r\n\r\n'
        b'Now overdue:\r\n- Wonder, due 2026-03-01, 1 day overdue\r\n\r\n'
        b'Still overdue (we wrote to you about these before):\r\n'
        b'- Coraline, due 2026-02-27, 3 days overdue (we wrote on 2026-02-28)\r\n\r\n'
        b'Also overdue:\r\n'
        b'- Le Petit Prince =E2=80=94 =C3=A9dition illustr=C3=A9e, due 2026-02-21, 9 =\r\n'
        b'days overdue\r\n\r\nFor Sam:\r\n\r\nDue back soon:\r\n- Matilda, due 2026-03-05\r\n\r\n'
        b'Please bring them back to the library as soon as you can, or come\r\n'
        b'and talk to us if there is a problem. If you have already brought them\r\n'
        b'back, thank you, and please ignore this message.\r\n\r\nTest School Library\r\n',
    "warning-2026-03-02-794c04681454899e.TMP":
        b'From: Test School Library <library@school.example>\r\n'
        b'To: "Dr. Ed Eddie\\" Smith\\"" <ed@example.org>\r\n'
        b'Subject: Library book due back soon\r\nDate: DATE\r\n'
        b'Message-ID: <ID.bibliogate@school.example>\r\nAuto-Submitted: auto-generated\r\n'
        b'MIME-Version: 1.0\r\nContent-Type: text/plain; charset="utf-8"\r\n'
        b'Content-Transfer-Encoding: 7bit\r\n\r\nDear Dr.,\r\n\r\n'
        b'A quick reminder from Test School Library: your library book is\r\n'
        b'due back soon.\r\n\r\nDue back soon:\r\n- Holes, due 2026-03-05\r\n\r\n'
        b'Please bring it back by the date shown, or ask us at the library\r\n'
        b'if you need more time.\r\n\r\nThank you!\r\nTest School Library\r\n',
}


def test_the_notices_are_written_byte_for_byte_as_before(tmp_path):
    """Plain, quoted and encoded names, a family in one message to two
    addresses, each kind, a line folded by quoted-printable: every byte."""
    settings, journal = setup(tmp_path, loans=[], overdue__send_to="both")
    import_data(settings, tmp_path, EXACT_LOANS, at(DAY, 5), patrons=EXACT_PATRONS)
    bg.run_overdue(settings, journal, days(-2), at(days(-2)))     # Coraline's overdue notice
    for path in settings.spool.glob("*.TMP"):
        path.unlink()
    bg.run_overdue(settings, journal, DAY, at(DAY), sent_at=at(DAY, 7, 30))
    date = email.utils.formatdate(at(DAY, 7, 30), localtime=True).encode()
    written = {}
    for path in sorted(settings.spool.glob("*.TMP")):
        data = path.read_bytes().replace(b"Date: " + date + b"\r\n", b"Date: DATE\r\n", 1)
        written[path.name] = re.sub(rb"Message-ID: <\d+\.[0-9a-f]{12}\.", b"Message-ID: <ID.", data)
    assert written == EXACT
