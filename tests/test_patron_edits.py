"""A patron's email or auto-overdue tick changed on the config page survives
the nightly patrons.csv import while the library system still has the value
it replaced; the Patrons page marks such edits; the import says how many it
kept. And the first_name column, when a patrons file has one.

The real page over HTTP on 127.0.0.1 (page_support), a real sqlite file."""

import bibliogate as bg
from page_support import flashes, open_page  # noqa: F401  (a fixture)
from test_import import PATRON_HEADER, write_csv

PUPILS = [["P1", "Sam Smith", "sam@old.example", "mum@example.org", "5B", "yes"],
          ["P2", "Ann Lee", "ann@example.org", "", "5B", "yes"]]


def patron(page, pid):
    db = page.db()
    try:
        return dict(db.execute("SELECT * FROM patrons WHERE patron_id = ?", (pid,)).fetchone())
    finally:
        db.close()


def import_patrons(page, rows, header=PATRON_HEADER):
    path = write_csv(page.ini.parent / "patrons.csv", header, rows)
    return bg.import_csv(page.gateway.settings, "patrons", path)


def test_page_edits_survive_imports_until_the_library_system_changes_the_value(open_page):  # noqa: F811
    page = open_page()
    import_patrons(page, PUPILS)
    c = page.client()
    c.get("/patron?id=P1")
    r = c.submit("/patron", email="sam@new.example", auto_overdue=None)
    assert any("Saved patron P1" in n for n in flashes(r.text))

    again = import_patrons(page, PUPILS)                # the nightly export, unchanged
    assert (patron(page, "P1")["email"], patron(page, "P1")["auto_overdue"]) == ("sam@new.example", 0)
    assert "Kept 2 change(s) made on the config page" in again.summary()
    assert again.unchanged == 2 and again.updated == 0

    listing = c.get("/patrons").text
    row = listing[listing.index("<td>P1</td>"):].split("</tr>")[0]
    assert row.count("edited here") == 2
    assert "Changed on this page: Email, Auto-overdue notices." in c.get("/patron?id=P1").text
    assert "edited here" not in listing[listing.index("<td>P2</td>"):].split("</tr>")[0]

    # The library system corrects the address itself: its value is used, and the
    # edit ends; the auto-overdue tick is still the page's.
    changed = [["P1", "Sam Smith", "sam@school.example", "mum@example.org", "5B", "yes"], PUPILS[1]]
    later = import_patrons(page, changed)
    assert (patron(page, "P1")["email"], patron(page, "P1")["auto_overdue"]) == ("sam@school.example", 0)
    assert "Kept 1 change(s)" in later.summary()
    row = c.get("/patrons").text
    row = row[row.index("<td>P1</td>"):].split("</tr>")[0]
    assert row.count("edited here") == 1

    # Ticked again on the page: back to the imported value, so no edit is left.
    c.get("/patron?id=P1")
    c.submit("/patron", auto_overdue="yes")
    assert "Kept" not in import_patrons(page, changed).summary()


def test_a_first_name_column_is_used_for_first_name(tmp_path):
    settings, _ = bg.ensure_layout(tmp_path / "bibliogate.ini")
    header = PATRON_HEADER + ["first_name"]
    rows = [["P1", "Smith Samuel", "sam@example.org", "", "5B", "yes", "Sam"],
            ["P2", "Ann Lee", "ann@example.org", "", "5B", "yes", ""]]
    bg.import_csv(settings, "patrons", write_csv(tmp_path / "p.csv", header, rows))
    db = bg.open_db(settings.database)
    names = {r["patron_id"]: bg.first_name(r) for r in db.execute("SELECT * FROM patrons")}
    assert names == {"P1": "Sam", "P2": "Ann"}
    # A file without the column leaves it as it was.
    bg.import_csv(settings, "patrons", write_csv(tmp_path / "p.csv", PATRON_HEADER,
                                                 [r[:6] for r in rows]))
    assert bg.first_name(db.execute("SELECT * FROM patrons WHERE patron_id = 'P1'").fetchone()) == "Sam"
    db.close()


def test_an_old_database_gets_the_first_name_column(tmp_path):
    import sqlite3
    old = sqlite3.connect(str(tmp_path / "old.db"))
    old.execute("CREATE TABLE patrons (patron_id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT "
                "NOT NULL DEFAULT '', guardian_email TEXT NOT NULL DEFAULT '', grp TEXT NOT NULL "
                "DEFAULT '', auto_overdue INTEGER NOT NULL DEFAULT 0)")
    old.execute("INSERT INTO patrons (patron_id, name) VALUES ('P1', 'Sam Smith')")
    old.commit()
    old.close()
    db = bg.open_db(tmp_path / "old.db")
    row = db.execute("SELECT * FROM patrons").fetchone()
    assert row["first_name"] == "" and bg.first_name(row) == "Sam"
    db.close()
