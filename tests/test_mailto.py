"""The direct-email helper: a mailto: link (RFC 6068) for one patron.

Every link is parsed back with urllib.parse and compared with what went in.
"""

import datetime as dt
import urllib.parse
import webbrowser

import pytest

import bibliogate as bg
from conftest import add_loan, add_patron, write_ini

DAY = dt.date(2026, 3, 10)


@pytest.fixture
def lib(tmp_path):
    settings, _ = bg.ensure_layout(write_ini(tmp_path / "lib"))
    db = bg.open_db(settings.database)
    yield settings, db
    db.close()




def parse(url):
    """(address, {field: value}) read back from a mailto: link."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "mailto" and parts.fragment == ""
    fields = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    assert all(len(values) == 1 for values in fields.values())
    return urllib.parse.unquote(parts.path), {k: v[0] for k, v in fields.items()}


def cli(settings, *args):
    return bg.main(["--config", str(settings.ini_path), *map(str, args)])


def test_link_round_trips_address_subject_and_body(lib):
    settings, db = lib
    address = "o'brien+lib#1?x&y%z=w@example.org"     # every one must be percent-encoded
    add_patron(db, "P1", "Ann O'Brien & Söhne", address)
    add_loan(db, "B1", "P1", "Tom & Jerry?&body=gotcha#top", DAY - dt.timedelta(days=9))
    add_loan(db, "B2", "P1", "Café #1 = 100% fun 漢字", DAY + dt.timedelta(days=4))
    url = bg.build_mailto(settings, db, "P1", today=DAY)
    assert url.startswith("mailto:o%27brien%2Blib%231%3Fx%26y%25z%3Dw@example.org?subject=")
    assert " " not in url and "+" not in url and "\n" not in url and "\r" not in url
    assert "%0D%0A" in url and url.isascii()
    to, fields = parse(url)
    assert to == address
    assert set(fields) == {"subject", "body"}
    assert fields["subject"] == "Your library loans at Test School Library"
    body = fields["body"]
    assert body.replace("\r\n", "") .count("\n") == 0          # every line break is CRLF
    lines = body.split("\r\n")
    assert lines[0] == "Dear Ann O'Brien & Söhne,"
    assert "- Tom & Jerry?&body=gotcha#top (barcode B1), due 2026-03-01, 9 days overdue" in lines
    assert "- Café #1 = 100% fun 漢字 (barcode B2), due 2026-03-14" in lines
    assert "today, 2026-03-10:" in lines
    assert lines[-2:] == ["Test School Library", ""]


def test_guardian_link_goes_to_the_guardian(lib):
    settings, db = lib
    add_patron(db, "P1", "Sam Smith", "sam@example.org", "parent@example.org")
    to, fields = parse(bg.build_mailto(settings, db, "P1", guardian=True, today=DAY))
    assert to == "parent@example.org"
    assert fields["body"].startswith("Dear parent or guardian of Sam Smith,\r\n")
    assert "- nothing on loan just now" in fields["body"]


def test_a_loan_without_a_readable_due_date_is_still_listed(lib):
    settings, db = lib
    add_patron(db, "P1", "Sam Smith", "sam@example.org")
    add_loan(db, "B1", "P1", "Matilda", DAY - dt.timedelta(days=2))
    with db:
        db.execute("INSERT INTO loans VALUES ('B2', 'P1', 'Odd', '1/3/26')")
    body = parse(bg.build_mailto(settings, db, "P1", today=DAY))[1]["body"]
    assert ("- Matilda (barcode B1), due 2026-03-08, 2 days overdue\r\n"
            "- Odd (barcode B2), due 1/3/26\r\n") in body


def test_a_name_with_line_breaks_stays_in_the_body(lib):
    settings, db = lib
    add_patron(db, "P1", "Eve\r\nBcc: thief@evil.example", "eve@example.org")
    template = settings.templates / "direct.txt"
    template.write_text("Subject: Loans of ${patron_name}\n\nHello ${addressee}.\n",
                        encoding="utf-8")
    to, fields = parse(bg.build_mailto(settings, db, "P1", today=DAY))
    assert to == "eve@example.org" and set(fields) == {"subject", "body"}
    assert fields["subject"] == "Loans of Eve Bcc: thief@evil.example"
    assert fields["body"] == "Hello Eve Bcc: thief@evil.example.\r\n"


def test_a_long_list_is_cut_with_a_line_that_says_so(lib):
    settings, db = lib
    add_patron(db, "P1", "Sam Smith", "sam@example.org")
    for n in range(80):
        add_loan(db, f"B{n:03}", "P1", f"A rather long book title, volume {n}",
                 DAY - dt.timedelta(days=n))
    url = bg.build_mailto(settings, db, "P1", today=DAY)
    assert len(url.split("&body=", 1)[1]) <= bg.MAILTO_BODY_LIMIT
    assert len(url) < 2000
    body = parse(url)[1]["body"]
    shown = [line for line in body.split("\r\n") if line.startswith("- ")]
    last = body.rstrip("\r\n").split("\r\n")[-1]
    left_out = 80 - len(shown)
    assert 5 < len(shown) < 80
    assert last == (f"[Shortened to fit in an email link: {left_out} more items not shown. "
                    "The library system lists them all.]")


def test_a_short_body_is_left_whole():
    body = "Dear Sam,\n\n- One (barcode 1)\n"
    assert bg.fit_body(body) == body
    url = bg.mailto_url("sam@example.org", "Hi", body)
    assert parse(url)[1]["body"] == body.replace("\n", "\r\n")


@pytest.mark.parametrize("email, guardian, problem", [
    ("", False, "has no email address"),
    ("sam@example.org", True, "has no guardian email address"),
    ("sam@example.org&bcc=thief@evil.example", False,
     "has an email address that is not valid ('sam@example.org&bcc=thief@evil.example')"),
])
def test_no_usable_address_is_refused_naming_the_patron(lib, capsys, email, guardian, problem):
    settings, db = lib
    add_patron(db, "P1", "Sam Smith", email)
    with pytest.raises(bg.NoEmail) as caught:
        bg.build_mailto(settings, db, "P1", guardian=guardian, today=DAY)
    assert isinstance(caught.value, bg.BibliogateError)
    assert str(caught.value).startswith(f"Sam Smith (patron P1) {problem}, so no email can be "
                                        "written;")
    assert str(caught.value).count(". ") == 0 and str(caught.value).endswith(".")
    args = ["mailto", "P1"] + (["--guardian"] if guardian else [])
    assert cli(settings, *args) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == str(caught.value) + "\n"


def test_an_unknown_patron_is_named(lib, capsys):
    settings, db = lib
    with pytest.raises(bg.UnknownPatron, match="There is no patron with the id 'P404'"):
        bg.build_mailto(settings, db, "P404")
    assert cli(settings, "mailto", "P404") == 1
    assert "'P404'" in capsys.readouterr().err


def test_the_command_prints_the_link(lib, capsys):
    settings, db = lib
    add_patron(db, "P1", "Sam Smith", "sam@example.org")
    assert cli(settings, "mailto", "P1") == 0
    url = capsys.readouterr().out.strip()
    assert parse(url)[0] == "sam@example.org"


def test_open_on_windows_hands_the_link_to_startfile(monkeypatch):
    opened = []
    monkeypatch.setattr(bg.os, "startfile", opened.append, raising=False)
    bg.open_link("mailto:sam@example.org?subject=Hi", windows=True)
    assert opened == ["mailto:sam@example.org?subject=Hi"]

    def no_mail_program(url):
        raise OSError(1155, "No application is associated with the specified file")
    monkeypatch.setattr(bg.os, "startfile", no_mail_program, raising=False)
    with pytest.raises(bg.BibliogateError, match="choose a default email program"):
        bg.open_link("mailto:sam@example.org", windows=True)


def test_open_hands_the_printed_link_to_the_mail_program(lib, capsys, monkeypatch):
    settings, db = lib
    add_patron(db, "P1", "Sam Smith", "sam@example.org")
    opened = []
    # webbrowser on Linux and macOS, os.startfile on Windows: record both.
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    monkeypatch.setattr(bg.os, "startfile", opened.append, raising=False)
    assert cli(settings, "mailto", "P1", "--open") == 0
    assert opened == [capsys.readouterr().out.strip()]

    def refuse(url):
        raise OSError(1155, "No application is associated with the specified file")
    monkeypatch.setattr(webbrowser, "open", lambda url: False)
    monkeypatch.setattr(bg.os, "startfile", refuse, raising=False)
    assert cli(settings, "mailto", "P1", "--open") == 1
    out, err = capsys.readouterr()
    assert out.startswith("mailto:") and "copy the link above" in err



def test_open_says_so_when_no_browser_can_be_started(monkeypatch):
    """BROWSER names a program that is not there: webbrowser raises its own
    Error; the librarian gets the sentence, not a traceback."""
    def no_browser(url):
        raise webbrowser.Error("could not locate runnable browser")
    monkeypatch.setattr(webbrowser, "open", no_browser)
    with pytest.raises(bg.BibliogateError, match="copy the link above"):
        bg.open_link("mailto:sam@example.org", windows=False)
