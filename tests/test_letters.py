"""Letter reports: overdue_first, overdue_second and overdue_final.

Patrons and loans go straight into a real sqlite file; letters go to the real
spool and, for delivery, through a real SMTP server (aiosmtpd on 127.0.0.1).
The day is injected, so the seven-day steps take no time.
"""

import dataclasses
import datetime as dt
import email
import email.policy
import re
import sqlite3
import time

import pytest

import bibliogate as bg
from conftest import REPO, add_loan, add_patron, write_ini

DAY = dt.date(2026, 3, 10)


def days(n):
    return DAY + dt.timedelta(days=n)


@pytest.fixture
def lib(tmp_path):
    """(settings, journal) for a fresh library folder with valid settings."""
    settings, _ = bg.ensure_layout(write_ini(tmp_path / "lib"))
    assert settings.problems == ()
    journal = bg.Journal(settings.database)
    yield settings, journal
    journal.close()




def letters(lib, kind, day, **options):
    settings, journal = lib
    return bg.run_letters(settings, journal, kind, today=day, **options)


def spool_messages(settings):
    found = []
    for path in sorted(settings.spool.glob("*.TMP")):
        raw = path.read_bytes().replace(b"\r\n", b"\n")
        found.append(email.message_from_bytes(raw, policy=email.policy.default))
    return found


def ledger(settings):
    conn = sqlite3.connect(str(settings.database))
    try:
        return sorted(conn.execute("SELECT patron_id, barcode, kind, due_date, file FROM notices"))
    finally:
        conn.close()


def cli(settings, *args):
    return bg.main(["--config", str(settings.ini_path), *map(str, args)])


# -- who gets which letter ----------------------------------------------------

def test_first_letter_lists_every_overdue_item_one_letter_per_patron(lib):
    settings, journal = lib
    db = journal.db
    add_patron(db, "P1", "Sam Smith", "sam@example.org")
    add_patron(db, "P2", "Ann Lee", "ann@example.org")
    add_loan(db, "B1", "P1", "The Hobbit", days(-9))
    add_loan(db, "B2", "P1", "Matilda", days(-5))
    add_loan(db, "B3", "P1", "Due Today", days(0))
    add_loan(db, "B4", "P1", "Due Later", days(4))
    add_loan(db, "B5", "P2", "Holes", days(-2))
    run = letters(lib, "overdue_first", DAY)
    assert [x.patron["name"] for x in run.letters] == ["Ann Lee", "Sam Smith"]
    assert len(run.queued) == 2 and run.print_file is None
    msgs = {m["To"]: m for m in spool_messages(settings)}
    sam = msgs["Sam Smith <sam@example.org>"]
    assert sam["Subject"] == "Library books to bring back"
    body = sam.get_content()
    assert body.startswith("Dear Sam,\n")
    assert "your library books below are now overdue:" in " ".join(body.split())
    assert "- The Hobbit, due 2026-03-01, 9 days overdue\n" \
           "- Matilda, due 2026-03-05, 5 days overdue\n" in body
    assert "barcode" not in body and "P1" not in body
    assert "Due Today" not in body and "Due Later" not in body
    assert "Test School Library" in body
    files = {p.name for p in settings.spool.glob("*.TMP")}
    assert [row[:4] for row in ledger(settings)] == [
        ("P1", "B1", "overdue_first", "2026-03-01"), ("P1", "B2", "overdue_first", "2026-03-05"),
        ("P2", "B5", "overdue_first", "2026-03-08")]
    assert {row[4] for row in ledger(settings)} == files


def test_second_and_final_follow_the_letter_before_after_seven_days(lib):
    settings, journal = lib
    db = journal.db
    add_patron(db, "P1", "Sam Smith", "sam@example.org")
    add_loan(db, "B1", "P1", "The Hobbit", days(-1))
    assert letters(lib, "overdue_second", DAY).letters == []     # no first letter yet
    assert len(letters(lib, "overdue_first", DAY).queued) == 1
    add_loan(db, "B2", "P1", "Matilda", days(2))
    assert [x["barcode"] for x in letters(lib, "overdue_first", days(3)).letters[0].loans] == ["B2"]

    assert letters(lib, "overdue_second", days(6)).letters == []   # only 6 days on
    second = letters(lib, "overdue_second", days(7))
    assert [x["barcode"] for x in second.letters[0].loans] == ["B1"]   # B2's first is 4 days old
    assert "We wrote on 2026-03-10 about your library book below" in second.letters[0].body
    assert spool_messages(settings)[-1]["Subject"].startswith("Second reminder")

    assert letters(lib, "overdue_final", days(13)).letters == []
    final = letters(lib, "overdue_final", days(14))
    assert [x["barcode"] for x in final.letters[0].loans] == ["B1"]
    assert "most recently on 2026-03-17" in " ".join(final.letters[0].body.split())
    assert final.letters[0].body.startswith("Dear parent or guardian of Sam Smith,\n")
    # B2 had its first letter long ago but never a second: no final for it yet.
    assert letters(lib, "overdue_final", days(40)).letters == []
    late_second = letters(lib, "overdue_second", days(40))
    assert [x["barcode"] for x in late_second.letters[0].loans] == ["B2"]
    kinds = [row[1:3] for row in ledger(settings)]
    assert sorted(kinds) == [("B1", "overdue_final"), ("B1", "overdue_first"),
                             ("B1", "overdue_second"), ("B2", "overdue_first"),
                             ("B2", "overdue_second")]


def test_a_renewed_loan_starts_again_with_the_first_letter(lib):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org")
    add_loan(journal.db, "B1", "P1", "The Hobbit", days(-1))
    letters(lib, "overdue_first", DAY)
    add_loan(journal.db, "B1", "P1", "The Hobbit", days(5))      # renewed, then late again
    assert letters(lib, "overdue_second", days(20)).letters == []
    assert len(letters(lib, "overdue_first", days(20)).queued) == 1


def test_running_again_writes_nothing_twice(lib):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org")
    add_patron(journal.db, "P2", "No Mail", "")
    add_loan(journal.db, "B1", "P1", "The Hobbit", days(-3))
    add_loan(journal.db, "B2", "P2", "Holes", days(-3))
    first = letters(lib, "overdue_first", DAY)
    assert len(first.queued) == 1 and first.print_file is not None
    for day in (DAY, days(1), days(30)):
        again = letters(lib, "overdue_first", day)
        assert again.letters == [] and again.queued == [] and again.print_file is None
        assert letters(lib, "overdue_first", day, output="print").print_file is None
    assert len(list(settings.spool.glob("*.TMP"))) == 1
    assert len(list((settings.base / "letters").glob("*.html"))) == 1
    assert len(ledger(settings)) == 2


def test_group_filter_and_case(lib):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org", grp="7B")
    add_patron(journal.db, "P2", "Ann Lee", "ann@example.org", grp="8C")
    add_loan(journal.db, "B1", "P1", "The Hobbit", days(-3))
    add_loan(journal.db, "B2", "P2", "Holes", days(-3))
    run = letters(lib, "overdue_first", DAY, group="7b")
    assert [x.patron["patron_id"] for x in run.letters] == ["P1"]
    assert [m["To"] for m in spool_messages(settings)] == ["Sam Smith <sam@example.org>"]
    assert len(letters(lib, "overdue_first", DAY).queued) == 1     # 8C's turn, 7B done


def test_unknown_kind_group_or_output_is_refused_with_exit_2(lib, capsys):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org", grp="7B")
    add_loan(journal.db, "B1", "P1", "The Hobbit", dt.date.today() - dt.timedelta(days=3))
    assert cli(settings, "letters", "overdue_fourth") == 2
    err = capsys.readouterr().err
    assert "'overdue_fourth' is not a letter report" in err and "overdue_final" in err
    assert cli(settings, "letters", "overdue_first", "--group", "9Z") == 2
    err = capsys.readouterr().err
    assert "There is no patron group '9Z'; the groups are 7B." in err
    assert cli(settings, "letters", "overdue_first", "--output", "fax") == 2
    assert "use email" in capsys.readouterr().err
    assert list(settings.spool.glob("*.TMP")) == [] and ledger(settings) == []


# -- addresses: patron, guardian, none ------------------------------------------

def test_guardian_variant_writes_to_the_guardian(lib):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org", "parent@example.org")
    add_patron(journal.db, "P2", "Ann Lee", "ann@example.org", "")
    add_loan(journal.db, "B1", "P1", "The Hobbit", days(-3))
    add_loan(journal.db, "B2", "P2", "Holes", days(-3))
    run = letters(lib, "overdue_first", DAY, guardian=True)
    [msg] = spool_messages(settings)
    assert msg["To"] == "Parent or guardian of Sam Smith <parent@example.org>"
    assert msg.get_content().startswith("Dear parent or guardian of Sam Smith,\n")
    assert [(x.patron["name"], x.problem) for x in run.unsendable] == \
        [("Ann Lee", "no guardian email address")]
    page = run.print_file.read_text(encoding="utf-8")
    assert "guardian" in run.print_file.name and "Dear parent or guardian of Ann Lee," in page


def test_patrons_without_a_usable_address_are_listed_and_printed(lib, capsys):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org")
    add_patron(journal.db, "P2", "Ann Lee", "")
    add_patron(journal.db, "P3", "Bob Brown", "bob@")
    today = dt.date.today()
    for n, pid in enumerate(("P1", "P2", "P3")):
        add_loan(journal.db, f"B{n}", pid, f"Book {n}", today - dt.timedelta(days=4))
    assert cli(settings, "letters", "overdue_first") == 0
    out = capsys.readouterr().out
    assert "1 letter queued" in out
    assert "2 patrons cannot be emailed" in out
    assert "  Ann Lee (P2): has no email address" in out
    assert "  Bob Brown (P3): has an email address that is not valid ('bob@')" in out
    [printed] = list((settings.base / "letters").glob("*.html"))
    assert printed.name.endswith("-not-emailed.html") and str(printed) in out
    page = printed.read_text(encoding="utf-8")
    assert page.count('<section class="letter">') == 2
    assert "Dear Ann," in page and "Dear Bob," in page and "Sam Smith" not in page
    files = {row[1]: row[4] for row in ledger(settings)}
    assert files["B1"] == files["B2"] == printed.name and files["B0"].endswith(".TMP")


def test_print_output_is_one_escaped_file_with_a_page_per_patron(lib, capsys):
    settings, journal = lib
    add_patron(journal.db, "P1", "<script>alert(1)</script>", "x@example.org", grp="7<b>")
    add_patron(journal.db, "P2", "Ann & Co", "ann@example.org")
    today = dt.date.today()
    add_loan(journal.db, "B1", "P1", 'Tom & "Jerry" <i>', today - dt.timedelta(days=2))
    add_loan(journal.db, "B2", "P2", "Holes", today - dt.timedelta(days=2))
    assert cli(settings, "letters", "overdue_first", "--output", "print") == 0
    out = capsys.readouterr().out
    [printed] = list((settings.base / "letters").glob("overdue_first-*.html"))
    assert f"2 letters to print: {printed}" in out
    page = printed.read_text(encoding="utf-8")
    assert "<script>" not in page and "<i>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Tom &amp; &quot;Jerry&quot; &lt;i&gt;" in page and "Ann &amp; Co" in page
    assert page.count('<section class="letter">') == 2
    assert "page-break-after: always" in page and "@media print" in page
    assert list(settings.spool.glob("*.TMP")) == []
    assert {row[4] for row in ledger(settings)} == {printed.name}


def test_loans_of_unknown_patrons_or_without_a_date_are_named(lib):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org")
    add_loan(journal.db, "B1", "P404", "Lost Soul", days(-3))
    add_loan(journal.db, "B2", "P1", "Matilda", days(-3))
    with journal.db:
        journal.db.executemany("INSERT INTO loans VALUES (?, 'P1', 'Odd', ?)",
                               [("B3", "1/3/26"), ("B4", "2026-02-31"), ("B5", "20260301")])
    run = letters(lib, "overdue_first", DAY)
    assert [x["barcode"] for x in run.letters[0].loans] == ["B2"]
    assert run.orphans == ["P404"]
    assert run.undated == ["B3 ('1/3/26')", "B4 ('2026-02-31')", "B5 ('20260301')"]
    report = "\n".join(bg.letters_report(run))
    assert "1 patron id not in the patrons list got no letter (P404); import the patrons" in report
    assert "3 loans got no letter because the due date is not a date (B3 ('1/3/26'), " in report


# -- dry run, safety ------------------------------------------------------------

def test_dry_run_lists_who_would_get_what_and_changes_nothing(lib, capsys):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org")
    add_patron(journal.db, "P2", "Ann Lee", "")
    today = dt.date.today()
    add_loan(journal.db, "B1", "P1", "The Hobbit", today - dt.timedelta(days=3))
    add_loan(journal.db, "B2", "P1", "Matilda", today - dt.timedelta(days=3))
    add_loan(journal.db, "B3", "P2", "Holes", today - dt.timedelta(days=3))
    events = journal.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    for output in ("email", "print"):
        assert cli(settings, "letters", "overdue_first", "--dry-run", "--output", output) == 0
        out = capsys.readouterr().out
        assert "nothing is queued, written or recorded" in out
        assert "Ann Lee (P2): print (has no email address), 1 item" in out
    assert cli(settings, "letters", "overdue_first", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "Sam Smith (P1): email to sam@example.org, 2 items" in out
    assert "2 letters would be written: 1 by email, 1 to print." in out
    assert list(settings.spool.iterdir()) == []
    assert not (settings.base / "letters").exists()
    assert ledger(settings) == []
    assert journal.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == events


def test_a_name_with_line_breaks_cannot_add_a_header(lib, sink):
    settings, journal = lib
    settings, _ = bg.ensure_layout(write_ini(settings.base, sink))
    add_patron(journal.db, "P1", "Eve\r\nBcc: thief@evil.example\r\nSubject: x", "eve@example.org")
    add_loan(journal.db, "B1", "P1", "Book\r\nCc: thief@evil.example", days(-3))
    assert len(letters((settings, journal), "overdue_first", DAY).queued) == 1
    assert bg.Sender(settings, journal).check().sent == 1
    [got] = sink.messages
    assert got.rcpt_tos == ["eve@example.org"]
    msg = got.message
    assert msg["Bcc"] is None and msg["Cc"] is None and len(msg.get_all("Subject")) == 1
    assert msg["Subject"] == "Library book to bring back"
    assert msg["To"].addresses[0].display_name == "Eve Bcc: thief@evil.example Subject: x"
    assert "thief" not in "".join(f"{k}{v}" for k, v in msg.items() if k not in ("To", "Subject"))
    assert "- Book Cc: thief@evil.example, due" in msg.get_content()


def test_a_spool_folder_that_cannot_be_used_queues_and_records_nothing(lib, capsys):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org")
    add_loan(journal.db, "B1", "P1", "The Hobbit", dt.date.today() - dt.timedelta(days=3))
    settings.spool.rmdir()
    settings.spool.write_text("not a folder", encoding="utf-8")
    assert cli(settings, "letters", "overdue_first") == 1
    assert f"The spool folder {settings.spool} cannot be read" in capsys.readouterr().err
    assert ledger(settings) == []
    settings.spool.unlink()
    settings.spool.mkdir()
    assert len(bg.run_letters(settings, journal, "overdue_first").queued) == 1
    assert len(ledger(settings)) == 1


def test_a_print_folder_that_cannot_be_made_is_a_clear_error(lib):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "")
    add_loan(journal.db, "B1", "P1", "The Hobbit", days(-3))
    (settings.base / "letters").write_text("in the way", encoding="utf-8")
    with pytest.raises(bg.BibliogateError, match=r"letters cannot be created"):
        letters(lib, "overdue_first", DAY, output="print")
    assert ledger(settings) == []


# -- the email output: timing, log, delivery ------------------------------------

def test_departure_time_counts_the_queue_ahead():
    assert bg.departure_time(1000, 0, 10, 10, 180) == 1000
    assert bg.departure_time(1000, 0, 11, 10, 180) == 1180
    assert bg.departure_time(1000, 5, 25, 10, 180) == 1360
    assert bg.departure_time(1000, 0, 412, 10, 180) == 1000 + 41 * 180


def test_email_output_says_when_the_last_letter_leaves(lib):
    settings, journal = lib
    for n in range(25):
        add_patron(journal.db, f"P{n:02}", f"Pupil {n:02}", f"p{n}@example.org")
        add_loan(journal.db, f"B{n}", f"P{n:02}", "Book", days(-2))
    for _ in range(5):
        bg.enqueue_bytes(settings.spool, b"To: a@example.org\n\nhi\n")
    now = bg.dt.datetime.combine(DAY, dt.time(9, 0)).timestamp()
    run = letters(lib, "overdue_first", DAY, now=now)
    assert run.departure.startswith("25 letters queued (behind 5 already waiting); BiblioGate "
                                    "is not running, so they "
                                    "leave once `python bibliogate.py run` starts: at 10 every "
                                    "3 minutes the last leaves about 6 minutes after that.")
    assert bg.departure_sentence(settings, journal.db, 3, 0, now) == (
        "3 letters queued; BiblioGate is not running, so they leave once `python bibliogate.py "
        "run` starts: at 10 every 3 minutes they all leave at its first check.")
    assert bg.departure_sentence(settings, journal.db, 500, 0, now).endswith(
        "the last leaves about 2 hours 27 minutes after that.")
    with journal.db:
        journal.db.execute("DELETE FROM notices")
    bg.set_state(journal.db, next_check=now + 60)
    with bg.FileLock(bg.run_lock_path(settings.ini_path)):       # as if `run` were running
        run = letters(lib, "overdue_first", DAY, now=now)
    last = time.strftime("%H:%M", time.localtime(now + 60 + 5 * 180))
    assert last == "09:16"
    assert run.departure == (f"25 letters queued (behind 30 already waiting); at 10 every "
                             f"3 minutes the last leaves about {last}.")


def test_each_run_is_journalled_with_counts(lib):
    settings, journal = lib
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org", grp="7B")
    add_patron(journal.db, "P2", "Ann Lee", "", grp="7B")
    add_loan(journal.db, "B1", "P1", "The Hobbit", days(-3))
    add_loan(journal.db, "B2", "P2", "Holes", days(-3))
    run = letters(lib, "overdue_first", DAY, group="7B")
    letters(lib, "overdue_first", DAY)
    rows = [r["detail"] for r in journal.db.execute(
        "SELECT detail FROM events WHERE kind = 'letters' ORDER BY id")]
    assert rows == [
        "letters overdue_first (patron variant, group 7B, email): 2 letters, 1 queued, "
        f"1 to print in {run.print_file.name}, 1 without a usable address",
        "letters overdue_first (patron variant, all groups, email): 0 letters, 0 queued"]


def test_letters_reach_the_patrons_through_the_gateway(gateway):
    db = bg.open_db(gateway.dir / "bibliogate.db")
    today = dt.date.today()
    add_patron(db, "P1", "Sam Smith", "sam@example.org", "mum@example.org", grp="7B")
    add_patron(db, "P2", "Ann Lee", "ann@example.org", grp="7B")
    add_loan(db, "B1", "P1", "The Hobbit", today - dt.timedelta(days=10))
    add_loan(db, "B2", "P1", "Café Olé", today - dt.timedelta(days=3))
    add_loan(db, "B3", "P2", "Holes", today - dt.timedelta(days=4))
    add_loan(db, "B4", "P2", "Not Yet", today + dt.timedelta(days=4))
    db.close()
    out = gateway.cli("letters", "overdue_first", "--group", "7B", check=0).stdout
    assert out.startswith("2 letters queued; BiblioGate is not running")
    gateway.cli("send", "--all", check=0)
    got = {m.rcpt_tos[0]: m for m in gateway.sink.wait_for(2)}
    assert sorted(got) == ["ann@example.org", "sam@example.org"]
    sam = got["sam@example.org"].message
    assert sam["Subject"] == "Library books to bring back"
    assert sam["From"] == "Test School Library <library@school.example>"
    assert sam["Auto-Submitted"] == "auto-generated" and sam["Message-ID"] and sam["Date"]
    fmt = lambda d: d.isoformat()  # noqa: E731  (the ini's date_format is %Y-%m-%d)
    assert (f"- The Hobbit, due {fmt(today - dt.timedelta(days=10))}, "
            f"10 days overdue\n- Café Olé, due "
            f"{fmt(today - dt.timedelta(days=3))}, 3 days overdue\n") in sam.get_content()
    assert "Not Yet" not in got["ann@example.org"].message.get_content()
    assert list(gateway.spool.glob("*.TMP")) == []
    again = gateway.cli("letters", "overdue_first", "--group", "7B", check=0).stdout
    assert again.startswith("No patron needs overdue_first today in group 7B.")


# -- templates and the shared helpers ---------------------------------------------

@pytest.mark.parametrize("kind", ["overdue_first", "overdue_second", "overdue_final", "direct"])
def test_templates_in_the_repository_are_the_defaults(kind):
    text = (REPO / "templates" / f"{kind}.txt").read_text(encoding="utf-8")
    assert text == bg.DEFAULT_TEMPLATES[kind]
    assert text.startswith("# ") and "Placeholders:" in text
    template = bg.parse_template(kind, text, REPO / "templates" / f"{kind}.txt")
    names = {name for part in (template.subject, template.body)
             for name, _ in bg.placeholders(part)}
    assert names <= bg.TEMPLATE_FIELDS[kind]
    assert all(f"${{{name}}}" in text.split("\nSubject:")[0] for name in names)


def test_a_misspelt_placeholder_is_named_with_its_line(lib, capsys):
    settings, journal = lib
    path = settings.templates / "overdue_first.txt"
    path.write_text("# note\nSubject: Books\n\nDear ${patron_nmae},\n", encoding="utf-8")
    assert any(re.search(r"overdue_first\.txt line 4: unknown placeholder \$\{patron_nmae\}", p)
               for p in bg.template_problems(settings))
    path.write_text("Subject: Books\n\nWe wrote on ${previous_sent}.\n", encoding="utf-8")
    add_patron(journal.db, "P1", "Sam Smith", "sam@example.org")
    add_loan(journal.db, "B1", "P1", "The Hobbit", dt.date.today() - dt.timedelta(days=3))
    assert cli(settings, "letters", "overdue_first") == 1
    assert "overdue_first.txt line 3: unknown placeholder ${previous_sent}" in \
        capsys.readouterr().err
    assert ledger(settings) == []


def test_render_items_and_notice_values(lib):
    settings = dataclasses.replace(lib[0], date_format="%d/%m/%Y")
    loans = [{"title": "The Hobbit", "barcode": "B1", "due_date": "2026-03-01"},
             {"title": "Matilda", "barcode": "B2", "due_date": "2026-03-09"},
             {"title": "Holes", "barcode": "B3", "due_date": "2026-03-10"},
             {"title": "Later", "barcode": "B4", "due_date": "2026-03-20"}]
    assert bg.render_items(loans, settings, DAY).splitlines() == [
        "- The Hobbit (barcode B1), due 01/03/2026, 9 days overdue",
        "- Matilda (barcode B2), due 09/03/2026, 1 day overdue",
        "- Holes (barcode B3), due 10/03/2026",
        "- Later (barcode B4), due 20/03/2026"]
    values = bg.notice_values(settings, {"name": "Sam Smith", "patron_id": "P1"}, loans, DAY)
    assert values == {"library_name": "Test School Library", "patron_name": "Sam Smith",
                      "first_name": "Sam", "patron_id": "P1",
                      "items": bg.render_items(loans, settings, DAY),
                      "items_with_barcodes": bg.render_items(loans, settings, DAY),
                      "item_count": 4, "item_word": "items", "book_word": "books",
                      "it_them": "them", "is_are": "are", "this_these": "these",
                      "today": "10/03/2026", "earliest_due": "01/03/2026"}


# -- variants, previews, tests and the print order -----------------------------------

def five_b(journal):
    db = journal.db
    add_patron(db, "P1", "Sam Smith", "sam@example.org", "sam.mum@example.org", grp="5B")
    add_patron(db, "P2", "Ann Lee", "ann@example.org", "ann.dad@example.org", grp="5B")
    add_loan(db, "B1", "P1", "The Hobbit", days(-3))
    add_loan(db, "B2", "P2", "Holes", days(-3))


def test_the_guardian_variant_is_recorded_apart_from_the_pupils(lib):
    settings, journal = lib
    five_b(journal)
    assert len(letters(lib, "overdue_first", DAY, group="5B").queued) == 2
    parents = letters(lib, "overdue_first", DAY, group="5B", guardian=True)
    assert len(parents.queued) == 2                 # writing to the pupils used nothing up
    assert letters(lib, "overdue_first", DAY, group="5B", guardian=True).letters == []
    assert letters(lib, "overdue_first", DAY, group="5B").letters == []
    # Each variant's second letter follows its own first letter.
    assert [x.address for x in letters(lib, "overdue_second", days(7), guardian=True).letters] \
        == ["ann.dad@example.org", "sam.mum@example.org"]
    kinds = sorted({row[2] for row in ledger(settings)})
    assert kinds == ["overdue_first", "overdue_first_guardian", "overdue_second_guardian"]


def test_a_preview_writes_the_print_file_and_records_nothing(lib, capsys):
    settings, journal = lib
    five_b(journal)
    add_patron(journal.db, "P3", "Cy Young", "", grp="5B")
    add_loan(journal.db, "B3", "P3", "Emma", dt.date.today() - dt.timedelta(days=2))
    assert cli(settings, "letters", "overdue_first", "--group", "5B", "--preview") == 0
    out = capsys.readouterr().out
    [preview] = list((settings.base / "letters").glob("*.html"))
    assert preview.name.endswith("-preview.html") and str(preview) in out
    assert "Nothing was queued or recorded" in out
    assert "Cy Young (P3): has no email address, so this letter would be printed" in out
    page = preview.read_text(encoding="utf-8")
    assert page.count('<section class="letter">') == 3 and "PREVIEW" in page
    assert list(settings.spool.glob("*.TMP")) == [] and ledger(settings) == []
    assert cli(settings, "letters", "overdue_first", "--group", "5B") == 0   # for real: all there
    assert len(list(settings.spool.glob("*.TMP"))) == 2 and len(ledger(settings)) == 3


def test_a_letter_to_the_group_test_uses_up_nothing(lib, sink):
    """The tech note's test: move a pupil into group TEST, give them your own
    address, run the report for TEST; then move them back."""
    settings, journal = lib
    settings, _ = bg.ensure_layout(write_ini(settings.base, sink))
    five_b(journal)
    with journal.db:
        journal.db.execute("UPDATE patrons SET grp = 'TEST', email = 'me@school.example' "
                           "WHERE patron_id = 'P1'")
    for _ in range(2):                               # as often as the librarian likes
        run = letters((settings, journal), "overdue_first", DAY, group="TEST")
        assert len(run.queued) == 1 and len(run.tests) == 1
    assert "1 letter to the group TEST were not recorded" in "\n".join(bg.letters_report(run))
    assert ledger(settings) == []
    bg.Sender(settings, journal).check(limit=0)
    assert [m.rcpt_tos for m in sink.wait_for(2)] == [["me@school.example"]] * 2
    with journal.db:
        journal.db.execute("UPDATE patrons SET grp = '5B', email = 'sam@example.org' "
                           "WHERE patron_id = 'P1'")
    real = letters((settings, journal), "overdue_first", DAY, group="5B")
    assert sorted(x.address for x in real.letters) == ["ann@example.org", "sam@example.org"]


def test_print_output_is_by_class_then_surname_with_a_cover_page_per_class(lib):
    settings, journal = lib
    db = journal.db
    pupils = [("P1", "Zoe Adams", "6A"), ("P2", "Amy Young", "5B"), ("P3", "Bea Brown", "5B"),
              ("P4", "Cal Zed", "6A"), ("P5", "Dan Clark", "5B")]
    for n, (pid, name, grp) in enumerate(pupils):
        add_patron(db, pid, name, f"{pid.lower()}@example.org", grp=grp)
        add_loan(db, f"B{n}", pid, f"Book <{n}>", days(-2 - n))
    run = letters(lib, "overdue_first", DAY, output="print")
    assert [x.patron["name"] for x in run.letters] == [
        "Bea Brown", "Dan Clark", "Amy Young", "Zoe Adams", "Cal Zed"]
    page = run.print_file.read_text(encoding="utf-8")
    assert page.count('<section class="cover">') == 2
    five, six = page.index("<h1>Class 5B</h1>"), page.index("<h1>Class 6A</h1>")
    order = [page.index(f"Dear {first},") for first in ("Bea", "Dan", "Amy", "Zoe", "Cal")]
    assert five < order[0] < order[1] < order[2] < six < order[3] < order[4]
    cover = page[five:order[0]]
    assert "<td>Bea Brown</td><td>Book &lt;2&gt;, due 2026-03-06</td>" in cover
    assert "Zoe Adams" not in cover and "<p>3 letters. The letters follow" in cover
    assert "<" + "2>" not in page                   # escaped everywhere


def test_the_print_file_is_escaped_by_render_not_by_hand():
    import inspect
    source = inspect.getsource(bg.letters_html)
    assert "render(" in source and ".substitute(" not in source and "html.escape" not in source


def test_a_crash_between_queueing_and_recording_letters_sends_none_twice(lib, sink):
    """The letters of a run are written, then recorded: the run repeated after
    a crash in between finds its files by name and only records them."""
    settings, journal = lib
    settings, _ = bg.ensure_layout(write_ini(settings.base, sink))
    five_b(journal)
    first = letters((settings, journal), "overdue_first", DAY, group="5B")
    assert len(first.queued) == 2
    bg.Sender(settings, journal).check(limit=1)           # one goes, one waits
    with journal.db:
        journal.db.execute("DELETE FROM notices")          # the ledger rows never made it
    again = letters((settings, journal), "overdue_first", DAY, group="5B")
    assert sorted(p.name for p in again.queued) == sorted(p.name for p in first.queued)
    assert len(list(settings.spool.glob("*.TMP"))) == 1 and len(ledger(settings)) == 2
    bg.Sender(settings, journal).check(limit=0)
    assert sorted(m.rcpt_tos[0] for m in sink.wait_for(2)) == ["ann@example.org",
                                                              "sam@example.org"]
    assert letters((settings, journal), "overdue_first", DAY, group="5B").letters == []


@pytest.mark.skipif(bg.os.name == "nt", reason="POSIX modes")
def test_letter_files_are_the_owners_only(lib):
    settings, journal = lib
    five_b(journal)
    letters(lib, "overdue_first", DAY, group="5B")
    assert {p.stat().st_mode & 0o777 for p in settings.spool.glob("*.TMP")} == {0o600}
