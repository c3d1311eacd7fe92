"""Shared pytest fixtures for BiblioGate.

What is here:

* ``Sink`` -- a real SMTP server (aiosmtpd) on 127.0.0.1 that records what it
  receives and can misbehave on purpose (refuse, stall, drop, demand a login,
  speak STARTTLS or implicit TLS).
* ``sink`` / ``make_sink`` fixtures -- a started plain Sink, or a factory for
  Sinks with options.  Every Sink made by a fixture is stopped at teardown.
* ``write_ini(folder, sink=None, **overrides)`` -- writes ``bibliogate.ini``.
* ``gateway`` fixture -- a folder with an ini pointing at ``sink`` and a
  ``.cli(...)`` method running ``bibliogate.py`` in a subprocess.
* ``eml(...)`` -- a small RFC 5322 message as bytes (LF line endings).

Only 127.0.0.1 is ever used.  Python 3.9+.
"""

from __future__ import annotations

import asyncio
import atexit
import configparser
import email
import email.policy
import functools
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

REPO = Path(__file__).resolve().parent.parent
#: Real Postfix (smtp-sink and a private smtpd): the make_smtp_sink and make_postfix fixtures.
pytest_plugins = ["postfix_support"]
HOST = "127.0.0.1"
DATA_SIZE_LIMIT = 64 * 1024 * 1024  # 64 MiB: big attachments must get through
TRY_LATER = "451 4.3.0 Try again later"
AUTH_REQUIRED = "530 5.7.0 Authentication required"


# --------------------------------------------------------------------------
# TLS material: one throw-away CA per test session (per process).
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _test_ca() -> Tuple[str, "object"]:
    """Return (ca_file, server_cert): the CA's PEM path and a trustme LeafCert
    valid for 127.0.0.1 and localhost.  Created once, deleted at exit."""
    import trustme  # imported lazily: plain sinks do not need it

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tempfile.mkdtemp(prefix="bibliogate-test-ca-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    ca_file = os.path.join(folder, "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    return ca_file, server_cert


def _server_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _test_ca()[1].configure_cert(ctx)
    return ctx


def _free_port() -> int:
    """A port nobody listens on right now (tiny race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# The Sink
# --------------------------------------------------------------------------


@dataclass
class Received:
    """One message as the sink saw it."""

    mail_from: str
    rcpt_tos: List[str]
    data: bytes  # exactly what came after DATA, line endings untouched
    username: Optional[str] = None  # who had logged in, if anyone
    message: EmailMessage = field(init=False, repr=False)

    def __post_init__(self):
        # Parsed with LF line endings: the email package keeps CRLF inside
        # bodies, so get_content() would otherwise return "...\r\n".
        self.message = email.message_from_bytes(
            self.data.replace(b"\r\n", b"\n"), policy=email.policy.default
        )


class _Controller(Controller):
    """aiosmtpd Controller that tells its Sink about every new connection."""

    def __init__(self, sink: "Sink", **kwargs):
        self._sink = sink
        super().__init__(sink, **kwargs)

    def factory(self):
        # Called once per TCP connection (STARTTLS does not call it again).
        # Passing loop= explicitly avoids aiosmtpd's get_event_loop() dance,
        # which fiddles with the (process-global) warnings filters from the
        # server thread.
        protocol = self._sink.protocol_class(self.handler, loop=self.loop, **self.SMTP_kwargs)
        self._sink._connection_made(protocol)
        return protocol


class Sink:
    """A local SMTP server that records everything.  Also the aiosmtpd handler.

    Options (all keyword):
      data_reply      reply to DATA instead of "250 OK"; message not stored
      rcpt_replies    {address: reply} for RCPT TO; others accepted
      mail_reply      reply to MAIL FROM
      delay           seconds to wait before answering DATA
      drop_after_data read the DATA content, then cut the connection without
                      a reply; the message goes to .dropped, not .messages
      auth            (username, password): login (PLAIN/LOGIN) required
      starttls        offer STARTTLS (require_starttls: insist on it)
      implicit_tls    TLS from the first byte (SMTPS)
      fail_first      the first N DATA commands get "451 4.3.0 Try again later"

    Attributes: host, port, ca_file (CA PEM to trust, None without TLS),
    messages, dropped, logins (snapshots, thread-safe), sessions,
    data_commands (DATA commands whose content was fully received).

    A subclass may set ``protocol_class`` to its own aiosmtpd SMTP subclass
    to misbehave below the handler hooks (hang up mid-DATA, say).
    """

    protocol_class = SMTP

    def __init__(
        self,
        *,
        data_reply: Optional[str] = None,
        rcpt_replies: Optional[Dict[str, str]] = None,
        mail_reply: Optional[str] = None,
        delay: float = 0.0,
        drop_after_data: bool = False,
        auth: Optional[Tuple[str, str]] = None,
        starttls: bool = False,
        require_starttls: bool = False,
        implicit_tls: bool = False,
        fail_first: int = 0,
    ):
        if starttls and implicit_tls:
            raise ValueError("choose starttls or implicit_tls, not both")
        self.host = HOST
        self.port = _free_port()  # fixed for life, so stop()/start() keep it
        self.data_reply = data_reply
        self.rcpt_replies = dict(rcpt_replies or {})
        self.mail_reply = mail_reply
        self.delay = delay
        self.drop_after_data = drop_after_data
        self.auth = tuple(auth) if auth else None
        self.starttls = starttls or require_starttls
        self.require_starttls = require_starttls
        self.implicit_tls = implicit_tls
        self.fail_first = fail_first
        self.ca_file = _test_ca()[0] if (self.starttls or implicit_tls) else None

        self._lock = threading.Lock()
        self._messages: List[Received] = []
        self._dropped: List[Received] = []
        self._logins: List[str] = []
        self._sessions = 0
        self._data_commands = 0
        self._warming_up = False  # True while aiosmtpd pokes itself in start()
        self._controller: Optional[_Controller] = None
        self._protocols = weakref.WeakSet()  # live SMTP connections, for stop()

    def __repr__(self):
        return f"<Sink {self.host}:{self.port} security={self.security}>"

    @property
    def security(self) -> str:
        """The ini's [smtp] security value that matches this sink."""
        return "tls" if self.implicit_tls else "starttls" if self.starttls else "none"

    # ---- thread-safe views -------------------------------------------------

    @property
    def messages(self) -> List[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def dropped(self) -> List[Received]:
        with self._lock:
            return list(self._dropped)

    @property
    def logins(self) -> List[str]:
        with self._lock:
            return list(self._logins)

    @property
    def sessions(self) -> int:
        with self._lock:
            return self._sessions

    @property
    def data_commands(self) -> int:
        with self._lock:
            return self._data_commands

    def clear(self) -> None:
        """Forget everything received so far (counters too)."""
        with self._lock:
            self._messages.clear()
            self._dropped.clear()
            self._logins.clear()
            self._sessions = 0
            self._data_commands = 0

    def wait_for(self, count: int, timeout: float = 10.0) -> List[Received]:
        """Wait until at least `count` messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")

    # ---- start / stop --------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> "Sink":
        if self._controller is not None:
            return self
        tls = _server_ssl_context() if (self.starttls or self.implicit_tls) else None
        kwargs = dict(
            hostname=self.host,
            port=self.port,
            # Fixed greeting name: the default socket.getfqdn() may do slow DNS.
            server_hostname="sink.test",
            ready_timeout=10.0,
            decode_data=False,  # envelope.content stays bytes
            data_size_limit=DATA_SIZE_LIMIT,
        )
        if self.implicit_tls:
            kwargs["ssl_context"] = tls  # asyncio wraps every connection
        if self.starttls:
            kwargs["tls_context"] = tls
            kwargs["require_starttls"] = self.require_starttls
        if self.auth:
            kwargs["authenticator"] = self._authenticate
            # Only a STARTTLS server knows whether the session is encrypted;
            # with implicit TLS aiosmtpd thinks it is plain, so never require TLS
            # there (nor, obviously, without TLS at all).
            kwargs["auth_require_tls"] = self.starttls
            # Not auth_required=True: with auth_require_tls=False aiosmtpd then
            # warns (UserWarning) on every connection, an error under -W error.
            # handle_MAIL below refuses unauthenticated senders instead.
        # aiosmtpd closes the event loop on stop(), so a Controller cannot be
        # restarted: make a fresh one each time.
        controller = _Controller(self, **kwargs)
        # Controller.start() opens one connection to itself (TLS-wrapped for
        # implicit TLS) to check the server works; that one is not counted.
        self._warming_up = True
        try:
            controller.start()
        finally:
            self._warming_up = False
        self._controller = controller
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (clients see a reset
        or EOF; new connections are refused)."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        # Abort live connections first: otherwise clients hang, and on
        # Python >= 3.12 Server.wait_closed() would wait for them forever.
        future = asyncio.run_coroutine_threadsafe(self._abort_all(), controller.loop)
        future.result(timeout=5)
        controller.stop()

    async def _abort_all(self) -> None:
        # Runs in the server thread, like factory(), so no lock needed.
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                protocol.transport.abort()
        await asyncio.sleep(0)  # let connection_lost callbacks run

    # ---- bookkeeping called from the server thread ---------------------------

    def _connection_made(self, protocol) -> None:
        self._protocols.add(protocol)
        if not self._warming_up:
            with self._lock:
                self._sessions += 1

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and (auth_data.login, auth_data.password)
            == (self.auth[0].encode(), self.auth[1].encode())
        )
        if ok:
            with self._lock:
                self._logins.append(self.auth[0])
        # success=False, handled=False makes aiosmtpd answer "535 5.7.8 ..."
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    # ---- aiosmtpd handler hooks ----------------------------------------------
    # When a hook exists, aiosmtpd no longer fills in the envelope itself: an
    # accepting hook must store the address and return the "250" line.

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.auth and not session.authenticated:
            return AUTH_REQUIRED  # what aiosmtpd's auth_required=True says
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        # Here the whole content has been read.  If the client goes away while
        # we sleep, aiosmtpd cancels this coroutine: nothing is recorded.
        if self.delay:
            await asyncio.sleep(self.delay)
        username = session.auth_data.login.decode() if session.authenticated else None
        record = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content), username)
        with self._lock:
            self._data_commands += 1
            attempt = self._data_commands
            if self.drop_after_data:
                self._dropped.append(record)
        if self.drop_after_data:
            # abort() (not close()) so that nothing else can be written; it
            # also makes aiosmtpd cancel this coroutine, so no reply is sent.
            server.transport.abort()
            await asyncio.sleep(3600)
        if attempt <= self.fail_first:
            return TRY_LATER
        if self.data_reply:
            return self.data_reply
        with self._lock:
            self._messages.append(record)
        return "250 OK"


# --------------------------------------------------------------------------
# Fixtures: sinks
# --------------------------------------------------------------------------


@pytest.fixture
def make_sink():
    """Factory: make_sink(**options) -> a started Sink; all stopped at teardown."""
    made: List[Sink] = []

    def factory(**options) -> Sink:
        s = Sink(**options)
        made.append(s)
        return s.start()

    yield factory
    for s in made:
        s.stop()


@pytest.fixture
def sink(make_sink) -> Sink:
    """A started, plain (no TLS, no login) Sink."""
    return make_sink()


# --------------------------------------------------------------------------
# bibliogate.ini
# --------------------------------------------------------------------------


def _ini_defaults() -> Dict[str, Dict[str, str]]:
    """Every key of PRODUCT.md's "Settings", with test-friendly values.
    Plus one test-only key: [smtp] ca_file (a PEM file to trust)."""
    return {
        "smtp": {
            "host": HOST,
            "port": "25",
            "security": "none",
            "ca_file": "",
            "ehlo": "",
            "username": "",
            "password": "",
            "timeout_seconds": "5",
        },
        "gateway": {
            "spool_folder": "spool",
            "from_address": "library@school.example",
            "minutes_between_checks": "3",
            "messages_per_check": "10",
            "test_to_address": "librarian@school.example",
            "give_up_after_hours": "72",
        },
        "overdue": {
            "enabled": "no",
            "run_at": "06:30",
            "warning_days": "3",
            "overdue_days": "1",
            "reminder_days": "3",
            "closed": "",
            "max_data_age_hours": "36",
        },
        "library": {
            "name": "Test School Library",
            "date_format": "%Y-%m-%d",
        },
        "web": {
            "address": "127.0.0.1",
            "port": "0",
            "password_hash": "",
        },
        "data": {
            "database": "bibliogate.db",
            "templates_folder": "templates",
            "log_folder": "logs",
            "import_folder": "import",
        },
    }


def _ini_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def write_ini(folder, sink: Optional[Sink] = None, **overrides) -> Path:
    """Write folder/bibliogate.ini and return its Path.

    With `sink`, [smtp] points at it (port, security, ca_file, username and
    password).  Overrides look like ``gateway__messages_per_check=5``; a new
    section or key is simply added.  True/False become yes/no, None empty.
    """
    settings = _ini_defaults()
    if sink is not None:
        smtp = settings["smtp"]
        smtp["port"] = str(sink.port)
        smtp["security"] = sink.security
        smtp["ca_file"] = sink.ca_file or ""
        if sink.auth:
            smtp["username"], smtp["password"] = sink.auth
    for name, value in overrides.items():
        section, sep, key = name.partition("__")
        if not sep or not key:
            raise TypeError(f"override {name!r} must look like section__key")
        settings.setdefault(section, {})[key] = _ini_value(value)

    # interpolation=None: "%Y-%m-%d" must be written (and read) literally.
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_dict(settings)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ini = folder / "bibliogate.ini"
    with open(ini, "w", encoding="utf-8", newline="\n") as f:
        parser.write(f)
    return ini


# --------------------------------------------------------------------------
# The gateway under test (bibliogate.py run as a subprocess)
# --------------------------------------------------------------------------


class Gateway:
    """A BiblioGate folder: .dir, .ini, .spool, .sink; .cli() runs commands."""

    def __init__(self, folder: Path, sink: Optional[Sink], cwd: Path):
        self.dir = Path(folder)
        self.sink = sink
        self.spool = self.dir / "spool"
        # Commands run from a different, empty folder: relative paths in the
        # ini must be resolved against the ini's folder, not the cwd.
        self.cwd = Path(cwd)
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.ini = write_ini(self.dir, sink)

    def configure(self, **overrides) -> Path:
        """Rewrite the ini (same sink) with ``section__key=value`` overrides."""
        self.ini = write_ini(self.dir, self.sink, **overrides)
        return self.ini

    def cli(self, *args, input=None, check=None, timeout=60, env=None):
        """Run ``bibliogate.py --config INI *args``; return CompletedProcess.

        check: None = no assertion; an int (or True for 0) = assert that exit
        status, showing stdout/stderr on failure.  env: extra variables.
        """
        cmd = [sys.executable, str(REPO / "bibliogate.py"), "--config", str(self.ini)]
        cmd += [str(a) for a in args]
        full_env = dict(os.environ, PYTHONIOENCODING="utf-8", **(env or {}))
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=timeout,
            cwd=str(self.cwd),
            env=full_env,
        )
        if check is not None:
            expected = 0 if check is True else int(check)
            assert proc.returncode == expected, (
                f"{' '.join(map(str, args))}: exit {proc.returncode}, expected {expected}\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
            )
        return proc


@pytest.fixture
def gateway(tmp_path, sink) -> Gateway:
    """A gateway folder whose ini points at the `sink` fixture."""
    return Gateway(tmp_path / "gateway", sink, cwd=tmp_path / "elsewhere")


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


def eml(to="patron@example.org", subject="Hello", body="Hi.\n", **headers) -> bytes:
    """A simple message as bytes, LF line endings, as a program would drop
    it into the spool.  Header order: From, To, Subject, then `headers`
    (underscores become hyphens: Reply_To= -> Reply-To:).  From defaults to
    someone@elsewhere.example (pass From=... to change); to=None omits To;
    a list for `to` is joined with ", ".  A non-ASCII body gets MIME headers
    for raw UTF-8.
    """
    extra = {name.replace("_", "-"): value for name, value in headers.items()}
    lines = [f"From: {extra.pop('From', 'someone@elsewhere.example')}"]
    if to is not None:
        lines.append(f"To: {to if isinstance(to, str) else ', '.join(to)}")
    lines.append(f"Subject: {subject}")
    lines += [f"{name}: {value}" for name, value in extra.items()]
    if not body.isascii():
        lines += [
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
    text = "\n".join(lines) + "\n\n" + body.replace("\r\n", "\n")
    return text.encode("utf-8")


# Test data and time ##########################################################

class Clock:
    """A clock the tests move by hand."""

    def __init__(self, start=None):
        self.now = time.time() if start is None else start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def add_patron(db, pid, name, email="", guardian="", grp=""):
    with db:
        db.execute("INSERT INTO patrons(patron_id, name, email, guardian_email, grp, auto_overdue)"
                   " VALUES (?,?,?,?,?,0)", (pid, name, email, guardian, grp))


def add_loan(db, barcode, pid, title, due):
    with db:
        db.execute("INSERT OR REPLACE INTO loans(barcode, patron_id, title, due_date) "
                   "VALUES (?,?,?,?)", (barcode, pid, title, due.isoformat()))
