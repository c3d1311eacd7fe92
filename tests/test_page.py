"""The config page over real HTTP: a gateway loop and its page on 127.0.0.1,
a real aiosmtpd sink behind it, requests made with http.client."""

import getpass
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import bibliogate as bg
from conftest import REPO, eml, write_ini
from page_support import (SECRET, Clock, PageClient, commented_ini, field_error, flashes,  # noqa: F401
                          open_page)

HEADERS = {
    "Content-Security-Policy": "default-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def drop(spool, name, data, age=60.0):
    path = spool / name
    path.write_bytes(data)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def add_patrons(page, *rows):
    db = page.db()
    with db:
        db.executemany("INSERT INTO patrons(patron_id, name, email, guardian_email, grp, "
                       "auto_overdue) VALUES (?,?,?,?,?,?)", rows)
    db.close()


def patron(page, patron_id):
    db = page.db()
    try:
        return dict(db.execute("SELECT * FROM patrons WHERE patron_id = ?", (patron_id,)).fetchone())
    finally:
        db.close()


# -- every page -------------------------------------------------------------------

def test_every_page_answers_with_strict_headers_and_a_safe_cookie(open_page):
    page = open_page()
    add_patrons(page, ("p1", "Ann Reader", "ann@example.org", "", "7B", 1))
    c = page.client(login=False)
    first = c.login(page.login_link())          # the session cookie comes with the login
    cookie = first.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    for path in ("/", "/settings", "/queue", "/log", "/patrons", "/patron?id=p1", "/health",
                 "/style.css", "/nope"):
        r = c.get(path)
        assert r.status == (404 if path == "/nope" else 200), path
        for name, start in HEADERS.items():
            assert r.headers[name].startswith(start), (path, name)
        csp = r.headers["Content-Security-Policy"]
        assert "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "script" not in csp           # no script may run at all
    assert "<h1>Patron Ann Reader</h1>" in c.get("/patron?id=p1").text


def test_settings_page_shows_every_setting_but_never_the_password(open_page):
    page = open_page()
    c = page.client()
    text = c.get("/").text
    fields = c.form("/settings")
    for f in bg.SETTINGS_FIELDS:
        assert f'name="{f.name}"' in text, f.name
    assert fields["smtp.host"] == "127.0.0.1"
    assert fields["library.name"] == "Hill School Library"
    assert fields["smtp.password"] == ""
    assert "Set. Type a new one to change it" in text
    assert "Sender: running" in text
    for path in ("/queue", "/log", "/patrons", "/health"):
        c.get(path)
    assert not [seen for seen in c.seen if SECRET in seen]


# -- Save ---------------------------------------------------------------------------

def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new) if a != b]


def test_save_writes_only_the_changed_values_and_restarts_the_sender(open_page):
    page = open_page()
    before = page.ini.read_text(encoding="utf-8")
    c = page.client()
    c.get("/")
    r = c.submit("/settings", **{"gateway.messages_per_check": "5",
                                 "library.name": "Hill & Dale <Library>",
                                 "overdue.enabled": "yes", "overdue.closed": "sat, sun"})
    after = page.ini.read_text(encoding="utf-8")
    changed = changed_lines(before, after)
    assert [b.split(";")[0].rstrip() for _, b in changed] == [
        "messages_per_check = 5", "enabled = yes", "closed = sat, sun",
        "name = Hill & Dale <Library>"]
    for old, new in changed:                # the inline comments stay, in their column
        if ";" in old:
            assert new.index(";") == old.index(";") or len(new.split(";")[0]) > old.index(";")
            assert new.split(";", 1)[1] == old.split(";", 1)[1]
    assert "[notes]\n; a section BiblioGate does not know is kept\nkept = yes   ; as it is\n" in after
    settings = page.gateway.settings            # the loop has read them
    assert settings.per_check == 5 and settings.library_name == "Hill & Dale <Library>"
    note = flashes(r.text)
    assert any("Saved [gateway] messages_per_check" in n and "it is running" in n for n in note)
    assert "Hill &amp; Dale &lt;Library&gt;" in r.text and "<Library>" not in r.text
    assert SECRET in after                      # kept, though the form never had it
    assert not [seen for seen in c.seen if SECRET in seen]


def test_save_with_bad_values_writes_nothing_and_marks_each_field(open_page):
    page = open_page()
    before = page.ini.read_bytes()
    c = page.client()
    c.get("/")
    r = c.submit("/settings", **{"smtp.port": "abc", "gateway.from_address": "not an address",
                                 "gateway.minutes_between_checks": "0",
                                 "library.date_format": "dd/mm", "smtp.ehlo": "two words",
                                 "library.name": "Hall ; Library"})
    assert page.ini.read_bytes() == before
    assert "not a number. Use 25, 587 (starttls) or 465 (tls)." in field_error(r.text, "smtp.port")
    assert "not an email address" in field_error(r.text, "gateway.from_address")
    assert "out of range" in field_error(r.text, "gateway.minutes_between_checks")
    assert "needs %d, %m and %Y" in field_error(r.text, "library.date_format")
    assert "host name" in field_error(r.text, "smtp.ehlo")
    assert "start of a comment" in field_error(r.text, "library.name")
    assert field_error(r.text, "smtp.host") == ""
    assert c.form("/settings")["smtp.port"] == "abc"      # what was typed is shown again
    assert any("Nothing was saved: fix the 6 field(s)" in n for n in flashes(r.text))
    assert page.gateway.settings.smtp_port == page.sink.port
    assert "Sender: running" in r.text


def test_save_starts_a_sender_stopped_by_a_missing_host(open_page):
    page = open_page(host=("host =                  ;", "host =                  ;"))
    c = page.client()
    text = c.get("/").text
    assert "Sender: stopped" in text
    assert "not set. Enter the IP address" in field_error(text, "smtp.host")
    # the password belongs to a server: naming one means typing it (again)
    r = c.submit("/settings", **{"smtp.host": "127.0.0.1", "smtp.password": SECRET})
    assert "Sender: running" in r.text
    assert "host = 127.0.0.1        ; IP address" in page.ini.read_text(encoding="utf-8")


def test_password_is_kept_changed_or_cleared_and_never_shown(open_page):
    page = open_page()
    c = page.client()
    c.get("/")
    c.submit("/settings", **{"smtp.password": ""})             # empty = keep
    assert f"password = {SECRET}\n" in page.ini.read_text(encoding="utf-8")
    r = c.submit("/settings", **{"smtp.password": "bad ;password"})
    assert "start of a comment" in field_error(r.text, "smtp.password")
    assert "bad ;password" not in r.text
    c.submit("/settings", **{"smtp.password": "N3w-Secret"})
    assert "password = N3w-Secret\n" in page.ini.read_text(encoding="utf-8")
    assert page.gateway.settings.password == "N3w-Secret"
    r = c.submit("/settings", **{"smtp.password.clear": "yes"})
    assert "password =\n" in page.ini.read_text(encoding="utf-8")
    assert "Not set." in r.text
    assert not [seen for seen in c.seen if SECRET in seen or "N3w-Secret" in seen]


def test_save_refuses_when_the_ini_was_edited_meanwhile(open_page):
    page = open_page()
    c = page.client()
    c.get("/")
    page.ini.write_text(page.ini.read_text(encoding="utf-8").replace(
        "messages_per_check = 10", "messages_per_check = 7"), encoding="utf-8")
    r = c.submit("/settings", **{"library.name": "Other"})
    assert any("was changed by someone else" in n for n in flashes(r.text))
    assert "messages_per_check = 7" in page.ini.read_text(encoding="utf-8")
    assert "name = Hill School Library" in page.ini.read_text(encoding="utf-8")
    assert c.form("/settings")["gateway.messages_per_check"] == "7"


# -- Test, Queue ------------------------------------------------------------------------

def test_test_button_queues_a_tmp_file_and_says_when_it_goes(open_page):
    page = open_page()
    c = page.client()
    c.get("/")
    r = c.submit("/test")
    files = list(page.spool.glob("*.TMP"))
    assert len(files) == 1 and files[0].name.startswith("PRIORITY-test-")
    note = " ".join(flashes(r.text))
    assert files[0].name in note and "librarian@school.example" in note
    assert "The next check, at" in note


def test_queue_lists_waiting_and_bad_messages_with_their_reasons(open_page):
    page = open_page()
    drop(page.spool, "letter.TMP", eml(to="pat@example.org", subject="Your <books>"), age=7230)
    drop(page.spool, "broken.BAD", b"junk")
    (page.spool / "broken.BAD-reason.txt").write_text("2026-01-01 10:00:00 the file is empty.",
                                                        encoding="utf-8")
    c = page.client()
    text = c.get("/queue").text
    assert "pat@example.org" in text and "Your &lt;books&gt;" in text and "2 h 0 min" in text
    assert "the file is empty." in text
    assert 'value="broken.BAD"' in text and "Waiting: 1 · .BAD: 1" in text
    assert text.index("broken.BAD") < text.index("letter.TMP")     # what needs a person first


def test_a_long_queue_lists_every_bad_file_and_the_first_waiting_ones(open_page, monkeypatch):
    monkeypatch.setattr(bg, "QUEUE_SHOWN", 3)
    page = open_page()
    for n in range(5):
        drop(page.spool, f"m{n}.TMP", eml(), age=100 - n)
    drop(page.spool, "z.BAD", b"junk")
    text = page.client().get("/queue").text
    assert [name for name in re.findall(r'class="file">([^<]+)<', text)] == \
        ["z.BAD", "m0.TMP", "m1.TMP", "m2.TMP"]
    assert "And 2 more waiting messages" in text


def test_retry_delete_and_send_now(open_page):
    page = open_page()
    drop(page.spool, "gone.BAD", eml(subject="again"))
    drop(page.spool, "old.TMP", eml(subject="unwanted"))
    c = page.client()
    c.get("/queue")
    r = c.post("/queue/retry", {"token": c.token(), "file": "gone.BAD"})
    assert (page.spool / "gone.TMP").exists() and not (page.spool / "gone.BAD").exists()
    assert any("gone.BAD is waiting again as gone.TMP" in n for n in flashes(r.text))
    r = c.post("/queue/delete", {"token": c.token(), "file": "old.TMP"})
    assert not (page.spool / "old.TMP").exists()
    assert any("Deleted old.TMP" in n for n in flashes(r.text))
    c.post("/queue/send-now", {"token": c.token()})
    got = page.sink.wait_for(1)
    assert got[0].message["Subject"] == "again" and got[0].username == "librarian"
    drop(page.spool, "one.BAD", b"x")
    drop(page.spool, "two.BAD", b"y")
    r = c.post("/queue/retry-all", {"token": c.token()})
    assert sorted(p.name for p in page.spool.glob("*.TMP")) == ["one.TMP", "two.TMP"]
    assert len([n for n in flashes(r.text) if "is waiting again" in n]) == 2


def test_retry_and_delete_never_leave_the_spool_folder(open_page):
    page = open_page()
    outside = page.ini.read_bytes()
    (page.spool.parent / "outside.BAD").write_bytes(b"not in the spool")
    c = page.client()
    c.get("/queue")
    for name in ("../bibliogate.ini", "..", "/etc/passwd", "..\\bibliogate.ini", "bibliogate.db",
                 "../outside.BAD", "spool/../../outside.BAD", str(page.spool.parent / "outside.BAD"),
                 ""):
        for action in ("/queue/retry", "/queue/delete"):
            r = c.post(action, {"token": c.token(), "file": name})
            assert r.status == 200
            assert any("not a file name in the spool folder" in n or "There is no queued message" in n
                       for n in flashes(r.text)), (name, flashes(r.text))
    assert page.ini.read_bytes() == outside
    assert (page.spool.parent / "outside.BAD").exists()
    assert page.gateway.settings.database.exists()


# -- Log -------------------------------------------------------------------------------------

def test_log_shows_today_and_earlier_days_newest_first(open_page):
    page = open_page()
    folder = page.gateway.settings.log_folder
    today = bg.local_day(page.clock()).isoformat()
    (folder / "bibliogate-2020-01-02.log").write_text("first <line>\nsecond line\n", encoding="utf-8")
    (folder / "bibliogate-2020-01-01.log").write_text("older\n", encoding="utf-8")
    (folder / f"bibliogate-{today}.log").write_text("a line of today\n", encoding="utf-8")
    c = page.client()
    text = c.get("/log").text
    days = re.findall(r'href="/log\?day=([\d-]+)"', text)
    assert days == [today, "2020-01-02", "2020-01-01"]
    assert "a line of today" in text and "older" not in text
    text = c.get("/log?day=2020-01-02").text
    assert text.index("second line") < text.index("first &lt;line&gt;")
    text = c.get("/log?day=../../bibliogate").text
    assert any("There is no log for" in n for n in flashes(text))


# -- Patrons ---------------------------------------------------------------------------------

def test_patron_search_highlights_missing_email_and_offers_mailto(open_page):
    page = open_page()
    add_patrons(page, ("p1", "Ann Reader", "ann@example.org", "mum@example.org", "7B", 1),
                ("p2", "Bob Noemail", "", "", "7B", 0),
                ("p3", "Cy Other", "cy@example.org", "", "8A", 0))
    c = page.client()
    text = c.get("/patrons?q=7B").text
    assert "Ann Reader" in text and "Bob Noemail" in text and "Cy Other" not in text
    bob = re.search(r'<tr class="missing">.*?</tr>', text, re.S).group(0)
    assert "Bob Noemail" in bob and "no email" in bob and "mailto:" not in bob
    assert 'href="mailto:ann@example.org?subject=' in text
    assert 'href="mailto:mum@example.org?' in text                  # the guardian's
    assert "Cy Other" in c.get("/patrons?q=p3").text                 # by id
    text = c.get("/patrons?q=&missing=1").text
    assert "Bob Noemail" in text and "Ann Reader" not in text


def test_patron_edit_checks_the_addresses_then_saves(open_page):
    page = open_page()
    add_patrons(page, ("p2", "Bob Noemail", "", "", "7B", 0))
    c = page.client()
    c.get("/patron?id=p2")
    r = c.submit("/patron", email="bob at school", guardian_email="dad@example.org")
    assert "is not an email address" in r.text
    assert patron(page, "p2")["email"] == "" and patron(page, "p2")["guardian_email"] == ""
    r = c.submit("/patron", email="bob@example.org", grp="8C", auto_overdue="yes")
    assert patron(page, "p2") == {"patron_id": "p2", "name": "Bob Noemail",
                                  "email": "bob@example.org", "guardian_email": "dad@example.org",
                                  "grp": "8C", "auto_overdue": 1, "first_name": ""}
    assert any("Saved patron p2" in n for n in flashes(r.text))
    c.get("/patron?id=p2")
    c.submit("/patron", auto_overdue=None)
    assert patron(page, "p2")["auto_overdue"] == 0


def test_a_script_in_a_patron_name_is_shown_as_text(open_page):
    page = open_page()
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    add_patrons(page, ("p9", evil, "", "", '"><b>7B', 0))
    c = page.client()
    for path in ("/patrons?q=p9", "/patron?id=p9"):
        text = c.get(path).text
        assert "<script" not in text and "<img" not in text and "<b>7B" not in text
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text


# -- Health -------------------------------------------------------------------------------------

def test_health_is_json_for_monitoring(open_page):
    page = open_page()
    drop(page.spool, "x.BAD", b"junk")
    c = page.client()
    r = c.get("/health")
    info = json.loads(r.text)
    assert r.status == 503 and r.headers.get_content_type() == "application/json"
    assert info["sender"] == "running" and info["bad"] == 1 and info["waiting"] == 0
    assert info["last_check"] and info["ok"] is False
    (page.spool / "x.BAD").unlink()
    assert c.get("/health").status == 200


# -- refusals -----------------------------------------------------------------------------------

def test_a_post_without_the_form_token_is_refused(open_page):
    page = open_page()
    c = page.client()
    c.get("/")
    fields = c.form("/test")
    for token in (None, "", "forged", c.token() + "x"):
        if token is None:
            fields.pop("token")
        else:
            fields["token"] = token
        r = c.post("/test", fields)
        assert r.status == 403 and "out of date" in r.text
    stranger = page.client()                    # a token but no session cookie
    r = stranger.post("/test", {"token": c.token()})
    assert r.status == 403
    assert list(page.spool.glob("*.TMP")) == []


def test_a_post_from_another_site_is_refused(open_page):
    page = open_page()
    c = page.client()
    c.get("/")
    for headers in ({"Origin": "http://evil.example"},
                    {"Origin": f"http://127.0.0.1:{page.port}.evil.example"},
                    {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        r = c.post("/test", {"token": c.token()}, headers=headers)
        assert r.status == 403 and "another web site" in r.text, headers
    assert list(page.spool.glob("*.TMP")) == []
    # What a browser sends from the page itself under Referrer-Policy: no-referrer.
    r = c.post("/test", {"token": c.token()},
               headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert r.status == 200 and len(list(page.spool.glob("*.TMP"))) == 1


def test_a_foreign_host_header_is_refused(open_page):
    page = open_page()
    for host in ("evil.example:{port}", "evil.example", "127.0.0.1:1", "localhost.evil.example:{port}",
                 "10.0.0.1:{port}", "127.0.0.1:{port}.evil.example", ""):
        c = page.client(host=host.format(port=page.port), login=False)
        for r in (c.get("/"), c.get("/health"), c.post("/test", {"token": "x"})):
            assert r.status == 421 and "answers only at" in r.text, host
        assert c.cookie == ""
    assert page.client(host=f"localhost:{page.port}").get("/").status == 200
    assert list(page.spool.glob("*.TMP")) == []


def raw_request(port, data: bytes, timeout=10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_oversized_slow_and_garbled_requests_are_cut_off_and_the_sender_goes_on(open_page):
    page = open_page()
    host = f"127.0.0.1:{page.port}".encode()
    big = raw_request(page.port, b"POST /settings HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: "
                      b"application/x-www-form-urlencoded\r\nContent-Length: 2000000\r\n\r\n")
    assert big.startswith(b"HTTP/1.0 413")
    assert raw_request(page.port, b"\x00\xff garbage HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 501")
    typed = raw_request(page.port, b"POST /test HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: "
                        b"application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert typed.startswith(b"HTTP/1.0 415")
    page.server.request_seconds = 0.3
    slow = raw_request(page.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n", timeout=8)
    assert slow == b""                          # cut off, not waited for
    drop(page.spool, "still.TMP", eml(subject="still sent"))
    page.server.request_seconds = bg.REQUEST_SECONDS
    c = page.client()
    c.get("/queue")
    c.post("/queue/send-now", {"token": c.token()})
    assert page.sink.wait_for(1)[0].message["Subject"] == "still sent"


# -- the page password --------------------------------------------------------------------------

def test_with_a_password_every_page_needs_a_login(open_page):
    stored = bg.hash_password("correct horse", rounds=1000)
    page = open_page(web_hash=("password_hash =         ;", f"password_hash = {stored} ;"))
    c = page.client(login=False)
    r = c.get("/queue")
    assert r.status == 303 and r.headers["Location"] == "/login"
    c.get("/login")
    before = c.cookie
    r = c.post("/login", {"token": c.token(), "password": "wrong"})
    assert "Wrong password" in r.text
    assert c.get("/").status == 303
    page.clock.advance(bg.LOGIN_DELAY_FIRST)          # the wait after one wrong password
    c.get("/login")
    r = c.post("/login", {"token": c.token(), "password": "correct horse"})
    assert r.status == 200 and "<h1>Settings</h1>" in r.text
    assert c.cookie != before                   # a new session at login
    assert c.get("/health").status == 200
    c.post("/logout", {"token": c.token()})
    assert c.get("/queue").status == 303
    assert not [seen for seen in c.seen if "correct horse" in seen or stored in seen]


def test_wrong_passwords_make_their_address_wait_longer_each_time(open_page):
    stored = bg.hash_password("correct horse", rounds=1000)
    page = open_page(web_hash=("password_hash =         ;", f"password_hash = {stored} ;"))
    c = page.client(login=False)
    c.get("/login")
    waits = []
    for _ in range(5):
        r = c.post("/login", {"token": c.token(), "password": "guess"})
        assert "Wrong password" in r.text
        waited = 0.0
        while "Too many wrong passwords" in c.post("/login", {"token": c.token(),
                                                            "password": "guess"}).text:
            page.clock.advance(0.5)                   # bounded: the wait is capped
            waited += 0.5
            assert waited <= bg.LOGIN_DELAY_MAX
        waits.append(waited)
        page.clock.advance(bg.LOGIN_DELAY_MAX)
    assert waits == sorted(waits) and waits[-1] > waits[0]
    # the librarian on this computer is never locked out: a one-time link logs in
    assert page.client().get("/queue").status == 200
    page.clock.advance(bg.LOGIN_DELAY_MAX)
    r = c.post("/login", {"token": c.token(), "password": "correct horse"})
    assert "<h1>Settings</h1>" in r.text


def page_events(gateway):
    db = bg.open_db(gateway.settings.database)
    try:
        return [r[0] for r in db.execute("SELECT detail FROM events WHERE kind = 'page'")]
    finally:
        db.close()


def test_a_port_in_use_or_a_bad_port_keeps_the_page_shut_not_the_sender(tmp_path, sink):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for port, words in ((taken.getsockname()[1], "cannot be used"),
                            ("eighty", "[web] port = 'eighty': not a port number")):
            ini = write_ini(tmp_path / str(port), sink, web__port=port)
            gateway = bg.Gateway(ini, clock=Clock())
            try:
                assert bg.start_page(gateway) is None
                assert words in page_events(gateway)[-1]
                assert gateway.settings.problems == ()
            finally:
                gateway.journal.close()


def test_an_open_address_without_a_password_keeps_the_page_shut(tmp_path, sink):
    ini = write_ini(tmp_path, sink, web__address="0.0.0.0", web__port=0)
    gateway = bg.Gateway(ini, clock=Clock())
    try:
        assert bg.start_page(gateway) is None
        [detail] = page_events(gateway)
        assert "needs a password first" in detail and "set-password" in detail
        assert "gateway sends meanwhile" in detail
        assert gateway.settings.problems == ()      # the sender is not stopped for it
    finally:
        gateway.journal.close()


def test_set_password_stores_a_salted_hash_keeping_the_ini(tmp_path, sink, monkeypatch):
    ini = tmp_path / "bibliogate.ini"
    ini.write_text(commented_ini(sink), encoding="utf-8")
    before = ini.read_text(encoding="utf-8")
    answers = iter(["a long secret", "a long secret"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert bg.main(["--config", str(ini), "set-password"]) == 0
    after = ini.read_text(encoding="utf-8")
    [(old, new)] = changed_lines(before, after)
    stored = new.split("=", 1)[1].split(";")[0].strip()
    assert stored.startswith("pbkdf2_sha256$600000$") and "a long secret" not in after
    assert new.endswith("; written by `set-password`, never by hand\n")
    assert bg.check_password(stored, "a long secret") and not bg.check_password(stored, "other")
    assert bg.hash_password("same", rounds=1000) != bg.hash_password("same", rounds=1000)  # salted


@pytest.mark.parametrize("first, again, words", [("short", "short", "at least 8"),
                                                  ("long enough", "long enuogh", "differ")])
def test_set_password_refuses_short_or_mistyped_ones(tmp_path, monkeypatch, capsys,
                                                     first, again, words):
    ini = write_ini(tmp_path)
    before = ini.read_bytes()
    answers = iter([first, again])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert bg.main(["--config", str(ini), "set-password"]) == 1
    err = capsys.readouterr().err
    assert words in err and "nothing was changed" in err
    assert ini.read_bytes() == before


# -- the ini updater and the Host rule, on their own ------------------------------------------------

def test_update_ini_text_keeps_every_other_byte():
    text = ("\ufeff; top\r\n[smtp]\r\nhost =        ; the server\r\nport=25\r\n"
            "ca_file = a.pem   ; first line\r\n   ; second line of the note\r\n"
            "username = old\r\n   continued\r\n\r\n[gateway]\r\nodd_key = 1 ; mine\r\n")
    new = bg.update_ini_text(text, {("smtp", "host"): "mail.example", ("smtp", "port"): "587",
                                    ("smtp", "username"): "", ("smtp", "ehlo"): "lib.example",
                                    ("library", "name"): "Hill"})
    assert new == ("\ufeff; top\r\n[smtp]\r\nhost = mail.example ; the server\r\nport= 587\r\n"
                   "ca_file = a.pem   ; first line\r\n   ; second line of the note\r\n"
                   "username =\r\nehlo = lib.example\r\n\r\n[gateway]\r\nodd_key = 1 ; mine\r\n"
                   "\r\n[library]\r\nname = Hill\r\n")
    assert bg.update_ini_text(text, {}) == text


def test_values_the_ini_cannot_hold_are_named():
    assert bg.ini_value_problem("fine value; really") is None
    assert "comment" in bg.ini_value_problem("a ;b")
    assert "comment" in bg.ini_value_problem(";b")
    assert "one line" in bg.ini_value_problem("a\nb = c")
    assert "space" in bg.ini_value_problem(" a")


@pytest.mark.parametrize("host, address, ok", [
    ("127.0.0.1:8025", "127.0.0.1", True), ("localhost:8025", "127.0.0.1", True),
    ("LOCALHOST:8025", "127.0.0.1", True), ("127.0.0.1", "127.0.0.1", False),
    ("127.0.0.1:8026", "127.0.0.1", False), ("evil.example:8025", "127.0.0.1", False),
    ("192.168.1.5:8025", "192.168.1.5", True), ("192.168.1.6:8025", "192.168.1.5", False),
    ("192.168.1.6:8025", "0.0.0.0", True), ("evil.example:8025", "0.0.0.0", False),
    ("library.school:8025", "library.school", True), ("127.0.0.1:8025 x", "127.0.0.1", False),
])
def test_host_rule(host, address, ok):
    assert bg.host_allowed(host, address, 8025) is ok


# -- what only the page needs ----------------------------------------------------------------------

#: Modules only the page (or `page`, `mailto --open`, `set-password`) needs.
PAGE_ONLY = ("http.server", "socketserver", "webbrowser", "getpass", "html", "mimetypes")


def test_send_and_status_import_none_of_the_pages_modules(tmp_path, sink):
    ini = write_ini(tmp_path, sink)
    code = ("import sys, bibliogate\n"
            "for words in (['send'], ['status']):\n"
            f"    bibliogate.main(['--config', {str(ini)!r}, *words])\n"
            f"print('loaded:', sorted(m for m in {PAGE_ONLY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout, done.stdout


@pytest.mark.parametrize("text", ["", "plain", "<b>&amp;\"'</b>", "a&&b<<>>", "“é” & ‘ü’ ' \"",
                                  "&#x27;&quot;", "\x00<\u2028>"])
def test_esc_escapes_as_html_escape_does(text):
    import html
    assert bg.esc(text) == html.escape(text, quote=True)
    assert bg.esc(bg.Html(text)) == text


# -- `run` serves it ---------------------------------------------------------------------------------

def test_run_serves_the_page_beside_the_sender(tmp_path, sink):
    ini = write_ini(tmp_path, sink, web__port=0)
    proc = subprocess.Popen([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini), "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = None
        for _ in range(200):                     # bounded: at most ~20 s
            if (tmp_path / "bibliogate.db").exists():
                db = bg.open_db(tmp_path / "bibliogate.db")
                url = bg.get_state(db, "page_url")
                db.close()
                if url:
                    break
            time.sleep(0.1)
        assert url, "run did not start its page"
        port = int(url.rsplit(":", 1)[1].strip("/"))
        r = PageClient(port).get("/health")
        assert json.loads(r.text)["sender"] == "running"
    finally:
        proc.terminate()
        proc.wait(20)


def test_patrons_page_builds_each_mail_link_once_per_change(open_page, monkeypatch):
    page = open_page()
    add_patrons(page, ("p1", "Ann Reader", "ann@example.org", "mum@example.org", "7B", 1),
                ("p3", "Cy Other", "cy@example.org", "", "8A", 0))
    built, real = [], bg.build_mailto

    def build_mailto(settings, db, patron_id, guardian=False, today=None):
        built.append((patron_id, guardian))
        return real(settings, db, patron_id, guardian=guardian, today=today)

    monkeypatch.setattr(bg, "build_mailto", build_mailto)
    c = page.client()
    first = c.get("/patrons").text
    assert len(built) == 4                     # two patrons, [Email] and [Email guardian] each
    assert c.get("/patrons").text.count("mailto:") == first.count("mailto:") == 3
    assert len(built) == 4                     # the second request built none
    # a change to a patron builds that patron's again, with the new address
    db = page.db()
    with db:
        db.execute("UPDATE patrons SET email = 'ann.new@example.org' WHERE patron_id = 'p1'")
    db.close()
    assert "mailto:ann.new@example.org?" in c.get("/patrons").text
    assert built[4:] == [("p1", False), ("p1", True)]
    # so does a new `direct` template
    template = page.gateway.settings.templates / "direct.txt"
    text = template.read_text(encoding="utf-8")
    template.write_text(text.replace("\n\n", "\n\nA NEW LINE\n", 1), encoding="utf-8")
    stamp = time.time() + 5
    os.utime(template, (stamp, stamp))
    assert "A%20NEW%20LINE" in c.get("/patrons").text and len(built) == 10
