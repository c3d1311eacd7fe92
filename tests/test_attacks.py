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

import hashlib
import html
import os
import select
import socket
import time
import urllib.parse

import pytest

import bibliogate as bg
from conftest import eml
from page_support import SECRET, field_error, flashes, open_page  # noqa: F401
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
    page.ini.write_text(text, encoding="utf-8", newline="")
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
    slow = [connect(page) for _ in range(30)]
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

from conftest import Sink  # noqa: E402


class CredentialTrap(Sink):
    """An attacker's SMTP server: offers AUTH, takes any login, keeps every
    (username, password) it is given."""

    def __init__(self):
        super().__init__(auth=("anyone", "anything"))
        self.captured: list[tuple[str, str]] = []

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        with self._lock:
            self.captured.append((auth_data.login.decode(), auth_data.password.decode()))
        return bg_auth_result(auth_data)


def bg_auth_result(auth_data):
    from aiosmtpd.smtp import AuthResult
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
    edits = {"port": {"smtp.port": str(trap.port)},
             # the same server, now as another account of it, or without TLS
             "username": {"smtp.port": str(trap.port), "smtp.username": "mallory"},
             "security": {"smtp.port": str(trap.port), "smtp.security": "none"}}[change]
    r = c.submit("/settings", **edits)
    text = page.ini.read_text(encoding="utf-8")
    assert SECRET not in text, "the stored password survived a change of its server"
    assert "password =\n" in text
    assert "Type the password for" in field_error(r.text, "smtp.password")
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
