"""What the config page tests share: a gateway running its loop and its page
on 127.0.0.1 (port 0: a free one), an ini with every comment of the default
one, and a small HTTP client that keeps its cookie and reads forms.

The gateway's clock is frozen at the start, so after the first check no other
check comes unless a test asks for one (Save, "Send now")."""

from __future__ import annotations

import html.parser
import http.client
import re
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import Clock

#: The SMTP password in every test ini: no answer of the page may hold it.
SECRET = "Sw0rdf1sh-not-for-browsers"




def commented_ini(sink, **lines) -> str:
    """The default ini, every comment in place, pointed at `sink` (which
    wants the login librarian / SECRET). `lines` replace whole `key = ...`
    starts: name=("old start", "new start")."""
    text = bg.DEFAULT_INI
    edits = {
        "host": ("host =                  ;", "host = 127.0.0.1        ;"),
        "port": ("port = 25               ;", f"port = {sink.port:<5}           ;"),
        "username": ("username =              ;", "username = librarian     ;"),
        "password": ("password =\n", f"password = {SECRET}\n"),
        "from": ("from_address =          ;", "from_address = library@school.example ;"),
        "test_to": ("test_to_address =       ;", "test_to_address = librarian@school.example ;"),
        "web_port": ("port = 8025\n", "port = 0\n"),
        "name": ("name =                  ;", "name = Hill School Library ;"),
    }
    edits.update(lines)
    for old, new in edits.values():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text + "\n[notes]\n; a section BiblioGate does not know is kept\nkept = yes   ; as it is\n"


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    text: str


class FormReader(html.parser.HTMLParser):
    """The forms of a page as (action, fields), fields as a browser sends them."""

    def __init__(self, text: str):
        super().__init__()
        self.forms: list[tuple[str, dict]] = []
        self._fields = self._select = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self._fields = {}
            self.forms.append((a.get("action", ""), self._fields))
        elif self._fields is None:
            return
        elif tag == "input" and a.get("name"):
            if a.get("type") != "checkbox" or "checked" in a:
                self._fields[a["name"]] = a.get("value", "")
        elif tag == "select":
            self._select = a.get("name")
        elif tag == "option" and self._select and "selected" in a:
            self._fields[self._select] = a.get("value", "")

    def handle_endtag(self, tag):
        if tag == "form":
            self._fields = None
        elif tag == "select":
            self._select = None


class PageClient:
    """A browser in miniature: keeps the session cookie, remembers the last
    page and every answer (to look for what must never be in one)."""

    def __init__(self, port: int, host: str | None = None):
        self.port = port
        self.host = f"127.0.0.1:{port}" if host is None else host
        self.cookie = ""
        self.page = ""
        self.seen: list[str] = []

    def request(self, method, path, body=None, headers=None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        sent = {"Host": self.host, **({"Cookie": self.cookie} if self.cookie else {}),
                **(headers or {})}
        try:
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8")
        finally:
            conn.close()
        cookie = resp.getheader("Set-Cookie")
        if cookie:
            self.cookie = cookie.split(";")[0]
        self.seen.append(f"{resp.status} {resp.getheaders()}\n{text}")
        return Response(resp.status, resp.headers, text)

    def login(self, link: str) -> Response:
        """Open a one-time login link (as `page` makes) as a browser would."""
        url = urllib.parse.urlsplit(link)
        r = self.request("GET", f"{url.path}?{url.query}", headers={"Host": url.netloc})
        assert r.status == 303 and r.headers["Location"] == "/", (r.status, r.text)
        return r

    def get(self, path: str) -> Response:
        r = self.request("GET", path)
        if r.headers.get_content_type() == "text/html":
            self.page = r.text
        return r

    def token(self) -> str:
        return re.search(r'name="token" value="([^"]+)"', self.page).group(1)

    def form(self, action: str) -> dict:
        """The fields of the last page's first form for `action`."""
        for found, fields in FormReader(self.page).forms:
            if found == action:
                return dict(fields)
        raise AssertionError(f"no form for {action} on the page")

    def post(self, path: str, fields: dict, follow: bool = True, headers=None) -> Response:
        body = urllib.parse.urlencode(fields)
        r = self.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded",
                                              "Origin": f"http://{self.host}", **(headers or {})})
        if follow and r.status == 303:
            return self.get(r.headers["Location"])
        return r

    def submit(self, action: str, follow: bool = True, **changes) -> Response:
        """Send the last page's form for `action`, with `changes` (name: value;
        None takes a field out, as an unticked checkbox)."""
        fields = self.form(action)
        for name, value in changes.items():
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        return self.post(action, fields, follow)


def flashes(text: str) -> list[str]:
    found = re.findall(r'<p class="flash[^"]*" role="status">(.*?)</p>', text, re.S)
    return [html_text(m) for m in found]


def html_text(fragment: str) -> str:
    return re.sub(r"<[^>]+>", "", fragment).replace("&#x27;", "'").replace("&quot;", '"') \
        .replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def field_error(text: str, name: str) -> str:
    """The error shown beside a Settings field ('' when none)."""
    m = re.search(r'<div class="field( invalid)?"><label for="%s">.*?</div></div>' % re.escape(name),
                  text, re.S)
    assert m, f"no field {name}"
    err = re.search(r'<span class="error">(.*?)</span>', m.group(0), re.S)
    return html_text(err.group(1)) if err else ""


class RunningPage:
    """A gateway folder with the loop of `run` in a thread and its page."""

    def __init__(self, folder: Path, ini_text: str, clock: Clock):
        folder.mkdir(parents=True, exist_ok=True)
        self.ini = folder / "bibliogate.ini"
        self.ini.write_bytes(ini_text.encode("utf-8"))
        self.clock = clock
        self.gateway = bg.Gateway(self.ini, clock=clock)
        self.gateway.tick()             # the first check, done before any test drops a file
        self._start_loop()
        self.server = bg.start_page(self.gateway)
        assert self.server is not None, "the page did not start"
        self.port = self.server.port
        self.spool = self.gateway.settings.spool
        self.clients: list[PageClient] = []

    def _start_loop(self) -> None:
        """Start run's loop, and wait until it has written what it writes once as it
        starts (its pid, the heartbeat): with the clock held, the database is then
        quiet, and a test that counts the pages built is not raced by those commits."""
        done, real = threading.Event(), self.gateway.tick

        def tick() -> float:
            try:
                return real()
            finally:
                done.set()

        self.gateway.tick = tick        # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.gateway.run_forever, daemon=True)
        self.thread.start()
        assert done.wait(10), "run's loop did not tick"

    def login_link(self) -> str:
        """A one-time login link, as `python bibliogate.py page --print` prints it."""
        db = self.db()
        try:
            return bg.new_login_link(db, "127.0.0.1", self.port, self.clock())
        finally:
            db.close()

    def client(self, host: str | None = None, login: bool = True) -> PageClient:
        """A browser on this computer: the librarian, logged in through a
        one-time link (login=False: anyone else)."""
        c = PageClient(self.port, host)
        self.clients.append(c)
        if login:
            c.login(self.login_link())
        return c

    def db(self):
        return bg.open_db(self.gateway.settings.database)

    def close(self) -> None:
        self.gateway.stop.set()
        self.thread.join(10)
        bg.stop_page(self.server)
        self.gateway.journal.close()


@pytest.fixture
def open_page(tmp_path, make_sink, monkeypatch):
    """Factory: open_page(ini_text=None, **commented_ini edits) -> RunningPage
    against a sink that wants the login librarian / SECRET."""
    monkeypatch.setattr(bg, "TICK_SECONDS", 0.05)       # Save need not wait a second
    opened: list[RunningPage] = []

    def factory(ini_text: str | None = None, **lines) -> RunningPage:
        sink = make_sink(auth=("librarian", SECRET))
        text = ini_text if ini_text is not None else commented_ini(sink, **lines)
        page = RunningPage(tmp_path / f"gateway{len(opened)}", text, Clock())
        page.sink = sink
        opened.append(page)
        return page

    yield factory
    for page in opened:
        page.close()
