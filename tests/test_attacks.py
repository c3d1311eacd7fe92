"""Attacks on the config page, one after another, each against a real page
server, the gateway loop of `run` and a real aiosmtpd sink behind it.

After every attack the same things must hold (Witness.unharmed):

* every answer was a refusal (4xx) or escaped output;
* bibliogate.ini is byte for byte as it was, and so is the spool folder,
  unless the attack was a legitimate change the test meant to make;
* the SMTP password is in no answer, neither in a body nor in a header;
* the sender still delivers a message queued afterwards to the sink.

The page's own timeouts are lowered through its module constants for the
slow-client attacks, so the module stays within a few seconds of each."""

from __future__ import annotations

import contextlib
import hashlib
import html
import http.client
import json
import os
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from aiosmtpd.smtp import AuthResult

import bibliogate as bg
from conftest import REPO, Sink, eml, write_ini
from page_support import SECRET, PageClient, field_error, flashes, open_page  # noqa: F401
from test_page import add_patrons, drop, raw_request

#: Markup that would run, or open a tag, if it were ever put in a page as it is.
PAYLOAD = '"><script>alert(1)</script><img src=x onerror=alert(2)>\''
#: What escaping makes of it.
ESCAPED = html.escape(PAYLOAD, quote=True)
#: Forms of a line break that must never reach the ini inside a value.
LINE_BREAKS = ("\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029")


def inert(text: str) -> bool:
    """No tag of PAYLOAD opened: the page's own HTML has no script or img."""
    low = text.lower()
    return "<script" not in low and "<img" not in low


def snapshot(folder) -> dict:
    """Every file in a folder, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def patrons_table(page) -> list:
    db = page.db()
    try:
        return [tuple(r) for r in db.execute("SELECT * FROM patrons ORDER BY patron_id")]
    finally:
        db.close()


class Witness:
    """Takes note of the gateway before an attack and checks it after."""

    def __init__(self, page):
        self.page = page
        self.ini = page.ini.read_bytes()
        self.spool = snapshot(page.spool)
        self.patrons = patrons_table(page)
        self.raw: list[bytes] = []          #: answers read from raw sockets
        self.delivered = 0

    def answers(self) -> list[str]:
        return [seen for c in self.page.clients for seen in c.seen] + \
            [data.decode("latin-1") for data in self.raw]

    def unharmed(self, ini_changed: bool = False, spool_changed: bool = False) -> None:
        page = self.page
        if not ini_changed:
            assert page.ini.read_bytes() == self.ini, "bibliogate.ini was changed"
        if not spool_changed:
            assert snapshot(page.spool) == self.spool, "the spool folder was changed"
            assert patrons_table(page) == self.patrons, "a patron was changed"
        leaks = [a[:300] for a in self.answers() if SECRET in a]
        assert not leaks, leaks
        self.still_delivers()

    def still_delivers(self) -> None:
        """Queue a message, press "Send now" on the page, see it arrive."""
        page = self.page
        self.delivered += 1
        subject = f"still delivered {self.delivered}"
        drop(page.spool, f"after-attack-{self.delivered}.TMP", eml(subject=subject), age=3600)
        c = page.client()
        c.get("/queue")
        assert c.post("/queue/send-now", {"token": c.token()}).status == 200
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:                  # bounded: 15 s at most
            if any(m.message["Subject"] == subject for m in page.sink.messages):
                return
            time.sleep(0.02)
        raise AssertionError(f"the sender did not deliver {subject!r} after the attack")


# -- raw HTTP --------------------------------------------------------------------------------

def connect(page, timeout=5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", page.port), timeout=timeout)


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer (headers and Content-Length bytes) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def safe_answer(answer: bytes) -> bool:
    """An HTML answer has no tag of PAYLOAD open; any other kind is plain text
    or JSON that the browser is told not to read as HTML. (An answer without
    a status line, to a request line that is not HTTP/1.x, is read as HTML.)"""
    head, _, body = answer.partition(b"\r\n\r\n")
    if not answer.startswith(b"HTTP/"):
        return inert(answer.decode("latin-1"))
    head = head.decode("latin-1").lower()
    if "content-type: text/html" in head:
        return inert(body.decode("latin-1"))
    return "x-content-type-options: nosniff" in head and (
        "content-type: text/plain" in head or "content-type: application/json" in head)


def safe(r) -> bool:
    """safe_answer for a PageClient response."""
    kind = r.headers.get_content_type()
    if kind == "text/html":
        return inert(r.text)
    return r.headers.get("X-Content-Type-Options") == "nosniff" and \
        kind in ("text/plain", "application/json")


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Whether the server has closed (or reset) the connection within `wait`."""
    ready, _, _ = select.select([sock], [], [], wait)
    if not ready:
        return False
    try:
        return sock.recv(65536) == b""
    except OSError:
        return True


def send_until_refused(sock: socket.socket, total: int, piece: int = 65536) -> int:
    """Send up to `total` bytes of body; return how many went before the
    connection was refused (`total` if it never was)."""
    sent, block = 0, b"a" * piece
    try:
        while sent < total:
            sock.sendall(block)
            sent += piece
    except OSError:
        return sent
    return sent


def form_request(page, path: str, body: bytes, cookie: str = "", extra: str = "",
                 length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n"
            f"Origin: http://127.0.0.1:{page.port}\r\n"
            + (f"Cookie: {cookie}\r\n" if cookie else "")
            + (f"Content-Length: {length}\r\n" if length >= 0 else "") + extra + "\r\n")
    return head.encode("latin-1") + body


# -- cross-site posts ------------------------------------------------------------------------

def victim_forms(page, c) -> dict:
    """For every action of the page, a form that would change something if
    it were accepted."""
    c.get("/")
    settings = c.form("/settings")
    del settings["token"]
    settings.update({"smtp.host": "evil.example", "library.name": "Forged"})
    return {"/settings": settings, "/test": {}, "/queue/retry": {"file": "victim.BAD"},
            "/queue/retry-all": {}, "/queue/delete": {"file": "held.TMP"},
            "/queue/send-now": {}, "/patron": {"patron_id": "p1", "email": "evil@evil.example"},
            "/logout": {}, "/login": {"password": "guess"}}


def test_cross_site_posts_are_refused_on_every_action(open_page):
    page = open_page()
    add_patrons(page, ("p1", "Ann Reader", "ann@example.org", "", "7B", 1))
    drop(page.spool, "victim.BAD", eml(subject="victim"))
    drop(page.spool, "held.TMP", eml(subject="held"), age=1800)
    witness = Witness(page)
    victim, other, stranger = page.client(), page.client(), page.client()
    forms = victim_forms(page, victim)
    other.get("/")
    own = f"http://127.0.0.1:{page.port}"
    forgeries = {
        "no token": (victim, None, {}),
        "an empty token": (victim, "", {}),
        "a made-up token": (victim, "A" * 32, {}),
        "the token of another session": (victim, other.token(), {}),
        "the victim's token without its cookie": (stranger, victim.token(), {}),
        "a foreign Origin": (victim, victim.token(), {"Origin": "http://evil.example"}),
        "an Origin on another port": (victim, victim.token(), {"Origin": "http://127.0.0.1:1"}),
        "a look-alike Origin": (victim, victim.token(), {"Origin": f"{own}.evil.example"}),
        "an https Origin": (victim, victim.token(), {"Origin": own.replace("http:", "https:")}),
        "Sec-Fetch-Site: cross-site": (victim, victim.token(), {"Sec-Fetch-Site": "cross-site"}),
        "Sec-Fetch-Site: cross-site, Origin null": (
            victim, victim.token(), {"Origin": "null", "Sec-Fetch-Site": "cross-site"}),
        "Sec-Fetch-Site: same-site": (victim, victim.token(), {"Sec-Fetch-Site": "same-site"}),
        "Origin null and no token": (victim, None, {"Origin": "null"}),
        "a text/plain body": (victim, victim.token(), {"Content-Type": "text/plain"}),
        "a multipart body": (victim, victim.token(),
                             {"Content-Type": "multipart/form-data; boundary=x"}),
    }
    for action, fields in forms.items():
        for what, (client, token, headers) in forgeries.items():
            sent = dict(fields, **({} if token is None else {"token": token}))
            r = client.post(action, sent, follow=False, headers=headers)
            assert r.status in (403, 415), (action, what, r.status)
            assert r.headers.get("Location") is None and "Set-Cookie" not in r.headers
    # A page of another site may also make the browser GET any address (an
    # <img src=...>): no address changes anything, whatever method it names.
    token = victim.token()
    for action, fields in forms.items():
        query = urllib.parse.urlencode(dict(fields, token=token))
        assert victim.get(f"{action}?{query}").status in (200, 400, 404), action
        for method in ("HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"):
            assert victim.request(method, f"{action}?{query}").status == 501, (method, action)
    assert victim.get("/queue").status == 200                   # still logged in, same session
    assert "victim.BAD" in victim.page
    witness.unharmed()


# -- DNS rebinding -----------------------------------------------------------------------------

FOREIGN_HOSTS = (
    "evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
    "127.0.0.1.evil.example:{port}", "localhost.evil.example:{port}", "localhost.:{port}",
    "127.0.0.1:{port}.evil.example", "127.0.0.1:{port}@evil.example", "evil.example@127.0.0.1:{port}",
    "127.0.0.1", "127.0.0.1:1", "localhost", "", " ", "10.0.0.1:{port}",
    # IPv6 forms: only the loopback literal [::1] with our port names this page
    "[::1]", "::1:{port}", "[::ffff:127.0.0.1]:{port}", "[::]:{port}", "[fe80::1%25lo]:{port}",
    "[::1]:{port}.evil.example", "[::1]:1", "[evil.example]:{port}",
)


def test_foreign_host_headers_are_refused_everywhere(open_page):
    page = open_page()
    witness = Witness(page)
    own = page.client()
    own.get("/")
    token, cookie = own.token(), own.cookie
    for host in FOREIGN_HOSTS:
        c = page.client(host=host.format(port=page.port))
        c.cookie = cookie                       # even with the victim's session and token
        answers = [c.get(path) for path in ("/", "/queue", "/log", "/patrons", "/health",
                                             "/style.css", "/nope")]
        answers.append(c.post("/test", {"token": token}, follow=False))
        for r in answers:
            assert r.status == 421 and "answers only at" in r.text, (host, r.status)
            assert "Set-Cookie" not in r.headers and "<form" not in r.text
    for raw in (b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: evil.example\r\nHost: 127.0.0.1:%d\r\n\r\n" % page.port,
                b"GET / HTTP/1.1\r\nHost:\r\n\r\n"):
        answer = raw_request(page.port, raw)
        witness.raw.append(answer)
        assert status_of(answer) == 421, raw
    for host in ("127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"):
        assert page.client(host=host.format(port=page.port)).get("/health").status == 200, host
    witness.unharmed()


# -- script and HTML in every value ---------------------------------------------------------------

@pytest.fixture
def page_log(open_page):
    """The log/ files written, as `run` writes them, for the Log page to show."""
    yield lambda page: bg.setup_logging(page.gateway.settings, console=False)
    for handler in list(bg.log.handlers):
        bg.log.removeHandler(handler)
        handler.close()


def test_script_in_every_settings_field_is_refused_or_shown_escaped(open_page):
    page = open_page()
    witness = Witness(page)
    c = page.client()
    c.get("/")
    typed = {f.name: PAYLOAD for f in bg.SETTINGS_FIELDS if f.kind == "text"}
    typed["smtp.security"] = PAYLOAD
    typed["smtp.password"] = PAYLOAD
    r = c.submit("/settings", **typed)
    assert r.status == 200 and inert(r.text)
    assert any("Nothing was saved" in n for n in flashes(r.text))
    shown = c.form("/settings")
    for f in bg.SETTINGS_FIELDS:
        if f.kind == "text":
            assert shown[f.name] == PAYLOAD, f.name                 # shown again, as text
            assert f'value="{ESCAPED}"' in r.text
    for name in ("smtp.host", "smtp.port", "smtp.security", "smtp.ehlo", "gateway.from_address",
                 "gateway.minutes_between_checks", "gateway.messages_per_check",
                 "gateway.test_to_address", "library.date_format"):
        error = field_error(r.text, name)
        assert error, name                                     # the reason beside the field
    assert PAYLOAD not in field_error(r.text, "smtp.password")   # "(hidden)"
    assert "&lt;script&gt;" in r.text
    witness.unharmed()
    # The library name takes any text: saved, it is shown escaped on every page.
    c.get("/")
    r = c.submit("/settings", **{"library.name": PAYLOAD})
    assert any("Saved [library] name" in n for n in flashes(r.text))
    for path in ("/", "/queue", "/log", "/patrons", "/patron?id=nobody", "/nope"):
        r = c.get(path)
        assert safe(r) and f'<span class="library">{ESCAPED}</span>' in r.text, path
    witness.unharmed(ini_changed=True)


def wait_until(condition, seconds: float = 10.0) -> bool:
    """Poll `condition` (bounded) until it holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_script_written_into_the_ini_by_hand_is_shown_escaped(open_page):
    page = open_page()
    original = page.ini.read_bytes()
    c = page.client()
    text = original.decode("utf-8")
    for f in bg.SETTINGS_FIELDS:        # the password too: markup around the real one
        value = SECRET + PAYLOAD if f.kind == "password" else PAYLOAD
        text = bg.update_ini_text(text, {(f.section, f.key): value})
    page.ini.write_bytes(text.encode("utf-8"))
    try:
        # the loop reads a hand edit at its next tick
        assert wait_until(lambda: page.gateway.settings.library_name == PAYLOAD)
        for path in ("/", "/queue", "/log", "/patrons", "/health"):
            r = c.get(path)
            assert safe(r), path
            assert r.headers.get_content_type() != "text/html" or PAYLOAD not in r.text, path
        settings_page = c.get("/").text
        assert "Sender: stopped" in settings_page
        assert field_error(settings_page, "smtp.host") == \
            f"bibliogate.ini [smtp] host = {PAYLOAD!r}: not a server name or IP address."
        assert f'<span class="library">{ESCAPED}</span>' in settings_page
        assert f'value="{ESCAPED}"' in settings_page
    finally:
        page.ini.write_bytes(original)
    assert wait_until(lambda: not page.gateway.settings.problems)
    Witness(page).unharmed()            # also: no answer held the password


def test_script_in_every_patron_column_is_shown_escaped(open_page, page_log):
    page = open_page()
    evil_id = "p<script>1"
    page_log(page)
    add_patrons(page, (evil_id, PAYLOAD, PAYLOAD, PAYLOAD, PAYLOAD, 1),
                ("p2", PAYLOAD, "ok@example.org", "mum@example.org", "7B", 1))
    witness = Witness(page)
    c = page.client()
    pages = [c.get("/patrons"), c.get("/patrons?" + urllib.parse.urlencode({"q": PAYLOAD})),
             c.get("/patrons?q=p&missing=1"),
             c.get("/patron?" + urllib.parse.urlencode({"id": evil_id})),
             c.get("/patron?id=p2"), c.get("/patron?" + urllib.parse.urlencode({"id": PAYLOAD}))]
    for r in pages:
        assert r.status == 200 and inert(r.text)
    listing = pages[0].text
    assert listing.count(ESCAPED) >= 5 and html.escape(evil_id) in listing
    assert "There is no patron" in pages[-1].text
    c.get("/patron?" + urllib.parse.urlencode({"id": evil_id}))
    r = c.submit("/patron", email=PAYLOAD, guardian_email=PAYLOAD, grp=PAYLOAD + "\nmore")
    assert inert(r.text)
    assert any("Nothing was saved" in n for n in flashes(r.text))
    assert r.text.count("is not an email address") == 2 and "A group is one line" in r.text
    r = c.post("/patron", {"token": c.token(), "patron_id": PAYLOAD, "email": ""})
    assert inert(r.text) and any("There is no patron" in n for n in flashes(r.text))
    witness.unharmed()
    # A change that is allowed (a group with markup in it) is saved, logged and
    # shown escaped everywhere, the log page too.
    c.get("/patron?id=p2")
    r = c.submit("/patron", grp="<b>8C</b>")
    assert inert(r.text) and "&lt;b&gt;8C&lt;/b&gt;" in r.text and "<b>8C" not in r.text
    c.get("/patron?" + urllib.parse.urlencode({"id": evil_id}))
    c.submit("/patron", email="", guardian_email="", grp=PAYLOAD)
    log = c.get("/log").text
    assert inert(log) and f"patron {html.escape(evil_id)}: changed email" in log
    assert inert(c.get("/patrons").text)
    witness = Witness(page)
    witness.unharmed()


def test_queue_and_log_pages_show_subjects_recipients_and_names_escaped(open_page, page_log):
    page = open_page()
    page_log(page)
    drop(page.spool, "plain.TMP", eml(to='"<script>alert(1)</script>" <pat@example.org>',
                                       subject="<script>alert(2)</script>"), age=7200)
    encoded = "=?utf-8?b?" + __import__("base64").b64encode(PAYLOAD.encode()).decode() + "?="
    drop(page.spool, "encoded.TMP", eml(subject=encoded, to="kid@example.org"), age=7100)
    drop(page.spool, "broken.BAD", b"junk")
    (page.spool / "broken.BAD-reason.txt").write_text(f"2026-01-01 10:00:00 {PAYLOAD}",
                                                        encoding="utf-8")
    names = ["broken.BAD"]
    if os.name != "nt":                      # Windows refuses < > " in file names
        odd = '"><img src=x onerror=alert(3)>.BAD'
        drop(page.spool, odd, eml(subject="odd name"))
        names.append(odd)
    witness = Witness(page)
    c = page.client()
    text = c.get("/queue").text
    assert inert(text)
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    assert "&quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot; &lt;pat@example.org&gt;" in text
    assert ESCAPED in text                                         # the decoded subject, the reason
    for name in names:
        assert f'value="{html.escape(name)}"' in text
    witness.unharmed()
    # Retry them: the notes about it and the log name the files, escaped.
    for name in names:
        r = c.post("/queue/retry", {"token": c.token(), "file": name})
        assert inert(r.text) and any("is waiting again" in n for n in flashes(r.text))
    c.post("/queue/send-now", {"token": c.token()})
    deadline = time.monotonic() + 15
    while list(page.spool.glob("plain*.TMP")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert inert(c.get("/queue").text)
    log = c.get("/log").text
    assert inert(log) and "plain.TMP" in log
    if len(names) > 1:
        assert html.escape(names[1][:-4]) in log
    witness = Witness(page)
    witness.unharmed()


def test_error_pages_of_the_server_itself_are_escaped(open_page):
    page = open_page()
    witness = Witness(page)
    for raw in (b"GET /<script>alert(1)</script> HTTP/1.1 extra\r\n\r\n",
                b"<script>alert(1)</script> / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                b"GET / HTTP/9.9<img src=x>\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: <script>alert(1)</script>\r\n\r\n"):
        answer = raw_request(page.port, raw)
        witness.raw.append(answer)
        # 501 Not Implemented is the answer to a method no one knows
        assert (400 <= status_of(answer) <= 501 or not answer.startswith(b"HTTP/")) \
            and safe_answer(answer), raw
    witness.unharmed()


# -- retry and delete names ------------------------------------------------------------------------

#: What the Queue page says of a name that is not a queued message.
REFUSED_NAME = ("is not a file name in the spool folder", "There is no queued message called",
                "is already waiting to be sent")


def test_retry_and_delete_names_never_reach_outside_the_queue(open_page):
    page = open_page()
    drop(page.spool, "real.BAD", eml(subject="real"))
    (page.spool.parent / "outside.BAD").write_bytes(b"outside")
    lock = ".bibliogate-sender.lock"
    assert (page.spool / lock).exists()
    witness = Witness(page)
    names = ["../bibliogate.ini", "..\\bibliogate.ini", "../outside.BAD", "..\\outside.BAD",
             "%2e%2e%2fbibliogate.ini", "%2e%2e%2foutside.BAD", "..%2foutside.BAD",
             "%252e%252e%252foutside.BAD", str(page.ini), str(page.spool.parent / "outside.BAD"),
             "/etc/passwd", "C:\\Windows\\win.ini", "\\\\server\\share\\x.BAD", "C:outside.BAD",
             "real.BAD\x00", "real.BAD\x00.txt", "../outside.BAD\x00", "\x00",
             lock, lock + ".BAD", "real.BAD-reason.txt", "bibliogate.db", ".", "..", "",
             "real.BAD/", "real.BAD/.", "./real.BAD/..", "spool/../real.BAD",
             "x" * 300 + ".BAD", "real.BAD ", " real.BAD", "real.BAD.", "REAL.BAD:stream"]
    c = page.client()
    c.get("/queue")
    for name in names:
        for action in ("/queue/retry", "/queue/delete"):
            r = c.post(action, {"token": c.token(), "file": name})
            assert r.status == 200, (name, r.status)
            notes = flashes(r.text)
            assert len(notes) == 1 and inert(r.text), (action, name, notes)
            assert any(words in notes[0] for words in REFUSED_NAME), (action, name, notes)
    # The same, sent as the raw bytes a hand-made request could carry.
    for raw_name in (b"..%2Fbibliogate.ini", b"%2E%2E%5Cbibliogate.ini", b"real.BAD%00",
                     b"%C0%AE%C0%AE%2Fbibliogate.ini", b"%FF%FE.BAD"):
        body = b"token=" + c.token().encode() + b"&file=" + raw_name
        answer = raw_request(page.port, form_request(page, "/queue/delete", body, c.cookie))
        witness.raw.append(answer)
        assert status_of(answer) in (303, 400), raw_name
    assert (page.spool.parent / "outside.BAD").read_bytes() == b"outside"
    assert page.client().get("/queue").text.count("real.BAD") >= 1
    witness.unharmed()


# -- oversized and lying bodies --------------------------------------------------------------------

HUNDRED_MB = 100 * 1024 * 1024


def test_a_100_mb_post_is_refused_from_its_length_without_being_read(open_page):
    page = open_page()
    witness = Witness(page)
    c = page.client()
    c.get("/")
    for path in ("/settings", "/test", "/nope"):
        with connect(page) as sock:
            sock.sendall(form_request(page, path, b"", c.cookie, length=HUNDRED_MB))
            answer = read_answer(sock)          # answered before a byte of the body went
            witness.raw.append(answer)
            assert status_of(answer) == 413, answer[:200]
            assert b"Connection: close" in answer or closed_by_server(sock, 5)
            assert send_until_refused(sock, 32 * 1024 * 1024) < 32 * 1024 * 1024
    witness.unharmed()


def test_lying_and_chunked_bodies_are_refused(open_page, monkeypatch):
    monkeypatch.setattr(bg, "REQUEST_SECONDS", 1.0)
    page = open_page()
    witness = Witness(page)
    c = page.client()
    c.get("/queue")
    token = c.token().encode()
    chunked = "Transfer-Encoding: chunked\r\n"
    # 1. chunked with no length: refused before any chunk is read
    with connect(page) as sock:
        sock.sendall(form_request(page, "/queue/send-now", b"", c.cookie, chunked, length=-1))
        answer = read_answer(sock)
        witness.raw.append(answer)
        assert status_of(answer) == 411
        assert send_until_refused(sock, 32 * 1024 * 1024) < 32 * 1024 * 1024
    # 2. a length that is not a plain number of bytes
    for length in ("-1", "1e3", "0x10", "+5", "5, 5", "99999999999999999999999999", "9" * 5000,
                   "\xb2", "\xb9", "\xbd", " "):
        with connect(page) as sock:
            sock.sendall(form_request(page, "/queue/send-now", b"", c.cookie,
                                      f"Content-Length: {length}\r\n", length=-1))
            answer = read_answer(sock)
            witness.raw.append(answer)
            assert 400 <= status_of(answer) < 500, (length, answer[:120])
    # 3. a length and chunks: the length is all that is read, and the chunk
    #    framing is not a form the page takes
    body = b"1e\r\ntoken=" + token + b"\r\n0\r\n\r\n"
    answer = raw_request(page.port, form_request(page, "/queue/send-now", body, c.cookie,
                                                 chunked, length=len(body)))
    witness.raw.append(answer)
    assert 400 <= status_of(answer) < 500
    # 4. a body longer than its length: the rest is never read
    body = b"token=" + token + b"&file=nothing.BAD"
    with connect(page) as sock:
        sock.sendall(form_request(page, "/queue/retry", body, c.cookie))
        answer = read_answer(sock)
        witness.raw.append(answer)
        assert status_of(answer) == 303
        assert send_until_refused(sock, 32 * 1024 * 1024) < 32 * 1024 * 1024
    # 5. a body shorter than its length: cut off at the deadline, nothing done
    with connect(page) as sock:
        sock.sendall(form_request(page, "/queue/delete", b"token=" + token, c.cookie, length=500))
        assert closed_by_server(sock, 5)
    witness.unharmed()


# -- slow clients ---------------------------------------------------------------------------------

def drip(sock: socket.socket, data: bytes, every: float = 1.0, limit: float = 6.0) -> float | None:
    """Send `data` a byte every `every` seconds; the seconds after which the
    server cut the connection, or None if it never did within `limit`."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > limit:
            return None
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - start
        if closed_by_server(sock, every):
            return time.monotonic() - start
    return None


@pytest.fixture
def quick_deadline(monkeypatch):
    """The page's request deadline and socket timeout, lowered for the test."""
    monkeypatch.setattr(bg, "REQUEST_SECONDS", 1.0)
    monkeypatch.setattr(bg.PageHandler, "timeout", 2.0)


def test_a_client_sending_a_byte_a_second_is_cut_off(open_page, quick_deadline):
    page = open_page()
    witness = Witness(page)
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\nX-Slow: {'a' * 40}\r\n\r\n".encode()
    with connect(page) as sock:
        assert drip(sock, request) is not None, "a slow request head was waited for"
    with connect(page) as sock:                 # a slow body
        c = page.client()
        c.get("/queue")
        body = f"token={c.token()}&file=x.BAD".encode()
        sock.sendall(form_request(page, "/queue/delete", b"", c.cookie, length=len(body)))
        assert drip(sock, body) is not None, "a slow form was waited for"
    with connect(page) as sock:                 # a connection that says nothing at all
        assert closed_by_server(sock, 5)
    witness.unharmed()


def test_a_slow_second_request_on_a_kept_alive_connection_is_cut_off(open_page, quick_deadline):
    page = open_page()
    witness = Witness(page)
    host = f"127.0.0.1:{page.port}"
    with connect(page) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        first = read_answer(sock)
        witness.raw.append(first)
        assert status_of(first) in (200, 503) and b"Connection: close" not in first
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: {'a' * 40}\r\n\r\n".encode()
        assert drip(sock, request) is not None, "a slow second request was waited for"
    witness.unharmed()


def test_many_slow_clients_do_not_shut_out_the_librarian(open_page, quick_deadline):
    page = open_page()
    witness = Witness(page)
    # Many, but short of the cap on one address's connections by more than the
    # librarian's own (one ending as the next begins): the cap has its own test.
    slow = [connect(page) for _ in range(bg.MAX_CONNECTIONS_PER_ADDRESS - 8)]
    try:
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: ")
        c = page.client()
        for path in ("/", "/queue", "/health"):
            assert c.get(path).status in (200, 503), path
        witness.unharmed()
        assert all(closed_by_server(sock, 5) for sock in slow)
    finally:
        for sock in slow:
            sock.close()


# -- the SMTP password --------------------------------------------------------------------------------

def test_no_answer_holds_the_password_nor_a_plain_hash_of_the_ini(open_page):
    """The Settings form carries a digest of bibliogate.ini, to notice a hand
    edit made meanwhile. The page shows the other values of that file, so a
    plain hash of it would let anyone who can open the page try password
    guesses offline, as fast as a computer hashes."""
    page = open_page()
    witness = Witness(page)
    c = page.client()
    for path in ("/", "/settings", "/queue", "/log", "/patrons", "/health", "/login"):
        c.get(path)
    c.get("/")
    c.submit("/settings", **{"smtp.port": "abc"})           # a refused Save shows the form again
    data = page.ini.read_bytes()
    for digest in (hashlib.sha256(data).hexdigest(), hashlib.sha1(data).hexdigest(),
                   hashlib.md5(data).hexdigest()):
        assert not [a for a in witness.answers() if digest[:12] in a]
    c.get("/")
    r = c.submit("/settings", **{"library.name": "Hill School"})      # and Save still works
    assert any("Saved [library] name" in n for n in flashes(r.text))
    witness.unharmed(ini_changed=True)


# -- header injection into the ini -------------------------------------------------------------------

def test_a_line_break_in_any_field_never_reaches_the_ini(open_page):
    page = open_page()
    witness = Witness(page)
    c = page.client()
    names = [f.name for f in bg.SETTINGS_FIELDS if f.kind in ("text", "password")]
    for brk in LINE_BREAKS:
        injected = f"x{brk}[smtp]{brk}password = y"
        c.get("/")
        r = c.submit("/settings", **{name: injected for name in names})
        assert r.status == 200 and any("Nothing was saved" in n for n in flashes(r.text)), repr(brk)
        for name in names:
            assert "must be one line" in field_error(r.text, name), (repr(brk), name)
        assert page.ini.read_bytes() == witness.ini, repr(brk)
        # one field alone, the free-text library name, is refused as well
        c.get("/")
        r = c.submit("/settings", **{"library.name": f"Hill{brk}[smtp]{brk}password = y"})
        assert "must be one line" in field_error(r.text, "library.name"), repr(brk)
        assert page.ini.read_bytes() == witness.ini, repr(brk)
    assert page.gateway.settings.password == SECRET
    witness.unharmed()


# == A red team on the same server and on the school network ================================
#
# Each attack below was found getting through; each test drives it from outside (real
# sockets, files, an SMTP server of the attacker's own) and, where the tests run as root,
# from a second operating-system account ("nobody").



class CredentialTrap(Sink):
    """An attacker's SMTP server: offers AUTH, takes any login, keeps every
    (username, password) it is given."""

    def __init__(self):
        super().__init__(auth=("anyone", "anything"))
        self.captured: list[tuple[str, str]] = []

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        with self._lock:
            self.captured.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=True, handled=False, auth_data=auth_data)


@pytest.fixture
def trap():
    t = CredentialTrap().start()
    yield t
    t.stop()


def send_now_and_wait(page, c, sessions_before: int, sink, seconds: float = 10.0) -> None:
    """Press "Send now" and wait (bounded) until `sink` has had a connection."""
    c.get("/queue")
    c.post("/queue/send-now", {"token": c.token()})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sink.sessions <= sessions_before:
        time.sleep(0.02)
    time.sleep(0.3)                     # the login, if any, follows the greeting


@pytest.mark.parametrize("change", ["port", "username", "security"])
def test_the_stored_smtp_password_never_reaches_a_server_it_was_not_typed_for(open_page, trap,
                                                                              change):
    page = open_page()
    drop(page.spool, "waiting.TMP", eml(subject="held"), age=3600)
    c = page.client()
    c.get("/")
    assert "changing the server, port, security or username clears it" in c.page
    edits = {"port": {"smtp.port": str(trap.port)},
             # the same server, now as another account of it, or without TLS
             "username": {"smtp.port": str(trap.port), "smtp.username": "mallory"},
             "security": {"smtp.port": str(trap.port), "smtp.security": "none"}}[change]
    r = c.submit("/settings", **edits)
    text = page.ini.read_text(encoding="utf-8")
    assert SECRET not in text, "the stored password survived a change of its server"
    assert "password =\n" in text
    assert "Type the password for" in field_error(r.text, "smtp.password")
    assert any("The SMTP password was cleared" in n for n in flashes(r.text))
    assert page.gateway.sender_state[0] == "stopped"     # until the password is typed
    send_now_and_wait(page, c, 0, trap, seconds=1.0)
    assert not [p for _, p in trap.captured if p == SECRET], trap.captured
    assert not trap.messages, "queued mail reached a server the librarian never chose"
    # typed again in the same Save, it goes to the server it was typed for
    c.get("/")
    c.submit("/settings", **{"smtp.password": "typed-for-the-trap"})   # Save starts a check
    login = ("librarian" if change != "username" else "mallory", "typed-for-the-trap")
    assert wait_until(lambda: login in trap.captured), trap.captured


def test_a_password_in_clear_to_another_computer_is_refused_with_the_reason(open_page):
    page = open_page()
    c = page.client()
    c.get("/")
    r = c.submit("/settings", **{"smtp.host": "192.0.2.25", "smtp.password": "Typed-Again-1"})
    assert "in clear" in field_error(r.text, "smtp.security")
    assert "192.0.2.25" not in page.ini.read_text(encoding="utf-8")
    # a hand edit that does it stops the sender instead of sending it in clear
    s = bg.load_settings(page.ini, text=page.ini.read_text(encoding="utf-8").replace(
        "host = 127.0.0.1", "host = 192.0.2.25"))
    assert any("in clear" in p for p in s.problems)


# -- another account on the same server --------------------------------------------------------



#: The second account: "nobody" where the tests run as root, else this one.
NOBODY = 65534
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

#: What the other account runs: each request of REQUESTS, as a browser
#: without our cookie would send it; prints [status, Location, body] each.
PROBE = r"""
import http.client, json, sys
port, requests = int(sys.argv[1]), json.loads(sys.argv[2])
out = []
for method, path, body in requests:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    headers = {"Host": "127.0.0.1:%d" % port, "Origin": "http://127.0.0.1:%d" % port,
               "Content-Type": "application/x-www-form-urlencoded"}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    out.append([r.status, r.getheader("Location"), r.read().decode("utf-8", "replace")])
    conn.close()
print(json.dumps(out))
"""


def other_python() -> str:
    """A Python the other account may run (root's own may sit in /root)."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        try:
            if candidate and subprocess.run([candidate, "-c", "pass"], preexec_fn=become_nobody,
                                            capture_output=True, cwd="/").returncode == 0:
                return candidate
        except OSError:                 # not even started: that account may not run it
            continue
    pytest.skip("no Python the second account can run")


def become_nobody() -> None:
    if AS_ROOT:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def as_other_account(port: int, requests: list) -> list:
    """Send `requests` ([method, path, body]) to the page from the second account."""
    done = subprocess.run([other_python(), "-c", PROBE, str(port), json.dumps(requests)],
                          preexec_fn=become_nobody, capture_output=True, text=True, timeout=120,
                          cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(os.name == "nt", reason="a second account, FIFOs and modes are POSIX's")
def test_another_account_gets_no_page_on_127_0_0_1_without_a_login(open_page):
    page = open_page()
    drop(page.spool, "victim.BAD", eml(subject="victim"))
    witness = Witness(page)
    gets = ["/", "/settings", "/queue", "/log", "/patrons", "/patron?id=p1", "/nope",
            "/login?once=" + "A" * 43]
    posts = ["/settings", "/test", "/queue/retry", "/queue/retry-all", "/queue/delete",
             "/queue/send-now", "/patron", "/logout"]
    answers = as_other_account(page.port, [["GET", p, None] for p in gets]
                               + [["POST", p, "file=victim.BAD&gateway.spool_folder=/tmp"]
                                  for p in posts] + [["GET", "/health", None]])
    for path, (status, location, _) in zip(gets[:-1], answers):
        assert status == 303 and location == "/login", (path, status)
    status, location, _ = answers[len(gets) - 1]          # a made-up one-time link
    assert status == 303 and location == "/login?m=used"
    for path, (status, _, _) in zip(posts, answers[len(gets):]):
        assert status == 403, (path, status)
    status, _, body = answers[-1]
    health = json.loads(body)
    assert "reason" not in health and SECRET not in body
    assert not page.sink.messages
    witness.unharmed()


def test_a_one_time_link_logs_in_once_within_minutes_and_only_from_this_computer(open_page):
    page = open_page()
    link = page.login_link()
    c = page.client(login=False)
    c.login(link)
    assert c.get("/").status == 200
    again = page.client(login=False)
    r = again.request("GET", link.split(f":{page.port}", 1)[1])
    assert r.status == 303 and r.headers["Location"].startswith("/login")  # used up
    assert again.get("/").status == 303
    late = page.login_link()
    page.clock.advance(bg.LOGIN_LINK_SECONDS + 1)
    r = page.client(login=False).request("GET", late.split(f":{page.port}", 1)[1])
    assert r.status == 303 and r.headers["Location"].startswith("/login")
    # the database holds a hash of each link, never the link
    db = page.db()
    assert not [row for row in db.execute("SELECT digest FROM page_logins")
                if row[0] in (link, late) or row[0] in link]
    db.close()
    assert bg.from_this_computer("127.0.0.1", "127.0.0.1")
    assert bg.from_this_computer("192.168.1.5", "192.168.1.5")       # a browser here, at our LAN address
    assert not bg.from_this_computer("192.168.1.6", "192.168.1.5")


def run_gateway(tmp_path, sink, **web):
    ini = write_ini(tmp_path, sink, web__port=0, **web)
    proc = subprocess.Popen([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini), "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):                     # bounded: at most ~20 s
        if (tmp_path / "bibliogate.db").exists():
            db = bg.open_db(tmp_path / "bibliogate.db")
            url = bg.get_state(db, "page_nonce") and bg.get_state(db, "page_url")
            db.close()
            if url:
                return ini, proc, int(url.rsplit(":", 1)[1].strip("/"))
        time.sleep(0.1)
    proc.terminate()
    raise AssertionError("run did not start its page")


def bibliogate(ini, *args, user=None):
    return subprocess.run([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini), *args],
                          capture_output=True, text=True, timeout=60)


def test_page_command_prints_a_link_that_logs_the_librarian_in(tmp_path, sink):
    ini, proc, port = run_gateway(tmp_path, sink)
    try:
        done = bibliogate(ini, "page", "--print")
        assert done.returncode == 0, done.stderr
        link = done.stdout.strip()
        assert link.startswith(f"http://127.0.0.1:{port}/login?once=")
        c = PageClient(port)
        assert c.get("/").status == 303
        c.login(link)
        assert "<h1>Settings</h1>" in c.get("/").text
        done = bibliogate(ini, "status")
        assert "answered as this BiblioGate" in done.stdout, done.stdout
    finally:
        proc.terminate()
        proc.wait(20)
    done = bibliogate(ini, "page", "--print")
    assert done.returncode == 1 and "python bibliogate.py run" in done.stderr


@pytest.mark.skipif(os.name == "nt", reason="a pseudo-terminal is POSIX's")
def test_run_in_a_console_prints_a_one_time_link(tmp_path, sink):
    import pty
    ini = write_ini(tmp_path, sink, web__port=0)
    console, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini), "run"],
                            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = ""
        for _ in range(20):                  # bounded: the link is among the first lines
            line = proc.stdout.readline().decode()
            if "/login?once=" in line or not line:
                break
        link = line.split("The config page: ", 1)[-1].strip()
        assert link.startswith("http://127.0.0.1:"), line
        c = PageClient(int(link.split(":")[2].split("/")[0]))
        c.login(link)
        assert "<h1>Settings</h1>" in c.get("/").text
    finally:
        proc.terminate()
        proc.wait(20)
        os.close(console)
        os.close(terminal)




def test_status_warns_when_another_program_holds_the_page_port(tmp_path, sink):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(5)
    port = squatter.getsockname()[1]
    caught = []

    def answer():                          # a fake page that would collect a password
        squatter.settimeout(20)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = squatter.accept()
                caught.append(conn.recv(65536))
                conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n'
                             b'{"ok": true, "sender": "running"}')
                conn.close()
    threading.Thread(target=answer, daemon=True).start()
    try:
        ini = write_ini(tmp_path, sink, web__port=port)
        done = bibliogate(ini, "status")
        assert done.returncode == 1
        assert "another program answers at 127.0.0.1:%d" % port in done.stdout, done.stdout
        info = json.loads(bibliogate(ini, "status", "--json").stdout)
        assert info["page_ok"] is False
    finally:
        squatter.close()


# -- throttling and sessions -------------------------------------------------------------------

def password_page(open_page, monkeypatch):
    stored = bg.hash_password("correct horse", rounds=1000)
    page = open_page(web_hash=("password_hash =         ;", f"password_hash = {stored} ;"))
    checks = []
    real = bg.check_password

    def counted(stored, password):
        checks.append(password)
        return real(stored, password)
    monkeypatch.setattr(bg, "check_password", counted)
    return page, checks


def login_form(page, source: str = "127.0.0.1"):
    """(cookie, token) of the login page, as a browser at `source` gets them."""
    conn = http_connection(page, source)
    conn.request("GET", "/login", headers={"Host": f"127.0.0.1:{page.port}"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    cookie = (r.getheader("Set-Cookie") or "").split(";")[0]
    token = re.search(r'name="token" value="([^"]+)"', text).group(1)
    return cookie, token




def http_connection(page, source: str) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", page.port, timeout=30,
                                      source_address=(source, 0))


def try_password(page, source: str, cookie: str, token: str, password: str):
    conn = http_connection(page, source)
    try:
        conn.request("POST", "/login", body=urllib.parse.urlencode({"token": token,
                                                                    "password": password}),
                     headers={"Host": f"127.0.0.1:{page.port}", "Cookie": cookie,
                              "Origin": f"http://127.0.0.1:{page.port}",
                              "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("Location"), r.getheader("Set-Cookie")
    finally:
        conn.close()


def test_150_wrong_passwords_at_once_get_one_check_and_the_librarian_still_logs_in(
        open_page, monkeypatch):
    page, checks = password_page(open_page, monkeypatch)
    cookie, token = login_form(page)
    cookie2, token2 = login_form(page, "127.0.0.2")
    results, right = [], []
    start = threading.Barrier(151)

    def attacker():
        start.wait(30)
        try:
            results.append(try_password(page, "127.0.0.1", cookie, token, "guess"))
        except OSError:             # closed at once: beyond the page's connection cap
            results.append("closed")

    def librarian():
        start.wait(30)
        for _ in range(50):         # a browser's reload, if the burst filled the connections
            try:
                right.append(try_password(page, "127.0.0.2", cookie2, token2, "correct horse"))
                return
            except OSError:
                time.sleep(0.1)
    threads = [threading.Thread(target=attacker) for _ in range(150)] + \
        [threading.Thread(target=librarian)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 150
    wrong = [p for p in checks if p == "guess"]
    assert len(wrong) <= 1, f"{len(wrong)} password checks got through the throttle"
    status, location, set_cookie = right[0]
    assert status == 303 and location == "/" and set_cookie, right
    # the clock has not moved: the address waits; after a second, one more try
    assert try_password(page, "127.0.0.1", cookie, token, "guess2")[1].startswith("/login")
    assert "guess2" not in checks
    page.clock.advance(bg.LOGIN_DELAY_FIRST + 0.1)
    try_password(page, "127.0.0.1", cookie, token, "guess3")
    assert "guess3" in checks
    page.clock.advance(bg.LOGIN_DELAY_FIRST + 0.1)                      # the delay has doubled
    try_password(page, "127.0.0.1", cookie, token, "guess4")
    assert "guess4" not in checks
    # the librarian on this computer is never locked out: the one-time link works
    assert page.client().get("/queue").status == 200


def test_anonymous_requests_make_no_session_and_log_nobody_out(open_page):
    page = open_page()
    librarian = page.client()
    librarian.get("/")
    before = len(page.server.sessions)
    for n in range(300):                                # 404s, cross-site <img>s, the login page
        path = ("/nope%d" % n, "/queue", "/login", "/health", "/style.css")[n % 5]
        r = raw_request(page.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\n"
                                   "Connection: close\r\n\r\n".encode())
        assert b"bibliogate-%d=" % page.port not in r.split(b"\r\n\r\n")[0] or path == "/login"
    assert len(page.server.sessions) == before
    r = librarian.submit("/settings", **{"library.name": "Still Me"})
    assert any("Saved [library] name" in n for n in flashes(r.text))
    # logins from one address keep at most SESSIONS_PER_ADDRESS sessions
    clients = [page.client() for _ in range(bg.SESSIONS_PER_ADDRESS + 5)]
    mine = [s for s in page.server.sessions.values() if s.address == "127.0.0.1"]
    assert len(mine) == bg.SESSIONS_PER_ADDRESS
    assert clients[-1].get("/queue").status == 200


# -- the spool folder and its files ---------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="a second account, FIFOs and modes are POSIX's")
def test_the_page_cannot_aim_the_gateway_at_other_peoples_files(open_page, tmp_path):
    page = open_page()
    witness = Witness(page)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                     # writable by every account
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    new = tmp_path / "deep" / "new" / "folder"
    c = page.client()
    refused = {str(shared): "writable by every account", "/tmp": "writable by every account",
               "/": "system folder", "/etc": "system folder", "/usr/lib": "system folder",
               str(new): "no such folder", str(a_file): "not a folder"}
    for value, why in refused.items():
        c.get("/")
        r = c.submit("/settings", **{"gateway.spool_folder": value})
        assert why in field_error(r.text, "gateway.spool_folder"), (value, field_error(
            r.text, "gateway.spool_folder"))
    assert not (tmp_path / "deep").exists(), "the page created folders"
    assert page.gateway.settings.spool == page.spool
    witness.unharmed()
    own = tmp_path / "own-spool"
    own.mkdir(mode=0o750)
    c.get("/")
    c.submit("/settings", **{"gateway.spool_folder": str(own)})
    assert page.gateway.settings.spool == own.resolve()


@pytest.mark.skipif(os.name == "nt", reason="a second account, FIFOs and modes are POSIX's")
def test_retry_and_delete_touch_only_regular_files_directly_in_the_spool(open_page, tmp_path):
    page = open_page()
    elsewhere = tmp_path / "private.BAD"
    elsewhere.write_bytes(b"someone else's")
    os.symlink(elsewhere, page.spool / "link.BAD")
    os.symlink(elsewhere, page.spool / "link.TMP.BAD")
    os.mkfifo(page.spool / "pipe.BAD")
    (page.spool / "folder.BAD").mkdir()
    witness = Witness(page)
    c = page.client()
    for name in ("link.BAD", "link.TMP.BAD", "pipe.BAD", "folder.BAD"):
        c.get("/log")               # (the Queue page's reading of a FIFO is another test's)
        c.post("/queue/retry", {"token": c.token(), "file": name}, follow=False)
        r = c.get("/log")
        assert any("not put back" in n for n in flashes(r.text)), (name, flashes(r.text))
        c.post("/queue/delete", {"token": c.token(), "file": name}, follow=False)
        r = c.get("/log")
        assert any("Nothing was deleted" in n for n in flashes(r.text)), name
    assert elsewhere.read_bytes() == b"someone else's"
    assert os.path.islink(page.spool / "link.BAD") and stat.S_ISFIFO(
        os.lstat(page.spool / "pipe.BAD").st_mode)
    assert not list(page.spool.glob("*.TMP"))
    os.unlink(page.spool / "pipe.BAD")
    witness.unharmed(spool_changed=True)


# -- health that tells the truth ----------------------------------------------------------------

def test_health_and_status_say_stuck_when_no_check_finishes_while_mail_waits(open_page, tmp_path):
    silent = socket.socket()                        # an SMTP server that never greets
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    held = []
    page = open_page(port=("port = 25               ;", f"port = {silent.getsockname()[1]:<5}           ;"))
    try:
        c = page.client()
        drop(page.spool, "waiting.TMP", eml(subject="waits"), age=3600)
        c.get("/queue")
        c.post("/queue/send-now", {"token": c.token()})
        silent.settimeout(10)
        held.append(silent.accept()[0])            # the check now hangs in the greeting
        assert json.loads(c.get("/health").text)["stuck"] is False
        page.clock.advance(bg.STUCK_CHECKS * max(page.gateway.settings.interval,
                                                 bg.CHECK_CAP_SECONDS) + 60)
        r = c.get("/health")
        health = json.loads(r.text)
        assert r.status == 503 and health["ok"] is False and health["stuck"] is True
        with bg.FileLock(bg.run_lock_path(page.ini)):       # as `run` holds it
            info = bg.status_info(page.gateway.settings, now=page.clock())
        assert info["stuck"] is True and info["sender"] == "stuck"
        assert "no check has finished for" in info["reason"]
    finally:
        for conn in held:
            conn.close()
        silent.close()


def test_health_off_this_computer_without_a_login_says_only_ok(open_page):
    page = open_page()
    page.server.loopback = False            # as in LAN mode (address 0.0.0.0 or the server's)
    r = page.client(login=False).get("/health")
    assert set(json.loads(r.text)) == {"ok"}
    page.server.loopback = True


# -- floods, forged log lines, odd requests -----------------------------------------------------

def test_a_connection_flood_is_capped_and_the_sender_goes_on(open_page, monkeypatch):
    monkeypatch.setattr(bg, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(bg, "MAX_CONNECTIONS_PER_ADDRESS", 5)
    page = open_page()
    witness = Witness(page)
    c = page.client()

    def from_address(source: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", page.port), timeout=5,
                                        source_address=(source, 0))
    idle = [from_address("127.0.0.2") for _ in range(5)]
    try:
        time.sleep(0.3)
        extra = from_address("127.0.0.2")
        assert closed_by_server(extra, 5), "one address held more than its share"
        extra.close()
        assert c.get("/queue").status == 200            # another address still gets in
        # (its connection counts until its thread is done: else a third from .3 may be
        # the one closed, and .4 let in after)
        assert wait_until(lambda: sum(page.server.connections.values()) == 5)
        idle += [from_address("127.0.0.3") for _ in range(3)]
        time.sleep(0.3)
        extra = from_address("127.0.0.4")
        assert closed_by_server(extra, 5), "a connection beyond the cap was kept"
        extra.close()
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    witness.unharmed()


def test_a_newline_in_a_file_name_or_patron_id_cannot_forge_a_log_line(open_page, page_log):
    page = open_page()
    page_log(page)
    forged = "2026-11-30 09:00:00 INFO    sent everything, all is well"
    drop(page.spool, f"x\n{forged}.TMP", b"not a message at all\x00", age=3600)
    c = page.client()
    c.get("/queue")
    c.post("/queue/send-now", {"token": c.token()})
    assert wait_until(lambda: list(page.spool.glob("*.BAD")))
    add_patrons(page, (f"p1\n{forged}", "Ann", "ann@example.org", "", "7B", 1))
    c.get("/patrons")
    r = c.post("/patron", {"token": c.token(), "patron_id": f"p1\n{forged}",
                           "email": "new@example.org", "guardian_email": "", "grp": "7B"})
    assert any("Saved patron" in n for n in flashes(r.text)), flashes(r.text)
    text = "".join(p.read_text(encoding="utf-8") for p in page.gateway.settings.log_folder.glob("*.log"))
    assert "x\\n2026-11-30 09:00:00" in text and "patron p1\\n2026-11-30 09:00:00" in text
    assert not [line for line in text.splitlines() if line.startswith(forged)]
    db = page.db()
    assert not [r[0] for r in db.execute("SELECT detail FROM events") if "\n" in r[0]]
    db.close()


def test_an_address_with_a_trailing_newline_is_refused(tmp_path, sink):
    ini = write_ini(tmp_path, sink)
    done = bibliogate(ini, "test", "--to", "a@b.example\n")
    assert done.returncode == 1 and "not an email address" in done.stderr
    assert not list((tmp_path / "spool").glob("*.TMP"))


def test_http_0_9_and_foreign_absolute_uris_are_refused(open_page):
    page = open_page()
    witness = Witness(page)
    answer = raw_request(page.port, b"GET /health\r\n")
    witness.raw.append(answer)
    assert answer == b"" or (answer.startswith(b"HTTP/1.") and status_of(answer) >= 400), answer[:200]
    for target in ("http://evil.example/health", f"http://evil.example:{page.port}/",
                   "http://127.0.0.1:1/health", "ftp://127.0.0.1/"):
        answer = raw_request(page.port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{page.port}\r\n"
                                        "Connection: close\r\n\r\n".encode())
        witness.raw.append(answer)
        assert 400 <= status_of(answer) < 500, (target, answer[:200])
    answer = raw_request(page.port, f"GET http://127.0.0.1:{page.port}/health HTTP/1.1\r\n"
                                    f"Host: 127.0.0.1:{page.port}\r\nConnection: close\r\n\r\n".encode())
    assert status_of(answer) in (200, 503)
    witness.unharmed()


def test_a_connection_that_cannot_be_cut_off_does_not_end_the_deadlines_of_the_others(
        open_page, caplog, monkeypatch):
    """The one thread that cuts off slow requests meets an error on one
    connection: it says so in the log and still cuts off the next ones."""
    monkeypatch.setattr(bg.log, "propagate", True)     # (an earlier test may have set it off)
    page = open_page()

    class Broken:
        def cut_off(self):
            raise ValueError("the socket is in a state nobody expected")

    class Slow:
        def __init__(self):
            self.cut = threading.Event()

        def cut_off(self):
            self.cut.set()

    broken, first, second = Broken(), Slow(), Slow()
    page.server.set_deadline(broken, 0)
    page.server.set_deadline(first, 0)
    assert first.cut.wait(5), "a late connection was not cut off"
    page.server.set_deadline(second, 0)
    assert second.cut.wait(5), "the deadlines ended with the broken connection"
    assert "a slow connection could not be cut off: ValueError" in caplog.text
