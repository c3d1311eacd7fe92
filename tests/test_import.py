"""Importing patrons.csv and loans.csv: by command, and from the import folder.

A real sqlite file in tmp_path; the clock is injected where time matters."""

import datetime as dt
import os
import re
import sys
import time
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import write_ini

NOON = dt.datetime(2026, 3, 2, 12, 0).timestamp()      # a Monday

PATRONS = [
    ["P1", "Ann Smith", "ann@example.org", "", "7A", "yes"],
    ["P2", "Bob Jones", "bob@example.org", "mum@example.org", "7A", "no"],
    ["P3", "Cy Young", "", "", "7B", ""],
]
PATRON_HEADER = ["patron_id", "name", "email", "guardian_email", "group", "auto_overdue"]
LOAN_HEADER = ["patron_id", "barcode", "title", "due_date"]


def csv_text(header, rows) -> str:
    def cell(value):
        value = str(value)
        return f'"{value}"' if any(c in value for c in ',"\r\n') else value
    return "".join(",".join(map(cell, row)) + "\r\n" for row in [header, *rows])


def write_csv(path: Path, header, rows, bom=False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + csv_text(header, rows).encode("utf-8"))
    return path


def make_settings(folder: Path, **overrides) -> bg.Settings:
    settings, _ = bg.ensure_layout(write_ini(folder, **overrides))
    return settings


def table(settings, sql):
    db = bg.open_db(settings.database)
    try:
        return [tuple(row) for row in db.execute(sql)]
    finally:
        db.close()


def patrons(settings):
    return table(settings, "SELECT patron_id, name, email, guardian_email, grp, auto_overdue "
                           "FROM patrons ORDER BY patron_id")


def loans(settings):
    return table(settings, "SELECT barcode, patron_id, title, due_date FROM loans ORDER BY barcode")


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "gw")


def import_patrons(settings, tmp_path, rows=PATRONS):
    return bg.import_csv(settings, "patrons", write_csv(tmp_path / "patrons.csv", PATRON_HEADER, rows))


# -- patrons ---------------------------------------------------------------------

def test_patrons_are_added_then_updated_and_counted(settings, tmp_path):
    result = import_patrons(settings, tmp_path)
    assert (result.added, result.updated, result.unchanged, result.removed) == (3, 0, 0, 0)
    assert patrons(settings) == [("P1", "Ann Smith", "ann@example.org", "", "7A", 1),
                                 ("P2", "Bob Jones", "bob@example.org", "mum@example.org", "7A", 0),
                                 ("P3", "Cy Young", "", "", "7B", 0)]
    changed = [PATRONS[0][:2] + ["ann.smith@example.org"] + PATRONS[0][3:], PATRONS[1],
               ["P4", "Di Prince", "di@example.org", "", "8C", "TRUE"]]
    result = import_patrons(settings, tmp_path, changed)
    assert (result.added, result.updated, result.unchanged, result.skipped) == (1, 1, 1, [])
    assert result.summary() == ("patrons.csv: 3 patrons imported: 1 added, 1 updated, "
                                "1 unchanged, 0 removed, 0 skipped.")
    rows = patrons(settings)
    assert [r[0] for r in rows] == ["P1", "P2", "P3", "P4"]      # P3 stays: not in the file
    assert rows[0][2] == "ann.smith@example.org" and rows[3][5] == 1


def test_a_column_the_file_lacks_keeps_what_is_stored(settings, tmp_path):
    import_patrons(settings, tmp_path)
    path = write_csv(tmp_path / "names.csv", ["patron_id", "name"], [["P1", "Ann Smith-Lee"]])
    result = bg.import_csv(settings, "patrons", path)
    assert (result.updated, result.added) == (1, 0)
    assert patrons(settings)[0] == ("P1", "Ann Smith-Lee", "ann@example.org", "", "7A", 1)


def test_bom_and_header_case_and_spaces_are_accepted(settings, tmp_path):
    header = [" Patron_ID ", "NAME", "Email ", " Guardian Email", "Group", "AUTO_OVERDUE"]
    path = write_csv(tmp_path / "excel.csv", header, PATRONS, bom=True)
    assert bg.import_csv(settings, "patrons", path).added == 3
    assert patrons(settings)[1][3] == "mum@example.org"


def test_semicolons_as_excel_writes_them_in_some_countries(settings, tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("patron_id;name;email\nP1;Ann Smith;ann@example.org\n", encoding="utf-8")
    assert bg.import_csv(settings, "patrons", path).added == 1
    assert patrons(settings)[0][:3] == ("P1", "Ann Smith", "ann@example.org")


def test_every_bad_row_is_reported_by_line_and_nothing_changes(settings, tmp_path):
    import_patrons(settings, tmp_path)
    before = patrons(settings)
    text = ("patron_id,name,email,guardian_email,group,auto_overdue\r\n"
            "P1,Ann Smith,ann@new.example.org,,7A,yes\r\n"             # line 2: good
            'P5,"Ed\r\nWard",not-an-address,,7A,yes\r\n'               # lines 3-4: bad email
            "\r\n"                                                       # line 5: blank
            ",No Number,,,,\r\n"                                         # line 6: no id
            "P1,Ann Again,,,,\r\n"                                       # line 7: duplicate
            "P6,Fay,fay@example.org,dad@,7B,maybe\r\n"                   # line 8: two problems
            "P7,,g@example.org,,,\r\n"                                   # line 9: no name
            "P8,Hal,h@example.org,,7B,no,extra\r\n")                     # line 10: too many values
    path = tmp_path / "bad.csv"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(bg.ImportRefused) as caught:
        bg.import_csv(settings, "patrons", path)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "bad.csv line 3", "bad.csv line 6", "bad.csv line 7", "bad.csv line 8",
        "bad.csv line 9", "bad.csv line 10"]
    assert "email 'not-an-address' is not an email address" in problems[0]
    assert "no patron_id" in problems[1]
    assert "patron_id P1 is also on line 2" in problems[2]
    assert "guardian_email 'dad@'" in problems[3] and "auto_overdue 'maybe'" in problems[3]
    assert "no name" in problems[4]
    assert "7 values, but the header names 6 columns" in problems[5]
    assert "--skip-bad" in caught.value.fix
    assert patrons(settings) == before

    result = bg.import_csv(settings, "patrons", path, skip_bad=True)
    assert (result.rows, len(result.skipped), result.updated) == (7, 6, 1)
    assert patrons(settings)[0][2] == "ann@new.example.org"


def test_rows_the_csv_reader_cannot_take_are_reported_too(settings, tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("patron_id,name\nP1,Ann\nP2," + "x" * 200_000 + "\nP3,Cy\n"
                    '"P4,Di\nP5,Ed\n', encoding="utf-8")
    with pytest.raises(bg.ImportRefused) as caught:
        bg.import_csv(settings, "patrons", path)
    assert caught.value.problems == [
        "broken.csv line 3: cannot be read as CSV: a value is longer than 131,072 characters "
        "(is a closing '\"' missing on this line?).",
        "broken.csv line 5: a value in double quotes runs on over the next lines: is a "
        "closing '\"' missing? Lines 5 to 6 were read as this one record, and none of them "
        "is imported."]


def test_a_name_on_two_lines_becomes_one_line(settings, tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes('patron_id,name,email\nP1,"Ann\r\nBcc: evil@example.org",ann@example.org\n'
                     .encode("utf-8"))
    bg.import_csv(settings, "patrons", path)
    assert patrons(settings)[0][1] == "Ann Bcc: evil@example.org"


# -- loans -----------------------------------------------------------------------

def test_loans_are_a_snapshot_that_replaces_the_last(settings, tmp_path):
    import_patrons(settings, tmp_path)
    first = [["P1", "B1", "Matilda", "2026-03-05"], ["P1", "B2", "Holes", "2026-03-01"],
             ["P2", "B3", "Wonder", "2026-02-27"]]
    result = bg.import_csv(settings, "loans", write_csv(tmp_path / "loans.csv", LOAN_HEADER, first),
                           now=NOON)
    assert (result.added, result.removed) == (3, 0)
    second = [["P1", "B1", "Matilda", "2026-03-19"],            # renewed
              ["P2", "B3", "Wonder", "2026-02-27"],             # unchanged; B2 returned
              ["P3", "B4", "Coraline", "2026-03-09"]]           # new
    result = bg.import_csv(settings, "loans", write_csv(tmp_path / "loans.csv", LOAN_HEADER, second),
                           now=NOON + 60)
    assert (result.added, result.updated, result.unchanged, result.removed) == (1, 1, 1, 1)
    assert "1 removed (returned)" in result.summary()
    assert loans(settings) == [("B1", "P1", "Matilda", "2026-03-19"),
                               ("B3", "P2", "Wonder", "2026-02-27"),
                               ("B4", "P3", "Coraline", "2026-03-09")]
    db = bg.open_db(settings.database)
    assert bg.get_state(db, bg.LOANS_IMPORTED_KEY) == NOON + 60
    db.close()


def test_loan_rows_are_checked(settings, tmp_path):
    import_patrons(settings, tmp_path)
    rows = [["P1", "B1", "Matilda", "2026-03-05"],
            ["P9", "B2", "Holes", "2026-03-05"],               # line 3: unknown patron
            ["P1", "B3", "Wonder", "31/02/2026"],              # line 4: bad date
            ["P1", "B1", "Matilda again", "2026-03-05"],       # line 5: duplicate barcode
            ["P1", "", "No barcode", "2026-03-05"],            # line 6
            ["P1", "B6", "", ""]]                               # line 7: no title, no date
    path = write_csv(tmp_path / "loans.csv", LOAN_HEADER, rows)
    with pytest.raises(bg.ImportRefused) as caught:
        bg.import_csv(settings, "loans", path)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [f"loans.csv line {n}" for n in (3, 4, 5, 6, 7)]
    assert "patron P9 is not in the patrons list; import patrons.csv first" in problems[0]
    assert "due_date '31/02/2026' is not a date" in problems[1]
    assert "barcode B1 is also on line 2" in problems[2]
    assert "no barcode" in problems[3]
    assert "no title" in problems[4] and "no due_date" in problems[4]
    assert loans(settings) == []
    db = bg.open_db(settings.database)
    assert bg.get_state(db, bg.LOANS_IMPORTED_KEY) is None     # a refused file is no snapshot
    db.close()


def test_dates_in_date_format_and_always_iso(tmp_path):
    settings = make_settings(tmp_path / "gw", library__date_format="%d/%m/%Y")
    import_patrons(settings, tmp_path)
    rows = [["P1", "B1", "Matilda", "05/03/2026"], ["P1", "B2", "Holes", "2026-03-06"],
            ["P1", "B3", "Wonder", "7/3/2026"]]
    bg.import_csv(settings, "loans", write_csv(tmp_path / "loans.csv", LOAN_HEADER, rows))
    assert [row[3] for row in loans(settings)] == ["2026-03-05", "2026-03-06", "2026-03-07"]
    bad = write_csv(tmp_path / "bad.csv", LOAN_HEADER, [["P1", "B1", "Matilda", "03/15/2026"]])
    with pytest.raises(bg.ImportRefused) as caught:
        bg.import_csv(settings, "loans", bad)
    assert "written like" in caught.value.problems[0] and "%d/%m/%Y" in caught.value.problems[0]


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"patron_id,barcode,title\nP1,B1,X\n", "no due_date column"),
    (b"patron_id,name,email,guardian_email,group,auto_overdue\n", "looks like a patrons file"),
    (b"patron_id,barcode,title,due_date,barcode\n", "the column barcode appears twice"),
    (b"patron_id,barcode,title,due_date\nP1,B1,Caf\x81,2026-03-05\n",
     "line 2: this is not UTF-8 nor Windows-1252 (cp1252) text"),
])
def test_files_that_cannot_be_imported_say_why(settings, tmp_path, content, words):
    path = tmp_path / "loans.csv"
    path.write_bytes(content)
    with pytest.raises(bg.ImportRefused) as caught:
        bg.import_csv(settings, "loans", path)
    assert words in str(caught.value)


def test_unknown_columns_are_ignored_with_a_note(settings, tmp_path):
    path = write_csv(tmp_path / "p.csv", ["patron_id", "name", "homeroom"], [["P1", "Ann", "12"]])
    result = bg.import_csv(settings, "patrons", path)
    assert result.added == 1 and "ignored the columns homeroom" in result.notes[0]


# -- the command -----------------------------------------------------------------

def test_import_command_reports_bad_rows_and_exit_status(gateway, tmp_path):
    write_csv(tmp_path / "patrons.csv", PATRON_HEADER,
              PATRONS + [["P4", "Di", "di@", "", "", ""]])
    proc = gateway.cli("import", "patrons", tmp_path / "patrons.csv", check=1)
    assert "patrons.csv line 5: email 'di@' is not an email address" in proc.stderr
    assert "Nothing was imported" in proc.stderr and proc.stdout == ""
    proc = gateway.cli("import", "patrons", tmp_path / "patrons.csv", "--skip-bad", check=0)
    assert proc.stdout.strip() == ("patrons.csv: 3 patrons imported: 3 added, 0 updated, "
                                   "0 unchanged, 0 removed, 1 skipped.")
    assert "skipped patrons.csv line 5" in proc.stderr


def test_import_command_prints_progress_on_long_files(gateway, tmp_path):
    rows = [[f"P{n}", f"Patron {n}", f"p{n}@example.org", "", "", "yes"] for n in range(6000)]
    write_csv(tmp_path / "patrons.csv", PATRON_HEADER, rows)
    proc = gateway.cli("import", "patrons", tmp_path / "patrons.csv", check=0)
    assert "patrons.csv: 5,000 rows read" in proc.stderr
    assert "6,000 patrons imported: 6,000 added" in proc.stdout


# -- the import folder -----------------------------------------------------------

class Clock:
    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now


def drop(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text.encode("utf-8"))
    return path


def watch(gateway, clock, watcher):
    watcher(gateway, clock())
    clock.now += bg.STABLE_SECONDS + 1
    watcher(gateway, clock())


def test_the_import_folder_imports_then_moves_to_done(tmp_path):
    clock = Clock(NOON)
    gateway = bg.Gateway(write_ini(tmp_path / "gw"), clock=clock)
    folder = gateway.settings.import_folder
    watcher = bg.ImportWatch()
    drop(folder, "LOANS.CSV", csv_text(LOAN_HEADER, [["P1", "B1", "Matilda", "2026-03-05"]]))
    drop(folder, "patrons.csv", csv_text(PATRON_HEADER, PATRONS))
    watcher(gateway, clock())
    assert (folder / "patrons.csv").exists()               # just appeared: not yet
    watch(gateway, clock, watcher)
    assert not (folder / "patrons.csv").exists() and not (folder / "LOANS.CSV").exists()
    done = sorted(p.name for p in (folder / "done").iterdir())
    assert done == ["LOANS-20260302-120003.CSV", "patrons-20260302-120003.csv"]
    assert loans(gateway.settings) == [("B1", "P1", "Matilda", "2026-03-05")]
    details = [e["detail"] for e in gateway.journal.events("2026-03-02", ["import"])]
    assert details[0].startswith("patrons.csv: 3 patrons imported")   # patrons went first
    assert any(d.startswith("LOANS.CSV: 1 loans imported") for d in details)
    activity = bg.daily_summary(gateway, "2026-03-02")["activity"]
    assert "LOANS.CSV: 1 loans imported" in activity


def test_a_bad_file_goes_to_failed_with_every_bad_row_listed(tmp_path):
    clock = Clock(NOON)
    gateway = bg.Gateway(write_ini(tmp_path / "gw"), clock=clock)
    folder = gateway.settings.import_folder
    watcher = bg.ImportWatch()
    rows = PATRONS + [["", "No Id", "", "", "", ""], ["P1", "Again", "", "", "", ""]]
    drop(folder, "patrons.csv", csv_text(PATRON_HEADER, rows))
    watch(gateway, clock, watcher)
    failed = folder / "failed"
    assert sorted(p.name for p in failed.iterdir()) == ["patrons-20260302-120003.csv",
                                                         "patrons-20260302-120003.txt"]
    report = (failed / "patrons-20260302-120003.txt").read_text(encoding="utf-8")
    assert "was NOT imported" in report
    assert "patrons.csv line 5: no patron_id." in report
    assert "patrons.csv line 6: patron_id P1 is also on line 2." in report
    assert patrons(gateway.settings) == []
    event = gateway.journal.events("2026-03-02", ["import_failed"])[0]
    assert "NOT imported" in event["detail"] and str(failed) in event["detail"]
    assert "NOT imported" in bg.daily_summary(gateway, "2026-03-02")["activity"]


def test_a_file_still_being_written_waits(tmp_path):
    clock = Clock(NOON)
    gateway = bg.Gateway(write_ini(tmp_path / "gw"), clock=clock)
    folder = gateway.settings.import_folder
    watcher = bg.ImportWatch()
    path = drop(folder, "patrons.csv", csv_text(PATRON_HEADER, PATRONS[:1]))
    for n in range(3):                      # it keeps growing: never taken
        watcher(gateway, clock())
        with open(path, "a", encoding="utf-8", newline="") as fh:
            fh.write(f"P{10 + n},Patron {n},,,,\r\n")
        clock.now += bg.STABLE_SECONDS + 1
    assert path.exists() and patrons(gateway.settings) == []
    watch(gateway, clock, watcher)          # now it has stopped changing
    assert not path.exists() and len(patrons(gateway.settings)) == 4


def test_the_gateway_runs_the_watcher(tmp_path):
    clock = Clock(time.time())
    gateway = bg.Gateway(write_ini(tmp_path / "gw"), clock=clock)
    drop(gateway.settings.import_folder, "patrons.csv", csv_text(PATRON_HEADER, PATRONS))
    assert any(isinstance(task, bg.ImportWatch) for task in gateway.tasks)
    for _ in range(2):
        for task in gateway.tasks:
            if isinstance(task, bg.ImportWatch):
                task(gateway, clock())
        clock.now += bg.STABLE_SECONDS + 1
    assert len(patrons(gateway.settings)) == 3
    assert os.listdir(gateway.settings.import_folder / "done")


# -- encodings: UTF-8 (with or without a BOM), else Excel's cp1252 -----------------

EXCEL_ROWS = "patron_id,name,email,guardian_email,group,auto_overdue\r\n" \
             "P1,Ann Smith,,,7A,yes\r\nP2,Zoë Łukasz,,,7A,no\r\nP3,Renée Müller,,,7B,\r\n"


@pytest.mark.parametrize("data, note", [
    (EXCEL_ROWS.replace("Ł", "L").encode("cp1252"), "read as Windows-1252 (cp1252)"),
    (EXCEL_ROWS.encode("utf-8"), None),
    (b"\xef\xbb\xbf" + EXCEL_ROWS.encode("utf-8"), None),
], ids=["excel-csv-cp1252", "utf-8", "utf-8-with-bom"])
def test_excel_csv_and_utf8_both_import_and_the_note_says_which(settings, tmp_path, data, note):
    path = tmp_path / "patrons.csv"
    path.write_bytes(data)
    result = bg.import_csv(settings, "patrons", path)
    names = [row[1] for row in patrons(settings)]
    assert names[2] == "Renée Müller" and names[1].startswith("Zoë")
    notes = " ".join(result.notes)
    assert (note in notes) if note else "cp1252" not in notes


def test_a_bad_byte_names_its_own_line_when_utf8_is_forced(tmp_path):
    settings = make_settings(tmp_path / "lib", data__csv_encoding="utf-8")
    path = tmp_path / "patrons.csv"
    path.write_bytes(EXCEL_ROWS.replace("Ł", "L").encode("cp1252"))
    with pytest.raises(bg.ImportRefused) as caught:
        bg.import_csv(settings, "patrons", path)
    [problem] = caught.value.problems
    assert problem.startswith("patrons.csv line 3: this is not UTF-8 text (byte 0xEB 'P2,Zo")
    assert "csv_encoding" in caught.value.fix


def test_cp1252_can_be_forced_and_a_bad_setting_is_named(tmp_path):
    settings = make_settings(tmp_path / "lib", data__csv_encoding="cp1252")
    path = tmp_path / "patrons.csv"
    path.write_bytes("patron_id,name\r\nP1,Caf\u00e9\r\n".encode("utf-8"))
    bg.import_csv(settings, "patrons", path)
    assert patrons(settings)[0][1] == "CafÃ©"                  # as asked: read as cp1252
    bad = make_settings(tmp_path / "other", data__csv_encoding="latin-9")
    assert any("[data] csv_encoding = 'latin-9': must be auto, utf-8 or cp1252" in p
               for p in bad.problems)


# -- written once, the repeats found by sqlite ---------------------------------------

def traced_imports(monkeypatch) -> list:
    """The SQL of every import's connection."""
    statements, real_open = [], bg.open_db

    def open_db(path):
        conn = real_open(path)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(bg, "open_db", open_db)
    return statements


def test_loans_are_written_once_and_repeats_are_found_by_sqlite(settings, tmp_path, monkeypatch):
    import_patrons(settings, tmp_path)
    rows = [["P1", "B1", "Matilda", "2026-03-05"], ["P2", "B2", "Holes", "2026-03-05"],
            ["P1", "B3", "", "2026-03-05"],                    # line 4: bad, its barcode counts
            ["P1", "B3", "Wonder", "2026-03-05"],              # line 5: repeats line 4
            ["P2", "B1", "Matilda again", "2026-03-05"]]       # line 6: repeats line 2
    statements = traced_imports(monkeypatch)
    result = bg.import_csv(settings, "loans", write_csv(tmp_path / "loans.csv", LOAN_HEADER, rows),
                           skip_bad=True)
    assert [p.split(": ", 1)[1] for p in result.skipped] == [
        "no title.", "barcode B3 is also on line 4.", "barcode B1 is also on line 2."]
    assert loans(settings) == [("B1", "P1", "Matilda", "2026-03-05"),
                               ("B2", "P2", "Holes", "2026-03-05")]
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "REPLACE"))
              and "into loans" in s.lower() or "into temp.incoming" in s.lower()]
    # one write of the rows (the new table, in slices); none copies them a second time
    assert writes and all("INTO loans_incoming" in s and "SELECT" not in s.upper()
                          for s in writes), writes


def test_a_loans_table_a_crash_left_half_written_is_dropped(settings, tmp_path):
    import_patrons(settings, tmp_path)
    db = bg.open_db(settings.database)
    with db:
        db.execute("CREATE TABLE loans_incoming (barcode TEXT PRIMARY KEY, patron_id TEXT NOT "
                   "NULL, title TEXT NOT NULL, due_date TEXT NOT NULL)")
        db.execute("INSERT INTO loans_incoming VALUES ('OLD', 'P1', 'Half', '2026-03-01')")
    db.close()
    rows = [["P1", "B1", "Matilda", "2026-03-05"]]
    bg.import_csv(settings, "loans", write_csv(tmp_path / "loans.csv", LOAN_HEADER, rows))
    assert loans(settings) == [("B1", "P1", "Matilda", "2026-03-05")]
    bad = [["P1", "B2", "", "2026-03-05"]]
    with pytest.raises(bg.ImportRefused):
        bg.import_csv(settings, "loans", write_csv(tmp_path / "loans.csv", LOAN_HEADER, bad))
    assert loans(settings) == [("B1", "P1", "Matilda", "2026-03-05")]      # nothing changed
    assert table(settings, "SELECT name FROM sqlite_master WHERE name = 'loans_incoming'") == []
    assert {r[0] for r in table(settings, "SELECT name FROM sqlite_master WHERE type = 'index' "
                                          "AND tbl_name = 'loans' AND sql IS NOT NULL")} == \
        {"loans_due", "loans_patron"}


def test_patron_ids_repeated_are_found_by_sqlite_with_the_first_line(settings, tmp_path):
    rows = PATRONS + [["P1", "Ann Again", "", "", "7A", ""], ["P4", "Di", "x", "", "", ""],
                      ["P4", "Di Two", "", "", "", ""]]
    with pytest.raises(bg.ImportRefused) as caught:
        import_patrons(settings, tmp_path, rows)
    assert caught.value.problems == [
        "patrons.csv line 5: patron_id P1 is also on line 2.",
        "patrons.csv line 6: email 'x' is not an email address (write it as name@example.org, "
        "or leave it empty).",
        "patrons.csv line 7: patron_id P4 is also on line 6."]
    assert patrons(settings) == []


# -- slices written at once: the same outcome as row by row ----------------------------

#: Loan rows a slice written at once may hold: each row checked again later
#: (an unknown patron, a wrong or non-ISO date, spaces around them), or
#: found by sqlite (a repeated barcode).
LOAN_VALUE_ODDITIES = [
    lambda n: f"P9,B{n},Stranger {n},2026-03-05",                   # unknown patron
    lambda n: f" P1 ,B{n},Spaced {n}, 2026-03-05 ",                 # spaces around values
    lambda n: f"P1,B{n},Bad date {n},2026-02-31",                    # no such date
    lambda n: f"P1,B{n},Other form {n},05/03/2026",                  # date_format, not ISO
    lambda n: f"P1,B{n // 2},Repeat {n},2026-03-05",                 # a barcode again
    lambda n: f"P9,B{n // 3},Bad repeat {n},2026-03-05",             # again, and bad
    lambda n: f"P1,B{n},Zoë {n},2026-03-05",                          # not ASCII
    lambda n: f"P1,B 1{n},Inner space {n},2026-03-05",
    lambda n: f",B{n},No patron {n},",
]
#: Rows that send their slice row by row.
LOAN_ROW_ODDITIES = [
    lambda n: f"P1,B{n}, Spaced title {n} ,2026-03-05",
    lambda n: f"P1,B{n},Tab\there {n},2026-03-05",                    # a control character
    lambda n: f"P1,B{n},\"Two\r\nlines {n}\",2026-03-05",           # a record on two lines
    lambda n: "",                                                      # blank
    lambda n: ",,,",                                                   # blank too
    lambda n: f"P1,,No barcode {n},2026-03-05",
    lambda n: f"P1,B{n},,",                                           # no title, no date
    lambda n: f"P1,B{n},Extra {n},2026-03-05,x",                      # one value too many
    lambda n: f"P1,B{n}",                                              # too few
    lambda n: f"P1,B{n},\u00a0Nbsp {n},2026-03-05",                   # a space Python strips
]


def odd_loans(seed: int, count: int) -> str:
    """Loans in blocks of 20 records, one slice each (see import_both_ways)
    but the first: by turns all plain; with rows to check again (and
    repeated barcodes in every other such block); with one kind of odd row
    (each kind in turn); with rows of any kind."""
    import random
    rng = random.Random(seed)
    lines = ["patron_id,barcode,title,due_date"]
    repeats = LOAN_VALUE_ODDITIES[4:6]
    for n in range(count):
        block = n // 20
        odd = [[], [o for o in LOAN_VALUE_ODDITIES if o not in repeats] if block % 8 == 1
               else LOAN_VALUE_ODDITIES, [LOAN_ROW_ODDITIES[block // 4 % len(LOAN_ROW_ODDITIES)]],
               LOAN_VALUE_ODDITIES + LOAN_ROW_ODDITIES][block % 4]
        make = rng.choice(odd) if odd and rng.random() < 0.3 else \
            (lambda n: f"P{n % 3 + 1},B{n},Title {n},2026-03-05")
        lines.append(make(n))
    return "\r\n".join(lines) + "\r\n"


def import_both_ways(tmp_path, monkeypatch, what, text, date_format="%d/%m/%Y", header=None):
    """The file imported twice, in slices of 20 rows: as it is, and with
    every slice written row by row; (result, table) of each."""
    monkeypatch.setattr(bg, "PROGRESS_FIRST", 7)
    monkeypatch.setattr(bg, "IMPORT_CHUNK", 20)
    outcomes, written = [], []
    real_quick = bg.Loader.quick

    def counting_quick(self, rows, line):
        done = real_quick(self, rows, line)
        written.append(done)
        return done

    for careful in (False, True):
        folder = tmp_path / ("careful" if careful else "quick")
        settings = make_settings(folder / "gw", library__date_format=date_format)
        import_patrons(settings, folder,
                       PATRONS + [[f"S{n}", f"Student {n}", "", "", "", ""] for n in range(5)])
        path = folder / f"{what}.csv"
        path.write_bytes(text.encode("utf-8"))
        with monkeypatch.context() as m:
            m.setattr(bg.Loader, "quick", (lambda self, rows, line: False) if careful
                      else counting_quick)
            try:
                result = bg.import_csv(settings, what, path, skip_bad=True)
            except bg.ImportRefused as exc:
                result = exc.problems
        rows = loans(settings) if what == "loans" else patrons(settings)
        outcomes.append((result, rows))
    return outcomes, written


@pytest.mark.parametrize("seed", range(6))
def test_loans_written_in_slices_come_out_as_row_by_row(tmp_path, monkeypatch, seed):
    text = odd_loans(seed, 800)
    (quick, careful), written = import_both_ways(tmp_path, monkeypatch, "loans", text)
    assert any(written), "no slice was written at once: the test tests nothing"
    assert quick[0].skipped == careful[0].skipped and quick[0].skipped
    assert quick[0].summary() == careful[0].summary()
    assert quick[1] == careful[1] and quick[1]


def test_a_column_the_import_ignores_may_come_last_or_first(tmp_path, monkeypatch):
    rows = [[f"x{n}", "P1", f"B{n}", f"T {n}", "2026-03-05", f"note {n}"] for n in range(50)]
    text = csv_text(["shelf", "patron_id", "barcode", "title", "due_date", "note"], rows)
    (quick, careful), written = import_both_ways(tmp_path, monkeypatch, "loans", text)
    assert all(written) and quick == careful
    assert quick[1][0] == ("B0", "P1", "T 0", "2026-03-05") and len(quick[1]) == 50


def test_patrons_written_in_slices_come_out_as_row_by_row(tmp_path, monkeypatch):
    import random
    rng = random.Random(7)
    odd = [lambda n: [f"S{n}", f"Name {n}", f"s{n}@example.org", "", "7A", "yes"],
           lambda n: [f"S{n}", f"Name  {n}", "", "", "7B", "No"],
           lambda n: [f"S{n}", f"Name {n}", "", "", " 7B ", "No"],
           lambda n: [f"S{n}", f"Name\t{n}", "", "", "", ""],
           lambda n: [f"S{n}", f" Name {n}", "bad@", "", "", "TRUE"],
           lambda n: [f"S{n // 2}", f"Again {n}", "", "", "", ""],
           lambda n: [f"S{n}", f"Name {n}", "", "mum@example.org", "", "maybe"],
           lambda n: ["", f"No id {n}", "", "", "", ""],
           lambda n: [f"S{n}", "", "", "", "", ""],
           lambda n: [f"S{n}", f"Ann\r\nLines {n}", "", "", "", "1"]]
    rows = []
    for n in range(20 * 2 * len(odd)):     # blocks of 20: all plain, or odd rows of one kind
        kind = odd[n // 40 % len(odd)] if n // 20 % 2 else odd[0]
        rows.append((kind if rng.random() < 0.3 else odd[0])(n))
    text = csv_text(PATRON_HEADER, rows)
    (quick, careful), written = import_both_ways(tmp_path, monkeypatch, "patrons", text)
    assert any(written) and not all(written)
    assert quick[0].skipped == careful[0].skipped and quick[0].skipped
    assert quick[0].summary() == careful[0].summary()
    assert quick[1] == careful[1]


def test_a_record_the_csv_module_cannot_read_sends_the_file_row_by_row(tmp_path, monkeypatch):
    lines = odd_loans(3, 120).split("\r\n")
    lines.insert(61, "P1,BIG," + "x" * 200_000 + ",2026-03-05")
    text = "\r\n".join(lines)
    (quick, careful), _ = import_both_ways(tmp_path, monkeypatch, "loans", text)
    assert quick == careful
    assert any("a value is longer than 131,072 characters" in p
               for p in quick[0].skipped)


NUL_REFUSED = ("cannot be read as CSV: it holds a NUL character (a zero byte). Is the file "
               "damaged, or saved as UTF-16? Save it again as CSV.")


def test_a_nul_or_a_control_character_in_a_key_is_refused_alike_on_every_python(tmp_path,
                                                                               monkeypatch):
    """Python 3.9's csv module cannot read a record holding a NUL and 3.11's
    can: either way the row is refused with the same sentence, written at once
    or row by row; a barcode or patron id with a control character is refused
    too (it could never be scanned to match). The other rows are imported."""
    control = ("holds a control character (a tab, a line end or another invisible one); "
               "correct it in the library system and export again.")
    # Each odd row alone in its slice of 20 (see import_both_ways), where the
    # slice's quick check must send it row by row.
    loans_rows = [f"P1,B{n},Title {n},2026-03-05" for n in range(120)]
    loans_rows[3] = "P1,B\x003,Title 3,2026-03-05"           # a NUL in the barcode
    loans_rows[25] = "P1,B25,Ti\x00tle 25,2026-03-05"        # in the title
    loans_rows[45] = "P\x001,B45,Title 45,2026-03-05"        # in the patron id
    loans_rows[65] = "P1,B\x0165,Title 65,2026-03-05"        # a control character
    loans_rows[85] = "P1,B85,Title 85,2026-03-0\x005"        # a NUL in the date
    text = "patron_id,barcode,title,due_date\r\n" + "\r\n".join(loans_rows) + "\r\n"
    (quick, careful), written = import_both_ways(tmp_path, monkeypatch, "loans", text)
    # Before 3.11 the csv module cannot read a NUL record: the whole file goes
    # row by row, and no slice is written at once.
    assert quick == careful and (any(written) or sys.version_info < (3, 11))
    assert quick[0].skipped == [
        "loans.csv line 5: " + NUL_REFUSED, "loans.csv line 27: " + NUL_REFUSED,
        "loans.csv line 47: " + NUL_REFUSED, "loans.csv line 67: barcode B\\x0165 " + control,
        "loans.csv line 87: " + NUL_REFUSED]
    assert [row[0] for row in quick[1]] == sorted(f"B{n}" for n in range(120)
                                                  if n not in (3, 25, 45, 65, 85))

    patron_rows = [[f"S{n}", f"Name {n}", "", "", "7A", ""] for n in range(160)]
    odd = {3: (0, "S\x003"), 25: (4, "7\x00A"), 45: (1, "Na\x00me"), 65: (0, "S\t65"),
           85: (2, "s85@exa\x00mple.org"), 105: (5, "ye\x00s"), 125: (3, "m\x00@example.org")}
    for n, (column, value) in odd.items():
        patron_rows[n][column] = value
    (quick, careful), written = import_both_ways(tmp_path / "p", monkeypatch, "patrons",
                                                 csv_text(PATRON_HEADER, patron_rows))
    assert quick == careful and (any(written) or sys.version_info < (3, 11))
    assert quick[0].skipped == [f"patrons.csv line {n + 2}: " + (
        f"patron_id S\\t65 {control}" if n == 65 else NUL_REFUSED) for n in sorted(odd)]
    ids = {row[0] for row in quick[1]}
    assert {f"S{n}" for n in range(160) if n not in odd} <= ids
    assert not {"S\x003", "S25", "S45", "S\t65", "S85", "S105", "S125"} & ids


def test_a_row_with_a_nul_is_left_unread_as_python_3_9_leaves_it(tmp_path, monkeypatch):
    """A NUL in a column the import ignores refuses the row too, and a
    refused row holds no barcode: a later row with its barcode is imported
    (Python 3.9's csv module cannot read such a row at all)."""
    rows = [f"P1,B{n},Title {n},2026-03-05,note {n}" for n in range(40)]
    rows[2] = "P1,B2,Title 2,2026-03-05,no\x00te"
    rows[5] = "P1,B30,Ti\x00tle,2026-03-05,"                  # B30 comes again on line 32
    text = "patron_id,barcode,title,due_date,note\r\n" + "\r\n".join(rows) + "\r\n"
    (quick, careful), _ = import_both_ways(tmp_path, monkeypatch, "loans", text)
    assert quick == careful
    assert quick[0].skipped == ["loans.csv line 4: " + NUL_REFUSED, "loans.csv line 7: " + NUL_REFUSED]
    assert ("B30", "P1", "Title 30", "2026-03-05") in quick[1] and len(quick[1]) == 38


def test_the_lines_an_unclosed_quote_swallows_are_named(settings, tmp_path):
    """A quote left open reads the lines after it as one value, until the csv
    module's limit on a value or the end of the file: the sentence names every
    line taken with it, so that no loan leaves the snapshot unsaid."""
    import_patrons(settings, tmp_path)
    lines = ["patron_id,barcode,title,due_date", "P1,B0,Title 0,2026-03-05",
             'P1,B1,"Unclosed title,2026-03-05']
    lines += [f"P1,B{n},A title of some length {n},2026-03-05" for n in range(2, 6002)]
    path = tmp_path / "loans.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = bg.import_csv(settings, "loans", path, skip_bad=True)
    said = re.match(r"loans\.csv line (\d+): cannot be read as CSV: a value is longer than "
                    r"131,072 characters .* Lines (\d+) to (\d+) were read as this one record, "
                    r"and none of them is imported\.$", result.skipped[0])
    assert said is not None, result.skipped
    first, last = int(said.group(1)), int(said.group(3))
    assert first == int(said.group(2)) == 3 and last > 2000
    imported = {row[0] for row in loans(settings)}
    assert len(imported) == 1 + len(lines) - last           # B0, and the lines after
    assert f"B{last - 2}" not in imported and f"B{last - 1}" in imported    # line N holds B(N-2)
