#!/usr/bin/env python3
"""BiblioGate: the email gateway of a school library, in one file.

Any program queues an email by saving a message file (what an ``.eml`` file
holds) into the spool folder with the extension ``.TMP``. Every few minutes
the sender takes a small batch of the oldest files and relays them to the
school's SMTP server over one connection. A sent file disappears; a file that
can never be sent is renamed ``.BAD`` with the reason written beside it; a
file that could not be sent *for now* stays ``.TMP`` and is tried again.

Run ``python bibliogate.py run`` and leave it running; ``--help`` lists the
other commands. The sections below follow a message from the ini file to the
SMTP server:

    Constants        names, limits and the reasons for them
    Errors           BibliogateError and its leaves; each says what to do
    Settings         bibliogate.ini: the default text, reading, validation
    Locks            OS file locks, released by the OS when a process dies
    Database         sqlite: the event log, per-file retry state, sent ledger
    Journal          every action to logs/ and to the database
    Templates        templates/*.txt: a Subject line, a blank line, a body
    Messages         composing our own messages; checking queued ones
    Spool            the queue folder: writing, listing, picking, BAD files
    Sender           one check: connect, send a batch, sort out each reply
    Gateway          the clock-driven loop of ``run``: checks, daily log
    Circulation data patrons.csv and loans.csv: checking, importing, the import folder
    Auto-overdue     the daily warning / overdue / reminder notices and their ledger
    Command line     argparse, one small function per command
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import csv
import dataclasses
import datetime as dt
import email.errors
import email.header
import email.policy
import email.utils
import functools
import hashlib
import heapq
import itertools
import json
import logging
import os
import re
import secrets
import signal
import smtplib
import socket
import sqlite3
import ssl
import string
import sys
import textwrap
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable, Iterator

__version__ = "1.0"

# Constants ###################################################################

#: A foreign program's .TMP file is taken only once it has not changed for
#: this long, so a file still being written is never sent half-way.
STABLE_SECONDS = 2.0
#: Files BiblioGate writes itself appear complete (write, then rename), so
#: their time is set this far back and the next check may take them at once.
OWN_FILE_AGE = STABLE_SECONDS + 1.0
#: Names of files that go ahead of a long queue (test messages, daily log).
PRIORITY_PREFIX = "PRIORITY-"
#: Extensions, compared without regard to case.
WAITING_EXT, BAD_EXT = ".TMP", ".BAD"
#: The reason for a .BAD file is kept beside it in a text file of this ending.
REASON_SUFFIX = "-reason.txt"
#: A file being written by BiblioGate; never matches *.TMP.
PART_SUFFIX = ".part"
#: Larger files are refused: most mail servers refuse over 25 MB anyway.
MAX_MESSAGE_BYTES = 40 * 1024 * 1024
#: The first wait after a temporary refusal; it doubles up to the maximum.
RETRY_FIRST_SECONDS = 5 * 60
RETRY_MAX_SECONDS = 60 * 60
#: A whole check stops taking new messages after this many seconds (or the
#: check interval, if longer), so one slow server never stalls the gateway.
CHECK_CAP_SECONDS = 120
#: The sent ledger remembers delivered files this long (see Sender).
SENT_LEDGER_DAYS = 14
#: How often `run` wakes when nothing is due (it also reacts to Ctrl+C).
TICK_SECONDS = 1.0
#: A plain address: something@domain.tld, no spaces, no control characters.
ADDRESS_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+$")
#: A header line: a printable field name without spaces, then a colon.
HEADER_LINE_RE = re.compile(rb"^[!-9;-~]+[ \t]*:")
#: Headers whose addresses are envelope recipients.
RECIPIENT_HEADERS = ("to", "cc", "bcc")
#: Headers BiblioGate sets itself on every message it relays.
REPLACED_HEADERS = frozenset({"from", "sender", "bcc", "return-path"})

log = logging.getLogger("bibliogate")


# Errors ######################################################################

class BibliogateError(Exception):
    """The root of every error BiblioGate reports; ``str()`` is a sentence a
    librarian can act on."""


class SettingsError(BibliogateError):
    """The settings cannot be used; ``problems`` lists every sentence."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class TemplateError(BibliogateError):
    """A template file is missing or names an unknown placeholder."""

    def __init__(self, path: Path, lineno: int | None, message: str):
        where = f"{path} line {lineno}" if lineno else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.lineno = path, lineno


class BadMessage(BibliogateError):
    """A queued file that can never be sent as it is: it becomes .BAD."""


class SpoolError(BibliogateError):
    """The spool folder cannot be read or written."""


class SmtpProblem(BibliogateError):
    """The SMTP server could not be used at all (connection, TLS, login).

    ``lasting`` is true for problems that need a person (a refused login,
    a certificate that does not verify), false for ones that pass (a server
    that is down or busy)."""

    def __init__(self, message: str, lasting: bool = False):
        super().__init__(message)
        self.lasting = lasting


class Busy(BibliogateError):
    """Another process holds a lock we need."""


class UsageError(BibliogateError):
    """The command line asks for something that cannot be done as asked."""


# Settings ####################################################################

DEFAULT_INI = """\
; BiblioGate settings. Edit by hand (Notepad is fine) or on the config page,
; http://127.0.0.1:8025/ while `python bibliogate.py run` is running.
; A changed file is picked up at the next check; no restart is needed.
; Relative paths are relative to the folder this file is in.
; Text after " ;" on a line is a comment.

[smtp]
host =                  ; IP address or name of the local SMTP server
port = 25               ; 25, 587 (starttls) or 465 (tls)
security = none         ; none | starttls | tls
ehlo =                  ; the EHLO name to announce; empty = this computer's name
username =              ; empty = the server needs no login
password =
timeout_seconds = 30    ; for each step of talking to the server
ca_file =               ; certificates are checked; to trust an internal relay's own
                        ; certificate, give the path of its PEM file (or its CA's)

[gateway]
spool_folder = spool    ; the "folder to monitor": *.TMP files here are sent
from_address =          ; sending address of every message; the daily log goes here
minutes_between_checks = 3      ; decimals allowed
messages_per_check = 10
test_to_address =       ; where [Test] and `python bibliogate.py test` send
give_up_after_hours = 72        ; a message the server keeps refusing "for now" becomes .BAD after this

[overdue]
enabled = no
run_at = 06:30
warning_days = 3
overdue_days = 1
reminder_days = 3
closed =                ; days with no run: weekdays and dates, e.g. sat, sun, 2026-12-18..2027-01-28
max_data_age_hours = 36 ; refuse to send notices from loans imported longer ago than this

[library]
name =                  ; used in templates
date_format = %Y-%m-%d  ; how due dates are written in imported CSV files and in messages

[web]
address = 127.0.0.1     ; any other address needs a page password (see set-password)
port = 8025
password_hash =         ; written by `set-password`, never by hand

[data]
database = bibliogate.db
templates_folder = templates
log_folder = logs
import_folder = import  ; patrons.csv / loans.csv dropped here are imported by `run`
keep_log_days = 60      ; log files older than this are deleted
"""

def _defaults() -> MappingProxyType:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    parser.read_string(DEFAULT_INI)
    return MappingProxyType({name: MappingProxyType(dict(parser.items(name, raw=True)))
                             for name in parser.sections()})


#: Every key of every section, with its default, read from DEFAULT_INI.
DEFAULTS = _defaults()

SECURITY_CHOICES = ("none", "starttls", "tls")


@dataclasses.dataclass
class Settings:
    """Everything bibliogate.ini says, checked. ``problems`` lists what is wrong,
    one sentence each, naming the key and the fix; the sender does not run while
    there is one, but everything else does."""

    ini_path: Path
    #: (section, key) -> the text as written, for the config page.
    raw: dict
    problems: list
    smtp_host: str = ""
    smtp_port: int = 25
    security: str = "none"
    ehlo: str = ""
    username: str = ""
    password: str = ""
    timeout: float = 30.0
    ca_file: str = ""
    spool: Path = Path("spool")
    from_address: str = ""
    interval: float = 180.0        #: seconds between checks
    per_check: int = 10
    test_to: str = ""
    give_up_seconds: float = 72 * 3600.0
    library_name: str = ""
    date_format: str = "%Y-%m-%d"
    database: Path = Path("bibliogate.db")
    templates: Path = Path("templates")
    log_folder: Path = Path("logs")
    import_folder: Path = Path("import")
    keep_log_days: int = 60

    @property
    def base(self) -> Path:
        return self.ini_path.parent

    @property
    def sender_ok(self) -> bool:
        return not self.problems

    def get(self, section: str, key: str) -> str:
        return self.raw.get((section, key), DEFAULTS[section][key])


def ini_problem(section: str, key: str, value: str, what: str) -> str:
    return f"bibliogate.ini [{section}] {key} = {value!r}: {what}"


class _Reader:
    """Reads typed values from a parsed ini, collecting one problem per bad key."""

    def __init__(self, raw: dict, problems: list):
        self.raw, self.problems = raw, problems

    def text(self, section: str, key: str) -> str:
        return self.raw.get((section, key), DEFAULTS[section][key]).strip()

    def number(self, section, key, kind, low, high, fix, default):
        value = self.text(section, key)
        try:
            number = kind(value)
        except ValueError:
            self.problems.append(ini_problem(section, key, value, f"not a number. {fix}"))
            return default
        if not low <= number <= high:
            self.problems.append(ini_problem(section, key, value, f"out of range. {fix}"))
            return default
        return number

    def address(self, section, key, required_for=""):
        value = self.text(section, key)
        if not value and required_for:
            self.problems.append(ini_problem(section, key, value, f"not set. {required_for}"))
        elif value and not ADDRESS_RE.match(value):
            self.problems.append(ini_problem(
                section, key, value, "not an email address. Write it as name@school.example."))
            return ""
        return value

    def path(self, base: Path, section, key) -> Path:
        return (base / self.text(section, key)).resolve()


def parse_ini_text(text: str, ini_path: Path) -> tuple[dict, list]:
    """(section, key) -> value, and any syntax problem as sentences."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None,
                                       strict=False)
    try:
        parser.read_string(text, source=str(ini_path))
    except configparser.Error as exc:
        return {}, [f"{ini_path} cannot be read: {exc}. Fix that line, or delete the file "
                    "to have a fresh one written."]
    raw, problems = {}, []
    for section in parser.sections():
        for key, value in parser.items(section, raw=True):
            raw[(section, key)] = value
            if section in DEFAULTS and key not in DEFAULTS[section]:
                problems.append(f"bibliogate.ini [{section}] {key}: unknown setting (misspelt?); "
                                f"the known ones are {', '.join(DEFAULTS[section])}.")
    return raw, problems


def load_settings(ini_path: Path) -> Settings:
    """Read and check bibliogate.ini. Never raises for a bad value: every problem
    is a sentence in ``Settings.problems`` and the default is used instead."""
    ini_path = Path(ini_path).resolve()
    try:
        text = ini_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        text = DEFAULT_INI
    except (OSError, UnicodeDecodeError) as exc:
        text, unreadable = "", f"{ini_path} cannot be read ({exc}); using the defaults."
    else:
        unreadable = None
    raw, problems = parse_ini_text(text, ini_path)
    if unreadable:
        problems.append(unreadable)
    r, base = _Reader(raw, problems), ini_path.parent
    s = Settings(ini_path=ini_path, raw=raw, problems=problems)
    s.smtp_host = r.text("smtp", "host")
    if not s.smtp_host:
        problems.append(ini_problem("smtp", "host", "", "not set. Enter the IP address or name "
                                    "of the SMTP server this school's computers send through."))
    elif not re.match(r"^[A-Za-z0-9.:\[\]-]+$", s.smtp_host):
        problems.append(ini_problem("smtp", "host", s.smtp_host, "not a server name or IP address."))
    s.security = r.text("smtp", "security").lower()
    if s.security not in SECURITY_CHOICES:
        problems.append(ini_problem("smtp", "security", s.security,
                                    "must be none, starttls or tls."))
        s.security = "none"
    port_fix = "Use 25, 587 (starttls) or 465 (tls)."
    s.smtp_port = r.number("smtp", "port", int, 1, 65535, port_fix, 25)
    s.ehlo = r.text("smtp", "ehlo")
    if s.ehlo and not re.match(r"^[A-Za-z0-9.\[\]:-]+$", s.ehlo):
        problems.append(ini_problem("smtp", "ehlo", s.ehlo, "must be a host name such as "
                                    "library.school.example, without spaces."))
    s.username = r.text("smtp", "username")
    s.password = raw.get(("smtp", "password"), "").strip()
    s.timeout = r.number("smtp", "timeout_seconds", float, 1, 600,
                         "Use a number of seconds from 1 to 600, such as 30.", 30.0)
    s.ca_file = r.text("smtp", "ca_file")
    if s.ca_file:
        ca = (base / s.ca_file).resolve()
        s.ca_file = str(ca)
        if not ca.is_file():
            problems.append(ini_problem("smtp", "ca_file", r.text("smtp", "ca_file"),
                                        "no such file. Give the path of the relay's PEM "
                                        "certificate, or leave it empty."))
    s.spool = r.path(base, "gateway", "spool_folder")
    s.from_address = r.address("gateway", "from_address",
                               required_for="Enter the library's address, e.g. library@school.example; "
                                            "every message is sent from it and the daily log goes to it.")
    minutes = r.number("gateway", "minutes_between_checks", float, 0.05, 1440,
                       "Use minutes from 0.05 to 1440, such as 3 or 0.5.", 3.0)
    s.interval = minutes * 60.0
    s.per_check = r.number("gateway", "messages_per_check", int, 1, 10000,
                           "Use a whole number from 1 to 10000, such as 10.", 10)
    s.test_to = r.address("gateway", "test_to_address")
    s.give_up_seconds = 3600.0 * r.number("gateway", "give_up_after_hours", float, 0.01, 24 * 60,
                                          "Use hours from 0.01 to 1440, such as 72.", 72.0)
    s.library_name = r.text("library", "name")
    s.date_format = r.text("library", "date_format") or "%Y-%m-%d"
    if "%" not in s.date_format:
        problems.append(ini_problem("library", "date_format", s.date_format,
                                    "needs %d, %m and %Y codes, such as %d/%m/%Y."))
    s.database = r.path(base, "data", "database")
    s.templates = r.path(base, "data", "templates_folder")
    s.log_folder = r.path(base, "data", "log_folder")
    s.import_folder = r.path(base, "data", "import_folder")
    s.keep_log_days = r.number("data", "keep_log_days", int, 1, 3650,
                               "Use a number of days such as 60.", 60)
    for check in SETTINGS_CHECKS:
        check(s, r)
    return s


#: Further checks (section, reader) that later parts of the program add.
SETTINGS_CHECKS: list[Callable[[Settings, _Reader], None]] = []


def ensure_layout(ini_path: Path) -> tuple[Settings, list[str]]:
    """First run: write the default ini and templates; always: create the
    folders. Returns the settings and what was created, as sentences."""
    ini_path = Path(ini_path).resolve()
    created = []
    if not ini_path.exists():
        ini_path.parent.mkdir(parents=True, exist_ok=True)
        ini_path.write_text(DEFAULT_INI, encoding="utf-8")
        created.append(f"Wrote the default settings to {ini_path}.")
    settings = load_settings(ini_path)
    if not settings.templates.exists():
        settings.templates.mkdir(parents=True)
        for kind, text in DEFAULT_TEMPLATES.items():
            (settings.templates / f"{kind}.txt").write_text(text, encoding="utf-8")
        created.append(f"Wrote the default message templates to {settings.templates}.")
    for folder in (settings.spool, settings.log_folder):
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
                created.append(f"Created {folder}.")
            except OSError as exc:
                settings.problems.append(f"{folder} cannot be created ({exc.strerror}). "
                                         "Check the folder setting and its permissions.")
    check_folders(settings)
    settings.problems.extend(template_problems(settings))
    return settings, created


def check_folders(settings: Settings) -> None:
    if not settings.spool.is_dir():
        settings.problems.append(ini_problem("gateway", "spool_folder", settings.get("gateway", "spool_folder"),
                                             f"{settings.spool} is not a folder. Create it or fix the path."))
    elif not os.access(settings.spool, os.R_OK | os.W_OK):
        settings.problems.append(ini_problem("gateway", "spool_folder", settings.get("gateway", "spool_folder"),
                                             f"{settings.spool} cannot be read and written by this "
                                             "account. Give it modify rights on the folder."))


# Locks #######################################################################

if os.name == "nt":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class FileLock:
    """An exclusive lock on a file, held by an open handle: the operating
    system lets go of it when the process ends, however it ends, so a killed
    gateway never leaves a stale lock behind."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def acquire(self) -> bool:
        """Take the lock if it is free; False if another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if _try_lock(fd):
            self.fd = fd
            return True
        os.close(fd)
        return False

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _unlock(fd)
            os.close(fd)

    def __enter__(self) -> "FileLock":
        if not self.acquire():
            raise Busy(f"{self.path} is locked by another BiblioGate process.")
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# Database ####################################################################

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, day TEXT NOT NULL,
    kind TEXT NOT NULL, file TEXT, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_day ON events(day, kind);
-- one row per waiting file that has failed at least once
CREATE TABLE IF NOT EXISTS spool_state (
    file TEXT PRIMARY KEY, attempts INTEGER NOT NULL DEFAULT 0,
    first_failed REAL, next_try REAL, last_error TEXT);
-- files the server accepted: a crash between the server's "250 OK" and the
-- file's removal must not send them again
CREATE TABLE IF NOT EXISTS sent (
    file TEXT NOT NULL, digest TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (file, digest));
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);
-- circulation data, imported from the library system's CSV files
CREATE TABLE IF NOT EXISTS patrons (
    patron_id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL DEFAULT '',
    guardian_email TEXT NOT NULL DEFAULT '', grp TEXT NOT NULL DEFAULT '',
    auto_overdue INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS patrons_grp ON patrons(grp);
-- the loans out now: each import replaces them all
CREATE TABLE IF NOT EXISTS loans (
    barcode TEXT PRIMARY KEY, patron_id TEXT NOT NULL, title TEXT NOT NULL,
    due_date TEXT NOT NULL);                       -- ISO yyyy-mm-dd
CREATE INDEX IF NOT EXISTS loans_due ON loans(due_date);
CREATE INDEX IF NOT EXISTS loans_patron ON loans(patron_id);
-- every notice or letter queued, so none is ever queued twice
CREATE TABLE IF NOT EXISTS notices (
    patron_id TEXT NOT NULL, barcode TEXT NOT NULL, kind TEXT NOT NULL,
    due_date TEXT NOT NULL, queued_at REAL NOT NULL, file TEXT,
    PRIMARY KEY (barcode, kind, due_date, patron_id));
"""


def open_db(path: Path) -> sqlite3.Connection:
    """A connection with the schema in place. Another process may hold the
    database for a while (an import, a backup); we wait up to a minute."""
    conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


def get_state(conn: sqlite3.Connection, key: str, default=None):
    row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else default


def set_state(conn: sqlite3.Connection, **values) -> None:
    with conn:
        conn.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                         [(k, json.dumps(v)) for k, v in values.items()])


# Journal #####################################################################

class DailyFileHandler(logging.Handler):
    """Writes each record to logs/bibliogate-YYYY-MM-DD.log of its own day,
    opening the file for each line (so Notepad can read it, and nothing needs
    rotating while the file is in use)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s",
                                            "%Y-%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        day = time.strftime("%Y-%m-%d", time.localtime(record.created))
        try:
            with open(self.folder / f"bibliogate-{day}.log", "a", encoding="utf-8") as fh:
                fh.write(self.format(record) + "\n")
        except OSError:
            self.handleError(record)


def setup_logging(settings: Settings, console: bool = True) -> None:
    """Route the 'bibliogate' logger to the console (when there is one) and to
    the daily files in the log folder."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    if settings.log_folder.is_dir():
        log.addHandler(DailyFileHandler(settings.log_folder))
    if console and sys.stderr is not None:   # pythonw has no console at all
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


class Journal:
    """Records every action: a line in the log file, a row in the database
    (which the daily log is made from). One sqlite connection per thread."""

    def __init__(self, db_path: Path, clock: Callable[[], float] = time.time):
        self.db_path, self.clock = db_path, clock
        self._local = threading.local()

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = open_db(self.db_path)
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def event(self, kind: str, detail: str, file: str | None = None,
              level: int = logging.INFO) -> None:
        now = self.clock()
        day = dt.datetime.fromtimestamp(now).strftime("%Y-%m-%d")
        log.log(level, "%s%s", f"{file}: " if file else "", detail)
        try:
            with self.db:
                self.db.execute("INSERT INTO events(at, day, kind, file, detail) VALUES (?,?,?,?,?)",
                                (now, day, kind, file, detail))
        except sqlite3.Error as exc:      # the log file still has the line
            log.error("could not record this in %s: %s", self.db_path, exc)

    def events(self, day: str, kinds: Iterable[str] = ()) -> list[sqlite3.Row]:
        kinds = list(kinds)
        sql = "SELECT * FROM events WHERE day = ?"
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
        return self.db.execute(sql + " ORDER BY id", (day, *kinds)).fetchall()


# Templates ###################################################################

#: The placeholders each kind of message may use. Later parts add kinds.
TEMPLATE_FIELDS: dict[str, frozenset] = {
    "test": frozenset({"library_name", "to_address", "from_address", "smtp_host", "queued_at"}),
    "daily_log": frozenset({"library_name", "day", "sent_count", "bad_count", "deferred_count",
                            "waiting_count", "waiting_bad_count", "oldest_waiting", "bad_list",
                            "refused_list", "sender_stops", "activity", "log_lines"}),
}

DEFAULT_TEMPLATES: dict[str, str] = {
    "test": """\
# The message sent by [Test] on the config page and by `bibliogate.py test`.
# Lines starting with # are notes for you and are not sent.
# First line: Subject. Then one blank line. Then the body.
# Placeholders: ${library_name} ${to_address} ${from_address} ${smtp_host} ${queued_at}
Subject: BiblioGate test message from ${library_name}

Hello,

This is a test message from the ${library_name} email gateway (BiblioGate).
It was queued at ${queued_at} and relayed through the SMTP server ${smtp_host}
from ${from_address} to ${to_address}.

If you can read this, library email works. No reply is needed.
""",
    "daily_log": """\
# The daily log, mailed each morning to the library's from_address.
# Lines starting with # are notes for you and are not sent.
# First line: Subject. Then one blank line. Then the body.
# Placeholders: ${library_name} ${day} ${sent_count} ${bad_count} ${deferred_count}
#   ${waiting_count} ${waiting_bad_count} ${oldest_waiting} ${bad_list} ${refused_list}
#   ${sender_stops} ${activity} ${log_lines}
Subject: BiblioGate daily log for ${day}: ${sent_count} sent, ${bad_count} failed

This is the daily log of the ${library_name} email gateway for ${day}.
If one morning this message does not arrive, library email needs attention.

Sent:                        ${sent_count}
Failed for good (.BAD):      ${bad_count}
Delayed, will be retried:    ${deferred_count}
Waiting in the queue now:    ${waiting_count} (oldest: ${oldest_waiting})
.BAD files waiting for you:  ${waiting_bad_count}

Messages that could not be sent:
${bad_list}

Recipients the mail server refused:
${refused_list}

Times the sender stopped:
${sender_stops}

Other activity:
${activity}

The whole log of the day:
${log_lines}
""",
}


@dataclasses.dataclass(frozen=True)
class MessageTemplate:
    kind: str
    path: Path
    subject: string.Template
    body: string.Template

    def render(self, values: dict) -> tuple[str, str]:
        """(subject, body) with every placeholder filled; the subject is one
        line whatever the values hold, so data can never add a header."""
        subject = self.subject.substitute(values)
        return " ".join(subject.split()), self.body.substitute(values)


def placeholders(template: string.Template) -> list[tuple[str, int]]:
    """(name, offset) of every ${name} / $name; raises ValueError on a bad '$'."""
    found = []
    for match in template.pattern.finditer(template.template):
        if match.group("invalid") is not None:
            raise ValueError(match.start("invalid"))
        name = match.group("named") or match.group("braced")
        if name:
            found.append((name, match.start()))
    return found


def parse_template(kind: str, text: str, path: Path) -> MessageTemplate:
    """Check and split a template file; raises TemplateError naming the line."""
    lines = text.splitlines()
    number = 0
    while number < len(lines) and (lines[number].startswith("#") or not lines[number].strip()):
        number += 1
    if number >= len(lines) or not lines[number].lower().startswith("subject:"):
        raise TemplateError(path, number + 1 if number < len(lines) else None,
                            "the first line after the # notes must be 'Subject: ...'.")
    subject_line = number + 1
    subject = lines[number].split(":", 1)[1].strip()
    body_lines = lines[number + 1:]
    if body_lines and body_lines[0].strip():
        raise TemplateError(path, subject_line + 1, "leave one blank line after the Subject line.")
    allowed = TEMPLATE_FIELDS[kind]
    for offset_line, part in ((subject_line, subject), (subject_line + 2, "\n".join(body_lines[1:]))):
        template = string.Template(part)
        try:
            names = placeholders(template)
        except ValueError as exc:
            lineno = offset_line + part.count("\n", 0, exc.args[0])
            raise TemplateError(path, lineno, "a lone '$' must be written '$$'.") from None
        for name, offset in names:
            if name not in allowed:
                lineno = offset_line + part.count("\n", 0, offset)
                raise TemplateError(path, lineno, f"unknown placeholder ${{{name}}}; this template "
                                    f"may use {', '.join('${%s}' % n for n in sorted(allowed))}.")
    return MessageTemplate(kind, path, string.Template(subject),
                           string.Template("\n".join(body_lines[1:]).strip("\n") + "\n"))


def load_template(settings: Settings, kind: str) -> MessageTemplate:
    path = settings.templates / f"{kind}.txt"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TemplateError(path, None, "missing. Copy it back from the BiblioGate files, or "
                            "rename the templates folder so that a start writes all the "
                            "default templates again.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(path, None, f"cannot be read ({exc}). Save it as UTF-8 text.") from None
    return parse_template(kind, text, path)


def template_problems(settings: Settings) -> list[str]:
    """Every template checked now, so a typo fails at start, not at 6:30."""
    problems = []
    for kind in TEMPLATE_FIELDS:
        try:
            load_template(settings, kind)
        except TemplateError as exc:
            problems.append(str(exc))
    return problems


# Messages ####################################################################

def one_line(value: str) -> str:
    """A value fit for a header: control characters become spaces."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", str(value)).split())


def valid_address(address: str) -> bool:
    return bool(ADDRESS_RE.match(address or ""))


def compose(settings: Settings, to: str, subject: str, body: str, to_name: str = "",
            now: float | None = None) -> bytes:
    """A complete message of our own, ready for the spool. The names and
    addresses come from data a patron may have typed: they pass through
    one_line and the email package, so they can never add a header."""
    if not valid_address(to):
        raise BadMessage(f"{to!r} is not an email address.")
    msg = EmailMessage(policy=email.policy.SMTP)
    sender = settings.from_address or "bibliogate@localhost"
    msg["From"] = email.utils.formataddr((one_line(settings.library_name), sender), "utf-8")
    msg["To"] = email.utils.formataddr((one_line(to_name), to), "utf-8")
    msg["Subject"] = one_line(subject)
    msg["Date"] = email.utils.formatdate(now, localtime=True)
    msg["Message-ID"] = email.utils.make_msgid("bibliogate", sender.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)
    return msg.as_bytes()


@dataclasses.dataclass
class Outgoing:
    """A queued file made ready to relay."""
    sender: str
    recipients: list
    data: bytes
    invalid: list          #: addresses that were not addresses at all
    subject: str
    message_id: str


def split_headers(raw: bytes) -> tuple[list[bytes], bytes]:
    """The header lines (continuations joined on) and the body, LF endings."""
    text = raw.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep and not HEADER_LINE_RE.match(text.rsplit(b"\n", 1)[-1] or b"x:"):
        # No blank line: a message whose body starts at the first non-header.
        lines = text.split(b"\n")
        for n, line in enumerate(lines):
            if not (HEADER_LINE_RE.match(line) or (n and line[:1] in (b" ", b"\t"))):
                head, body = b"\n".join(lines[:n]), b"\n".join(lines[n:])
                break
    fields: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        elif line:
            fields.append(line)
    return fields, body


def _field(line: bytes) -> tuple[str, str]:
    name, _, value = line.partition(b":")
    text = value.decode("utf-8", "replace")
    return name.decode("ascii", "replace").strip().lower(), " ".join(text.split())


def decoded(value: str) -> str:
    """An RFC 2047 encoded header value as text (best effort, for lists)."""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return value


def prepare_message(raw: bytes, sender: str, sender_name: str, queued_at: float,
                    file_name: str) -> Outgoing:
    """Check a queued file and make the bytes we relay: From and the envelope
    sender are ours, Bcc is taken out (its addresses stay recipients), and a
    Date, Message-ID and Auto-Submitted are added where missing. Raises
    BadMessage, with the reason, for a file that can never be sent."""
    if not raw.strip():
        raise BadMessage("the file is empty.")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"the file is {len(raw) // 1048576} MB; mail servers refuse messages this "
                         f"large (the limit here is {MAX_MESSAGE_BYTES // 1048576} MB).")
    fields, body = split_headers(raw)
    if not fields or not HEADER_LINE_RE.match(fields[0]):
        raise BadMessage("this is not an email message: it must start with header lines "
                         "such as 'To: patron@example.org', then a blank line, then the text.")
    recipients, invalid, kept, seen = [], [], [], set()
    subject = message_id = ""
    names = set()
    for line in fields:
        if b"\r" in line or b"\x00" in line:
            raise BadMessage(f"the header {_field(line)[0]!r} holds a carriage return or NUL byte "
                             "(an attempt to add headers); the program that wrote it must be fixed.")
        if not HEADER_LINE_RE.match(line):
            raise BadMessage(f"the header line {line[:60].decode('utf-8', 'replace')!r} has no "
                             "'Name:' in front; the header block is broken.")
        name, value = _field(line)
        names.add(name)
        if name in RECIPIENT_HEADERS:
            for _, address in email.utils.getaddresses([value]):
                if not address:
                    continue
                (recipients if valid_address(address) else invalid).append(address)
        if name == "subject":
            subject = decoded(value)
        elif name == "message-id":
            message_id = value
        if name not in REPLACED_HEADERS:
            kept.append(line)
    recipients = [a for a in recipients if not (a.lower() in seen or seen.add(a.lower()))]
    if not recipients:
        what = f"no valid recipient ({', '.join(invalid)} is not an address)" if invalid else \
            "no recipient: it has no To, Cc or Bcc address"
        raise BadMessage(f"{what}.")
    domain = sender.rpartition("@")[2] or "localhost"
    added = [b"From: " + email.utils.formataddr((one_line(sender_name), sender), "utf-8").encode()]
    if "date" not in names:
        added.append(b"Date: " + email.utils.formatdate(queued_at, localtime=True).encode())
    if "message-id" not in names:
        digest = hashlib.sha256(raw).hexdigest()[:20]
        message_id = f"<{digest}.{re.sub(r'[^A-Za-z0-9.-]', '', file_name)[:40]}@{domain}>"
        added.append(b"Message-ID: " + message_id.encode())
    if "auto-submitted" not in names:
        added.append(b"Auto-Submitted: auto-generated")
    head = b"\r\n".join(line.replace(b"\n", b"\r\n") for line in added + kept)
    body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return Outgoing(sender, recipients, head + b"\r\n\r\n" + body, invalid, subject, message_id)


def peek(path: Path, limit: int = 65536) -> dict:
    """To and Subject of a queued file, for lists (never raises)."""
    try:
        with open(path, "rb") as fh:
            fields, _ = split_headers(fh.read(limit))
    except OSError:
        return {"to": "", "subject": ""}
    found = {"to": "", "subject": ""}
    for line in fields:
        name, value = _field(line)
        if name in found and not found[name]:
            found[name] = decoded(value)
    return found


# Spool #######################################################################

@dataclasses.dataclass(frozen=True)
class SpoolFile:
    name: str
    path: Path
    mtime: float
    size: int

    @property
    def priority(self) -> bool:
        return self.name.upper().startswith(PRIORITY_PREFIX)

    @property
    def order(self) -> tuple:
        """Test messages and the daily log first, then oldest first."""
        return (not self.priority, self.mtime, self.name)


def is_waiting_name(name: str) -> bool:
    return name.upper().endswith(WAITING_EXT) and not name.startswith(".")


def is_bad_name(name: str) -> bool:
    return name.upper().endswith(BAD_EXT)


def scan(folder: Path, want: Callable[[str], bool] = is_waiting_name) -> list[SpoolFile]:
    """Every file of one kind in the spool folder, with its time and size."""
    found = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not want(entry.name):
                    continue
                try:
                    st = entry.stat()
                except OSError:       # removed while we looked
                    continue
                found.append(SpoolFile(entry.name, Path(entry.path), st.st_mtime, st.st_size))
    except OSError as exc:
        raise SpoolError(f"The spool folder {folder} cannot be read ({exc.strerror}). Check "
                         "[gateway] spool_folder and the folder's permissions.") from None
    return found


def pick_batch(files: Iterable[SpoolFile], limit: int, now: float,
               not_before: dict) -> list[SpoolFile]:
    """The next files to send: stable (no foreign program still writing them),
    not waiting for a retry, test messages first, then oldest first."""
    ready = (f for f in files
             if f.mtime <= now - STABLE_SECONDS and not_before.get(f.name, 0) <= now)
    return heapq.nsmallest(limit, ready, key=lambda f: f.order)


def fsync_folder(folder: Path) -> None:
    """Make a rename survive a power cut (POSIX; Windows' NTFS journals it)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mtime: float | None = None) -> None:
    """Write data to path so that no one ever sees half of it: a hidden
    .part file first, flushed to disk, then renamed. On error (a full disk)
    the .part file is removed and SpoolError says what happened."""
    part = path.with_name("." + path.name + PART_SUFFIX)
    try:
        with open(part, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mtime is not None:
            os.utime(part, (mtime, mtime))
        os.replace(part, path)
        fsync_folder(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        raise SpoolError(f"Could not write {path.name} in {path.parent}: {exc.strerror or exc}. "
                         "Free some disk space or check the folder's permissions; "
                         "nothing was queued.") from None


def new_name(now: float, priority: bool = False, label: str = "msg") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{PRIORITY_PREFIX if priority else ''}{label}-{stamp}-{secrets.token_hex(4)}{WAITING_EXT}"


def enqueue_bytes(folder: Path, data: bytes, now: float | None = None, priority: bool = False,
                  label: str = "msg") -> Path:
    """Queue one message; returns the spool file. Written whole or not at all."""
    now = time.time() if now is None else now
    path = Path(folder) / new_name(now, priority, label)
    write_atomic(path, data, mtime=min(now, time.time()) - OWN_FILE_AGE)
    return path


def free_name(folder: Path, stem: str, ext: str) -> Path:
    """stem+ext in folder, or stem-2+ext, ... if that name is taken."""
    candidate, n = folder / f"{stem}{ext}", 1
    while candidate.exists() or (folder / f"{candidate.name}{REASON_SUFFIX}").exists():
        n += 1
        candidate = folder / f"{stem}-{n}{ext}"
    return candidate


def reason_path(bad: Path) -> Path:
    return bad.with_name(bad.name + REASON_SUFFIX)


def mark_bad(path: Path, reason: str, now: float) -> Path:
    """Rename a waiting file to .BAD, its reason in a text file beside it.
    The reason is written first: a crash in between leaves the message
    waiting (and a stray reason file that the next .BAD reuses)."""
    stem = path.name[:-len(WAITING_EXT)]
    bad = free_name(path.parent, stem, BAD_EXT)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    write_atomic(reason_path(bad), f"{stamp} {reason}\n".encode("utf-8"))
    os.replace(path, bad)
    fsync_folder(path.parent)
    return bad


def read_reason(bad: Path) -> str | None:
    try:
        return reason_path(bad).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def resolve_in_spool(folder: Path, name: str) -> Path:
    """The spool file called name; never a path outside the spool folder."""
    if not name or name != Path(name).name or name in (".", "..") or "/" in name or "\\" in name:
        raise SpoolError(f"{name!r} is not a file name in the spool folder; use a name as "
                         "`queue` shows it.")
    path = Path(folder) / name
    if not path.is_file() or not (is_waiting_name(name) or is_bad_name(name)):
        raise SpoolError(f"There is no queued message called {name} in {folder}.")
    return path


def retry_bad(folder: Path, name: str) -> Path:
    """Put a .BAD file back in the queue as .TMP; returns the new path."""
    bad = resolve_in_spool(folder, name)
    if not is_bad_name(name):
        raise SpoolError(f"{name} is already waiting to be sent.")
    target = free_name(bad.parent, name[:-len(BAD_EXT)], WAITING_EXT)
    os.replace(bad, target)
    with contextlib.suppress(OSError):
        reason_path(bad).unlink()
    return target


def delete_file(folder: Path, name: str) -> None:
    path = resolve_in_spool(folder, name)
    path.unlink()
    with contextlib.suppress(OSError):
        reason_path(path).unlink()


def remove_stale_parts(folder: Path, now: float) -> None:
    """A .part file a crash left behind is an unfinished write: never queued."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(PART_SUFFIX) and entry.stat().st_mtime < now - 3600:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def queue_rows(settings: Settings, db: sqlite3.Connection) -> list[dict]:
    """The queue as `queue --json` and the config page show it."""
    state = {r["file"]: r for r in db.execute("SELECT * FROM spool_state")}
    rows = []
    files = scan(settings.spool, lambda n: is_waiting_name(n) or is_bad_name(n))
    for f in sorted(files, key=lambda f: (is_bad_name(f.name), f.order)):
        bad = is_bad_name(f.name)
        st = state.get(f.name)
        rows.append({
            "file": f.name, "state": "bad" if bad else "waiting",
            "reason": read_reason(f.path) if bad else (st["last_error"] if st else None),
            "attempts": st["attempts"] if st else 0,
            "next_try": st["next_try"] if st and not bad else None,
            "queued_at": f.mtime, "size": f.size, **peek(f.path)})
    return rows


# Sender ######################################################################

@dataclasses.dataclass
class CheckResult:
    sent: int = 0
    bad: int = 0
    deferred: int = 0
    problem: SmtpProblem | None = None
    skipped: str = ""       #: why the check did not run at all

    def summary(self) -> str:
        if self.skipped:
            return self.skipped
        text = f"{self.sent} sent, {self.bad} failed for good, {self.deferred} delayed"
        return text + (f"; stopped: {self.problem}" if self.problem else "")


def retry_wait(attempts: int) -> float:
    """5 minutes after the first temporary refusal, doubling, at most an hour."""
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, min(attempts, 10) - 1))


def reply_text(code: int, message) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return f"{code} {' '.join(str(message).split())}"


def tls_context(settings: Settings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=settings.ca_file or None)


def connect(settings: Settings) -> smtplib.SMTP:
    """An SMTP connection, with TLS and login as the settings ask.
    Raises SmtpProblem with a sentence naming the setting to check."""
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    name = settings.ehlo or None
    try:
        if settings.security == "tls":
            smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, name,
                                    timeout=settings.timeout, context=tls_context(settings))
        else:
            smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, name,
                                timeout=settings.timeout)
    except ssl.SSLError as exc:
        raise SmtpProblem(f"TLS with {where} failed: {exc}. Check [smtp] security and port "
                          "(465 is tls, 587 is starttls), or set ca_file for the server's "
                          "own certificate.", lasting=True) from None
    except smtplib.SMTPConnectError as exc:
        raise SmtpProblem(f"The SMTP server {where} refused the connection: "
                          f"{reply_text(exc.smtp_code, exc.smtp_error)}.") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise SmtpProblem(f"Could not reach the SMTP server {where}: {exc}. Check [smtp] host "
                          "and port, and that the firewall lets this computer reach it.") from None
    try:
        smtp.ehlo_or_helo_if_needed()
        if settings.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise SmtpProblem(f"The SMTP server {where} does not offer STARTTLS. Set [smtp] "
                                  "security = none, or use its TLS port.", lasting=True)
            smtp.starttls(context=tls_context(settings))
            smtp.ehlo()
        if settings.username:
            smtp.login(settings.username, settings.password)
    except smtplib.SMTPAuthenticationError as exc:
        smtp.close()
        raise SmtpProblem(f"The SMTP server {where} refused the login of {settings.username!r}: "
                          f"{reply_text(exc.smtp_code, exc.smtp_error)}. Check [smtp] username "
                          "and password.", lasting=True) from None
    except smtplib.SMTPNotSupportedError:
        smtp.close()
        raise SmtpProblem(f"The SMTP server {where} does not accept logins (no AUTH). Leave "
                          "[smtp] username empty, or use security = starttls.", lasting=True) from None
    except ssl.SSLError as exc:
        smtp.close()
        raise SmtpProblem(f"TLS with {where} failed: {exc}. Set [smtp] ca_file for a server "
                          "with its own certificate.", lasting=True) from None
    except SmtpProblem:
        smtp.close()
        raise
    except (OSError, smtplib.SMTPException) as exc:
        smtp.close()
        raise SmtpProblem(f"The SMTP server {where} broke off the greeting: {exc}.") from None
    return smtp


class Outcome:
    SENT, BAD, LATER, BROKEN = "sent", "bad", "later", "broken"


def classify(exc: Exception) -> tuple[str, str]:
    """What a failed transaction means for the message: (outcome, reason).
    5xx is final; 4xx and a lost connection are worth another try."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        replies = exc.recipients.values()
        text = "; ".join(f"{a}: {reply_text(c, m)}" for a, (c, m) in exc.recipients.items())
        final = all(code >= 500 for code, _ in replies)
        return (Outcome.BAD if final else Outcome.LATER), f"every recipient was refused: {text}"
    if isinstance(exc, smtplib.SMTPResponseException):
        what = "sender" if isinstance(exc, smtplib.SMTPSenderRefused) else "message"
        text = f"the server refused the {what}: {reply_text(exc.smtp_code, exc.smtp_error)}"
        if exc.smtp_code == 421:
            return Outcome.BROKEN, text
        return (Outcome.BAD if exc.smtp_code >= 500 else Outcome.LATER), text
    return Outcome.BROKEN, f"the connection to the server was lost: {exc or type(exc).__name__}"


class Sender:
    """Sends from one spool folder. A check holds the spool's sender lock, so
    two BiblioGate processes on one folder never send the same file."""

    def __init__(self, settings: Settings, journal: Journal, clock: Callable[[], float] = time.time,
                 stop: threading.Event | None = None):
        self.settings, self.journal, self.clock = settings, journal, clock
        self.stop = stop or threading.Event()

    @property
    def db(self) -> sqlite3.Connection:
        return self.journal.db

    # -- one check ------------------------------------------------------------

    def check(self, limit: int | None = None, ignore_waits: bool = False) -> CheckResult:
        """Send up to `limit` waiting files (messages_per_check by default;
        0 = all) over one connection."""
        lock = FileLock(self.settings.spool / ".bibliogate-sender.lock")
        try:
            if not lock.acquire():
                return CheckResult(skipped="another BiblioGate process is sending from this "
                                           "spool folder right now")
        except OSError as exc:
            return CheckResult(skipped=f"the spool folder cannot be locked ({exc.strerror})")
        try:
            return self._check(self.settings.per_check if limit is None else limit, ignore_waits)
        finally:
            lock.release()

    def _check(self, limit: int, ignore_waits: bool) -> CheckResult:
        now = self.clock()
        result = CheckResult()
        waits = {} if ignore_waits else {
            r["file"]: r["next_try"] for r in
            self.db.execute("SELECT file, next_try FROM spool_state WHERE next_try > ?", (now,))}
        batch = pick_batch(scan(self.settings.spool), limit or sys.maxsize, now, waits)
        if not batch:
            return result
        smtp = None
        cap = now + max(CHECK_CAP_SECONDS, self.settings.interval)
        try:
            for n, item in enumerate(batch):
                if self.stop.is_set() or (limit and self.clock() > cap):
                    break
                if smtp is None:
                    try:
                        smtp = connect(self.settings)
                    except SmtpProblem as exc:
                        result.problem = exc
                        self._charge(batch[n:limit or n + self.settings.per_check], str(exc))
                        break
                outcome = self._send_one(smtp, item, result)
                if outcome == Outcome.BROKEN:
                    smtp.close()
                    smtp = None
                    break
        finally:
            if smtp is not None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    smtp.quit()
                smtp.close()
        return result

    def _send_one(self, smtp: smtplib.SMTP, item: SpoolFile, result: CheckResult) -> str:
        try:
            raw = item.path.read_bytes()
        except FileNotFoundError:       # deleted from the queue meanwhile
            return Outcome.SENT
        except OSError as exc:          # e.g. still open in another program (Windows)
            self._later(item, f"the file cannot be read just now ({exc.strerror})", result)
            return Outcome.LATER
        digest = hashlib.sha256(raw).hexdigest()
        if self.db.execute("SELECT 1 FROM sent WHERE file = ? AND digest = ?",
                           (item.name, digest)).fetchone():
            self._done(item, "was delivered before a restart; removed from the queue")
            return Outcome.SENT
        try:
            out = prepare_message(raw, self.settings.from_address, self.settings.library_name,
                                  item.mtime, item.name)
        except BadMessage as exc:
            self._bad(item, str(exc), result)
            return Outcome.BAD
        options = ["BODY=8BITMIME"] if smtp.has_extn("8bitmime") and not out.data.isascii() else []
        try:
            refused = smtp.sendmail(out.sender, out.recipients, out.data, mail_options=options)
        except (smtplib.SMTPException, OSError) as exc:
            outcome, reason = classify(exc)
            if outcome == Outcome.BAD:
                self._bad(item, reason, result)
            else:
                self._later(item, reason, result)
            return outcome
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO sent(file, digest, at) VALUES (?,?,?)",
                            (item.name, digest, self.clock()))
        result.sent += 1
        refused_list = [f"{a} ({reply_text(c, m)})" for a, (c, m) in refused.items()]
        refused_list += [f"{a} (not an email address)" for a in out.invalid]
        self._done(item, f"sent to {', '.join(out.recipients)}: {out.subject!r}")
        if refused_list:
            self.journal.event("refused", f"{out.subject!r}: refused {', '.join(refused_list)}",
                               item.name, logging.WARNING)
        return Outcome.SENT

    # -- what becomes of a file -----------------------------------------------

    def _done(self, item: SpoolFile, detail: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            item.path.unlink()
        with self.db:
            self.db.execute("DELETE FROM spool_state WHERE file = ?", (item.name,))
        self.journal.event("sent", detail, item.name)

    def _bad(self, item: SpoolFile, reason: str, result: CheckResult) -> None:
        try:
            bad = mark_bad(item.path, reason, self.clock())
        except (OSError, SpoolError) as exc:
            self._later(item, f"{reason} (and it could not be renamed .BAD: {exc})", result)
            return
        with self.db:
            self.db.execute("DELETE FROM spool_state WHERE file = ?", (item.name,))
        result.bad += 1
        self.journal.event("bad", f"renamed {bad.name}: {reason}", item.name, logging.WARNING)

    def _later(self, item: SpoolFile, reason: str, result: CheckResult, wait: bool = True) -> None:
        """A temporary failure: try again later, or give up after give_up_after_hours."""
        now = self.clock()
        row = self.db.execute("SELECT attempts, first_failed FROM spool_state WHERE file = ?",
                              (item.name,)).fetchone()
        attempts = (row["attempts"] if row else 0) + 1
        first = row["first_failed"] if row and row["first_failed"] else now
        if now - first >= self.settings.give_up_seconds:
            hours = self.settings.give_up_seconds / 3600
            self._bad(item, f"not delivered after trying for {hours:g} hours; last: {reason}", result)
            return
        next_try = now + retry_wait(attempts) if wait else None
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO spool_state(file, attempts, first_failed, "
                            "next_try, last_error) VALUES (?,?,?,?,?)",
                            (item.name, attempts, first, next_try, reason))
        result.deferred += 1
        when = f"; next try after {time.strftime('%H:%M', time.localtime(next_try))}" if wait else ""
        self.journal.event("deferred", f"not sent for now ({reason}){when}", item.name,
                           logging.WARNING)

    def _charge(self, items: list[SpoolFile], reason: str) -> None:
        """The server could not be used: the files at the head of the queue
        count an attempt (and start their give-up clock) but keep their place."""
        result = CheckResult()
        for item in items:
            self._later(item, reason, result, wait=False)


# Gateway #####################################################################

def local_day(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts).date()


def fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "never"


class Gateway:
    """What `run` does, one tick at a time: a check when one is due, the daily
    log once a day, settings re-read when the ini changes. The clock is
    injected so tests can step through days without sleeping."""

    def __init__(self, ini_path: Path, clock: Callable[[], float] = time.time,
                 stop: threading.Event | None = None):
        self.ini_path = Path(ini_path).resolve()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.settings, created = ensure_layout(self.ini_path)
        self.journal = Journal(self.settings.database, clock)
        for line in created:
            self.journal.event("setup", line)
        self.ini_stamp = self._ini_stamp()
        self.next_check = clock()
        self.sender_state = None
        self.tasks: list[Callable[["Gateway", float], None]] = list(GATEWAY_TASKS)
        self._announce_settings()

    # -- settings -------------------------------------------------------------

    def _ini_stamp(self):
        with contextlib.suppress(OSError):
            st = self.ini_path.stat()
            return (st.st_mtime_ns, st.st_size)
        return None

    def reload_if_changed(self) -> bool:
        stamp = self._ini_stamp()
        if stamp == self.ini_stamp:
            return False
        self.ini_stamp = stamp
        self.reload()
        return True

    def reload(self) -> None:
        """Read the settings again (after Save, or a hand edit) and restart the sender."""
        old = self.settings
        self.settings, _ = ensure_layout(self.ini_path)
        changed = [f"[{s}] {k}" for (s, k) in sorted(set(old.raw) | set(self.settings.raw))
                   if old.raw.get((s, k)) != self.settings.raw.get((s, k))]
        self.journal.event("settings", "settings changed: " + (", ".join(changed) or "no values")
                           + "; the sender restarts with them")
        self.next_check = self.clock()
        self._announce_settings()

    def _announce_settings(self) -> None:
        s = self.settings
        if s.problems:
            self._set_sender("stopped", "the settings need attention: " + " ".join(s.problems))
        else:
            self._set_sender("running", f"sending through {s.smtp_host}:{s.smtp_port} "
                             f"({s.security}), {s.per_check} messages every "
                             f"{s.interval / 60:g} minutes")

    def _set_sender(self, state: str, reason: str) -> None:
        if (state, reason) == self.sender_state:
            return
        level = logging.INFO if state == "running" else logging.WARNING
        kind = "sender_running" if state == "running" else "sender_stopped"
        self.journal.event(kind, f"sender {state}: {reason}", level=level)
        self.sender_state = (state, reason)
        set_state(self.journal.db, sender_state=state, sender_reason=reason)

    # -- the loop -------------------------------------------------------------

    def tick(self) -> float:
        """Do whatever is due now; returns the time of the next due thing."""
        now = self.clock()
        self.reload_if_changed()
        if now >= self.next_check:
            self.next_check = now + self.settings.interval
            self.run_check(now)
        for task in self.tasks:
            task(self, now)
        return self.next_check

    def run_check(self, now: float) -> CheckResult:
        s = self.settings
        if s.problems:
            result = CheckResult(skipped="the settings need attention")
        else:
            result = Sender(s, self.journal, self.clock, self.stop).check()
            if result.problem:
                state = "stopped" if result.problem.lasting else "retrying"
                self._set_sender(state, f"{result.problem} Messages stay queued.")
            elif not result.skipped:
                self._announce_settings()
            if result.sent or result.bad or result.deferred or result.problem:
                self.journal.event("check", f"check: {result.summary()}")
        set_state(self.journal.db, last_check=now, next_check=self.next_check)
        return result

    def run_forever(self) -> None:
        set_state(self.journal.db, run_pid=os.getpid(), run_started=self.clock())
        remove_stale_parts(self.settings.spool, self.clock())
        while not self.stop.is_set():
            due = self.tick()
            self.stop.wait(max(0.05, min(TICK_SECONDS, due - self.clock())))


def daily_log_task(gateway: Gateway, now: float) -> None:
    """Once a day, after midnight, queue the previous day's log to from_address."""
    db = gateway.journal.db
    yesterday = (local_day(now) - dt.timedelta(days=1)).isoformat()
    done = get_state(db, "daily_log_for")
    if done is None:            # first start: there is no earlier day to report
        set_state(db, daily_log_for=yesterday)
        return
    s = gateway.settings
    if done >= yesterday or not valid_address(s.from_address):
        return
    try:
        subject, body = load_template(s, "daily_log").render(daily_summary(gateway, yesterday))
        data = compose(s, s.from_address, subject, body, now=now)
        path = enqueue_bytes(s.spool, data, now, priority=True, label="daily-log")
    except (BibliogateError, KeyError, ValueError) as exc:
        gateway.journal.event("daily_log", f"the daily log for {yesterday} could not be "
                              f"queued: {exc}", level=logging.ERROR)
        return
    set_state(db, daily_log_for=yesterday)
    gateway.journal.event("daily_log", f"queued the daily log for {yesterday}", path.name)
    prune_logs(s.log_folder, s.keep_log_days, now)
    with db:
        db.execute("DELETE FROM events WHERE at < ?", (now - s.keep_log_days * 86400,))
        db.execute("DELETE FROM sent WHERE at < ?", (now - SENT_LEDGER_DAYS * 86400,))


def prune_logs(folder: Path, keep_days: int, now: float) -> None:
    cutoff = (local_day(now) - dt.timedelta(days=keep_days)).isoformat()
    for path in folder.glob("bibliogate-*.log"):
        if path.stem[len("bibliogate-"):] < cutoff:
            with contextlib.suppress(OSError):
                path.unlink()


def _bullets(lines: list[str], empty: str = "  none") -> str:
    return "\n".join(f"  - {line}" for line in lines) if lines else empty


def daily_summary(gateway: Gateway, day: str) -> dict:
    """The daily_log template's values for one day, from the event log."""
    journal, s = gateway.journal, gateway.settings
    rows = journal.events(day)
    by_kind: dict[str, list] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    waiting = scan(s.spool)
    bad_now = scan(s.spool, is_bad_name)
    oldest = min((f.mtime for f in waiting), default=None)
    other = [r for r in rows if r["kind"] not in ("sent", "bad", "deferred", "refused", "check")]
    return {
        "library_name": s.library_name or "library", "day": day,
        "sent_count": len(by_kind.get("sent", [])), "bad_count": len(by_kind.get("bad", [])),
        "deferred_count": len(by_kind.get("deferred", [])),
        "waiting_count": len(waiting), "waiting_bad_count": len(bad_now),
        "oldest_waiting": fmt_time(oldest) if oldest else "none",
        "bad_list": _bullets([f"{r['file']}: {r['detail']}" for r in by_kind.get("bad", [])]),
        "refused_list": _bullets([f"{r['file']}: {r['detail']}" for r in by_kind.get("refused", [])]),
        "sender_stops": _bullets([f"{fmt_time(r['at'])[11:]} {r['detail']}"
                                  for r in by_kind.get("sender_stopped", [])]),
        "activity": _bullets([f"{fmt_time(r['at'])[11:]} {r['detail']}" for r in other]),
        "log_lines": _bullets([f"{fmt_time(r['at'])[11:]} {r['file'] + ': ' if r['file'] else ''}"
                               f"{r['detail']}" for r in rows[-500:]]),
    }


#: What `run` does at every tick besides checking; later parts add theirs.
GATEWAY_TASKS: list[Callable[[Gateway, float], None]] = [daily_log_task]


# Circulation data ############################################################
#
# patrons.csv and loans.csv, from the library system's export or from a
# spreadsheet. Every row is checked before anything changes: each bad row is
# reported as "FILE line N: what is wrong", all of them, and without
# --skip-bad nothing is imported. Patrons are added or updated; a patron
# absent from the file stays (a file may hold one class only). Loans are a
# snapshot of what is out now: an import replaces them all in one
# transaction, and a loan absent from it has been returned.

#: The columns of each file. Header names are matched without regard to case
#: or surrounding spaces ("Patron ID" is patron_id); other columns are ignored.
CSV_COLUMNS = MappingProxyType({
    "patrons": ("patron_id", "name", "email", "guardian_email", "group", "auto_overdue"),
    "loans": ("patron_id", "barcode", "title", "due_date"),
})
#: The columns a file must have. A patrons file without, say, an email column
#: leaves the addresses already stored as they are.
REQUIRED_COLUMNS = MappingProxyType({
    "patrons": ("patron_id", "name"),
    "loans": ("patron_id", "barcode", "title", "due_date"),
})
#: auto_overdue values, compared without regard to case; empty means no.
YES_NO = MappingProxyType({"yes": 1, "true": 1, "1": 1, "no": 0, "false": 0, "0": 0, "": 0})
ISO_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Rows go to the database in slices of this many, so a million loans never
#: sit in memory at once.
IMPORT_CHUNK = 20_000
#: sqlite's page cache while importing, in KiB (its default is 2 MB; a
#: million loans and their indexes go several times faster with more).
IMPORT_CACHE_KB = 64 * 1024
#: A progress line after this many rows, then every PROGRESS_EVERY rows.
PROGRESS_FIRST, PROGRESS_EVERY = 5_000, 100_000
#: The state key holding when the loans snapshot was imported (a timestamp).
LOANS_IMPORTED_KEY = "loans_imported_at"
#: The file names the import folder watches for (any case), in import order:
#: patrons first, so the loans of a new patron in the same drop are known.
DROPPED_FILES = (("patrons.csv", "patrons"), ("loans.csv", "loans"))


class ImportRefused(BibliogateError):
    """A CSV file was not imported, and nothing changed. ``problems`` holds a
    sentence for every bad row ('FILE line N: what is wrong'); ``fix`` says
    what to do."""

    def __init__(self, source: str, problems: list[str], fix: str):
        shown = problems[:20]
        if len(problems) > 20:
            shown.append(f"... and {len(problems) - 20} more.")
        super().__init__("\n".join(shown + [fix]))
        self.source, self.problems, self.fix = source, problems, fix


@dataclasses.dataclass
class ImportResult:
    what: str                   #: "patrons" or "loans"
    source: str                 #: the file's name, for messages
    rows: int = 0               #: data rows read (blank lines not counted)
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0            #: loans absent from the new snapshot: returned
    skipped: list = dataclasses.field(default_factory=list)  #: "FILE line N: ..." left out
    notes: list = dataclasses.field(default_factory=list)    #: e.g. ignored columns

    def summary(self) -> str:
        removed = f"{self.removed:,} removed" + (" (returned)" if self.what == "loans" else "")
        return (f"{self.source}: {self.rows - len(self.skipped):,} {self.what} imported: "
                f"{self.added:,} added, {self.updated:,} updated, {self.unchanged:,} unchanged, "
                f"{removed}, {len(self.skipped):,} skipped.")


@functools.lru_cache(maxsize=4096)       # a file holds few distinct dates
def read_date(text: str, date_format: str) -> str | None:
    """A date written in [library] date_format or as ISO yyyy-mm-dd, as ISO
    text; None if it is neither."""
    if ISO_DATE_RE.match(text):
        with contextlib.suppress(ValueError):
            return dt.date.fromisoformat(text).isoformat()
    with contextlib.suppress(ValueError):
        return dt.datetime.strptime(text, date_format).date().isoformat()
    return None


def column_name(text: str) -> str:
    return re.sub(r"[\s_]+", "_", text.strip().lower())


def sniff_delimiter(header: str) -> str:
    """',' as the contract says; ';' or tab when the header line uses that
    instead (Excel writes ';' where the decimal mark is a comma)."""
    counts = {d: header.count(d) for d in ",;\t"}
    return max(counts, key=counts.get) if any(counts.values()) else ","


def csv_records(path: Path, source: str) -> Iterator[tuple[int, list | str]]:
    """(first line number, fields) of every record, the header first; blank
    lines are left out and a record the csv module cannot read comes as
    (line, reason). UTF-8 with or without a BOM. Raises ImportRefused for a
    file that cannot be opened or is not UTF-8 text."""
    try:
        fh = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise ImportRefused(source, [f"{path} cannot be opened: {exc.strerror or exc}."],
                            "Check the file name, and that no other program has it open.") from None
    end = 0
    with fh:
        try:
            first = fh.readline()
            reader = csv.reader(itertools.chain([first], fh), delimiter=sniff_delimiter(first))
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if reader.line_num <= end:      # nothing consumed: cannot go on
                        yield end + 1, f"cannot be read as CSV ({exc})."
                        return
                    start, end = end + 1, reader.line_num
                    yield start, f"cannot be read as CSV ({exc})."
                    continue
                start, end = end + 1, reader.line_num
                if fields and (fields[0].strip() or any(field.strip() for field in fields)):
                    yield start, fields
        except UnicodeDecodeError:
            raise ImportRefused(source, [f"{source} line {end + 1}: this is not UTF-8 text."],
                                "In Excel, use Save As and choose 'CSV UTF-8 (Comma delimited)'; "
                                "nothing was imported.") from None


def header_columns(what: str, source: str, line: int, fields: list[str]) -> tuple[list, list]:
    """The position of each known column (None if absent) and notes about
    ignored ones. Raises ImportRefused for a missing or repeated column."""
    names = [column_name(f) for f in fields]
    known = CSV_COLUMNS[what]
    problems, where = [], {}
    for n, name in enumerate(names):
        if name in known and name in where:
            problems.append(f"{source} line {line}: the column {name} appears twice.")
        where.setdefault(name, n)
    missing = [c for c in REQUIRED_COLUMNS[what] if c not in where]
    if missing:
        found = ", ".join(f.strip() for f in fields if f.strip()) or "nothing"
        problems.append(f"{source} line {line}: there is no {' or '.join(missing)} column "
                        f"(the header holds {found}).")
        other = "loans" if what == "patrons" else "patrons"
        if all(c in where for c in REQUIRED_COLUMNS[other]):
            problems.append(f"{source} looks like a {other} file: use `import {other}`.")
    if problems:
        raise ImportRefused(source, problems, f"The first line must name the columns "
                            f"{', '.join(known)}, in any order; nothing was imported.")
    ignored = [f.strip() for f, name in zip(fields, names) if name not in known and f.strip()]
    notes = [f"{source}: ignored the columns {', '.join(ignored)} (not used by BiblioGate)."] \
        if ignored else []
    return [where.get(c) for c in known], notes


class PatronRows:
    """Checks patrons.csv rows; a row becomes (patron_id, name, email,
    guardian_email, grp, auto_overdue), with None for a column the file lacks."""

    stage_sql = ("CREATE TEMP TABLE incoming (patron_id TEXT, name TEXT, email TEXT, "
                 "guardian_email TEXT, grp TEXT, auto_overdue INTEGER)")

    def __init__(self, conn: sqlite3.Connection, settings: Settings):
        self.seen: dict[str, int] = {}

    def check(self, values: list, line: int) -> tuple[tuple | None, list[str]]:
        pid, name, email, guardian, group, flag = values
        problems = []
        if not pid:
            problems.append("no patron_id.")
        elif pid in self.seen:
            problems.append(f"patron_id {pid} is also on line {self.seen[pid]}.")
        else:
            self.seen[pid] = line
        name = one_line(name)       # a name on two lines is one name
        if not name:
            problems.append("no name.")
        for column, address in (("email", email), ("guardian_email", guardian)):
            if address and not valid_address(address):
                problems.append(f"{column} {address!r} is not an email address (write it as "
                                "name@example.org, or leave it empty).")
        if flag is not None:
            if flag.lower() not in YES_NO:
                problems.append(f"auto_overdue {flag!r} must be yes or no (1/0 and true/false "
                                "work too; empty is no).")
            else:
                flag = YES_NO[flag.lower()]
        return (None if problems else (pid, name, email, guardian, group, flag)), problems

    def apply(self, conn: sqlite3.Connection, result: ImportResult, now: float) -> None:
        """Add and update (inside the caller's transaction)."""
        same = ("p.patron_id IS NOT NULL AND p.name IS i.name "
                "AND p.email IS coalesce(i.email, p.email) "
                "AND p.guardian_email IS coalesce(i.guardian_email, p.guardian_email) "
                "AND p.grp IS coalesce(i.grp, p.grp) "
                "AND p.auto_overdue IS coalesce(i.auto_overdue, p.auto_overdue)")
        joined = "FROM temp.incoming i LEFT JOIN patrons p ON p.patron_id = i.patron_id"
        total, added, unchanged = conn.execute(
            f"SELECT count(*), total(p.patron_id IS NULL), total({same}) {joined}").fetchone()
        result.added, result.unchanged = int(added), int(unchanged)
        result.updated = total - result.added - result.unchanged
        conn.execute("INSERT OR REPLACE INTO patrons (patron_id, name, email, guardian_email, "
                     "grp, auto_overdue) SELECT i.patron_id, i.name, "
                     "coalesce(i.email, p.email, ''), coalesce(i.guardian_email, p.guardian_email, ''), "
                     "coalesce(i.grp, p.grp, ''), coalesce(i.auto_overdue, p.auto_overdue, 0) "
                     f"{joined} WHERE NOT ({same})")


class LoanRows:
    """Checks loans.csv rows; a row becomes (barcode, patron_id, title,
    due_date as ISO)."""

    stage_sql = "CREATE TEMP TABLE incoming (barcode TEXT, patron_id TEXT, title TEXT, due_date TEXT)"

    def __init__(self, conn: sqlite3.Connection, settings: Settings):
        self.date_format = settings.date_format
        self.example = dt.date.today().strftime(settings.date_format)
        self.patrons = {row[0] for row in conn.execute("SELECT patron_id FROM patrons")}
        self.seen: dict[str, int] = {}

    def check(self, values: list, line: int) -> tuple[tuple | None, list[str]]:
        pid, barcode, title, due = values
        due_date = read_date(due, self.date_format)
        if barcode and title and due_date and pid in self.patrons and barcode not in self.seen:
            self.seen[barcode] = line           # the usual row, checked at speed
            return (barcode, pid, title if title.isprintable() else one_line(title), due_date), []
        problems = []
        if not barcode:
            problems.append("no barcode.")
        elif barcode in self.seen:
            problems.append(f"barcode {barcode} is also on line {self.seen[barcode]}.")
        else:
            self.seen[barcode] = line
        if not pid:
            problems.append("no patron_id.")
        elif pid not in self.patrons:
            problems.append(f"patron {pid} is not in the patrons list; import patrons.csv "
                            "first, or correct the number.")
        if not title:
            problems.append("no title.")
        if not due:
            problems.append("no due_date.")
        elif due_date is None:
            problems.append(f"due_date {due!r} is not a date written like {self.example} "
                            f"([library] date_format = {self.date_format}) or 2026-03-25.")
        return None, problems

    def apply(self, conn: sqlite3.Connection, result: ImportResult, now: float) -> None:
        """Replace the snapshot (inside the caller's transaction). The loans
        are written whole and their indexes built afresh after them: several
        times faster than keeping the indexes up to date row by row, and no
        slower than writing only the changes of a usual night."""
        before = conn.execute("SELECT count(*) FROM loans").fetchone()[0]
        same = "l.patron_id = i.patron_id AND l.title = i.title AND l.due_date = i.due_date"
        total, added, unchanged = conn.execute(
            f"SELECT count(*), total(l.barcode IS NULL), total({same}) "
            "FROM temp.incoming i LEFT JOIN loans l ON l.barcode = i.barcode").fetchone()
        result.added, result.unchanged = int(added), int(unchanged)
        result.updated = total - result.added - result.unchanged
        result.removed = before - (total - result.added)
        if result.added or result.updated or result.removed:
            indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                   "AND tbl_name = 'loans' AND sql IS NOT NULL").fetchall()
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            conn.execute("DELETE FROM loans")
            conn.execute("INSERT INTO loans (barcode, patron_id, title, due_date) "
                         "SELECT barcode, patron_id, title, due_date FROM temp.incoming")
            for _, sql in indexes:
                conn.execute(sql)
        conn.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                     (LOANS_IMPORTED_KEY, json.dumps(now)))


ROW_CHECKERS = MappingProxyType({"patrons": PatronRows, "loans": LoanRows})


def import_csv(settings: Settings, what: str, path: Path, skip_bad: bool = False,
               progress: Callable[[str, int], None] | None = None,
               now: float | None = None) -> ImportResult:
    """Import a patrons or loans CSV file into the database.

    Every row is checked first; the good ones wait in a temporary table and
    are applied in one transaction. Raises ImportRefused, with nothing
    changed, for a file or header that cannot be read, or for bad rows
    unless skip_bad (then they are left out and listed in ``skipped``).
    progress(source, rows) is called now and then on long files."""
    path, now = Path(path), time.time() if now is None else now
    source = path.name
    conn = open_db(settings.database)
    conn.execute(f"PRAGMA cache_size = -{IMPORT_CACHE_KB}")
    try:
        result = ImportResult(what, source)
        checker = stage(conn, settings, what, path, result, progress)
        if result.skipped and not skip_bad:
            raise ImportRefused(source, result.skipped,
                                f"Nothing was imported. Correct these rows and import {source} "
                                "again, or add --skip-bad to import the other rows.")
        conn.execute("BEGIN IMMEDIATE")     # one transaction: all of it or nothing
        try:
            checker.apply(conn, result, now)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return result
    finally:
        conn.close()


def stage(conn: sqlite3.Connection, settings: Settings, what: str, path: Path,
          result: ImportResult, progress) -> PatronRows | LoanRows:
    """Read and check every row into temp.incoming; bad rows go to
    result.skipped. The temporary table is this connection's own, so the
    database stays free for the sender while a long file is read."""
    source = path.name
    records = csv_records(path, source)
    first = next(records, None)
    columns = ", ".join(CSV_COLUMNS[what])
    if first is None:
        raise ImportRefused(source, [f"{source} is empty."], f"It needs a first line naming "
                            f"the columns {columns}, then one line for each of the {what}.")
    line, header = first
    if isinstance(header, str):
        raise ImportRefused(source, [f"{source} line {line}: {header}"],
                            f"The first line must name the columns {columns}.")
    positions, result.notes = header_columns(what, source, line, header)
    checker = ROW_CHECKERS[what](conn, settings)
    conn.execute(checker.stage_sql)
    insert = f"INSERT INTO temp.incoming VALUES ({', '.join('?' * len(CSV_COLUMNS[what]))})"
    width, chunk = len(header), []
    for line, fields in records:
        result.rows += 1
        if isinstance(fields, str):
            row, problems = None, [fields]
        else:
            values = [(fields[p].strip() if p < len(fields) else "") if p is not None else None
                      for p in positions]
            row, problems = checker.check(values, line)
            # A row of the wrong shape: its other problems only follow from that.
            if len(fields) > width and any(f.strip() for f in fields[width:]):
                row, problems = None, [f"{len(fields)} values, but the header names {width} "
                                       "columns (a value holding a comma must be in double "
                                       "quotes)."]
            elif len(fields) < width and any("\n" in f for f in fields):
                row, problems = None, ["a value in double quotes runs on over the next lines: "
                                       "is a closing '\"' missing?"]
        if problems:
            result.skipped.append(f"{source} line {line}: {' '.join(problems)}")
        else:
            chunk.append(row)
            if len(chunk) >= IMPORT_CHUNK:
                conn.executemany(insert, chunk)
                chunk.clear()
        if progress and (result.rows == PROGRESS_FIRST or result.rows % PROGRESS_EVERY == 0):
            progress(source, result.rows)
    conn.executemany(insert, chunk)
    conn.commit()
    return checker


#: At most this many skipped rows are written to the log one by one.
LOGGED_SKIPS = 100


def record_import(journal: Journal, result: ImportResult) -> None:
    journal.event("import", result.summary())
    for note in result.notes:
        journal.event("import", note)
    for row in result.skipped[:LOGGED_SKIPS]:
        journal.event("import", f"skipped {row}", level=logging.WARNING)
    if len(result.skipped) > LOGGED_SKIPS:
        journal.event("import", f"skipped {len(result.skipped) - LOGGED_SKIPS} more rows of "
                      f"{result.source}", level=logging.WARNING)


class ImportWatch:
    """The import folder, at every tick of `run` (a GATEWAY_TASKS entry).

    A patrons.csv or loans.csv (any case) that has kept its size and time
    for STABLE_SECONDS is imported, then moved to done/NAME-STAMP.csv, or,
    if any row is bad, to failed/NAME-STAMP.csv with NAME-STAMP.txt beside it
    listing every bad row; then nothing was imported from it. Files in done/
    are deleted after [data] keep_log_days."""

    def __init__(self):
        #: file -> ((size, mtime), when first seen so) while it settles
        self.settling: dict[Path, tuple] = {}
        #: file -> (size, mtime) of a file handled but not moved away
        self.handled: dict[Path, tuple] = {}
        self.created: set[Path] = set()

    def __call__(self, gateway: Gateway, now: float) -> None:
        for path, what in self.ready(gateway.settings.import_folder, now):
            import_dropped(gateway, path, what, now)
            with contextlib.suppress(OSError):
                if path.exists():               # it could not be moved away
                    st = path.stat()
                    self.handled[path] = (st.st_size, st.st_mtime_ns)

    def ready(self, folder: Path, now: float) -> list[tuple[Path, str]]:
        """The dropped files that have stopped changing, patrons first."""
        if folder not in self.created:
            self.created.add(folder)
            with contextlib.suppress(OSError):
                folder.mkdir(parents=True, exist_ok=True)
        found = {}
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    found[entry.name.lower()] = (Path(entry.path), entry.stat())
        ready = []
        for name, what in DROPPED_FILES:
            if name not in found:
                continue
            path, st = found[name]
            signature = (st.st_size, st.st_mtime_ns)
            if self.handled.get(path) == signature:
                continue
            seen = self.settling.get(path)
            if seen is None or seen[0] != signature:
                self.settling[path] = (signature, now)
            elif now - seen[1] >= STABLE_SECONDS:
                del self.settling[path]
                ready.append((path, what))
        return ready


def import_dropped(gateway: Gateway, path: Path, what: str, now: float) -> None:
    """Import one dropped file and move it to done/ or failed/."""
    s, journal = gateway.settings, gateway.journal
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    try:
        result = import_csv(s, what, path, now=now)
    except ImportRefused as exc:
        problems = exc.problems
    except (OSError, sqlite3.Error) as exc:
        problems = [f"{path.name} could not be imported: {exc}."]
    else:
        record_import(journal, result)
        moved = move_aside(journal, path, s.import_folder / "done", stamp)
        if moved:
            journal.event("import", f"moved {path.name} to {moved}")
        prune_folder(s.import_folder / "done", s.keep_log_days, now)
        return
    moved = move_aside(journal, path, s.import_folder / "failed", stamp)
    report = moved.with_suffix(".txt") if moved else path.with_name(path.name + ".txt")
    lines = [f"{path.name}, found in {s.import_folder} at {fmt_time(now)}, was NOT imported; "
             "nothing was changed.",
             "Correct the rows below (in the library system, or in the file) and drop the "
             f"file into {s.import_folder} again.", "", *problems]
    with contextlib.suppress(OSError):
        write_atomic(report, ("\n".join(lines) + "\n").encode("utf-8"))
    journal.event("import_failed", f"{path.name} was NOT imported ({len(problems)} problem(s), "
                  f"the first: {problems[0]}); the file and the list of problems are in "
                  f"{report.parent}", level=logging.ERROR)


def move_aside(journal: Journal, path: Path, folder: Path, stamp: str) -> Path | None:
    """Move a handled file to folder as NAME-STAMP.csv; None if it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = free_name(folder, f"{path.stem}-{stamp}", path.suffix)
        os.replace(path, target)
    except OSError as exc:
        journal.event("import_failed", f"{path.name} could not be moved to {folder} "
                      f"({exc.strerror or exc}); it is not imported again until it changes",
                      level=logging.ERROR)
        return None
    return target


def prune_folder(folder: Path, keep_days: int, now: float) -> None:
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and entry.stat().st_mtime < now - keep_days * 86400:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def cmd_import(args, settings: Settings) -> int:
    journal = Journal(settings.database)
    try:
        result = import_csv(settings, args.what, Path(args.file), args.skip_bad,
                            progress=print_progress)
    except ImportRefused as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(exc.fix, file=sys.stderr)
        journal.event("import_failed", f"{exc.source} was not imported ({len(exc.problems)} "
                      f"problem(s), the first: {exc.problems[0]})", level=logging.WARNING)
        return 1
    for row in result.skipped:
        print(f"skipped {row}", file=sys.stderr)
    for note in result.notes:
        print(note, file=sys.stderr)
    record_import(journal, result)
    print(result.summary())
    return 0


def print_progress(source: str, rows: int) -> None:
    print(f"{source}: {rows:,} rows read ...", file=sys.stderr, flush=True)


# Auto-overdue ################################################################
#
# Once a day at [overdue] run_at, for the loans not yet returned whose due
# date is warning_days ahead (warning), overdue_days ago (overdue) or
# reminder_days ago (reminder): one message per patron and kind, listing all
# that patron's loans of that kind, to patrons who have an email address and
# are enabled for auto-overdue (never to a guardian). The notices ledger
# makes a run safe to repeat: a loan, kind and due date is notified once (a
# renewal has a new due date, so it is a new notice). Days missed while the
# gateway was off are caught up, and the messages name the actual due dates,
# so a caught-up notice is still true.

#: The kinds of notice, in the order they are queued.
NOTICE_KINDS = ("warning", "overdue", "reminder")
#: A day missed while the gateway was off is caught up if it is no older than this.
CATCH_UP_DAYS = 7
#: Messages are written, flushed to disk and recorded this many at a time.
LEDGER_BATCH = 200
WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
#: The placeholders of the notices, as notice_values() gives them.
NOTICE_FIELDS = frozenset({"library_name", "patron_name", "patron_id", "items", "item_count",
                           "today", "earliest_due"})
#: A run that could not go (stale loans, a full disk) is tried again after this.
HOLD_SECONDS = 5 * 60
#: State keys: the last day the daily schedule handled; the last run; why
#: the schedule is held back (shown once a day in the log and in `status`).
SCHEDULE_KEY, LAST_RUN_KEY, HELD_KEY = "overdue_schedule_day", "overdue_last_run", "overdue_held"


class StaleData(BibliogateError):
    """The loans were imported too long ago to send notices from them."""


def render_items(loans: Iterable, settings: Settings, today: dt.date) -> str:
    """A patron's items, one line each: '- Title (barcode B), due DATE' and,
    when past due, ', N days overdue'. loans: rows or dicts with title,
    barcode and due_date (ISO); dates are written in [library] date_format."""
    lines = []
    for loan in loans:
        due = dt.date.fromisoformat(loan["due_date"])
        line = (f"- {one_line(loan['title'])} (barcode {one_line(loan['barcode'])}), "
                f"due {due.strftime(settings.date_format)}")
        late = (today - due).days
        lines.append(line + (f", {late} days overdue" if late > 0 else ""))
    return "\n".join(lines)


def notice_values(settings: Settings, patron, loans: list, today: dt.date) -> dict:
    """The placeholders every notice and letter shares (NOTICE_FIELDS)."""
    dues = [loan["due_date"] for loan in loans]
    earliest = dt.date.fromisoformat(min(dues)).strftime(settings.date_format) if dues else ""
    return {"library_name": settings.library_name or "library",
            "patron_name": one_line(patron["name"]), "patron_id": one_line(patron["patron_id"]),
            "items": render_items(loans, settings, today), "item_count": len(loans),
            "today": today.strftime(settings.date_format), "earliest_due": earliest}


_NOTICE_NOTES = """\
# Lines starting with # are notes for you and are not sent.
# First line: Subject. Then one blank line. Then the body.
# Placeholders: ${library_name} ${patron_name} ${patron_id} ${item_count}
#   ${items} (one line per item, with its due date) ${today} ${earliest_due}
"""

TEMPLATE_FIELDS.update({kind: NOTICE_FIELDS for kind in NOTICE_KINDS})
DEFAULT_TEMPLATES.update({
    "warning": "# Auto-overdue: sent when items fall due in [overdue] warning_days days.\n"
               + _NOTICE_NOTES + """\
Subject: ${library_name}: library items due back on ${earliest_due}

Dear ${patron_name},

This is a friendly reminder from ${library_name}: these items on your
library account are due back soon.

${items}

Please bring them back, or ask at the library desk to renew them, by the
date shown.

Thank you,
${library_name}

(Sent automatically for library account ${patron_id}.)
""",
    "overdue": "# Auto-overdue: sent when items were due [overdue] overdue_days days ago.\n"
               + _NOTICE_NOTES + """\
Subject: ${library_name}: overdue library items

Dear ${patron_name},

Our records on ${today} show ${item_count} item(s) on your library account
as overdue:

${items}

Please bring them back to the library as soon as you can. If you have
already returned them, thank you, and please ignore this message.

${library_name}

(Sent automatically for library account ${patron_id}.)
""",
    "reminder": "# Auto-overdue: sent when items were due [overdue] reminder_days days ago.\n"
                + _NOTICE_NOTES + """\
Subject: ${library_name}: reminder, library items still overdue

Dear ${patron_name},

We wrote to you about these items, and on ${today} they are still on your
library account:

${items}

Please bring them back to the library as soon as you can, or come and talk
to us if there is a problem. If you have already returned them, thank you,
and please ignore this message.

${library_name}

(Sent automatically for library account ${patron_id}.)
""",
})


# -- settings ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OverdueSettings:
    """The [overdue] section, checked; load_settings puts it in ``settings.overdue``."""
    enabled: bool = False
    run_at: dt.time = dt.time(6, 30)
    warning_days: int = 3
    overdue_days: int = 1
    reminder_days: int = 3
    closed_weekdays: frozenset = frozenset()    #: 0 is Monday
    closed_dates: tuple = ()                    #: (first, last) pairs, both days closed
    max_data_age_hours: float = 36.0
    problems: tuple = ()                        #: the sentences about this section

    def closed(self, day: dt.date) -> bool:
        return (day.weekday() in self.closed_weekdays
                or any(first <= day <= last for first, last in self.closed_dates))

    def due_dates(self, day: dt.date) -> dict[str, dt.date]:
        """The due date each kind of notice looks for on day."""
        return {"warning": day + dt.timedelta(days=self.warning_days),
                "overdue": day - dt.timedelta(days=self.overdue_days),
                "reminder": day - dt.timedelta(days=self.reminder_days)}


def iso_date(text: str) -> dt.date | None:
    if ISO_DATE_RE.match(text):
        with contextlib.suppress(ValueError):
            return dt.date.fromisoformat(text)
    return None


def parse_closed(text: str) -> tuple[frozenset, tuple, list[str]]:
    """Weekdays (0 = Monday), (first, last) date ranges, and what could not
    be read, from 'sat, sun, 2026-04-03, 2026-12-18..2027-01-28'."""
    weekdays, ranges, bad = set(), [], []
    text = re.sub(r"\s*\.\.\s*", "..", text)
    for item in filter(None, re.split(r"[\s,;]+", text)):
        word = item.lower()
        days = [n for n, name in enumerate(WEEKDAY_NAMES) if len(word) >= 3 and name.startswith(word)]
        first, dots, last = item.partition("..")
        if days:
            weekdays.update(days)
        elif dots:
            a, b = iso_date(first), iso_date(last)
            if a is None or b is None:
                bad.append(f"{item!r} is not a range of dates such as 2026-12-18..2027-01-28")
            elif b < a:
                bad.append(f"the range {item!r} ends before it starts")
            else:
                ranges.append((a, b))
        elif iso_date(item):
            ranges.append((iso_date(item), iso_date(item)))
        else:
            bad.append(f"{item!r} is not a weekday (mon, tue, ... sun), a date (2026-12-18) "
                       "or a range of dates (2026-12-18..2027-01-28)")
    return frozenset(weekdays), tuple(ranges), bad


def check_overdue_settings(s: Settings, r: _Reader) -> None:
    """SETTINGS_CHECKS entry: read [overdue] into ``s.overdue``, and check
    that [library] date_format reads back the dates it writes."""
    before = len(r.problems)
    enabled = r.text("overdue", "enabled").lower()
    if enabled not in ("yes", "no", "true", "false", "on", "off", "1", "0", ""):
        r.problems.append(ini_problem("overdue", "enabled", enabled, "must be yes or no."))
    match = re.fullmatch(r"(\d{1,2})[:.](\d{2})", r.text("overdue", "run_at"))
    if match and int(match[1]) < 24 and int(match[2]) < 60:
        run_at = dt.time(int(match[1]), int(match[2]))
    else:
        run_at = dt.time(6, 30)
        r.problems.append(ini_problem("overdue", "run_at", r.text("overdue", "run_at"),
                                      "not a time of day. Write it as HH:MM in 24-hour time, "
                                      "such as 06:30."))
    days = {key: r.number("overdue", key, int, low, 365, f"Use a number of days from {low} to "
                          f"365, such as {DEFAULTS['overdue'][key]}.", int(DEFAULTS["overdue"][key]))
            for key, low in (("warning_days", 0), ("overdue_days", 1), ("reminder_days", 1))}
    weekdays, ranges, bad = parse_closed(r.text("overdue", "closed"))
    if bad:
        r.problems.append(ini_problem("overdue", "closed", r.text("overdue", "closed"),
                                      "; ".join(bad) + ". Separate the days with commas."))
    age = r.number("overdue", "max_data_age_hours", float, 1, 24 * 366,
                   "Use hours such as 36 (a day and a half: one missed nightly export "
                   "does not stop the notices).", 36.0)
    fmt = s.date_format
    if "%" in fmt:
        sample = dt.date(2026, 12, 25)          # a day above 12 shows day and month apart
        try:
            back = dt.datetime.strptime(sample.strftime(fmt), fmt).date()
        except ValueError:
            back = None
        if back != sample:
            r.problems.append(ini_problem("library", "date_format", fmt, "cannot read back the "
                                          f"dates it writes ({sample} becomes "
                                          f"{sample.strftime(fmt)!r}). Use %d, %m and %Y, such "
                                          "as %d/%m/%Y."))
    s.overdue = OverdueSettings(enabled in ("yes", "true", "on", "1"), run_at, days["warning_days"],
                                days["overdue_days"], days["reminder_days"], weekdays, ranges,
                                age, tuple(r.problems[before:]))


SETTINGS_CHECKS.append(check_overdue_settings)


# -- deciding --------------------------------------------------------------------

@dataclasses.dataclass
class Notice:
    """One message: a patron and all their loans of one kind."""
    kind: str
    patron: dict        #: patron_id, name, email
    loans: list         #: dicts: barcode, title, due_date (ISO)

    def file_name(self, day: dt.date) -> str:
        """The spool file's name, the same for the same day, kind, patron and
        loans: a run repeated after a crash recognises what it queued."""
        key = "\n".join([self.kind, self.patron["patron_id"],
                         *sorted(f"{loan['barcode']}\t{loan['due_date']}" for loan in self.loans)])
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        return f"{self.kind}-{day.isoformat()}-{digest}{WAITING_EXT}"


@dataclasses.dataclass
class OverdueRun:
    """What one run decided (and, unless a dry run, queued)."""
    day: dt.date
    how: str                                    #: "by hand", "scheduled", "caught up"
    notices: list = dataclasses.field(default_factory=list)
    not_enabled: set = dataclasses.field(default_factory=set)     #: patron ids
    no_email: set = dataclasses.field(default_factory=set)        #: patron ids
    too_late: int = 0           #: warnings of a caught-up day whose due date has passed

    def count(self, kind: str) -> int:
        return sum(1 for n in self.notices if n.kind == kind)

    def summary(self) -> str:
        queued = ", ".join(f"{self.count(kind)} {kind}" for kind in NOTICE_KINDS)
        items = sum(len(n.loans) for n in self.notices)
        text = (f"auto-overdue for {self.day} ({self.how}): queued {queued} "
                f"({items} item(s)); not sent: {len(self.no_email)} patron(s) without an "
                f"email address, {len(self.not_enabled)} not enabled for auto-overdue")
        if self.too_late:
            text += f", {self.too_late} warning(s) for items already past due"
        return text


CANDIDATES_SQL = """
SELECT l.patron_id, l.barcode, l.title, l.due_date, p.name, p.email, p.auto_overdue
FROM loans l LEFT JOIN patrons p ON p.patron_id = l.patron_id
WHERE l.due_date = :due AND NOT EXISTS (
    SELECT 1 FROM notices n WHERE n.barcode = l.barcode AND n.kind = :kind
    AND n.due_date = l.due_date AND n.patron_id = l.patron_id)
ORDER BY l.patron_id, l.due_date, l.title, l.barcode"""


def plan_notices(run: OverdueRun, kind: str, rows: Iterable) -> None:
    """One kind's loans, ordered by patron, into notices: one per patron
    enabled for auto-overdue with a valid email address (the patron's own:
    auto-overdue never writes to a guardian); the others are counted."""
    for patron_id, group in itertools.groupby(rows, key=lambda row: row["patron_id"]):
        loans = list(group)
        first = loans[0]
        if not first["auto_overdue"]:
            run.not_enabled.add(patron_id)
        elif not valid_address(first["email"]):
            run.no_email.add(patron_id)
        else:
            patron = {"patron_id": patron_id, "name": first["name"], "email": first["email"]}
            run.notices.append(Notice(kind, patron, [
                {"barcode": r["barcode"], "title": r["title"], "due_date": r["due_date"]}
                for r in loans]))


def plan_day(db: sqlite3.Connection, ov: OverdueSettings, day: dt.date, today: dt.date,
             how: str) -> OverdueRun:
    """The notices due on day that the ledger does not hold yet."""
    run = OverdueRun(day, how)
    for kind, due in ov.due_dates(day).items():
        rows = db.execute(CANDIDATES_SQL, {"due": due.isoformat(), "kind": kind})
        if kind == "warning" and due < today:      # caught up too late to warn
            run.too_late += len(rows.fetchall())
            continue
        plan_notices(run, kind, rows)
    return run


def days_to_run(last: str | None, now: dt.datetime, run_at: dt.time) -> list[dt.date]:
    """The days whose run is due and not done: today once run_at has passed,
    and the days missed since `last` (the last day done), at most
    CATCH_UP_DAYS back. With no last day (the first run ever, or the first
    since auto-overdue was enabled again) only today, once run_at has passed."""
    today = now.date()
    latest = today if now.time() >= run_at else today - dt.timedelta(days=1)
    if last is None:
        return [today] if latest == today else []
    first = max(dt.date.fromisoformat(last) + dt.timedelta(days=1),
                today - dt.timedelta(days=CATCH_UP_DAYS))
    return [first + dt.timedelta(days=n) for n in range((latest - first).days + 1)]


def loans_age_problem(db: sqlite3.Connection, settings: Settings, now: float) -> str | None:
    """Why the loans are too old to send notices from, or None."""
    imported = get_state(db, LOANS_IMPORTED_KEY)
    limit = settings.overdue.max_data_age_hours
    if imported is None:
        return ("no loans have been imported yet. Import loans.csv (`python bibliogate.py "
                f"import loans loans.csv`) or have the library system save it into "
                f"{settings.import_folder}.")
    hours = (now - imported) / 3600
    if hours <= limit:
        return None
    return (f"the loans were imported {hours:.0f} hours ago ({fmt_time(imported)}), more than "
            f"[overdue] max_data_age_hours = {limit:g}; notices from them could tell patrons "
            "about books they have returned, so none are sent. Import a fresh loans.csv, or "
            f"check the library system's nightly export into {settings.import_folder}; the "
            "days missed are caught up then (up to a week back).")


# -- queueing ------------------------------------------------------------------

def run_overdue(settings: Settings, journal: Journal, day: dt.date, now: float,
                dry_run: bool = False, how: str = "by hand") -> OverdueRun:
    """Queue the notices of one day.

    day picks the loans (due warning_days after it, and so on); the messages
    are written as of today, so a caught-up notice is true when it arrives.
    A dry run decides and changes nothing. Raises SettingsError for bad
    [overdue] settings, StaleData when the loans are older than
    max_data_age_hours (not for a dry run), Busy when another run is going,
    TemplateError, and SpoolError (the notices queued before it are kept)."""
    ov = settings.overdue
    if ov.problems:
        raise SettingsError(list(ov.problems))
    db, today = journal.db, local_day(now)
    problem = loans_age_problem(db, settings, now)
    if problem and not dry_run:
        raise StaleData(f"Auto-overdue did not run: {problem}")
    if dry_run:
        return plan_day(db, ov, day, today, how)
    templates = {kind: load_template(settings, kind) for kind in NOTICE_KINDS}
    lock = FileLock(settings.spool / ".bibliogate-overdue.lock")
    if not lock.acquire():
        raise Busy("Another auto-overdue run is going on right now; try again in a minute.")
    try:
        run = plan_day(db, ov, day, today, how)
        queue_notices(settings, db, run, templates, today, now)
    finally:
        lock.release()
    set_state(db, **{LAST_RUN_KEY: {"day": day.isoformat(), "at": now, "summary": run.summary()}})
    journal.event("overdue_run", run.summary())
    return run


def queue_notices(settings: Settings, db: sqlite3.Connection, run: OverdueRun,
                  templates: dict, today: dt.date, now: float) -> None:
    """Write the notices to the spool, then record their loans in the ledger,
    LEDGER_BATCH messages at a time.

    Queue first, record second. A crash in between never loses a notice: a
    loan is in the ledger only once its message is safely on disk. Nor does
    it send one twice: a file's name comes from the day, kind, patron and
    loans, so the run repeated after the crash finds the file it wrote
    (still waiting, .BAD, or in the sender's `sent` ledger) and only records
    it. (Recording first would lose the notices of a crash in between.)"""
    mtime = min(now, time.time()) - OWN_FILE_AGE     # complete: the sender may take it at once
    files, rows = [], []
    for n, notice in enumerate(run.notices, 1):
        name = notice.file_name(run.day)
        if not already_queued(settings.spool, db, name):
            values = notice_values(settings, notice.patron, notice.loans, today)
            subject, body = templates[notice.kind].render(values)
            files.append((name, compose(settings, notice.patron["email"], subject, body,
                                        notice.patron["name"], now)))
        rows += [(notice.patron["patron_id"], loan["barcode"], notice.kind, loan["due_date"],
                  now, name) for loan in notice.loans]
        if n % LEDGER_BATCH == 0 or n == len(run.notices):
            write_batch(settings.spool, files, mtime)
            record_notices(db, rows)
            files.clear()


def write_batch(folder: Path, files: list[tuple[str, bytes]], mtime: float) -> None:
    """write_atomic for many files: each is written as a hidden .part file;
    then all are flushed to disk, renamed, and the folder flushed. Flushing
    them together costs the disk far less than two flushes per file, and no
    file is ever seen half-written. On error the .part files are removed and
    SpoolError says what happened (files renamed before it stay queued)."""
    parts = [(folder / f".{name}{PART_SUFFIX}", folder / name, data) for name, data in files]
    try:
        for part, _, data in parts:
            with open(part, "wb") as fh:
                fh.write(data)
        for part, _, _ in parts:
            with open(part, "r+b") as fh:       # Windows flushes only a writable handle
                os.fsync(fh.fileno())
            os.utime(part, (mtime, mtime))
        for part, path, _ in parts:
            os.replace(part, path)
        if parts:
            fsync_folder(folder)
    except OSError as exc:
        for part, _, _ in parts:
            with contextlib.suppress(OSError):
                part.unlink()
        raise SpoolError(f"Could not write notices in {folder}: {exc.strerror or exc}. Free "
                         "some disk space or check the folder's permissions; the notices not "
                         "queued are queued at the next run.") from None


def already_queued(spool: Path, db: sqlite3.Connection, name: str) -> bool:
    stem = name[:-len(WAITING_EXT)]
    return ((spool / name).exists() or (spool / f"{stem}{BAD_EXT}").exists()
            or db.execute("SELECT 1 FROM sent WHERE file = ?", (name,)).fetchone() is not None)


def record_notices(db: sqlite3.Connection, rows: list) -> None:
    """Add rows to the notices ledger (and empty the list)."""
    with db:
        db.executemany("INSERT OR IGNORE INTO notices (patron_id, barcode, kind, due_date, "
                       "queued_at, file) VALUES (?,?,?,?,?,?)", rows)
    rows.clear()


# -- the daily schedule ----------------------------------------------------------

def overdue_task(gateway: Gateway, now: float) -> None:
    """GATEWAY_TASKS entry: the run at run_at, and the days missed while the
    gateway was off. A day is done when it ran or was closed; a run that
    cannot go (stale loans, a bad template) leaves it to be caught up later
    and says why, once a day."""
    s, journal = gateway.settings, gateway.journal
    db, ov = journal.db, s.overdue
    if not ov.enabled:
        if get_state(db, SCHEDULE_KEY) is not None:
            set_state(db, **{SCHEDULE_KEY: None})   # enabled again, it starts afresh
        return
    held = get_state(db, HELD_KEY)
    if held and now < held[3]:
        return
    moment = dt.datetime.fromtimestamp(now)
    for day in days_to_run(get_state(db, SCHEDULE_KEY), moment, ov.run_at):
        if ov.closed(day):
            journal.event("overdue_run", f"auto-overdue for {day}: no run, the library is "
                          "closed that day ([overdue] closed)")
        else:
            try:
                run_overdue(s, journal, day, now, how="scheduled" if day == moment.date()
                            else "caught up")
            except (BibliogateError, sqlite3.Error, OSError) as exc:
                hold(journal, now, exc)
                return
        set_state(db, **{SCHEDULE_KEY: day.isoformat(), HELD_KEY: None})


def hold(journal: Journal, now: float, exc: Exception) -> None:
    """Hold the schedule back for HOLD_SECONDS, and say why: in `status`, and
    in the log once a day for each kind of reason."""
    today, reason = local_day(now).isoformat(), type(exc).__name__
    held = get_state(journal.db, HELD_KEY)
    set_state(journal.db, **{HELD_KEY: [today, reason, str(exc), now + HOLD_SECONDS]})
    if not (held and held[:2] == [today, reason]):
        journal.event("overdue_refused", str(exc).replace("\n", " "), level=logging.ERROR)


GATEWAY_TASKS.extend([ImportWatch(), overdue_task])


# -- status and command line -----------------------------------------------------

def status_auto_overdue(settings: Settings, db: sqlite3.Connection) -> str:
    ov = settings.overdue
    if not ov.enabled:
        return "off ([overdue] enabled = no); `overdue` runs it by hand"
    text = f"on, every day at {ov.run_at:%H:%M}"
    held = get_state(db, HELD_KEY)
    return text + (f"; HELD BACK: {held[2]}" if held else "")


def status_last_run(settings: Settings, db: sqlite3.Connection) -> str:
    last = get_state(db, LAST_RUN_KEY)
    return f"{last['summary']} (at {fmt_time(last['at'])})" if last else "never"


def status_loans(settings: Settings, db: sqlite3.Connection) -> str:
    count = db.execute("SELECT count(*) FROM loans").fetchone()[0]
    imported = get_state(db, LOANS_IMPORTED_KEY)
    problem = loans_age_problem(db, settings, time.time())
    text = f"{count:,} loans, imported {fmt_time(imported)}" if imported else "none imported"
    return text + (f"; TOO OLD FOR AUTO-OVERDUE: {problem}" if problem and imported else "")


#: The lines `status` adds for circulation (see STATUS_EXTRA).
CIRCULATION_STATUS = MappingProxyType({"auto_overdue": status_auto_overdue,
                                       "last_overdue_run": status_last_run,
                                       "loans_data": status_loans})


def cmd_overdue(args, settings: Settings) -> int:
    journal = Journal(settings.database)
    now = time.time()
    day = args.date or local_day(now)
    if settings.overdue.closed(day):
        print(f"{day} is a closed day ([overdue] closed); running it as asked.", file=sys.stderr)
    if args.dry_run:
        problem = loans_age_problem(journal.db, settings, now)
        if problem:
            print(f"warning: a real run would not send anything: {problem}", file=sys.stderr)
    try:
        run = run_overdue(settings, journal, day, now, dry_run=args.dry_run)
    except StaleData as exc:
        journal.event("overdue_refused", str(exc), level=logging.ERROR)
        raise
    if args.dry_run:
        for notice in run.notices:
            print(f"{notice.kind} to {notice.patron['name']} <{notice.patron['email']}> "
                  f"({notice.patron['patron_id']}):")
            print(textwrap.indent(render_items(notice.loans, settings, local_day(now)), "    "))
        print("dry run, nothing queued: " + run.summary().replace("queued", "would queue", 1))
    else:
        print(run.summary())
    return 0


def iso_day(text: str) -> dt.date:
    """argparse type: a YYYY-MM-DD date."""
    day = iso_date(text.strip())
    if day is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; write it as YYYY-MM-DD.")
    return day


def add_circulation_commands(command: Callable) -> None:
    """CLI_EXTRA entry: the `import` and `overdue` commands."""
    p = command("import", cmd_import, "load patrons.csv or loans.csv into the database")
    p.add_argument("what", choices=("patrons", "loans"))
    p.add_argument("file", metavar="FILE.csv")
    p.add_argument("--skip-bad", action="store_true",
                   help="import the good rows and list the bad ones (without it, a bad row "
                        "stops the whole import)")
    p = command("overdue", cmd_overdue, "run the auto-overdue job for one day now")
    p.add_argument("--date", type=iso_day, metavar="YYYY-MM-DD", help="the day to run (default today)")
    p.add_argument("--dry-run", action="store_true", help="print who would get what; change nothing")


# Command line ################################################################

def queue_test(settings: Settings, to: str, now: float) -> Path:
    """Queue the test message (the tech note's [Test] button)."""
    if not valid_address(to):
        raise BibliogateError("There is no test address: set [gateway] test_to_address or use "
                              "--to name@school.example." if not to else
                              f"{to!r} is not an email address.")
    values = {"library_name": settings.library_name or "library", "to_address": to,
              "from_address": settings.from_address or "(not set)",
              "smtp_host": settings.smtp_host or "(not set)", "queued_at": fmt_time(now)}
    subject, body = load_template(settings, "test").render(values)
    return enqueue_bytes(settings.spool, compose(settings, to, subject, body, now=now),
                         now, priority=True, label="test")


def status_info(settings: Settings) -> dict:
    db = open_db(settings.database)
    try:
        running = run_is_active(settings.ini_path)
        g = lambda key: get_state(db, key)  # noqa: E731
        info = {
            "running": running, "pid": g("run_pid") if running else None,
            "sender": ("stopped" if settings.problems else (g("sender_state") or "not started"))
            if running else "not running",
            "reason": ("the settings need attention" if settings.problems else g("sender_reason"))
            if running else "`python bibliogate.py run` is not running",
            "problems": settings.problems,
            "waiting": len(scan(settings.spool)), "bad": len(scan(settings.spool, is_bad_name)),
            "last_check": g("last_check"), "next_check": g("next_check") if running else None,
        }
        for key, fn in STATUS_EXTRA.items():
            info[key] = fn(settings, db)
        return info
    finally:
        db.close()


#: More fields for `status` (name -> function of settings and database).
STATUS_EXTRA: dict[str, Callable] = {}
STATUS_EXTRA.update(CIRCULATION_STATUS)


def run_lock_path(ini_path: Path) -> Path:
    return Path(str(ini_path) + ".lock")


def run_is_active(ini_path: Path) -> bool:
    """True while a `run` holds the lock of this ini."""
    probe = FileLock(run_lock_path(ini_path))
    if probe.acquire():
        probe.release()
        return False
    return True


def cmd_run(args, settings: Settings) -> int:
    lock = FileLock(run_lock_path(settings.ini_path))
    if not lock.acquire():
        db = open_db(settings.database)
        pid = get_state(db, "run_pid")
        db.close()
        print(f"BiblioGate is already running for {settings.ini_path} (process {pid}); "
              "a second one would do nothing.", file=sys.stderr)
        return 1
    stop = threading.Event()
    setup_logging(settings)
    gateway = Gateway(settings.ini_path, stop=stop)

    def on_signal(signum, frame):
        log.info("stopping (signal %s): finishing the message in flight", signum)
        stop.set()
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    s = gateway.settings
    gateway.journal.event("start", f"BiblioGate {__version__} started (process {os.getpid()}), "
                          f"settings {s.ini_path}, spool {s.spool}")
    for problem in s.problems:
        log.warning("not configured yet: %s", problem)
    try:
        gateway.run_forever()
    finally:
        gateway.journal.event("stop", "BiblioGate stopped")
        lock.release()
    return 0


def cmd_send(args, settings: Settings) -> int:
    if settings.problems:
        raise SettingsError(settings.problems)
    journal = Journal(settings.database)
    result = Sender(settings, journal).check(limit=0 if args.all else None, ignore_waits=args.all)
    print(result.summary() or "nothing to send")
    return 1 if result.problem or result.skipped else 0


def cmd_enqueue(args, settings: Settings) -> int:
    data = sys.stdin.buffer.read() if args.file == "-" else read_input(args.file)
    try:
        prepare_message(data, settings.from_address or "x@localhost", "", time.time(), "check")
    except BadMessage as exc:
        print(f"{args.file}: not queued: {exc}", file=sys.stderr)
        return 1
    path = enqueue_bytes(settings.spool, data)
    Journal(settings.database).event("queued", f"queued from {args.file}", path.name)
    print(path.name)
    return 0


def read_input(name: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise BibliogateError(f"{name} cannot be read: {exc.strerror}.") from None


def cmd_test(args, settings: Settings) -> int:
    path = queue_test(settings, args.to or settings.test_to, time.time())
    Journal(settings.database).event("queued", f"queued a test message to {args.to or settings.test_to}",
                                     path.name)
    print(path.name)
    return 0


def cmd_status(args, settings: Settings) -> int:
    info = status_info(settings)
    ok = not settings.problems and info["bad"] == 0
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if ok else 1
    running = f"running (process {info['pid']})" if info["running"] else "not running"
    print(f"BiblioGate {running}; sender {info['sender']}: {info['reason']}")
    for problem in settings.problems:
        print(f"  problem: {problem}")
    print(f"waiting: {info['waiting']}, .BAD: {info['bad']}")
    print(f"last check: {fmt_time(info['last_check'])}, next check: {fmt_time(info['next_check'])}")
    for key in STATUS_EXTRA:
        print(f"{key.replace('_', ' ')}: {info[key]}")
    return 0 if ok else 1


def cmd_queue(args, settings: Settings) -> int:
    db = open_db(settings.database)
    rows = queue_rows(settings, db)
    db.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("The queue is empty.")
    for r in rows:
        print(f"{r['file']}  {r['state']}  to {r['to'] or '?'}  {r['subject']!r}"
              + (f"  attempts {r['attempts']}" if r["attempts"] else "")
              + (f"\n    reason: {r['reason']}" if r["reason"] else ""))
    return 0


def cmd_retry(args, settings: Settings) -> int:
    if not args.name and not args.all_bad:
        raise UsageError("retry needs a file NAME (as `queue` shows it) or --all-bad.")
    names = [f.name for f in scan(settings.spool, is_bad_name)] if args.all_bad else [args.name]
    journal = Journal(settings.database)
    for name in names:
        path = retry_bad(settings.spool, name)
        with journal.db:
            journal.db.execute("DELETE FROM spool_state WHERE file = ?", (path.name,))
        journal.event("retry", f"put back in the queue as {path.name}", name)
        print(path.name)
    if not names:
        print("There are no .BAD files.")
    return 0


def cmd_delete(args, settings: Settings) -> int:
    delete_file(settings.spool, args.name)
    Journal(settings.database).event("deleted", "deleted from the queue", args.name)
    print(f"deleted {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bibliogate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="the settings file (default: bibliogate.ini beside this program)")
    parser.add_argument("--version", action="version", version=f"BiblioGate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        return p

    command("run", cmd_run, "run the gateway until stopped (Ctrl+C)")
    p = command("send", cmd_send, "one check now, then exit")
    p.add_argument("--all", action="store_true", help="try every waiting message now")
    p = command("enqueue", cmd_enqueue, "queue one message file (or - for standard input)")
    p.add_argument("file", metavar="FILE")
    p = command("test", cmd_test, "queue a test message")
    p.add_argument("--to", metavar="ADDR")
    p = command("status", cmd_status, "is it running, is it sending, what waits")
    p.add_argument("--json", action="store_true")
    p = command("queue", cmd_queue, "list waiting and .BAD messages")
    p.add_argument("--json", action="store_true")
    p = command("retry", cmd_retry, "put a .BAD message back in the queue")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--all-bad", action="store_true")
    p = command("delete", cmd_delete, "remove one message from the queue")
    p.add_argument("name", metavar="NAME")
    for extend in CLI_EXTRA:
        extend(command)
    return parser


#: Functions that add commands (given `command(name, fn, help)`).
CLI_EXTRA: list[Callable] = []
CLI_EXTRA.append(add_circulation_commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ini = Path(args.config) if args.config else Path(__file__).resolve().with_name("bibliogate.ini")
    try:
        settings, created = ensure_layout(ini)
        for line in created:
            print(line, file=sys.stderr)
        if args.command != "run":
            setup_logging(settings, console=False)
        return args.fn(args, settings)
    except UsageError as exc:
        print(f"bibliogate.py {args.command}: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print("The settings need attention before this can run:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except BibliogateError as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
