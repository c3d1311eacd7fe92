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

    Constants           names, limits and the reasons for them
    Errors              BibliogateError and every leaf of it; each says what to do
    Settings            bibliogate.ini: the default text, parsing (pure), the checks on disk
    Locks               OS file locks, released by the OS when a process dies
    Database            sqlite: the schema and the named reads and writes of its tables
    Journal             every action to logs/ and to the database
    Templates           templates/*.txt: a Subject line, a blank line, a body
    Messages            composing our own messages; checking queued ones and
                        encoding them for the server (UTF-16, 8-bit, long lines)
    Spool               the queue folder: writing, the index `run` keeps of it (read
                        where the folder changed), picking, claiming a file
                        before reading it (whole, checked before it is opened), files
                        held open by other programs, BAD files
    Sender              one check: connect, log in (password or OAuth), send a batch,
                        sort out each reply, each recipient's outcome kept, records
                        flushed to disk in groups; the daily
                        cap; smtp-check's steps
    Gateway             the clock-driven loop of ``run``: checks, tasks, daily log
                        (with the days it was not running)
    Running unattended  output to logs/ without a console, never failing on a character;
                        the guard that logs crashes
    Circulation data    patrons.csv and loans.csv: checking, importing, the import folder
    Auto-overdue        the daily warning / overdue / reminder notices and their ledger
    Letters             overdue letter reports: who gets which letter, email or print
    Mailto              the "direct" email: a mailto: link for one patron
    Operations          every action on the queue and the patrons, for the command line
                        and the page alike; status
    Config page         the page ``run`` serves: settings, queue, log, patrons
    Windows task        install-task (Task Scheduler and its folder permissions;
                        systemd on Linux); `stop`, a graceful stop on Windows too
    Wiring              the templates, tasks and status fields, joined in one place
    Command line        argparse, one small function per command
"""

from __future__ import annotations

import argparse
import base64
import bisect
import configparser
import contextlib
import csv
import dataclasses
import datetime as dt
import email.errors
import email.generator
import email.header
import email.message
import email.policy
import email.quoprimime
import email.utils
import errno
import functools
import gc
import hashlib
import heapq
import itertools
import hmac
import io
import ipaddress
import json
import logging
import math
import operator
import os
import re
import secrets
import signal
import smtplib
import socket
import sqlite3
import ssl
import stat
import string
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
from http import HTTPStatus
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Container, Iterable, Iterator, Mapping

# Modules that only the config page needs (http.server, webbrowser, getpass) are
# imported where it starts or a command asks for them, so `send` and `status` stay small.
if TYPE_CHECKING:
    import http.server
    _ServerBase = http.server.ThreadingHTTPServer
    _HandlerBase = http.server.BaseHTTPRequestHandler
else:
    _ServerBase = _HandlerBase = object      # see page_classes()

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
#: A file one check has taken (claimed) is renamed ".NAME" + this while it is
#: sent: a rename Windows refuses while another program still has the file
#: open, so a message still being written is never read half-way.
CLAIM_SUFFIX = ".sending"
#: A dropped CSV file while `run` imports it: ".NAME" + this.
IMPORTING_SUFFIX = ".importing"
#: Windows' "in use" errors: ERROR_ACCESS_DENIED (5, also a file about to be
#: deleted), ERROR_SHARING_VIOLATION (32), ERROR_LOCK_VIOLATION (33). The
#: antivirus or the search indexer opening a file for a moment causes them.
IN_USE_WINERRORS = frozenset({5, 32, 33})
#: The pauses between attempts of a file operation that met "in use": about
#: 2 s in all, then that file waits for the next check.
IN_USE_PAUSES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25)
#: Larger files are refused: most mail servers refuse over 25 MB anyway.
MAX_MESSAGE_BYTES = 40 * 1024 * 1024
#: RFC 5321 4.5.3.1.6: a line of a message is at most 998 characters (and
#: CRLF); longer ones are re-encoded, or the next server rewraps or refuses them.
MAX_LINE_BYTES = 998
#: An upload is written in steps this large, so that timeout_seconds bounds
#: each step on a slow link, never the whole upload (sendall's timeout does).
SEND_STEP_BYTES = 16 * 1024
#: The socket's send buffer, so that what is still buffered when the last
#: step is written leaves within the timeout too (the system's own buffer
#: may grow to megabytes); 64 KiB still fills a link of 3 MB/s at 20 ms.
SEND_BUFFER_BYTES = 64 * 1024
#: Byte-order marks of files saved by Windows tools (Notepad, PowerShell 5.1).
UTF8_BOM, UTF16_BOMS = b"\xef\xbb\xbf", (b"\xff\xfe", b"\xfe\xff")
#: The first wait after a temporary refusal; it doubles up to the maximum.
RETRY_FIRST_SECONDS = 5 * 60
RETRY_MAX_SECONDS = 60 * 60
#: A whole check stops taking new messages after this many seconds (or the
#: check interval, if longer), so one slow server never stalls the gateway.
CHECK_CAP_SECONDS = 120
#: The daily log quotes at most this many lines of the day's log.
DAILY_LOG_LINES = 500
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
#: A date as yyyy-mm-dd, the form of every date BiblioGate stores.
ISO_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Weekday names as [overdue] closed may write them (shortened to 3+ letters).
WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

log = logging.getLogger("bibliogate")


# Errors ######################################################################

class BibliogateError(Exception):
    """The root of every error BiblioGate reports; ``str()`` is a sentence a
    librarian can act on."""


class SettingsError(BibliogateError):
    """The settings cannot be used; ``problems`` lists every sentence."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


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


class FileInUse(SpoolError):
    """Another program kept a file open for longer than BiblioGate waits
    (Windows: the library system still writing it, the antivirus, a backup)."""


class NotAFile(SpoolError):
    """A name in the spool or import folder that is not a plain file BiblioGate
    may read (a pipe, a device, a folder, a link), or one too large: set aside
    with this reason, never opened."""


class SenderProblem(BibliogateError):
    """Nothing could be sent: the SMTP server could not be used (connection,
    TLS, login) or the spool folder could not.

    ``lasting`` is true for problems that need a person (a refused login,
    a certificate that does not verify), false for ones that pass (a server
    that is down or busy)."""

    def __init__(self, message: str, lasting: bool = False):
        super().__init__(message)
        self.lasting = lasting


class SettingsRefused(SenderProblem):
    """The server's reply says the settings are wrong, not the message
    (STARTTLS required, a login needed or refused, basic authentication off):
    the check stops, and no message is charged an attempt or set aside for it.
    ``login`` is true for a refused login, which waits (see login_hold)."""

    def __init__(self, message: str, login: bool = False):
        super().__init__(message, lasting=True)
        self.login = login


class Busy(BibliogateError):
    """Another process holds a lock we need."""


class UsageError(BibliogateError):
    """The command line asks for something that cannot be done as asked."""


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


class StaleData(BibliogateError):
    """The loans were imported too long ago to send notices from them."""


class UnknownPatron(BibliogateError):
    """A patron id that is not in the patrons list."""

    def __init__(self, patron_id: str):
        super().__init__(f"There is no patron with the id {patron_id!r}; check the id, or "
                         "import the patrons file again.")
        self.patron_id = patron_id


class NoEmail(BibliogateError):
    """A patron (or guardian) without a usable email address."""

    def __init__(self, patron, problem: str):
        self.name, self.patron_id = one_line(patron["name"]), patron["patron_id"]
        super().__init__(f"{self.name} (patron {self.patron_id}) has {problem}, so no email "
                         "can be written; add it in the library system and import the patrons "
                         "again, or fix it on the config page.")


class PageRefusal(BibliogateError):
    """A request the page will not serve; ``status`` is the HTTP answer."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


# Settings ####################################################################

DEFAULT_INI = """\
; BiblioGate settings. Edit by hand (Notepad is fine) or on the config page:
; `python bibliogate.py page` opens it while `python bibliogate.py run` is running.
; A changed file is picked up at the next check; no restart is needed.
; Relative paths are relative to the folder this file is in.
; Text after " ;" on a line is a comment.

[smtp]
host =                  ; IP address or name of the local SMTP server
port = 25               ; 25, 587 (starttls) or 465 (tls)
security = none         ; none | starttls | tls
ehlo =                  ; the EHLO name to announce; empty = this computer's name
username =              ; empty = the server needs no login; oauth2: the library mailbox
password =
auth = password         ; password | oauth2 (Microsoft 365 without basic authentication;
                        ; see the README, "Microsoft 365 and Google Workspace")
oauth_tenant =          ; oauth2: the Microsoft 365 tenant, e.g. school.example or its id
oauth_client_id =       ; oauth2: the app registration's Application (client) ID
oauth_client_secret =   ; oauth2: its client secret (the Value, not the Secret ID)
oauth_token_url =       ; oauth2: empty = Microsoft's token endpoint for oauth_tenant
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
max_per_day = 0         ; recipients a day at most, the mail service's daily cap (Microsoft 365:
                        ; 10000, Google Workspace: 2000); 0 = no cap. The rest go the next day.

[overdue]
enabled = no
run_at = 06:30
warning_days = 3
overdue_days = 1
reminder_days = 3
closed =                ; days with no run: weekdays and dates, e.g. sat, sun, 2026-12-18..2027-01-28
max_data_age_hours = 36 ; refuse to send notices from loans imported longer ago than this
send_to = patron        ; patron | guardian | both | patron_else_guardian

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
csv_encoding = auto     ; auto (UTF-8, else Excel's cp1252) | utf-8 | cp1252
"""

def _defaults() -> MappingProxyType:
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    parser.read_string(DEFAULT_INI)
    return MappingProxyType({name: MappingProxyType(dict(parser.items(name, raw=True)))
                             for name in parser.sections()})


#: Every key of every section, with its default, read from DEFAULT_INI.
DEFAULTS = _defaults()

SECURITY_CHOICES = ("none", "starttls", "tls")
AUTH_CHOICES = ("password", "oauth2")
#: Who receives the auto-overdue notices ([overdue] send_to).
SEND_TO_CHOICES = ("patron", "guardian", "both", "patron_else_guardian")
#: How far the search for the next or last open day looks (a year and more).
OPEN_DAY_SEARCH = 400


@dataclasses.dataclass(frozen=True)
class OverdueSettings:
    """The [overdue] section, checked (``Settings.overdue``)."""
    enabled: bool = False
    run_at: dt.time = dt.time(6, 30)
    warning_days: int = 3
    overdue_days: int = 1
    reminder_days: int = 3
    closed_weekdays: frozenset = frozenset()    #: 0 is Monday
    closed_dates: tuple = ()                    #: (first, last) pairs, both days closed
    max_data_age_hours: float = 36.0
    send_to: str = "patron"                     #: one of SEND_TO_CHOICES
    problems: tuple = ()                        #: the sentences about this section

    def closed(self, day: dt.date) -> bool:
        return (day.weekday() in self.closed_weekdays
                or any(first <= day <= last for first, last in self.closed_dates))

    def next_open(self, day: dt.date) -> dt.date:
        """The first day after `day` the auto-overdue job runs."""
        for n in range(1, OPEN_DAY_SEARCH):
            if not self.closed(day + dt.timedelta(days=n)):
                return day + dt.timedelta(days=n)
        return day + dt.timedelta(days=1)

    def last_open(self, day: dt.date) -> dt.date:
        """The last day before `day` the auto-overdue job runs."""
        for n in range(1, OPEN_DAY_SEARCH):
            if not self.closed(day - dt.timedelta(days=n)):
                return day - dt.timedelta(days=n)
        return day - dt.timedelta(days=1)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything bibliogate.ini says, checked; built once (parse_settings)
    and never changed. ``problems`` lists what is wrong, one sentence each,
    naming the key and the fix; the sender does not run while there is one,
    but everything else does."""

    ini_path: Path
    #: (section, key) -> the text as written, for the config page.
    raw: Mapping[tuple[str, str], str] = dataclasses.field(repr=False)   #: holds the secrets too
    problems: tuple[str, ...] = ()
    smtp_host: str = ""
    smtp_port: int = 25
    security: str = "none"
    ehlo: str = ""
    username: str = ""
    password: str = dataclasses.field(default="", repr=False)     #: never in a log line
    auth: str = "password"          #: password | oauth2
    oauth_tenant: str = ""
    oauth_client_id: str = ""
    oauth_client_secret: str = dataclasses.field(default="", repr=False)
    oauth_token_url: str = ""       #: as used: Microsoft's for the tenant when the ini has none
    timeout: float = 30.0
    ca_file: str = ""
    spool: Path = Path("spool")
    from_address: str = ""
    interval: float = 180.0        #: seconds between checks
    per_check: int = 10
    test_to: str = ""
    give_up_seconds: float = 72 * 3600.0
    max_per_day: int = 0            #: recipients a (local) day; 0 = no cap
    library_name: str = ""
    date_format: str = "%Y-%m-%d"
    database: Path = Path("bibliogate.db")
    templates: Path = Path("templates")
    log_folder: Path = Path("logs")
    import_folder: Path = Path("import")
    keep_log_days: int = 60
    csv_encoding: str = "auto"
    overdue: OverdueSettings = OverdueSettings()

    @property
    def base(self) -> Path:
        return self.ini_path.parent

    def get(self, section: str, key: str) -> str:
        return self.raw.get((section, key), DEFAULTS[section][key])

    def with_problems(self, more: Iterable[str]) -> "Settings":
        """The same settings with more problems (found on disk, not in the text)."""
        more = tuple(more)
        return dataclasses.replace(self, problems=self.problems + more) if more else self


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
        elif (day := iso_date(item)) is not None:
            ranges.append((day, day))
        else:
            bad.append(f"{item!r} is not a weekday (mon, tue, ... sun), a date (2026-12-18) "
                       "or a range of dates (2026-12-18..2027-01-28)")
    if len(weekdays) == 7:
        bad.append("every weekday is closed, so notices would never go")
    return frozenset(weekdays), tuple(ranges), bad


def read_overdue(r: _Reader, date_format: str) -> OverdueSettings:
    """[overdue], checked; also checks that [library] date_format reads back
    the dates it writes (the notices write due dates with it)."""
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
    send_to = r.text("overdue", "send_to").lower() or "patron"
    if send_to not in SEND_TO_CHOICES:
        r.problems.append(ini_problem("overdue", "send_to", send_to, "must be patron, guardian, "
                                      "both or patron_else_guardian (the guardian when the "
                                      "patron has no address)."))
        send_to = "patron"
    fmt = date_format
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
    return OverdueSettings(enabled in ("yes", "true", "on", "1"), run_at, days["warning_days"],
                           days["overdue_days"], days["reminder_days"], weekdays, ranges,
                           age, send_to, tuple(r.problems[before:]))


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
        elif value and not ADDRESS_RE.fullmatch(value):
            self.problems.append(ini_problem(
                section, key, value, "not an email address. Write it as name@school.example."))
            return ""
        return value

    def path(self, base: Path, section, key) -> Path:
        value = self.text(section, key)
        path = absolute(base, value)
        if path is None:
            default = DEFAULTS[section][key]
            self.problems.append(ini_problem(section, key, value, f"not a usable path. Write a "
                                             f"name such as {default}, or a full path."))
            path = absolute(base, default) or base / default
        return path


def absolute(base: Path, value: str) -> Path | None:
    """value as an absolute path (relative to base); None if it cannot be one."""
    try:
        return (base / value).resolve()
    except (OSError, ValueError):       # a NUL byte, or a name the system refuses
        return None


def parse_ini_text(text: str, ini_path: Path) -> tuple[dict, list]:
    """(section, key) -> value, and any syntax problem as sentences."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None,
                                       strict=False)
    problems = []
    try:
        parser.read_string(text, source=str(ini_path))
    except configparser.ParsingError as exc:     # the other lines were still read
        lines = text.split("\n")     # as configparser counts them, not splitlines()
        problems += [f"{ini_path.name} line {n}: {shown_line(lines[n - 1])!r} is not 'key = value' "
                     "nor a [section]. Fix or delete that line." for n, _ in exc.errors]
    except configparser.Error as exc:
        lineno = getattr(exc, "lineno", None)
        where = f" line {lineno}" if lineno else ""
        return {}, [f"{ini_path.name}{where} cannot be read: {exc.message.splitlines()[0]} "
                    "Fix that line, or delete the file to have a fresh one written."]
    raw = {}
    for section in parser.sections():
        for key, value in parser.items(section, raw=True):
            raw[(section, key)] = value
            # A line with no name before its '=' was reported above, by number.
            if section in DEFAULTS and key and key not in DEFAULTS[section]:
                problems.append(f"bibliogate.ini [{section}] {key}: unknown setting (misspelt?); "
                                f"the known ones are {', '.join(DEFAULTS[section])}.")
    return raw, problems


#: Lines that may hold a secret are never quoted whole in a problem.
_SECRET_LINE_RE = re.compile(r"\s*(password|oauth_client_secret)\b", re.I)


def shown_line(line: str) -> str:
    """A bad ini line as a problem may quote it: the page and `status` show problems."""
    found = _SECRET_LINE_RE.match(line)
    return f"{found.group(1)} ... (hidden)" if found else line.strip()


def load_settings(ini_path: Path, text: str | None = None) -> Settings:
    """Read bibliogate.ini and parse it (or parse `text`, what it would hold:
    the config page checks a change this way before writing it). Never raises
    for a bad value: every problem is a sentence in ``Settings.problems``.
    Of the disk it checks only that [smtp] ca_file exists (layout_problems
    checks the folders)."""
    ini_path = Path(ini_path).resolve()
    try:
        text = ini_path.read_text(encoding="utf-8-sig") if text is None else text
    except FileNotFoundError:
        text = DEFAULT_INI
    except (OSError, UnicodeDecodeError) as exc:
        return parse_settings("", ini_path).with_problems(
            [f"{ini_path} cannot be read ({exc}); using the defaults."])
    settings = parse_settings(text, ini_path)
    return settings.with_problems(ca_file_problems(settings))


def parse_settings(text: str, ini_path: Path) -> Settings:
    """The settings that `text` (an ini file's content) gives, with a bad value
    replaced by its default and named in ``problems``. Pure: reads no file.
    Relative paths are taken from ini_path's folder."""
    raw, problems = parse_ini_text(text, ini_path)
    r, base = _Reader(raw, problems), ini_path.parent
    smtp_host = r.text("smtp", "host")
    if not smtp_host:
        problems.append(ini_problem("smtp", "host", "", "not set. Enter the IP address or name "
                                    "of the SMTP server this school's computers send through."))
    elif not re.match(r"^[A-Za-z0-9.:\[\]-]+$", smtp_host):
        problems.append(ini_problem("smtp", "host", smtp_host, "not a server name or IP address."))
    security = r.text("smtp", "security").lower()
    if security not in SECURITY_CHOICES:
        problems.append(ini_problem("smtp", "security", security,
                                    "must be none, starttls or tls."))
        security = "none"
    port_fix = "Use 25, 587 (starttls) or 465 (tls)."
    smtp_port = r.number("smtp", "port", int, 1, 65535, port_fix, 25)
    ehlo = r.text("smtp", "ehlo")
    if ehlo and not re.match(r"^[A-Za-z0-9.\[\]:-]+$", ehlo):
        problems.append(ini_problem("smtp", "ehlo", ehlo, "must be a host name such as "
                                    "library.school.example, without spaces."))
    username = r.text("smtp", "username")
    password = read_smtp_password(raw, problems)
    login = read_login(r, username, security)
    if login["auth"] == "password":
        problems += password_problems(smtp_host, smtp_port, security, username, password)
    timeout = r.number("smtp", "timeout_seconds", float, 1, 600,
                       "Use a number of seconds from 1 to 600, such as 30.", 30.0)
    ca_text = r.text("smtp", "ca_file")
    ca_path = absolute(base, ca_text) if ca_text else None
    if ca_text and ca_path is None:
        problems.append(ini_problem("smtp", "ca_file", ca_text, "not a usable path. Give the "
                                    "full path of the relay's PEM certificate, or leave it empty."))
    spool = r.path(base, "gateway", "spool_folder")
    from_address = r.address("gateway", "from_address", required_for=(
        "Enter the library's address, e.g. library@school.example; "
        "every message is sent from it and the daily log goes to it."))
    minutes = r.number("gateway", "minutes_between_checks", float, 0.05, 1440,
                       "Use minutes from 0.05 to 1440, such as 3 or 0.5.", 3.0)
    per_check = r.number("gateway", "messages_per_check", int, 1, 10000,
                         "Use a whole number from 1 to 10000, such as 10.", 10)
    test_to = r.address("gateway", "test_to_address")
    give_up_hours = r.number("gateway", "give_up_after_hours", float, 0.01, 24 * 60,
                             "Use hours from 0.01 to 1440, such as 72.", 72.0)
    max_per_day = r.number("gateway", "max_per_day", int, 0, 10_000_000,
                           "Use the mail service's daily cap in recipients, such as 10000 "
                           "(Microsoft 365) or 2000 (Google Workspace), or 0 for none.", 0)
    date_format = r.text("library", "date_format") or "%Y-%m-%d"
    if "%" not in date_format:
        problems.append(ini_problem("library", "date_format", date_format,
                                    "needs %d, %m and %Y codes, such as %d/%m/%Y."))
    folders = {key: r.path(base, "data", key)
               for key in ("database", "templates_folder", "log_folder", "import_folder")}
    keep_log_days = r.number("data", "keep_log_days", int, 1, 3650,
                             "Use a number of days such as 60.", 60)
    overdue = read_overdue(r, date_format)
    csv_encoding = r.text("data", "csv_encoding").lower().replace("_", "-") or "auto"
    if csv_encoding in ("utf8", "utf-8-sig"):
        csv_encoding = "utf-8"
    if csv_encoding not in CSV_ENCODINGS:
        problems.append(ini_problem("data", "csv_encoding", r.text("data", "csv_encoding"),
                                    "must be auto, utf-8 or cp1252."))
        csv_encoding = "auto"
    return Settings(
        ini_path=ini_path, raw=MappingProxyType(raw), problems=tuple(problems),
        smtp_host=smtp_host, smtp_port=smtp_port, security=security, ehlo=ehlo,
        username=username, password=password, timeout=timeout, ca_file=str(ca_path or ""),
        spool=spool,
        from_address=from_address, interval=minutes * 60.0, per_check=per_check, test_to=test_to,
        give_up_seconds=give_up_hours * 3600.0, max_per_day=max_per_day, library_name=r.text("library", "name"),
        date_format=date_format, database=folders["database"],
        templates=folders["templates_folder"], log_folder=folders["log_folder"],
        import_folder=folders["import_folder"], keep_log_days=keep_log_days, overdue=overdue,
        csv_encoding=csv_encoding, **login)


#: The OAuth 2.0 token endpoint of Microsoft 365 (Entra ID) for a tenant.
MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"


def read_login(r: _Reader, username: str, security: str) -> dict:
    """[smtp] auth and its oauth_* keys, checked, as Settings fields. The client
    secret is never quoted in a problem: the page and `status` show problems."""
    auth = r.text("smtp", "auth").lower() or "password"
    if auth not in AUTH_CHOICES:
        r.problems.append(ini_problem("smtp", "auth", auth, "must be password or oauth2 "
                                      "(Microsoft 365 without basic authentication)."))
        auth = "password"
    tenant, client_id = r.text("smtp", "oauth_tenant"), r.text("smtp", "oauth_client_id")
    secret = read_smtp_password(r.raw, r.problems, "oauth_client_secret")
    url = r.text("smtp", "oauth_token_url")
    login = dict(auth=auth, oauth_tenant=tenant, oauth_client_id=client_id,
                 oauth_client_secret=secret, oauth_token_url=url or MICROSOFT_TOKEN_URL.format(
                     tenant=urllib.parse.quote(tenant)))
    if auth == "oauth2":
        r.problems.extend(oauth_problems(username, security, tenant, client_id, secret, url))
    return login


def oauth_problems(username: str, security: str, tenant: str, client_id: str, secret: str,
                   url: str) -> list[str]:
    """What auth = oauth2 still needs, one sentence per key."""
    need = []
    if not username:
        need.append(ini_problem("smtp", "username", "", "not set. With auth = oauth2 it is the "
                                "mailbox the gateway sends as, such as library@school.example."))
    for key, value, pattern, missing, wrong in (
            ("oauth_tenant", tenant, r"[A-Za-z0-9.-]+",
             "With auth = oauth2 give the school's Microsoft 365 domain (school.example) or its "
             "tenant ID.", "not a domain nor a tenant ID. Copy the Directory (tenant) ID"),
            ("oauth_client_id", client_id, r"[A-Za-z0-9-]+",
             "Copy the Application (client) ID from the app's Overview page in Microsoft Entra.",
             "not an application ID. Copy the Application (client) ID")):
        if not value:
            need.append(ini_problem("smtp", key, "", f"not set. {missing}"))
        elif not re.fullmatch(pattern, value):
            need.append(ini_problem("smtp", key, value, f"{wrong} from the app's Overview page "
                                    "in Microsoft Entra."))
    if not secret:
        need.append(ini_problem("smtp", "oauth_client_secret", "", "not set. Create a client "
                                "secret under the app's Certificates & secrets in Microsoft Entra "
                                "and copy its Value."))
    if security == "none":
        need.append(ini_problem("smtp", "security", "none", "with auth = oauth2 the token must "
                                "not cross the network unencrypted. Use security = starttls and "
                                "port 587 (smtp.office365.com)."))
    if url and not token_url_allowed(url):
        need.append(ini_problem("smtp", "oauth_token_url", url, "must start with https://. "
                                "Leave it empty for Microsoft 365."))
    return need


def token_url_allowed(url: str) -> bool:
    """https, or plain http to this computer only (a local test endpoint)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


# -- the SMTP password ---------------------------------------------------------------
#
# The password belongs to one server: changing any of PASSWORD_BOUND_KEYS on
# the page clears it unless it is typed again in the same Save (see
# rebind_password), so nobody who can reach the page can send it to a server
# of their own. It never crosses the network in clear except to this computer.
# On Windows the page writes it encrypted with DPAPI (machine scope); a plain
# password typed into the ini by hand is read as it is.

#: Changing one of these points the stored password at another server (or
#: another account on it), so the page clears it unless typed again.
PASSWORD_BOUND_KEYS = (("smtp", "host"), ("smtp", "port"), ("smtp", "security"),
                       ("smtp", "username"))
#: A password the page encrypted with DPAPI starts with this in the ini.
DPAPI_PREFIX = "dpapi:"


def _dpapi_pair() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]] | None:
    """CryptProtectData / CryptUnprotectData (machine scope) through ctypes;
    None where there is no DPAPI (anything but Windows)."""
    if os.name != "nt":
        return None
    import ctypes
    from ctypes import wintypes

    class Blob(ctypes.Structure):
        _fields_ = [("cbData", wintypes.DWORD), ("pbData", ctypes.POINTER(ctypes.c_char))]

    windll = ctypes.windll      # type: ignore[attr-defined]  # (Windows only)
    crypt32, kernel32 = windll.crypt32, windll.kernel32
    local_machine, no_ui = 0x4, 0x1      # CRYPTPROTECT_LOCAL_MACHINE, CRYPTPROTECT_UI_FORBIDDEN

    def call(fn, data: bytes) -> bytes:
        buffer = ctypes.create_string_buffer(data, len(data))
        blob_in, blob_out = Blob(len(data), buffer), Blob()
        if not fn(ctypes.byref(blob_in), None, None, None, None, local_machine | no_ui,
                  ctypes.byref(blob_out)):
            raise OSError(ctypes.GetLastError(),  # type: ignore[attr-defined]
                          "DPAPI refused the password")
        try:
            return ctypes.string_at(blob_out.pbData, blob_out.cbData)
        finally:
            kernel32.LocalFree(blob_out.pbData)

    return (lambda data: call(crypt32.CryptProtectData, data),
            lambda data: call(crypt32.CryptUnprotectData, data))


#: (protect, unprotect) on Windows; tests put a pair of their own here.
DPAPI = _dpapi_pair()


def stored_smtp_password(password: str) -> str:
    """What the page writes to [smtp] password: DPAPI-encrypted where there is
    DPAPI, else the password itself (the ini is readable by its owner only)."""
    if not password or DPAPI is None:
        return password
    return DPAPI_PREFIX + base64.b64encode(DPAPI[0](password.encode("utf-8"))).decode("ascii")


def read_smtp_password(raw: Mapping, problems: list, key: str = "password") -> str:
    """[smtp] password (or another secret of [smtp]) as the server wants it:
    decrypted if the page encrypted it."""
    value = raw.get(("smtp", key), "").strip()
    if not value.startswith(DPAPI_PREFIX):
        return value
    import binascii
    try:
        if DPAPI is None:
            raise OSError("no DPAPI here")
        return DPAPI[1](base64.b64decode(value[len(DPAPI_PREFIX):], validate=True)).decode("utf-8")
    except (OSError, ValueError, binascii.Error, UnicodeDecodeError):
        problems.append(ini_problem("smtp", key, "(hidden)", "it was encrypted on another "
                                    "computer (or for another Windows installation) and cannot "
                                    "be read here. Type the "
                                    f"{'password' if key == 'password' else 'client secret'} "
                                    "again on the Settings page."))
        return ""


def password_problems(host: str, port: int, security: str, username: str,
                      password: str) -> list[str]:
    """A password only with a username, and never in clear over the network."""
    problems = []
    if username and not password:
        problems.append(ini_problem("smtp", "password", "", f"not set, but [smtp] username is "
                                    f"{username!r}. Type the password for {host or 'the server'}:"
                                    f"{port} (it is cleared whenever the server, port, security "
                                    "or username changes), or leave username empty if the server "
                                    "needs no login."))
    if password and security == "none" and host and not is_loopback(host):
        problems.append(ini_problem("smtp", "security", "none", f"the password would cross the "
                                    f"network to {host} in clear. Use starttls (port 587) or tls "
                                    "(port 465), or leave username and password empty if the "
                                    "server needs no login."))
    return problems


def rebind_password(raw: dict, changes: dict) -> dict:
    """`changes` ((section, key) -> value) plus an empty [smtp] password when
    they point the stored one at another server and bring no new one."""
    moved = any(key in changes for key in PASSWORD_BOUND_KEYS)
    if moved and ("smtp", "password") not in changes and raw.get(("smtp", "password"), "").strip():
        return {**changes, ("smtp", "password"): ""}
    return changes


def ensure_layout(ini_path: Path) -> tuple[Settings, list[str]]:
    """First run: write the default ini and templates; always: create the
    folders. Returns the settings, with what is wrong on disk among their
    problems, and what was created, as sentences."""
    ini_path = Path(ini_path).resolve()
    created = []
    # Two commands may start at once on a new folder: "x" and exist_ok=False
    # make sure only one of them writes each default file.
    with contextlib.suppress(FileExistsError):
        ini_path.parent.mkdir(parents=True, exist_ok=True)
        with open(ini_path, "x", encoding="utf-8") as fh:
            fh.write(DEFAULT_INI)
        created.append(f"Wrote the default settings to {ini_path}.")
    settings = load_settings(ini_path)
    problems = write_default_templates(settings, created)
    problems += make_folders(settings, created)
    problems += layout_problems(settings)
    problems += template_problems(settings)
    return settings.with_problems(problems), created


def write_default_templates(settings: Settings, created: list[str]) -> list[str]:
    """A missing template (a new kind after an upgrade, or one deleted by
    mistake) gets the default text: a gateway that stops sending over it
    would be worse. Appends what it wrote to `created`; returns problems."""
    try:
        settings.templates.mkdir(parents=True, exist_ok=True)
        for kind, text in DEFAULT_TEMPLATES.items():
            with contextlib.suppress(FileExistsError):
                with open(settings.templates / f"{kind}.txt", "x", encoding="utf-8") as fh:
                    fh.write(text)
                created.append(f"Wrote the default template {settings.templates / kind}.txt.")
    except OSError as exc:
        return [f"{settings.templates} cannot be written ({exc.strerror}). "
                "Check [data] templates_folder and its permissions."]
    return []


def make_folders(settings: Settings, created: list[str]) -> list[str]:
    """Create the spool and log folders if missing; returns problems."""
    problems = []
    for folder, (section, key) in ((settings.spool, ("gateway", "spool_folder")),
                                   (settings.log_folder, ("data", "log_folder"))):
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
                created.append(f"Created {folder}.")
            except OSError as exc:
                problems.append(ini_problem(
                    section, key, settings.get(section, key),
                    f"{folder} cannot be created ({exc.strerror or exc}). Fix the path, or give "
                    "this account the right to create it."))
    return problems


def ca_file_problems(settings: Settings) -> list[str]:
    try:
        found = not settings.ca_file or Path(settings.ca_file).is_file()
    except OSError:         # a name too long for the file system, say
        found = False
    if not found:
        return [ini_problem("smtp", "ca_file", settings.get("smtp", "ca_file"),
                            "no such file. Give the path of the relay's PEM "
                            "certificate, or leave it empty.")]
    return []


def layout_problems(settings: Settings) -> list[str]:
    """What is wrong on disk with the files and folders the settings name."""
    problems = []
    spool_value = settings.get("gateway", "spool_folder")
    if not settings.spool.is_dir():
        problems.append(ini_problem("gateway", "spool_folder", spool_value,
                                    f"{settings.spool} is not a folder. Create it or fix the path."))
    elif not folder_usable(settings.spool):
        problems.append(ini_problem("gateway", "spool_folder", spool_value,
                                    f"{settings.spool} cannot be read and written by this "
                                    "account. Give it modify rights on the folder."))
    return problems


def folder_usable(folder: Path) -> bool:
    """Whether this account may list the folder, create a file in it, rename
    and delete it: tried with a probe file, since os.access ignores Windows'
    ACLs (and a read-only disk). The probe is a hidden .part file, so a crash
    in between leaves nothing that is ever sent (remove_stale_parts)."""
    probe = folder / f".bibliogate-probe-{secrets.token_hex(4)}{PART_SUFFIX}"
    moved = probe.with_name(probe.name + ".2" + PART_SUFFIX)
    try:
        with os.scandir(folder) as entries:
            next(iter(entries), None)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        patiently(os.replace, probe, moved)         # the antivirus may look at it first
        patiently(os.unlink, moved)
    except (OSError, FileInUse):
        for path in (probe, moved):
            with contextlib.suppress(OSError):
                os.unlink(path)
        return False
    return True


# Locks #######################################################################

if sys.platform == "win32":        # (as mypy reads it: os.name == "nt")
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
        self.path = Path(path)
        self.fd: int | None = None

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
CREATE INDEX IF NOT EXISTS events_file ON events(file);
-- one row per waiting file that has failed at least once
CREATE TABLE IF NOT EXISTS spool_state (
    file TEXT PRIMARY KEY, attempts INTEGER NOT NULL DEFAULT 0,
    first_failed REAL, next_try REAL, last_error TEXT);
-- files the server accepted: a crash between the server's "250 OK" and the
-- file's removal must not send them again
CREATE TABLE IF NOT EXISTS sent (
    file TEXT NOT NULL, digest TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (file, digest));
-- each recipient of a waiting file (its name and sha256) with an outcome:
-- 'sent' (the server took the message for this address: never again),
-- 'refused' (refused for good) or 'waiting' (refused for now: tried again)
CREATE TABLE IF NOT EXISTS recipients (
    file TEXT NOT NULL, digest TEXT NOT NULL, address TEXT NOT NULL,
    state TEXT NOT NULL, reply TEXT NOT NULL DEFAULT '', at REAL NOT NULL,
    PRIMARY KEY (file, digest, address));
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);
-- recipients handed to the server each (local) day, for [gateway] max_per_day
CREATE TABLE IF NOT EXISTS sent_per_day (day TEXT PRIMARY KEY, recipients INTEGER NOT NULL);
-- one-time login links to the config page (`page`): a hash of each, never the link
CREATE TABLE IF NOT EXISTS page_logins (digest TEXT PRIMARY KEY, expires REAL NOT NULL);
-- circulation data, imported from the library system's CSV files
CREATE TABLE IF NOT EXISTS patrons (
    patron_id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL DEFAULT '',
    guardian_email TEXT NOT NULL DEFAULT '', grp TEXT NOT NULL DEFAULT '',
    auto_overdue INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS patrons_grp ON patrons(grp);
-- a value changed on the config page, kept across imports while the
-- imported value stays what it was when the edit was made
CREATE TABLE IF NOT EXISTS patron_edits (
    patron_id TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL,
    imported TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (patron_id, field));
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
    # A write-ahead log: each commit is one flush to disk instead of three,
    # still durable (synchronous = FULL), and readers never block the sender.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
        conn.executescript(SCHEMA)          # what a newer version added; no lock when nothing
    else:
        # A new database: the schema in one transaction, one flush to disk
        # instead of one per table and index (IMMEDIATE: a second process
        # making it at the same moment waits, then finds it made).
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
    upgrade_schema(conn)
    return conn


def upgrade_schema(conn: sqlite3.Connection) -> None:
    """Columns added since a database was made: patrons.first_name."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(patrons)")}
    if "first_name" not in columns:
        with contextlib.suppress(sqlite3.OperationalError):    # another process added it
            with conn:
                conn.execute("ALTER TABLE patrons ADD COLUMN first_name TEXT NOT NULL DEFAULT ''")


# -- patron edits made on the config page ----------------------------------------
# Kept across patrons.csv imports while the library system's value stays what
# it was when the edit was made; a new value there wins, and ends the edit.

#: The fields whose page edits are kept across imports.
KEPT_EDITS = ("email", "guardian_email", "auto_overdue")


def record_patron_edit(db: sqlite3.Connection, patron_id: str, field: str, old, new,
                       now: float) -> None:
    """Remember an edit (inside the caller's transaction); one back to the
    imported value is no edit at all."""
    row = db.execute("SELECT imported FROM patron_edits WHERE patron_id = ? AND field = ?",
                     (patron_id, field)).fetchone()
    imported = row[0] if row else str(old)
    if str(new) == imported:
        db.execute("DELETE FROM patron_edits WHERE patron_id = ? AND field = ?", (patron_id, field))
    else:
        db.execute("INSERT OR REPLACE INTO patron_edits(patron_id, field, value, imported, at) "
                   "VALUES (?,?,?,?,?)", (patron_id, field, str(new), imported, now))


def keep_patron_edits(db: sqlite3.Connection, staged: str) -> int:
    """Put the page's edits into the staged import rows (table `staged`,
    with the patrons columns) where the file still has the value the edit
    replaced; forget the others. Returns how many were kept."""
    kept = 0
    edits = db.execute("SELECT patron_id, field, value, imported FROM patron_edits").fetchall()
    if edits:                   # one look-up per edit: not a scan of the file each time
        db.execute(f"CREATE INDEX IF NOT EXISTS temp.staged_patron ON {staged.split('.')[-1]}"
                   "(patron_id)")
    for pid, field, value, imported in edits:
        if field not in KEPT_EDITS:     # only these are ever written; a column name in SQL
            continue
        row = db.execute(f"SELECT {field} FROM {staged} WHERE patron_id = ?", (pid,)).fetchone()
        if row is None or row[0] is None:
            continue                # not in this file, or the file has no such column
        if str(row[0]) == imported:
            db.execute(f"UPDATE {staged} SET {field} = ? WHERE patron_id = ?",
                       (int(value) if field == "auto_overdue" else value, pid))
            kept += 1
        else:
            db.execute("DELETE FROM patron_edits WHERE patron_id = ? AND field = ?", (pid, field))
    return kept


def edited_fields(db: sqlite3.Connection, patron_id: str) -> set:
    return {r[0] for r in db.execute("SELECT field FROM patron_edits WHERE patron_id = ?",
                                     (patron_id,))}


# -- durability in groups (the sender) -----------------------------------------
# With a write-ahead log, a commit under `synchronous = NORMAL` is written to
# the log file but not flushed: it survives a crash of the process (kill -9:
# the operating system still has it) but not a power cut. sqlite documents it
# ("transactions are durable across application crashes regardless of the
# synchronous setting"); tests/test_crash.py shows it with SIGKILL. The sender
# commits each delivery that way, and flushes a group of them at once.

def relax_durability(conn: sqlite3.Connection) -> None:
    """Commits from here on survive a kill -9 but wait for sync_db() to
    survive a power cut."""
    conn.execute("PRAGMA synchronous = NORMAL")


def sync_db(conn: sqlite3.Connection, relaxed: bool = False) -> None:
    """Make every commit so far survive a power cut: one commit under
    `synchronous = FULL`, whose flush of the log file carries all the
    commits before it. The connection stays FULL unless `relaxed`."""
    conn.execute("PRAGMA synchronous = FULL")
    with conn:
        conn.execute("INSERT OR REPLACE INTO state(key, value) VALUES ('synced_at', ?)",
                      (json.dumps(time.time()),))
    if relaxed:
        relax_durability(conn)


def get_state(conn: sqlite3.Connection, key: str, default=None):
    row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else default


def set_state(conn: sqlite3.Connection, **values) -> None:
    with conn:
        conn.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                         [(k, json.dumps(v)) for k, v in values.items()])


# -- retry state and the sent ledger ----------------------------------------------
# The only SQL on spool_state and sent. The writes do not commit: the caller
# holds the transaction (`with db:`), so a delivery, its retry state and its
# event can share one commit, which is one flush to disk.

def retry_states(db: sqlite3.Connection) -> dict[str, sqlite3.Row]:
    """Every file's retry state: file name -> row."""
    return {r["file"]: r for r in db.execute("SELECT * FROM spool_state")}


def retry_state(db: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return db.execute("SELECT attempts, first_failed FROM spool_state WHERE file = ?",
                      (name,)).fetchone()


def retry_waits(db: sqlite3.Connection, now: float) -> dict[str, float]:
    """The files that must not be tried before a later time: name -> next try."""
    return {r["file"]: r["next_try"] for r in
            db.execute("SELECT file, next_try FROM spool_state WHERE next_try > ?", (now,))}


def save_retry_state(db: sqlite3.Connection, name: str, attempts: int, first_failed: float,
                     next_try: float | None, last_error: str) -> None:
    db.execute("INSERT OR REPLACE INTO spool_state(file, attempts, first_failed, next_try, "
               "last_error) VALUES (?,?,?,?,?)", (name, attempts, first_failed, next_try, last_error))


def forget_retry_state(db: sqlite3.Connection, name: str) -> None:
    db.execute("DELETE FROM spool_state WHERE file = ?", (name,))


def was_delivered(db: sqlite3.Connection, name: str, digest: str) -> bool:
    return db.execute("SELECT 1 FROM sent WHERE file = ? AND digest = ?",
                      (name, digest)).fetchone() is not None


def sent_ledger(db: sqlite3.Connection) -> set[tuple[str, str]]:
    """Every (file, digest) in the sent ledger: read once per check."""
    return {(r[0], r[1]) for r in db.execute("SELECT file, digest FROM sent")}


def record_delivery(db: sqlite3.Connection, name: str, digest: str, at: float) -> None:
    """The server took the file: a ledger row, and no retry state."""
    db.execute("INSERT OR REPLACE INTO sent(file, digest, at) VALUES (?,?,?)", (name, digest, at))
    forget_retry_state(db, name)


def record_deliveries(db: sqlite3.Connection, rows: list) -> None:
    """record_delivery() for many, and their counts for the day ([file,
    digest, at, day, recipients, ...] each, as DeliveryJournal keeps them)."""
    db.executemany("INSERT OR REPLACE INTO sent(file, digest, at) VALUES (?,?,?)",
                   [row[:3] for row in rows])
    db.executemany("DELETE FROM spool_state WHERE file = ?", [row[:1] for row in rows])
    per_day: dict = {}
    for row in rows:
        per_day[row[3]] = per_day.get(row[3], 0) + row[4]
    for day, recipients in per_day.items():
        count_sent(db, day, recipients)


def forget_deliveries(db: sqlite3.Connection, removed: list[tuple[str, str]]) -> None:
    """Drop the ledger rows and recipients of (file, digest) pairs whose files are gone."""
    db.executemany("DELETE FROM sent WHERE file = ? AND digest = ?", removed)
    db.executemany("DELETE FROM recipients WHERE file = ? AND digest = ?", removed)


def forget_absent_files(db: sqlite3.Connection, present: Container) -> None:
    """Drop the retry state, ledger rows and recipients of files not in `present`."""
    for table in ("spool_state", "sent", "recipients"):
        gone = [(r["file"],) for r in db.execute(f"SELECT DISTINCT file FROM {table}")
                if r["file"] not in present]
        if gone:
            db.executemany(f"DELETE FROM {table} WHERE file = ?", gone)


def prune_sent_ledger(db: sqlite3.Connection, before: float) -> None:
    db.execute("DELETE FROM sent WHERE at < ?", (before,))


# -- the day's count, for [gateway] max_per_day ------------------------------------

def sent_on(conn: sqlite3.Connection, day: str) -> int:
    """Recipients handed to the server on a day (YYYY-MM-DD, local)."""
    row = conn.execute("SELECT recipients FROM sent_per_day WHERE day = ?", (day,)).fetchone()
    return row[0] if row else 0


def count_sent(conn: sqlite3.Connection, day: str, recipients: int) -> None:
    """Add to a day's count; the caller's transaction commits it."""
    conn.execute("INSERT INTO sent_per_day(day, recipients) VALUES (?, ?) ON CONFLICT(day) "
                 "DO UPDATE SET recipients = recipients + excluded.recipients", (day, recipients))


# -- each recipient's outcome -------------------------------------------------
# The only SQL on recipients; like the writes above, record_recipients does
# not commit.

def recipient_outcomes(conn: sqlite3.Connection, file: str, digest: str) -> dict:
    """{address in lower case: (state, reply)} of one waiting file's recipients."""
    return {r["address"].lower(): (r["state"], r["reply"]) for r in conn.execute(
        "SELECT address, state, reply FROM recipients WHERE file = ? AND digest = ?",
        (file, digest))}


def record_recipients(conn: sqlite3.Connection, file: str, digest: str, state: str,
                      replies: dict, at: float) -> None:
    """Set the outcome of these recipients ({address: reply}). It does not
    commit: the caller's `with conn:` makes it one step with what goes along."""
    conn.executemany("INSERT OR REPLACE INTO recipients(file, digest, address, state, reply, at) "
                     "VALUES (?,?,?,?,?,?)",
                     [(file, digest, a, state, reply, at) for a, reply in replies.items()])


def all_recipient_outcomes(conn: sqlite3.Connection) -> dict:
    """{(file, digest): recipient_outcomes(...)} of every file: read once per check."""
    found: dict = {}
    for r in conn.execute("SELECT file, digest, address, state, reply FROM recipients"):
        found.setdefault((r[0], r[1]), {})[r[2].lower()] = (r[3], r[4])
    return found


def recipients_by_file(conn: sqlite3.Connection) -> dict:
    """{file: {state: [address, ...]}} of every file with recorded outcomes."""
    found: dict = {}
    for r in conn.execute("SELECT file, address, state FROM recipients ORDER BY at, address"):
        found.setdefault(r["file"], {}).setdefault(r["state"], []).append(r["address"])
    return found


def forget_recipients(db: sqlite3.Connection, name: str) -> None:
    db.execute("DELETE FROM recipients WHERE file = ?", (name,))


# -- one-time login links to the config page ------------------------------------

def add_login_link(conn: sqlite3.Connection, token: str, expires: float, now: float) -> None:
    with conn:
        conn.execute("DELETE FROM page_logins WHERE expires < ?", (now,))
        conn.execute("INSERT INTO page_logins(digest, expires) VALUES (?, ?)",
                     (hashlib.sha256(token.encode()).hexdigest(), expires))


def take_login_link(conn: sqlite3.Connection, token: str, now: float) -> bool:
    """Whether `token` is a link not yet used nor out of date; it is used up."""
    with conn:
        cursor = conn.execute("DELETE FROM page_logins WHERE digest = ? AND expires >= ?",
                              (hashlib.sha256(token.encode()).hexdigest(), now))
    return cursor.rowcount == 1


# Journal #####################################################################

#: What could end or fake a line in a log: control characters and Unicode line ends.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` with its control characters written as escapes (\\n, \\x1b), so
    a newline in a patron id or a file name cannot forge a line of the log."""
    text = str(text)
    if text.isprintable():      # no control character, no line end: nothing to escape
        return text
    return _CONTROL_RE.sub(lambda m: ascii(m.group())[1:-1], text)


#: log.error("%s", text, extra=TRACEBACK): a traceback of our own keeps its
#: lines, each after the first indented, so none can pass for a record.
TRACEBACK = MappingProxyType({"keep_lines": True})


class LineFormatter(logging.Formatter):
    """One record, one line: the message's control characters escaped (a
    traceback, added after it or marked TRACEBACK, keeps its lines, indented)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if getattr(record, "keep_lines", False):
            record.message = "\n  ".join(printable(line) for line in record.message.split("\n"))
        else:
            record.message = printable(record.message)
        return super().formatMessage(record)


class DailyFileHandler(logging.Handler):
    """Writes each record to logs/bibliogate-YYYY-MM-DD.log of its own day.
    The day's file stays open (one handle per day, not one per line) and
    each line is flushed, so Notepad sees it at once and a crash keeps it;
    the file of a day that is over is closed, so nothing old stays held."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)
        self.setFormatter(LineFormatter("%(asctime)s %(levelname)-7s %(message)s",
                                        "%Y-%m-%d %H:%M:%S"))
        self._day = ""
        self._fh: io.TextIOWrapper | None = None

    def emit(self, record: logging.LogRecord) -> None:
        day = time.strftime("%Y-%m-%d", time.localtime(record.created))
        try:
            fh = self._fh
            if day != self._day or fh is None:
                self._close_file()
                fh = self._fh = open(self.folder / f"bibliogate-{day}.log", "a", encoding="utf-8")
                self._day = day
            fh.write(self.format(record) + "\n")
            fh.flush()
        except OSError:
            self._close_file()        # opened afresh for the next line
            self.handleError(record)

    def _close_file(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

    def close(self) -> None:
        self.acquire()
        try:
            self._close_file()
        finally:
            self.release()
        super().close()


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
        handler.setFormatter(LineFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
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
        row = self.event_row(kind, detail, file)
        self.log_row(row, level)
        try:
            with self.db:
                self.record([row])
        except sqlite3.Error as exc:      # the log file still has the line
            log.error("could not record this in %s: %s", self.db_path, exc)

    def event_row(self, kind: str, detail: str, file: str | None = None) -> tuple:
        """An event as its row for record(): now, its day, the text made
        printable. (The sender records its deliveries' rows in groups.)"""
        now = self.clock()
        day = dt.datetime.fromtimestamp(now).strftime("%Y-%m-%d")
        return (now, day, kind, None if file is None else printable(file), printable(detail))

    def log_row(self, row: tuple, level: int = logging.INFO) -> None:
        """An event row's line in the log."""
        file, detail = row[3], row[4]
        log.log(level, "%s%s", f"{file}: " if file else "", detail)

    def record(self, rows: list) -> None:
        """Event rows (from event_row()) into the database; the caller commits."""
        self.db.executemany("INSERT INTO events(at, day, kind, file, detail) VALUES (?,?,?,?,?)",
                            rows)

    def events(self, day: str, kinds: Iterable[str] = ()) -> list[sqlite3.Row]:
        kinds = list(kinds)
        sql = "SELECT * FROM events WHERE day = ?"
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
        return self.db.execute(sql + " ORDER BY id", (day, *kinds)).fetchall()


# Templates ###################################################################

#: The placeholders of the gateway's own messages (the notices and letters
#: have theirs in their sections; TEMPLATE_FIELDS, in Wiring, joins them).
CORE_TEMPLATE_FIELDS = MappingProxyType({
    "test": frozenset({"library_name", "to_address", "from_address", "smtp_host", "queued_at"}),
    "daily_log": frozenset({"library_name", "day", "sent_count", "bad_count", "deferred_count",
                            "waiting_count", "waiting_bad_count", "oldest_waiting", "bad_list",
                            "refused_list", "sender_stops", "activity", "log_lines",
                            "attention", "summary"}),
})

#: The default text of each of the gateway's own templates.
CORE_TEMPLATES = MappingProxyType({
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
#   ${attention}  "ACTION NEEDED: ... " when something needs you, else nothing
#   ${summary}    the day in a few plain lines: sent, not sent and why, who
#                 could not be reached, what needs you
Subject: ${attention}BiblioGate daily log for ${day}: ${sent_count} sent, ${bad_count} failed

This is the daily log of the ${library_name} email gateway for ${day}.
If one morning this message does not arrive, library email needs attention.

${summary}

The details:

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
})


@dataclasses.dataclass(frozen=True)
class MessageTemplate:
    kind: str
    path: Path
    subject: string.Template
    body: string.Template

    def fill(self, values: Mapping) -> tuple[str, str]:
        """(subject, body) with every placeholder filled; the subject is one
        line whatever the values hold, so data can never add a header. Raises
        KeyError for a placeholder `values` lacks (as Template.substitute)."""
        subject = fill_pieces(template_pieces(self.subject.template), values)
        return " ".join(subject.split()), fill_pieces(template_pieces(self.body.template), values)

    @property
    def names(self) -> frozenset:
        """The placeholders it uses."""
        return frozenset(template_pieces(self.subject.template)[1::2]
                         + template_pieces(self.body.template)[1::2])


@functools.lru_cache(maxsize=64)
def template_pieces(text: str) -> tuple[str, ...]:
    """A template's text split once into literal text and placeholder names,
    alternating (literal first, so names are at the odd places); "$$" is
    already "$". Filling is then one join: the overdue job fills thousands,
    and Template.substitute runs its regex and a callback for each. Raises
    ValueError(offset) on a bad '$' (parse_template lets none through)."""
    pieces, literal, last = [], [], 0
    for start, end, name in template_marks(text):
        literal.append(text[last:start])
        last = end
        if name:
            pieces += ["".join(literal), name]
            literal = []
        else:
            literal.append(string.Template.delimiter)
    literal.append(text[last:])
    pieces.append("".join(literal))
    return tuple(pieces)


def fill_pieces(pieces: tuple[str, ...], values: Mapping) -> str:
    """template_pieces filled: each name's value as str(), as Template.substitute does."""
    filled = list(pieces)
    for n in range(1, len(filled), 2):
        filled[n] = str(values[filled[n]])
    return "".join(filled)


def placeholders(template: string.Template) -> list[tuple[str, int]]:
    """(name, offset) of every ${name} / $name; raises ValueError(offset) on a bad '$'."""
    return [(name, start) for start, _, name in template_marks(template.template) if name]


def template_marks(text: str) -> Iterator[tuple[int, int, str]]:
    """Each '$' mark of a template's text: (start, end, the placeholder's
    name, or "" for "$$"). Raises ValueError(offset) on a bad '$'."""
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            raise ValueError(match.start("invalid"))
        yield match.start(), match.end(), match.group("named") or match.group("braced") or ""


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


#: Checked templates by (path, time, size): a page listing patrons builds a
#: link from the `direct` template for each; the file is read again only
#: when it changes.
_TEMPLATES: dict[tuple, MessageTemplate] = {}


def load_template(settings: Settings, kind: str) -> MessageTemplate:
    """The checked template of one kind, read again only when its file changes. Raises
    TemplateError (naming the file and line) when it is missing, unreadable or wrong."""
    path = settings.templates / f"{kind}.txt"
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key in _TEMPLATES:
            return _TEMPLATES[key]
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TemplateError(path, None, "missing. Start BiblioGate again (any command) to "
                            "have the default text written.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(path, None, f"cannot be read ({exc}). Save it as UTF-8 text.") from None
    template = parse_template(kind, text, path)
    if len(_TEMPLATES) > 100:
        _TEMPLATES.clear()
    _TEMPLATES[key] = template
    return template


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
    """A value fit for a header: control characters become spaces, runs of
    spaces one, none at either end."""
    text = str(value)
    # Printable text has no whitespace but " " (the others are all control
    # or separator characters): most values need no change, and no regex.
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())


def valid_address(address: str) -> bool:
    return bool(ADDRESS_RE.fullmatch(address or ""))


def ascii_address(address: str) -> str | None:
    """The address as a server without SMTPUTF8 takes it: an internationalised
    domain in its IDNA form (user@bücherei.example -> user@xn--bcherei-n2a.example).
    None when that cannot be done (a local part that is not ASCII)."""
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return None
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return f"{local}@{ascii_domain}"


def valid_recipient(address: str) -> bool:
    """A plain address, or one with an internationalised domain or local part
    (sent as IDNA, or with SMTPUTF8 where the server offers it)."""
    if valid_address(address):
        return True
    # Not ASCII, so not a plain address; no space, control or special either.
    if address.isascii() or re.search(r"[\s\x00-\x1f\x7f<>()\[\],;:\\\"]", address):
        return False
    local, _, domain = address.rpartition("@")
    ascii_domain = ascii_address("x@" + domain)
    if not local or ascii_domain is None:
        return False
    return valid_address(f"{local}{ascii_domain[1:]}" if local.isascii() else ascii_domain)


def megabytes(size: int) -> str:
    """A size for a sentence: 41.0 MB, rounded up, so that a file over a limit
    never reads as the limit itself."""
    return f"{math.ceil(size * 10 / 1048576) / 10:.1f} MB"


def header_value(text: str, name: str) -> str:
    """A header's value: plain when it is short ASCII, else RFC 2047 encoded
    and folded (email.header does both)."""
    text = one_line(text)
    if text.isascii() and len(name) + len(text) < 76:
        return text
    charset = "us-ascii" if text.isascii() else "utf-8"
    return email.header.Header(text, charset, header_name=name).encode(linesep="\r\n")


def body_part(body: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, bytes with CRLF endings) for a text body:
    7bit when it is plain ASCII in short lines, quoted-printable otherwise."""
    if "\r" in body:
        body = body.replace("\r\n", "\n").replace("\r", "\n")
    text = body.replace("\n", "\r\n")
    if text.isascii():
        data = text.encode("ascii")
        if not has_long_line(data):
            return "7bit", data
    # body_encode works on one character per byte: give it the UTF-8 bytes so.
    encoded = email.quoprimime.body_encode(text.encode("utf-8").decode("latin-1"), eol="\r\n")
    return "quoted-printable", encoded.encode("ascii")


#: A display name formataddr would quote (email.utils' specials).
NAME_SPECIALS_RE = re.compile(r'[][\\()<>@,:;".]')


def mailbox(name: str, address: str) -> str:
    """formataddr((name, address), "utf-8"): "Ann Smith <ann@example.org>", the
    name quoted or RFC 2047 encoded where it must be. A plain ASCII name (the
    common case) is written here, the rest by the email package."""
    if name and name.isascii() and address.isascii() and not NAME_SPECIALS_RE.search(name):
        return f"{name} <{address}>"
    return email.utils.formataddr((name, address), "utf-8")


class Composer:
    """Our own messages from one sender, dated one moment (now; None: the
    moment each is composed). What they all share, From, Date and the
    Message-ID's domain, is worked out once: the overdue job of a big
    district composes thousands. (Written by hand rather than with
    EmailMessage, which is five times slower.)"""

    def __init__(self, settings: Settings, now: float | None = None):
        sender = settings.from_address or "bibliogate@localhost"
        self.domain = sender.rpartition("@")[2] or "localhost"
        self.sender = mailbox(one_line(settings.library_name), sender)
        self.date = None if now is None else email.utils.formatdate(now, localtime=True)

    def message(self, to: str | list, subject: str, body: str, to_name: str = "") -> bytes:
        """A complete message, ready for the spool. The names and addresses come from data a
        patron may have typed: they pass through one_line and the email package's encoders,
        so they can never add a header. Raises BadMessage when `to` is not an email address."""
        pairs = to if isinstance(to, list) else [(to_name, to)]     #: several: [(name, address)]
        for _, address in pairs:
            if not valid_address(address):
                raise BadMessage(f"{address!r} is not an email address.")
        cte, data = body_part(body)
        recipients = ",\r\n ".join(mailbox(one_line(name), address) for name, address in pairs)
        date = self.date or email.utils.formatdate(None, localtime=True)
        head = (f"From: {self.sender}\r\n"
                f"To: {recipients}\r\n"
                f"Subject: {header_value(subject, 'Subject')}\r\n"
                f"Date: {date}\r\n"
                f"Message-ID: <{time.time_ns()}.{secrets.token_hex(6)}.bibliogate@{self.domain}>\r\n"
                "Auto-Submitted: auto-generated\r\n"
                "MIME-Version: 1.0\r\n"
                'Content-Type: text/plain; charset="utf-8"\r\n'
                f"Content-Transfer-Encoding: {cte}\r\n\r\n")
        return head.encode("ascii") + data


def compose(settings: Settings, to: str | list, subject: str, body: str, to_name: str = "",
            now: float | None = None) -> bytes:
    """One message of our own (Composer.message), dated `now` (default: now)."""
    return Composer(settings, now).message(to, subject, body, to_name)


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


#: One plain address: dot-separated atoms of letters, digits and a few signs.
_PLAIN_ADDRESS = r"[A-Za-z0-9_%+'=-]+(?:\.[A-Za-z0-9_%+'=-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_MAILBOX = rf"(?:[A-Za-z0-9'-]+(?: [A-Za-z0-9'-]+)* <{_PLAIN_ADDRESS}>|{_PLAIN_ADDRESS})"
#: An address header's value (spaces made single) of plain addresses, each
#: bare or after a name of plain words: what our notices and most programs
#: write. Its addresses are read without the email package's parser, which
#: gives the same ones (tests/test_fuzz.py) some ten times slower.
PLAIN_ADDRESSES_RE = re.compile(rf"{_PLAIN_MAILBOX}(?: ?, ?{_PLAIN_MAILBOX})*")


def header_addresses(value: str) -> list[str]:
    """The addresses in an address header's value (To, Cc, Bcc), as
    email.utils.getaddresses finds them; empty ones left out."""
    if PLAIN_ADDRESSES_RE.fullmatch(value):
        return [part.strip().rpartition("<")[2].rstrip(">") for part in value.split(",")]
    return [address for _, address in email.utils.getaddresses([value]) if address]


def _field(line: bytes) -> tuple[str, str]:
    name, _, value = line.partition(b":")
    text = value.decode("utf-8", "replace")
    return name.decode("ascii", "replace").strip().lower(), " ".join(text.split())


def decoded(value: str) -> str:
    """An RFC 2047 encoded header value as text (best effort, for lists)."""
    if "=?" not in value:       # no encoded word: decode_header gives it back as it is
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return value


def file_date(queued_at: float) -> str:
    """The Date header of a file queued at this time (its modified time)."""
    try:
        return email.utils.formatdate(queued_at, localtime=True)
    except (OverflowError, OSError, ValueError):
        # A file dated outside the calendar (or, on Windows, before 1970):
        # the time it is sent is the best date it can have.
        return email.utils.formatdate(localtime=True)


def message_text(raw: bytes) -> tuple[bytes, str]:
    """The file's bytes as a message, and the encoding its byte-order mark named ("" if
    none): Notepad's "UTF-8 with BOM" loses the BOM; UTF-16, as PowerShell 5.1's Out-File
    writes it, becomes UTF-8. Raises BadMessage when a UTF-16 file is broken."""
    if raw.startswith(UTF8_BOM):
        return raw[len(UTF8_BOM):], "UTF-8"
    encoding = "utf-16" if raw[:2] in UTF16_BOMS else \
        "utf-16-le" if raw[1:2] == raw[3:4] == b"\x00" and raw[:1] != b"\x00" else ""
    if not encoding:
        return raw, ""
    try:
        return raw.decode(encoding).encode("utf-8"), "UTF-16"
    except UnicodeDecodeError as exc:
        raise BadMessage(f"the file is in UTF-16 (as PowerShell's Out-File writes it) but broken "
                         f"at byte {exc.start}; save it again as UTF-8.") from None


def utf8_headers(fields: list[bytes]) -> list[bytes]:
    """Header lines of a file its byte-order mark says is Unicode: a UTF-16
    charset it named is now UTF-8, and a body without a Content-Type is said
    to be UTF-8 text (as the mark said)."""
    fields = [re.sub(rb"(?i)(charset=\"?)utf-16(?:[lb]e)?", rb"\1utf-8", line)
              if _field(line)[0] == "content-type" else line for line in fields]
    if not any(_field(line)[0] == "content-type" for line in fields):
        fields += [b"MIME-Version: 1.0", b'Content-Type: text/plain; charset="utf-8"',
                   b"Content-Transfer-Encoding: 8bit"]
    return fields


@functools.lru_cache(maxsize=4)
def from_field(sender_name: str, sender: str) -> bytes:
    """The From line of every message relayed (the same for a whole check)."""
    return b"From: " + email.utils.formataddr((one_line(sender_name), sender), "utf-8").encode()


def prepare_message(raw: bytes, sender: str, sender_name: str, queued_at: float,
                    file_name: str) -> Outgoing:
    """Check a queued file and make the bytes we relay: From and the envelope
    sender are ours, Bcc is taken out (its addresses stay recipients), and a
    Date, Message-ID and Auto-Submitted are added where missing. Raises
    BadMessage, with the reason, for a file that can never be sent."""
    if not raw.strip():
        raise BadMessage("the file is empty.")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"the file is {megabytes(len(raw))}; mail servers refuse messages this "
                         f"large (the limit here is {megabytes(MAX_MESSAGE_BYTES)}).")
    raw, converted = message_text(raw)
    if not raw.strip():
        raise BadMessage("the file is empty.")
    fields, body = split_headers(raw)
    if converted:
        fields = utf8_headers(fields)
    if not fields or not HEADER_LINE_RE.match(fields[0]):
        raise BadMessage("this is not an email message: it must start with header lines "
                         "such as 'To: patron@example.org', then a blank line, then the text.")
    recipients: list[str] = []
    invalid: list[str] = []
    kept: list[bytes] = []
    seen: set[str] = set()
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
            for address in header_addresses(value):
                (recipients if valid_recipient(address) else invalid).append(address)
        if name == "subject":
            subject = decoded(value)
        elif name == "message-id":
            message_id = value
        if name not in REPLACED_HEADERS:
            kept.append(line)
    unique = []
    for address in recipients:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    recipients = unique
    if not recipients:
        what = f"no valid recipient ({', '.join(invalid)} is not an address)" if invalid else \
            "no recipient: it has no To, Cc or Bcc address"
        raise BadMessage(f"{what}.")
    domain = sender.rpartition("@")[2] or "localhost"
    added = [from_field(sender_name, sender)]
    if "date" not in names:
        added.append(b"Date: " + file_date(queued_at).encode())
    if "message-id" not in names:
        digest = hashlib.sha256(raw).hexdigest()[:20]
        message_id = f"<{digest}.{re.sub(r'[^A-Za-z0-9.-]', '', file_name)[:40]}@{domain}>"
        added.append(b"Message-ID: " + message_id.encode())
    if "auto-submitted" not in names:
        added.append(b"Auto-Submitted: auto-generated")
    head = b"\r\n".join(line.replace(b"\n", b"\r\n") for line in added + kept)
    # split_headers made every CRLF an LF, so a CR left is a lone one: it ends
    # a line too. SMTP knows no other line end, and some servers take a lone
    # CR, a dot and a CRLF for the end of the message and the rest for commands.
    body = body.replace(b"\n", b"\r\n") if b"\r" not in body else re.sub(rb"[\r\n]", b"\r\n", body)
    return Outgoing(sender, recipients, head + b"\r\n\r\n" + body, invalid, subject, message_id)


#: A line longer than RFC 5321 allows, in a message with CRLF endings.
LONG_LINE_RE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE_BYTES + 1))
#: Encodings a part may already have that need no 8-bit transport.
SAFE_ENCODINGS = frozenset({"quoted-printable", "base64"})


def has_long_line(data: bytes) -> bool:
    """Whether a line (a run of bytes without CR or LF) is over 998 bytes:
    LONG_LINE_RE's answer, found by splitting (in C) instead of the regex,
    which tries up to 999 bytes at every position."""
    if len(data) <= MAX_LINE_BYTES:
        return False
    if b"\r" in data:
        data = data.replace(b"\r", b"\n")
    return max(map(len, data.split(b"\n"))) > MAX_LINE_BYTES


def needs_reencoding(body: bytes, eight_bit_ok: bool) -> bool:
    """Whether a body cannot go as it is: 8-bit bytes to a server without
    8BITMIME, or a line over 998 characters to any server."""
    return (not eight_bit_ok and not body.isascii()) or has_long_line(body)


def encoded_part(payload: bytes, text: bool) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, CRLF lines of at most 76 characters) for a
    part's content: quoted-printable for text, base64 for anything else."""
    if text:
        crlf = re.sub(rb"\r?\n", b"\r\n", payload)
        encoded = email.quoprimime.body_encode(crlf.decode("latin-1"), eol="\r\n")
        return "quoted-printable", encoded.encode("ascii")
    return "base64", base64.encodebytes(payload).replace(b"\n", b"\r\n")


def decoded_payload(part: email.message.Message) -> bytes:
    """A leaf part's content, its transfer encoding undone."""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _reencode_leaf(part: email.message.Message, eight_bit_ok: bool) -> None:
    payload = decoded_payload(part)
    raw = str(part.get_payload()).encode("utf-8", "surrogateescape")
    if not needs_reencoding(raw, eight_bit_ok):
        return
    cte, encoded = encoded_part(payload, part.get_content_maintype() == "text")
    del part["Content-Transfer-Encoding"]
    part["Content-Transfer-Encoding"] = cte
    part.set_payload(encoded.replace(b"\r\n", b"\n").decode("ascii"))


def without_field(head: bytes, name: str) -> list[bytes]:
    """The header block's lines (CRLF-split) without the field `name`."""
    lines, skipping = [], False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = _field(line)[0] == name
        if not skipping:
            lines.append(line)
    return lines


def reencoded(data: bytes, eight_bit_ok: bool) -> bytes:
    """A prepared message (CRLF endings) fit for the server: each part whose
    body has 8-bit bytes (for a server without 8BITMIME) or lines over 998
    characters is re-encoded, quoted-printable for text and base64 for the
    rest; what the reader sees is unchanged. Our header lines stay as they are."""
    head, _, body = data.partition(b"\r\n\r\n")
    if not needs_reencoding(body, eight_bit_ok):
        return data
    msg = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.compat32)
    if not msg.is_multipart():
        payload = decoded_payload(msg)
        text = msg.get_content_maintype() == "text"
        if (msg.get("Content-Transfer-Encoding") or "").strip().lower() not in SAFE_ENCODINGS:
            payload = body      # 7bit, 8bit or binary: the bytes are the content
        cte, encoded = encoded_part(payload, text)
        lines = without_field(head, "content-transfer-encoding")
        if "content-type" not in {_field(line)[0] for line in lines}:
            charset = "utf-8" if _decodes(payload, "utf-8") else "windows-1252"
            lines += [b"MIME-Version: 1.0", f'Content-Type: text/plain; charset="{charset}"'.encode()]
        lines.append(f"Content-Transfer-Encoding: {cte}".encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + encoded
    for part in msg.walk():
        if not part.is_multipart():
            _reencode_leaf(part, eight_bit_ok)
            continue
        # Text around the parts, which readers do not show, is encoded too.
        for side in ("preamble", "epilogue"):
            text = getattr(part, side)
            if text and needs_reencoding(text.encode("utf-8", "surrogateescape"), eight_bit_ok):
                raw = text.encode("utf-8", "surrogateescape")
                setattr(part, side, encoded_part(raw, True)[1].decode("ascii").replace("\r\n", "\n"))
    out = io.BytesIO()
    policy = email.policy.compat32.clone(linesep="\r\n", max_line_length=None)
    email.generator.BytesGenerator(out, mangle_from_=False, policy=policy).flatten(msg)
    new_body = out.getvalue().partition(b"\r\n\r\n")[2]
    lines = without_field(head, "content-transfer-encoding")
    return b"\r\n".join(lines + [b"Content-Transfer-Encoding: 7bit"]) + b"\r\n\r\n" + new_body


#: Header fields whose value is a list of addresses.
ADDRESS_FIELDS = frozenset({"from", "sender", "to", "cc", "reply-to"})


def ascii_field(field: bytes) -> bytes:
    """One header field without raw UTF-8, for a server without SMTPUTF8:
    text and display names RFC 2047 encoded, domains in their IDNA form. (A
    local part that is not ASCII cannot be written so; it stays as it is.)"""
    name, _, value = field.partition(b":")
    text = " ".join(value.decode("utf-8", "replace").split())
    label = name.decode("ascii", "replace").strip()
    if label.lower() in ADDRESS_FIELDS:
        pairs = email.utils.getaddresses([text])
        text = ", ".join(_ascii_mailbox(n, a, label) for n, a in pairs if a)
        return f"{label}: {text}".encode("utf-8")
    return f"{label}: {header_value(text, label)}".encode("utf-8")


def _ascii_mailbox(name: str, address: str, label: str) -> str:
    try:
        return email.utils.formataddr((name, ascii_address(address) or address), "utf-8")
    except UnicodeEncodeError:      # a UTF-8 local part: only SMTPUTF8 can carry it
        return f"{header_value(name, label)} <{address}>" if name else address


def ascii_headers(data: bytes) -> bytes:
    """A prepared message (CRLF endings) whose header lines are ASCII, each
    field with raw UTF-8 rewritten by ascii_field."""
    head, _, body = data.partition(b"\r\n\r\n")
    if head.isascii():
        return data
    fields = re.split(rb"\r\n(?![ \t])", head)
    return b"\r\n".join(f if f.isascii() else ascii_field(f) for f in fields) + b"\r\n\r\n" + body


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def peek(path: Path, limit: int = 65536) -> dict:
    """To and Subject of a queued file, for lists (never raises, never
    blocks: a pipe or a device is not opened)."""
    try:
        # Not patient: a list must not wait two seconds for each file in use.
        fields, _ = split_headers(read_regular(path, MAX_MESSAGE_BYTES, head=limit,
                                               patient=False))
    except (OSError, SpoolError):
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
        return queue_order(self.name, self.mtime)


def queue_order(name: str, mtime: float) -> tuple:
    """Test messages and the daily log first, then oldest first."""
    return (not name.upper().startswith(PRIORITY_PREFIX), mtime, name)


def is_waiting_name(name: str) -> bool:
    return name.upper().endswith(WAITING_EXT) and not name.startswith(".")


def is_bad_name(name: str) -> bool:
    return name.upper().endswith(BAD_EXT)


def spool_names(folder: Path) -> list[str]:
    """The names in the spool folder, nothing more (no file is looked at):
    what `status` counts, and what a SpoolIndex reads when the folder changed."""
    try:
        return os.listdir(folder)
    except OSError as exc:
        raise SpoolError(f"The spool folder {folder} cannot be read ({exc.strerror}). Check "
                         "[gateway] spool_folder and the folder's permissions.") from None


def count_spool(folder: Path) -> tuple[int, int]:
    """(waiting, .BAD) files, from the names alone."""
    waiting = bad = 0
    for name in spool_names(folder):
        if is_waiting_name(name):
            waiting += 1
        elif is_bad_name(name):
            bad += 1
    return waiting, bad


def look_at(folder: Path, name: str) -> tuple[float, int] | None:
    """(mtime, size) of one file, not following a link; None if it is gone."""
    try:
        st = os.lstat(os.path.join(folder, name))
    except OSError:       # removed while we looked
        return None
    return st.st_mtime, st.st_size


def folder_stamp(folder: Path) -> int | None:
    """The folder's modification time (ns), which changes when a name in it does."""
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


class SpoolIndex:
    """What is known of the spool folder's waiting and .BAD files: each one's
    time and size, the waiting ones in queue order. `run` keeps one between
    checks; the check, the pages and /health read it, so a long queue is
    read once, not once per reader. refresh() lists the names only when the
    folder changed, and looks at (stats) only the names it has not seen:
    with 100,000 files waiting, a check whose folder did not change reads
    nothing, one whose folder changed reads the names (some 0.03 s).

    A file that was changing when it was seen (its time within STABLE_SECONDS)
    is looked at again at every refresh until it is quiet, so a file still
    being written is taken once it is complete. One rewritten in place later
    is caught when the sender claims it (see Sender._take), and every
    FULL_SECONDS everything is looked at again. Thread-safe."""

    #: Everything is looked at again this often (a file rewritten in place).
    FULL_SECONDS = 300.0
    #: A folder time this close to the reading may hide a later change in the
    #: same tick of a coarse clock (FAT, some shares): such a reading is not trusted.
    RACY_SECONDS = 2.0

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.lock = threading.RLock()
        self.waiting: dict[str, float] = {}                 #: name -> mtime
        self.bad: dict[str, tuple[float, int]] = {}         #: name -> (mtime, size)
        self.claimed: set[str] = set()      #: files a check has taken (".NAME.TMP.sending")
        #: (queue_order(name, mtime), size) flattened: (not priority, mtime, name, size),
        #: sorted; an entry whose name is gone or has another time is skipped.
        self._order: list[tuple] = []
        #: False after a full reading until someone needs the whole order: a
        #: fresh `queue` wants the first page only, and 100,000 sorted cost 0.07 s.
        self._sorted = True
        self._recent: set[str] = set()      #: names that were changing when last seen
        self._stamp: int | None = None
        self._full_at = -math.inf
        self.readings = 0                   #: how many times the names were read
        self.version = 0                    #: changes whenever what it knows may have changed

    @classmethod
    def read(cls, folder: Path) -> "SpoolIndex":
        """A reading of the folder now (`queue`, `send`). Raises SpoolError."""
        index = cls(folder)
        index.refresh()
        return index

    def refresh(self) -> None:
        """Bring the index up to date with the folder. Raises SpoolError."""
        with self.lock:
            stamp = folder_stamp(self.folder)
            full = time.monotonic() - self._full_at >= self.FULL_SECONDS
            if self._recent and not full:
                self._look_again()
                self.version += 1
            if stamp is not None and stamp == self._stamp and not full:
                return
            self.readings += 1
            self.version += 1
            if full:
                self._read_all()
                self._full_at = time.monotonic()
            else:
                self._update(spool_names(self.folder))
            racy = stamp is None or time.time() - stamp / 1e9 < self.RACY_SECONDS
            self._stamp = None if racy else stamp

    def distrust(self) -> None:
        """The next refresh lists the names even if the folder's time has not
        moved: after a change of our own, which must show at once."""
        with self.lock:
            self._stamp = None

    def _read_all(self) -> None:
        """Every file looked at, in one pass of os.scandir (whose entries
        carry their times on Windows, and need no path joined on Linux)."""
        waiting: dict[str, float] = {}
        bad: dict[str, tuple[float, int]] = {}
        claimed, order = set(), []
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    name = entry.name
                    kind = (1 if is_waiting_name(name) else 2 if is_bad_name(name)
                            else 3 if is_claim_name(name) else 0)
                    if kind in (1, 2):
                        try:
                            st = entry.stat(follow_symlinks=False)    # a link is not followed
                        except OSError:       # removed while we looked
                            continue
                        if kind == 1:
                            waiting[name] = st.st_mtime
                            order.append(queue_order(name, st.st_mtime) + (st.st_size,))
                        else:
                            bad[name] = (st.st_mtime, st.st_size)
                    elif kind == 3:
                        claimed.add(name)
        except OSError as exc:
            raise SpoolError(f"The spool folder {self.folder} cannot be read ({exc.strerror}). "
                             "Check [gateway] spool_folder and the folder's permissions.") from None
        quiet = time.time() - STABLE_SECONDS - 1.0
        self.waiting, self.bad, self.claimed, self._order = waiting, bad, claimed, order
        self._sorted = False
        self._recent = {entry[2] for entry in order if entry[1] > quiet}

    def _update(self, names: list[str]) -> None:
        """Set operations (in C) find what came and went; only those are
        looked at, so a reading costs little more than the listing."""
        self._sort()
        present = set(names)
        del names
        waiting = self.waiting
        others = present - waiting.keys()       # new waiting files, .BAD ones, the rest
        # Every waiting name still there is in present and not in others: when
        # that is all of them (files only came), none went, and one pass is saved.
        gone = () if len(present) - len(others) == len(waiting) else waiting.keys() - present
        del present
        for name in gone:       # changed in place: readers only look names up
            del waiting[name]
        order = self._order
        if len(order) > 2 * len(waiting) + 64:          # compacted once half is gone
            order = [o for o in order if waiting.get(o[2]) == o[1]]
        bad, claimed, added = {}, set(), []
        for name in others:
            if is_waiting_name(name):
                st = look_at(self.folder, name)
                if st is not None:
                    added.append(queue_order(name, st[0]) + (st[1],))
            elif is_bad_name(name):
                st = self.bad.get(name) or look_at(self.folder, name)
                if st is not None:
                    bad[name] = st
            elif is_claim_name(name):
                claimed.add(name)
        if added:
            for entry in added:
                waiting[entry[2]] = entry[1]
            if len(added) > len(order) // 8:
                order = sorted(order + added)
            else:
                order = list(order)             # a reader may be walking the old one
                for entry in added:
                    bisect.insort(order, entry)
        self.waiting, self.bad, self.claimed, self._order = waiting, bad, claimed, order
        quiet = time.time() - STABLE_SECONDS - 1.0
        self._recent = {n for n in self._recent if n in waiting}
        self._recent.update(entry[2] for entry in added if entry[1] > quiet)

    def _look_again(self) -> None:
        """Files that were changing: their time and size now."""
        self._sort()
        quiet = time.time() - STABLE_SECONDS - 1.0
        waiting, order = dict(self.waiting), list(self._order)
        for name in list(self._recent):
            st = look_at(self.folder, name)
            if st is None or st[0] <= quiet:
                self._recent.discard(name)
            if st is not None and name in waiting:
                waiting[name] = st[0]
                bisect.insort(order, queue_order(name, st[0]) + (st[1],))
        self.waiting, self._order = waiting, order

    def _sort(self) -> None:
        with self.lock:
            if not self._sorted:
                self._order = sorted(self._order)
                self._sorted = True

    def in_order(self) -> Iterator[SpoolFile]:
        """The waiting files, in sending order: a snapshot, safe to walk
        while the index changes."""
        with self.lock:
            self._sort()
            order, waiting = self._order, self.waiting
        done: set = set()
        for _, mtime, name, size in order:
            if waiting.get(name) != mtime or name in done:
                continue                # gone, or seen again with a new time
            done.add(name)
            yield SpoolFile(name, self.folder / name, mtime, size)

    def head(self, limit: int) -> tuple[list[SpoolFile], list[SpoolFile], int]:
        """Every .BAD file and the first `limit` waiting files, each in queue
        order, and how many files wait in all."""
        with self.lock:
            bad = sorted((queue_order(n, st[0]), SpoolFile(n, self.folder / n, *st))
                         for n, st in self.bad.items())
            count = len(self.waiting)
            if self._sorted or limit > 1000:
                first = list(itertools.islice(self.in_order(), limit))
            else:       # just read: every entry current, the first few found without sorting all
                first = [SpoolFile(name, self.folder / name, mtime, size) for _, mtime, name, size
                         in heapq.nsmallest(limit, self._order)]
        return [f for _, f in bad], first, count

    def listing(self) -> Iterator[SpoolFile]:
        """The .BAD files, then the waiting ones in sending order, one at a time."""
        bad, _, _ = self.head(0)
        yield from bad
        yield from self.in_order()

    def __len__(self) -> int:
        """How many files wait and are .BAD."""
        return len(self.waiting) + len(self.bad)

    def __contains__(self, name: object) -> bool:
        """Whether a file of this name waits or is being sent (claimed)."""
        return (name in self.waiting
                or (isinstance(name, str) and "." + name + CLAIM_SUFFIX in self.claimed))


def scan(folder: Path, want: Callable[[str], bool] = is_waiting_name) -> list[SpoolFile]:
    """Every file of one kind in the spool folder, with its time and size, in
    no particular order: one reading, for the few who need no order (a
    SpoolIndex keeps the queue in order)."""
    folder = Path(folder)
    found = []
    for name in spool_names(folder):
        if want(name):
            st = look_at(folder, name)
            if st is not None:
                found.append(SpoolFile(name, folder / name, *st))
    return found


def pick_batch(files: Iterable[SpoolFile], limit: int, now: float,
               not_before: dict, settled: float) -> list[SpoolFile]:
    """The next files to send, from files in queue order (SpoolIndex.in_order):
    unchanged since `settled` (no foreign program still writing them), not
    waiting for a retry; test messages come first, then the oldest."""
    ready = (f for f in files if f.mtime <= settled and not_before.get(f.name, 0) <= now)
    return list(itertools.islice(ready, limit))


# -- files that other programs may hold open ---------------------------------
#
# On Windows a file another program has open cannot be renamed or deleted
# (WinError 32), and the antivirus or the indexer opens every new file for a
# moment. Every rename, delete and open of a spool or import file goes
# through patiently(): about two seconds of short pauses, then FileInUse, and
# that one file waits for the next check while the others go on.

def in_use(exc: OSError) -> bool:
    """True for Windows' "in use" and "access denied" errors, which pass."""
    return (getattr(exc, "winerror", None) in IN_USE_WINERRORS
            or (os.name == "nt" and isinstance(exc, PermissionError)))


#: How patiently() waits; tests replace it so that they never sleep.
in_use_pause: Callable[[float], None] = time.sleep


def patiently(action: Callable, *args):
    """action(*args), tried again for about 2 s while the file is in use.
    Raises FileInUse after that, or the OSError of any other failure."""
    for pause in IN_USE_PAUSES + (None,):
        try:
            return action(*args)
        except OSError as exc:
            if not in_use(exc):
                raise
            if pause is None:
                raise FileInUse(in_use_sentence(Path(args[0]).name, exc)) from None
        in_use_pause(pause)


def in_use_sentence(name: str, exc: OSError) -> str:
    if is_claim_name(name):
        name = name[1:-len(CLAIM_SUFFIX)]
    code = getattr(exc, "winerror", None)
    held = "another program has it open" if code in (32, 33) else "Windows refused access to it"
    return (f"{name} is in use: {held} (WinError {code or exc.errno}), for example the library "
            "system still writing it, the antivirus or a backup; try again in a minute.")


def read_regular(path: Path, limit: int, head: int | None = None, patient: bool = True) -> bytes:
    """The whole file (read_whole), or its first `head` bytes, checked before
    it is opened (see open_regular). Raises NotAFile, FileInUse or OSError."""
    if head is None:
        return read_whole(path, limit, patient)[0]
    with open_regular(path, limit, patient) as fh:
        return fh.read(head)


#: How a spool or import file is opened: binary, not through a link
#: (O_NOFOLLOW) and without waiting for a writer (O_NONBLOCK), where the OS has them.
READ_FLAGS = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
              | getattr(os, "O_NONBLOCK", 0))


def read_whole(path: Path, limit: int, patient: bool = True) -> tuple[bytes, os.stat_result]:
    """The whole file, checked before it is opened (see open_regular), on a
    bare file descriptor (the sender reads every message this way). The bytes
    read are checked against the size and time of the open file before and
    after reading, so a file still growing or shrinking is never taken for
    the whole. Returns the bytes and the fstat after reading (the time the
    file has now). Raises NotAFile, FileInUse or OSError."""
    fd, before = open_regular_fd(path, limit, patient)
    try:
        data = os.read(fd, before.st_size + 1)
        while 0 < len(data) <= before.st_size:      # a short read: ask until the end
            more = os.read(fd, before.st_size + 1 - len(data))
            if not more:
                break
            data += more
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (len(data) != before.st_size or after.st_size != before.st_size
            or after.st_mtime_ns != before.st_mtime_ns):
        raise FileInUse(f"{Path(path).name} changed while it was read ({before.st_size:,} bytes, "
                        f"then {after.st_size:,}): another program is still writing it; it is "
                        "taken at a later check.")
    return data, after


def open_regular(path: Path, limit: int, patient: bool = True):
    """path opened for reading in binary (see open_regular_fd). Raises
    NotAFile, FileInUse or OSError."""
    fd, _ = open_regular_fd(path, limit, patient)
    return open(fd, "rb", closefd=True)


def open_regular_fd(path: Path, limit: int, patient: bool = True) -> tuple[int, os.stat_result]:
    """A descriptor for reading path, once lstat has shown a plain file (not a
    pipe, device, folder or link) of at most `limit` bytes; opened without
    following a link (O_NOFOLLOW) and without waiting for a writer
    (O_NONBLOCK, where the OS has them), and checked again through the open
    handle, whose fstat it returns with it. Raises NotAFile, FileInUse or OSError."""
    problem = file_problem(os.lstat(path), limit)
    if problem:
        raise NotAFile(problem)
    fd = patiently(os.open, path, READ_FLAGS) if patient else os.open(path, READ_FLAGS)
    try:
        st = os.fstat(fd)
        problem = file_problem(st, limit)
    except OSError:
        os.close(fd)
        raise
    if problem:
        os.close(fd)
        raise NotAFile(problem)
    return fd, st


def file_problem(st: os.stat_result, limit: int) -> str | None:
    """Why a file of this lstat/fstat may not be read, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a link to another file, not a file of its own; links are not followed."
    if stat.S_ISDIR(st.st_mode):
        return "it is a folder, not a file."
    if not stat.S_ISREG(st.st_mode):
        return "it is not a plain file (a pipe or a device); it was not opened."
    if st.st_size > limit:
        what = "mail servers refuse larger messages" if limit == MAX_MESSAGE_BYTES else \
            "a larger file is not an export of a library system"
        return (f"the file is {st.st_size / 1048576:,.0f} MB; the limit here is "
                f"{limit // 1048576:,} MB ({what}).")
    return None


def claim_path(path: Path) -> Path:
    """Where a file waits while one check sends it."""
    return path.with_name("." + path.name + CLAIM_SUFFIX)


def is_claim_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(CLAIM_SUFFIX)


def claim(path: Path) -> Path:
    """Take a waiting file for this check: rename it to its private name,
    which Windows refuses while another program has the file open. Returns
    the claimed path; raises FileInUse, or FileNotFoundError if it is gone."""
    claimed = claim_path(path)
    if os.path.lexists(claimed):        # an earlier copy not yet put back: never overwritten
        raise FileInUse(f"{path.name}: an earlier file of this name is still being put back "
                        "in the queue; it is taken at a later check.")
    patiently(os.rename, path, claimed)
    return claimed


def release(claimed: Path, name: str) -> Path | None:
    """Put a claimed file back in the queue as `name` (or name-2, ... if a new
    file took that name meanwhile). None if it cannot be, for now: it stays
    claimed, and the next check puts it back (recover_claims)."""
    if not os.path.lexists(claimed):
        return None
    stem, ext = os.path.splitext(name)
    target = free_name(claimed.parent, stem, ext)
    try:
        patiently(os.rename, claimed, target)
    except (OSError, SpoolError) as exc:
        log.warning("%s could not be put back in the queue (%s); the next check does it",
                    name, exc)
        return None
    return target


def recover_claims(folder: Path) -> list[str]:
    """Files a check had claimed when its process ended (a kill, a power cut)
    go back in the queue under their names; called under the sender lock, so
    no live check owns them. Their sent-ledger rows still guard against a
    second delivery. Returns the names put back."""
    back = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        claimed = [Path(e.path) for e in entries if is_claim_name(e.name)]
    for path in claimed:
        restored = release(path, path.name[1:-len(CLAIM_SUFFIX)])
        if restored:
            back.append(restored.name)
    return back


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
    .part file first, flushed to disk, then renamed. The .part file is the
    owner's only (0600 on POSIX) before its first byte: it may hold the SMTP
    password or a pupil's address. On error (a full disk, a file held open
    past patience) the .part file is removed and SpoolError says what
    happened."""
    part = path.with_name("." + path.name + PART_SUFFIX)
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                     0o600)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mtime is not None:
            os.utime(part, (mtime, mtime))
        patiently(os.replace, part, path)
        fsync_folder(path.parent)
    except FileInUse as exc:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise SpoolError(f"Could not write {path.name} in {path.parent}: {exc} Nothing was "
                         "queued.") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise SpoolError(f"Could not write {path.name} in {path.parent}: {exc.strerror or exc}. "
                         "Free some disk space or check the folder's permissions; "
                         "nothing was queued.") from None


@functools.lru_cache(maxsize=1)
def _syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), where it reports a failed write back (Linux 5.8 and
    later: before that it could not say that the disk was full); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes       # only here: the rest of BiblioGate never needs it
        version = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
        if version < (5, 8):
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (ImportError, OSError, AttributeError, ValueError):
        return None
    call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    return call


def flush_together(fds: list[int]) -> None:
    """Flush a batch of files written on one file system to disk. On Linux
    one syncfs of that file system: a single flush for the whole batch
    instead of one per file. Elsewhere (Windows: FlushFileBuffers) an fsync
    of each, on the handles already open. Raises OSError when the disk says
    a write failed."""
    if not fds:
        return
    syncfs = _syncfs()
    if syncfs is None:
        for fd in fds:
            os.fsync(fd)
        return
    if syncfs(fds[0]) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_files(folder: Path, files: list[tuple[str, bytes]], mtime: float | None = None) -> None:
    """write_atomic for a batch of files: each is written as its hidden .part
    file (the owner's only, as in write_atomic), all are flushed to disk on
    the handles still open, then renamed, and the folder flushed once. Far
    cheaper for the disk than a flush (and a folder flush) per file, and no
    file is ever seen half-written. On error the .part files not yet renamed
    are removed and SpoolError says what happened (files renamed before it
    stay queued). (Plain strings and os.write: the overdue job writes
    thousands, and Path and a buffered file object cost more than the write.)"""
    base = os.fspath(folder)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    parts: list[tuple[str, str]] = []
    fds: list[int] = []
    renamed = 0
    try:
        try:
            for name, data in files:
                part = os.path.join(base, f".{name}{PART_SUFFIX}")
                fds.append(os.open(part, flags, 0o600))
                parts.append((part, os.path.join(base, name)))
                write_all(fds[-1], data)
            flush_together(fds)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for part, path in parts:
            if mtime is not None:
                os.utime(part, (mtime, mtime))
            patiently(os.replace, part, path)
            renamed += 1
        if parts:
            fsync_folder(folder)
    except (OSError, SpoolError) as exc:
        for part, _ in parts[renamed:]:
            with contextlib.suppress(OSError):
                os.unlink(part)
        why = str(exc) if isinstance(exc, SpoolError) else (
            f"{exc.strerror or exc}. Free some disk space or check the folder's permissions.")
        raise SpoolError(f"Could not write files in {folder}: {why}") from None


def write_all(fd: int, data: bytes) -> None:
    """All of data to a file descriptor (os.write may take only a part)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:        # a file takes a byte or more, or raises: never spin
            raise OSError(f"the disk took none of the last {len(view)} bytes")
        view = view[written:]


def queued_before(folder: Path, db: sqlite3.Connection, names: Iterable[str]) -> set[str]:
    """Which of these waiting-file names are already queued: waiting, .BAD,
    being sent, or sent (the sent ledger). One listing of the folder, then
    the ledger asked about the rest: a run repeated after a crash recognises
    the files it wrote (their names come from their content)."""
    try:
        listing = set(spool_names(folder))
    except SpoolError:          # unreadable: writing there fails next, with the reason
        listing = set()
    found, ask = set(), []
    for name in names:
        stem = name[:-len(WAITING_EXT)]
        if name in listing or f"{stem}{BAD_EXT}" in listing or \
                claim_path(Path(name)).name in listing:
            found.add(name)
        else:
            ask.append(name)
    for i in range(0, len(ask), 500):          #: well under sqlite's 999 parameters
        chunk = ask[i:i + 500]
        found.update(f for (f,) in db.execute(
            f"SELECT file FROM events WHERE kind = 'sent' AND file IN "
            f"({','.join('?' * len(chunk))})", chunk))
    return found


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
    """stem+ext in folder, or stem-2+ext, ... if that name is taken. A reason
    file without its .BAD is what an interrupted step left: it is overwritten."""
    candidate, n = folder / f"{stem}{ext}", 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}{ext}"
    return candidate


def reason_path(bad: Path) -> Path:
    return bad.with_name(bad.name + REASON_SUFFIX)


def mark_bad(path: Path, reason: str, now: float, name: str | None = None) -> Path:
    """Rename a waiting (or claimed) file to .BAD, its reason in a text file
    beside it; `name` is its name in the queue (path's own by default).
    The reason is written first: a crash in between leaves the message
    waiting (and a stray reason file that the next .BAD reuses). Raises
    SpoolError (FileInUse) or OSError when the rename fails."""
    name = name or path.name
    stem = name[:-len(WAITING_EXT)] if is_waiting_name(name) else name
    if len(stem) > 200:         # keep NAME.BAD-reason.txt within 255 characters
        stem = f"{stem[:190]}-{hashlib.sha256(stem.encode()).hexdigest()[:8]}"
    bad = free_name(path.parent, stem, BAD_EXT)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    write_atomic(reason_path(bad), f"{stamp} {reason}\n".encode("utf-8"))
    patiently(os.replace, path, bad)
    fsync_folder(path.parent)
    return bad


def read_reason(bad: Path) -> str | None:
    try:
        return reason_path(bad).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def resolve_in_spool(folder: Path, name: str) -> Path:
    """The spool file called name; never a path outside the spool folder. Raises SpoolError,
    a sentence for the librarian, when there is no such message, it is being sent, or it is
    not a plain file."""
    if not name or name != Path(name).name or name in (".", "..") or "/" in name or "\\" in name:
        raise SpoolError(f"{name!r} is not a file name in the spool folder; use a name as "
                         "`queue` shows it.")
    path = Path(folder) / name
    try:
        found = os.lstat(path)      # the entry itself: a link is not followed
    except (OSError, ValueError):       # none, a name too long, or a NUL in it
        found = None
    if found is None and os.path.lexists(claim_path(path)):
        raise SpoolError(f"{name} is being sent right now; look again in a minute.")
    if found is None or not (is_waiting_name(name) or is_bad_name(name)):
        raise SpoolError(f"There is no queued message called {name} in {folder}.")
    if not stat.S_ISREG(found.st_mode):
        raise SpoolError(f"{name} in {folder} is not a message file (it is a link, a pipe or a "
                         "folder); BiblioGate leaves it alone.")
    return path


def retry_bad(folder: Path, name: str) -> Path:
    """Put a .BAD file back in the queue as .TMP; returns the new path. Raises SpoolError
    when it is already waiting, was removed meanwhile, or cannot be renamed."""
    bad = resolve_in_spool(folder, name)
    if not is_bad_name(name):
        raise SpoolError(f"{name} is already waiting to be sent.")
    target = free_name(bad.parent, name[:-len(BAD_EXT)], WAITING_EXT)
    change_queued(bad, lambda: patiently(os.replace, bad, target), "was removed meanwhile",
                  "renamed")
    return target


def delete_file(folder: Path, name: str) -> None:
    """Remove one queued or .BAD file (and its reason). Raises SpoolError;
    FileInUse says in a sentence what holds the file."""
    path = resolve_in_spool(folder, name)
    change_queued(path, lambda: patiently(os.unlink, path), "was sent or removed meanwhile",
                  "deleted")


def change_queued(path: Path, change: Callable[[], object], gone: str, done: str) -> None:
    """Rename or remove a queued file (by `change`), then its reason file.
    Raises SpoolError with a sentence naming the file when it cannot be done."""
    try:
        change()
    except FileNotFoundError:
        raise SpoolError(f"{path.name} {gone}.") from None
    except OSError as exc:
        raise SpoolError(f"{path.name} cannot be {done} ({exc.strerror or exc}); check the "
                         "spool folder's permissions.") from None
    with contextlib.suppress(OSError, SpoolError):
        patiently(os.unlink, reason_path(path))


def remove_stale_parts(folder: Path, now: float) -> None:
    """A .part file a crash left behind is an unfinished write: never queued."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(PART_SUFFIX) and entry.stat().st_mtime < now - 3600:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def queue_rows(settings: Settings, db: sqlite3.Connection,
               files: Iterable[SpoolFile] | None = None) -> list[dict]:
    """The queue as the config page shows it: every file, .BAD ones first,
    or only `files` (in their order)."""
    return list(iter_queue_rows(settings, db, files))


def iter_queue_rows(settings: Settings, db: sqlite3.Connection,
                    files: Iterable[SpoolFile] | None = None) -> Iterator[dict]:
    """queue_rows() one at a time (`queue --json` writes each as it comes):
    each file is opened (peek) only when its row is made."""
    state = retry_states(db)
    outcomes = recipients_by_file(db)
    if files is None:
        files = SpoolIndex.read(settings.spool).listing()
    for f in files:
        bad = is_bad_name(f.name)
        st = state.get(f.name)
        yield {
            "file": f.name, "state": "bad" if bad else "waiting",
            "reason": read_reason(f.path) if bad else (st["last_error"] if st else None),
            "attempts": st["attempts"] if st else 0,
            "next_try": st["next_try"] if st and not bad else None,
            "queued_at": f.mtime, "size": f.size, **peek(f.path),
            # who has it, who waits (tried again), who was refused for good;
            # empty lists until a recipient of the message had a reply
            "recipients": {state: outcomes.get(f.name, {}).get(state, [])
                           for state in ("sent", "waiting", "refused")}}


# Sender ######################################################################

@dataclasses.dataclass
class CheckResult:
    sent: int = 0
    bad: int = 0
    deferred: int = 0
    problem: SenderProblem | None = None
    skipped: str = ""       #: why the check did not run at all
    held: str = ""          #: why the rest waits for another day (max_per_day)

    def summary(self) -> str:
        if self.skipped:
            return self.skipped
        text = f"{self.sent} sent, {self.bad} failed for good, {self.deferred} delayed"
        text += f"; {self.held}" if self.held else ""
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


class _Steps:
    """smtplib's send() with each write bounded by the timeout: sendall()
    with a timeout bounds the whole upload (Python 3.5+), so a large message
    on a slow but steady link was cut off at every try. MAIL and RCPT take
    the bare addresses prepare_message() found: each address is parsed once,
    not again by smtplib's quoteaddr()."""

    def mail(self, sender, options=()):
        optionlist = ""
        if options and self.does_esmtp:
            if any(x.lower() == "smtputf8" for x in options):
                if not self.has_extn("smtputf8"):
                    raise smtplib.SMTPNotSupportedError(
                        "SMTPUTF8 not supported by server")
                self.command_encoding = "utf-8"
            optionlist = " " + " ".join(options)
        self.putcmd("mail", f"from:<{sender}>{optionlist}")
        return self.getreply()

    def rcpt(self, recip, options=()):
        optionlist = " " + " ".join(options) if options and self.does_esmtp else ""
        self.putcmd("rcpt", f"to:<{recip}>{optionlist}")
        return self.getreply()

    def send(self, s):
        if isinstance(s, str) or len(s) <= SEND_STEP_BYTES:
            return super().send(s)
        view = memoryview(s)
        for start in range(0, len(view), SEND_STEP_BYTES):
            super().send(view[start:start + SEND_STEP_BYTES])


class StepSMTP(_Steps, smtplib.SMTP):
    pass


class StepSMTP_SSL(_Steps, smtplib.SMTP_SSL):
    pass


def connect(settings: Settings, tokens: "TokenCache | None" = None,
            clock: Callable[[], float] = time.time) -> smtplib.SMTP:
    """An SMTP connection, with TLS and login as the settings ask. Raises
    SenderProblem with a sentence naming the setting to check; SettingsRefused
    (``login`` true) when the server or the token endpoint refused the login."""
    smtp = open_smtp(settings)
    try:
        if settings.username:
            log_in(smtp, settings, tokens or TokenCache(), clock)
    except BaseException:
        smtp.close()
        raise
    return smtp


def open_smtp(settings: Settings) -> smtplib.SMTP:
    """Connected, greeted (EHLO) and encrypted as [smtp] security says. Raises SenderProblem
    (``lasting`` when the settings must change) when the server cannot be reached, greeted
    or encrypted with."""
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    name = settings.ehlo or None
    smtp: smtplib.SMTP
    try:
        if settings.security == "tls":
            smtp = StepSMTP_SSL(settings.smtp_host, settings.smtp_port, name,
                                timeout=settings.timeout, context=tls_context(settings))
        else:
            smtp = StepSMTP(settings.smtp_host, settings.smtp_port, name, timeout=settings.timeout)
        with contextlib.suppress(OSError, AttributeError):     # no socket: a failed connect
            smtp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,  # type: ignore[union-attr]
                                 SEND_BUFFER_BYTES)
    except ssl.SSLError as exc:
        raise SenderProblem(f"TLS with {where} failed: {exc}. Check [smtp] security and port "
                          "(465 is tls, 587 is starttls), or set ca_file for the server's "
                          "own certificate.", lasting=True) from None
    except smtplib.SMTPConnectError as exc:
        raise SenderProblem(f"The SMTP server {where} refused the connection: "
                          f"{reply_text(exc.smtp_code, exc.smtp_error)}.") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise SenderProblem(f"Could not reach the SMTP server {where}: {exc}. Check [smtp] host "
                          "and port, and that the firewall lets this computer reach it.") from None
    try:
        smtp.ehlo_or_helo_if_needed()
        if settings.security == "starttls":
            if not smtp.has_extn("starttls"):
                raise SenderProblem(f"The SMTP server {where} does not offer STARTTLS. Set [smtp] "
                                  "security = none, or use its TLS port.", lasting=True)
            smtp.starttls(context=tls_context(settings))
            smtp.ehlo()
    except ssl.SSLError as exc:
        smtp.close()
        raise SenderProblem(f"TLS with {where} failed: {exc}. Set [smtp] ca_file for a server "
                          "with its own certificate.", lasting=True) from None
    except SenderProblem:
        smtp.close()
        raise
    except smtplib.SMTPHeloError as exc:
        smtp.close()
        raise SenderProblem(f"The SMTP server {where} refused our greeting (EHLO "
                            f"{smtp.local_hostname}): {reply_text(exc.smtp_code, exc.smtp_error)}. "
                            "Set [smtp] ehlo to this computer's name as the server knows it.",
                            lasting=exc.smtp_code >= 500) from None
    except (OSError, smtplib.SMTPException) as exc:
        smtp.close()
        raise SenderProblem(f"The SMTP server {where} broke off the greeting: {exc}.") from None
    return smtp


# -- logging in ----------------------------------------------------------------

#: A refused login is not tried again with the same settings for this long:
#: cloud services lock an account after a few failed logins.
LOGIN_RETRY_SECONDS = 30 * 60
#: An OAuth token is renewed this long before it expires, so that a check
#: never starts with a token that runs out half-way.
TOKEN_RENEW_SECONDS = 5 * 60
#: What the token is for: Exchange Online, SMTP included.
OAUTH_SCOPE = "https://outlook.office365.com/.default"
#: The README section that explains the cloud services' settings.
CLOUD_README = 'the README, "Microsoft 365 and Google Workspace"'
#: Login mechanisms in the order we use them; only one is tried per login.
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
_ENHANCED_RE = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_GOOGLE_RE = re.compile(r"google|gmail|gsmtp")

MS_SMTP_AUTH_OFF = ("turn on Authenticated SMTP for the mailbox (Microsoft 365 admin center > "
                    "Users > Active users > the mailbox > Mail > Manage email apps), or switch "
                    f"to [smtp] auth = oauth2 (see {CLOUD_README})")
GOOGLE_APP_PASSWORD = ("Google wants an app password: create one for the account (Google "
                       "Account > Security > 2-Step Verification > App passwords) and put it in "
                       "[smtp] password, or send through Google's SMTP relay service "
                       f"(host = smtp-relay.gmail.com, see {CLOUD_README})")
STARTTLS_NEEDED = ("set [smtp] security = starttls (port 587) or security = tls (port 465): the "
                   "server takes mail only over an encrypted connection")


def settings_fix(code: int, text, oauth: bool = False) -> str | None:
    """What to change when a reply (at AUTH, MAIL or RCPT) says the settings
    are wrong rather than the message; None when it is about the message."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    low = " ".join(str(text).split()).lower()
    found = _ENHANCED_RE.search(low)
    status = found.group(1) if found else ""
    if status == "5.7.139" and ("disabled" in low or "criteria" in low or "security defaults" in low):
        if oauth:
            return ("turn on Authenticated SMTP for the mailbox in [smtp] username (Exchange Online "
                    "PowerShell: Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled "
                    "$false); OAuth logins need it too")
        return "Microsoft 365 has SMTP AUTH turned off for this mailbox or tenant: " + MS_SMTP_AUTH_OFF
    if status == "5.7.30" or "basic authentication is not supported" in low:
        return ("Microsoft 365 no longer takes a password for sending (basic authentication is "
                f"off): switch to [smtp] auth = oauth2 (see {CLOUD_README})")
    if code == 534 or status == "5.7.9" or "application-specific password" in low:
        return GOOGLE_APP_PASSWORD
    if code == 538 or (code == 530 and "tls" in low):
        return STARTTLS_NEEDED
    if code == 530 or status == "5.7.57" or (status == "5.7.1" and "authenticat" in low):
        return ("set [smtp] username and password: the server takes mail only after a login "
                f"(Microsoft 365: the mailbox, or auth = oauth2; see {CLOUD_README})")
    if code == 535:
        if oauth:
            return ("the mailbox did not accept the app's token: check that [smtp] username is the "
                    "mailbox the app was given access to (Add-MailboxPermission), that the app has "
                    f"the SMTP.SendAsApp permission with admin consent (see {CLOUD_README})")
        if _GOOGLE_RE.search(low):
            return "check [smtp] username and password; " + GOOGLE_APP_PASSWORD
        return "check [smtp] username and password"
    if status in ("5.7.60", "5.2.252") or "sendasdenied" in low:
        return ("the mailbox in [smtp] username may not send as [gateway] from_address: make "
                "from_address the mailbox's own address, or give the mailbox Send As permission")
    return None


def settings_refusal(exc: Exception, settings: Settings) -> "SettingsRefused | None":
    """A refusal at MAIL or RCPT that is the settings' fault, as a SettingsRefused."""
    replies: list
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        replies = list(exc.recipients.values())
    elif isinstance(exc, smtplib.SMTPResponseException):
        replies = [(exc.smtp_code, exc.smtp_error)]
    else:
        return None
    for code, message in replies:
        fix = settings_fix(code, message, settings.auth == "oauth2")
        if fix:
            return SettingsRefused(f"The SMTP server {settings.smtp_host}:{settings.smtp_port} "
                                   f"answered {reply_text(code, message)!r}: {fix}.")
    return None


def rcpt_settings_refusal(t: Transaction, settings: Settings) -> SettingsRefused | None:
    """A transaction in which every recipient was refused for a reason that
    is the settings' fault (a relay that wants a login or TLS answers at RCPT)."""
    replies = list(t.refused.values()) + list(t.deferred.values())
    for text in replies:
        code, _, message = text.partition(" ")
        if code.isdigit():
            refusal = settings_refusal(smtplib.SMTPResponseException(int(code), message), settings)
            if refusal:
                return refusal
    return None


def log_in(smtp: smtplib.SMTP, settings: Settings, tokens: "TokenCache",
           clock: Callable[[], float]) -> None:
    """One login, with one mechanism: smtplib's login() would try the next mechanism after a
    refusal, and two refusals a check lock accounts. Raises SettingsRefused when the server
    offers no login we can use or refuses this one; SenderProblem when the connection
    breaks."""
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    if not smtp.has_extn("auth"):
        raise SettingsRefused(f"The SMTP server {where} does not offer a login (no AUTH"
                              f"{' before STARTTLS' if settings.security == 'none' else ''}): "
                              + ("set [smtp] security = starttls." if settings.security == "none"
                                 else "leave [smtp] username empty."), login=True)
    offered = smtp.esmtp_features["auth"].upper().split()
    oauth = settings.auth == "oauth2"
    try:
        if oauth:
            if "XOAUTH2" not in offered:
                raise SettingsRefused(f"The SMTP server {where} does not offer XOAUTH2 logins (it "
                                      f"offers {', '.join(offered) or 'none'}): for Microsoft 365 "
                                      "use host = smtp.office365.com, port = 587, security = "
                                      "starttls.", login=True)
            token = tokens.get(settings, clock())
            blob = f"user={settings.username}\x01auth=Bearer {token}\x01\x01"
            # On a refusal the server sends a 334 with an error: answer it with
            # an empty line (not the token again) and it gives the final reply.
            # (Written out rather than smtp.auth(), which on Python 3.9 cannot
            # send that empty line.)
            code, reply = smtp.docmd("AUTH", "XOAUTH2 " + base64.b64encode(blob.encode()).decode())
            if code == 334:
                code, reply = smtp.docmd("")
            if code not in (235, 503):
                tokens.forget()
                raise smtplib.SMTPAuthenticationError(code, reply)
            return
        mechanism = next((m for m in PASSWORD_MECHANISMS if m in offered), None)
        if mechanism is None:
            raise SettingsRefused(f"The SMTP server {where} offers no password login (it offers "
                                  f"{', '.join(offered) or 'none'}): check [smtp] auth, or leave "
                                  "username empty if it needs no login.", login=True)
        smtp.user, smtp.password = settings.username, settings.password
        smtp.auth(mechanism, smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login)
    except smtplib.SMTPAuthenticationError as exc:
        fix = settings_fix(exc.smtp_code, exc.smtp_error, oauth) or "check [smtp] username and password"
        raise SettingsRefused(f"The SMTP server {where} refused the login of {settings.username!r} "
                              f"({reply_text(exc.smtp_code, exc.smtp_error)}): {fix}.",
                              login=True) from None
    except UnicodeEncodeError:
        raise SettingsRefused("[smtp] username or password has letters outside plain ASCII, "
                              "which an SMTP login cannot carry: use plain letters, digits and "
                              "signs.", login=True) from None
    except (OSError, smtplib.SMTPException) as exc:
        raise SenderProblem(f"The SMTP server {where} broke off the login: {exc}.") from None


def login_key(settings: Settings, salt: bytes) -> str:
    """Which settings a login was refused with, as a slow salted digest: the
    database keeps it, and must not make the password easy to guess."""
    values = (settings.smtp_host, settings.smtp_port, settings.security, settings.auth,
              settings.username, settings.password, settings.oauth_token_url,
              settings.oauth_client_id, settings.oauth_client_secret)
    data = "\x00".join(map(str, values)).encode("utf-8")
    return hashlib.pbkdf2_hmac("sha256", data, salt, 20_000).hex()


def login_hold_text(record: dict) -> str:
    """The sender's state while a refused login waits: when, why, and until when."""
    at = record["at"]
    return (f"login refused at {time.strftime('%H:%M', time.localtime(at))}: "
            f"{record['reason'].rstrip('.')}; next try at "
            f"{time.strftime('%H:%M', time.localtime(at + LOGIN_RETRY_SECONDS))} "
            "or when the settings change.")


def login_hold(settings: Settings, db: sqlite3.Connection, now: float) -> str | None:
    """The refused login still holding the sender back, as its sentence; None
    once the settings have changed or LOGIN_RETRY_SECONDS have passed."""
    record = get_state(db, "login_refused")
    if not record or now >= record["at"] + LOGIN_RETRY_SECONDS:
        return None
    if login_key(settings, bytes.fromhex(record["salt"])) != record["key"]:
        return None
    return login_hold_text(record)


@dataclasses.dataclass
class Token:
    value: str
    expires: float


class TokenCache:
    """OAuth 2.0 access tokens, in memory only, for the settings that fetched
    them; renewed TOKEN_RENEW_SECONDS before they expire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple = ()
        self._token: Token | None = None
        self.fetches = 0        #: how many tokens were fetched (for tests and smtp-check)

    def get(self, settings: Settings, now: float) -> str:
        key = (settings.oauth_token_url, settings.oauth_client_id, settings.oauth_client_secret)
        with self._lock:
            if self._token and self._key == key and now < self._token.expires - TOKEN_RENEW_SECONDS:
                return self._token.value
            value, lifetime = fetch_token(settings)
            self.fetches += 1
            self._key, self._token = key, Token(value, now + lifetime)
            return value

    def forget(self) -> None:
        with self._lock:
            self._token = None


def no_redirects():
    """An opener handler that follows no redirect: the client secret goes to
    the token endpoint in the ini and nowhere else. (urllib.request is
    imported here: a plain `send` with a password never needs it.)"""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None
    return NoRedirect


def fetch_token(settings: Settings) -> tuple[str, float]:
    """(access token, seconds it lives) by the OAuth 2.0 client-credentials
    grant. Raises SettingsRefused when the endpoint refuses, SenderProblem when
    it cannot be reached. No sentence ever holds the secret."""
    import urllib.request       # only OAuth needs it: a plain `send` stays smaller
    url = settings.oauth_token_url
    where = urllib.parse.urlsplit(url).netloc
    body = urllib.parse.urlencode({
        "grant_type": "client_credentials", "client_id": settings.oauth_client_id,
        "client_secret": settings.oauth_client_secret, "scope": OAUTH_SCOPE}).encode("ascii")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
    opener = urllib.request.build_opener(no_redirects())
    try:
        with opener.open(request, timeout=settings.timeout) as response:
            answer = json.loads(response.read(1_000_000).decode("utf-8"))
        token, lifetime = answer["access_token"], float(answer.get("expires_in", 3600))
        if not isinstance(token, str) or not token.isascii() or not token:
            raise ValueError("no usable access_token")
        return token, lifetime
    except urllib.error.HTTPError as exc:
        answer = {}
        with contextlib.suppress(OSError, ValueError):
            answer = json.loads(exc.read(100_000).decode("utf-8", "replace"))
        if not isinstance(answer, dict):
            answer = {}
        sentence = scrub(token_refusal(exc.code, answer, settings), settings.oauth_client_secret)
        if exc.code >= 500 or exc.code == 429:
            raise SenderProblem(sentence) from None
        raise SettingsRefused(sentence, login=True) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise SenderProblem(scrub(
            f"The token endpoint {where} could not be used ({reason}): check that this computer "
            "reaches it (https, port 443; a proxy or firewall may block it) and [smtp] "
            "oauth_token_url.", settings.oauth_client_secret)) from None


def token_refusal(status: int, answer: dict, settings: Settings) -> str:
    """One sentence for a refused token request, from Entra ID's error codes."""
    description = str(answer.get("error_description") or answer.get("error") or f"HTTP {status}")
    first = description.strip().splitlines()[0] if description.strip() else f"HTTP {status}"
    codes = set(re.findall(r"AADSTS(\d+)", description))
    said = f"Microsoft refused the token request ({first})"
    if codes & {"90002", "900023", "90013"}:
        return (f"{said}: the tenant {settings.oauth_tenant!r} is unknown. Set [smtp] "
                "oauth_tenant to the school's Microsoft 365 domain or the Directory (tenant) ID "
                "from the app's Overview page in Microsoft Entra.")
    if codes & {"7000215"}:
        return (f"{said}: the client secret is wrong. Copy the secret's Value (not its Secret ID) "
                "from the app's Certificates & secrets page into [smtp] oauth_client_secret, or "
                "create a new secret there.")
    if codes & {"7000222"}:
        return (f"{said}: the client secret has expired. Create a new one under the app's "
                "Certificates & secrets in Microsoft Entra and put its Value in [smtp] "
                "oauth_client_secret.")
    if codes & {"700016"}:
        return (f"{said}: there is no app {settings.oauth_client_id!r} in that tenant. Copy the "
                "Application (client) ID from the app's Overview page into [smtp] oauth_client_id.")
    if codes & {"70011", "1002012", "65001", "500011"}:
        return (f"{said}: the app may not send mail yet. Give it the API permission Office 365 "
                f"Exchange Online > SMTP.SendAsApp with admin consent (see {CLOUD_README}).")
    return (f"{said}. Check [smtp] oauth_tenant, oauth_client_id and oauth_client_secret "
            f"(see {CLOUD_README}).")


def scrub(text: str, secret: str) -> str:
    """text without the secret in it, whatever a server echoed back."""
    return text.replace(secret, "(the secret)") if secret else text


# -- smtp-check: the same steps, one by one ----------------------------------------

@dataclasses.dataclass(frozen=True)
class Step:
    """One step of talking to the server, as `smtp-check` and the page show it."""
    name: str
    ok: bool
    said: str       #: what happened; for a failed step, also what to change


def cert_summary(cert: dict) -> str:
    """The certificate's name(s) and expiry date, from ssl's getpeercert()."""
    subject = dict(item for rdn in cert.get("subject", ()) for item in rdn)
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    name = subject.get("commonName") or (names[0] if names else "(no name)")
    others = [n for n in names if n != name]
    text = f"certificate for {name}" + (f" (also {', '.join(others[:3])}"
                                        f"{', ...' if len(others) > 3 else ''})" if others else "")
    if cert.get("notAfter"):
        expires = ssl.cert_time_to_seconds(cert["notAfter"])
        text += f", valid until {time.strftime('%Y-%m-%d', time.gmtime(expires))}"
    return text


def peer_cert(smtp: smtplib.SMTP) -> dict:
    sock = smtp.sock
    return (sock.getpeercert() or {}) if isinstance(sock, ssl.SSLSocket) else {}


def offered_text(smtp: smtplib.SMTP) -> str:
    """What an EHLO reply offers, in the words of a mail administrator."""
    features = smtp.esmtp_features
    parts = []
    if "size" in features:
        size = features["size"].strip()
        parts.append(f"SIZE {size} ({int(size) / 1024 / 1024:.0f} MB)" if size.isdigit() and
                     int(size) else "SIZE (no limit given)")
    for name in ("starttls", "8bitmime", "smtputf8"):
        if name in features:
            parts.append(name.upper())
    if "auth" in features:
        parts.append("AUTH " + " ".join(features["auth"].upper().split()))
    return ", ".join(parts) or "no extensions"


def smtp_steps(settings: Settings, tokens: TokenCache | None = None,
               clock: Callable[[], float] = time.time, hold: str | None = None) -> list[Step]:
    """Connect, TLS, EHLO, (token,) login and QUIT, stopping at the first step
    that fails. Sends no message. With `hold` (a refused login still waiting,
    see login_hold) the login is not tried again."""
    steps: list[Step] = []
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    tokens = tokens or TokenCache()
    name = settings.ehlo or None
    smtp: smtplib.SMTP
    try:
        if settings.security == "tls":
            smtp = smtplib.SMTP_SSL(local_hostname=name, timeout=settings.timeout,
                                    context=tls_context(settings))
        else:
            smtp = smtplib.SMTP(local_hostname=name, timeout=settings.timeout)
        # The name TLS checks: SMTP(host) sets it, connect() does not.
        smtp._host = settings.smtp_host     # type: ignore[attr-defined]
        code, greeting = smtp.connect(settings.smtp_host, settings.smtp_port)
    except ssl.SSLError as exc:
        smtp.close()
        steps.append(Step("connect", True, f"reached {where}"))
        steps.append(Step("TLS", False, f"TLS with {where} failed ({exc}): check [smtp] security "
                          "and port (465 is tls, 587 is starttls), or set ca_file for a server "
                          "with its own certificate."))
        return steps
    except (OSError, smtplib.SMTPException) as exc:
        smtp.close()
        steps.append(Step("connect", False, f"could not reach {where} ({exc}): check [smtp] host "
                          "and port, and that the firewall lets this computer reach it."))
        return steps
    try:
        if code != 220:
            steps.append(Step("connect", False, f"{where} answered {reply_text(code, greeting)!r} "
                              "instead of a greeting: it is busy or refuses this computer."))
            return steps
        steps.append(Step("connect", True, f"{where} answered {reply_text(code, greeting)!r}"))
        _tls_steps(smtp, settings, steps)
        if steps[-1].ok:
            _login_steps(smtp, settings, tokens, clock, steps, hold)
        if steps[-1].ok:
            smtp.quit()
            steps.append(Step("QUIT", True, "nothing was sent"))
    except (OSError, smtplib.SMTPException) as exc:
        steps.append(Step("connection", False, f"{where} broke off the conversation ({exc})."))
    finally:
        smtp.close()
    return steps


def _tls_steps(smtp: smtplib.SMTP, settings: Settings, steps: list[Step]) -> None:
    if settings.security == "tls":
        steps.append(Step("TLS", True, "implicit TLS; " + cert_summary(peer_cert(smtp))))
    code, reply = smtp.ehlo()
    if code != 250:
        steps.append(Step("EHLO", False, f"EHLO was answered {reply_text(code, reply)!r}: set "
                          "[smtp] ehlo to this computer's full name, such as library.school.example."))
        return
    if settings.security == "starttls":
        if not smtp.has_extn("starttls"):
            steps.append(Step("TLS", False, f"the server does not offer STARTTLS (it offers "
                              f"{offered_text(smtp)}): set [smtp] security = none, or use "
                              "security = tls with its TLS port (465)."))
            return
        try:
            smtp.starttls(context=tls_context(settings))
        except ssl.SSLError as exc:
            steps.append(Step("TLS", False, f"STARTTLS failed ({exc}): for a server with a "
                              "certificate of its own, set [smtp] ca_file to its PEM file."))
            return
        steps.append(Step("TLS", True, "STARTTLS; " + cert_summary(peer_cert(smtp))))
        smtp.ehlo()
    said = "offers " + offered_text(smtp)
    if settings.security == "none" and smtp.has_extn("starttls"):
        said += "; it offers STARTTLS, so security = starttls would encrypt the connection"
    steps.append(Step("EHLO", True, said))


def _login_steps(smtp: smtplib.SMTP, settings: Settings, tokens: TokenCache,
                 clock: Callable[[], float], steps: list[Step], hold: str | None) -> None:
    if not settings.username:
        steps.append(Step("login", True, "none ([smtp] username is empty)"))
        return
    if hold:
        steps.append(Step("login", False, f"not tried again: {hold}"))
        return
    try:
        if settings.auth == "oauth2":
            fetched = tokens.fetches
            tokens.get(settings, clock())
            host = urllib.parse.urlsplit(settings.oauth_token_url).netloc
            steps.append(Step("token", True, f"{'fetched' if tokens.fetches > fetched else 'kept'} "
                              f"an access token from {host}"))
        log_in(smtp, settings, tokens, clock)
    except SenderProblem as exc:
        steps.append(Step("token" if settings.auth == "oauth2" and steps[-1].name != "token"
                          else "login", False, str(exc)))
        return
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    mechanism = "XOAUTH2" if settings.auth == "oauth2" else next(
        m for m in PASSWORD_MECHANISMS if m in offered)
    steps.append(Step("login", True, f"logged in as {settings.username} ({mechanism})"))


class Outcome:
    SENT, BAD, LATER, BROKEN = "sent", "bad", "later", "broken"
    HELD = "held"       #: not sent: the day's max_per_day would be passed


class NotHandedOver(smtplib.SMTPServerDisconnected):
    """The connection was lost before the message's DATA began: the server
    cannot have it, so it is not to blame and goes again at the next check."""


def is_recipient_limit(code: int, message) -> bool:
    """452 4.5.3 "too many recipients" (RFC 5321 4.5.3.1.10): the recipients
    from here on go in a further transaction, they are not refused."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return code == 452 and (text.startswith("4.5.3") or "too many recipients" in text.lower())


def smtp_address(address: str, smtputf8: bool) -> str | None:
    """The address for MAIL or RCPT: as it is where the server offers
    SMTPUTF8 (or it is ASCII), else its IDNA form; None if it has none."""
    if address.isascii() or smtputf8:
        return address
    return ascii_address(address)


def mail_options(size: int, eight_bit: bool, features: dict) -> list[str]:
    """MAIL FROM parameters, as a careful client uses the server's extensions:
    the size (RFC 1870), an 8-bit body (RFC 6152), UTF-8 addresses (RFC 6531)."""
    options = [f"SIZE={size}"] if "size" in features else []
    if eight_bit and "8bitmime" in features:
        options.append("BODY=8BITMIME")
    return options


def size_limit(features: dict) -> int:
    """The largest message the server announced (EHLO's SIZE), 0 if none."""
    value = (features.get("size") or "").strip()
    return int(value) if value.isdigit() else 0


@dataclasses.dataclass
class Transaction:
    """One MAIL ... DATA exchange for some of a message's recipients."""
    accepted: dict = dataclasses.field(default_factory=dict)   #: address -> reply
    deferred: dict = dataclasses.field(default_factory=dict)   #: 4xx: address -> reply
    refused: dict = dataclasses.field(default_factory=dict)    #: 5xx: address -> reply
    overflow: list = dataclasses.field(default_factory=list)   #: for a further transaction


# -- deliveries not yet in the database -------------------------------------------
# What closes crash window 2 (see Sender) must be written before the next
# message starts and survive a kill -9. A commit per delivery did it, at some
# 0.1 ms and six or seven pages of sqlite's write-ahead log each; a line
# appended to a file in the spool folder does it with one write(): what a
# process wrote, the operating system keeps when the process is killed. The
# lines of a group go into the database together at the group's flush, in
# one commit that also sets a new token. A line counts only if it carries the
# database's token of the moment and its own checksum: a line already in the
# database, or whatever a power cut leaves in the file, is never taken.

#: The journal's name in the spool folder (hidden: never a message).
DELIVERIES_FILE = ".bibliogate-sent.journal"
#: A journal holds one group's lines (100 deliveries): one this large is not ours.
JOURNAL_LIMIT = 64 * 1024 * 1024
#: Not following a link, not waiting on a pipe (where the system has them).
JOURNAL_FLAGS = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class DeliveryJournal:
    """One line per delivery the database does not have yet: [token, file,
    digest, at, day, recipients, event row]. Only the holder of the spool's
    sender lock opens it. When it cannot be opened or written, the sender
    commits each delivery to the database instead, as it did before."""

    def __init__(self, spool: Path):
        self.path = Path(spool) / DELIVERIES_FILE
        self.fd: int | None = None
        self._written = False       #: whether the file may hold lines (clear() has work)

    def start(self) -> str:
        """Open the file: "" when it is open, else why it cannot be used. A
        link, a pipe or any other thing in its place is never followed nor
        opened (the spool folder is open to other programs)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            return f"{self.path} cannot be looked at ({exc.strerror})"
        if st is not None and not self._plain(st):
            return f"{self.path} is not a plain file of BiblioGate's; delete it"
        try:
            self.fd = patiently(os.open, self.path, os.O_RDWR | os.O_CREAT | JOURNAL_FLAGS, 0o600)
            st = os.fstat(self.fd)
        except (OSError, FileInUse) as exc:
            self.close()
            return f"{self.path} cannot be opened ({getattr(exc, 'strerror', None) or exc})"
        if not self._plain(st):      # swapped in meanwhile
            self.close()
            return f"{self.path} is not a plain file of BiblioGate's; delete it"
        return ""

    def leftover(self) -> bool:
        """Whether the file (not open) may hold a stopped check's lines: a
        link or a second name of another file never does."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return self._plain(st) and st.st_size > 0

    @staticmethod
    def _plain(st: os.stat_result) -> bool:
        """A plain file with no other name: not a link, pipe or device, nor a
        hard link to a file elsewhere, which emptying it would empty too.
        (A file system that counts no links, 0, is taken at its word.)"""
        return stat.S_ISREG(st.st_mode) and st.st_nlink <= 1

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def rows(self, token: str | None) -> list:
        """The rows of the lines written with `token`, in their order."""
        if self.fd is None:
            return []
        if os.fstat(self.fd).st_size > JOURNAL_LIMIT:
            raise OSError(errno.EFBIG, "it is far larger than BiblioGate ever makes it: delete it "
                          "while no check runs")
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        self._written = bool(chunks)
        if not token:
            return []
        found = []
        for line in b"".join(chunks).split(b"\n"):
            payload, _, check = line.rpartition(b" ")
            if not payload or check != self._check(payload):
                continue                # torn, or not ours: a power cut's leftovers
            try:
                row = json.loads(payload)
            except ValueError:
                continue
            if isinstance(row, list) and len(row) == 7 and row[0] == token:
                found.append(row[1:])
        return found

    def add(self, token: str, row: list) -> None:
        """One line, one write(). Raises OSError."""
        if self.fd is None:
            raise OSError("the journal of deliveries is not open")
        payload = json.dumps([token, *row], ensure_ascii=True, separators=(",", ":")).encode()
        line = payload + b" " + self._check(payload) + b"\n"
        self._written = True
        if os.write(self.fd, line) != len(line):        # a disk just full: the line is torn
            raise OSError(errno.ENOSPC, "only part of a line could be written")

    def clear(self) -> None:
        """Empty the file once its lines are in the database (flushed). An
        empty file is left alone: an idle check writes nothing to the disk."""
        if self.fd is not None and self._written:
            self._written = False
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
                os.lseek(self.fd, 0, os.SEEK_SET)

    @staticmethod
    def _check(payload: bytes) -> bytes:
        return hashlib.sha256(payload).hexdigest()[:16].encode()


def reset(smtp: smtplib.SMTP, code: int = 0) -> None:
    """After a refusal, make the connection fit for the next message: RSET,
    or close it if the server is closing (421) or RSET fails, so that the
    next message goes over a new connection and is never blamed for this one."""
    if code == 421:
        smtp.close()
        return
    try:
        ok = smtp.rset()[0] == 250
    except (smtplib.SMTPException, OSError):
        ok = False
    if not ok:
        smtp.close()


def transaction(smtp: smtplib.SMTP, sender: str, recipients: list, data: bytes,
                options: list, smtputf8: bool) -> Transaction:
    """One transaction: MAIL, RCPT for each recipient up to the server's
    limit on recipients, DATA. Returns each recipient's outcome. Raises
    SMTPSenderRefused or SMTPDataError (the connection reset, see reset()),
    NotHandedOver when the connection is lost before DATA, or what smtplib
    raises while the data is on its way."""
    if smtputf8:
        options = options + ["SMTPUTF8"]
    t = Transaction()
    try:
        code, reply = smtp.mail(sender, options)
        if code != 250:
            reset(smtp, code)
            raise smtplib.SMTPSenderRefused(code, reply, sender)
        for n, address in enumerate(recipients):
            envelope = smtp_address(address, smtputf8)
            if envelope is None:
                t.refused[address] = ("the server offers no SMTPUTF8, which this address "
                                      "(not ASCII before the @) needs")
                continue
            code, reply = smtp.rcpt(envelope)
            if code in (250, 251):
                t.accepted[address] = reply_text(code, reply)
            elif is_recipient_limit(code, reply):
                t.overflow = list(recipients[n:])
                break
            elif code == 421:
                reset(smtp, code)
                raise smtplib.SMTPServerDisconnected(reply_text(code, reply))
            else:
                (t.refused if code >= 500 else t.deferred)[address] = reply_text(code, reply)
    except smtplib.SMTPServerDisconnected as exc:
        raise NotHandedOver(str(exc)) from None
    if not t.accepted:
        reset(smtp)
        return t
    try:
        code, reply = smtp.data(data)
    except smtplib.SMTPDataError as exc:       # DATA itself refused (not 354)
        reset(smtp, exc.smtp_code)
        raise
    if code != 250:                            # refused after the data
        reset(smtp, code)
        raise smtplib.SMTPDataError(code, reply)
    return t


def classify(exc: Exception) -> tuple[str, str]:
    """What a failed transaction means for the message: (outcome, reason).
    5xx is final; 4xx and a lost connection are worth another try. (Each
    recipient's RCPT reply is sorted out by transaction() itself.)"""
    if isinstance(exc, smtplib.SMTPResponseException):
        what = "sender" if isinstance(exc, smtplib.SMTPSenderRefused) else "message"
        text = f"the server refused the {what}: {reply_text(exc.smtp_code, exc.smtp_error)}"
        if exc.smtp_code == 421:
            return Outcome.BROKEN, text
        return (Outcome.BAD if exc.smtp_code >= 500 else Outcome.LATER), text
    return Outcome.BROKEN, f"the connection to the server was lost: {exc or type(exc).__name__}"


@dataclasses.dataclass
class Delivery:
    """Where one message stands with its recipients after this check."""
    before: dict                 #: outcomes recorded by earlier checks (lower address -> state)
    sent: list = dataclasses.field(default_factory=list)        #: accepted in this check
    waiting: dict = dataclasses.field(default_factory=dict)     #: address -> reply
    refused: dict = dataclasses.field(default_factory=dict)     #: address -> reply
    broken: bool = False         #: the connection is gone: the check ends
    reason: str = ""             #: why the message itself was refused, if it was

    def had_it(self) -> int:
        return sum(1 for state, _ in self.before.values() if state == "sent")


def _listed(replies: dict) -> str:
    return ", ".join(f"{a} ({r})" for a, r in replies.items())


def refusal_reason(refused: dict, reason: str = "") -> str:
    """Why nobody can get a message: the reason the message itself was
    refused (at MAIL or after the data, or given up) when it is every
    recipient's, else each recipient's reply."""
    if reason and set(refused.values()) == {reason}:
        return reason
    return "every recipient was refused: " + "; ".join(f"{a}: {r}" for a, r in refused.items())


class Sender:
    """Sends from one spool folder. A check holds the spool's sender lock, so
    two BiblioGate processes on one folder never send the same file.

    Each recipient's outcome is kept in the `recipients` table, so a message
    that some recipients have and others wait for (450, or 452 beyond the
    server's limit per message) goes again to those waiting only. Where a
    crash (kill -9, a power cut) can fall, and what follows:

    1. Before the end of the data ("."): the server drops the transaction;
       nothing was recorded; every pending recipient gets it at the next check.
    2. After "." and before the 250 reply is recorded: the server may have it
       for this transaction's recipients; they get it again (no SMTP client
       can close this window, RFC 1047). It is kept as short as can be: the
       next write after the 250 is its record, before the next transaction,
       the log, the removal or anything else: the 'sent' rows of these
       recipients, or, when everyone took it at once (the usual case), the
       file's line in the journal of deliveries (its ledger row to be).
    3. After that write: the next check reads the rows (having put the
       journal's lines into the ledger first) and sends only to the
       recipients still waiting; with none left, or with the ledger row,
       the file is removed (or, if nobody got it, set aside .BAD).
    4. After the file is removed: its rows are forgotten at the next check.

    A delivery's record is a line in the journal of deliveries (one write(),
    see DeliveryJournal); every other record is committed at once, without a
    flush to disk (sqlite's write-ahead log under `synchronous = NORMAL`).
    Both survive a kill -9. The journal's lines go into the database at the
    group's flush, which comes once per group (GROUP_MESSAGES messages or
    GROUP_SECONDS, whichever comes first, and at the end of the check), and
    the group's delivered files are removed only after it: a power cut can
    undo the records of the last group only, whose files are all still
    there, so at most those messages go again; none is lost. The ledger, the recipients'
    outcomes and the retry states are read once per check."""

    #: A flush to disk (one fsync) per this many messages at most ...
    GROUP_MESSAGES = 100
    #: ... or per this many seconds, whichever comes first: what a power cut
    #: can send again is bounded by both.
    GROUP_SECONDS = 1.0

    def __init__(self, settings: Settings, journal: Journal, clock: Callable[[], float] = time.time,
                 stop: threading.Event | None = None, tokens: TokenCache | None = None,
                 index: SpoolIndex | None = None):
        self.settings, self.journal, self.clock = settings, journal, clock
        self.stop = stop or threading.Event()
        #: What is known of the spool: `run` keeps one between checks; `send` reads it afresh.
        self.index = index if index is not None and index.folder == settings.spool else \
            SpoolIndex(settings.spool)
        #: OAuth tokens outlive a check: the Gateway passes the same cache every time.
        self.tokens = tokens or TokenCache()
        #: What one check read once (None between checks): the sent ledger's
        #: (file, digest) pairs, the recipients' outcomes, the retry states.
        self._ledger: set | None = None
        self._outcomes: dict | None = None
        self._states: dict | None = None
        #: The group not yet flushed: delivered files to remove after the
        #: flush (claimed path -> (item, digest, note)), its size and start.
        self._to_remove: dict = {}
        self._group_size, self._group_started = 0, 0.0
        #: The journal of deliveries (in the spool folder), the token its
        #: lines carry (None: each delivery is committed instead), and the
        #: group's deliveries it holds that the database does not have yet.
        self._deliveries = DeliveryJournal(settings.spool)
        self._token_key = f"deliveries_token {settings.spool}"     #: in state: the lines' token
        self._token: str | None = None
        self._unrecorded: list = []

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
            return CheckResult(problem=SenderProblem(
                f"The spool folder {self.settings.spool} cannot be used ({exc.strerror}). Check "
                "[gateway] spool_folder and the folder's permissions.", lasting=True))
        try:
            held = self._open_journal()
            if held:
                return CheckResult(problem=SenderProblem(held))
            return self._check(self.settings.per_check if limit is None else limit, ignore_waits)
        finally:
            self._deliveries.close()
            self._token = None
            lock.release()

    def _open_journal(self) -> str:
        """Open the journal of deliveries; what a check that ended before its
        flush (a kill -9) left in it goes into the database first. Returns
        why nothing may be sent now ("" when all is well): a journal that may
        hold such lines but cannot be read; sending would send them again."""
        self._token, self._unrecorded = None, []
        why = self._deliveries.start()
        if why and self._deliveries.leftover():
            return self._journal_held(why)
        if why:
            log.warning("the journal of deliveries cannot be used: %s; each delivery is "
                        "committed to the database instead", why)
            return ""
        token = get_state(self.db, self._token_key)
        try:
            rows = self._deliveries.rows(token)
        except OSError as exc:
            self._deliveries.close()
            return self._journal_held(f"{self._deliveries.path} cannot be read ({exc.strerror})")
        if rows or not token:
            token = self._record_with_new_token(rows)
            if rows:
                sync_db(self.db)    # on disk before the journal is emptied, however the last check ended
        if rows:
            log.info("%d deliveries made before BiblioGate was stopped were recorded from %s",
                     len(rows), self._deliveries.path)
        self._deliveries.clear()
        self._token = token
        return ""

    def _record_with_new_token(self, rows: list) -> str:
        """The journal's rows into the database, in one commit with a new token
        for its lines: from then on those rows are in the database, and never
        taken from the journal again. Returns the token."""
        token = secrets.token_hex(8)
        with self.db:
            self._record(rows)
            set_state(self.db, **{self._token_key: token})
        return token

    @staticmethod
    def _journal_held(why: str) -> str:
        return (f"Nothing was sent: the journal of deliveries {why}. It may list messages a "
                "stopped check had already sent, which would go twice. If another program (a "
                "backup, the antivirus) has it open, this passes by itself; otherwise make it "
                "readable and writable by the account BiblioGate runs as.")

    def _check(self, limit: int, ignore_waits: bool) -> CheckResult:
        now = self.clock()
        held = login_hold(self.settings, self.db, now)
        if held:            # said whether or not anything waits
            return CheckResult(problem=SettingsRefused(held, login=True))
        if self._day_full(now):
            return CheckResult(held=self._cap_text())
        result = CheckResult()
        self.index.refresh()
        if self.index.claimed:
            for name in recover_claims(self.settings.spool):
                self.journal.event("recovered", "put back in the queue: a check that had taken "
                                   "it ended before it was sent", name, logging.WARNING)
            self.index.refresh()
        # A claimed file that could not be put back yet keeps its ledger row.
        self._forget_gone(self.index)
        waits = {} if ignore_waits else retry_waits(self.db, now)
        # "Unchanged for a while" is measured by the file system's clock.
        self._settled = time.time() - STABLE_SECONDS
        batch = pick_batch(self.index.in_order(), limit or sys.maxsize, now, waits,
                           settled=self._settled)
        if not batch:
            if get_state(self.db, "login_refused"):
                self._try_login(result)     # so the state says whether the new settings work
            return result
        smtp = None
        cap = now + max(CHECK_CAP_SECONDS, self.settings.interval)
        removed: list[tuple[str, str]] = []
        self._begin_groups()
        try:
            for n, item in enumerate(batch):
                if self.stop.is_set() or (limit and self.clock() > cap):
                    break
                if smtp is None:
                    try:
                        smtp = self._connect()
                    except SenderProblem as exc:
                        result.problem = exc
                        if not isinstance(exc, SettingsRefused):     # the settings' fault
                            self._charge(batch[n:limit or n + self.settings.per_check], str(exc))
                        break
                try:
                    outcome = self._send_file(smtp, item, result)
                except SettingsRefused as exc:      # the file keeps its place, uncharged
                    result.problem = exc
                    break
                self._group_size += 1
                if (self._group_size >= self.GROUP_MESSAGES
                        or self.clock() - self._group_started >= self.GROUP_SECONDS):
                    self._flush_group(removed, relaxed=True)
                if outcome == Outcome.HELD:
                    result.held = self._cap_text()
                    # The next message does not fit today: no more connections until tomorrow.
                    set_state(self.db, daily_cap_reached=[local_day(self.clock()).isoformat(),
                                                          self.settings.max_per_day])
                    self.journal.event("daily_cap", f"{result.held} ({len(batch) - n} of this "
                                       "check's messages wait)", level=logging.WARNING)
                    break
                if outcome == Outcome.BROKEN:
                    smtp.close()
                    smtp = None
                    break
                if smtp.sock is None:       # closed after a refusal: a new one for the next
                    smtp = None
        finally:
            if smtp is not None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    smtp.quit()
                smtp.close()
            self._flush_group(removed, relaxed=False)
            self._ledger = self._outcomes = self._states = None
            self._forget_delivered(removed)
        return result

    def _begin_groups(self) -> None:
        """Read what the check needs once; commits wait for a group's flush."""
        self._ledger = sent_ledger(self.db)
        self._outcomes = all_recipient_outcomes(self.db)
        self._states = {r["file"]: dict(r) for r in retry_states(self.db).values()}
        self._to_remove, self._group_size, self._group_started = {}, 0, self.clock()
        relax_durability(self.db)

    def _flush_group(self, removed: list, relaxed: bool) -> None:
        """One flush puts the group's records on disk; then, and only then,
        its delivered files leave the queue. At the end of a check (`relaxed`
        false) it always flushes, and the connection is durable again."""
        if relaxed and not self._group_size:
            return
        if self._unrecorded:
            token = self._record_with_new_token(self._unrecorded)
            self._token = token if self._deliveries.fd is not None else None
            self._unrecorded = []
        sync_db(self.db, relaxed=relaxed)
        self._deliveries.clear()
        to_remove, self._to_remove = self._to_remove, {}
        for item, digest, note in to_remove.values():
            self._unlink(item, digest, removed, note)
        self._group_size, self._group_started = 0, self.clock()

    def _send_file(self, smtp: smtplib.SMTP, item: SpoolFile, result: CheckResult) -> str:
        """Claim one file, read it whole, send it; a file neither sent nor
        .BAD goes back in the queue under its name (one delivered waits,
        claimed, for its group's flush)."""
        taken = self._take(item, result)
        if taken is None:
            return Outcome.LATER
        held, raw = taken
        try:
            return self._send_one(smtp, held, raw, result)
        finally:
            if held.path not in self._to_remove:
                release(held.path, item.name)

    def _take(self, item: SpoolFile, result: CheckResult) -> tuple[SpoolFile, bytes] | None:
        """(the file at its claimed path, its bytes), or None when it is set
        aside (not a plain file, too large), gone, or left for a later check
        (still held open or still changing). What is at the claimed path is
        looked at (lstat) before it is opened: a link, a pipe or a device is
        set aside unread."""
        try:
            held = SpoolFile(item.name, claim(item.path), item.mtime, item.size)
        except FileNotFoundError:       # deleted from the queue meanwhile
            return None
        except (OSError, SpoolError) as exc:    # e.g. still open in another program (Windows)
            self._held(item, getattr(exc, "strerror", None) or str(exc), result)
            return None
        try:
            raw, st = read_whole(held.path, MAX_MESSAGE_BYTES)
            # The listing's time can be stale (NTFS updates it lazily while a
            # writer keeps the file open): the claimed file's own time decides.
            if st.st_mtime > self._settled:
                raise FileInUse(f"{item.name} changed a moment ago: another program is "
                                "still writing it; it is taken at a later check.")
        except NotAFile as exc:
            self._set_aside(held, f"not sent: {exc}", result)
            return None
        except (OSError, SpoolError) as exc:
            release(held.path, item.name)
            self._held(item, getattr(exc, "strerror", None) or str(exc), result)
            return None
        return held, raw

    def _send_one(self, smtp: smtplib.SMTP, item: SpoolFile, raw: bytes,
                  result: CheckResult) -> str:
        digest = hashlib.sha256(raw).hexdigest()
        if self._was_delivered(item.name, digest):
            self._remove(item, digest, "delivered before a restart; removed from the queue")
            return Outcome.SENT
        try:
            out = prepare_message(raw, self.settings.from_address, self.settings.library_name,
                                  item.mtime, item.name)
        except BadMessage as exc:
            self._set_aside(item, str(exc), result)
            return Outcome.BAD
        features = smtp.esmtp_features
        data = reencoded(out.data, "8bitmime" in features)
        if "smtputf8" not in features:
            data = ascii_headers(data)
        limit = size_limit(features)
        if limit and len(data) > limit:
            self._set_aside(item, f"the message is {megabytes(len(data))}; the SMTP server takes at "
                      f"most {megabytes(limit)} (its SIZE limit). Send the attachment another "
                      "way, or ask for a higher limit.", result)
            return Outcome.BAD
        d = Delivery(self._recipients(item.name, digest))
        pending = [a for a in out.recipients if d.before.get(a.lower(), ("",))[0] not in
                   ("sent", "refused")]
        cap = self.settings.max_per_day
        if cap and self._sent_today() + len(pending) > cap:
            if len(pending) > cap:
                self._set_aside(item, f"it has {len(pending)} recipients, more than the "
                          f"{cap} a day that [gateway] max_per_day allows", result)
                return Outcome.BAD
            return Outcome.HELD
        options = mail_options(len(data), not data.isascii(), features)
        # RFC 6531: SMTPUTF8 where an address or a header line is UTF-8.
        smtputf8 = "smtputf8" in features and not (
            all(a.isascii() for a in pending) and data.partition(b"\r\n\r\n")[0].isascii())
        self._deliver(smtp, item, digest, out, data, options, smtputf8, pending, d)
        return self._settle(item, digest, out, d, result)

    def _deliver(self, smtp: smtplib.SMTP, item: SpoolFile, digest: str, out: Outgoing,
                 data: bytes, options: list, smtputf8: bool, pending: list, d: Delivery) -> None:
        """Transactions until every pending recipient has an outcome: those
        over the server's limit per message go in the next one; each one
        that gets nobody through ends the message's turn (bounded)."""
        while pending and smtp.sock is not None:
            try:
                t = transaction(smtp, out.sender, pending, data, options, smtputf8)
            except NotHandedOver as exc:
                d.waiting.update(dict.fromkeys(pending, f"the connection to the server was lost "
                                               f"before the message was handed over ({exc})"))
                d.broken = True
                return
            except (smtplib.SMTPException, OSError) as exc:
                refusal = settings_refusal(exc, self.settings)
                if refusal:         # the settings' fault: the file keeps its place, uncharged
                    raise refusal from None
                outcome, d.reason = classify(exc)
                (d.refused if outcome == Outcome.BAD else d.waiting).update(
                    dict.fromkeys(pending, d.reason))
                d.broken = outcome == Outcome.BROKEN
                return
            if not t.accepted:
                refusal = rcpt_settings_refusal(t, self.settings)
                if refusal:
                    raise refusal
            if t.accepted:
                d.sent += list(t.accepted)
                # Crash window 2 ends here: nothing else comes first. When all
                # went well (the usual case), _settle's one commit of the ledger
                # row is the next write; otherwise the 'sent' rows are, now.
                if t.overflow or t.deferred or t.refused or d.waiting or d.refused or out.invalid:
                    with self.db:
                        record_recipients(self.db, item.name, digest, "sent", t.accepted,
                                          self.clock())
            d.waiting.update(t.deferred)
            d.refused.update(t.refused)
            pending = t.overflow if t.accepted else []
            if t.overflow and not t.accepted:
                d.waiting.update(dict.fromkeys(t.overflow, "452 too many recipients"))
        d.waiting.update(dict.fromkeys(pending, "the connection was closed after a refusal"))

    def _settle(self, item: SpoolFile, digest: str, out: Outgoing, d: Delivery,
                result: CheckResult) -> str:
        """What becomes of the file once this check's transactions are done."""
        now = self.clock()
        row = self._retry_row(item.name)
        first = row["first_failed"] if row and row["first_failed"] else now
        if d.waiting and now - first >= self.settings.give_up_seconds:
            hours = self.settings.give_up_seconds / 3600
            given_up = {a: f"not delivered after trying for {hours:g} hours; last: {r}"
                        for a, r in d.waiting.items()}
            d.refused.update(given_up)
            d.reason = next(iter(given_up.values())) if len(set(given_up.values())) == 1 else ""
            d.waiting = {}
        if d.refused:
            with self.db:
                record_recipients(self.db, item.name, digest, "refused", d.refused, now)
        outcome = self._file_outcome(item, digest, d, out, result)
        refused = dict(d.refused)
        refused.update({a: "not an email address" for a in out.invalid})
        if refused and outcome != Outcome.BAD:
            self.journal.event("refused", f"{out.subject!r}: refused {_listed(refused)}",
                               item.name, logging.WARNING)
        return Outcome.BROKEN if d.broken else outcome

    def _file_outcome(self, item: SpoolFile, digest: str, d: Delivery, out: Outgoing,
                      result: CheckResult) -> str:
        """The file waits, is set aside, or leaves the queue delivered."""
        now = self.clock()
        have_it = d.had_it() + len(d.sent)
        if d.waiting:
            if d.sent:
                self.journal.event("partly_sent", f"sent to {', '.join(d.sent)}: {out.subject!r}; "
                                   f"still waiting: {', '.join(d.waiting)}", item.name)
            with self.db:
                record_recipients(self.db, item.name, digest, "waiting", d.waiting, now)
                count_sent(self.db, local_day(now).isoformat(), len(d.sent))
            self._try_later(item, f"waiting for {_listed(d.waiting)}", result, wait=not d.broken)
            return Outcome.LATER
        if not have_it:
            self._set_aside(item, refusal_reason(d.refused, d.reason), result)
            return Outcome.BAD
        before = [a for a, (state, _) in d.before.items() if state == "sent"]
        event = self.journal.event_row(
            "sent", f"sent to {', '.join(d.sent)}: {out.subject!r}"
            + (f" ({', '.join(before)} had it already)" if before else "")
            if d.sent else f"{out.subject!r}: every recipient had it already (before a restart); "
            "removed from the queue", item.name)
        # The ledger row, the retry state, the day's count and the event, in
        # the journal's one line (or one commit), flushed to disk with its group.
        self._delivered([item.name, digest, now, local_day(now).isoformat(), len(d.sent),
                         list(event)])
        self.journal.log_row(event)
        result.sent += 1
        self._remove(item, digest)
        return Outcome.SENT

    def _delivered(self, row: list) -> None:
        """A delivery's record, the first thing written after the server's
        250: a line in the journal, or a commit when there is no journal."""
        if self._token is not None:
            try:
                self._deliveries.add(self._token, row)
            except OSError as exc:      # a full or failing disk: commits from here on
                self._deliveries.close()
                self._token = None
                log.warning("the journal of deliveries %s cannot be written (%s); each "
                            "delivery is committed instead", self._deliveries.path,
                            exc.strerror or exc)
            else:
                self._unrecorded.append(row)
                return
        with self.db:
            self._record([row])

    def _record(self, rows: list) -> None:
        """Deliveries into the database (the caller commits)."""
        if rows:
            record_deliveries(self.db, rows)
            self.journal.record([tuple(row[5]) for row in rows])

    def _sent_today(self) -> int:
        """Recipients sent to today, the group not yet recorded included."""
        today = local_day(self.clock()).isoformat()
        return sent_on(self.db, today) + sum(row[4] for row in self._unrecorded if row[3] == today)

    # -- logging in and the daily cap -----------------------------------------

    def _connect(self) -> smtplib.SMTP:
        """connect(), remembering a refused login (see login_hold) and
        forgetting it once a login works."""
        try:
            smtp = connect(self.settings, self.tokens, self.clock)
        except SettingsRefused as exc:
            if not exc.login:
                raise
            now = self.clock()
            salt = secrets.token_bytes(16)
            record = {"at": now, "reason": str(exc), "salt": salt.hex(),
                      "key": login_key(self.settings, salt)}
            set_state(self.db, login_refused=record)
            self.journal.event("login_refused", str(exc), level=logging.WARNING)
            raise SettingsRefused(login_hold_text(record), login=True) from None
        if get_state(self.db, "login_refused"):
            set_state(self.db, login_refused=None)
            self.journal.event("login", "the SMTP server takes the settings now; the refused "
                               "login is forgotten")
        return smtp

    def _try_login(self, result: CheckResult) -> None:
        """Log in and out again, after a refused login, with nothing to send."""
        try:
            smtp = self._connect()
        except SenderProblem as exc:
            result.problem = exc
            return
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.quit()
        smtp.close()

    def _day_full(self, now: float) -> bool:
        cap, today = self.settings.max_per_day, local_day(now).isoformat()
        if not cap:
            return False
        return sent_on(self.db, today) >= cap or get_state(self.db, "daily_cap_reached") == [today, cap]

    def _cap_text(self) -> str:
        return (f"daily cap of {self.settings.max_per_day} recipients reached ([gateway] "
                "max_per_day); the rest go tomorrow")

    # -- what becomes of a file -----------------------------------------------

    def _forget_gone(self, present: Container) -> None:
        """The retry state, ledger row and recipients of a file no longer
        waiting (deleted by hand, or removed just before a crash) are
        forgotten, so that a new file of the same name starts afresh instead
        of inheriting them."""
        with self.db:
            forget_absent_files(self.db, present)

    def _forget_delivered(self, removed: list) -> None:
        """The sent ledger covers a crash between the server's "250 OK" and the
        file's removal. Once the removals are on disk the rows go, so a new file
        with the same name and text (a program that reuses its names, a test
        file copied in twice) is a new message, sent again."""
        if removed:
            fsync_folder(self.settings.spool)
            with self.db:
                forget_deliveries(self.db, removed)

    def _was_delivered(self, name: str, digest: str) -> bool:
        if self._ledger is None:
            return was_delivered(self.db, name, digest)
        return (name, digest) in self._ledger

    def _recipients(self, name: str, digest: str) -> dict:
        if self._outcomes is None:
            return recipient_outcomes(self.db, name, digest)
        return self._outcomes.get((name, digest), {})

    def _retry_row(self, name: str):
        if self._states is None:
            return retry_state(self.db, name)
        return self._states.get(name)

    def _remove(self, item: SpoolFile, digest: str, note: str = "") -> None:
        """A delivered file leaves the queue once its group is on disk
        (_flush_group); until then it stays claimed."""
        self._to_remove[item.path] = (item, digest, note)

    def _unlink(self, item: SpoolFile, digest: str, removed: list, note: str = "") -> None:
        """A delivered file leaves the queue; `removed` collects it for
        _forget_delivered."""
        try:
            patiently(os.unlink, item.path)
        except FileNotFoundError:
            pass
        except (OSError, SpoolError) as exc:
            # Held open by another program (Windows): the ledger row stays, so
            # the file is not sent again, and a later check removes it.
            why = getattr(exc, "strerror", None) or str(exc)
            self.journal.event("not_removed", f"delivered, but the file cannot be removed just "
                               f"now ({why}); a later check removes it", item.name,
                               logging.WARNING)
            release(item.path, item.name)
            return
        removed.append((item.name, digest))
        if note:
            self.journal.event("removed", note, item.name)

    def _set_aside(self, item: SpoolFile, reason: str, result: CheckResult) -> None:
        """A file that can never be sent as it is becomes .BAD, with the reason."""
        try:
            bad = mark_bad(item.path, reason, self.clock(), item.name)
        except (OSError, SpoolError) as exc:
            # Never set aside again from here (a file held open, a full disk): it
            # waits, and a later check tries once more.
            why = getattr(exc, "strerror", None) or str(exc)
            self._try_later(item, f"{reason} (and it could not be renamed .BAD: {why})", result,
                            give_up=False)
            return
        with self.db:
            forget_retry_state(self.db, item.name)
            forget_recipients(self.db, item.name)
        if self._states is not None:
            self._states.pop(item.name, None)
        result.bad += 1
        self.journal.event("bad", f"renamed {bad.name}: {reason}", item.name, logging.WARNING)

    def _held(self, item: SpoolFile, why: str, result: CheckResult) -> None:
        """A file another program still holds, or still writes: left as it
        is for the next check, with no attempt counted (it was not tried)."""
        result.deferred += 1
        self.journal.event("held", f"not taken for now: {why}", item.name, logging.WARNING)

    def _try_later(self, item: SpoolFile, reason: str, result: CheckResult, wait: bool = True,
                   give_up: bool = True) -> None:
        """A temporary failure: try again later, or give up after
        give_up_after_hours (unless give_up is false: the .BAD rename failed)."""
        now = self.clock()
        row = self._retry_row(item.name)
        attempts = (row["attempts"] if row else 0) + 1
        first = row["first_failed"] if row and row["first_failed"] else now
        if give_up and now - first >= self.settings.give_up_seconds:
            hours = self.settings.give_up_seconds / 3600
            self._set_aside(item, f"not delivered after trying for {hours:g} hours; last: {reason}",
                            result)
            return
        next_try = now + retry_wait(attempts) if wait else None
        with self.db:
            save_retry_state(self.db, item.name, attempts, first, next_try, reason)
        if self._states is not None:
            self._states[item.name] = {"file": item.name, "attempts": attempts,
                                       "first_failed": first, "next_try": next_try,
                                       "last_error": reason}
        result.deferred += 1
        when = f"; next try after {time.strftime('%H:%M', time.localtime(next_try))}" if wait else ""
        self.journal.event("deferred", f"not sent for now ({reason}){when}", item.name,
                           logging.WARNING)

    def _charge(self, items: list[SpoolFile], reason: str) -> None:
        """The server could not be used: the files at the head of the queue
        count an attempt (and start their give-up clock) but keep their place."""
        result = CheckResult()
        for item in items:
            self._try_later(item, reason, result, wait=False)


# Gateway #####################################################################

#: The sender is "stuck" when no check has finished for this many times the
#: longest a check may take (the check interval, or CHECK_CAP_SECONDS if
#: longer) while messages wait: a loop that hangs, not a slow server.
STUCK_CHECKS = 3


def is_stuck(check_done: float | None, now: float, interval: float, waiting: int | None) -> bool:
    """Whether the sender has not finished a check for STUCK_CHECKS intervals while messages wait."""
    if not waiting or check_done is None:
        return False
    return now - check_done > STUCK_CHECKS * max(interval, CHECK_CAP_SECONDS)


def stuck_sentence(check_done: float | None, now: float) -> str:
    minutes = int((now - (check_done or now)) // 60)
    return (f"no check has finished for {minutes} minutes while messages wait. Restart "
            "BiblioGate; if it happens again, the log of the last check shows where it stopped.")


def local_day(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts).date()


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "never"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    except (ValueError, OSError, OverflowError):    # a file dated outside the calendar
        return "an impossible date"


class Gateway:
    """What `run` does, one tick at a time: a check when one is due, the daily
    log once a day, settings re-read when the ini changes. The clock is
    injected so tests can step through days without sleeping."""

    def __init__(self, ini_path: Path, clock: Callable[[], float] = time.time,
                 stop: threading.Event | None = None,
                 tasks: Iterable[Callable[[Gateway, float], None]] | None = None):
        self.ini_path = Path(ini_path).resolve()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.settings, created = ensure_layout(self.ini_path)
        self.journal = Journal(self.settings.database, clock)
        for line in created:
            self.journal.event("setup", line)
        self.ini_stamp = self._ini_stamp()
        self.next_check = clock()
        #: When the last check finished (the heartbeat /health and status compare with the clock).
        self.check_done = clock()
        self.sender_state: tuple[str, str] | None = None
        #: OAuth tokens, kept from check to check (in memory only).
        self.tokens = TokenCache()
        #: What is known of the spool folder, shared by the checks and the pages.
        self._index = SpoolIndex(self.settings.spool)
        #: What the loop does at every tick besides checking (see gateway_tasks).
        self.tasks: list[Callable[[Gateway, float], None]] = \
            gateway_tasks() if tasks is None else list(tasks)
        #: The config page asks from its own threads; the loop acts (see request_reload).
        self._requests = threading.Condition()
        self._reload_asked = self._reload_done = 0
        self._check_asked = False
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

    def request_reload(self, wait: float = 0.0) -> bool:
        """Ask the loop to read the settings again and restart the sender; safe
        from any thread. Waits up to `wait` seconds; True once it is done."""
        with self._requests:
            self._reload_asked += 1
            ticket = self._reload_asked
            return self._requests.wait_for(lambda: self._reload_done >= ticket, wait)

    def request_check(self) -> None:
        """Ask the loop for a check now ("send now"); safe from any thread."""
        with self._requests:
            self._check_asked = True

    def _serve_requests(self) -> None:
        with self._requests:
            ticket, check, self._check_asked = self._reload_asked, self._check_asked, False
        if ticket > self._reload_done:
            try:
                self.ini_stamp = self._ini_stamp()
                self.reload()
            finally:
                with self._requests:
                    self._reload_done = ticket
                    self._requests.notify_all()
        else:
            self.reload_if_changed()
        if check:
            self.next_check = self.clock()

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

    def spool_index(self) -> SpoolIndex:
        """The index of the spool folder now set (a new one if it changed)."""
        index = self._index
        if index.folder != self.settings.spool:
            index = self._index = SpoolIndex(self.settings.spool)
        return index

    def tick(self) -> float:
        """Do whatever is due now; returns the time of the next due thing."""
        self._serve_requests()
        now = self.clock()
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
            try:
                result = Sender(s, self.journal, self.clock, self.stop, self.tokens,
                                self.spool_index()).check()
            except SpoolError as exc:       # e.g. the folder vanished from under us
                result = CheckResult(problem=SenderProblem(str(exc), lasting=True))
            if result.problem:
                state = "stopped" if result.problem.lasting else "retrying"
                self._set_sender(state, f"{result.problem} Messages stay queued.")
            elif result.held:
                self._set_sender("paused", result.held + ".")
            elif not result.skipped:
                self._announce_settings()
            if result.sent or result.bad or result.deferred or result.problem:
                self.journal.event("check", f"check: {result.summary()}")
        self.check_done = self.clock()
        set_state(self.journal.db, last_check=now, next_check=self.next_check,
                  check_done=self.check_done)
        return result

    def stuck(self, waiting: int | None) -> bool:
        return is_stuck(self.check_done, self.clock(), self.settings.interval, waiting)

    def run_forever(self, guard: RunGuard | None = None) -> None:
        """Tick until stopped; with a guard, an error in a tick is the guard's
        to log (and, repeated, to stop on) instead of ending the loop."""
        self.check_done = self.clock()
        set_state(self.journal.db, run_pid=os.getpid(), run_started=self.clock(),
                  check_done=self.check_done)
        remove_stale_parts(self.settings.spool, self.clock())
        tick = guard.tick if guard else self.tick
        while not self.stop.is_set():
            due = tick()
            self.stop.wait(max(0.05, min(TICK_SECONDS, due - self.clock())))


#: An absence of `run` (the server off or asleep, BiblioGate stopped) this
#: long or longer is named in the daily log; a restart by the task is shorter.
GAP_SECONDS = 10 * 60
#: `run` notes that it is alive in the database this often, so that the next
#: start can tell how long it was away.
ALIVE_EVERY = 60
#: After an absence the daily logs of the missed days are sent, this many at most.
DAILY_LOG_DAYS_BACK = 7
#: The absences kept for the daily logs (newest last).
GAPS_KEPT = 50


class Heartbeat:
    """A `run` task: notice an absence, ended now: the previous `run` last
    noted it was alive long ago, or the clock jumped (the server slept).
    Each absence is kept (state `gaps`) for the daily logs of its days."""

    def __init__(self) -> None:
        self.last: float | None = None      #: the previous tick
        self.saved: float | None = None     #: when alive_at was last written

    def __call__(self, gateway: Gateway, now: float) -> None:
        db = gateway.journal.db
        last = self.last if self.last is not None else get_state(db, "alive_at")
        if last is not None and now - last >= GAP_SECONDS:
            gaps = (get_state(db, "gaps") or [])[-(GAPS_KEPT - 1):] + [[last, now]]
            set_state(db, gaps=gaps)
            gateway.journal.event("not_running", f"BiblioGate was not running "
                                  f"{gap_text(last, now)}", level=logging.WARNING)
        if self.saved is None or not 0 <= now - self.saved < ALIVE_EVERY:
            set_state(db, alive_at=now)
            self.saved = now
        self.last = now


def gap_text(start: float, end: float) -> str:
    """'from Tue 2026-03-03 10:02 to Fri 2026-03-06 08:55'"""
    def when(ts):
        return time.strftime("%a %Y-%m-%d %H:%M", time.localtime(ts))
    return f"from {when(start)} to {when(end)}"


def days_to_report(done: str, yesterday: str) -> tuple[list[str], list[str]]:
    """The days whose daily log is due (after `done`, up to yesterday), at
    most DAILY_LOG_DAYS_BACK of the latest, and the older ones left out."""
    first, last = dt.date.fromisoformat(done), dt.date.fromisoformat(yesterday)
    days = [(first + dt.timedelta(days=n)).isoformat() for n in range(1, (last - first).days + 1)]
    return days[-DAILY_LOG_DAYS_BACK:], days[:-DAILY_LOG_DAYS_BACK]


def daily_log_task(gateway: Gateway, now: float) -> None:
    """Once a day, after midnight, queue the previous day's log to
    from_address; after an absence, the log of every missed day (a week at
    most), each saying when BiblioGate was not running."""
    db = gateway.journal.db
    yesterday = (local_day(now) - dt.timedelta(days=1)).isoformat()
    done = get_state(db, "daily_log_for")
    if done is None:            # first start: there is no earlier day to report
        set_state(db, daily_log_for=yesterday)
        return
    s = gateway.settings
    if done >= yesterday or not valid_address(s.from_address):
        return
    days, skipped = days_to_report(done, yesterday)
    if skipped:
        gateway.journal.event("daily_log", f"the daily logs for {skipped[0]} to {skipped[-1]} "
                              f"are not mailed (more than {DAILY_LOG_DAYS_BACK} days ago); "
                              f"{s.log_folder} has them", level=logging.WARNING)
    for day in days:
        try:
            subject, body = load_template(s, "daily_log").fill(daily_summary(gateway, day))
            data = compose(s, s.from_address, subject, body, now=now)
            path = enqueue_bytes(s.spool, data, now, priority=True, label=f"daily-log-{day}")
        except (BibliogateError, KeyError, ValueError) as exc:
            gateway.journal.event("daily_log", f"the daily log for {day} could not be "
                                  f"queued: {exc}", level=logging.ERROR)
            return
        set_state(db, daily_log_for=day)
        gateway.journal.event("daily_log", f"queued the daily log for {day}", path.name)
    prune_logs(s.log_folder, s.keep_log_days, now)
    with db:
        db.execute("DELETE FROM events WHERE at < ?", (now - s.keep_log_days * 86400,))
        prune_sent_ledger(db, now - SENT_LEDGER_DAYS * 86400)


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
    index = gateway.spool_index()
    index.refresh()
    with index.lock:
        waiting, bad_now = len(index.waiting), len(index.bad)
        oldest = min(index.waiting.values(), default=None)
    other = [r for r in rows if r["kind"] not in ("sent", "bad", "deferred", "refused", "check",
                                                  "not_running")]
    start = dt.datetime.combine(dt.date.fromisoformat(day), dt.time()).timestamp()
    end = start + 86400
    absences = [f"not running {gap_text(a, b)}" for a, b in get_state(journal.db, "gaps") or []
                if a < end and b > start]
    needs, lines = day_digest(gateway, day, by_kind, bad_now)
    lines += [f"BiblioGate was {absence}." for absence in absences]
    return {
        "attention": f"ACTION NEEDED: {'; '.join(needs)}. " if needs else "",
        "summary": "In short:\n" + _bullets(lines + [f"Needs you: {x}." for x in needs]
                                            or ["Nothing happened, and nothing needs you."]),
        "library_name": s.library_name or "library", "day": day,
        "sent_count": len(by_kind.get("sent", [])), "bad_count": len(by_kind.get("bad", [])),
        "deferred_count": len(by_kind.get("deferred", [])),
        "waiting_count": waiting, "waiting_bad_count": bad_now,
        "oldest_waiting": fmt_time(oldest) if oldest else "none",
        "bad_list": _bullets([f"{r['file']}: {r['detail']}" for r in by_kind.get("bad", [])]),
        "refused_list": _bullets([f"{r['file']}: {r['detail']}" for r in by_kind.get("refused", [])]),
        "sender_stops": _bullets(absences + [f"{fmt_time(r['at'])[11:]} {r['detail']}"
                                             for r in by_kind.get("sender_stopped", [])]),
        "activity": _bullets([f"{fmt_time(r['at'])[11:]} {r['detail']}" for r in other]),
        "log_lines": (f"  (the first {len(rows) - DAILY_LOG_LINES} lines are left out here; "
                      f"logs/bibliogate-{day}.log has them all)\n" if len(rows) > DAILY_LOG_LINES
                      else "")
        + _bullets([f"{fmt_time(r['at'])[11:]} {r['file'] + ': ' if r['file'] else ''}"
                    f"{r['detail']}" for r in rows[-DAILY_LOG_LINES:]]),
    }


def day_digest(gateway: Gateway, day: str, by_kind: dict, bad_now: int) -> tuple[list, list]:
    """(what needs the librarian, the day in plain lines) for the daily log."""
    s = gateway.settings
    needs: list[str] = []
    lines = [f"{_plural(len(by_kind.get('sent', [])), 'message')} sent."]
    if by_kind.get("bad"):
        lines.append(f"{_plural(len(by_kind['bad']), 'message')} could not be sent: the "
                     "details below say why.")
    lines += overdue_digest(gateway.journal.db, s, day, by_kind, needs)
    if by_kind.get("import_failed"):
        needs.append(f"{_plural(len(by_kind['import_failed']), 'import')} of circulation "
                     "data failed (see the details)")
    if bad_now:         # the subject counts them already ("1 failed")
        lines.append(f".BAD files waiting for you: {bad_now} (the Queue page lists them, "
                     "with the reason; retry or delete each).")
    if s.problems:
        needs.append("the settings need attention, so nothing is sent (the Settings page "
                     "says what to change)")
    return needs, lines


# Running unattended ##########################################################
#
# Two things keep a `run` that nobody watches honest: ConsoleLog (with no
# console, as under pythonw.exe, what would be printed goes to logs/) and
# RunGuard (an unexpected error is logged with its traceback; one that ends a
# thread, or comes back tick after tick, ends `run` with status 1 so that the
# scheduled task or systemd starts it afresh).

#: The same unexpected error this many ticks in a row ends `run` (status 1).
TICK_ERROR_LIMIT = 10


class ConsoleLog:
    """Stands in for sys.stdout and sys.stderr when there is no console
    (pythonw.exe, as the scheduled task starts BiblioGate): every line that
    would have been printed goes to the day's file in the log folder."""

    encoding, errors = "utf-8", "strict"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._append(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._append(self._partial)
                self._partial = ""

    def isatty(self) -> bool:
        return False

    def _append(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        # With no console and no writable log folder, there is nowhere left to tell.
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f"bibliogate-{stamp[:10]}.log", "a", encoding="utf-8") as fh:
                fh.write(f"{stamp} CONSOLE {line.rstrip()}\n")


def console_to_log(folder: Path) -> None:
    """With no console, send print() and error messages to the log folder.
    Called again once the settings have named the log folder."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, ConsoleLog(folder))
        elif isinstance(stream, ConsoleLog):
            stream.folder = Path(folder)


def safe_output() -> None:
    """print() never fails on a character the console or a redirected file
    cannot show: Windows writes redirected output in the ANSI code page
    (cp1252, strict), and a patron called Łukasz ended `letters` with a
    UnicodeEncodeError after the letters were queued. Such a character is
    written as \\u0141 instead; the encoding itself is left as chosen."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):    # a closed or odd stream
                stream.reconfigure(errors="backslashreplace")


def has_console() -> bool:
    return sys.stderr is not None and not isinstance(sys.stderr, ConsoleLog)


def early_log_folder(argv: list[str]) -> Path:
    """Where messages go before the settings are read: `logs` beside the ini
    that --config names, or beside this program."""
    ini = Path(__file__).resolve().with_name("bibliogate.ini")
    for n, arg in enumerate(argv):
        if arg == "--config" and n + 1 < len(argv):
            ini = Path(argv[n + 1])
        elif arg.startswith("--config="):
            ini = Path(arg.partition("=")[2])
    return ini.resolve().parent / DEFAULTS["data"]["log_folder"]


def error_summary(exc: BaseException) -> str:
    """The error and where it happened, on one line:
    "KeyError: 'x' (bibliogate.py line 1234, in tick)"."""
    import traceback
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name} line {frames[-1].lineno}, in {frames[-1].name})" \
        if frames else ""
    return one_line(f"{type(exc).__name__}: {exc}{where}")


def traceback_text(exc: BaseException) -> str:
    import traceback
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


class RunGuard:
    """Keeps an unattended `run` honest. An unexpected error in one tick is
    logged with its traceback and recorded (an "error" event), and the loop
    goes on at the next tick. The same error TICK_ERROR_LIMIT ticks in a row,
    or any error that ends a thread, is recorded as a "crash" (the daily log
    shows it) and stops `run` with exit status 1, so that the scheduled task
    or systemd starts it afresh: never a silent dead thread."""

    def __init__(self, gateway: Gateway, limit: int | None = None):
        self.gateway, self.limit = gateway, limit or TICK_ERROR_LIMIT
        self.exit_status = 0
        self.repeats = 0            #: ticks in a row that failed with the same error
        self._last: str | None = None
        self._thread_hook = threading.excepthook

    def install(self) -> RunGuard:
        """Guard every thread: an error that ends one is a crash. (The ticks
        are guarded by passing the guard to Gateway.run_forever; an error in
        the main thread reaches cmd_run, which calls crash.)"""
        threading.excepthook = self._thread_error
        return self

    def uninstall(self) -> None:
        threading.excepthook = self._thread_hook

    def __enter__(self) -> RunGuard:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def tick(self) -> float:
        """One tick of the gateway; an error in it is logged, and `run` goes on."""
        try:
            due = self.gateway.tick()
        except Exception as exc:        # a bug or an unforeseen OS error: logged; `run` goes on
            self._tick_failed(exc)
            return self.gateway.clock() + TICK_SECONDS
        self._last, self.repeats = None, 0
        return due

    def _tick_failed(self, exc: Exception) -> None:
        summary = error_summary(exc)
        self.repeats = self.repeats + 1 if summary == self._last else 1
        self._last = summary
        if self.repeats >= self.limit:
            self.crash(f"the same error {self.repeats} times in a row: {summary}; BiblioGate "
                       "stops so that it is started afresh", exc)
        elif self.repeats == 1:
            self.gateway.journal.event("error", f"unexpected error, the gateway goes on: {summary}",
                                       level=logging.ERROR)
            log.error("%s", traceback_text(exc), extra=TRACEBACK)
        else:
            log.error("the same error again (%d in a row): %s", self.repeats, summary)

    def crash(self, what: str, exc: BaseException) -> None:
        """Record an error that ends `run`, with its traceback, and stop `run`
        with exit status 1."""
        self.exit_status = 1
        try:
            self.gateway.journal.event("crash", what, level=logging.CRITICAL)
            log.critical("%s", traceback_text(exc), extra=TRACEBACK)
        except Exception:   # the log itself fails: stderr (or ConsoleLog) is all that is left
            print(f"{what}\n{traceback_text(exc)}", file=sys.stderr)
        finally:
            self.gateway.stop.set()

    def _thread_error(self, args) -> None:
        if issubclass(args.exc_type, SystemExit):
            return
        exc = args.exc_value if args.exc_value is not None else args.exc_type()
        name = args.thread.name if args.thread is not None else "?"
        self.crash(f"the thread {name!r} stopped on an unexpected error: {error_summary(exc)}", exc)


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
    "patrons": ("patron_id", "name", "email", "guardian_email", "group", "auto_overdue",
                "first_name"),
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
#: Rows go to the database in slices of this many, so a million loans never
#: sit in memory at once.
IMPORT_CHUNK = 20_000
#: Rows of a slice that need no look one by one go to sqlite this many to a
#: statement (one statement of many rows: a quarter less time than one each).
ROWS_PER_INSERT = 50
#: sqlite's page cache while importing, in KiB (its default is 2 MB; a
#: million loans and their indexes go several times faster with more; more
#: than 16 MB bought no speed and cost 70 MB of memory).
IMPORT_CACHE_KB = 16 * 1024
#: A progress line after this many rows, then every PROGRESS_EVERY rows.
PROGRESS_FIRST, PROGRESS_EVERY = 5_000, 100_000
#: The state key holding when the loans snapshot was imported (a timestamp).
LOANS_IMPORTED_KEY = "loans_imported_at"
#: A CSV line longer than this is not an export of a library system: the
#: file is refused without reading the rest (a 10 GB line would fill memory).
MAX_CSV_LINE = 1024 * 1024
#: A larger dropped CSV file is refused before it is opened (a million loans
#: take about 100 MB).
MAX_CSV_BYTES = 2 * 1024 ** 3
#: [data] csv_encoding values: auto is UTF-8 (with or without a BOM), else
#: cp1252, what Excel's "CSV (Comma delimited)" writes on a Windows PC.
CSV_ENCODINGS = ("auto", "utf-8", "cp1252")
#: What a refused file may show of itself in logs and mails: this many characters.
EXCERPT_CHARS = 40
#: The file names the import folder watches for (any case), in import order:
#: patrons first, so the loans of a new patron in the same drop are known.
DROPPED_FILES = (("patrons.csv", "patrons"), ("loans.csv", "loans"))


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
    kept_edits: int = 0         #: patron values changed on the config page, kept

    def summary(self) -> str:
        removed = f"{self.removed:,} removed" + (" (returned)" if self.what == "loans" else "")
        kept = (f" Kept {self.kept_edits:,} change(s) made on the config page (email, guardian "
                "email or auto-overdue), as the file still has the values they replaced."
                if self.kept_edits else "")
        return (f"{self.source}: {self.rows - len(self.skipped):,} {self.what} imported: "
                f"{self.added:,} added, {self.updated:,} updated, {self.unchanged:,} unchanged, "
                f"{removed}, {len(self.skipped):,} skipped.{kept}")


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
    return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def excerpt(text) -> str:
    """A short, escaped quotation of a refused file's line: nothing more of
    such a file goes into logs or mails."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    text = text.strip()
    short = text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else "")
    return ascii(short)


def csv_bytes_problem(fh, encoding: str) -> tuple[int, str] | None:
    """(line, what) of the first line of a binary file that is not
    `encoding` text or is longer than MAX_CSV_LINE; None if there is none.
    Reads in slices of 1 MB, so a file of any size costs little memory."""
    line, run, carry = 1, 0, b""
    while True:
        chunk = fh.read(1 << 20)
        data = carry + chunk
        if not data:
            return None
        carry = b""
        try:
            data.decode(encoding)
        except UnicodeDecodeError as exc:
            if chunk and exc.reason == "unexpected end of data":   # a character cut in two
                data, carry = data[:exc.start], data[exc.start:]
            else:
                at = line + data.count(b"\n", 0, exc.start)
                start = data.rfind(b"\n", 0, exc.start) + 1
                return at, f"byte 0x{data[exc.start]:02X} {excerpt(data[start:exc.start + 1])}"
        # A line between two line ends inside one slice is shorter than the
        # slice; only the one running on from the slice before can be longer.
        first, last = data.find(b"\n"), data.rfind(b"\n")
        if run + (first if first >= 0 else len(data)) > MAX_CSV_LINE:
            return line, f"longer than {MAX_CSV_LINE:,} bytes"
        run = len(data) - last - 1 if last >= 0 else run + len(data)
        line += data.count(b"\n")


def csv_encoding(fh, source: str, wanted: str, notes: list) -> str:
    """The encoding to read a CSV file with ([data] csv_encoding): checked
    over the whole file first, so that a bad byte names its own line. Raises
    ImportRefused for a file that is neither, or has an overlong line."""
    tried = ["utf-8", "cp1252"] if wanted == "auto" else [wanted]
    found: list[tuple[int, str]] = []
    for n, encoding in enumerate(tried):
        fh.seek(0)
        problem = csv_bytes_problem(fh, encoding)
        if problem is None:
            fh.seek(0)
            if n:
                notes.append(f"{source} is not UTF-8: read as Windows-1252 (cp1252), what "
                             "Excel's 'CSV (Comma delimited)' writes.")
            return "utf-8-sig" if encoding == "utf-8" else encoding
        if "longer than" in problem[1]:
            raise ImportRefused(source, [f"{source} line {problem[0]}: {problem[1]}; this is "
                                         "not a CSV export."],
                                "Export the file again from the library system; nothing was "
                                "imported.")
        found.append(problem)
    names = {"utf-8": "UTF-8", "cp1252": "Windows-1252 (cp1252)"}
    what = " nor ".join(names[e] for e in tried)
    line, detail = found[0]             # the first encoding's: the one the file should be in
    raise ImportRefused(source, [f"{source} line {line}: this is not {what} text ({detail})."],
                        "In Excel, use Save As and choose 'CSV UTF-8 (Comma delimited)', or set "
                        "[data] csv_encoding to the file's encoding; nothing was imported.")


def open_csv(path: Path, source: str, encoding: str = "auto",
             notes: list | None = None) -> io.TextIOWrapper:
    """The file as text, UTF-8 with or without a BOM, or cp1252 (see
    csv_encoding; a note saying so goes to `notes`). The file is checked
    before it is opened (a plain file, not a link). Raises ImportRefused for
    a file that cannot be opened or read as text."""
    notes = [] if notes is None else notes
    try:
        raw = open_regular(path, MAX_CSV_BYTES)
    except NotAFile as exc:
        raise ImportRefused(source, [f"{source} was not read: {exc}"],
                            "Drop a plain CSV file instead; nothing was imported.") from None
    except (OSError, SpoolError) as exc:
        raise ImportRefused(source, [f"{source} cannot be opened: "
                                     f"{getattr(exc, 'strerror', None) or exc}."],
                            "Check the file name, and that no other program has it open.") from None
    try:
        return io.TextIOWrapper(raw, encoding=csv_encoding(raw, source, encoding, notes),
                                newline="")
    except BaseException:
        raw.close()
        raise


def csv_reader(fh: io.TextIOWrapper):
    """A csv reader of fh, the delimiter read from the first line; no line
    is read longer than MAX_CSV_LINE."""
    first = fh.readline(MAX_CSV_LINE + 2)
    lines = iter(lambda: fh.readline(MAX_CSV_LINE + 2), "")
    return csv.reader(itertools.chain([first], lines), delimiter=sniff_delimiter(first))


def csv_error_sentence(exc: csv.Error) -> str:
    """What the csv module could not read, said so that the fix shows."""
    if "field larger than field limit" in str(exc):
        return (f"cannot be read as CSV: a value is longer than {csv.field_size_limit():,} "
                "characters (is a closing '\"' missing on this line?).")
    if "line contains NUL" in str(exc):         # Python 3.9 and 3.10; see NUL_SENTENCE
        return NUL_SENTENCE
    return f"cannot be read as CSV ({exc})."


#: A record holding a zero byte: Python before 3.11 cannot read it, later
#: ones can; Loader refuses it as unread (its key not held) so that every
#: version says and does the same.
NUL_SENTENCE = ("cannot be read as CSV: it holds a NUL character (a zero byte). Is the file "
                "damaged, or saved as UTF-16? Save it again as CSV.")


def has_nul(values: list) -> bool:
    return any(value and "\0" in value for value in values)


def control_problem(column: str, value: str) -> list[str]:
    """A key (patron_id, barcode) with a control character is refused: it
    could never be typed or scanned to match, and shows garbled."""
    if value.isprintable() or not _CONTROL_RE.search(value):
        return []
    return [f"{column} {printable(value)} holds a control character (a tab, a line end or "
            "another invisible one); correct it in the library system and export again."]


def csv_records(reader) -> Iterator[tuple[int, list | str]]:
    """(first line number, fields) of every record the reader has still to
    read, the header first; blank lines are left out and a record the csv
    module cannot read comes as (line, reason)."""
    end = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if reader.line_num <= end:      # nothing consumed: cannot go on
                yield end + 1, csv_error_sentence(exc)
                return
            start, end = end + 1, reader.line_num
            yield start, csv_error_sentence(exc) + lines_lost(start, end)
            continue
        start, end = end + 1, reader.line_num
        if not blank(fields):
            yield start, fields


def lines_lost(first: int, last: int) -> str:
    """What a refused record spanning several lines takes with it (an unclosed
    quote swallows the lines after it): said, so that no loan leaves quietly."""
    return "" if last <= first else (f" Lines {first} to {last} were read as this one "
                                     "record, and none of them is imported.")


def blank(fields: list) -> bool:
    """A record of nothing but separators and spaces: a blank line."""
    return not fields or not (fields[0].strip() or any(field.strip() for field in fields))


def header_columns(what: str, source: str, line: int, fields: list[str]) -> tuple[list, list]:
    """The position of each known column (None if absent) and notes about
    ignored ones. Raises ImportRefused for a missing or repeated column."""
    names = [column_name(f) for f in fields]
    known = CSV_COLUMNS[what]
    problems: list[str] = []
    where: dict[str, int] = {}
    for n, name in enumerate(names):
        if name in known and name in where:
            problems.append(f"{source} line {line}: the column {name} appears twice.")
        where.setdefault(name, n)
    missing = [c for c in REQUIRED_COLUMNS[what] if c not in where]
    if missing:
        found = excerpt(", ".join(f.strip() for f in fields if f.strip())) \
            if any(f.strip() for f in fields) else "nothing"
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
    guardian_email, grp, auto_overdue, first_name), with None for a column the
    file lacks. The rows wait in a temporary table (patrons absent from the
    file stay, so the file is merged into patrons, not put in its place)."""

    key = "patron_id"
    table = "temp.incoming"
    columns = ("patron_id", "name", "email", "guardian_email", "grp", "auto_overdue",
               "first_name")
    stage_sql = ("CREATE TEMP TABLE incoming (patron_id TEXT PRIMARY KEY, name TEXT, "
                 "email TEXT, guardian_email TEXT, grp TEXT, auto_overdue INTEGER, "
                 "first_name TEXT)")

    #: where each of the table's columns is among the file's (CSV_COLUMNS order)
    order = (0, 1, 2, 3, 4, 5, 6)
    #: the file's columns (CSV_COLUMNS order) in which quick() refuses a NUL
    #: itself: Loader looks for one only in the others (see NUL_SENTENCE)
    nul_refused = (0, 1, 2, 3, 5, 6)

    def __init__(self, conn: sqlite3.Connection, settings: Settings):
        pass

    def quick(self, rows: list, at: list, suspect) -> tuple | None:
        """The rows of a slice, ready for the table (rows, values to a row,
        where each column is) when every value passes check() as it is read,
        with nothing to change but auto_overdue to 1 or 0; None when a row
        must be looked at alone (see Loader.careful)."""
        columns = list(zip(*rows))
        pid, name, email, guardian, group, flag, given = (
            columns[p] if p is not None else None for p in at)
        if not (pid is not None and plain(list(pid)) and filled(name) and one_line_all(name)):
            return None
        for addresses in (email, guardian):
            if addresses is not None and not all(map(ADDRESS_RE.fullmatch,
                                                     filter(None, addresses))):
                return None
        if (group is not None and not trimmed(group)) or \
                (given is not None and not one_line_all(given)):
            return None
        if flag is not None:
            flags = {text: YES_NO.get(text.lower()) for text in set(flag)}
            if None in flags.values():
                return None
            flag = tuple(map(flags.__getitem__, flag))
        absent = itertools.repeat(None)
        table = [c if c is not None else absent
                 for c in (pid, name, email, guardian, group, flag, given)]
        return list(zip(*table)), len(table), tuple(range(len(table)))

    def review(self, conn: sqlite3.Connection, loader: Loader) -> None:
        """Nothing to look at again: quick() passes only rows check() would."""

    def check(self, values: list, line: int) -> tuple[tuple | None, list[str]]:
        """The row, or None and its problems (a repeated patron_id apart:
        sqlite finds those, see Loader)."""
        pid, name, email, guardian, group, flag, given = values
        problems = control_problem("patron_id", pid)
        if not pid:
            problems.append("no patron_id.")
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
        given = one_line(given) if given is not None else None
        return (None if problems else (pid, name, email, guardian, group, flag, given)), problems

    def apply(self, conn: sqlite3.Connection, result: ImportResult, now: float) -> None:
        """Add and update (inside the caller's transaction). An email or
        auto-overdue tick changed on the config page is kept while the file
        still has the value the edit replaced (keep_patron_edits)."""
        result.kept_edits = keep_patron_edits(conn, "temp.incoming")
        same = ("p.patron_id IS NOT NULL AND p.name IS i.name "
                "AND p.first_name IS coalesce(i.first_name, p.first_name) "
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
                     "grp, auto_overdue, first_name) SELECT i.patron_id, i.name, "
                     "coalesce(i.email, p.email, ''), coalesce(i.guardian_email, p.guardian_email, ''), "
                     "coalesce(i.grp, p.grp, ''), coalesce(i.auto_overdue, p.auto_overdue, 0), "
                     f"coalesce(i.first_name, p.first_name, '') {joined} WHERE NOT ({same})")


class LoanRows:
    """Checks loans.csv rows; a row becomes (barcode, patron_id, title,
    due_date as ISO). The rows are written once, into a new loans table in
    the database, which takes the old one's place when all is well."""

    key = "barcode"
    table = "loans_incoming"
    columns = ("barcode", "patron_id", "title", "due_date")
    stage_sql = ("CREATE TABLE loans_incoming (barcode TEXT PRIMARY KEY, patron_id TEXT NOT "
                 "NULL, title TEXT NOT NULL, due_date TEXT NOT NULL)")

    #: where each of the table's columns is among the file's (CSV_COLUMNS order)
    order = (1, 0, 2, 3)
    #: the file's columns in which quick() refuses a NUL itself (see PatronRows)
    nul_refused = (1, 2)

    def __init__(self, conn: sqlite3.Connection, settings: Settings):
        self.date_format = settings.date_format
        self.example = dt.date.today().strftime(settings.date_format)
        #: one set of the patrons' ids (bounded by the patrons, not the file)
        self.patrons = {row[0] for row in conn.execute("SELECT patron_id FROM patrons")}

    def quick(self, rows: list, at: list, suspect) -> tuple | None:
        """The rows of a slice, ready for the table (rows, values to a row,
        where each column is), when each barcode and title passes check()
        as it is read; None when a row must be looked at alone (see
        Loader.careful). Patron ids not in the patrons list and due dates
        that are no date are passed to suspect(): review() looks at their
        rows again once all are written (they are few, or the file is bad)."""
        pid_at, barcode_at, title_at, due_at = at
        if not (plain(list(map(operator.itemgetter(barcode_at), rows)))
                and plain(list(map(operator.itemgetter(title_at), rows)))):
            return None
        ids = set(map(operator.itemgetter(pid_at), rows))
        if not ids <= self.patrons:
            suspect("patron_id", ids - self.patrons)
        dates = {text: read_date(text, self.date_format) if text == text.strip() else None
                 for text in set(map(operator.itemgetter(due_at), rows))}
        wrong = [text for text, iso in dates.items() if iso is None]
        if wrong:
            suspect("due_date", wrong)
        if all(iso == text for text, iso in dates.items() if iso is not None):
            return rows, len(rows[0]), (barcode_at, pid_at, title_at, due_at)
        # Dates in [library] date_format: written as ISO dates.
        converted = [(r[barcode_at], r[pid_at], r[title_at], dates[r[due_at]] or r[due_at])
                     for r in rows]
        return converted, 4, (0, 1, 2, 3)

    def review(self, conn: sqlite3.Connection, loader: Loader) -> None:
        """Check again, one by one, the rows of the patron ids and dates
        quick() found suspect: a good one is put right (spaces around a
        value), a bad one taken out and its problems noted."""
        suspects = ("WHERE rowid > ? AND (patron_id IN (SELECT value FROM temp.import_suspects "
                    "WHERE col = 'patron_id') OR due_date IN (SELECT value FROM "
                    "temp.import_suspects WHERE col = 'due_date')) ORDER BY rowid LIMIT 5000")
        last = 0
        while True:
            rows = conn.execute("SELECT rowid, patron_id, barcode, title, due_date FROM "
                                f"loans_incoming {suspects}", (last,)).fetchall()
            if not rows:
                return
            with conn:
                for line, pid, barcode, title, due in rows:
                    values = [v.strip() for v in (pid, barcode, title, due)]
                    row, problems = self.check(values, line)
                    if row is None:
                        conn.execute("DELETE FROM loans_incoming WHERE rowid = ?", (line,))
                        loader.problem(line, problems)
                    elif row != (barcode, pid, title, due):
                        conn.execute("UPDATE loans_incoming SET patron_id = ?, title = ?, "
                                     "due_date = ? WHERE rowid = ?", (*row[1:], line))
            last = rows[-1][0]

    def check(self, values: list, line: int) -> tuple[tuple | None, list[str]]:
        """The row, or None and its problems (a repeated barcode apart:
        sqlite finds those, see Loader)."""
        pid, barcode, title, due = values
        due_date = read_date(due, self.date_format)
        problems = control_problem("barcode", barcode)
        if barcode and title and due_date and pid in self.patrons and not problems:   # at speed
            return (barcode, pid, title if title.isprintable() else one_line(title), due_date), []
        if not barcode:
            problems.append("no barcode.")
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
        """Put the new snapshot in the old one's place (inside the caller's
        transaction): the rows were written once, into loans_incoming; its
        indexes are built after them, several times faster than keeping them
        up to date row by row."""
        before = conn.execute("SELECT count(*) FROM loans").fetchone()[0]
        same = "l.patron_id = i.patron_id AND l.title = i.title AND l.due_date = i.due_date"
        if before:
            total, added, unchanged = conn.execute(
                f"SELECT count(*), total(l.barcode IS NULL), total({same}) "
                "FROM loans_incoming i LEFT JOIN loans l ON l.barcode = i.barcode").fetchone()
        else:                       # the first snapshot: each loan is new
            total = added = conn.execute("SELECT count(*) FROM loans_incoming").fetchone()[0]
            unchanged = 0
        result.added, result.unchanged = int(added), int(unchanged)
        result.updated = total - result.added - result.unchanged
        result.removed = before - (total - result.added)
        indexes = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' "
                               "AND tbl_name = 'loans' AND sql IS NOT NULL").fetchall()
        conn.execute("DROP TABLE loans")
        conn.execute("ALTER TABLE loans_incoming RENAME TO loans")
        for (sql,) in indexes:
            conn.execute(sql)
        conn.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                     (LOANS_IMPORTED_KEY, json.dumps(now)))


ROW_CHECKERS: Mapping[str, type[PatronRows] | type[LoanRows]] = MappingProxyType(
    {"patrons": PatronRows, "loans": LoanRows})
#: Two imports at once wait for each other this long, at most.
IMPORT_LOCK_WAIT = 60.0


def import_lock(settings: Settings, source: str) -> FileLock:
    """The lock one import holds from its first row to its last write (the
    new loans table has one name). Waits up to IMPORT_LOCK_WAIT for
    another import to finish; raises ImportRefused after that."""
    lock = FileLock(settings.database.with_name(".bibliogate-import.lock"))
    deadline = time.monotonic() + IMPORT_LOCK_WAIT
    while not lock.acquire():
        if time.monotonic() > deadline:
            raise ImportRefused(source, [f"{source} was not read: another import has been "
                                         "going on for over a minute."],
                                "Import it again when that one has finished; nothing was "
                                "imported.")
        time.sleep(0.2)
    return lock


def import_csv(settings: Settings, what: str, path: Path, skip_bad: bool = False,
               progress: Callable[[str, int], None] | None = None,
               now: float | None = None, source: str | None = None) -> ImportResult:
    """Import a patrons or loans CSV file into the database.

    Every row is checked and written once, into a table of its own (see
    stage); then, in one transaction, that table is applied. Raises
    ImportRefused, with nothing changed, for a file or header that cannot be
    read, or for bad rows unless skip_bad (then they are left out and listed
    in ``skipped``). progress(source, rows) is called now and then on long
    files."""
    path, now = Path(path), time.time() if now is None else now
    source = source or path.name
    lock = import_lock(settings, source)
    conn = open_db(settings.database)
    conn.execute(f"PRAGMA cache_size = -{IMPORT_CACHE_KB}")
    try:
        result = ImportResult(what, source)
        checker = stage(conn, settings, what, path, result, progress, source)
        if result.skipped and not skip_bad:
            raise ImportRefused(source, result.skipped,
                                f"Nothing was imported. Correct these rows and import {source} "
                                "again, or add --skip-bad to import the other rows.")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")     # one transaction: all of it or nothing
        try:
            checker.apply(conn, result, now)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return result
    finally:
        with contextlib.suppress(sqlite3.Error):
            with conn:
                conn.execute("DROP TABLE IF EXISTS loans_incoming")    # a refused file's rows
        conn.close()
        lock.release()


def stage(conn: sqlite3.Connection, settings: Settings, what: str, path: Path,
          result: ImportResult, progress, source: str | None = None) -> PatronRows | LoanRows:
    """Read, check and write every row into the checker's table; bad rows
    go to result.skipped, in the order of their lines.

    The file is read in slices (see Loader): a slice whose values all pass
    the checks as they stand, column by column, is written as it is, many
    rows to a statement; any other slice row by row, each row checked alone,
    as are the rows review() finds suspect once all are written. The
    table's key (barcode, patron_id) is unique and each row's rowid is its
    line: sqlite finds a repeated key and says on which line it first came,
    so no set of the file's keys is held in memory. Each slice is committed
    without a flush to disk (only the last transaction must be durable), so
    the database stays free for the sender while a long file is read."""
    source = source or path.name
    with open_csv(path, source, settings.csv_encoding, result.notes) as fh:
        reader = csv_reader(fh)
        first = next(csv_records(reader), None)
        columns = ", ".join(CSV_COLUMNS[what])
        if first is None:
            raise ImportRefused(source, [f"{source} is empty."], f"It needs a first line naming "
                                f"the columns {columns}, then one line for each of the {what}.")
        line, header = first
        if isinstance(header, str):
            raise ImportRefused(source, [f"{source} line {line}: {header}"],
                                f"The first line must name the columns {columns}.")
        positions, notes = header_columns(what, source, line, header)
        result.notes += notes
        checker = ROW_CHECKERS[what](conn, settings)
        conn.execute("PRAGMA synchronous = NORMAL")
        loader = Loader(conn, checker, result, positions, len(header), progress, source)
        try:
            loader.slices(reader)
            quick = True
        except (csv.Error, LinesUnknown):
            quick = False       # a record the csv module cannot read: its slice is lost
    if not quick:               # so all of it again, one record at a time
        loader = Loader(conn, checker, result, positions, len(header), progress, source)
        with open_csv(path, source, settings.csv_encoding) as fh:
            records = csv_records(csv_reader(fh))
            next(records)                                   # the header, as above
            for batch in iter(lambda: list(itertools.islice(records, IMPORT_CHUNK)), []):
                loader.careful(batch)
    loader.finish()
    return checker


class LinesUnknown(Exception):
    """A slice's records do not add up to the lines the csv module read."""


class KeyRepeated(Exception):
    """A key of a slice written at once was there already."""


def filled(values) -> bool:
    """No value is empty."""
    return "" not in values


def trimmed(values) -> bool:
    """No value has spaces around it (str.strip gives back the same string
    then, so this is a comparison of identities: fast)."""
    return all(map(operator.is_, map(str.strip, values), values))


def plain(values: list) -> bool:
    """No value is empty, has a control character or spaces around it, as
    check() wants a barcode and a title. For the values of one-line records
    only: none holds a line end, so the joined text shows where each value
    starts and ends."""
    joined = "\n".join(values)
    if "" in values or " \n" in joined or "\n " in joined or joined[0] == " " or joined[-1] == " ":
        return False
    if joined.isascii():        # the usual case, and twice as fast as isprintable()
        return len(joined.encode("ascii").translate(None, CONTROL_BYTES)) == len(joined)
    return joined.replace("\n", "").isprintable()


#: The ASCII control characters but the line end plain() puts between values.
CONTROL_BYTES = bytes([*range(10), *range(11, 32), 127])


def one_line_all(values) -> bool:
    """Every value is what one_line() makes of it: no control character, no
    space around it and no two spaces together."""
    return trimmed(values) and "".join(values).isprintable() and "  " not in "\n".join(values)


def key_of(checker: PatronRows | LoanRows, values: list) -> str:
    """The row's key (patron_id or barcode), as read; "" if it has none."""
    return values[1 if checker.key == "barcode" else 0] or ""


def numbered(rows: list, line: int, end: int) -> list[tuple[int, list]]:
    """(first line, fields) of each record of a slice that is not blank;
    `line` is the slice's first line and `end` its last. A record is one
    line, and one more for each line end inside its values (\\r\\n, \\r or
    \\n, as the file is read). Raises LinesUnknown if they do not add up."""
    out = []
    for fields in rows:
        if not blank(fields):
            out.append((line, fields))
        line += 1 + sum(f.count("\n") + f.count("\r") - f.count("\r\n") for f in fields)
    if line != end + 1:
        raise LinesUnknown(line, end)
    return out


class Loader:
    """The rows of one import on their way into the checker's table, a
    slice at a time, and the problems of the bad ones by line (in
    temp.import_problems, so that a file of bad rows costs no memory)."""

    def __init__(self, conn: sqlite3.Connection, checker: PatronRows | LoanRows,
                 result: ImportResult, positions: list, width: int, progress, source: str):
        self.conn, self.checker, self.result = conn, checker, result
        self.positions, self.width, self.progress, self.source = positions, width, progress, source
        refused = {positions[n] for n in checker.nul_refused}
        #: the file's columns a slice's quick check would not refuse a NUL in
        self.nul_unchecked = [n for n in range(width) if n not in refused]
        self.records = 0                  #: records read, blank ones too
        result.rows = 0
        self.statements: dict[tuple, str] = {}
        table, columns = checker.table, checker.columns
        self.insert_one = (f"INSERT INTO {table} (rowid, {', '.join(columns)}) "
                           f"VALUES (?, {', '.join('?' * len(columns))})")
        self.lookup = f"SELECT rowid FROM {table} WHERE {checker.key} = ?"
        with conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")     # what a crash left
            conn.execute(checker.stage_sql)
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS import_problems "
                         "(line INTEGER PRIMARY KEY, problem TEXT NOT NULL)")
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS import_suspects "
                         "(col TEXT, value TEXT, PRIMARY KEY (col, value))")
            conn.execute("DELETE FROM temp.import_problems")
            conn.execute("DELETE FROM temp.import_suspects")

    def slices(self, reader) -> None:
        """Every record after the header, in slices: PROGRESS_FIRST records,
        then up to each multiple of IMPORT_CHUNK. Raises csv.Error for a
        record the csv module cannot read (the slice's other records are
        lost then), LinesUnknown if lines cannot be counted."""
        line = reader.line_num + 1
        while True:
            size = PROGRESS_FIRST if not self.records else IMPORT_CHUNK - self.records % IMPORT_CHUNK
            rows = list(itertools.islice(reader, size))
            if not rows:
                return
            end = reader.line_num
            self.records += len(rows)
            lengths = list(map(len, rows))
            regular = end - line + 1 == len(rows) and min(lengths) == self.width == max(lengths)
            if not (regular and self.quick(rows, line)):
                self.careful(numbered(rows, line, end))
            line = end + 1

    def quick(self, rows: list, line: int) -> bool:
        """Write a slice of one-line records as they are, in one
        transaction; False, with nothing written, when a row must be looked
        at alone (a value check() would change or refuse, a repeated key)."""
        if any("\0" in "".join(map(operator.itemgetter(n), rows)) for n in self.nul_unchecked):
            return False            # a NUL (see NUL_SENTENCE): row by row
        ready = self.checker.quick(rows, self.positions, self.suspect)
        if ready is None:
            return False
        table, width, picks = ready
        per = max(1, min(ROWS_PER_INSERT, 998 // width))
        full = len(table) - len(table) % per
        conn = self.conn
        try:
            with conn:
                before = conn.total_changes
                if full:
                    cells = itertools.chain.from_iterable(table[:full])
                    conn.executemany(self.statement(per, width, picks),
                                     map(operator.add, zip(range(line, line + full, per)),
                                         zip(*[cells] * (width * per))))
                if len(table) > full:
                    conn.executemany(self.statement(1, width, picks),
                                     map(operator.add, zip(range(line + full, line + len(table))),
                                         map(tuple, table[full:])))
                if conn.total_changes - before != len(table):
                    raise KeyRepeated()             # all undone: row by row instead
        except KeyRepeated:
            return False
        self.counted(len(table))
        return True

    def statement(self, count: int, width: int, picks: tuple) -> str:
        """INSERT of `count` rows of `width` values each (the table's
        columns at `picks`), after the first row's line (its rowid)."""
        key = (count, width, picks)
        if key not in self.statements:
            last = 1 + count * width
            rows = []
            for k in range(count):
                cells = ", ".join(f"?{2 + k * width + p}" for p in picks)
                rowid = f"?1 + {k}"
                if not k and 1 + (count - 1) * width + max(picks) + 1 < last:
                    # names the last value too: sqlite3 wants as many values as
                    # the highest number, and a column the file has but
                    # BiblioGate ignores may be last
                    rowid = f"coalesce(?1, ?{last})"
                rows.append(f"({rowid}, {cells})")
            self.statements[key] = (f"INSERT OR IGNORE INTO {self.checker.table} (rowid, "
                                    f"{', '.join(self.checker.columns)}) VALUES {', '.join(rows)}")
        return self.statements[key]

    def careful(self, records: list) -> None:
        """Write a slice row by row: each row checked alone, a repeated key
        named with the line it first came on. A bad row with a key is
        written too (taken out at the end), so that its key counts."""
        conn, checker = self.conn, self.checker
        with conn:
            for line, fields in records:
                if isinstance(fields, str):
                    self.problem(line, [fields])
                    continue
                if has_nul(fields):         # unread, as Python 3.9's csv module leaves it
                    self.problem(line, [NUL_SENTENCE])
                    continue
                values, row, problems, shape = self.read_row(fields, line)
                key = key_of(checker, values)
                first = conn.execute(self.lookup, (key,)).fetchone() if key else None
                if first is not None:
                    again = f"{checker.key} {key} is also on line {first[0]}."
                    self.problem(line, problems if shape else [again, *problems])
                    continue
                if key:
                    conn.execute(self.insert_one,
                                 (line, *(row or [values[n] for n in checker.order])))
                if row is None:
                    self.problem(line, problems)
        self.counted(len(records))

    def read_row(self, fields: list, line: int) -> tuple[list, tuple | None, list, bool]:
        """(values as read, the checked row or None, its problems, whether
        the row is of the wrong shape: then its other problems only follow
        from that and are not given)."""
        width = self.width
        values = [(fields[p].strip() if p < len(fields) else "") if p is not None else None
                  for p in self.positions]
        row, problems = self.checker.check(values, line)
        if len(fields) > width and any(f.strip() for f in fields[width:]):
            return values, None, [f"{len(fields)} values, but the header names {width} columns "
                                  "(a value holding a comma must be in double quotes)."], True
        if len(fields) < width and any("\n" in f for f in fields):
            last = line + ",".join(fields).rstrip("\r\n").count("\n")     # (the file's last line end)
            return values, None, ["a value in double quotes runs on over the next lines: is a "
                                  "closing '\"' missing?" + lines_lost(line, last)], True
        return values, row, problems, False

    def counted(self, rows: int) -> None:
        before = self.result.rows
        self.result.rows += rows
        after = self.result.rows
        if self.progress and (before < PROGRESS_FIRST <= after
                              or after // PROGRESS_EVERY > before // PROGRESS_EVERY):
            self.progress(self.source, after)

    def problem(self, line: int, problems: list[str]) -> None:
        self.conn.execute("INSERT OR REPLACE INTO temp.import_problems VALUES (?, ?)",
                          (line, " ".join(problems)))

    def suspect(self, column: str, values: Iterable[str]) -> None:
        with self.conn:
            self.conn.executemany("INSERT OR IGNORE INTO temp.import_suspects VALUES (?, ?)",
                                  ((column, v) for v in values))

    def finish(self) -> None:
        """Take the bad rows out, look again at the suspect ones (review),
        and list the problems in result.skipped, by line."""
        conn, table = self.conn, self.checker.table
        with conn:
            conn.execute(f"DELETE FROM {table} WHERE rowid IN "
                         "(SELECT line FROM temp.import_problems)")
        if conn.execute("SELECT 1 FROM temp.import_suspects LIMIT 1").fetchone():
            self.checker.review(conn, self)
            conn.commit()
        self.result.skipped += [f"{self.source} line {n}: {text}" for n, text in conn.execute(
            "SELECT line, problem FROM temp.import_problems ORDER BY line")]


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
    """The import folder, at every tick of `run` (one of gateway_tasks()).

    A patrons.csv or loans.csv (any case) that has kept its size and time
    for STABLE_SECONDS is imported, then moved to done/NAME-STAMP.csv, or,
    if any row is bad, to failed/NAME-STAMP.csv with NAME-STAMP.txt beside it
    listing every bad row; then nothing was imported from it. Files in done/
    are deleted after [data] keep_log_days."""

    def __init__(self) -> None:
        #: file -> ((size, mtime), when first seen so) while it settles
        self.settling: dict[Path, tuple] = {}
        #: file -> (size, mtime) of a file handled but not moved away
        self.handled: dict[Path, tuple] = {}
        self.created: set[Path] = set()
        #: file -> (size, mtime) the listing showed when it had settled
        self.seen: dict[Path, tuple] = {}

    def __call__(self, gateway: Gateway, now: float) -> None:
        for path, what in self.ready(gateway.settings.import_folder, now):
            if not import_dropped(gateway, path, what, now, self.seen.get(path)):
                continue                        # held: tried again once it settles
            with contextlib.suppress(OSError):
                if os.path.lexists(path):       # still held, or it could not be moved away
                    st = os.lstat(path)
                    self.handled[path] = (st.st_size, st.st_mtime_ns)

    def ready(self, folder: Path, now: float) -> list[tuple[Path, str]]:
        """The dropped files that have stopped changing, patrons first."""
        if folder not in self.created:
            self.created.add(folder)
            with contextlib.suppress(OSError):
                folder.mkdir(parents=True, exist_ok=True)
            # A file `run` had taken when it was stopped goes back under its name.
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                taken = [Path(e.path) for e in entries
                         if e.name.startswith(".") and e.name.endswith(IMPORTING_SUFFIX)]
            for path in taken:
                release(path, path.name[1:-len(IMPORTING_SUFFIX)])
        found = {}
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                # lstat: a link, a pipe or a folder is seen as what it is (never followed)
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        found[entry.name.lower()] = (Path(entry.path), st)
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
                self.seen[path] = signature
                ready.append((path, what))
        return ready


def take_dropped(journal: Journal, path: Path, seen: tuple | None = None) -> Path | None:
    """Claim a dropped file before it is read: renamed to its private name,
    which Windows refuses while the library system still has it open. None
    when it is held or still changing (it is tried again once it settles)."""
    claimed = path.with_name("." + path.name + IMPORTING_SUFFIX)
    try:
        patiently(os.rename, path, claimed)
    except FileNotFoundError:
        return None
    except (OSError, SpoolError) as exc:
        journal.event("import", f"{path.name} is not imported yet: "
                      f"{getattr(exc, 'strerror', None) or exc}", level=logging.WARNING)
        return None
    # The listing can be stale (NTFS, while a writer keeps the file open):
    # the claimed file itself must be what the listing showed settled.
    with contextlib.suppress(OSError):
        st = os.lstat(claimed)
        if seen is not None and (st.st_size, st.st_mtime_ns) != seen:
            release(claimed, path.name)
            journal.event("import", f"{path.name} is not imported yet: it is still being "
                          "written", level=logging.WARNING)
            return None
    return claimed


def import_dropped(gateway: Gateway, path: Path, what: str, now: float,
                   seen: tuple | None = None) -> bool:
    """Import one dropped file and move it to done/ or failed/; False when
    it was left for later (held by another program, still changing). A
    link, a pipe or a device is moved to failed/ without being opened."""
    s, journal = gateway.settings, gateway.journal
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    name = path.name
    try:
        problem = file_problem(os.lstat(path), MAX_CSV_BYTES)
    except OSError:             # gone meanwhile
        return True
    taken = path if problem else take_dropped(journal, path, seen)
    if taken is None:
        return False
    try:
        if problem:
            raise ImportRefused(name, [f"{name} was not read: {problem}"], "")
        result = import_csv(s, what, taken, now=now, source=name)
    except ImportRefused as exc:
        problems = exc.problems
    except (OSError, sqlite3.Error) as exc:
        problems = [f"{name} could not be imported: {exc}."]
    else:
        problems = []
        record_import(journal, result)
    moved = move_aside(journal, taken, s.import_folder / ("failed" if problems else "done"),
                       stamp, name)
    if taken != path and os.path.lexists(taken):        # not moved: back under its name
        release(taken, name)
    if not problems:
        if moved:
            journal.event("import", f"moved {name} to {moved}")
        prune_folder(s.import_folder / "done", s.keep_log_days, now)
        return True
    report = moved.with_suffix(".txt") if moved else path.with_name(name + ".txt")
    lines = [f"{name}, found in {s.import_folder} at {fmt_time(now)}, was NOT imported; "
             "nothing was changed.",
             "Correct the rows below (in the library system, or in the file) and drop the "
             f"file into {s.import_folder} again.", "", *problems]
    with contextlib.suppress(OSError, SpoolError):
        write_atomic(report, ("\n".join(lines) + "\n").encode("utf-8"))
    journal.event("import_failed", f"{name} was NOT imported ({len(problems)} problem(s), "
                  f"the first: {problems[0]}); the file and the list of problems are in "
                  f"{report.parent}", level=logging.ERROR)
    return True


def move_aside(journal: Journal, path: Path, folder: Path, stamp: str,
               name: str | None = None) -> Path | None:
    """Move a handled file (`name` in the import folder) to folder as
    NAME-STAMP.csv; None if it cannot be."""
    name = name or path.name
    stem, suffix = os.path.splitext(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = free_name(folder, f"{stem}-{stamp}", suffix)
        patiently(os.replace, path, target)
    except (OSError, SpoolError) as exc:
        journal.event("import_failed", f"{name} could not be moved to {folder} "
                      f"({getattr(exc, 'strerror', None) or exc}); it is not imported again "
                      "until it changes", level=logging.ERROR)
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
# Once a day at [overdue] run_at, on the days the library is open, for the
# loans not yet returned: a warning for items due back soon, an overdue
# notice the day after the due date (overdue_days), and a reminder a few
# days later (reminder_days). Each notice has its day: the due date minus
# warning_days, plus overdue_days, plus reminder_days.
#
# A run covers every notice day since the last run, not only its own day: a
# notice whose day fell on a closed day (a weekend, a holiday) or on a day the
# gateway was off goes at the next run. A warning whose day falls on a closed
# day goes early instead, on the last open day before it: a warning is only
# useful before the due date. Everything one run has for a patron goes in ONE
# message: the items grouped by kind, every item the patron has overdue
# listed, the new ones marked. The notices ledger makes a run safe to repeat:
# a loan, kind and due date is notified once (a renewal has a new due date,
# so it is a new notice).

#: The kinds of notice, from the mildest; a message's template is that of the
#: most serious kind it holds.
NOTICE_KINDS = ("warning", "overdue", "reminder")
#: The item groups of a message, in the order they are listed, with their
#: headings. "listed" are the patron's other overdue items: not new, no
#: reminder due, but a patron should see everything that is late.
ITEM_GROUPS = (("overdue", "Now overdue:"),
               ("reminder", "Still overdue (we wrote to you about these before):"),
               ("listed", "Also overdue:"),
               ("warning", "Due back soon:"))
#: Notice days missed while the gateway was off are caught up this far back
#: (and further back across days the library was closed).
CATCH_UP_DAYS = 7
#: Messages are written, flushed to disk and recorded this many at a time.
LEDGER_BATCH = 200
#: `overdue --date` further than this from today needs --force.
SIMULATE_DAYS = 14
#: Patron ids per `IN (...)` query (sqlite allows 999 parameters).
ID_CHUNK = 500
#: The placeholders of the notices, as message_values() gives them.
NOTICE_FIELDS = frozenset({"library_name", "patron_name", "patron_id", "items", "item_count",
                           "today", "earliest_due", "first_name", "addressee", "your",
                           "item_word", "book_word", "it_them", "is_are", "this_these",
                           "items_with_barcodes", "overdue_count", "warning_count"})
#: A run that could not go (stale loans, a full disk) is tried again after this.
HOLD_SECONDS = 5 * 60
#: A loans.csv waiting in the import folder is imported before the run
#: decides the loans are too old, unless it has waited this long (it could
#: not be moved away, say).
PENDING_IMPORT_SECONDS = 10 * 60
#: State keys: the last day the daily schedule ran (its notices have gone);
#: the last run; why the schedule is held back (shown once a day in the log
#: and in `status`); the last closed day said so in the log.
SCHEDULE_KEY, LAST_RUN_KEY, HELD_KEY = "overdue_schedule_day", "overdue_last_run", "overdue_held"
CLOSED_KEY = "overdue_closed_day"


def show_date(settings: Settings, iso: str) -> str:
    """An ISO date (yyyy-mm-dd) as [library] date_format writes it."""
    return show_day(settings.date_format, dt.date.fromisoformat(iso))


@functools.lru_cache(maxsize=1024)
def show_day(date_format: str, day: dt.date) -> str:
    """A day as date_format writes it. Kept: a run writes the same few
    hundred due dates into thousands of messages."""
    return day.strftime(date_format)


def days_late(due: dt.date, today: dt.date) -> str:
    late = (today - due).days
    return f"{late} {'day' if late == 1 else 'days'} overdue" if late > 0 else ""


@functools.lru_cache(maxsize=1024)
def due_text(date_format: str, due_date: str, today: dt.date) -> str:
    """The end of an item's line: ", due D" and, once past due, ", N days
    overdue". Raises ValueError for a due_date that is not yyyy-mm-dd."""
    due = dt.date.fromisoformat(due_date)
    late = days_late(due, today)
    return f", due {show_day(date_format, due)}" + (f", {late}" if late else "")


def render_items(loans, settings: Settings, today: dt.date, barcodes: bool = True) -> str:
    """One line per loan, in the order given: "- Title (barcode B), due D"
    (the barcode left out with barcodes=False, as in the notices and letters)
    and, once past due, ", N days overdue"."""
    fmt = settings.date_format
    if not barcodes:
        return "\n".join(f"- {one_line(loan['title'])}{due_text(fmt, loan['due_date'], today)}"
                         for loan in loans)
    return "\n".join(f"- {one_line(loan['title'])} (barcode {one_line(loan['barcode'])})"
                     f"{due_text(fmt, loan['due_date'], today)}" for loan in loans)


def first_name(patron) -> str:
    """The patron's first_name column when it holds something, else the part
    of the name before the first space."""
    with contextlib.suppress(IndexError, KeyError):
        given = one_line(patron["first_name"] or "")
        if given:
            return given
    name = one_line(patron["name"] or "")
    return name.split(" ", 1)[0] if name else ""


def wording(count: int) -> dict:
    """The words that change with the number of items."""
    one = count == 1
    return {"item_count": count, "item_word": "item" if one else "items",
            "book_word": "book" if one else "books", "it_them": "it" if one else "them",
            "is_are": "is" if one else "are", "this_these": "this" if one else "these"}


def notice_values(settings: Settings, patron, loans, today: dt.date,
                  barcodes: bool = True) -> dict:
    """The placeholders every message about a patron's loans may use."""
    return {
        **dated_values(settings, today, [loan["due_date"] for loan in loans]),
        "patron_name": one_line(patron["name"]), "patron_id": patron["patron_id"],
        "first_name": first_name(patron),
        "items": render_items(loans, settings, today, barcodes),
        "items_with_barcodes": render_items(loans, settings, today, True),
        **wording(len(loans)),
    }


def dated_values(settings: Settings, today: dt.date, dues: list) -> dict:
    """The library's name, today and the earliest of the due dates, as every
    message about loans shows them (notice_values, message_values)."""
    return {"library_name": settings.library_name or "the library",
            "today": show_day(settings.date_format, today),
            "earliest_due": show_date(settings, min(dues)) if dues else ""}


_NOTICE_NOTES = """\
# Lines starting with # are notes for you and are not sent.
# First line: Subject. Then one blank line. Then the body.
# One run sends a patron ONE message holding everything due for them: ${items}
# lists the items under headings (Now overdue / Still overdue / Also overdue /
# Due back soon). The template of the most serious kind in it is used.
# Placeholders:
#   ${first_name} ${patron_name} ${patron_id} ${library_name} ${today}
#   ${addressee}  the first name, or "parent or guardian of" the pupil
#   ${your}       "your", or "Sam's" in a message to a parent only
#   ${items}      the items, grouped; ${items_with_barcodes} the same with barcodes
#   ${item_count} ${overdue_count} ${warning_count} ${earliest_due}
#   ${item_word} item/items  ${book_word} book/books  ${it_them} it/them
#   ${is_are} is/are  ${this_these} this/these: these follow the number of
#   overdue items (in a warning, of the items due soon)
"""

NOTICE_TEMPLATE_FIELDS = MappingProxyType({kind: NOTICE_FIELDS for kind in NOTICE_KINDS})
NOTICE_TEMPLATES = MappingProxyType({
    "warning": "# Auto-overdue: items due back in [overdue] warning_days days.\n"
               + _NOTICE_NOTES + """\
Subject: Library ${book_word} due back soon

Dear ${addressee},

A quick reminder from ${library_name}: ${your} library ${book_word} ${is_are}
due back soon.

${items}

Please bring ${it_them} back by the date shown, or ask us at the library
if you need more time.

Thank you!
${library_name}
""",
    "overdue": "# Auto-overdue: items that were due [overdue] overdue_days days ago.\n"
               + _NOTICE_NOTES + """\
Subject: Library ${book_word} to bring back

Dear ${addressee},

Our records on ${today} show that ${your} library ${book_word} below
${is_are} late back.

${items}

Please bring ${it_them} back to the library as soon as you can. If you
have already brought ${it_them} back, thank you, and please ignore this
message. If something is lost or damaged, just come and tell us.

${library_name}
""",
    "reminder": "# Auto-overdue: items still out [overdue] reminder_days days after the due date.\n"
                + _NOTICE_NOTES + """\
Subject: Library ${book_word} still not back

Dear ${addressee},

We wrote to you about ${your} library ${book_word} a few days ago, and
our records on ${today} show ${it_them} still out.

${items}

Please bring ${it_them} back to the library as soon as you can, or come
and talk to us if there is a problem. If you have already brought ${it_them}
back, thank you, and please ignore this message.

${library_name}
""",
})


# -- deciding --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Window:
    """The notice days one run covers: overdue notices and reminders whose
    day is after `after` up to `day`; warnings whose day is after `after` and
    before `warn_before` (the next day the job runs), due `day` or later."""
    day: dt.date            #: the run's day: "today" in its messages
    after: dt.date
    warn_before: dt.date

    def due_ranges(self, ov: OverdueSettings) -> dict[str, tuple[dt.date, dt.date]]:
        """Per kind, the due dates (first, last) whose notice this run sends."""
        one = dt.timedelta(days=1)
        w, o, r = (dt.timedelta(days=n) for n in (ov.warning_days, ov.overdue_days, ov.reminder_days))
        return {"warning": (self.after + one + w, self.warn_before - one + w),
                "overdue": (self.after + one - o, self.day - o),
                "reminder": (self.after + one - r, self.day - r)}

    def describe(self) -> str:
        first = self.after + dt.timedelta(days=1)
        return str(self.day) if first == self.day else f"{first}..{self.day}"


def run_window(ov: OverdueSettings, day: dt.date, last_run: dt.date | None) -> Window:
    """The window of a run on `day`. After a last run, every day since it
    (at most CATCH_UP_DAYS back, further across closed days); without one
    (by hand, or the first run ever) the days since the last open day."""
    floor = day - dt.timedelta(days=CATCH_UP_DAYS)
    for _ in range(OPEN_DAY_SEARCH):
        if not ov.closed(floor):
            break
        floor -= dt.timedelta(days=1)
    after = ov.last_open(day) if last_run is None else max(last_run, floor)
    after = min(after, day - dt.timedelta(days=1))
    return Window(day, after, ov.next_open(day))


@dataclasses.dataclass
class Notice:
    """One message: a patron and everything one run has for them. ``groups``
    maps each of ITEM_GROUPS to its loans; ``records`` are the ledger rows
    (kind, loan) it stands for, some of them without a line of their own (a
    reminder that falls on the day its overdue notice goes): (kind, loan,
    whether the message names it so)."""
    patron: dict
    to: list                    #: (name, address) pairs
    groups: dict
    records: list
    wrote: dict = dataclasses.field(default_factory=dict)  #: (barcode, due) -> overdue notice day
    #: Brothers' and sisters' notices to the same address, in this one message.
    siblings: list = dataclasses.field(default_factory=list)

    @property
    def members(self) -> list:
        return [self, *self.siblings]

    @property
    def kind(self) -> str:
        """The most serious kind it holds; its template writes the message."""
        members = self.members
        for kind in reversed(NOTICE_KINDS):
            for n in members:
                if n.groups.get(kind):
                    return kind
        return "warning"

    @property
    def sends(self) -> bool:
        for n in self.members:
            for kind in NOTICE_KINDS:
                if n.groups.get(kind):
                    return True
        return False

    def items(self) -> list:
        return [loan for n in self.members for group, _ in ITEM_GROUPS
                for loan in n.groups.get(group, ())]

    def file_name(self, day: dt.date) -> str:
        """The spool file's name, the same for the same day, patrons and
        notices: a run repeated after a crash recognises what it queued."""
        key = "\n".join(sorted(f"{n.patron['patron_id']}\t{kind}\t{loan['barcode']}\t"
                               f"{loan['due_date']}" for n in self.members
                               for kind, loan, _ in n.records))
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        return f"{self.kind}-{day.isoformat()}-{digest}{WAITING_EXT}"


def merge_families(notices: list) -> list:
    """One message per address: notices that share an address (brothers and
    sisters with one parent's address, or send_to = both) become one, to all
    their addresses. A notice that sends nothing stays as it is."""
    owner: dict[str, Notice] = {}
    merged: list[Notice] = []
    for notice in notices:
        if not notice.sends:
            merged.append(notice)
            continue
        found: list[Notice] = []
        for _, address in notice.to:
            head = owner.get(address.lower())
            if head is not None and all(head is not f for f in found):
                found.append(head)
        if not found:
            merged.append(notice)
            head = notice
        else:
            head = found[0]
            for other in found[1:]:         # this notice joins two families into one
                head.siblings += other.members
                other.siblings = []
                head.to += [x for x in other.to if x[1].lower() not in
                            {a.lower() for _, a in head.to}]
                merged.remove(other)
            head.siblings.append(notice)
            head.to += [x for x in notice.to if x[1].lower() not in {a.lower() for _, a in head.to}]
        for member in head.members:
            for _, address in member.to:
                owner[address.lower()] = head
    return merged


@dataclasses.dataclass
class OverdueRun:
    """What one run decided (and, unless a dry run, queued)."""
    day: dt.date
    how: str                                    #: "by hand", "scheduled", "caught up"
    window: Window | None = None
    notices: list = dataclasses.field(default_factory=list)
    not_enabled: set = dataclasses.field(default_factory=set)     #: patron ids
    unreachable: dict = dataclasses.field(default_factory=dict)   #: patron id -> (who, why)
    too_late: int = 0           #: warnings caught up after their due date

    @property
    def no_email(self) -> set:
        return set(self.unreachable)

    def count(self, kind: str) -> int:
        return sum(1 for n in self.notices if n.sends and n.kind == kind)

    def unreachable_lines(self, limit: int | None = None) -> list[str]:
        """"Cy Young (P3, 7B): no guardian email address", by name."""
        rows = sorted(self.unreachable.items(), key=lambda kv: kv[1][0].lower())
        lines = [f"{who}: {why}" for _, (who, why) in rows]
        if limit is not None and len(lines) > limit:
            lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
        return lines

    def summary(self) -> str:
        sent = [n for n in self.notices if n.sends]
        items = {group: 0 for group in NOTICE_KINDS}    # the items of each kind, in one pass
        for notice in sent:
            for member in notice.members:
                for group in NOTICE_KINDS:
                    items[group] += len(member.groups.get(group, ()))
        covering = f", notices due {self.window.describe()}" if self.window else ""
        text = (f"auto-overdue for {self.day} ({self.how}{covering}): queued "
                f"{_plural(len(sent), 'message')} ({items['warning']} due soon, "
                f"{items['overdue']} newly overdue, {items['reminder']} "
                f"reminders); not sent: {len(self.not_enabled)} not enabled for auto-overdue")
        if self.unreachable:
            text += (f", {len(self.unreachable)} could not be reached ("
                     + "; ".join(self.unreachable_lines(20)) + ")")
        if self.too_late:
            text += f", {self.too_late} warning(s) for items already past due"
        return text


def notice_recipients(patron, send_to: str) -> tuple[list, str]:
    """([(name, address)], "") for [overdue] send_to, or ([], why not)."""
    own, own_problem = recipient(patron, guardian=False)
    parent, parent_problem = recipient(patron, guardian=True)
    name = one_line(patron["name"])
    mine = [(name, own)] if own else []
    theirs = [(f"Parent or guardian of {name}", parent)] if parent else []
    if send_to == "patron":
        return mine, own_problem
    if send_to == "guardian":
        return theirs, parent_problem
    if send_to == "both":
        return mine + theirs, "" if mine or theirs else f"{own_problem} and {parent_problem}"
    return (mine or theirs), "" if mine or theirs else f"{own_problem} and {parent_problem}"


def candidate_sql(kind: str) -> str:
    return f"""
SELECT l.patron_id, l.barcode, l.title, l.due_date FROM loans l
WHERE l.due_date >= :first AND l.due_date <= :last AND NOT EXISTS (
    SELECT 1 FROM notices n WHERE n.barcode = l.barcode AND n.kind = '{kind}'
    AND n.due_date = l.due_date AND n.patron_id = l.patron_id)"""


#: The overdue notice of each loan due in a reminder's range (by the
#: notices' key: one look-up a loan, however long the ledger grows).
WROTE_SQL = """
SELECT n.patron_id, n.barcode, n.due_date, n.queued_at, n.file FROM loans l
JOIN notices n ON n.barcode = l.barcode AND n.kind = 'overdue' AND n.due_date = l.due_date
    AND n.patron_id = l.patron_id
WHERE l.due_date >= :first AND l.due_date <= :last"""


def by_ids(db: sqlite3.Connection, sql: str, ids: list, *params) -> list:
    """Rows of `sql` (holding one `IN ({ids})`) for the ids, in chunks."""
    rows = []
    for n in range(0, len(ids), ID_CHUNK):
        chunk = ids[n:n + ID_CHUNK]
        rows += db.execute(sql.format(ids=",".join("?" * len(chunk))), (*chunk, *params)).fetchall()
    return rows


def loan_rows(cursor: Iterable) -> Iterator[dict]:
    """(patron_id, barcode, title, due_date) rows as the dicts a Notice holds."""
    for pid, barcode, title, due in cursor:
        yield {"patron_id": pid, "barcode": barcode, "title": title, "due_date": due}


def plan_run(db: sqlite3.Connection, ov: OverdueSettings, window: Window, how: str,
             spool: Path | None = None) -> OverdueRun:
    """Read what the window needs from the database and decide (decide_patron).
    An overdue notice whose file failed for good (.BAD in `spool`) does not
    count as written: no reminder says "we wrote to you" about it."""
    run = OverdueRun(window.day, how, window)
    found: dict[str, dict] = {}
    ranges = window.due_ranges(ov)
    for kind, (first, last) in ranges.items():
        if first > last:
            continue
        for loan in loan_rows(db.execute(candidate_sql(kind), {"first": first.isoformat(),
                                                               "last": last.isoformat()})):
            found.setdefault(loan["patron_id"], {k: [] for k in NOTICE_KINDS})[kind].append(loan)
    if not found:
        return run
    ids = sorted(found)
    patrons = {r["patron_id"]: r for r in by_ids(db, "SELECT * FROM patrons WHERE patron_id IN ({ids})", ids)}
    reached: dict[str, list] = {}         #: patron id -> (name, address) pairs, in id order
    for pid in ids:
        patron = patrons.get(pid)
        if patron is None:
            continue                    # a loan of a patron not in the patrons list
        if not patron["auto_overdue"]:
            run.not_enabled.add(pid)
            continue
        to, problem = notice_recipients(patron, ov.send_to)
        if not to:
            group = f", {one_line(patron['grp'])}" if patron["grp"] else ""
            run.unreachable[pid] = (f"{one_line(patron['name'])} ({pid}{group})", problem)
            continue
        reached[pid] = to
    # Every overdue item of the patrons whose message is about overdue items
    # (and only theirs: a message of warnings alone lists none; decide_patron).
    late = [pid for pid in reached if found[pid]["overdue"] or found[pid]["reminder"]]
    overdue: dict[str, list] = {}
    for loan in loan_rows(by_ids(db, "SELECT patron_id, barcode, title, due_date FROM loans "
                                 "WHERE patron_id IN ({ids}) AND due_date < ?",
                                 late, window.day.isoformat())):
        overdue.setdefault(loan["patron_id"], []).append(loan)
    for loans in overdue.values():
        loans.sort(key=lambda x: (x["due_date"], x["title"], x["barcode"]))
    wrote: dict[tuple, dt.date] = {}
    first, last = ranges["reminder"]
    if first <= last:
        for row in db.execute(WROTE_SQL, {"first": first.isoformat(), "last": last.isoformat()}):
            if spool and row[4] and (spool / (row[4][:-len(WAITING_EXT)] + BAD_EXT)).exists():
                continue
            wrote[(row[0], row[1], row[2])] = local_day(row[3])
    for pid, to in reached.items():
        notice, too_late = decide_patron(dict(patrons[pid]), to, found[pid], overdue.get(pid, []),
                                         wrote, window.day)
        run.too_late += too_late
        if notice.records:
            run.notices.append(notice)
    run.notices = merge_families(run.notices)
    return run


def decide_patron(patron: dict, to: list, due: dict, overdue: list, wrote: dict,
                  day: dt.date) -> tuple[Notice, int]:
    """One patron's message from the loans whose notice day is in the window
    (``due``: kind -> loans), every loan they have overdue (not needed for a
    message of warnings alone), and the day each overdue notice went
    (``wrote``: (patron_id, barcode, due) -> day).

    A reminder says "we wrote to you", so it goes only for a loan whose
    overdue notice went on an earlier day; a loan that never had one is
    listed as newly overdue instead, and one whose notice goes today (both
    fell in a long closure) is listed once, as overdue."""
    pid, today = patron["patron_id"], day.isoformat()
    key = lambda loan: (loan["barcode"], loan["due_date"])        # noqa: E731
    warning = sorted((x for x in due["warning"] if x["due_date"] >= today),
                     key=lambda x: (x["due_date"], x["title"]))
    too_late = len(due["warning"]) - len(warning)
    if not due["overdue"] and not due["reminder"]:
        # Warnings alone (most messages): no overdue item is listed.
        return Notice(patron, to, {"overdue": [], "reminder": [], "listed": [], "warning": warning},
                      [("warning", x, True) for x in warning]), too_late
    new = {key(x): x for x in due["overdue"]}
    records = [("warning", x, True) for x in warning] + [("overdue", x, True) for x in new.values()]
    reminder, sent_days = [], {}
    for loan in due["reminder"]:
        day_sent = wrote.get((pid, *key(loan)))
        if day_sent is not None and day_sent < day:
            reminder.append(loan)
            sent_days[key(loan)] = day_sent
        elif day_sent is None and key(loan) not in new:
            new[key(loan)] = loan
            records.append(("overdue", loan, True))
        records.append(("reminder", loan, key(loan) in sent_days))
    named = set(new) | {key(x) for x in reminder}
    groups = {"overdue": [x for x in overdue if key(x) in new],
              "reminder": [x for x in overdue if key(x) in sent_days],
              # every item overdue, in a message about overdue items
              "listed": [x for x in overdue if key(x) not in named] if named else [],
              "warning": warning}
    # A loan the overdue query did not return (due today or later, or a race
    # with an import) is still listed where its notice says.
    for group, loans in (("overdue", new.values()), ("reminder", reminder)):
        listed = {key(x) for x in groups[group]}
        groups[group] += [x for x in loans if key(x) not in listed]
    return Notice(patron, to, groups, records, sent_days), too_late


def and_list(words: list) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def message_values(settings: Settings, notice: Notice, today: dt.date,
                   wanted: Container[str] | None = None) -> dict:
    """The placeholders of one message (of one pupil, or of brothers and
    sisters together): those of notice_values, for all of them. With
    `wanted` (the template's names), ${items_with_barcodes} is listed only
    when the template uses it."""
    members, items = notice.members, notice.items()
    overdue_count = sum(len(n.groups[g]) for n in members for g in ("overdue", "reminder", "listed"))
    warning_count = sum(len(n.groups["warning"]) for n in members)
    addresses = {address.lower() for _, address in notice.to}
    firsts = [first_name(n.patron) or one_line(n.patron["name"]) for n in members]
    names = [one_line(n.patron["name"]) for n in members]
    to_pupil = any((n.patron["email"] or "").strip().lower() in addresses for n in members)
    # "your library book below is late back": the words follow the items of
    # the message's kind (the overdue ones, or the ones due soon), not all.
    lead = warning_count if notice.kind == "warning" else overdue_count
    return {
        **wording(lead),
        **dated_values(settings, today, [x["due_date"] for x in items]),
        "patron_name": and_list(names), "first_name": and_list(firsts),
        "patron_id": ", ".join(n.patron["patron_id"] for n in members),
        "items": render_groups(settings, notice, today, barcodes=False),
        **({"items_with_barcodes": render_groups(settings, notice, today, barcodes=True)}
           if wanted is None or "items_with_barcodes" in wanted else {}),
        "item_count": len(items), "overdue_count": overdue_count, "warning_count": warning_count,
        "addressee": and_list(firsts) if to_pupil else f"parent or guardian of {and_list(names)}",
        "your": "your" if to_pupil else and_list([f"{x}'s" for x in firsts]),
    }


def render_groups(settings: Settings, notice: Notice, today: dt.date, barcodes: bool) -> str:
    """The items under their headings (ITEM_GROUPS), under each pupil's
    name when the message is about several; a reminder's line says when we
    wrote."""
    if notice.siblings:
        return "\n\n".join(f"For {first_name(n.patron) or one_line(n.patron['name'])}:\n\n"
                            + own_groups(settings, n, today, barcodes) for n in notice.members)
    return own_groups(settings, notice, today, barcodes)


def own_groups(settings: Settings, notice: Notice, today: dt.date, barcodes: bool) -> str:
    """One pupil's items under their headings."""
    parts = []
    for group, heading in ITEM_GROUPS:
        loans = notice.groups.get(group)
        if not loans:
            continue
        lines = render_items(loans, settings, today, barcodes).split("\n")
        if group == "reminder":
            lines = [f"{line} (we wrote on "
                     f"{show_day(settings.date_format, notice.wrote[(x['barcode'], x['due_date'])])})"
                     for line, x in zip(lines, loans)]
        parts.append(heading + "\n" + "\n".join(lines))
    return "\n\n".join(parts)


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
            "notices are caught up then.")


def loans_age_days(db: sqlite3.Connection, now: float) -> int | None:
    imported = get_state(db, LOANS_IMPORTED_KEY)
    return None if imported is None else int((now - imported) // 86400)


# -- queueing ------------------------------------------------------------------

def run_overdue(settings: Settings, journal: Journal, day: dt.date, now: float,
                dry_run: bool = False, how: str = "by hand", window: Window | None = None,
                sent_at: float | None = None) -> OverdueRun:
    """Queue the notices of one run.

    day is the run's day, and now its time: the messages, the days overdue
    and the age of the loans are all as of then (`overdue --date` passes a
    day and time to simulate). window: the notice days covered (by default
    those since the last open day before `day`). sent_at: the Date of the
    messages (default now). A dry run decides and changes nothing. Raises
    SettingsError for bad [overdue] settings, StaleData when the loans are
    older than max_data_age_hours (not for a dry run), Busy when another run
    is going, TemplateError, and SpoolError (the notices queued before it
    are kept)."""
    ov = settings.overdue
    if ov.problems:
        raise SettingsError(list(ov.problems))
    db = journal.db
    window = window or run_window(ov, day, None)
    problem = loans_age_problem(db, settings, now)
    if problem and not dry_run:
        raise StaleData(f"Auto-overdue did not run: {problem}")
    if dry_run:
        with collector_paused():
            return plan_run(db, ov, window, how, settings.spool)
    templates = {kind: load_template(settings, kind) for kind in NOTICE_KINDS}
    with circulation_lock(settings, "Another auto-overdue run is going on right now; try "
                          "again in a minute."), collector_paused():
        run = plan_run(db, ov, window, how, settings.spool)
        queue_notices(settings, db, run, templates, now, sent_at)
    set_state(db, **{LAST_RUN_KEY: {"day": day.isoformat(), "at": now, "summary": run.summary(),
                                    "unreachable": run.unreachable_lines()}})
    journal.event("overdue_run", run.summary(),
                  level=logging.WARNING if run.unreachable else logging.INFO)
    if run.unreachable:
        journal.event("overdue_unreachable", f"Auto-overdue could not reach "
                      f"{_plural(len(run.unreachable), 'pupil')} ([overdue] send_to = "
                      f"{ov.send_to}): " + "; ".join(run.unreachable_lines()) + ".",
                      level=logging.WARNING)
    return run


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector paused while a run decides and writes: a big
    district's run makes hundreds of thousands of small dicts, lists and
    tuples, none of them in a cycle (reference counting frees them), and the
    collector walked them again and again (a tenth of the run's Python time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def circulation_lock(settings: Settings, busy: str) -> Iterator[None]:
    """Held while an auto-overdue or letter run queues, so two runs never queue
    the same notice. Raises Busy (with `busy`) when another run holds it, and
    SpoolError when the spool folder cannot be used."""
    lock = FileLock(settings.spool / ".bibliogate-overdue.lock")
    try:
        taken = lock.acquire()
    except OSError as exc:
        raise SpoolError(f"The spool folder {settings.spool} cannot be written ({exc.strerror}). "
                         "Check [gateway] spool_folder and the folder's permissions.") from None
    if not taken:
        raise Busy(busy)
    try:
        yield
    finally:
        lock.release()


def queue_notices(settings: Settings, db: sqlite3.Connection, run: OverdueRun,
                  templates: dict, now: float, sent_at: float | None = None) -> None:
    """Write the notices to the spool, then record them in the ledger,
    LEDGER_BATCH messages at a time.

    Queue first, record second. A crash in between never loses a notice: a
    loan is in the ledger only once its message is safely on disk. Nor does
    it send one twice: a file's name comes from the day, patron and
    notices, so the run repeated after the crash finds the file it wrote
    (still waiting, .BAD, or logged as sent) and only records it.
    (Recording first would lose the notices of a crash in between.)"""
    sent_at = now if sent_at is None else sent_at
    mtime = min(sent_at, time.time()) - OWN_FILE_AGE     # complete: the sender may take it at once
    composer = Composer(settings, sent_at)
    wanted = {kind: template.names for kind, template in templates.items()}
    names = [n.file_name(run.day) if n.sends else None for n in run.notices]
    queued = queued_before(settings.spool, db, [x for x in names if x])
    files, rows = [], []
    for n, (notice, name) in enumerate(zip(run.notices, names), 1):
        if name and name not in queued:
            subject, body = templates[notice.kind].fill(
                message_values(settings, notice, run.day, wanted[notice.kind]))
            files.append((name, composer.message(notice.to, subject, body)))
        # A notice the message does not name as such (a reminder listed as
        # newly overdue) is recorded without a file: it was never sent as one.
        rows += [(member.patron["patron_id"], loan["barcode"], kind, loan["due_date"], now,
                  name if named else None)
                 for member in notice.members for kind, loan, named in member.records]
        if n % LEDGER_BATCH == 0 or n == len(run.notices):
            try:
                write_files(settings.spool, files, mtime)
            except SpoolError as exc:
                raise SpoolError(f"{exc} Nothing is lost: the notices not queued are queued at the next "
                                 "run.") from None
            record_notices(db, rows)
            files.clear()


def record_notices(db: sqlite3.Connection, rows: list) -> None:
    """Add rows to the notices ledger (and empty the list)."""
    with db:
        db.executemany("INSERT OR IGNORE INTO notices (patron_id, barcode, kind, due_date, "
                       "queued_at, file) VALUES (?,?,?,?,?,?)", rows)
    rows.clear()


# -- the daily schedule ----------------------------------------------------------

def overdue_task(gateway: Gateway, now: float) -> None:
    """A task of `run` (see gateway_tasks): one run a day at run_at on the days the library
    is open, covering every notice day since the last run (closed days and
    days the gateway was off included). A run that cannot go (stale loans, a
    bad template) is tried again later and says why, once a day; a
    loans.csv waiting in the import folder is imported first."""
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
    today = moment.date()
    if ov.closed(today):
        say_closed(journal, ov, today)
        return
    last = get_state(db, SCHEDULE_KEY)
    if moment.time() < ov.run_at or (last is not None and last >= today.isoformat()):
        return
    if loans_age_problem(db, s, now) and import_pending(s, now):
        return                          # the import folder's loans.csv first
    window = run_window(ov, today, dt.date.fromisoformat(last) if last else None)
    how = "scheduled" if window.after >= ov.last_open(today) else "caught up"
    try:
        run_overdue(s, journal, today, now, how=how, window=window)
    except (BibliogateError, sqlite3.Error, OSError) as exc:
        hold(journal, now, exc)
        return
    set_state(db, **{SCHEDULE_KEY: today.isoformat(), HELD_KEY: None})


def say_closed(journal: Journal, ov: OverdueSettings, today: dt.date) -> None:
    """Once a closed day: no run, and where its notices go."""
    if get_state(journal.db, CLOSED_KEY) == today.isoformat():
        return
    set_state(journal.db, **{CLOSED_KEY: today.isoformat()})
    journal.event("overdue_closed", f"auto-overdue: no run on {today}, the library is closed "
                  f"([overdue] closed); the overdue notices and reminders falling due today "
                  f"go on {ov.next_open(today)}, and its warnings belong to the run of "
                  f"{ov.last_open(today)}, the last open day before")


def import_pending(settings: Settings, now: float) -> bool:
    """A loans.csv waits in the import folder (and has not waited long)."""
    with contextlib.suppress(OSError), os.scandir(settings.import_folder) as entries:
        for entry in entries:
            if entry.name.lower() == "loans.csv" and entry.is_file():
                return entry.stat().st_mtime > now - PENDING_IMPORT_SECONDS
    return False


def hold(journal: Journal, now: float, exc: Exception) -> None:
    """Hold the schedule back for HOLD_SECONDS, and say why: in `status`, and
    in the log once a day for each kind of reason."""
    today, reason = local_day(now).isoformat(), type(exc).__name__
    held = get_state(journal.db, HELD_KEY)
    set_state(journal.db, **{HELD_KEY: [today, reason, str(exc), now + HOLD_SECONDS]})
    if not (held and held[:2] == [today, reason]):
        journal.event("overdue_refused", str(exc).replace("\n", " "), level=logging.ERROR)


def overdue_digest(db: sqlite3.Connection, settings: Settings, day: str, by_kind: dict,
                   needs: list) -> list[str]:
    """The auto-overdue lines of the daily log's summary; what needs the
    librarian is added to `needs` ("auto-overdue did not run - loans are 3
    days old")."""
    start = dt.datetime.combine(dt.date.fromisoformat(day), dt.time()).timestamp()
    rows = db.execute("SELECT kind, count(*), count(DISTINCT file) FROM notices WHERE "
                      "queued_at >= ? AND queued_at < ? AND kind IN ('warning', 'overdue', "
                      "'reminder') AND file IS NOT NULL GROUP BY kind", (start, start + 86400))
    counts = {kind: items for kind, items, _ in rows}
    lines = []
    if by_kind.get("overdue_run"):
        lines.append(f"Auto-overdue notices queued: {counts.get('warning', 0)} items due soon, "
                     f"{counts.get('overdue', 0)} newly overdue, {counts.get('reminder', 0)} "
                     "reminders.")
    for row in by_kind.get("overdue_unreachable", []):
        lines.append(row["detail"])
    refused, ran = by_kind.get("overdue_refused", []), by_kind.get("overdue_run", [])
    if refused and not (ran and ran[-1]["at"] > refused[-1]["at"]):
        imported = get_state(db, LOANS_IMPORTED_KEY)
        if "loans were imported" in refused[-1]["detail"] and imported:
            old = max(1, round((refused[-1]["at"] - imported) / 86400))
            needs.append(f"auto-overdue did not run \u2014 loans are {_plural(old, 'day')} old "
                         f"(check the library system's nightly export into {settings.import_folder})")
        else:
            needs.append("auto-overdue did not run \u2014 " + refused[-1]["detail"].split(": ", 1)[-1])
    return lines


# -- status and command line -----------------------------------------------------

def status_auto_overdue(settings: Settings, db: sqlite3.Connection) -> str:
    ov = settings.overdue
    if not ov.enabled:
        return "off ([overdue] enabled = no); `overdue` runs it by hand"
    text = (f"on, every open day at {ov.run_at:%H:%M}, to {ov.send_to}; next run "
            f"{next_run_day(ov, get_state(db, SCHEDULE_KEY), dt.datetime.now())}")
    held = get_state(db, HELD_KEY)
    return text + (f"; HELD BACK: {held[2]}" if held else "")


def next_run_day(ov: OverdueSettings, last: str | None, now: dt.datetime) -> dt.date:
    """The day of the next scheduled run (closed days have none)."""
    today = now.date()
    if not ov.closed(today) and (last is None or last < today.isoformat()):
        return today
    return ov.next_open(today)


def status_last_run(settings: Settings, db: sqlite3.Connection) -> str:
    last = get_state(db, LAST_RUN_KEY)
    return f"{last['summary']} (at {fmt_time(last['at'])})" if last else "never"


def status_loans(settings: Settings, db: sqlite3.Connection) -> str:
    count = db.execute("SELECT count(*) FROM loans").fetchone()[0]
    imported = get_state(db, LOANS_IMPORTED_KEY)
    problem = loans_age_problem(db, settings, time.time())
    text = f"{count:,} loans, imported {fmt_time(imported)}" if imported else "none imported"
    return text + (f"; TOO OLD FOR AUTO-OVERDUE: {problem}" if problem and imported else "")


def simulated_now(day: dt.date, real: float, force: bool) -> float:
    """The time of a run for `day` (`overdue --date`): that day at this
    time of day. Raises UsageError for a day more than SIMULATE_DAYS away."""
    moment = dt.datetime.fromtimestamp(real)
    if abs((day - moment.date()).days) > SIMULATE_DAYS and not force:
        raise UsageError(f"--date {day} is more than {SIMULATE_DAYS} days from today; the "
                         "notices would be written as of that day, with today's loans. Add "
                         "--force if that is what you want.")
    return dt.datetime.combine(day, moment.time()).timestamp() if day != moment.date() else real


def cmd_overdue(args, settings: Settings) -> int:
    journal = Journal(settings.database)
    real = time.time()
    day = args.date or local_day(real)
    now = simulated_now(day, real, args.force)
    if settings.overdue.closed(day):
        print(f"{day} is a closed day ([overdue] closed); running it as asked.", file=sys.stderr)
    if args.dry_run:
        problem = loans_age_problem(journal.db, settings, now)
        if problem:
            print(f"warning: a real run would not send anything: {problem}", file=sys.stderr)
    try:
        run = run_overdue(settings, journal, day, now, dry_run=args.dry_run, sent_at=real)
    except StaleData as exc:
        journal.event("overdue_refused", str(exc), level=logging.ERROR)
        raise
    if args.dry_run:
        for notice in run.notices:
            if notice.sends:
                to = ", ".join(f"{name} <{address}>" for name, address in notice.to)
                print(f"{notice.kind} message to {to} ({notice.patron['patron_id']}):")
                print(textwrap.indent(render_groups(settings, notice, day, False), "    "))
        if run.unreachable:
            print(f"Could not be reached ([overdue] send_to = {settings.overdue.send_to}):")
            print("\n".join(f"    {line}" for line in run.unreachable_lines()))
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
    p.add_argument("--date", type=iso_day, metavar="YYYY-MM-DD",
                   help="the day to run, as if it were that day (default today)")
    p.add_argument("--force", action="store_true",
                   help=f"allow a --date more than {SIMULATE_DAYS} days from today")
    p.add_argument("--dry-run", action="store_true", help="print who would get what; change nothing")


# Letters #####################################################################
#
# The tech note's "Letters - Overdue First" report and its companions. Each
# letter follows the one before it: a loan gets overdue_second only when it had
# overdue_first, for the same due date, at least LETTER_GAP_DAYS earlier, and
# overdue_final only after overdue_second. The notices ledger keeps one row per
# loan and letter, so a report run twice never writes the same letter twice.
# The guardian variant is recorded apart ("overdue_first_guardian"): writing to
# the pupil does not use up the letter to the parents. Letters to pupils of the
# group TEST (the tech note's way to try a report) are never recorded, and
# --preview writes the print file and records nothing.

#: The letter reports, in the order a loan receives them.
LETTER_KINDS = ("overdue_first", "overdue_second", "overdue_final")
#: Each later letter needs the one before it ...
PREVIOUS_LETTER = MappingProxyType({"overdue_second": "overdue_first",
                                    "overdue_final": "overdue_second"})
#: ... written at least this many days earlier.
LETTER_GAP_DAYS = 7
#: Print files go to this folder beside the ini.
LETTERS_FOLDER = "letters"
LETTER_OUTPUTS = ("email", "print")
#: The placeholders of every letter and of the direct email.
LETTER_FIELDS = frozenset({"library_name", "patron_name", "patron_id", "items", "item_count",
                           "today", "earliest_due", "addressee", "first_name",
                           "items_with_barcodes", "item_word", "book_word", "it_them",
                           "is_are", "this_these", "your"})
#: A patron group whose letters are tries, not letters: never recorded.
TEST_GROUP = "TEST"
#: The ledger's name for the guardian variant of a letter.
GUARDIAN_SUFFIX = "_guardian"

LETTER_TEMPLATE_FIELDS = MappingProxyType({
    "overdue_first": LETTER_FIELDS,
    "overdue_second": LETTER_FIELDS | {"previous_sent"},
    "overdue_final": LETTER_FIELDS | {"previous_sent"},
    "direct": LETTER_FIELDS,
})


_LETTER_NOTES = """\
# Lines starting with # are notes for you and are not sent.
# First line: Subject. Then one blank line. Then the body.
# The same letter goes to pupils and (with --guardian) to parents.
# Placeholders:
#   ${addressee}     the pupil's first name, or "parent or guardian of" the pupil
#   ${your}          "your", or "Sam's" in the guardian variant
#   ${first_name} ${patron_name} ${patron_id} ${library_name}
#   ${items}         one line per item: title, due date, days overdue
#   ${items_with_barcodes}  the same, with each item's barcode
#   ${item_count} ${today} ${earliest_due}
#   ${item_word} item/items  ${book_word} book/books  ${it_them} it/them
#   ${is_are} is/are  ${this_these} this/these
"""

LETTER_TEMPLATES = MappingProxyType({
    "overdue_first": """\
# The first overdue letter (`letters overdue_first`): a friendly reminder.
# It lists every item now past its due date that has not had this letter.
""" + _LETTER_NOTES + """\
Subject: Library ${book_word} to bring back

Dear ${addressee},

This is a friendly note from ${library_name}. Our records show that
${your} library ${book_word} below ${is_are} now overdue:

${items}

Please bring ${it_them} back to the library as soon as you can, or come
and see us if more time is needed. If you have already returned
${it_them}, thank you, and please ignore this letter.

If something has been lost or damaged, just let us know: we will help
to sort it out.

With thanks,
${library_name}
""",
    "overdue_second": """\
# The second overdue letter (`letters overdue_second`): firmer. It goes only
# for items that had the first letter at least 7 days earlier and are still out.
""" + _LETTER_NOTES + """\
#   ${previous_sent} when the first letter about these items was written
Subject: Second reminder: library ${book_word} still not back

Dear ${addressee},

We wrote on ${previous_sent} about ${your} library ${book_word} below,
and our records show ${it_them} still out:

${items}

Other pupils are waiting to borrow ${it_them}. Please bring ${it_them}
back this week, or come and tell us if there is a problem. If you have
already returned ${it_them}, thank you, and please ignore this letter.

With thanks,
${library_name}
""",
    "overdue_final": """\
# The final overdue letter (`letters overdue_final`): the last letter before
# the school acts, written to the pupil's parent or guardian (use --guardian
# to email it to them). It goes only for items that had the second letter at
# least 7 days earlier and are still out. Change the paragraph about what
# happens next so that it says what your school does.
""" + _LETTER_NOTES + """\
#   ${previous_sent} when the second letter about these items was written
Subject: Library ${book_word} borrowed by ${first_name}: final notice

Dear parent or guardian of ${patron_name},

We have written twice about the library ${book_word} below, borrowed by
${first_name}, most recently on ${previous_sent}. Our records show
${it_them} still out:

${items}

Please help ${first_name} to bring ${it_them} back within the next two
weeks. If an item cannot be found or has been damaged, please contact
the library: we are happy to help, and would much rather talk it over
than ask for the cost of replacing it.

Yours sincerely,
${library_name}
""",
    "direct": """\
# The email that `mailto PATRON_ID` and the config page's [Email] button open
# in your own mail program, ready to change before you send it. It lists
# every item the patron has on loan. Keep it short: an email link has room
# for about 1,800 characters, and a longer list is cut with a note saying so.
""" + _LETTER_NOTES + """\
Subject: Your library loans at ${library_name}

Dear ${addressee},

These are the items ${patron_name} has on loan from ${library_name}
today, ${today}:

${items}

Kind regards,
${library_name}
""",
})


def recipient(patron, guardian: bool) -> tuple[str, str]:
    """(address, "") for the patron or their guardian, or ("", what is wrong),
    worded to follow "has": "no guardian email address"."""
    field, what = ("guardian_email", "guardian email address") if guardian else \
        ("email", "email address")
    address = (patron[field] or "").strip()
    if not address:
        return "", f"no {what}"
    if not valid_address(address):
        article = "an" if what[0] in "aeiou" else "a"
        return "", f"{article} {what} that is not valid ({one_line(address)!r})"
    return address, ""


def addressee(patron, guardian: bool) -> str:
    name = one_line(patron["name"])
    return f"parent or guardian of {name}" if guardian else name


def ledger_kind(kind: str, guardian: bool) -> str:
    """The ledger's name for a letter: the guardian variant is apart."""
    return kind + GUARDIAN_SUFFIX if guardian else kind


def is_test_patron(patron) -> bool:
    """A pupil moved into the group TEST to try a report (the tech note)."""
    return one_line(patron["grp"] or "").upper() == TEST_GROUP


def surname(patron) -> str:
    """The last word of the name: print files are in group, then surname, order."""
    words = one_line(patron["name"] or "").split()
    return words[-1].casefold() if words else ""


@dataclasses.dataclass
class Letter:
    """One patron's letter: the loans it lists and where it goes."""
    patron: dict
    loans: list
    address: str           #: "" when it cannot be emailed
    problem: str           #: why not ("no email address"), else ""
    subject: str
    body: str
    to_name: str


@dataclasses.dataclass
class LetterRun:
    """What one letter report did (or, for a dry run, would do)."""
    kind: str
    group: str | None
    guardian: bool
    output: str
    dry_run: bool
    letters: list
    preview: bool = False  #: the print file only; nothing recorded
    orphans: list = dataclasses.field(default_factory=list)   #: patron ids not in patrons
    undated: list = dataclasses.field(default_factory=list)   #: loans without a real due date
    queued: list = dataclasses.field(default_factory=list)    #: spool files
    print_file: Path | None = None
    skipped: int = 0       #: letters another run wrote at the same moment
    failed: str = ""       #: why queueing stopped part-way (a full disk)
    departure: str = ""    #: when the last queued letter leaves, as a sentence

    @property
    def to_email(self) -> list:
        return [] if self.output == "print" or self.preview else \
            [x for x in self.letters if x.address]

    @property
    def to_print(self) -> list:
        return self.letters if self.output == "print" or self.preview else \
            [x for x in self.letters if not x.address]

    @property
    def tests(self) -> list:
        """Letters to pupils of the group TEST: written, never recorded."""
        return [x for x in self.letters if is_test_patron(x.patron)]

    @property
    def unsendable(self) -> list:
        return [x for x in self.letters if not x.address]


def letter_loans(kind: str, loans, ledger: dict, today: dt.date, guardian: bool = False) -> list:
    """The loans that get letter `kind` today, in the order given: past their
    due date, without this letter (of this variant) for this due date yet
    and, for the later letters, with the letter before it written
    LETTER_GAP_DAYS or more ago. ``ledger`` maps (patron_id, barcode,
    due_date, ledger kind) to the day written."""
    before = PREVIOUS_LETTER.get(kind)
    kind, before = ledger_kind(kind, guardian), before and ledger_kind(before, guardian)
    latest = today - dt.timedelta(days=LETTER_GAP_DAYS)
    chosen = []
    for loan in loans:
        key = (loan["patron_id"], loan["barcode"], loan["due_date"])
        if loan["due_date"] >= today.isoformat() or (*key, kind) in ledger:
            continue
        if before:
            day = ledger.get((*key, before))
            if day is None or day > latest:
                continue
        chosen.append(loan)
    return chosen


def plan_letters(settings: Settings, kind: str, loans, ledger: dict, guardian: bool,
                 today: dt.date) -> list[Letter]:
    """One rendered letter per patron, from loans sorted by patron."""
    template = load_template(settings, kind)
    before = PREVIOUS_LETTER.get(kind)
    by_patron: dict[str, list] = {}
    for loan in letter_loans(kind, loans, ledger, today, guardian):
        by_patron.setdefault(loan["patron_id"], []).append(loan)
    letters = []
    for items in by_patron.values():
        patron = items[0]
        values = notice_values(settings, patron, items, today, barcodes=False)
        first = values["first_name"] or values["patron_name"]
        values["addressee"] = addressee(patron, True) if guardian else first
        values["your"] = f"{first}'s" if guardian else "your"
        if before:
            latest = max(ledger[(x["patron_id"], x["barcode"], x["due_date"],
                                 ledger_kind(before, guardian))] for x in items)
            values["previous_sent"] = latest.strftime(settings.date_format)
        subject, body = template.fill(values)
        address, problem = recipient(patron, guardian)
        to_name = "Parent or guardian of " + values["patron_name"] if guardian \
            else values["patron_name"]
        letters.append(Letter(dict(patron), items, address, problem, subject, body, to_name))
    return letters


def is_iso_date(text) -> bool:
    """True for a real date written yyyy-mm-dd, as the loans table keeps them."""
    if not isinstance(text, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return False
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def overdue_rows(db: sqlite3.Connection, today: dt.date,
                 group: str | None) -> tuple[list[dict], list[dict]]:
    """The loans past their due date, with their patron's details (name None
    for a patron id the patrons list does not know), by patron name and due
    date; and the loans whose due date is not a date at all."""
    sql = ("SELECT l.patron_id, l.barcode, l.title, l.due_date, p.name, p.email, "
           "p.guardian_email, p.grp, p.first_name FROM loans l LEFT JOIN patrons p "
           "ON p.patron_id = l.patron_id")
    params: list = []
    if group is not None:
        sql += " WHERE p.grp = ? COLLATE NOCASE"
        params.append(group)
    sql += " ORDER BY p.name COLLATE NOCASE, l.patron_id, l.due_date, l.title"
    rows = [dict(row) for row in db.execute(sql, params)]
    rows.sort(key=lambda r: ((r["grp"] or "").casefold(), surname(r) if r["name"] else "",
                             (r["name"] or "").casefold(), r["patron_id"]))
    dated = [r for r in rows if is_iso_date(r["due_date"])]
    undated = [r for r in rows if not is_iso_date(r["due_date"])]
    return [r for r in dated if r["due_date"] < today.isoformat()], undated


def letter_ledger(db: sqlite3.Connection) -> dict:
    """(patron_id, barcode, due_date, ledger kind) -> the day each letter was written."""
    kinds = LETTER_KINDS + tuple(ledger_kind(kind, True) for kind in LETTER_KINDS)
    rows = db.execute("SELECT patron_id, barcode, due_date, kind, queued_at FROM notices "
                      f"WHERE kind IN ({','.join('?' * len(kinds))})", kinds)
    return {(r[0], r[1], r[2], r[3]): local_day(r[4]) for r in rows}


def check_letter_request(db: sqlite3.Connection, kind: str, group: str | None,
                         output: str) -> None:
    """Refuse an unknown letter, output or group, with the choices. Raises UsageError."""
    if kind not in LETTER_KINDS:
        raise UsageError(f"{kind!r} is not a letter report; use {', '.join(LETTER_KINDS[:-1])} "
                         f"or {LETTER_KINDS[-1]}.")
    if output not in LETTER_OUTPUTS:
        raise UsageError(f"--output {output!r}: use email (queue the letters) or print "
                         "(one HTML file to print).")
    if group is None:
        return
    groups = [r[0] for r in db.execute("SELECT DISTINCT grp FROM patrons WHERE grp != '' "
                                       "ORDER BY grp COLLATE NOCASE")]
    if group.lower() not in {g.lower() for g in groups}:
        known = (f"the groups are {', '.join(groups[:40])}{' ...' if len(groups) > 40 else ''}"
                 if groups else "no patron has a group yet (import the patrons file first)")
        raise UsageError(f"There is no patron group {group!r}; {known}.")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def run_letters(settings: Settings, journal: Journal, kind: str, *, group: str | None = None,
                guardian: bool = False, output: str = "email", dry_run: bool = False,
                preview: bool = False, today: dt.date | None = None,
                now: float | None = None) -> LetterRun:
    """Run one letter report: find who gets letter `kind`, then queue the
    letters (output "email") or write them to one HTML file (output "print").
    With output "email", letters for patrons without a usable address go to
    a print file. Every letter written is recorded in the notices ledger (the
    guardian variant apart), so the same letter never goes twice for one
    loan and due date; letters to the group TEST are never recorded.

    now: the clock (default: the time now); today: the day (default: now's
    day; given alone, now is that day at noon). dry_run: decide and render,
    change nothing. preview: write the print file of every letter, queue and
    record nothing. Raises UsageError for an unknown kind, output or group,
    TemplateError for a broken template, Busy when another letter or
    auto-overdue run is queueing, BibliogateError when the print file
    cannot be written."""
    if now is None:
        now = time.time() if today is None else \
            dt.datetime.combine(today, dt.time(12)).timestamp()
    today = today or local_day(now)
    db = journal.db
    check_letter_request(db, kind, group, output)
    rows, undated = overdue_rows(db, today, group)
    orphans = sorted({r["patron_id"] for r in rows if r["name"] is None})
    known = [r for r in rows if r["name"] is not None]
    letters = plan_letters(settings, kind, known, letter_ledger(db), guardian, today)
    run = LetterRun(kind, group, guardian, output, dry_run, letters, preview, orphans,
                    [f"{r['barcode']} ({r['due_date']!r})" for r in undated])
    if dry_run or not letters:
        if not dry_run and not preview:
            journal.event("letters", letters_summary(run))
        return run
    ahead = count_spool(settings.spool)[0] if run.to_email else 0
    if run.to_email:
        queue_letters(settings, db, run, now)
    if run.to_print:
        run.print_file = print_letters(settings, db, run, today, now)
    if run.queued:
        run.departure = departure_sentence(settings, db, len(run.queued), ahead, now)
    if not preview:
        journal.event("letters", letters_summary(run),
                      level=logging.WARNING if run.failed else logging.INFO)
    return run


def record_letter(db: sqlite3.Connection, run: LetterRun, letter: Letter, now: float,
                  file: str | None, replace: bool = False) -> None:
    """One ledger row per loan of the letter, under its variant's name; a
    row already there raises sqlite3.IntegrityError (or, with replace, is
    left as it is). A preview, and a letter to the group TEST, record nothing."""
    if run.preview or is_test_patron(letter.patron):
        return
    verb = "INSERT OR IGNORE" if replace else "INSERT"
    kind = ledger_kind(run.kind, run.guardian)
    db.executemany(f"{verb} INTO notices(patron_id, barcode, kind, due_date, queued_at, file) "
                   "VALUES (?,?,?,?,?,?)",
                   [(x["patron_id"], x["barcode"], kind, x["due_date"], now, file)
                    for x in letter.loans])


def letter_file_name(run: LetterRun, letter: Letter) -> str:
    """The spool file's name, the same for the same letter (variant, patron,
    loans and due dates: the ledger's key), so a run repeated after a crash
    recognises what it queued. A letter to the group TEST is never recorded
    and goes at each run: its name is new each time."""
    kind = ledger_kind(run.kind, run.guardian)
    key = "\n".join([kind, letter.patron["patron_id"]] + sorted(
        f"{x['barcode']}\t{x['due_date']}" for x in letter.loans))
    if is_test_patron(letter.patron):
        key += f"\n{secrets.token_hex(8)}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return f"{kind.replace('_', '-')}-{digest}{WAITING_EXT}"


def queue_letters(settings: Settings, db: sqlite3.Connection, run: LetterRun,
                  now: float) -> None:
    """Queue the run's email letters, then record them, LEDGER_BATCH at a
    time: the files of a batch are written and flushed together, then their
    ledger rows committed in one transaction. Queue first, record second
    (as queue_notices): a crash in between loses nothing, and the run
    repeated finds the files by name and only records them. Under the
    auto-overdue lock, so two runs never queue the same letter; a letter
    another run recorded first is counted in run.skipped. A spool that
    cannot be written stops the run (run.failed); what was queued stays."""
    with circulation_lock(settings, "Another auto-overdue or letter run is going on right "
                          "now; try again in a minute."):
        done = letter_ledger(db)
        kind = ledger_kind(run.kind, run.guardian)
        todo = []
        for letter in run.to_email:
            if not is_test_patron(letter.patron) and any(
                    (x["patron_id"], x["barcode"], x["due_date"], kind) in done
                    for x in letter.loans):
                run.skipped += 1
            else:
                todo.append((letter, letter_file_name(run, letter)))
        queued = queued_before(settings.spool, db, [name for _, name in todo])
        mtime = min(now, time.time()) - OWN_FILE_AGE
        for i in range(0, len(todo), LEDGER_BATCH):
            batch = todo[i:i + LEDGER_BATCH]
            files = [(name, compose(settings, x.address, x.subject, x.body, x.to_name, now))
                     for x, name in batch if name not in queued]
            try:
                write_files(settings.spool, files, mtime)
            except SpoolError as exc:
                run.failed = f"{exc} The letters not queued are queued at the next run."
                return
            with db:
                for letter, name in batch:
                    record_letter(db, run, letter, now, file=name, replace=True)
            run.queued += [settings.spool / name for _, name in batch]


def print_letters(settings: Settings, db: sqlite3.Connection, run: LetterRun,
                  today: dt.date, now: float) -> Path:
    """Write the print file, then record its letters (not for a preview). Raises
    BibliogateError when the letters folder cannot be written."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    stem = f"{run.kind}{'-guardian' if run.guardian else ''}-{stamp}"
    if run.preview:
        stem += "-preview"
        note = (f"PREVIEW: {_plural(len(run.to_print), 'letter')} as the report would write "
                "them. Nothing was queued or recorded: run the report without --preview to "
                "send or print them for real.")
        reasons = [f"{one_line(x.patron['name'])} ({x.patron['patron_id']}): has {x.problem}, "
                   "so this letter would be printed, not emailed" for x in run.unsendable]
    elif run.output == "email":
        stem += "-not-emailed"
        note = (f"{_plural(len(run.to_print), 'letter')} that could not be emailed, for want "
                "of a usable address. Print them and hand them out, and put the addresses "
                "right in the library system:")
        reasons = [f"{one_line(x.patron['name'])} ({x.patron['patron_id']}): has {x.problem}"
                   for x in run.to_print]
    else:
        note, reasons = (f"{_plural(len(run.to_print), 'letter')}, each on a new page, by "
                         "class and surname; each class starts with a list for its teacher."), []
    page = letters_html(settings, f"{run.kind} letters, {today.isoformat()}", note, reasons,
                        run.to_print, today)
    folder = settings.base / LETTERS_FOLDER
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise BibliogateError(f"The folder {folder} cannot be created ({exc.strerror}); "
                              "give this account the right to create it.") from None
    path = free_name(folder, stem, ".html")
    write_atomic(path, page.encode("utf-8"))
    with db:
        for letter in run.to_print:
            record_letter(db, run, letter, now, file=path.name, replace=True)
    return path


#: The print file: a cover page for each class, then a page per letter; the
#: note at the top shows on screen only. Filled by render(): escaped.
LETTERS_PAGE = string.Template("""\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>$title</title>
<style>
  @page { margin: 2cm; }
  body { font: 12pt/1.5 Georgia, "Times New Roman", serif; color: #000; margin: 0; }
  .note { font: 11pt/1.4 sans-serif; background: #fff8dc; border: 1px solid #c9b458;
          padding: .5em 1em; margin: 1em; }
  .letter, .cover { padding: 1.5em; page-break-after: always; break-after: page; }
  .letter:last-child { page-break-after: auto; break-after: auto; }
  .head { display: flex; justify-content: space-between; font-size: 10pt;
          border-bottom: 1px solid #888; margin-bottom: 2em; }
  .who { font-size: 10pt; margin-bottom: 1.5em; }
  h1 { font-size: 14pt; margin: 0 0 1em; }
  .cover table { border-collapse: collapse; width: 100%; font-size: 11pt; }
  .cover th, .cover td { border-bottom: 1px solid #bbb; text-align: left; padding: .3em;
                         vertical-align: top; }
  .body { white-space: pre-wrap; }
  @media screen { .letter + .letter, .cover { border-top: 3px dashed #bbb; } }
  @media print { .note { display: none; } .letter, .cover { padding: 0; } }
</style>
</head>
<body>
<div class="note"><p>$note</p>$reasons<p>Print with Ctrl+P; this note is not printed.</p></div>
$pages
</body>
</html>
""")

COVER_HTML = string.Template("""\
<section class="cover">
<div class="head"><span>$library</span><span>$today</span></div>
<h1>$heading</h1>
<p>$count. The letters follow, in this order.</p>
<table><thead><tr><th>Pupil</th><th>Items</th></tr></thead>
<tbody>$rows</tbody></table>
</section>""")

COVER_ROW = string.Template("<tr><td>$name</td><td>$items</td></tr>")

LETTER_HTML = string.Template("""\
<section class="letter">
<div class="head"><span>$library</span><span>$today</span></div>
<div class="who">$to_name<br>$patron</div>
<h1>$subject</h1>
<div class="body">$body</div>
</section>""")

LETTER_REASON = string.Template("<li>$text</li>")


def letters_html(settings: Settings, title: str, note: str, reasons: list[str],
                 letters: list[Letter], today: dt.date) -> str:
    """The print file's HTML: for each group (class), a cover page listing its
    pupils and their items for the class teacher, then its letters, by
    surname. Every value goes through render(), which escapes it."""
    library, day = settings.library_name, today.strftime(settings.date_format)
    reason_list = Html("<ul>" + join(render(LETTER_REASON, text=r) for r in reasons) + "</ul>") \
        if reasons else ""
    pages = []
    for group, found in itertools.groupby(letters, key=lambda x: one_line(x.patron.get("grp") or "")):
        members = list(found)
        pages.append(cover_page(settings, group, members, day))
        for x in members:           # the class, to hand it out; no account number
            pages.append(render(LETTER_HTML, library=library, today=day, to_name=x.to_name,
                                patron=f"Class {group}" if group else "",
                                subject=x.subject, body=x.body.rstrip("\n")))
    return render(LETTERS_PAGE, title=title, note=note, reasons=reason_list,
                  pages=Html("\n".join(pages)))


def cover_page(settings: Settings, group: str, members: list[Letter], day: str) -> Html:
    """A class's cover page: its pupils and their items, for the class teacher."""
    rows = join(render(COVER_ROW, name=one_line(x.patron["name"]), items=Html("<br>".join(
        esc(f"{one_line(loan['title'])}, due {show_date(settings, loan['due_date'])}")
        for loan in x.loans))) for x in members)
    return render(COVER_HTML, library=settings.library_name, today=day, rows=rows,
                  heading=f"Class {group}" if group else "Pupils without a class",
                  count=_plural(len(members), "letter"))


def departure_time(start: float, ahead: int, count: int, per_check: int,
                   interval: float) -> float:
    """When the last of `count` new messages leaves, behind `ahead` waiting
    ones, at per_check a check, the first check at `start`."""
    checks = -(-(ahead + count) // per_check)
    return start + (checks - 1) * interval


def departure_sentence(settings: Settings, db: sqlite3.Connection, count: int, ahead: int,
                       now: float) -> str:
    """The sentence "12 letters queued; at 10 every 3 minutes the last leaves
    about 14:35", or why they wait."""
    minutes = settings.interval / 60
    rate = f"at {settings.per_check} every {minutes:g} minute{'' if minutes == 1 else 's'}"
    queued = f"{_plural(count, 'letter')} queued" + \
        (f" (behind {ahead} already waiting)" if ahead else "")
    if settings.problems:
        return (f"{queued}; they wait until the settings are put right (see `status`), "
                f"then leave {rate}.")
    if not run_is_active(settings.ini_path):
        wait = departure_time(0, ahead, count, settings.per_check, settings.interval)
        after = (f"the last leaves about {_duration(wait)} after that" if wait else
                 "they all leave at its first check")
        return (f"{queued}; BiblioGate is not running, so they leave once `python "
                f"bibliogate.py run` starts: {rate} {after}.")
    next_check = get_state(db, "next_check")
    start = next_check if isinstance(next_check, (int, float)) and next_check > now else now
    last = departure_time(start, ahead, count, settings.per_check, settings.interval)
    when = time.strftime("%H:%M", time.localtime(last))
    if local_day(last) != local_day(now):
        when += f" on {local_day(last).strftime(settings.date_format)}"
    return f"{queued}; {rate} the last leaves about {when}."


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 120:
        return _plural(minutes, "minute")
    return f"{minutes // 60} hours {_plural(minutes % 60, 'minute')}"


def letters_summary(run: LetterRun) -> str:
    """One line for the journal."""
    what = (f"{run.kind} ({'guardian' if run.guardian else 'patron'} variant, "
            f"{'group ' + run.group if run.group else 'all groups'}, {run.output})")
    parts = [_plural(len(run.letters), "letter"), f"{len(run.queued)} queued"] + [
        text for present, text in (
            (run.print_file, f"{len(run.to_print)} to print in "
                             f"{run.print_file.name if run.print_file else ''}"),
            (run.unsendable, f"{len(run.unsendable)} without a usable address"),
            (run.skipped, f"{run.skipped} already written by another run"),
            (run.tests, f"{len(run.tests)} to the group {TEST_GROUP}, not recorded"),
            (run.orphans, f"{_plural(len(run.orphans), 'patron id')} not in the patrons list"),
            (run.undated, f"{_plural(len(run.undated), 'loan')} without a readable due date"),
            (run.failed, f"stopped: {run.failed}")) if present]
    return f"letters {what}: {', '.join(parts)}"


def letters_report(run: LetterRun) -> list[str]:
    """What `letters` prints, line by line."""
    variant = "guardian" if run.guardian else "patron"
    scope = f"group {run.group}" if run.group else "all groups"
    lines = []
    if run.dry_run:
        lines.append(f"Dry run of {run.kind} for {scope} ({variant} variant, output "
                     f"{run.output}); nothing is queued, written or recorded.")
        for x in run.letters:
            where = (f"email to {x.address}" if x.address and run.output == "email" else
                     "print" + (f" (has {x.problem})" if x.problem else ""))
            lines.append(f"  {one_line(x.patron['name'])} ({x.patron['patron_id']}): "
                         f"{where}, {_plural(len(x.loans), 'item')}")
        lines.append(f"{_plural(len(run.letters), 'letter')} would be written: "
                     f"{len(run.to_email)} by email, {len(run.to_print)} to print.")
    elif run.preview and run.print_file:
        lines.append(f"Preview of {run.kind} for {scope} ({variant} variant): "
                     f"{_plural(len(run.letters), 'letter')} in {run.print_file}. Nothing was "
                     "queued or recorded; run it again without --preview to send them.")
        lines += [f"  {one_line(x.patron['name'])} ({x.patron['patron_id']}): has {x.problem}, "
                  "so this letter would be printed" for x in run.unsendable]
    elif not run.letters:
        before = PREVIOUS_LETTER.get(run.kind)
        why = (f" (it goes only for loans that had {before} at least {LETTER_GAP_DAYS} days "
               "ago and are still out)" if before else "")
        lines.append(f"No patron needs {run.kind} today in {scope}{why}.")
    else:
        if run.departure:
            lines.append(run.departure)
        if run.skipped:
            lines.append(f"{_plural(run.skipped, 'letter')} had just been queued by another "
                         "run and were not queued again.")
        if run.output == "email" and run.unsendable:
            lines.append(f"{_plural(len(run.unsendable), 'patron')} cannot be emailed; print "
                         "their letters from the file below:")
            lines += [f"  {one_line(x.patron['name'])} ({x.patron['patron_id']}): has {x.problem}"
                      for x in run.unsendable]
        if run.print_file:
            lines.append(f"{_plural(len(run.to_print), 'letter')} to print: {run.print_file}")
        if run.tests:
            lines.append(f"{_plural(len(run.tests), 'letter')} to the group {TEST_GROUP} "
                         "were not recorded: a test uses up no pupil's real letter.")
    if run.failed:
        done = len(run.queued)
        lines.append(f"Stopped after queueing {_plural(done, 'letter')}: {run.failed} The "
                     "letters not queued are not recorded; run the report again to write them.")
    if run.orphans:
        shown = ", ".join(run.orphans[:20]) + (" ..." if len(run.orphans) > 20 else "")
        lines.append(f"Overdue loans of {_plural(len(run.orphans), 'patron id')} not in the "
                     f"patrons list got no letter ({shown}); import the patrons file again.")
    if run.undated:
        shown = ", ".join(run.undated[:20]) + (" ..." if len(run.undated) > 20 else "")
        lines.append(f"{_plural(len(run.undated), 'loan')} got no letter because the due date "
                     f"is not a date ({shown}); import the loans file again.")
    return lines


def cmd_letters(args, settings: Settings) -> int:
    journal = Journal(settings.database)
    try:
        run = run_letters(settings, journal, args.kind, group=args.group,
                          guardian=args.guardian, output=args.output, dry_run=args.dry_run,
                          preview=args.preview)
    finally:
        journal.close()
    print("\n".join(letters_report(run)))
    return 1 if run.failed else 0


# Mailto ######################################################################
#
# The tech note's "direct" email: the [Email] button opens a new message in
# the librarian's own mail program, addressed and filled in, to change and send.

#: The longest percent-encoded body put in a mailto: link. Mail programs and
#: Windows itself cut or refuse links of about 2,000 characters or more, and
#: the address and subject need room beside the body.
MAILTO_BODY_LIMIT = 1800


def _encode(text: str) -> str:
    """RFC 6068: UTF-8, percent-encoded, line breaks as %0D%0A, never '+'."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    return urllib.parse.quote(text, safe="")


def fit_body(body: str, limit: int = MAILTO_BODY_LIMIT) -> str:
    """The body, or as many whole lines of it as fit in `limit` encoded
    characters, followed by a line saying how many items were left out."""
    if len(_encode(body)) <= limit:
        return body
    lines = body.rstrip("\n").split("\n")
    items_left = sum(1 for line in lines if line.startswith("- "))
    kept: list[str] = []
    used = 0
    for line in lines:
        note = fit_note(items_left)
        cost = len(_encode(line + "\n"))
        if used + cost + len(_encode("\n" + note)) > limit:
            return "\n".join(kept + ["", note])
        kept.append(line)
        used += cost
        items_left -= line.startswith("- ")
    return "\n".join(kept)


def fit_note(left_out: int) -> str:
    more = f": {_plural(left_out, 'more item')} not shown" if left_out else ""
    return f"[Shortened to fit in an email link{more}. The library system lists them all.]"


def mailto_url(address: str, subject: str, body: str, limit: int = MAILTO_BODY_LIMIT) -> str:
    """A mailto: link (RFC 6068) with the address, subject and body encoded."""
    return (f"mailto:{urllib.parse.quote(address, safe='@')}"
            f"?subject={_encode(one_line(subject))}&body={_encode(fit_body(body, limit))}")


def build_mailto(settings: Settings, db: sqlite3.Connection, patron_id: str,
                 guardian: bool = False, today: dt.date | None = None) -> str:
    """The direct-email link for one patron, or with guardian=True for their
    guardian: the `direct` template's subject, and a body listing every item
    on loan. Raises UnknownPatron for an id not in the patrons list, NoEmail
    when there is no usable address, TemplateError for a broken template."""
    today = today or dt.date.today()
    patron = db.execute("SELECT * FROM patrons WHERE patron_id = ?",
                        (str(patron_id).strip(),)).fetchone()
    if patron is None:
        raise UnknownPatron(str(patron_id))
    address, problem = recipient(patron, guardian)
    if not address:
        raise NoEmail(patron, problem)
    rows = db.execute("SELECT * FROM loans WHERE patron_id = ? ORDER BY due_date, title",
                      (patron["patron_id"],)).fetchall()
    loans = [r for r in rows if is_iso_date(r["due_date"])]
    values = notice_values(settings, patron, loans, today)
    values["addressee"] = addressee(patron, guardian)
    values["your"] = f"{first_name(patron)}'s" if guardian else "your"
    values["item_count"] = len(rows)
    items = [values["items"]] if loans else []
    items += [f"- {one_line(r['title'])} (barcode {one_line(r['barcode'])}), due "
              f"{one_line(r['due_date'])}" for r in rows if not is_iso_date(r["due_date"])]
    values["items"] = "\n".join(items) or "- nothing on loan just now"
    subject, body = load_template(settings, "direct").fill(values)
    return mailto_url(address, subject, body)


def open_link(url: str, windows: bool = os.name == "nt") -> None:
    """Hand a mailto: link to the default mail program, as the Circulation [Email] button
    does. Raises BibliogateError when no program here opens it."""
    if windows and hasattr(os, "startfile"):
        try:
            os.startfile(url)
        except OSError as exc:
            raise BibliogateError(f"Windows could not open the email link ({exc.strerror or exc}); "
                                  "choose a default email program in Settings > Apps > Default "
                                  "apps, or copy the link above into your mail program.") from None
    elif not open_in_browser(url):
        raise BibliogateError("No program here opens email links; copy the link above "
                              "into your mail program, or set a default mail program.")


def cmd_mailto(args, settings: Settings) -> int:
    db = open_db(settings.database)
    try:
        url = build_mailto(settings, db, args.patron_id, guardian=args.guardian)
    finally:
        db.close()
    print(url)
    if args.open:
        open_link(url)
    return 0


def add_letter_commands(command: Callable) -> None:
    """The `letters` and `mailto` commands (given build_parser's `command`)."""
    p = command("letters", cmd_letters, "write an overdue letter to every patron who needs it")
    p.add_argument("kind", metavar="KIND", help=", ".join(LETTER_KINDS))
    p.add_argument("--group", metavar="G", help="only patrons of this group")
    p.add_argument("--guardian", action="store_true",
                   help="write to each patron's guardian email instead")
    p.add_argument("--output", default="email", metavar="email|print",
                   help="queue the letters as email (the default) or write one file to print")
    p.add_argument("--dry-run", action="store_true", help="list who would get what; change nothing")
    p.add_argument("--preview", action="store_true",
                   help="write the print file of every letter to read first; queue and record nothing")
    p = command("mailto", cmd_mailto, "print (or open) a direct-email link for one patron")
    p.add_argument("patron_id", metavar="PATRON_ID")
    p.add_argument("--guardian", action="store_true", help="to the patron's guardian")
    p.add_argument("--open", action="store_true", help="open it in the default mail program")
# Operations ##################################################################
#
# Every action on the queue and the patrons, whoever asks for it: the command
# line and the config page both call these, and differ only in how they show
# the result. `by` names who asked, for the journal ("config page"); it is
# empty for the command line.

def noted(detail: str, by: str) -> str:
    """A journal detail, with who asked for it when that was not the command line."""
    return f"{detail} ({by})" if by else detail


def queue_test(settings: Settings, to: str, now: float) -> Path:
    """Queue the test message (the tech note's [Test] button). Raises BibliogateError when
    there is no valid test address."""
    if not valid_address(to):
        raise BibliogateError("There is no test address: set [gateway] test_to_address or use "
                              "--to name@school.example." if not to else
                              f"{to!r} is not an email address.")
    values = {"library_name": settings.library_name or "library", "to_address": to,
              "from_address": settings.from_address or "(not set)",
              "smtp_host": settings.smtp_host or "(not set)", "queued_at": fmt_time(now)}
    subject, body = load_template(settings, "test").fill(values)
    return enqueue_bytes(settings.spool, compose(settings, to, subject, body, now=now),
                         now, priority=True, label="test")


def queue_test_message(settings: Settings, journal: Journal, to: str, now: float,
                       by: str = "") -> Path:
    """Queue the test message to `to` and journal it; the file queued.
    Raises BibliogateError for a missing or bad address or template."""
    path = queue_test(settings, to, now)
    journal.event("queued", noted(f"queued a test message to {to}", by), path.name)
    return path


def bad_names(settings: Settings) -> list[str]:
    """The names of the .BAD files, in queue order. Raises SpoolError."""
    return [f.name for f in scan(settings.spool, is_bad_name)]


def retry_file(settings: Settings, journal: Journal, name: str, by: str = "") -> Path:
    """Put one .BAD file back in the queue, as a new try from the start: its
    retry state is forgotten. The file's new path. Raises SpoolError (no such
    .BAD file, or a name outside the queue) or OSError (it cannot be renamed)."""
    path = retry_bad(settings.spool, name)
    with journal.db:
        forget_retry_state(journal.db, path.name)
    journal.event("retry", noted(f"put back in the queue as {path.name}", by), name)
    return path


def delete_queued(settings: Settings, journal: Journal, name: str, by: str = "") -> None:
    """Delete one waiting or .BAD file for good. Raises SpoolError (no such
    file, or a name outside the queue) or OSError (it cannot be removed)."""
    delete_file(settings.spool, name)
    journal.event("deleted", noted("deleted from the queue", by), name)


def send_now(gateway: Gateway) -> None:
    """Ask the running gateway for a check within a few seconds. Raises
    BibliogateError while the settings stop the sender."""
    if gateway.settings.problems:
        raise BibliogateError("The sender is stopped: fix the settings first.")
    gateway.request_check()


def send_once(settings: Settings, every: bool = False) -> CheckResult:
    """One check in this process, as `run` makes them; with `every`, every
    waiting message, whatever its retry wait. Raises SettingsError while the
    settings stop the sender."""
    if settings.problems:
        raise SettingsError(settings.problems)
    journal = Journal(settings.database)
    return Sender(settings, journal).check(limit=0 if every else None, ignore_waits=every)


@dataclasses.dataclass(frozen=True)
class PatronEdit:
    """What edit_patron did: nothing if there are errors ({field: sentence})."""
    name: str
    changed: list
    errors: dict


def edit_patron(journal: Journal, patron_id: str, values: dict, by: str = "") -> PatronEdit:
    """Change a patron's email, guardian_email, grp and auto_overdue, if
    patron_problems finds none in `values`. Raises UnknownPatron."""
    db = journal.db
    row = db.execute("SELECT * FROM patrons WHERE patron_id = ?", (patron_id,)).fetchone()
    if row is None:
        raise UnknownPatron(patron_id)
    errors = patron_problems(values)
    if errors:
        return PatronEdit(row["name"], [], errors)
    changed = [key for key in values if row[key] != values[key]]
    with db:
        db.execute("UPDATE patrons SET email = ?, guardian_email = ?, grp = ?, auto_overdue = ? "
                   "WHERE patron_id = ?", (values["email"], values["guardian_email"],
                                           values["grp"], values["auto_overdue"], patron_id))
        for key in changed:
            if key in KEPT_EDITS:
                record_patron_edit(db, patron_id, key, row[key], values[key], journal.clock())
    if changed:
        journal.event("patron", noted(f"patron {patron_id}: changed {', '.join(changed)}", by))
    return PatronEdit(row["name"], changed, {})


def patron_problems(values: dict) -> dict:
    """{field: sentence} for the patron form's bad values."""
    errors = {}
    for key in ("email", "guardian_email"):
        if values[key] and not valid_address(values[key]):
            errors[key] = (f"{values[key]!r} is not an email address. Write it as "
                           "name@example.org, or leave it empty.")
    if re.search(r"[\x00-\x1f\x7f]", values["grp"]) or len(values["grp"]) > 60:
        errors["grp"] = "A group is one line of at most 60 characters, such as 7B or Staff."
    return errors


def status_info(settings: Settings, now: float | None = None) -> dict:
    """What `status` tells: is `run` running, the sender's state (or "stuck"),
    the queue, who answers on the page's port, and the fields of STATUS_FIELDS.
    Raises SpoolError if the spool cannot be read."""
    now = time.time() if now is None else now
    db = open_db(settings.database)
    try:
        running = run_is_active(settings.ini_path)
        g = lambda key: get_state(db, key)  # noqa: E731
        waiting, bad = count_spool(settings.spool)        # the names only: no file is opened
        page, page_ok = page_status(settings, db, running)
        info = {
            "running": running, "pid": g("run_pid") if running else None,
            "sender": ("stopped" if settings.problems else (g("sender_state") or "not started"))
            if running else "not running",
            "reason": ("the settings need attention" if settings.problems else g("sender_reason"))
            if running else "`python bibliogate.py run` is not running",
            "problems": settings.problems,
            "waiting": waiting, "bad": bad,
            "last_check": g("last_check"), "next_check": g("next_check") if running else None,
            "login": login_hold(settings, db, time.time()),
            "sent_today": sent_on(db, local_day(time.time()).isoformat()),
            "max_per_day": settings.max_per_day,
            "stuck": running and is_stuck(g("check_done"), now, settings.interval, waiting),
            "page": page, "page_ok": page_ok,
        }
        if info["stuck"]:
            info["sender"], info["reason"] = "stuck", stuck_sentence(g("check_done"), now)
        for key, fn in STATUS_FIELDS.items():
            info[key] = fn(settings, db)
        return info
    finally:
        db.close()


def page_status(settings: Settings, db: sqlite3.Connection, running: bool) -> tuple[str, bool]:
    """Who answers at the config page's address: (a sentence, True if all is
    well). The page proves it is this BiblioGate by answering a random
    challenge with the key `run` keeps in the database (page_nonce)."""
    nonce = get_state(db, "page_nonce") if running else None
    try:
        address, port = web_address(settings)
    except SettingsError as exc:
        return f"not started: {exc}", not running
    if nonce:
        port = get_state(db, "page_port") or port
    host = "127.0.0.1" if address in ("0.0.0.0", "::") or is_loopback(address) else address
    where = f"{host}:{port}"
    challenge = secrets.token_hex(16)
    answer = probe_health(host, port, challenge)
    if answer is None:
        if running and not nonce:
            return f"not started (the log says why); nothing answers at {where}", False
        return (f"not answering at {where}" if running else f"not running; {where} is free",
                not running)
    if nonce and hmac.compare_digest(str(answer.get("proof", "")), page_proof(nonce, challenge)):
        return f"up at {get_state(db, 'page_url') or where}, answered as this BiblioGate", True
    return (f"WARNING: another program answers at {where}. It is not this BiblioGate: do not "
            "type a password into it. Find and stop that program (or set [web] port to a free "
            "port), then restart BiblioGate."), False


def probe_health(host: str, port: int, challenge: str, timeout: float = 3.0) -> dict | None:
    """The JSON of GET /health at host:port; {} for an answer that is not ours,
    None when nothing listens there."""
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", f"/health?challenge={challenge}",
                     headers={"Host": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"})
        data = conn.getresponse().read(65536)
    except ConnectionRefusedError:
        return None
    except (OSError, http.client.HTTPException):
        return {}                   # something holds the port, and it is not a page of ours
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def page_proof(nonce: str, challenge: str) -> str:
    """What the page answers to /health?challenge=...: only the process that
    wrote page_nonce to the database knows it."""
    return hmac.new(nonce.encode(), challenge.encode()[:64], hashlib.sha256).hexdigest()


def run_lock_path(ini_path: Path) -> Path:
    return Path(str(ini_path) + ".lock")


def run_is_active(ini_path: Path) -> bool:
    """True while a `run` holds the lock of this ini."""
    probe = FileLock(run_lock_path(ini_path))
    if probe.acquire():
        probe.release()
        return False
    return True



# Config page #################################################################
#
# The tech note's "SMTP Gateway Manager": a small page that `run` serves from
# a thread of its own on [web] address and port (127.0.0.1:8025 by default).
# It never drives the sender itself: Save writes the ini and asks the loop to
# restart the sender (Gateway.request_reload), "Send now" asks it for a check
# (request_check), so a bad request can only ever fail itself.
#
# A connection beyond MAX_CONNECTIONS is closed at once. A request meets, in
# order: a socket timeout, a deadline and a size limit; HTTP/1.x only, and an
# absolute request line only if it names this page; the Host check (the page
# answers only to its own address, so no other web site can read it through
# DNS rebinding); a login, on 127.0.0.1 too, since other accounts of the
# server reach it as well: a one-time link from `page` (on this computer
# only) or the page password (LoginThrottle makes each address wait longer
# after each wrong one); a session exists only after a login. For a POST, the
# Origin check and the session's form token (no forged cross-site posts).
# Every value shown passes through esc(), and the SMTP password is never put
# in a page.
#
# PageHandler does only that, then routes: GET_PAGES maps an address to a view
# (page_*: a PageContext in, a title and the body's Html out) and POST_ACTIONS
# to an action (post_*: it does one thing, through the Operations section when
# it touches the queue or a patron, and returns where to redirect). A new page
# is a view, its template and a line in GET_PAGES (and PAGE_LINKS for the menu).
# At most PAGE_WORKERS pages are built at once, so the sender keeps its pace;
# Settings, Queue, Patrons and Log are kept (PageCache) and served again while
# nothing they show has changed (SHOWN_BY says what each shows), the browser's
# own form token put in. http.server is imported only when the page starts
# (page_classes), so the commands that serve no page do without it.

#: A form larger than this is refused unread (the Settings form is about 2 KB).
MAX_FORM_BYTES = 1024 * 1024
#: Each read from or write to a browser must finish within this many seconds...
SOCKET_SECONDS = 10.0
#: ...and a whole request must have arrived within this many (looked at
#: every DEADLINE_TICK seconds, by one thread for all the connections).
REQUEST_SECONDS, DEADLINE_TICK = 30.0, 0.25
#: Save waits this long for the loop to restart the sender before answering.
RELOAD_WAIT_SECONDS = 10.0
#: Sessions idle this long are forgotten; at most MAX_SESSIONS are kept.
#: A session is made only at login (see SESSIONS_PER_ADDRESS).
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 200
#: PBKDF2-SHA256 rounds for a new page password (OWASP's advice for 2023).
PASSWORD_ROUNDS = 600_000
MIN_PASSWORD_LENGTH = 8
#: A wrong password makes its client address wait this long before the next
#: try, doubling with each wrong one up to LOGIN_DELAY_MAX; an hour without
#: a try forgets them. Other addresses, and one-time links, never wait.
LOGIN_DELAY_FIRST, LOGIN_DELAY_MAX, LOGIN_FORGET = 1.0, 60.0, 3600.0
#: Addresses remembered by the login throttle at most (the idle ones go first).
LOGIN_ADDRESSES = 10_000
#: Logged-in sessions kept for one client address; its oldest goes first.
SESSIONS_PER_ADDRESS = 20
#: A one-time login link (`page`) works once, within this many seconds.
LOGIN_LINK_SECONDS = 300.0
#: Connections served at once; a connection beyond them is closed at once,
#: so a flood cannot take the process's file handles from the sender. One
#: client address holds at most MAX_CONNECTIONS_PER_ADDRESS of them, so a
#: flood from one computer leaves room for the others.
MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS = 64, 32
#: The Log page lists this many days and shows at most LOG_BYTES of one.
LOG_DAYS_SHOWN, LOG_BYTES = 14, 512 * 1024
#: The Patrons page lists at most this many patrons, the Queue page this
#: many waiting messages (and every .BAD one).
PATRONS_SHOWN = QUEUE_SHOWN = 200
#: At most this many requests build a page at once; the others wait their
#: turn (a form sent is not held back). Python runs one thread at a time, so
#: many pages built together would leave the sender, a thread of the same
#: process, too little time to keep its pace, and would not be done sooner.
PAGE_WORKERS = 2
#: A reading of the spool folder for the pages that took longer than this (a
#: long queue, just after a change) is shown for SPOOL_REST_FACTOR times as long
#: as it took, at most SPOOL_REST_SECONDS, before the folder is read again:
#: read again at every request, it would take most of the process's time.
SLOW_READING_SECONDS, SPOOL_REST_FACTOR, SPOOL_REST_SECONDS = 0.02, 10.0, 1.0
#: The pages kept to be served again (PageCache): at most this many addresses.
PAGES_KEPT = 64
#: Stands for the browser's form token in a kept page. Random, so that no
#: value a page shows (a file name, a subject) can hold it.
TOKEN_MARK = "tokenmark" + secrets.token_hex(16)
#: Keys the digest of bibliogate.ini that the Settings form carries (to notice
#: a hand edit made meanwhile). The page shows the other values of that file,
#: so a plain hash of it would let anyone who can open the page test guesses
#: of the SMTP password offline; this key never leaves the process.
INI_DIGEST_KEY = secrets.token_bytes(32)
#: Words that mean "yes" in the ini, as configparser reads them.
YES_WORDS = frozenset({"1", "yes", "true", "on"})
#: Sent with every answer: no scripts, no framing, no foreign styles or forms.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


# -- the page password -----------------------------------------------------------

def hash_password(password: str, rounds: int = PASSWORD_ROUNDS) -> str:
    """A salted PBKDF2-SHA256 hash, as `set-password` stores it in [web] password_hash."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, rounds)
    return f"pbkdf2_sha256${rounds}${salt.hex()}${digest.hex()}"


def split_hash(stored: str) -> tuple[int, bytes, bytes] | None:
    """(rounds, salt, digest) of a stored hash, or None if it is not one."""
    parts = stored.strip().split("$")
    if len(parts) != 4 or parts[0] != "pbkdf2_sha256":
        return None
    try:
        rounds, salt, digest = int(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
    except ValueError:
        return None
    return (rounds, salt, digest) if 1000 <= rounds <= 10_000_000 and salt and digest else None


def check_password(stored: str, password: str) -> bool:
    parts = split_hash(stored)
    if parts is None:
        return False
    rounds, salt, digest = parts
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, rounds),
                               digest)


# -- who is there: one-time links, the throttle -------------------------------------

def link_host(address: str) -> str:
    """The address a browser on this computer opens the page at."""
    if address in ("0.0.0.0", "localhost") or is_loopback(address):
        return "127.0.0.1" if ":" not in address else "[::1]"
    return "[::1]" if address == "::" else (f"[{address}]" if ":" in address else address)


def new_login_link(db: sqlite3.Connection, address: str, port: int, now: float) -> str:
    """A link that logs in to the page once, within LOGIN_LINK_SECONDS, from
    this computer only. The database keeps a hash of it, never the link."""
    token = secrets.token_urlsafe(32)
    add_login_link(db, token, now + LOGIN_LINK_SECONDS, now)
    return f"http://{link_host(address)}:{port}/login?once={token}"


def from_this_computer(peer: str, local: str) -> bool:
    """Whether a connection comes from this computer: a loopback address, or
    the very address it reached us at (a browser here opening our LAN address)."""
    peer, local = (a[7:] if a.startswith("::ffff:") else a for a in (peer, local))
    return is_loopback(peer) or peer == local


@dataclasses.dataclass
class _Tries:
    failures: int = 0
    until: float = 0.0          #: no password check from this address before then
    busy: bool = False          #: a check from this address is running now


class LoginThrottle:
    """Growing delays per client address, decided before the password is
    checked: admit() and done() run under one lock, so a burst of tries at
    once gets one check through, not one per thread."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.lock = threading.Lock()
        self.tries: dict[str, _Tries] = {}

    def admit(self, address: str) -> float:
        """0.0 if a password check from `address` may run now (it is then
        counted as running), else the seconds to wait."""
        with self.lock:
            now = self.clock()
            entry = self.tries.get(address)
            if entry is None:
                self._forget_idle(now)
                entry = self.tries[address] = _Tries()
            # (a wait longer than the longest is a clock set back: it is over)
            if entry.busy or 0 < entry.until - now <= LOGIN_DELAY_MAX:
                return max(1.0, entry.until - now)
            entry.busy = True
            return 0.0

    def done(self, address: str, ok: bool) -> None:
        with self.lock:
            entry = self.tries.setdefault(address, _Tries())
            entry.busy = False
            if ok:
                del self.tries[address]
                return
            entry.failures += 1
            entry.until = self.clock() + min(LOGIN_DELAY_MAX,
                                             LOGIN_DELAY_FIRST * 2 ** min(entry.failures - 1, 30))

    def _forget_idle(self, now: float) -> None:
        for address in [a for a, e in self.tries.items()
                        if not e.busy and now - e.until > LOGIN_FORGET]:
            del self.tries[address]
        while len(self.tries) >= LOGIN_ADDRESSES:
            idle = [a for a, e in self.tries.items() if not e.busy]
            if not idle:
                break
            del self.tries[min(idle, key=lambda a: self.tries[a].until)]


# -- writing the ini -------------------------------------------------------------

_SECTION_RE = re.compile(r"\[(?P<name>[^\]]+)\]")
_KEY_RE = re.compile(r"(?P<key>[^\s;#\[=:][^=:]*?)(?P<eq>\s*[=:])(?P<rest>.*)", re.S)
#: An inline comment starts at a ';' after whitespace (as configparser reads it).
_COMMENT_RE = re.compile(r"\s;")


def ini_value_problem(value: str) -> str | None:
    """Why bibliogate.ini cannot hold `value` as it is, or None."""
    # Besides control characters: U+0085, U+2028 and U+2029, which end a line
    # for update_ini_text (str.splitlines) though not for configparser.
    if re.search(r"[\x00-\x1f\x7f\x85\u2028\u2029]", value):
        return "must be one line, without tabs or other control characters."
    if value != value.strip():
        return "cannot start or end with a space."
    if re.search(r"(^|\s);", value):
        return ("cannot hold a ';' at its start or after a space: bibliogate.ini reads that "
                "as the start of a comment.")
    return None


def _with_value(match: re.Match, value: str) -> str:
    """A `key = value   ; comment` line with only its value replaced; the
    comment keeps its column when the new value leaves room for it."""
    head, rest = match.group("key") + match.group("eq"), match.group("rest")
    comment = _COMMENT_RE.search(rest)
    if not comment:
        return head + (f" {value}" if value else "")
    width = comment.start() + 1
    return head + (f" {value} " if value else " ").ljust(width) + rest[width:]


def update_ini_text(text: str, changes: dict) -> str:
    """The ini text with new values for `changes` ((section, key) -> value)
    and every other byte as it was: comments, blank lines, unknown keys, line
    endings. A key the text lacks goes after the last key of its section; a
    section it lacks, at the end."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    todo = {(section, key.lower()): value for (section, key), value in changes.items()}
    eol = "\r\n" if "\r\n" in text else "\n"
    out: list[str] = []
    section, ends, done, replacing = None, {}, set(), False
    for line in text[len(bom):].splitlines(keepends=True):
        body = line.rstrip("\r\n")
        indented = body[:1] in (" ", "\t") and body.strip()
        if replacing and indented and not body.lstrip().startswith((";", "#")):
            continue                  # a continuation line of the value replaced
        replacing = False
        comment = _COMMENT_RE.search(body)
        header = _SECTION_RE.fullmatch((body[:comment.start()] if comment else body).strip())
        match: re.Match | None = _KEY_RE.fullmatch(body) if section and not header else None
        if header:
            section = header.group("name")
            ends[section] = len(out) + 1
        elif match:
            ends[section] = len(out) + 1
            key = (section, match.group("key").strip().lower())
            if key in todo:
                line = _with_value(match, todo[key]) + line[len(body):]
                done.add(key)
                replacing = True
        elif indented and section and ends.get(section) == len(out):
            ends[section] = len(out) + 1      # a note that belongs to the key above
        out.append(line)
    for name in dict.fromkeys(s for s, k in todo if (s, k) not in done):
        new = [f"{k} =" + (f" {v}" if v else "") + eol
               for (s, k), v in todo.items() if s == name and (s, k) not in done]
        at = ends.get(name, len(out))
        if at and not out[at - 1].endswith(("\n", "\r")):
            out[at - 1] += eol
        if name not in ends:
            new = ([eol] if out else []) + [f"[{name}]{eol}"] + new
        out[at:at] = new
        ends = {s: e + len(new) if e > at else e for s, e in ends.items()}
    return bom + "".join(out)


def read_ini(path: Path) -> tuple[str, str]:
    """bibliogate.ini as text, and a digest of its bytes to notice a change
    made meanwhile by hand. Raises BibliogateError if it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = DEFAULT_INI.encode("utf-8")
    except OSError as exc:
        raise BibliogateError(f"{path} cannot be read ({exc.strerror}). Check its "
                              "permissions.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BibliogateError(f"{path} is not UTF-8 text. Open it in Notepad and save it "
                              "with the encoding UTF-8.") from None
    return text, hmac.new(INI_DIGEST_KEY, data, hashlib.sha256).hexdigest()[:16]


def save_ini_text(path: Path, text: str) -> None:
    """Replace bibliogate.ini whole or not at all, keeping its permissions (it holds the
    SMTP password). Raises BibliogateError when the file cannot be written; the old one is
    then unchanged."""
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = None
    try:
        write_atomic(path, text.encode("utf-8"))
    except SpoolError as exc:
        raise BibliogateError(f"The settings were not saved: {exc}") from None
    if mode is not None:
        with contextlib.suppress(OSError):
            os.chmod(path, mode)


def set_ini_values(path: Path, changes: dict) -> None:
    text, _ = read_ini(path)
    save_ini_text(path, update_ini_text(text, changes))


# -- where the page listens --------------------------------------------------------

def is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def web_address(settings: Settings) -> tuple[str, int]:
    """[web] address and port; raises SettingsError naming the key."""
    address = settings.get("web", "address").strip() or "127.0.0.1"
    port = settings.get("web", "port").strip()
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", address):
        problems.append(ini_problem("web", "address", address, "not an IP address or name. "
                                    "Use 127.0.0.1 (this computer only) or this server's address."))
    if not port.isdigit() or int(port) > 65535:
        problems.append(ini_problem("web", "port", port, "not a port number. Use 8025, or "
                                    "another free port from 1024 to 65535."))
    if problems:
        raise SettingsError(problems)
    return address, int(port)


def host_allowed(host: str, address: str, port: int) -> bool:
    """Whether a request's Host header names this page. Another name could be
    a web site that points its own name at us (DNS rebinding) to read the page."""
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(\d{1,5}))?", host.strip().lower())
    if not match or int(match.group(2) or 80) != port:
        return False
    name, address = match.group(1).strip("[]"), address.lower()
    if name == address:
        return True
    if is_loopback(address):
        return name in ("localhost", "127.0.0.1", "::1")
    if name == socket.gethostname().lower():
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return address in ("0.0.0.0", "::")     # any address of this computer: an IP is never rebound


# -- HTML ------------------------------------------------------------------------

class Html(str):
    """Text that is HTML already: render() puts it in as it is."""


def esc(value) -> Html:
    """Anything shown on the page, escaped (as html.escape does, quotes too),
    unless it is Html already. (Not html.escape itself: `send` and `status`
    import no module only the page needs; a test compares the two.)"""
    if isinstance(value, Html):
        return value
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return Html(text.replace('"', "&quot;").replace("'", "&#x27;"))


def render(template: string.Template, **values) -> Html:
    return Html(template.substitute({name: esc(value) for name, value in values.items()}))


def join(parts: Iterable) -> Html:
    return Html("".join(esc(part) for part in parts))


PAGE_CSS = """\
:root{--ink:#1c2331;--muted:#5a6374;--line:#d6dae1;--paper:#f5f6f8;--blue:#1d5bb8;
--red:#b3261e;--green:#1e6f32;--amber:#8a5a00}
*{box-sizing:border-box}
body{margin:0;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--ink);background:var(--paper)}
header{background:#203a60;color:#fff;padding:.5rem 1rem;display:flex;flex-wrap:wrap;
align-items:center;gap:.3rem 1rem}
header a{color:#fff;text-decoration:none;padding:.25rem .5rem;border-radius:4px}
header a.brand{font-weight:700;padding-left:0}
header .library{opacity:.8;margin-right:auto}
header nav{display:flex;flex-wrap:wrap;gap:.2rem}
header a[aria-current]{background:rgba(255,255,255,.2)}
header form{margin:0}
header button{background:transparent;border-color:rgba(255,255,255,.6);padding:.2rem .6rem}
main{max-width:62rem;margin:0 auto;padding:1rem}
h1{font-size:1.45rem;margin:.3rem 0 1rem}
h2{font-size:1.15rem;margin:1.4rem 0 .6rem}
fieldset{border:1px solid var(--line);border-radius:8px;background:#fff;margin:0 0 1rem;
padding:.6rem 1rem .8rem}
legend{font-weight:650;padding:0 .3rem}
.field{display:grid;grid-template-columns:15rem 1fr;gap:.2rem 1rem;padding:.35rem 0}
.field>label{font-weight:550;padding-top:.35rem}
.field input[type=text],.field input[type=password],.field select,.search input[type=text]{
width:100%;max-width:30rem;padding:.4rem .5rem;font:inherit;border:1px solid #a9b1be;
border-radius:5px;background:#fff}
.field input[type=checkbox]{width:1.2rem;height:1.2rem;margin:.45rem 0}
.field small{display:block;color:var(--muted)}
.field.invalid input,.field.invalid select{border-color:var(--red);background:#fff5f4}
.error{display:block;color:var(--red);font-weight:600}
.tick{font-weight:normal;margin-left:.5rem;white-space:nowrap}
.buttons{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center;margin:1rem 0}
button,a.button{display:inline-block;font:inherit;line-height:1.3;padding:.4rem .9rem;
border-radius:6px;border:1px solid var(--blue);background:var(--blue);color:#fff;
cursor:pointer;text-decoration:none;white-space:nowrap}
button.plain,a.button.plain{background:#fff;color:var(--blue)}
button.danger{background:var(--red);border-color:var(--red)}
form.inline{display:inline;margin:0}
.flash{padding:.6rem .9rem;border-radius:6px;margin:0 0 1rem;background:#e7f3ea;
border:1px solid #a6d1b0}
.flash.error{background:#fcebea;border-color:#efb3ad}
.state{border-radius:8px;padding:.6rem 1rem;margin:0 0 1rem;background:#fff;
border:1px solid var(--line);border-left:6px solid var(--green)}
.state.stopped{border-left-color:var(--red)}
.state.retrying,.state.paused{border-left-color:var(--amber)}
.state p{margin:.2rem 0}
.state ul{margin:.3rem 0;padding-left:1.2rem}
.muted,.state .times{color:var(--muted)}
.scroll{overflow-x:auto;background:#fff;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#eef0f4;font-weight:600;white-space:nowrap}
.file{display:block;font-family:ui-monospace,Consolas,monospace;font-size:.8rem;
color:var(--muted);overflow-wrap:anywhere}
td.nowrap{white-space:nowrap}
td.actions form,td.actions details,td.actions a.button{display:inline-block;margin:0 .25rem .25rem 0}
details summary{cursor:pointer;color:var(--red)}
tr.bad td{background:#fff7f6}
tr.missing td{background:#fff6e6}
.badge{display:inline-block;padding:0 .45rem;border-radius:1rem;background:var(--amber);
color:#fff;font-size:.85rem;font-weight:600}
.badge.bad{background:var(--red)}
.search{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin-bottom:1rem}
.search input[type=text]{max-width:22rem}
.days{display:flex;flex-wrap:wrap;gap:.3rem;margin-bottom:1rem}
.days a{padding:.2rem .5rem;border:1px solid var(--line);border-radius:5px;background:#fff;
text-decoration:none;color:var(--blue)}
.days a[aria-current]{background:var(--blue);color:#fff}
pre.log{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.6rem .8rem;
font-size:.82rem;white-space:pre-wrap;word-break:break-word;margin:0}
dl.facts{display:grid;grid-template-columns:15rem 1fr;gap:.2rem 1rem;margin:0}
dl.facts dt{font-weight:550}
dl.facts dd{margin:0;word-break:break-all}
@media (max-width:42rem){
.field,dl.facts{grid-template-columns:1fr}
main{padding:.6rem}
header .library{display:none}
}
"""

PAGE_HTML = string.Template("""\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · BiblioGate</title>
<link rel="stylesheet" href="/style.css">
</head>
<body>
<header><a class="brand" href="/">BiblioGate</a><span class="library">$library</span>
<nav>$nav</nav>$logout</header>
<main>
$flash<h1>$title</h1>
$body
</main>
</body>
</html>
""")
NAV_LINK = string.Template('<a href="$href"$current>$label</a>')
LOGOUT_FORM = string.Template('<form method="post" action="/logout">$token'
                              '<button type="submit">Log out</button></form>')
TOKEN_INPUT = string.Template('<input type="hidden" name="token" value="$token">')
FLASH = string.Template('<p class="flash $kind" role="status">$text</p>\n')
STATE_BOX = string.Template("""\
<section class="state $state"><p><strong>Sender: $state</strong> — $reason</p>$problems
<p class="times">Waiting: $waiting · .BAD: $bad · Last check: $last · Next check: $next</p></section>
""")
FIELDSET = string.Template('<fieldset><legend>$legend</legend>\n$fields</fieldset>\n')
FIELD = string.Template("""\
<div class="field$invalid"><label for="$id">$label</label>
<div>$control<small>$hint</small>$error</div></div>
""")
FIELD_ERROR = string.Template('<span class="error">$text</span>')
TEXT_INPUT = string.Template('<input type="text" id="$id" name="$id" value="$value" '
                             'autocomplete="off" spellcheck="false">')
CHECKBOX = string.Template('<input type="checkbox" id="$id" name="$id" value="yes"$checked>')
SELECT = string.Template('<select id="$id" name="$id">$options</select>')
OPTION = string.Template('<option value="$value"$selected>$value</option>')
PASSWORD_INPUT = string.Template(
    '<input type="password" id="$id" name="$id" value="" autocomplete="new-password">'
    '<label class="tick"><input type="checkbox" name="$id.clear" value="yes"> clear it</label>')
SETTINGS_BODY = string.Template("""\
$state
<form method="post" action="/settings" novalidate>$token
<input type="hidden" name="ini_digest" value="$digest">
$fieldsets<div class="buttons"><button type="submit">Save</button>
<span class="muted">Checks every field, writes $ini and restarts the sender.</span></div>
</form>
<form method="post" action="/test">$token<div class="buttons">
<button type="submit" class="plain">Test</button>
<span class="muted">Queues a test message to the saved test address ($test_to) and talks to
the server step by step, as `smtp-check` does (nothing is sent there).</span></div></form>
<h2>Files and the page itself</h2>
<dl class="facts">$facts</dl>
<p class="muted">These are changed in $ini by hand; the page's own settings take effect when
BiblioGate next starts.</p>
""")
FACT = string.Template("<dt>$name</dt><dd>$value</dd>")
QUEUE_BODY = string.Template("""\
$state
<div class="buttons">
<form class="inline" method="post" action="/queue/send-now">$token
<button type="submit">Send now</button></form>
<form class="inline" method="post" action="/queue/retry-all">$token
<button type="submit" class="plain">Retry every .BAD</button></form>
<span class="muted">Folder: $spool</span></div>
$table
""")
QUEUE_TABLE = string.Template("""\
<div class="scroll"><table>
<thead><tr><th>State</th><th>To</th><th>Subject and file</th><th>Age</th><th>Tries</th>
<th>Reason</th><th></th></tr></thead>
<tbody>
$rows</tbody></table></div>
""")
QUEUE_ROW = string.Template("""\
<tr class="$state"><td>$state_label</td><td>$to</td><td>$subject<span class="file">$file</span></td>\
<td class="nowrap">$age</td><td>$attempts</td><td>$reason</td><td class="actions">$retry\
<details><summary>Delete…</summary><form method="post" action="/queue/delete">$token\
<input type="hidden" name="file" value="$file">\
<button type="submit" class="danger">Delete for good</button></form></details></td></tr>
""")
RETRY_FORM = string.Template('<form method="post" action="/queue/retry">$token'
                             '<input type="hidden" name="file" value="$file">'
                             '<button type="submit" class="plain">Retry</button></form>')
LOG_BODY = string.Template("""\
<nav class="days">$days</nav>
<h2>$day</h2>
<p class="muted">$note</p>
<pre class="log">$lines</pre>
""")
PATRONS_BODY = string.Template("""\
<form class="search" method="get" action="/patrons">
<input type="text" name="q" value="$q" placeholder="Name, patron id or group" aria-label="Search">
<label><input type="checkbox" name="missing" value="1"$missing> only those without an email</label>
<button type="submit">Search</button></form>
<p class="muted">$summary</p>
$table
""")
PATRONS_TABLE = string.Template("""\
<div class="scroll"><table>
<thead><tr><th>Id</th><th>Name</th><th>Email</th><th>Guardian email</th><th>Group</th>
<th>Auto-overdue</th><th>Loans</th><th></th></tr></thead>
<tbody>
$rows</tbody></table></div>
""")
PATRON_ROW = string.Template("""\
<tr class="$cls"><td>$id</td><td>$name</td><td>$email</td><td>$guardian</td><td>$group</td>\
<td>$auto</td><td>$loans</td>\
<td class="actions"><a class="button plain" href="$edit">Edit</a> $mail</td></tr>
""")
MAIL_LINK = string.Template('<a class="button" href="$href">$label</a>')
PATRON_BODY = string.Template("""\
<p><strong>$name</strong> · patron $id · $loans on loan</p>
<form method="post" action="/patron" novalidate>$token
<input type="hidden" name="patron_id" value="$id">
<fieldset><legend>Contact and notices</legend>
$fields</fieldset>
<div class="buttons"><button type="submit">Save</button>
<a class="button plain" href="/patrons">Back to patrons</a>$mail</div>
</form>
<p class="muted">$edited An email, guardian email or auto-overdue tick changed here is kept
across patrons.csv imports while the library system still has the value it replaced; when
the library system's value changes, that one is used. The group is always the library
system's: correct it there too.</p>
""")
LOGIN_BODY = string.Template("""\
$message<p>On the computer BiblioGate runs on, open the page with
<code>python bibliogate.py page</code>: it opens this page in the browser, logged in.</p>
$form""")
LOGIN_FORM = string.Template("""\
<form method="post" action="/login">$token
<fieldset><legend>Page password</legend>
<div class="field"><label for="password">Password</label><div>
<input type="password" id="password" name="password" autocomplete="current-password" autofocus>
</div></div>
</fieldset>
<div class="buttons"><button type="submit">Log in</button></div></form>
<p class="muted">The password is set on the server with
<code>python bibliogate.py set-password</code>.</p>
""")
NO_LOGIN_FORM = Html('<p class="muted">No page password is set, so the page opens only '
                     'through <code>page</code>. To log in with a password (and from other '
                     'computers), set one on the server with '
                     '<code>python bibliogate.py set-password</code>.</p>\n')
#: What the login page says after a try: ?m=... -> sentence.
LOGIN_MESSAGES = MappingProxyType({
    "wrong": "Wrong password.",
    "wait": "Too many wrong passwords from this address just now: wait a few seconds (longer "
            "after each wrong one), then try again. On the server, `python bibliogate.py page` "
            "logs in at once.",
    "nohash": "No usable page password is set. On the server, run "
              "`python bibliogate.py set-password`.",
    "used": "This login link was used already or is out of date (a link works once, within "
            "five minutes). Run `python bibliogate.py page` again.",
    "here": "A login link works only on the computer BiblioGate runs on. From here, log in "
            "with the page password.",
    "out": "You are logged out.",
})
NOT_FOUND_BODY = Html('<p>There is no such page here. <a href="/">Back to the settings</a>.</p>')
LOGGED_IN_BODY = Html('<p>You are logged in. <a href="/">Go to the settings</a>.</p>')
NO_PATRON_BODY = string.Template('<p>There is no patron $id. '
                                 '<a href="/patrons">Search the patrons</a>.</p>')
NO_EMAIL_BADGE = Html('<span class="badge">no email</span>')
#: Beside a value changed on this page, which imports keep (see KEPT_EDITS).
EDITED_MARK = Html(' <span class="badge" title="Changed on this page; kept across imports while '
                   'the library system still has the value it replaced.">edited here</span>')
MUTED = string.Template('<p class="muted">$text</p>')
PROBLEM_LIST = string.Template("<ul>$items</ul>")
LIST_ITEM = string.Template("<li>$text</li>")


# -- the settings form ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Field:
    """One setting on the Settings page."""
    section: str
    key: str
    label: str
    hint: str = ""
    kind: str = "text"          #: text, choice, yesno or password
    choices: tuple = ()

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


#: The Settings page, fieldset by fieldset: every setting but [web] and [data].
SETTINGS_FORM = (
    ("SMTP server", (
        Field("smtp", "host", "SMTP server", "IP address or name of the server this school's "
              "computers send mail through."),
        Field("smtp", "port", "Port", "25, 587 (starttls) or 465 (tls)."),
        Field("smtp", "security", "Security", "As the server asks: none, starttls or tls.",
              "choice", SECURITY_CHOICES),
        Field("smtp", "ehlo", "EHLO name", "The name to announce; empty = this computer's name."),
        Field("smtp", "username", "Username", "Leave empty if the server needs no login."),
        Field("smtp", "password", "Password", kind="password"),
        Field("smtp", "auth", "Login with", "password, or oauth2 for Microsoft 365 without basic "
              "authentication (the fields below; see the README).", "choice", AUTH_CHOICES),
        Field("smtp", "oauth_tenant", "OAuth tenant", "oauth2: the school's Microsoft 365 domain "
              "or its Directory (tenant) ID."),
        Field("smtp", "oauth_client_id", "OAuth client ID", "oauth2: the app registration's "
              "Application (client) ID."),
        Field("smtp", "oauth_client_secret", "OAuth client secret", kind="password"),
        Field("smtp", "oauth_token_url", "OAuth token URL", "oauth2: leave empty for Microsoft 365."),
        Field("smtp", "timeout_seconds", "Timeout (seconds)", "For each step of talking to "
              "the server."),
        Field("smtp", "ca_file", "Certificate file", "Only for a relay with a certificate of its "
              "own: the path of its PEM file."),
    )),
    ("Gateway", (
        Field("gateway", "spool_folder", "Folder to monitor", "Message files (*.TMP) saved here "
              "are sent."),
        Field("gateway", "from_address", "From address", "Every message is sent from it; the "
              "daily log goes to it."),
        Field("gateway", "minutes_between_checks", "Minutes between checks", "Decimals allowed, "
              "such as 3 or 0.5."),
        Field("gateway", "messages_per_check", "Messages each check", "At most this many are "
              "sent at each check."),
        Field("gateway", "test_to_address", "Test to address", "Where the Test button sends."),
        Field("gateway", "give_up_after_hours", "Give up after (hours)", "A message the server "
              "keeps refusing for now becomes .BAD after this."),
        Field("gateway", "max_per_day", "Most recipients a day", "The mail service's daily "
              "cap (Microsoft 365: 10000, Google Workspace: 2000); the rest go the next day. "
              "0 = no cap."),
    )),
    ("Auto-Overdue", (
        Field("overdue", "enabled", "Send overdue notices", "Every day at the time below. Check "
              "that test messages arrive first.", "yesno"),
        Field("overdue", "run_at", "Time of the daily run", "24-hour clock, such as 06:30."),
        Field("overdue", "warning_days", "Warning (days before due)"),
        Field("overdue", "overdue_days", "Overdue (days after due)"),
        Field("overdue", "reminder_days", "Reminder (days after due)"),
        Field("overdue", "closed", "Closed days", "No run on these: weekdays and dates, such as "
              "sat, sun, 2026-12-18..2027-01-28. Their notices go on the next open day "
              "(warnings on the last open day before)."),
        Field("overdue", "max_data_age_hours", "Maximum data age (hours)", "No notices from loans "
              "imported longer ago than this."),
        Field("overdue", "send_to", "Send the notices to", "patron_else_guardian: the guardian "
              "when the pupil has no address; both: one message to both.", "choice",
              SEND_TO_CHOICES),
    )),
    ("Library", (
        Field("library", "name", "Library name", "Used in messages."),
        Field("library", "date_format", "Date format", "How due dates are written in imported "
              "files and in messages, such as %d/%m/%Y."),
    )),
)
SETTINGS_FIELDS = tuple(field for _, fields in SETTINGS_FORM for field in fields)
_PROBLEM_KEY_RE = re.compile(r"bibliogate\.ini \[(\w+)\] (\w+)\b")


def form_values(raw: dict) -> dict:
    """The Settings form's values from the ini's (section, key) -> text."""
    return {f.name: raw.get((f.section, f.key), DEFAULTS[f.section][f.key]).strip()
            for f in SETTINGS_FIELDS if f.kind != "password"}


def sort_problems(problems: Iterable[str]) -> tuple[dict, list]:
    """Problems as {form field: first sentence about it} and the others."""
    names = {f.name for f in SETTINGS_FIELDS}
    by_field: dict[str, str] = {}
    other: list[str] = []
    for problem in problems:
        match = _PROBLEM_KEY_RE.match(problem)
        name = f"{match.group(1)}.{match.group(2)}" if match else None
        if name in names:
            by_field.setdefault(name, problem)
        else:
            other.append(problem)
    return by_field, other


def settings_changes(form: dict, raw: dict) -> tuple[dict, dict]:
    """What a posted Settings form changes, ((section, key) -> value), and the
    fields whose value the ini cannot hold ({field: sentence})."""
    changes, errors = {}, {}
    for f in SETTINGS_FIELDS:
        old = raw.get((f.section, f.key), DEFAULTS[f.section][f.key]).strip()
        if f.kind == "password":
            if form.get(f.name + ".clear"):
                new = ""
            elif form.get(f.name):
                new = form[f.name]
                if ini_value_problem(new) is None:
                    new = stored_smtp_password(new)
            else:
                continue                  # empty = keep the stored password
        elif f.kind == "yesno":
            new = "yes" if form.get(f.name) else "no"
            if new == ("yes" if old.lower() in YES_WORDS else "no"):
                continue
        else:
            new = form.get(f.name, "").strip()
        problem = ini_value_problem(new)
        if problem:
            shown = "(hidden)" if f.kind == "password" else new
            errors[f.name] = ini_problem(f.section, f.key, shown, problem)
        elif new != old or f.kind == "password":     # typed again: still its server's
            changes[(f.section, f.key)] = new
    return changes, errors


def secret_moved(changes: dict, raw: dict, typed: bool) -> dict:
    """{field: sentence} when a Save would send the stored client secret to
    another token endpoint than the one it was typed for: it must be typed again."""
    key, where = ("smtp", "oauth_client_secret"), (("smtp", "oauth_token_url"), ("smtp", "oauth_tenant"))
    moved = [f"[{s}] {k}" for s, k in where if (s, k) in changes]
    if typed or key in changes or not raw.get(key, "").strip() or not moved:
        return {}
    return {"smtp.oauth_client_secret": ini_problem(
        "smtp", "oauth_client_secret", "(hidden)", f"type it again: {' and '.join(moved)} changed, "
        "and the secret goes only to the token endpoint it was typed for.")}


def check_settings_form(form: dict, text: str, ini_path: Path,
                        current: Iterable[str]) -> tuple[str, dict, list, list]:
    """Decide a Save: (new ini text, field errors, other errors, changed keys).
    The would-be text is checked by load_settings itself, so the page and a
    hand edit are judged alike. A problem with no field on the form blocks
    the Save only if this change brings it."""
    missing = [f.label for f in SETTINGS_FIELDS if f.kind in ("text", "choice") and f.name not in form]
    if missing:
        return text, {}, [f"The form arrived without {', '.join(missing)}. Reload the page and "
                          "try again."], []
    raw, _ = parse_ini_text(text.lstrip("\ufeff"), ini_path)
    changes, errors = settings_changes(form, raw)
    errors.update(secret_moved(changes, raw, typed=bool(form.get("smtp.oauth_client_secret"))))
    bound = rebind_password(raw, changes)
    new_text = update_ini_text(text, bound)
    by_field, other = sort_problems(load_settings(ini_path, text=new_text.lstrip("\ufeff")).problems)
    if bound.get(("smtp", "password")) == "":     # cleared: the page asks for it beside the field
        by_field.pop("smtp.password", None)
    changes = bound
    if ("gateway", "spool_folder") in changes:
        value = changes[("gateway", "spool_folder")]
        problem = spool_folder_problem(absolute(ini_path.parent, value), ini_path.parent)
        if problem:
            errors["gateway.spool_folder"] = ini_problem("gateway", "spool_folder", value, problem)
    for name, problem in by_field.items():
        errors.setdefault(name, problem)
    general = [p for p in other if p not in current]
    changed = [f"[{section}] {key}" for section, key in changes]
    return new_text, errors, general, changed


#: The page never points the spool at these folders, nor (POSIX_SYSTEM_TREES,
#: WINDOWS_SYSTEM_TREES) at any folder inside the first ones.
POSIX_SYSTEM_TREES = ("/etc", "/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64", "/boot",
                      "/dev", "/proc", "/sys", "/run", "/var/run", "/var/lib", "/var/log")
POSIX_SYSTEM_FOLDERS = ("/", "/var", "/home", "/root", "/opt", "/srv", "/mnt", "/media",
                        "/var/spool", "/var/mail")
WINDOWS_SYSTEM_TREES = ("SystemRoot", "ProgramFiles", "ProgramFiles(x86)", "ProgramW6432")
WINDOWS_SYSTEM_FOLDERS = ("ProgramData", "PUBLIC", "SystemDrive")


def is_system_folder(path: Path, windows: bool = os.name == "nt") -> bool:
    """Whether `path` is (or, for the system trees, is inside) a folder of the
    operating system's own, or a drive's root."""
    if windows:
        trees = [os.environ.get(name, "") for name in WINDOWS_SYSTEM_TREES] + ["C:\\Windows"]
        folders = [os.environ.get(name, "") for name in WINDOWS_SYSTEM_FOLDERS] + \
            [str(Path(os.environ.get("USERPROFILE", "C:\\Users")).parent)]
        norm = lambda p: os.path.normcase(os.path.normpath(p)).rstrip("\\/")  # noqa: E731
    else:
        trees, folders = list(POSIX_SYSTEM_TREES), list(POSIX_SYSTEM_FOLDERS)
        norm = os.path.normpath
    here = norm(str(path))
    if path.parent == path or here in {norm(f) for f in folders if f}:
        return True
    return any(here == norm(t) or here.startswith(norm(t) + os.sep) for t in trees if t)


def spool_folder_problem(path: Path | None, base: Path) -> str | None:
    """Why the page will not point [gateway] spool_folder at `path`, or None.
    A spool folder is trusted: whatever is saved there is mailed from the
    library's address. So it must exist already (the page creates no
    folders), and be no system folder nor one that every account may write."""
    if path is None:
        return "not a usable path."
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (f"no such folder ({path}). The page creates no folders: create it first (with "
                "rights for BiblioGate's account only), or give an existing one.")
    except OSError as exc:
        return f"{path} cannot be used ({exc.strerror})."
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder. Give the folder the library program saves messages in."
    if is_system_folder(path):
        return (f"{path} is a system folder. Use a folder of BiblioGate's own, such as "
                f"{base / 'spool'}.")
    if os.name != "nt" and st.st_mode & stat.S_IWOTH:
        return (f"{path} is writable by every account, so anyone on this server could mail "
                "from the library's address. Use a folder only BiblioGate's account (and the "
                "library program's) can write to.")
    return None


def age_text(seconds: float) -> str:
    minutes = max(0, int(seconds // 60))
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // 1440} days"


def log_days(folder: Path) -> list[str]:
    """The days that have a log file, newest first."""
    days = [p.stem[len("bibliogate-"):] for p in Path(folder).glob("bibliogate-*.log")]
    return sorted((d for d in days if re.fullmatch(r"\d{4}-\d{2}-\d{2}", d)), reverse=True)


def log_tail(path: Path) -> tuple[list[str], bool]:
    """The lines of a log file, newest first, and whether it was cut short."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - LOG_BYTES))
            data = fh.read(LOG_BYTES)
    except FileNotFoundError:
        return [], False
    lines = data.decode("utf-8", "replace").splitlines()
    if size > LOG_BYTES:
        lines = lines[1:]                       # the first one is cut in two
    return lines[::-1], size > LOG_BYTES


# -- the spool as the pages show it ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpoolView:
    """The spool as the pages show it: from the SpoolIndex `run` keeps for its
    checks, so the pages and the sender share one reading of the folder. Two
    readings are equal when they show the same (a kept page compares them)."""
    folder: Path
    bad: list           #: every .BAD file, in queue order
    first: list         #: the first QUEUE_SHOWN waiting files, in sending order
    waiting: int        #: how many files wait in all


def read_spool_view(index: SpoolIndex, last: SpoolView | None = None,
                    version: int | None = None) -> tuple[SpoolView, int]:
    """The reading, and the index's version it shows: `last` again if the index
    has not changed since it showed `version`. Raises SpoolError if the folder
    cannot be read."""
    with index.lock:
        index.refresh()
        if last is not None and version == index.version:
            return last, version
        return SpoolView(index.folder, *index.head(QUEUE_SHOWN)), index.version


# -- pages kept while what they show is the same ----------------------------------

@dataclasses.dataclass(frozen=True)
class KeptPage:
    """A page as built for a logged-in browser, TOKEN_MARK for its form token."""
    shown: tuple        #: what it showed (see SHOWN_BY), compared to what is there now
    until: float        #: the gateway's clock time a time it shows changes (an age)
    data: bytes


class PageCache:
    """The pages last built (menu and log-out button included), each with what it
    showed: the same page is served again, with the browser's own form token put
    in for TOKEN_MARK, while what it would show is the same. Building Queue and
    Patrons (200 rows each) takes far longer than finding out whether anything
    they show has changed. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pages: dict[str, KeptPage] = {}     #: address (path and query) -> page

    def get(self, address: str, shown: tuple, now: float) -> bytes | None:
        with self.lock:
            page = self.pages.get(address)
        if page is not None and now < page.until and page.shown == shown:
            return page.data
        return None

    def put(self, address: str, page: KeptPage) -> None:
        with self.lock:
            self.pages.pop(address, None)
            if len(self.pages) >= PAGES_KEPT:
                del self.pages[next(iter(self.pages))]        # the one kept longest
            self.pages[address] = page


# -- sessions --------------------------------------------------------------------

@dataclasses.dataclass
class PageSession:
    """One browser's visit: its form token, the password hash it logged in
    under (a new password logs everyone out), messages to show once, and a
    refused form to show again."""
    sid: str
    token: str
    login_hash: str
    seen: float
    address: str = ""           #: the client address it logged in from
    flash: list = dataclasses.field(default_factory=list)
    drafts: dict = dataclasses.field(default_factory=dict)


class PageServer(_ServerBase):
    """The config page's server; holds what every request shares. It serves
    as http.server's ThreadingHTTPServer, made by page_classes() when the page
    starts: new_page_server() makes one."""

    daemon_threads = True
    #: On Windows SO_REUSEADDR would let another program take the same port.
    allow_reuse_address = os.name != "nt"
    #: Connections waiting to be taken. socketserver's 5 made a sixth browser
    #: tab (or a few idle connections) wait a second or more for its page.
    request_queue_size = 64

    def __init__(self, gateway: Gateway, address: str, port: int):
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.gateway, self.address = gateway, address
        self._watch: sqlite3.Connection | None = None     #: see data_version
        self._watch_lock = threading.Lock()
        self.closed = threading.Event()
        #: handler -> monotonic time its connection is cut off unless its request has come
        self.deadlines: dict[PageHandler, float] = {}
        self._deadline_lock = threading.Lock()
        self._cutter: threading.Thread | None = None
        super().__init__((address, port), page_classes()[1])
        self.port = self.server_address[1]
        self.loopback = is_loopback(address)
        self.cookie_name = f"bibliogate-{self.port}"
        self.login_cookie = f"{self.cookie_name}-login"      #: the login form's token (no session)
        self.request_seconds = REQUEST_SECONDS
        self.sessions: dict[str, PageSession] = {}
        self.throttle = LoginThrottle(gateway.clock)
        self.connections: dict[str, int] = {}  #: being served now, by client address
        self.lock = threading.Lock()           #: guards sessions and connections
        self.save_lock = threading.Lock()      #: one Save at a time: read, check, write
        self.workers = threading.BoundedSemaphore(PAGE_WORKERS)
        self.pages = PageCache()
        #: The last reading kept for the pages: (the SpoolView, the index it was
        #: read from, the index's version then), set in one store; None: read again.
        self._seen: tuple[SpoolView, SpoolIndex, int] | None = None
        self._view_rest = 0.0               #: monotonic time before which _seen is not read again
        self._view_forgotten = 0            #: how many times forget_spool_view() was called
        self._view_lock = threading.Lock()  #: guards _seen against a page's own change
        self._swept = 0.0                   #: when idle sessions were last forgotten
        #: Proves to `status` that this process answers here (see page_proof).
        self.nonce = secrets.token_hex(16)

    def server_bind(self) -> None:
        # TCPServer's bind only: HTTPServer's also asks DNS for a name, which may be slow.
        import socketserver                 # loaded already, with http.server
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.address, self.server_address[1]

    @property
    def url(self) -> str:
        host = socket.gethostname() if self.address in ("0.0.0.0", "::") else self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def password_hash(self) -> str:
        return self.gateway.settings.get("web", "password_hash").strip()

    def session(self, sid: str) -> PageSession | None:
        """The logged-in session of a cookie, or None. Nothing is made here:
        a session is made only at login, so no request can evict one."""
        now = time.monotonic()
        with self.lock:
            if now - self._swept > 60:          # looked for once a minute, not at every request
                self._swept = now
                for old in [k for k, s in self.sessions.items() if now - s.seen > SESSION_SECONDS]:
                    del self.sessions[old]
            found = self.sessions.get(sid) if sid else None
            if found is not None and now - found.seen > SESSION_SECONDS:
                del self.sessions[sid]          # idle too long, though not yet swept
                found = None
            if found is not None:
                found.seen = now
            return found

    def login(self, address: str, login_hash: str) -> PageSession:
        """A new session, after a right password or a one-time link. One
        address keeps at most SESSIONS_PER_ADDRESS: its oldest goes first."""
        now = time.monotonic()
        with self.lock:
            mine = [k for k, s in self.sessions.items() if s.address == address]
            for sid in sorted(mine, key=lambda k: self.sessions[k].seen)[
                    :max(0, len(mine) - SESSIONS_PER_ADDRESS + 1)]:
                del self.sessions[sid]
            if len(self.sessions) >= MAX_SESSIONS:
                del self.sessions[min(self.sessions, key=lambda k: self.sessions[k].seen)]
            new = PageSession(secrets.token_urlsafe(24), secrets.token_urlsafe(24), login_hash,
                              now, address)
            self.sessions[new.sid] = new
            return new

    def logout(self, session: PageSession) -> None:
        with self.lock:
            self.sessions.pop(session.sid, None)

    def logged_in(self, session: PageSession | None) -> bool:
        """A session made at login, under the page password of now (a new
        password, or a first one, logs everyone out)."""
        return session is not None and self.sessions.get(session.sid) is session and \
            hmac.compare_digest(session.login_hash.encode(), self.password_hash().encode())

    def process_request(self, request, client_address) -> None:
        """At most MAX_CONNECTIONS served at once (MAX_CONNECTIONS_PER_ADDRESS
        from one address); one more is closed at once, before a thread is made."""
        address = client_address[0]
        with self.lock:
            full = sum(self.connections.values()) >= MAX_CONNECTIONS or \
                self.connections.get(address, 0) >= MAX_CONNECTIONS_PER_ADDRESS
            if not full:
                self.connections[address] = self.connections.get(address, 0) + 1
        if full:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:                   # no thread: it will not count itself out
            self._served(address)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._served(client_address[0])

    def _served(self, address: str) -> None:
        with self.lock:
            left = self.connections.get(address, 1) - 1
            if left > 0:
                self.connections[address] = left
            else:
                self.connections.pop(address, None)

    def spool_view(self) -> SpoolView:
        """The spool as the pages show it, from the index the checks keep
        (read again only where the folder changed). While a check or another
        page is reading it, a page shows the last reading rather than wait;
        with none to show it waits. Raises SpoolError."""
        index, seen = self.gateway.spool_index(), self._seen
        last, version = (seen[0], seen[2]) if seen is not None and seen[1] is index else (None, None)
        if last is not None:
            if time.monotonic() < self._view_rest:
                return last             # a slow reading, made just now
            if not index.lock.acquire(blocking=False):
                return last             # being read (a check, a page): the last reading serves
            index.lock.release()
        start, forgotten = time.monotonic(), self._view_forgotten
        view, version = read_spool_view(index, last, version)
        with self._view_lock:
            if forgotten != self._view_forgotten:
                return view             # begun before a page's own change: not kept
            self._seen = (view, index, version)
        took = time.monotonic() - start
        self._view_rest = start + took + min(SPOOL_REST_SECONDS, SPOOL_REST_FACTOR * took) \
            if took > SLOW_READING_SECONDS else 0.0
        return view

    def forget_spool_view(self) -> None:
        """After a page's own change to the queue: the next page waits for a
        reading that shows it (the folder listed again, even where its time
        has not moved yet: a network share's client may report it late)."""
        with self._view_lock:
            self._view_forgotten += 1
            self._seen, self._view_rest = None, 0.0
        self.gateway.spool_index().distrust()

    def data_version(self) -> int:
        """A number that changes whenever a connection other than the page's own
        watching one commits to the database (a check, an import, a page's Save, another
        process): whatever a kept page showed from the database may have changed.
        Raises sqlite3.Error."""
        with self._watch_lock:
            return self._watching().execute("PRAGMA data_version").fetchone()[0]

    def last_check(self) -> float | None:
        """When the last check ended (for /health, without a connection of its own
        for each request). Raises sqlite3.Error."""
        with self._watch_lock:
            return get_state(self._watching(), "last_check")

    def _watching(self) -> sqlite3.Connection:
        """The page's own connection, for reading only; under _watch_lock."""
        if self._watch is None:
            self._watch = sqlite3.connect(str(self.gateway.journal.db_path), timeout=60,
                                          check_same_thread=False)
        return self._watch

    def set_deadline(self, handler: PageHandler, seconds: float | None) -> None:
        """Cut the handler's connection off `seconds` from now, unless it calls
        again with None first (its request has come)."""
        with self._deadline_lock:
            if seconds is None:
                self.deadlines.pop(handler, None)
                return
            self.deadlines[handler] = time.monotonic() + seconds
            if self._cutter is None and not self.closed.is_set():
                self._cutter = threading.Thread(target=self._cut_off_late, daemon=True,
                                                name="config-page-deadlines")
                self._cutter.start()

    def _cut_off_late(self) -> None:
        """Until the server closes: cut off the connections whose request is late.
        (One thread for all: a timer thread for each connection cost as much as
        serving a kept page.)"""
        while not self.closed.wait(DEADLINE_TICK):
            now = time.monotonic()
            with self._deadline_lock:
                late = [handler for handler, at in self.deadlines.items() if at <= now]
                for handler in late:
                    del self.deadlines[handler]
            for handler in late:
                try:
                    handler.cut_off()
                except Exception as exc:    # one connection's fault must not end the deadlines
                    log.error("config page: a slow connection could not be cut off: %s",
                              error_summary(exc))

    def server_close(self) -> None:
        self.closed.set()
        super().server_close()
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None


# -- what a view or an action is given ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PageContext:
    """One request as a view or an action sees it: the running gateway, the
    page's server (sessions, the spool reading), this browser's session (for
    /health, an empty one that is never stored), the query of a GET or the
    form of a POST, and the address of the computer that asked."""
    gateway: Gateway
    server: PageServer
    session: PageSession
    query: dict = dataclasses.field(default_factory=dict)
    form: dict = dataclasses.field(default_factory=dict)
    client: str = ""

    @property
    def settings(self) -> Settings:
        return self.gateway.settings

    @property
    def db(self) -> sqlite3.Connection:
        return self.gateway.journal.db

    @property
    def token(self) -> Html:
        """The session's form token, as a hidden field of a form."""
        return render(TOKEN_INPUT, token=self.session.token)

    def flash(self, kind: str, text: str) -> None:
        """Say something ("ok" or "error") on the next page this browser shows."""
        self.session.flash.append((kind, text))


# -- pieces of pages ------------------------------------------------------------------

#: The page's menu: (address, label).
PAGE_LINKS = (("/", "Settings"), ("/queue", "Queue"), ("/log", "Log"), ("/patrons", "Patrons"))
#: The menu entry a page belongs to, when its address is not in PAGE_LINKS.
PAGE_MENU_ENTRY = MappingProxyType({"/settings": "/", "/patron": "/patrons"})
NOTHING = Html("")


def flag(on: bool, attribute: str) -> Html:
    """An attribute such as ' checked', or nothing."""
    return Html(attribute if on else "")


def nav_link(href: str, label: str, current: bool) -> Html:
    return render(NAV_LINK, href=href, label=label, current=flag(current, ' aria-current="page"'))


def page_html(server: PageServer, session: PageSession, here: str, title: str, body: Html,
              token: str | None = None, logged_in: bool | None = None) -> Html:
    """The whole page around a view's body: menu, log-out button, the
    session's messages (shown once). token: in the forms, for the session's;
    logged_in: known already (a stand-in session is not the stored one)."""
    here = PAGE_MENU_ENTRY.get(here, here)
    if logged_in is None:
        logged_in = server.logged_in(session)
    nav = join(nav_link(href, label, here == href) for href, label in PAGE_LINKS) \
        if logged_in else NOTHING
    logout = render(LOGOUT_FORM, token=render(TOKEN_INPUT, token=token or session.token)) \
        if logged_in else NOTHING
    flash = join(render(FLASH, kind=kind, text=text) for kind, text in session.flash)
    session.flash = []
    return render(PAGE_HTML, title=title, body=body, nav=nav, logout=logout, flash=flash,
                  library=server.gateway.settings.library_name)


def problem_list(problems: Iterable[str]) -> Html:
    items = join(render(LIST_ITEM, text=problem) for problem in problems)
    return render(PROBLEM_LIST, items=items) if items else NOTHING


def state_box(ctx: PageContext, settings: Settings) -> Html:
    """The sender's state, the settings' problems and the queue's size."""
    state, reason = ctx.gateway.sender_state or ("not started", "")
    if settings.problems:       # also while the loop is still announcing a reload
        state, reason = "stopped", "the settings need attention:"
    try:
        view = ctx.server.spool_view()
        waiting, bad = str(view.waiting), str(len(view.bad))
    except SpoolError:
        waiting = bad = "?"
    last = get_state(ctx.db, "last_check")
    upcoming = "when the settings are fixed and saved" if settings.problems \
        else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ctx.gateway.next_check))
    return render(STATE_BOX, state=state, reason=reason, problems=problem_list(settings.problems),
                  waiting=waiting, bad=bad, last=fmt_time(last), next=upcoming)


def form_field(name: str, label: str, control: Html, hint: str, error: str | None) -> Html:
    """One labelled field of a form, with its error, if any."""
    return render(FIELD, id=name, label=label, control=control, hint=hint,
                  invalid=flag(bool(error), " invalid"),
                  error=render(FIELD_ERROR, text=error) if error else NOTHING)


def choice_options(choices: Iterable[str], value: str) -> Html:
    return join(render(OPTION, value=c, selected=flag(c == value.lower(), " selected"))
                for c in choices)


def settings_field(f: Field, values: dict, errors: dict, secrets_set: Container[str]) -> Html:
    """One setting; a password or secret is write-only: the page says only
    whether one is set (secrets_set holds the names of those that are)."""
    value = values.get(f.name, "")
    if f.kind == "password":
        control = render(PASSWORD_INPUT, id=f.name)
        hint = ("Set. Type a new one to change it; leave empty to keep it." if f.name in secrets_set
                else "Not set. Type one if the server needs a login." if f.key == "password"
                else "Not set. oauth2: the client secret's Value from Microsoft Entra.")
        if f.key == "password":
            hint += (" It belongs to the server above: changing the server, port, security or "
                     "username clears it unless you type it again in the same Save.")
    elif f.kind == "yesno":
        control = render(CHECKBOX, id=f.name, checked=flag(value.lower() in YES_WORDS, " checked"))
        hint = f.hint
    elif f.kind == "choice":
        control, hint = render(SELECT, id=f.name, options=choice_options(f.choices, value)), f.hint
    else:
        control, hint = render(TEXT_INPUT, id=f.name, value=value), f.hint
    return form_field(f.name, f.label, control, hint, errors.get(f.name))


def settings_fieldset(legend: str, fields: Iterable[Field], values: dict, errors: dict,
                      secrets_set: Container[str]) -> Html:
    rows = join(settings_field(f, values, errors, secrets_set) for f in fields)
    return render(FIELDSET, legend=legend, fields=rows)


def settings_facts(ctx: PageContext, s: Settings) -> Html:
    """What the Settings page shows but does not change."""
    web_hash = bool(s.get("web", "password_hash").strip())
    facts = {"Page address": f"{ctx.server.url} ([web] address and port)",
             "Page password": "set" if web_hash else "not set (run set-password to set one)",
             "Logging in": "a one-time link from `python bibliogate.py page` on this computer"
                           + (", or the page password" if web_hash else ""),
             "Settings file": s.ini_path, "Spool folder": s.spool, "Database": s.database,
             "Templates": s.templates, "Log folder": s.log_folder, "Import folder": s.import_folder}
    return join(render(FACT, name=name, value=value) for name, value in facts.items())


def queue_row(r: dict, token: Html, now: float) -> Html:
    bad = r["state"] == "bad"
    return render(QUEUE_ROW, state=r["state"], state_label=".BAD" if bad else "waiting",
                  to=r["to"] or "?", subject=r["subject"], age=age_text(now - r["queued_at"]),
                  attempts=r["attempts"], reason=r["reason"] or "", file=r["file"], token=token,
                  retry=render(RETRY_FORM, token=token, file=r["file"]) if bad else NOTHING)


def queue_table(rows: list[dict], left: int, token: Html, now: float) -> Html:
    """The files shown, and how many more wait unlisted."""
    if not rows:
        return render(MUTED, text="The queue is empty.")
    table = render(QUEUE_TABLE, rows=join(queue_row(r, token, now) for r in rows))
    more = render(MUTED, text=f"And {left} more waiting messages, not listed.") \
        if left > 0 else NOTHING
    return join([table, more])


def log_note(path: Path, shown: bool, cut: bool) -> str:
    if not shown:
        return "Nothing was logged this day."
    return ("Newest first" + (f"; only the last {LOG_BYTES // 1024} KB" if cut else "")
            + f". The file: {path}")


#: A patron and how many loans they have.
PATRON_WITH_LOANS = ("SELECT p.*, (SELECT COUNT(*) FROM loans l WHERE l.patron_id = p.patron_id) "
                     "AS loans, (SELECT group_concat(e.field) FROM patron_edits e "
                     "WHERE e.patron_id = p.patron_id) AS edited FROM patrons p")


def find_patrons(db: sqlite3.Connection, q: str, missing: bool, limit: int) -> list:
    """Patrons whose id is q, or whose name, group or id contains it."""
    like = "%" + re.sub(r"([\\%_])", r"\\\1", q) + "%"
    only_missing = "AND p.email = ''" if missing else ""
    return db.execute(
        f"{PATRON_WITH_LOANS} WHERE (p.patron_id = ? OR p.name LIKE ? ESCAPE '\\' "
        "OR p.grp LIKE ? ESCAPE '\\' OR p.patron_id LIKE ? ESCAPE '\\') "
        f"{only_missing} ORDER BY p.name, p.patron_id LIMIT ?",
        (q, like, like, like, limit)).fetchall()


def patrons_summary(found: int, total: int, no_email: int | None) -> str:
    if not total:
        return "No patrons yet: import patrons.csv from the library system."
    return (f"{min(found, PATRONS_SHOWN)} shown" + (" (the first ones; search to narrow)"
            if found > PATRONS_SHOWN else "")
            + f" of {total} patrons; {no_email or 0} have no email address.")


def mail_buttons(s: Settings, db: sqlite3.Connection, patron_id: str) -> Html:
    """[Email] and [Email guardian], for the addresses the patron has."""
    links = []
    for guardian, label in ((False, "Email"), (True, "Email guardian")):
        try:
            links.append(render(MAIL_LINK, href=build_mailto(s, db, patron_id, guardian=guardian),
                                label=label))
        except NoEmail:
            pass
    return join(links)


#: The Patrons page keeps at most this many patrons' buttons between changes.
MAIL_LINKS_KEPT = 20_000


class MailLinks:
    """The Patrons page's [Email] buttons, built once per change. Kept for a
    patron while the patron's row (as the page reads it at each request,
    with the count of their loans) is the same, the loans snapshot is the
    same import (loans change only by an import, which stamps the state
    table), the `direct` template is the same file, and the day and the
    settings are the same. Building a link reads the patron's loans and
    renders the template: too much for every row of every request under
    load. (Kept per patron row rather than by the database's version, so
    that one patron's edit builds one row again, not all of them.)"""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple | None = None
        self.links: dict[tuple, Html] = {}

    @staticmethod
    def template_stamp(s: Settings) -> tuple:
        """The `direct` template file's time and size, () when there is none."""
        try:
            st = (s.templates / "direct.txt").stat()
        except OSError:
            return ()
        return (st.st_mtime_ns, st.st_size)

    @staticmethod
    def version(s: Settings, db: sqlite3.Connection) -> tuple:
        return (get_state(db, LOANS_IMPORTED_KEY), MailLinks.template_stamp(s), dt.date.today(), s)

    def buttons(self, s: Settings, db: sqlite3.Connection, row: sqlite3.Row,
                key: tuple | None = None) -> Html:
        """The buttons of the patron in `row` (a row of PATRON_WITH_LOANS);
        key: version(), once per request."""
        key = key or self.version(s, db)
        mine = tuple(row)
        with self.lock:
            if key != self.key:
                self.key, self.links = key, {}
            found = self.links.get(mine)
        if found is None:
            found = mail_buttons(s, db, row["patron_id"])
            with self.lock:
                if self.key == key and len(self.links) < MAIL_LINKS_KEPT:
                    self.links[mine] = found
        return found


#: The one cache of the page's [Email] buttons (the page's connection is the
#: gateway's: one cache serves every request).
PATRON_MAIL_LINKS = MailLinks()


def patron_row(s: Settings, db: sqlite3.Connection, r: sqlite3.Row,
               version: tuple | None = None) -> Html:
    no_email = not r["email"]
    edited = set((r["edited"] or "").split(","))

    def mark(field: str, value) -> Html:
        return join([value, EDITED_MARK if field in edited else ""])
    return render(PATRON_ROW, cls="missing" if no_email else "", id=r["patron_id"],
                  name=r["name"], guardian=mark("guardian_email", r["guardian_email"]),
                  group=r["grp"], email=mark("email", NO_EMAIL_BADGE if no_email else r["email"]),
                  auto=mark("auto_overdue", "yes" if r["auto_overdue"] else "no"), loans=r["loans"],
                  edit="/patron?" + urllib.parse.urlencode({"id": r["patron_id"]}),
                  mail=PATRON_MAIL_LINKS.buttons(s, db, r, version))


#: The patron form: (key, label, hint).
PATRON_FORM = (
    ("email", "Email", "Empty = this patron gets no email."),
    ("guardian_email", "Guardian email", "For guardian letters."),
    ("grp", "Group", "Letters can be run for one group."),
    ("auto_overdue", "Auto-overdue notices", "Send this patron the daily overdue notices."),
)


def patron_control(key: str, values: dict) -> Html:
    if key == "auto_overdue":
        return render(CHECKBOX, id=key, checked=flag(bool(values[key]), " checked"))
    return render(TEXT_INPUT, id=key, value=values[key])


def patron_fields(values: dict, errors: dict) -> Html:
    return join(form_field(key, label, patron_control(key, values), hint, errors.get(key))
                for key, label, hint in PATRON_FORM)


def patron_form_values(form: dict) -> dict:
    return {"email": form.get("email", "").strip(),
            "guardian_email": form.get("guardian_email", "").strip(),
            "grp": form.get("grp", "").strip(),
            "auto_overdue": 1 if form.get("auto_overdue") else 0}


def settings_draft(form: dict) -> dict:
    """A refused Settings form's values, to show again."""
    values = {f.name: form.get(f.name, "").strip() for f in SETTINGS_FIELDS if f.kind != "password"}
    for f in SETTINGS_FIELDS:
        if f.kind == "yesno":
            values[f.name] = "yes" if form.get(f.name) else "no"
    return values


# -- the views: (title, body) of a page ---------------------------------------------

def page_settings(ctx: PageContext) -> tuple[str, Html]:
    s = ctx.settings
    text, digest = read_ini(s.ini_path)
    raw, _ = parse_ini_text(text.lstrip("\ufeff"), s.ini_path)
    draft = ctx.session.drafts.pop("settings", None)
    values, errors = draft if draft else (form_values(raw), sort_problems(s.problems)[0])
    secrets_set = {f.name for f in SETTINGS_FIELDS
                   if f.kind == "password" and raw.get((f.section, f.key), "").strip()}
    fieldsets = join(settings_fieldset(legend, fields, values, errors, secrets_set)
                     for legend, fields in SETTINGS_FORM)
    return "Settings", render(SETTINGS_BODY, state=state_box(ctx, s), token=ctx.token,
                              digest=digest, fieldsets=fieldsets, ini=s.ini_path.name,
                              test_to=s.test_to or "not set", facts=settings_facts(ctx, s))


def page_queue(ctx: PageContext) -> tuple[str, Html]:
    s, now = ctx.settings, ctx.gateway.clock()
    try:
        view = ctx.server.spool_view()
        rows, left = queue_rows(s, ctx.db, view.bad + view.first), view.waiting - len(view.first)
    except SpoolError as exc:
        ctx.flash("error", str(exc))
        rows, left = [], 0
    table = queue_table(rows, left, ctx.token, now)
    return "Queue", render(QUEUE_BODY, state=state_box(ctx, s), token=ctx.token, spool=s.spool,
                           table=table)


def page_log(ctx: PageContext) -> tuple[str, Html]:
    folder = ctx.settings.log_folder
    today = local_day(ctx.gateway.clock()).isoformat()
    days = list(dict.fromkeys([today] + log_days(folder)))[:LOG_DAYS_SHOWN]
    day = ctx.query.get("day", today)
    if day not in days:
        ctx.flash("error", f"There is no log for {day!r} here; the page shows the last "
                           f"{LOG_DAYS_SHOWN} days.")
        day = today
    path = folder / f"bibliogate-{day}.log"
    lines, cut = log_tail(path)
    links = join(nav_link(f"/log?day={d}", d, d == day) for d in days)
    return "Log", render(LOG_BODY, days=links, day=day, note=log_note(path, bool(lines), cut),
                         lines="\n".join(lines))


def page_patrons(ctx: PageContext) -> tuple[str, Html]:
    db, s = ctx.db, ctx.settings
    q, missing = ctx.query.get("q", "").strip(), bool(ctx.query.get("missing"))
    rows = find_patrons(db, q, missing, PATRONS_SHOWN + 1)
    total, no_email = db.execute("SELECT COUNT(*), SUM(email = '') FROM patrons").fetchone()
    version = PATRON_MAIL_LINKS.version(s, db)
    table = render(PATRONS_TABLE, rows=join(patron_row(s, db, r, version)
                                            for r in rows[:PATRONS_SHOWN])) if rows else NOTHING
    return "Patrons", render(PATRONS_BODY, q=q, missing=flag(missing, " checked"),
                             summary=patrons_summary(len(rows), total, no_email), table=table)


def page_patron(ctx: PageContext) -> tuple[str, Html]:
    db, pid = ctx.db, ctx.query.get("id", "")
    row = db.execute(f"{PATRON_WITH_LOANS} WHERE patron_id = ?", (pid,)).fetchone()
    if row is None:
        return "Patron not found", render(NO_PATRON_BODY, id=repr(pid))
    values, errors = ctx.session.drafts.pop(f"patron:{pid}", (dict(row), {}))
    edited = [label for key, label, _ in PATRON_FORM if key in (row["edited"] or "").split(",")]
    return f"Patron {row['name']}", render(
        PATRON_BODY, name=row["name"], id=pid, loans=row["loans"],
        edited=f"Changed on this page: {', '.join(edited)}." if edited else "",
        fields=patron_fields(values, errors), token=ctx.token,
        mail=mail_buttons(ctx.settings, db, pid))


def page_login(ctx: PageContext) -> tuple[str, Html]:
    if ctx.server.logged_in(ctx.session):
        return "Logged in", LOGGED_IN_BODY
    said = LOGIN_MESSAGES.get(ctx.query.get("m", ""))
    message = render(FLASH, kind="ok" if ctx.query.get("m") == "out" else "error", text=said) \
        if said else NOTHING
    form = render(LOGIN_FORM, token=ctx.token) if ctx.server.password_hash() else NO_LOGIN_FORM
    return "Log in", render(LOGIN_BODY, message=message, form=form)


def health(ctx: PageContext, detail: str = "full") -> dict:
    """For monitoring: the sender's state (or "stuck"), the queue, the last
    check. detail: "full" for a login; "local" for anyone on this computer
    (no server names, no reasons); "ok" for anyone else (ok or not, only).
    With ?challenge=..., the proof `status` asks for (page_proof)."""
    g, s = ctx.gateway, ctx.settings
    state, reason = g.sender_state or ("not started", "")
    try:
        view = ctx.server.spool_view()
        waiting: int | None = view.waiting
        bad: int | None = len(view.bad)
    except SpoolError as exc:
        waiting = bad = None
        reason = f"{reason} {exc}"
    stuck = g.stuck(waiting)
    if stuck:
        state, reason = "stuck", stuck_sentence(g.check_done, g.clock())
    last = ctx.server.last_check()
    info = {"ok": state == "running" and bad == 0, "stuck": stuck, "sender": state,
            "reason": reason, "problems": len(s.problems), "waiting": waiting, "bad": bad,
            "last_check": last, "last_check_text": fmt_time(last),
            "next_check": None if s.problems else g.next_check, "version": __version__}
    if detail == "ok":
        info = {"ok": info["ok"]}
    elif detail == "local":
        info = {k: v for k, v in info.items() if k not in ("reason", "problems", "next_check")}
    challenge = ctx.query.get("challenge")
    if challenge:
        info["proof"] = page_proof(ctx.server.nonce, challenge)
    return info


# -- what a kept page shows ----------------------------------------------------------
# Each returns what its page shows that may change, cheap to find out, or None
# when the page must be built anew. A page built after this was found shows
# that or something newer: what it shows only moves on.

def state_shown(ctx: PageContext) -> tuple | None:
    """What state_box shows: the sender's state, the settings and their problems,
    the spool's reading, the next check, and (the database's version) the last one."""
    g = ctx.gateway
    try:
        return (g.settings, g.sender_state, g.next_check, ctx.server.spool_view(),
                ctx.server.data_version())
    except (SpoolError, sqlite3.Error):
        return None


def settings_shown(ctx: PageContext) -> tuple | None:
    try:
        _, digest = read_ini(ctx.settings.ini_path)     # a hand edit shows at once
    except BibliogateError:
        return None
    state = state_shown(ctx)
    return None if state is None else (state, digest)


def patrons_shown(ctx: PageContext) -> tuple | None:
    """The patrons, loans and edits (the database's version) and what their [Email]
    buttons are made of (see MailLinks)."""
    s = ctx.settings
    try:
        return (s, ctx.server.data_version(), MailLinks.template_stamp(s), dt.date.today())
    except sqlite3.Error:
        return None


def ages_until(shown: tuple, now: float) -> float:
    """Until when the Queue page built now is right (`shown` from state_shown,
    whose fourth value is the spool's reading): until the age of a file it
    shows changes (age_text counts whole minutes)."""
    view: SpoolView = shown[3]
    return min((f.mtime + 60 * (math.floor((now - f.mtime) / 60) + 1)
                for f in itertools.chain(view.bad, view.first)), default=math.inf)


def log_shown(ctx: PageContext) -> tuple | None:
    """The log folder's files and the day's file (it only grows), and today."""
    folder = ctx.settings.log_folder
    today = local_day(ctx.gateway.clock())
    try:
        day = os.stat(folder / f"bibliogate-{ctx.query.get('day', today.isoformat())}.log")
        stamp: tuple = (day.st_size, day.st_mtime_ns, day.st_ino)
    except (OSError, ValueError):       # none that day (or no such name): the page says so
        stamp = ()
    try:
        return (ctx.settings, today, os.stat(folder).st_mtime_ns, stamp)
    except OSError:
        return None


# -- the actions: each does one thing and says where to go next ---------------------
# An action returns the address to redirect to, and (login, logout) the
# session that replaces the browser's.

#: Who asked, in the journal, for what the page does.
BY_PAGE = "config page"


def post_login(ctx: PageContext) -> tuple[str, PageSession | None]:
    """The page password. Each client address waits longer after each wrong
    one (LoginThrottle), decided before the password is checked."""
    server = ctx.server
    stored = server.password_hash()
    if split_hash(stored) is None:
        return "/login?m=nohash", None
    if server.throttle.admit(ctx.client):
        return "/login?m=wait", None
    right = False
    try:
        right = check_password(stored, ctx.form.get("password", ""))
    finally:
        server.throttle.done(ctx.client, right)
    if right:
        ctx.gateway.journal.event("page", f"logged in to the config page from {ctx.client}")
        return "/", server.login(ctx.client, stored)
    ctx.gateway.journal.event("page", f"a wrong config page password from {ctx.client}",
                              level=logging.WARNING)
    return "/login?m=wrong", None


def link_login(ctx: PageContext, token: str, local: str) -> tuple[str, PageSession | None]:
    """A one-time link from `page` (or `run`'s console): once, in time, from this computer."""
    if not from_this_computer(ctx.client, local):
        return "/login?m=here", None
    if not take_login_link(ctx.db, token, ctx.gateway.clock()):
        return "/login?m=used", None
    ctx.gateway.journal.event("page", f"logged in to the config page with a one-time link "
                                      f"from {ctx.client}")
    return "/", ctx.server.login(ctx.client, ctx.server.password_hash())


def post_logout(ctx: PageContext) -> tuple[str, PageSession | None]:
    ctx.server.logout(ctx.session)
    return "/login?m=out", None


def post_settings(ctx: PageContext) -> str:
    g = ctx.gateway
    ini_path = g.settings.ini_path
    with ctx.server.save_lock:
        text, digest = read_ini(ini_path)
        if ctx.form.get("ini_digest") != digest:
            ctx.flash("error", f"{ini_path.name} was changed by someone else since this page "
                               "was opened; nothing was saved. Here are its values now: check "
                               "them and save again.")
            return "/settings"
        new_text, errors, general, changed = check_settings_form(
            ctx.form, text, ini_path, g.settings.problems)
        if errors or general:
            refuse_settings(ctx, errors, general)
            return "/settings"
        if changed:
            save_ini_text(ini_path, new_text)
    what = f"Saved {', '.join(changed)}." if changed else "Nothing had changed."
    if "[smtp] password" in changed and not ctx.form.get("smtp.password") \
            and not ctx.form.get("smtp.password.clear"):
        what += (" The SMTP password was cleared: it belongs to the server it was typed for. "
                 "Type it for the new one below.")
    g.journal.event("settings", f"Save on the config page: {', '.join(changed) or 'no change'}")
    if g.request_reload(wait=RELOAD_WAIT_SECONDS):
        state, reason = g.sender_state or ("", "")
        ctx.flash("ok", f"{what} The sender restarted: it is {state}.")
    else:
        ctx.flash("ok", f"{what} The sender restarts with the settings as soon as it finishes "
                        "the check in progress.")
    return "/settings"


def refuse_settings(ctx: PageContext, errors: dict, general: list) -> None:
    """Keep a refused Settings form to show again, with what is wrong."""
    ctx.session.drafts["settings"] = (settings_draft(ctx.form), errors)
    typed = " Type the password again." if ctx.form.get("smtp.password") else ""
    ctx.flash("error", f"Nothing was saved: fix the {len(errors)} field(s) marked below.{typed}"
              if errors else "Nothing was saved.")
    for problem in general:
        ctx.flash("error", problem)


def post_test(ctx: PageContext) -> str:
    g, s = ctx.gateway, ctx.settings
    try:
        path = queue_test_message(s, g.journal, s.test_to, g.clock(), by=BY_PAGE)
    except BibliogateError as exc:
        ctx.flash("error", f"No test message was queued: {exc}")
    else:
        if s.problems:
            when = "The sender is stopped until the settings are fixed, so it waits in the queue."
        else:
            due = max(g.next_check, g.clock())
            when = f"The next check, at {time.strftime('%H:%M:%S', time.localtime(due))}, will take it."
        ctx.flash("ok", f"Queued the test message {path.name} in {s.spool} for {s.test_to}. {when}")
    flash_smtp_steps(ctx)
    return "/settings"


def flash_smtp_steps(ctx: PageContext) -> None:
    """The steps of smtp-check, one line each, on the next page."""
    s, g = ctx.settings, ctx.gateway
    if any("[smtp]" in problem for problem in s.problems):
        ctx.flash("error", "The SMTP server was not tried: fix the [smtp] settings marked below "
                           "first.")
        return
    steps = smtp_steps(s, g.tokens, g.clock, hold=login_hold(s, ctx.db, g.clock()))
    for step in steps:
        ctx.flash("ok" if step.ok else "error",
                  f"Server check, {step.name}: {'ok' if step.ok else 'FAILED'} — {step.said}")


def post_retry(ctx: PageContext) -> str:
    retry_names(ctx, [ctx.form.get("file", "")])
    return "/queue"


def post_retry_all(ctx: PageContext) -> str:
    names = bad_names(ctx.settings)
    if not names:
        ctx.flash("ok", "There are no .BAD files.")
    retry_names(ctx, names)
    return "/queue"


def retry_names(ctx: PageContext, names: list[str]) -> None:
    s, journal = ctx.settings, ctx.gateway.journal
    for name in names:
        try:
            path = retry_file(s, journal, name, by=BY_PAGE)
        except (SpoolError, OSError) as exc:
            ctx.flash("error", f"{name} was not put back: {exc}")
            continue
        ctx.flash("ok", f"{name} is waiting again as {path.name}.")


def post_delete(ctx: PageContext) -> str:
    name = ctx.form.get("file", "")
    try:
        delete_queued(ctx.settings, ctx.gateway.journal, name, by=BY_PAGE)
    except (SpoolError, OSError) as exc:
        ctx.flash("error", f"Nothing was deleted: {exc}")
        return "/queue"
    ctx.flash("ok", f"Deleted {name}.")
    return "/queue"


def post_send_now(ctx: PageContext) -> str:
    try:
        send_now(ctx.gateway)
    except BibliogateError as exc:
        ctx.flash("error", str(exc))
    else:
        ctx.flash("ok", "A check starts within a few seconds; reload this page to see what "
                        "it sent.")
    return "/queue"


def post_patron(ctx: PageContext) -> str:
    pid, values = ctx.form.get("patron_id", ""), patron_form_values(ctx.form)
    try:
        edit = edit_patron(ctx.gateway.journal, pid, values, by=BY_PAGE)
    except UnknownPatron:
        ctx.flash("error", f"There is no patron {pid!r}; nothing was saved.")
        return "/patrons"
    if edit.errors:
        ctx.session.drafts[f"patron:{pid}"] = (values, edit.errors)
        ctx.flash("error", "Nothing was saved: fix the fields marked below.")
        return "/patron?" + urllib.parse.urlencode({"id": pid})
    ctx.flash("ok", f"Saved patron {pid} ({edit.name})." if edit.changed
              else f"Nothing had changed for patron {pid}.")
    return "/patrons?" + urllib.parse.urlencode({"q": pid})


# -- routes ------------------------------------------------------------------------

#: GET: address -> view. /login is the one page shown before logging in.
GET_PAGES = MappingProxyType({
    "/": page_settings, "/settings": page_settings, "/queue": page_queue, "/log": page_log,
    "/patrons": page_patrons, "/patron": page_patron, "/login": page_login})
#: A page kept to be served again (PageCache) -> what it shows that may change.
SHOWN_BY = MappingProxyType({page_settings: settings_shown, page_queue: state_shown,
                             page_patrons: patrons_shown, page_log: log_shown})
#: A kept page that shows the time -> until when it is right.
SHOWN_UNTIL = MappingProxyType({page_queue: ages_until})
#: POST: address -> action, for a logged-in session (/login is answered before).
POST_ACTIONS = MappingProxyType({
    "/settings": post_settings, "/test": post_test, "/queue/retry": post_retry,
    "/queue/retry-all": post_retry_all, "/queue/delete": post_delete,
    "/queue/send-now": post_send_now, "/patron": post_patron, "/logout": post_logout})


# -- the request -------------------------------------------------------------------
# The checks every request meets (PageHandler calls them in the order the
# section's opening comment gives); each refuses with a PageRefusal.

def check_host(host: str, server: PageServer) -> None:
    """Refuse a request for another host name (DNS rebinding). Raises PageRefusal."""
    if not host_allowed(host, server.address, server.port):
        raise PageRefusal(HTTPStatus.MISDIRECTED_REQUEST,
                          f"This page answers only at {server.url} (bibliogate.ini "
                          f"[web] address); it was asked for {host!r}.")


def check_origin(headers) -> None:
    """Refuse a post from another site. Under our no-referrer policy a browser sends
    "Origin: null" even from this page; Sec-Fetch-Site, which no web page can set, then
    tells, and for a browser without it the form token. Raises PageRefusal."""
    origin = headers.get("Origin", "").strip().lower()
    site = headers.get("Sec-Fetch-Site")
    own = "http://" + headers.get("Host", "").strip().lower()
    if origin not in ("", "null", own) or site not in (None, "same-origin", "none"):
        raise PageRefusal(HTTPStatus.FORBIDDEN, "This form was sent from another web site, "
                          "so it was refused. Open the page itself and use its buttons.")


def check_token(session: PageSession | None, form: dict) -> PageSession:
    """The session a form was posted in, if its token is the session's. Raises PageRefusal
    when it is not."""
    if session is None or not hmac.compare_digest(form.get("token", "").encode(),
                                                  session.token.encode()):
        raise PageRefusal(HTTPStatus.FORBIDDEN, "This form is out of date (BiblioGate may "
                          "have restarted since the page was opened). Go back, reload the "
                          "page and try again.")
    return session


def form_length(header: str) -> int:
    """A form's Content-Length, if the page takes a form that long. Raises PageRefusal when
    it has none, or too long a one."""
    if not (header.isascii() and header.isdigit()):      # "²".isdigit() is true
        raise PageRefusal(HTTPStatus.LENGTH_REQUIRED, "A form must say its length.")
    # int() refuses 4,300 digits and more, so a long number is refused first.
    if len(header) > 12 or int(header) > MAX_FORM_BYTES:
        raise PageRefusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"This form is larger than the page takes ({MAX_FORM_BYTES // 1024} KB).")
    return int(header)


def check_login_token(cookie_header: str, name: str, form: dict) -> PageSession:
    """Before a login there is no session: the login form's token is the login cookie's
    value (a page of another site can read neither), and the visitor a session that is never
    stored. Raises PageRefusal when the token does not match."""
    token = cookie_value(cookie_header, name)
    if not token or not hmac.compare_digest(form.get("token", "").encode(), token.encode()):
        raise PageRefusal(HTTPStatus.FORBIDDEN, "This login form is out of date. Open the "
                          "login page again and log in there.")
    return PageSession("", token, "", time.monotonic())


def origin_form(target: str, address: str, port: int) -> str | None:
    """The path (and query) a request line asks for. An absolute URI
    (http://host:port/path) only if it names this page; None otherwise."""
    if target.startswith("/"):
        return target
    url = urllib.parse.urlsplit(target)
    if url.scheme.lower() != "http" or not host_allowed(url.netloc, address, port):
        return None
    return urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))


def cookie_value(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def parse_form(data: bytes) -> dict:
    """The fields (first value of each) of an urlencoded form. Raises PageRefusal when it
    cannot be read."""
    try:
        fields = urllib.parse.parse_qs(data.decode("utf-8"), keep_blank_values=True,
                                       max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise PageRefusal(HTTPStatus.BAD_REQUEST, "The form could not be read.") from None
    return {name: values[0] for name, values in fields.items()}


def parse_query(query: str) -> dict:
    """The fields (first value of each) of an address's query. Raises PageRefusal when it
    has too many parts."""
    try:
        return {k: v[0] for k, v in urllib.parse.parse_qs(query, max_num_fields=20).items()}
    except ValueError:
        raise PageRefusal(HTTPStatus.BAD_REQUEST, "This address has too many parts.") from None


class PageHandler(_HandlerBase):
    """One request to the config page: the checks every request meets, then
    a GET shows a page (GET_PAGES) and a POST does one thing (POST_ACTIONS)
    and answers with a redirect to a page that tells what happened. It answers
    as http.server's BaseHTTPRequestHandler (see page_classes())."""

    server: PageServer
    server_version = "BiblioGate"
    sys_version = ""
    timeout = SOCKET_SECONDS

    # -- the connection ---------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.cookies: list[str] = []         #: Set-Cookie values of this answer
        self.server.set_deadline(self, self.server.request_seconds)

    def arrived(self) -> None:
        """The whole request is here: no deadline any more."""
        self.server.set_deadline(self, None)

    def cut_off(self) -> None:
        """A client too slow to send its request is cut off, so it cannot
        hold a thread of the page for long."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.arrived()
        try:
            super().finish()
        finally:
            self.server.gateway.journal.close()        # this thread's connection

    def log_message(self, format: str, *args) -> None:
        log.debug("config page: %s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args) -> None:
        log.info("config page: %s %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        for cookie in self.cookies:
            self.send_header("Set-Cookie", cookie)
        super().end_headers()

    def set_cookie(self, name: str, value: str) -> None:
        self.cookies.append(f"{name}={value}; Path=/; HttpOnly; SameSite=Strict"
                            + ("" if value else "; Max-Age=0"))

    def parse_request(self) -> bool:
        """The request line and headers; refused: HTTP/0.9 (its answer would
        have no headers, so none of SECURITY_HEADERS) and an absolute URI
        naming another host."""
        words = str(getattr(self, "raw_requestline", b""), "iso-8859-1").rstrip("\r\n").split()
        if len(words) == 2:
            self.requestline, self.command, self.path = " ".join(words), words[0], words[1]
            self.request_version, self.close_connection = "HTTP/1.0", True
            self.send_error(HTTPStatus.BAD_REQUEST, "Only HTTP/1.0 and 1.1 are served here.")
            return False
        if not super().parse_request():
            return False
        if self.command not in ("GET", "POST"):
            return True                     # answered 501 (not implemented) next
        target = origin_form(self.path, self.server.address, self.server.port)
        if target is None:
            self.close_connection = True
            self.send_error(HTTPStatus.MISDIRECTED_REQUEST,
                            f"This page answers only at {self.server.url}.")
            return False
        self.path = target
        return True

    def do_GET(self) -> None:
        self.arrived()
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, handle: Callable[[], None]) -> None:
        try:
            handle()
        except PageRefusal as exc:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_text(exc.status, str(exc))
        except (ConnectionError, socket.timeout):     # the browser went away, or was too slow
            self.close_connection = True
        except Exception:  # noqa: BLE001 -- a fault in one request must not stop the page
            log.exception("config page: %s %s failed", self.command, self.path.split("?")[0])
            with contextlib.suppress(OSError):
                self.send_text(HTTPStatus.INTERNAL_SERVER_ERROR, "Something went wrong on this "
                               "page; the details are in the log. The gateway goes on sending.")

    # -- what the request brings -------------------------------------------------

    def read_form(self) -> dict:
        """The posted fields (first value of each) of a small urlencoded form."""
        length = form_length(self.headers.get("Content-Length", ""))
        data = self.rfile.read(length)
        self.arrived()
        if len(data) < length:
            raise PageRefusal(HTTPStatus.BAD_REQUEST, "The form arrived incomplete.")
        if self.headers.get_content_type() != "application/x-www-form-urlencoded":
            raise PageRefusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Only the page's own forms "
                              "are taken here.")
        return parse_form(data)

    def session(self) -> PageSession | None:
        """The logged-in session of this browser, or None."""
        return self.server.session(self.cookie_sid())

    def visitor(self) -> PageSession:
        """Someone not logged in: a session never stored, its form token the
        login cookie's (set here when the browser has none)."""
        token = cookie_value(self.headers.get("Cookie", ""), self.server.login_cookie)
        if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token):
            token = secrets.token_urlsafe(24)
            self.set_cookie(self.server.login_cookie, token)
        return PageSession("", token, "", time.monotonic())

    def from_here(self) -> bool:
        return from_this_computer(self.client_address[0], self.connection.getsockname()[0])

    def cookie_sid(self) -> str:
        return cookie_value(self.headers.get("Cookie", ""), self.server.cookie_name)

    # -- answers ----------------------------------------------------------------

    def send_body(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, status: HTTPStatus, text: str) -> None:
        self.send_body(status, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8")

    def send_json(self, status: HTTPStatus, value) -> None:
        self.send_body(status, json.dumps(value, indent=2).encode("utf-8"), "application/json")

    def send_page(self, status: HTTPStatus, title: str, body: Html, session: PageSession) -> None:
        here = urllib.parse.urlsplit(self.path).path
        page = page_html(self.server, session, here, title, body)
        self.send_body(status, page.encode("utf-8"), "text/html; charset=utf-8")

    def redirect(self, location: str, session: PageSession | None = None) -> None:
        """A 303 to `location`; with a new session (a login), its cookie."""
        if session is not None and session.sid != self.cookie_sid():
            self.set_cookie(self.server.cookie_name, session.sid)
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # -- routing ------------------------------------------------------------------

    def context(self, session: PageSession, query: dict | None = None,
                form: dict | None = None) -> PageContext:
        return PageContext(self.server.gateway, self.server, session, query or {}, form or {},
                           self.client_address[0])

    def _get(self) -> None:
        check_host(self.headers.get("Host", ""), self.server)
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/style.css":
            return self.send_body(HTTPStatus.OK, PAGE_CSS.encode("utf-8"), "text/css; charset=utf-8")
        if url.path == "/favicon.ico":                  # asked for by every browser
            self.send_response(HTTPStatus.NO_CONTENT)
            return self.end_headers()
        query = parse_query(url.query)
        session = self.session()
        logged_in = self.server.logged_in(session)
        if url.path == "/health":
            detail = "full" if logged_in else "local" if self.server.loopback and self.from_here() \
                else "ok"
            with self.server.workers:
                info = health(self.context(session or PageSession("", "", "", 0.0), query), detail)
            return self.send_json(HTTPStatus.OK if info["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, info)
        if url.path == "/login" and "once" in query:
            ctx = self.context(PageSession("", "", "", 0.0), query=query)
            return self.redirect(*link_login(ctx, query["once"], self.connection.getsockname()[0]))
        if session is None or not logged_in:
            if url.path != "/login":
                return self.redirect("/login")
            session = self.visitor()
        view = GET_PAGES.get(url.path)
        if view is None:
            return self.send_page(HTTPStatus.NOT_FOUND, "Not found", NOT_FOUND_BODY, session)
        if view in SHOWN_BY and logged_in and not session.flash and not session.drafts:
            return self.send_kept(view, session, query)
        with self.server.workers:
            title, body = view(self.context(session, query=query))
        self.send_page(HTTPStatus.OK, title, body, session)

    def send_kept(self, view: Callable, session: PageSession, query: dict) -> None:
        """A page served from PageCache while what it shows is the same, else built
        (a few at a time) and kept, unless it said something to show once."""
        kept = self.server.pages
        # Its own (empty) messages and drafts: one that another tab of this
        # browser adds meanwhile stays for this browser's next page, and is
        # never built into a page kept for everyone.
        stand_in = dataclasses.replace(session, token=TOKEN_MARK, flash=[], drafts={})
        ctx = self.context(stand_in, query=query)
        shown = SHOWN_BY[view](ctx)
        now = ctx.gateway.clock()
        data = kept.get(self.path, shown, now) if shown else None
        if data is None:
            with self.server.workers:
                data = kept.get(self.path, shown, now) if shown else None     # built meanwhile
                if data is None:
                    title, body = view(ctx)
                    said = bool(stand_in.flash)
                    page = page_html(self.server, stand_in, urllib.parse.urlsplit(self.path).path,
                                     title, body, token=TOKEN_MARK, logged_in=True)
                    data = page.encode("utf-8")
                    if shown and not said:
                        until = SHOWN_UNTIL[view](shown, now) if view in SHOWN_UNTIL else math.inf
                        kept.put(self.path, KeptPage(shown, until, data))
        data = data.replace(TOKEN_MARK.encode(), session.token.encode())
        self.send_body(HTTPStatus.OK, data, "text/html; charset=utf-8")

    def _post(self) -> None:
        form = self.read_form()        # read first: closing on unread data would reset the answer
        check_host(self.headers.get("Host", ""), self.server)
        check_origin(self.headers)
        path = urllib.parse.urlsplit(self.path).path
        if path == "/login":
            visitor = check_login_token(self.headers.get("Cookie", ""), self.server.login_cookie,
                                        form)
            return self.redirect(*post_login(self.context(visitor, form=form)))
        session = check_token(self.session(), form)
        if not self.server.logged_in(session):
            raise PageRefusal(HTTPStatus.FORBIDDEN, "You are not logged in (a new page password "
                              "logs everyone out). Log in again, then try again.")
        action = POST_ACTIONS.get(path)
        if action is None:
            return self.send_page(HTTPStatus.NOT_FOUND, "Not found", NOT_FOUND_BODY, session)
        try:
            answer = action(self.context(session, form=form))
        finally:
            self.server.forget_spool_view()     # the page after it shows the change
        location, after = answer if isinstance(answer, tuple) else (answer, session)
        if after is None:                        # logged out
            self.set_cookie(self.server.cookie_name, "")
        self.redirect(location, after)


@functools.lru_cache(maxsize=None)
def page_classes() -> tuple[type[PageServer], type[PageHandler]]:
    """PageServer and PageHandler on http.server's classes, made the first time
    the page starts: the commands that serve no page never import http.server."""
    import http.server

    class ServingPage(PageServer, http.server.ThreadingHTTPServer):
        """The config page's server (PageServer), serving."""

    class AnsweringPage(PageHandler, http.server.BaseHTTPRequestHandler):
        """One request to the config page (PageHandler), answered."""

    return ServingPage, AnsweringPage


def new_page_server(gateway: Gateway, address: str, port: int) -> PageServer:
    """The config page's server, listening (not yet serving). Raises OSError
    when the address cannot be used."""
    return page_classes()[0](gateway, address, port)


def start_page(gateway: Gateway) -> PageServer | None:
    """Serve the config page from a thread of its own, if [web] allows it. When it cannot
    start (a setting that is not safe, a port in use), the reason is logged, None is
    returned and the gateway sends anyway. Raises only sqlite3.Error, when the
    page's state cannot be recorded in the database."""
    s = gateway.settings
    try:
        address, port = web_address(s)
        stored = s.get("web", "password_hash").strip()
        if stored and split_hash(stored) is None:
            raise SettingsError([ini_problem("web", "password_hash", "(hidden)", "not a hash "
                                 "written by set-password. Run `python bibliogate.py "
                                 "set-password` again.")])
        if not is_loopback(address) and not stored:
            raise SettingsError([ini_problem("web", "address", address, "other computers could "
                                 "open the page there, so it needs a password first. Run "
                                 "`python bibliogate.py set-password`, then restart BiblioGate.")])
        server = new_page_server(gateway, address, port)
    except SettingsError as exc:
        set_state(gateway.journal.db, page_nonce=None)
        gateway.journal.event("page", f"the config page is not started: {exc} The gateway "
                              "sends meanwhile.", level=logging.WARNING)
        return None
    except OSError as exc:
        set_state(gateway.journal.db, page_nonce=None)
        gateway.journal.event("page", f"the config page is not started: {address}:{port} cannot "
                              f"be used ({exc.strerror or exc}). Is another BiblioGate running? "
                              "Otherwise set bibliogate.ini [web] port to a free port. The "
                              "gateway sends meanwhile.", level=logging.WARNING)
        return None
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},  # for stop_page
                     name="config-page", daemon=True).start()
    set_state(gateway.journal.db, page_url=server.url, page_port=server.port,
              page_nonce=server.nonce)
    gateway.journal.event("page", f"the config page is at {server.url}")
    return server


def stop_page(server: PageServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(sqlite3.Error):
            set_state(server.gateway.journal.db, page_nonce=None)


def cmd_set_password(args, settings: Settings) -> int:
    import getpass
    try:
        first = getpass.getpass("New password for the config page: ")
        again = getpass.getpass("The same password again: ")
    except EOFError:
        raise BibliogateError("No password was given; nothing was changed.") from None
    if len(first) < MIN_PASSWORD_LENGTH:
        raise BibliogateError(f"The password needs at least {MIN_PASSWORD_LENGTH} characters; "
                              "nothing was changed.")
    if first != again:
        raise BibliogateError("The two passwords differ; nothing was changed. Run set-password "
                              "again.")
    set_ini_values(settings.ini_path, {("web", "password_hash"): hash_password(first)})
    Journal(settings.database).event("page", "a new config page password was set")
    print(f"The config page password is stored (as a salted hash) in {settings.ini_path}. "
          "The page asks for it from now on; if BiblioGate is running and its page did not "
          "start for want of a password, restart it.")
    return 0


# Windows task ################################################################
#
# `install-task` makes BiblioGate an appliance: Task Scheduler starts `run` one
# minute after boot, as SYSTEM, with no window (pythonw.exe), whether or not
# anyone is logged on, and starts it again when it stops. On Linux the same
# command writes a systemd unit (see "Running unattended" for what keeps such
# a `run` honest). Modules only these commands need are imported where used.

#: True on Windows, where `install-task` registers a scheduled task.
IS_WINDOWS = os.name == "nt"
#: The name of the scheduled task; in lower case, of the systemd unit.
TASK_NAME = "BiblioGate"
#: The task definition `install-task` writes beside the ini and registers.
TASK_XML_FILE = "bibliogate-task.xml"
#: The namespace every Task Scheduler task definition is written in.
TASK_XMLNS = "http://schemas.microsoft.com/windows/2004/02/mit/task"
#: The Local System account, as task definitions name it.
SYSTEM_SID = "S-1-5-18"
#: What --user accepts as the Local System account.
SYSTEM_NAMES = frozenset({"system", "nt authority\\system", "localsystem", SYSTEM_SID.lower()})
#: The task starts this long after boot, once the network is up.
BOOT_DELAY = "PT1M"
#: A start that fails is tried again this often, this many times (the
#: schema's Count is a byte: 1 to 255).
RESTART_INTERVAL, RESTART_COUNT = "PT1M", 255
#: Task Scheduler's "restart on failure" covers a start that fails, not a
#: program that ends with an error. So a second trigger fires this often, from
#: the moment of install and across reboots; while `run` runs, those starts
#: are ignored (MultipleInstancesPolicy IgnoreNew), and when it has stopped,
#: the next one starts it again.
RESTART_CHECK = "PT5M"
#: Windows' MAX_PATH: Task Scheduler, and Python without the long-path
#: setting, cannot start a program or open a file by a longer path.
MAX_WINDOWS_PATH = 260
#: The Administrators group, named by its SID so that icacls works in every
#: language of Windows ("Administratoren", "Administrateurs" ...).
ADMINISTRATORS_SID = "S-1-5-32-544"
#: The local group of the librarian and the library system's account: it may
#: queue messages (modify the spool and the import folder) and read the logs,
#: nothing else. install-task creates it; the README says who belongs in it.
USERS_GROUP = "BiblioGate Users"
#: Open files the systemd unit allows: the page's connections and the
#: database, beside the default 1,024 a connection flood used up.
UNIT_NOFILE = 8192


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """What the scheduled task or the systemd unit starts: `PROGRAM SCRIPT
    --config INI run`, in the ini's folder, as USER."""

    program: Path
    script: Path
    ini: Path
    user: str
    #: The folders `run` writes in (data, spool, logs, import): systemd's
    #: ReadWritePaths and the ACLs of install-task.
    writable: tuple = ()

    @property
    def folder(self) -> Path:
        return self.ini.parent

    @property
    def as_system(self) -> bool:
        return self.user.lower() in SYSTEM_NAMES

    @property
    def arguments(self) -> str:
        """The task's command line after the program, every path quoted;
        -I (isolated): no folder of the script or the current one on
        sys.path before the standard library, no PYTHON* variables."""
        return f'-I "{self.script}" --config "{self.ini}" run'


def task_plan(ini_path: Path, user: str | None = None, windows: bool = IS_WINDOWS,
              executable: str = sys.executable, script: str = __file__) -> TaskPlan:
    """The plan for this ini. On Windows pythonw.exe, beside python.exe, runs it when it is
    there (no console window); the account is SYSTEM unless `user` names another. On Linux
    the account is the one running this. Raises UsageError when the paths cannot go into a
    command line."""
    if not executable:
        raise UsageError("Python did not say where its program is; run this command with the "
                         "full path of python.exe (or python3).")
    program = Path(executable)
    if windows and program.with_name("pythonw.exe").is_file():
        program = program.with_name("pythonw.exe")
    if not user:
        user = "SYSTEM" if windows else _current_user()
    plan = TaskPlan(program, Path(script).resolve(), Path(ini_path).resolve(), user)
    for path in (plan.program, plan.script, plan.ini):
        if '"' in str(path) or "\n" in str(path):
            raise UsageError(f"{path} has a quote or a line break in its name, which a command "
                             "line cannot carry; move BiblioGate to a folder with a plain name.")
    if windows:
        windows_plan_problems(plan)
    return plan


def windows_plan_problems(plan: TaskPlan) -> None:
    """Refuse, before anything is registered, what the task could not start. Raises
    UsageError."""
    if "WindowsApps" in plan.program.parts or "windowsapps" in str(plan.program).lower():
        raise UsageError(f"{plan.program} is the Microsoft Store Python, which a scheduled "
                         "task running as SYSTEM cannot start. Install Python from python.org "
                         "(for all users), then run install-task with that python.exe.")
    for path in (plan.program, plan.script, plan.ini, *plan.writable):
        if len(str(path)) >= MAX_WINDOWS_PATH:
            raise UsageError(f"{str(path)[:60]}... is {len(str(path))} characters long; Windows "
                             f"cannot start a task or open a file by a path of "
                             f"{MAX_WINDOWS_PATH} or more. Move BiblioGate to a shorter folder, "
                             "such as C:\\BiblioGate.")


def _current_user() -> str:
    import getpass
    try:
        return getpass.getuser()
    except (ImportError, KeyError, OSError):
        raise UsageError("Cannot tell which account this is; name the account that should run "
                         "BiblioGate with --user NAME.") from None


def task_xml(plan: TaskPlan, now: float | None = None) -> str:
    """The task definition (Task Scheduler schema 1.2): start one minute after
    boot and again whenever `run` has stopped, whether or not anyone is logged
    on, on battery too, with no time limit, never two at once."""
    import xml.etree.ElementTree as ET

    def add(parent, tag: str, text: str | None = None, **attributes):
        element = ET.SubElement(parent, tag, attributes)
        element.text = text
        return element

    stamp = dt.datetime.fromtimestamp(time.time() if now is None else now) \
        .replace(microsecond=0).isoformat()
    task = ET.Element("Task", {"version": "1.2", "xmlns": TASK_XMLNS})
    info = add(task, "RegistrationInfo")
    add(info, "URI", "\\" + TASK_NAME)
    add(info, "Date", stamp)
    add(info, "Author", f"BiblioGate {__version__}")
    add(info, "Description", f"Runs the BiblioGate email gateway for {plan.ini}: from boot, and "
        "again whenever it has stopped. Installed by `bibliogate.py install-task`; removed by "
        "`bibliogate.py uninstall-task`.")
    triggers = add(task, "Triggers")
    boot = add(triggers, "BootTrigger")
    add(boot, "Enabled", "true")
    add(boot, "Delay", BOOT_DELAY)
    again = add(triggers, "TimeTrigger")
    add(again, "Enabled", "true")
    add(again, "StartBoundary", stamp)
    repetition = add(again, "Repetition")
    add(repetition, "Interval", RESTART_CHECK)
    add(repetition, "StopAtDurationEnd", "false")
    principal = add(add(task, "Principals"), "Principal", id="Author")
    if plan.as_system:
        add(principal, "UserId", SYSTEM_SID)
        add(principal, "RunLevel", "HighestAvailable")
    else:
        add(principal, "UserId", plan.user)
        add(principal, "LogonType", "Password")
        add(principal, "RunLevel", "LeastPrivilege")
    settings = add(task, "Settings")
    add(settings, "AllowStartOnDemand", "true")
    restart = add(settings, "RestartOnFailure")
    add(restart, "Interval", RESTART_INTERVAL)
    add(restart, "Count", str(RESTART_COUNT))
    for tag, value in (("MultipleInstancesPolicy", "IgnoreNew"),
                       ("DisallowStartIfOnBatteries", "false"), ("StopIfGoingOnBatteries", "false"),
                       ("AllowHardTerminate", "true"), ("StartWhenAvailable", "true"),
                       ("RunOnlyIfNetworkAvailable", "false"), ("WakeToRun", "false"),
                       ("Enabled", "true"), ("Hidden", "false"),
                       ("ExecutionTimeLimit", "PT0S"), ("Priority", "7")):
        add(settings, tag, value)
    run = add(add(task, "Actions", Context="Author"), "Exec")
    add(run, "Command", f'"{plan.program}"')      # C:\\Program Files\\...: never split at a space
    add(run, "Arguments", plan.arguments)
    add(run, "WorkingDirectory", str(plan.folder))
    ET.indent(task, space="  ")
    return '<?xml version="1.0" encoding="UTF-16"?>\n' + ET.tostring(task, encoding="unicode") + "\n"


def task_xml_bytes(text: str) -> bytes:
    """The file as Task Scheduler reads it: UTF-16 with a byte order mark, CRLF."""
    return ("\ufeff" + text.replace("\r\n", "\n").replace("\n", "\r\n")).encode("utf-16-le")


def systemd_word(text: str) -> str:
    """One word of an ExecStart line: % and $ doubled, quoted if it has spaces."""
    text = text.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def systemd_unit(plan: TaskPlan) -> str:
    """The Linux counterpart of the scheduled task: a systemd service that
    starts at boot and again a minute after `run` ends with an error."""
    name = TASK_NAME.lower()
    start = " ".join(systemd_word(str(p)) for p in (plan.program, "-I", plan.script))
    writable = " ".join(systemd_word(str(p)) for p in plan.writable or (plan.folder,))
    return f"""\
# BiblioGate, the library's email gateway: started at boot, and again a minute
# after it stops with an error. Written by `bibliogate.py install-task`.
# Install: save this as /etc/systemd/system/{name}.service, then as root:
#   systemctl daemon-reload && systemctl enable --now {name}
# Check:   systemctl status {name}    (BiblioGate's own log is in its logs folder)
# Remove:  `bibliogate.py uninstall-task` prints the commands.

[Unit]
Description=BiblioGate email gateway ({str(plan.ini).replace("%", "%%")})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={plan.user}
WorkingDirectory={str(plan.folder).replace("%", "%%")}
ExecStart={start} --config {systemd_word(str(plan.ini))} run
Restart=on-failure
RestartSec=60
# A stop lets the message in flight finish first.
TimeoutStopSec=120
# Files and folders BiblioGate creates are its own account's only (0600/0700).
UMask=0077
LimitNOFILE={UNIT_NOFILE}
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={writable}
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def run_program(argv: list[str], quiet: bool = False) -> int:
    """Run a system tool (schtasks) and return its exit status. Raises BibliogateError when
    the tool cannot be started."""
    import subprocess
    out = subprocess.DEVNULL if quiet else None
    try:
        return subprocess.run(argv, stdout=out, stderr=out, check=False).returncode
    except OSError as exc:
        raise BibliogateError(f"{argv[0]} could not be started ({exc.strerror}). It is part of "
                              "Windows (in C:\\Windows\\System32); run this on the Windows server "
                              "itself.") from None


def install_task(settings: Settings, user: str | None = None, print_only: bool = False,
                 windows: bool = IS_WINDOWS, runner: Callable[..., int] = run_program,
                 now: float | None = None) -> int:
    """`install-task`: on Windows, write the task definition beside the ini,
    register it with schtasks and start it; on Linux, write the systemd unit
    and say how to install it. With print_only, only print the definition.

    runner(argv, quiet=False) runs schtasks and returns its exit status (tests
    pass a recorder). Raises BibliogateError when schtasks refuses."""
    plan = task_plan(settings.ini_path, user, windows)
    plan = dataclasses.replace(plan, writable=writable_folders(settings))
    if windows:
        windows_plan_problems(plan)
    warning = network_database_warning(settings)
    if warning:
        print(f"Warning: {warning}")
    if not windows:
        return _install_systemd(settings, plan, print_only)
    text = task_xml(plan, now)
    if print_only:
        print(text, end="")
        for argv in acl_commands(plan, settings):
            print(" ".join(f'"{a}"' if " " in a else a for a in argv))
        return 0
    set_acls(plan, settings, runner)
    xml_path = settings.base / TASK_XML_FILE
    try:
        xml_path.write_bytes(task_xml_bytes(text))
    except OSError as exc:
        raise BibliogateError(f"Could not write {xml_path} ({exc.strerror}). Run this as an "
                              "account that may write in that folder.") from None
    argv = ["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(xml_path), "/F",
            "/RU", "SYSTEM" if plan.as_system else plan.user]
    if not plan.as_system:
        argv += ["/RP", "*"]        # schtasks asks for the account's password itself
    if runner(argv) != 0:
        raise BibliogateError(f"Windows did not register the task (schtasks said why, above). "
                              "Open a Command Prompt with \"Run as administrator\" and run this "
                              f"again; or import {xml_path} in Task Scheduler (Action > Import Task).")
    who = "SYSTEM" if plan.as_system else plan.user
    Journal(settings.database).event("setup", f"registered the scheduled task {TASK_NAME}: "
                                     f"{plan.program} {plan.arguments}, as {who}")
    print(f"Registered the scheduled task {TASK_NAME}: it starts BiblioGate one minute after "
          f"every boot, as {who}, and again within {RESTART_CHECK[2:-1]} minutes whenever it "
          "has stopped.")
    if run_is_active(settings.ini_path):
        print("A BiblioGate `run` for these settings is active now, probably in a Command "
              "Prompt window: stop it with Ctrl+C, and the task takes over within "
              f"{RESTART_CHECK[2:-1]} minutes.")
    elif runner(["schtasks", "/Run", "/TN", TASK_NAME]) == 0:
        print("It is running now. Check with `python bibliogate.py status`, or in Task "
              "Scheduler (taskschd.msc).")
    else:
        print("It could not be started now; it starts at the next boot, or right-click "
              f"{TASK_NAME} in Task Scheduler (taskschd.msc) and choose Run.")
    for problem in settings.problems:
        print(f"Before messages go out, fix this: {problem}")
    return 0


def writable_folders(settings: Settings) -> tuple:
    """The folders `run` writes in, none inside another of them."""
    folders = sorted({settings.base, settings.database.parent, settings.spool,
                      settings.log_folder, settings.import_folder}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for folder in folders:
        if not any(folder == k or k in folder.parents for k in kept):
            kept.append(folder)
    return tuple(kept)


def network_database_warning(settings: Settings) -> str | None:
    """SQLite's WAL mode needs shared memory on the same computer: a
    database on a network share (\\\\server\\share\\...) can be corrupted."""
    value = settings.get("data", "database").strip()
    if value.startswith(("\\\\", "//")) or str(settings.database).startswith("\\\\"):
        return (f"[data] database = {value} is on a network share; SQLite cannot use it safely "
                "there (its write-ahead log needs a local disk). Keep the database on a local "
                "disk of this server.")
    return None


def ini_exposure_warning(ini_path: Path) -> str | None:
    """POSIX: the ini holds the SMTP password; other accounts must not read it."""
    if os.name == "nt":
        return None                     # install-task's ACLs see to it
    try:
        mode = os.stat(ini_path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return (f"{ini_path} can be read by other accounts on this computer (mode "
                f"{stat.filemode(mode)}), and it holds the SMTP password: run "
                f"`chmod 600 {ini_path}`.")
    return None


def acl_commands(plan: TaskPlan, settings: Settings) -> list[list[str]]:
    """The icacls command lines that make BiblioGate's folders writable only
    by SYSTEM and the Administrators (and the task's account, if another):
    no other account may change the program (it runs as SYSTEM) or read the
    ini (it holds the SMTP password). The USERS_GROUP may modify the spool
    and the import folder (to queue messages and drop CSV files) and read
    the logs. Files inherit from their folder, so a Save from the page or a
    new spool file gets the same rights."""
    owners = [f"*{SYSTEM_SID}:(OI)(CI)F", f"*{ADMINISTRATORS_SID}:(OI)(CI)F"]
    if not plan.as_system:
        owners.append(f"{plan.user}:(OI)(CI)M")
    lock = ["/inheritance:r", "/grant:r", *owners]
    commands, done = [], set()
    for folder in (plan.script.parent, *plan.writable):
        if folder not in done:
            done.add(folder)
            commands.append(["icacls", str(folder), *lock])
    for path in (plan.ini, settings.database):    # explicit, in case they were shared before
        commands.append(["icacls", str(path), "/inheritance:r", "/grant:r",
                         *(o.replace("(OI)(CI)", "") for o in owners)])
    commands.append(["icacls", str(settings.spool), "/grant", f"{USERS_GROUP}:(OI)(CI)M"])
    commands.append(["icacls", str(settings.import_folder), "/grant",
                     f"{USERS_GROUP}:(OI)(CI)M"])
    commands.append(["icacls", str(settings.log_folder), "/grant", f"{USERS_GROUP}:(OI)(CI)RX"])
    return commands


def set_acls(plan: TaskPlan, settings: Settings, runner: Callable[..., int]) -> None:
    """Create USERS_GROUP (if it is not there) and run acl_commands, each
    printed first. Raises BibliogateError, before the task is registered,
    when one fails."""
    with contextlib.suppress(OSError):
        settings.import_folder.mkdir(parents=True, exist_ok=True)
    runner(["net", "localgroup", USERS_GROUP, "/add", "/comment:May queue messages for "
            "BiblioGate and read its logs"], quiet=True)        # fails harmlessly if it exists
    for argv in acl_commands(plan, settings):
        print(" ".join(f'"{a}"' if " " in a else a for a in argv))
        if runner(argv) != 0:
            raise BibliogateError(f"Windows did not change the permissions of {argv[1]} (icacls "
                                  "said why, above); nothing was registered. Open a Command "
                                  "Prompt with \"Run as administrator\" and run this again.")
    print(f"Permissions set: only SYSTEM and the Administrators may change BiblioGate's "
          f"folders or read the ini; the group \"{USERS_GROUP}\" may queue messages "
          f"({settings.spool}), drop CSV files ({settings.import_folder}) and read the logs "
          f"({settings.log_folder}). Add the librarian and the library system's account to it.")


def _install_systemd(settings: Settings, plan: TaskPlan, print_only: bool) -> int:
    import shlex
    text = systemd_unit(plan)
    if print_only:
        print(text, end="")
        return 0
    name = TASK_NAME.lower()
    path = settings.base / f"{name}.service"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise BibliogateError(f"Could not write {path} ({exc.strerror}). Run this as an account "
                              "that may write in that folder.") from None
    print(f"Wrote {path}. To start BiblioGate at boot, and again whenever it stops with an "
          "error, run as root:")
    print(f"  cp {shlex.quote(str(path))} /etc/systemd/system/{name}.service")
    print("  systemctl daemon-reload")
    print(f"  systemctl enable --now {name}")
    print(f"Then check it with: systemctl status {name}")
    return 0


def uninstall_task(settings: Settings, windows: bool = IS_WINDOWS,
                   runner: Callable[..., int] = run_program) -> int:
    """`uninstall-task`: stop and remove the scheduled task (Windows), or say how to remove
    the systemd unit (Linux). Raises BibliogateError when Windows does not remove it."""
    name = TASK_NAME.lower()
    if not windows:
        print("To stop BiblioGate starting at boot, run as root:")
        print(f"  systemctl disable --now {name}")
        print(f"  rm /etc/systemd/system/{name}.service")
        print("  systemctl daemon-reload")
        return 0
    if not request_stop(settings.ini_path):        # the message in flight first
        print(f"BiblioGate did not stop within {STOP_WAIT_SECONDS} seconds; Windows ends it now.")
    runner(["schtasks", "/End", "/TN", TASK_NAME], quiet=True)    # fails harmlessly if not running
    if runner(["schtasks", "/Delete", "/TN", TASK_NAME, "/F"]) != 0:
        raise BibliogateError(f"Windows did not remove the task {TASK_NAME} (schtasks said why, "
                              "above). If it does not exist, there is nothing to remove; "
                              "otherwise run this again in a Command Prompt opened with \"Run "
                              "as administrator\".")
    Journal(settings.database).event("setup", f"removed the scheduled task {TASK_NAME}")
    print(f"Removed the scheduled task {TASK_NAME}; BiblioGate no longer starts at boot.")
    return 0


# -- a graceful stop, on Windows too ---------------------------------------------
#
# Windows has no SIGTERM, and Task Scheduler's "End" (schtasks /End) kills
# the process outright (TerminateProcess): the message in its SMTP
# transaction may go again at the next start. `stop` asks instead, through a
# file beside the ini that `run` watches: the sender finishes the message in
# flight, and `run` exits with status 0.

#: How long `stop` waits for `run` to finish the message in flight and exit.
STOP_WAIT_SECONDS = 180


def stop_path(ini_path: Path) -> Path:
    return Path(str(ini_path) + ".stop")


def watch_stop_file(path: Path, stop: threading.Event, every: float = TICK_SECONDS / 2
                    ) -> threading.Thread:
    """Set `stop` once `path` appears (a `stop` command); the thread ends with `run`."""
    def watch() -> None:
        while not stop.wait(every):
            if os.path.lexists(path):
                log.info("stopping (asked by `bibliogate.py stop`): finishing the message "
                         "in flight")
                stop.set()
    thread = threading.Thread(target=watch, name="stop-file", daemon=True)
    thread.start()
    return thread


def request_stop(ini_path: Path, wait: float = STOP_WAIT_SECONDS,
                 sleep: Callable[[float], None] = time.sleep) -> bool:
    """Ask the `run` of this ini to stop; True once it has (or none was running). Raises
    BibliogateError when the request cannot be written."""
    if not run_is_active(ini_path):
        return True
    try:
        stop_path(ini_path).write_text(f"stop asked by process {os.getpid()}\n", encoding="utf-8")
    except OSError as exc:
        raise BibliogateError(f"Could not ask BiblioGate to stop: {stop_path(ini_path)} cannot "
                              f"be written ({exc.strerror}). Run this as an administrator.") from None
    for _ in range(max(1, int(wait / 0.2))):       # bounded: `wait` seconds at most
        if not run_is_active(ini_path):
            return True
        sleep(0.2)
    return not run_is_active(ini_path)


def cmd_stop(args, settings: Settings) -> int:
    if not run_is_active(settings.ini_path):
        print(f"BiblioGate is not running for {settings.ini_path}.")
        return 0
    print("Asked BiblioGate to stop; it finishes the message it is sending first ...",
          flush=True)
    if request_stop(settings.ini_path):
        print("BiblioGate has stopped. (With the scheduled task installed, it starts again "
              f"within {RESTART_CHECK[2:-1]} minutes; uninstall-task keeps it stopped.)")
        return 0
    print(f"BiblioGate has not stopped after {STOP_WAIT_SECONDS} seconds; it stops once the "
          "message in flight is done. Run `python bibliogate.py status` to see.")
    return 1


def cmd_install_task(args, settings: Settings) -> int:
    return install_task(settings, args.user, args.print)


def cmd_uninstall_task(args, settings: Settings) -> int:
    return uninstall_task(settings)


def add_task_commands(command: Callable) -> None:
    """install-task and uninstall-task, for build_parser."""
    p = command("install-task", cmd_install_task, "have Windows start `run` at boot and "
                "whenever it stops (on Linux: a systemd unit)")
    p.add_argument("--print", action="store_true",
                   help="only show the task definition (on Linux, the systemd unit)")
    p.add_argument("--user", metavar="U", help="the account that runs BiblioGate (default: "
                   "SYSTEM on Windows, the current account on Linux)")
    command("uninstall-task", cmd_uninstall_task, "stop BiblioGate (after the message in "
            "flight) and remove the scheduled task")
    command("stop", cmd_stop, "ask a running `run` to finish the message in flight and exit")


# Wiring ######################################################################
#
# What the sections above are joined into, in one place: the templates of
# every kind, the tasks of `run`, the fields of `status`. A new kind of
# message, task or status line is added here, and nowhere else.

#: The placeholders each kind of template may use.
TEMPLATE_FIELDS = MappingProxyType({**CORE_TEMPLATE_FIELDS, **NOTICE_TEMPLATE_FIELDS,
                                    **LETTER_TEMPLATE_FIELDS})
#: The default text of every template, written to templates/ when missing.
DEFAULT_TEMPLATES = MappingProxyType({**CORE_TEMPLATES, **NOTICE_TEMPLATES, **LETTER_TEMPLATES})


def gateway_tasks() -> list[Callable[[Gateway, float], None]]:
    """What `run` does at every tick besides checking, in this order; each
    Gateway gets its own (the import watcher keeps state)."""
    return [Heartbeat(), daily_log_task, ImportWatch(), overdue_task]


#: The lines `status` shows besides the sender's (name -> function of
#: settings and database).
STATUS_FIELDS = MappingProxyType({"auto_overdue": status_auto_overdue,
                                  "last_overdue_run": status_last_run,
                                  "loans_data": status_loans})


# Command line ################################################################

#: `queue` lists this many messages (every .BAD one first); `queue --all` lists all.
QUEUE_PAGE = 50


def cmd_run(args, settings: Settings) -> int:
    lock = FileLock(run_lock_path(settings.ini_path))
    if not lock.acquire():
        db = open_db(settings.database)
        pid = get_state(db, "run_pid")
        db.close()
        print(f"BiblioGate is already running for {settings.ini_path} (process {pid}); "
              "a second one would do nothing.", file=sys.stderr)
        return 1
    with contextlib.suppress(OSError):          # a request meant for an earlier `run`
        os.unlink(stop_path(settings.ini_path))
    setup_logging(settings, console=has_console())
    try:
        gateway = Gateway(settings.ini_path, stop=threading.Event())
        with RunGuard(gateway) as guard:    # errors are logged; a crash ends `run` with status 1
            serve_until_stopped(gateway, guard)
        return guard.exit_status
    finally:
        lock.release()


def serve_until_stopped(gateway: Gateway, guard: RunGuard) -> None:
    """The page and the loop, until a signal, a crash or the stop event."""
    page = start_page(gateway)
    if page is not None and sys.stdin is not None and sys.stdin.isatty():
        print(f"The config page: {page_link(gateway.journal.db, page, gateway.clock())}\n"
              f"  (logs in once, within {LOGIN_LINK_SECONDS / 60:g} minutes, on this computer; "
              "later, `python bibliogate.py page` opens it)", flush=True)

    def on_signal(signum, frame):
        log.info("stopping (signal %s): finishing the message in flight", signum)
        gateway.stop.set()
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    s = gateway.settings
    gateway.journal.event("start", f"BiblioGate {__version__} started (process {os.getpid()}), "
                          f"settings {s.ini_path}, spool {s.spool}")
    for problem in s.problems:
        log.warning("not configured yet: %s", problem)
    for warning in (network_database_warning(s), ini_exposure_warning(s.ini_path)):
        if warning:
            gateway.journal.event("setup", warning, level=logging.WARNING)
    watch_stop_file(stop_path(s.ini_path), gateway.stop)
    try:
        gateway.run_forever(guard)
    except Exception as exc:        # a bug: logged with its traceback, and `run` ends with status 1
        guard.crash(f"BiblioGate stopped on an unexpected error: {error_summary(exc)}", exc)
    finally:
        gateway.stop.set()                      # ends the stop-file watcher too
        stop_page(page)
        ini = gateway.settings.ini_path
        asked = os.path.lexists(stop_path(ini))
        with contextlib.suppress(OSError):
            os.unlink(stop_path(ini))
        gateway.journal.event("stop", "BiblioGate stopped" + (" (asked by `stop`)" if asked
                                                               else ""))


def page_link(db: sqlite3.Connection, server: PageServer, now: float) -> str:
    return new_login_link(db, server.address, server.port, now)


def cmd_page(args, settings: Settings) -> int:
    """Open the config page in the browser through a one-time login link."""
    db = open_db(settings.database)
    try:
        port = get_state(db, "page_port")
        if not run_is_active(settings.ini_path) or not get_state(db, "page_nonce") or not port:
            raise BibliogateError("The config page is not running: start BiblioGate with "
                                  "`python bibliogate.py run` (or its scheduled task), then run "
                                  "`python bibliogate.py page` again. `status` says why a page "
                                  "did not start.")
        address, _ = web_address(settings)
        link = new_login_link(db, address, port, time.time())
    finally:
        db.close()
    if args.print:
        print(link)
    elif open_in_browser(link):
        print(f"Opened the config page in the browser (the link logs in once, within "
              f"{LOGIN_LINK_SECONDS / 60:g} minutes).")
    else:
        print(f"No browser could be opened here. Open this link on this computer (it logs in "
              f"once, within {LOGIN_LINK_SECONDS / 60:g} minutes):\n{link}")
    return 0


def open_in_browser(url: str) -> bool:
    import webbrowser
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def cmd_send(args, settings: Settings) -> int:
    result = send_once(settings, every=args.all)
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
    path = queue_test_message(settings, Journal(settings.database), args.to or settings.test_to,
                              time.time())
    print(path.name)
    return 0


def cmd_status(args, settings: Settings) -> int:
    info = status_info(settings)
    ok = (not settings.problems and info["bad"] == 0 and not info["login"]
          and not info["stuck"] and info["page_ok"])
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if ok else 1
    running = f"running (process {info['pid']})" if info["running"] else "not running"
    print(f"BiblioGate {running}; sender {info['sender']}: {info['reason']}")
    for problem in settings.problems:
        print(f"  problem: {problem}")
    if info["login"] and info["login"] not in (info["reason"] or ""):
        print(f"  {info['login']}")
    print(f"waiting: {info['waiting']}, .BAD: {info['bad']}")
    if settings.max_per_day:
        full = info["sent_today"] >= settings.max_per_day
        print(f"today: {info['sent_today']} of {settings.max_per_day} recipients (max_per_day)"
              + ("; daily cap reached, the rest go tomorrow" if full else ""))
    print(f"last check: {fmt_time(info['last_check'])}, next check: {fmt_time(info['next_check'])}")
    print(f"config page: {info['page']}")
    for key in STATUS_FIELDS:
        print(f"{key.replace('_', ' ')}: {info[key]}")
    return 0 if ok else 1


def cmd_smtp_check(args, settings: Settings) -> int:
    smtp_problems = [p for p in settings.problems if "[smtp]" in p]
    if smtp_problems:
        raise SettingsError(smtp_problems)
    steps = smtp_steps(settings)
    width = max(len(s.name) for s in steps)
    for step in steps:
        print(f"{step.name:<{width}}  {'ok' if step.ok else 'FAILED':<6}  {step.said}")
    ok = all(step.ok for step in steps)
    if ok:
        db = open_db(settings.database)
        try:
            if get_state(db, "login_refused"):
                set_state(db, login_refused=None)     # the sender may try at once
        finally:
            db.close()
    print("Every step works." if ok else "Change what the failed step says, then run "
          "smtp-check again.")
    return 0 if ok else 1


def cmd_queue(args, settings: Settings) -> int:
    index = SpoolIndex.read(settings.spool)
    db = open_db(settings.database)
    try:
        if args.json:
            write_json_list(sys.stdout, iter_queue_rows(settings, db, index.listing()))
            return 0
        shown = len(index) if args.all else QUEUE_PAGE
        if args.all:
            files: Iterable[SpoolFile] = index.listing()
        else:
            bad, first, _ = index.head(shown)
            files = itertools.islice(itertools.chain(bad, first), shown)
        print_queue(iter_queue_rows(settings, db, files))
    finally:
        db.close()
    if not len(index):
        print("The queue is empty.")
    elif len(index) > shown:
        print(f"… {len(index) - shown:,} more; `queue --all` lists them all.")
    return 0


def write_json_list(out, items: Iterable) -> None:
    """A JSON list written item by item, so memory stays flat however long it is."""
    out.write("[")
    for n, item in enumerate(items):
        out.write(("," if n else "") + "\n  " + json.dumps(item))
    out.write("\n]\n")


def print_queue(rows: Iterable[dict]) -> None:
    for r in rows:
        print(f"{r['file']}  {r['state']}  to {r['to'] or '?'}  {r['subject']!r}"
              + (f"  attempts {r['attempts']}" if r["attempts"] else "")
              + (f"\n    reason: {r['reason']}" if r["reason"] else "")
              + "".join(f"\n    {label}: {', '.join(r['recipients'][key])}"
                        for key, label in (("sent", "has it"), ("waiting", "waiting"),
                                           ("refused", "refused for good"))
                        if r["recipients"][key]))


def cmd_retry(args, settings: Settings) -> int:
    if not args.name and not args.all_bad:
        raise UsageError("retry needs a file NAME (as `queue` shows it) or --all-bad.")
    names = bad_names(settings) if args.all_bad else [args.name]
    journal = Journal(settings.database)
    for name in names:
        print(retry_file(settings, journal, name).name)
    if not names:
        print("There are no .BAD files.")
    return 0


def cmd_delete(args, settings: Settings) -> int:
    delete_queued(settings, Journal(settings.database), args.name)
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
        # --config is welcome after the command too (`status --config x.ini`).
        p.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                       help="the settings file (default: bibliogate.ini beside this program)")
        return p

    command("run", cmd_run, "run the gateway until stopped (Ctrl+C)")
    p = command("page", cmd_page, "open the config page in the browser, logged in (once)")
    p.add_argument("--print", action="store_true", help="print the one-time link instead")
    p = command("send", cmd_send, "one check now, then exit")
    p.add_argument("--all", action="store_true", help="try every waiting message now")
    p = command("enqueue", cmd_enqueue, "queue one message file (or - for standard input)")
    p.add_argument("file", metavar="FILE")
    p = command("test", cmd_test, "queue a test message")
    p.add_argument("--to", metavar="ADDR")
    p = command("status", cmd_status, "is it running, is it sending, what waits")
    p.add_argument("--json", action="store_true")
    p = command("queue", cmd_queue, f"list .BAD and waiting messages, the first {QUEUE_PAGE} "
                "(--all: every one)")
    p.add_argument("--all", action="store_true", help="list every message")
    p.add_argument("--json", action="store_true", help="every message, as JSON")
    p = command("retry", cmd_retry, "put a .BAD message back in the queue")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--all-bad", action="store_true")
    p = command("delete", cmd_delete, "remove one message from the queue")
    p.add_argument("name", metavar="NAME")
    command("smtp-check", cmd_smtp_check, "talk to the SMTP server step by step (connect, TLS, "
            "EHLO, login) and say what works and what to change; sends nothing")
    add_circulation_commands(command)
    add_letter_commands(command)
    add_task_commands(command)
    command("set-password", cmd_set_password, "store a password for the config page (salted hash)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console_to_log(early_log_folder(argv))      # pythonw.exe: no console, so to logs/
    safe_output()
    args = build_parser().parse_args(argv)
    ini = Path(args.config) if args.config else Path(__file__).resolve().with_name("bibliogate.ini")
    if args.config and args.command != "run" and not ini.is_file():
        print(f"bibliogate.py {args.command}: there is no settings file {ini}. Check the "
              "--config path; to set up a new installation there, run "
              f"`python bibliogate.py run --config {args.config}` once.", file=sys.stderr)
        return 2
    try:
        settings, created = ensure_layout(ini)
        console_to_log(settings.log_folder)
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


def private_files() -> None:
    """POSIX: every file BiblioGate creates (the ini and its temporary file,
    the database, logs, spool files, letters) is its own account's only,
    0600, and every folder 0700, from the first byte. (On Windows the
    folders' ACLs, set by install-task, do this.)"""
    if os.name != "nt":
        os.umask(0o077)


if __name__ == "__main__":
    private_files()
    sys.exit(main())
