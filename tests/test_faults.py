"""The sender under fire: a chaos SMTP server that refuses, hangs up and
stalls at random, and a thousand queued messages that must all come out
right -- delivered unchanged, or .BAD with the reply that refused them.

The chaos is seeded: each message's fate on each attempt is drawn from a
random generator seeded with (SEED, address, attempt), and each connection's
login from (SEED, connection number), so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, AuthResult

import bibliogate as bg
from conftest import Received, Sink, write_ini
from test_sender import Clock

#: How many messages go through the chaos (the run takes ~10 s per 1,000).
MESSAGES = 1000
#: [gateway] messages_per_check during the run.
PER_CHECK = 50
#: Chaos stops when this many messages are still waiting, so that the first
#: calm check can show it sends a whole batch at once.
CALM_AT = 2 * PER_CHECK
#: Every loop of the test is bounded by this many checks.
MAX_ROUNDS = 200
#: Change to replay another run of the chaos.
SEED = 20250601
#: The client's [smtp] timeout_seconds, and how long a stall lasts.
TIMEOUT_SECONDS = 1
STALL_SECONDS = 1.5
#: Stalls cost real time, so only this many happen; later draws accept.
MAX_STALLS = 3
#: The chance that a connection's login is refused.
LOGIN_REFUSED = 0.05
USER, PASSWORD = "library", "s3cret"

ACCEPT = "accept"
DROP_MID_DATA = "drop mid-DATA"          # hang up halfway through the content
DROP_AFTER_DATA = "drop after DATA"      # message kept, hang up before "250"
STALL = "stall"                          # message kept, "250" after the client gave up
#: fate -> chance per attempt; ACCEPT takes what is left.
FATES = {
    "RCPT 421": 0.01, "RCPT 451": 0.03, "RCPT 452": 0.02, "RCPT 550": 0.015, "RCPT 554": 0.01,
    "DATA 421": 0.01, "DATA 451": 0.03, "DATA 452": 0.02, "DATA 550": 0.015, "DATA 554": 0.01,
    DROP_MID_DATA: 0.02, DROP_AFTER_DATA: 0.02, STALL: 0.005,
}
ENHANCED = {"421": "4.3.2", "451": "4.3.0", "452": "4.5.3", "550": "5.7.1", "554": "5.6.0"}


def address(n: int) -> str:
    return f"p{n:04d}@example.org"


def message_id(n: int) -> str:
    return f"<chaos-{n:04d}@test.example>"


def number_of(text: str) -> int | None:
    found = re.search(r"p(\d{4})@example\.org|<chaos-(\d{4})@test\.example>", text)
    return int(found.group(1) or found.group(2)) if found else None


class ChaosSMTP(SMTP):
    """aiosmtpd's session, able to hang up after a 421 and halfway through DATA."""

    async def push(self, status):
        await super().push(status)
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if text.startswith("421") and self.transport is not None:
            self.transport.close()          # after the reply has been written

    async def smtp_DATA(self, arg):
        if getattr(self.envelope, "fate", None) != DROP_MID_DATA:
            return await super().smtp_DATA(arg)
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.readuntil(b"\r\n")    # the first line of the content, no more
        self.event_handler.note(self.envelope.number, DROP_MID_DATA, None)
        self.transport.abort()


class ChaosSink(Sink):
    """A Sink that answers each message at random (seeded, reproducible)
    until `calm()`, then accepts everything.

    Per message number it records `replies` (every refusal it gave, in
    order), `after_data` (how many times it kept the message and then hung
    up or stalled, so the client could not know) and `fates` (a Counter of
    everything that happened, for the report)."""

    protocol_class = ChaosSMTP

    def __init__(self, seed: int, **options):
        super().__init__(auth=(USER, PASSWORD), **options)
        self.seed = seed
        self.chaos = True
        self.attempts: Counter = Counter()
        self.replies: dict[int, list[str]] = defaultdict(list)
        self.after_data: Counter = Counter()
        self.fates: Counter = Counter()

    def calm(self) -> None:
        with self._lock:
            self.chaos = False

    def note(self, number: int, fate: str, reply: str | None) -> None:
        with self._lock:
            self.fates[fate] += 1
            if reply:
                self.replies[number].append(reply)
            if fate in (DROP_AFTER_DATA, STALL):
                self.after_data[number] += 1

    def draw(self, number: int) -> str:
        with self._lock:
            if not self.chaos:
                return ACCEPT
            self.attempts[number] += 1
            rng = random.Random(f"{self.seed}:{number}:{self.attempts[number]}")
            roll, fate = rng.random(), ACCEPT
            for name, chance in FATES.items():
                if roll < chance:
                    fate = name
                    break
                roll -= chance
            if fate == STALL and self.fates[STALL] >= MAX_STALLS:
                fate = ACCEPT
            return fate

    def reply(self, number: int, fate: str) -> str:
        code = fate[-3:]
        return f"{code} {ENHANCED[code]} chaos {fate} for {address(number)}"

    # ---- hooks ---------------------------------------------------------------

    def _connection_made(self, protocol) -> None:
        super()._connection_made(protocol)
        rng = random.Random(f"{self.seed}:connection:{self.sessions}")
        protocol.refuse_login = self.chaos and not self._warming_up and rng.random() < LOGIN_REFUSED

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        if getattr(server, "refuse_login", False):
            # The client tries each mechanism the server offers: count the
            # connection once.
            if not getattr(server, "refusal_noted", False):
                server.refusal_noted = True
                self.note(-1, "login refused", None)
            return AuthResult(success=False, handled=False, auth_data=auth_data)
        return super()._authenticate(server, session, envelope, mechanism, auth_data)

    async def handle_RCPT(self, server, session, envelope, address_, rcpt_options):
        number = number_of(address_)
        fate = ACCEPT if number is None else self.draw(number)
        if fate.startswith("RCPT"):
            reply = self.reply(number, fate)
            self.note(number, fate, reply)
            return reply
        envelope.fate, envelope.number = fate, number
        return await super().handle_RCPT(server, session, envelope, address_, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        fate, number = getattr(envelope, "fate", ACCEPT), getattr(envelope, "number", None)
        if fate.startswith("DATA"):
            reply = self.reply(number, fate)
            self.note(number, fate, reply)
            return reply
        record = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content),
                          USER)
        with self._lock:
            self._messages.append(record)
        self.note(number, fate, None)
        if fate == DROP_AFTER_DATA:
            server.transport.abort()
            await asyncio.sleep(3600)       # cancelled by aiosmtpd as the connection goes
        if fate == STALL:
            await asyncio.sleep(STALL_SECONDS)
        return "250 OK"


@pytest.fixture
def chaos_sink():
    sink = ChaosSink(SEED).start()
    yield sink
    sink.stop()


def make_body(rng: random.Random, n: int) -> bytes:
    """A few lines, with what SMTP must carry unchanged: lines that start
    with a dot (even a lone dot), 8-bit text, trailing spaces."""
    pool = ["Your book is due.", ".", "..", ".leading dot", "Zoë à bientôt — merci",
            "trailing spaces   ", "", "From the library", "tab\there", "x" * 200]
    lines = [f"Message {n}."] + [rng.choice(pool) for _ in range(rng.randint(1, 8))]
    return ("\n".join(lines) + "\n").encode("utf-8")


def queue_messages(spool: Path, count: int) -> dict[int, bytes]:
    """Drop `count` files, oldest first, in the way foreign programs do;
    some with CRLF line endings. Returns the body of each, CRLF ended."""
    rng = random.Random(SEED)
    bodies, start = {}, time.time() - 10 * count
    for n in range(count):
        body = make_body(rng, n)
        head = (f"From: circulation@school.example\nTo: Patron {n} <{address(n)}>\n"
                f"Subject: Notice {n}\nMessage-ID: {message_id(n)}\nMIME-Version: 1.0\n"
                "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n")
        data = head.encode() + b"\n" + body
        if n % 3 == 0:
            data = data.replace(b"\n", b"\r\n")
        path = spool / f"notice-{n:04d}.TMP"
        path.write_bytes(data)
        os.utime(path, (start + 10 * n, start + 10 * n))
        bodies[n] = body.replace(b"\n", b"\r\n")
    return bodies


def waiting(spool: Path) -> int:
    return len(bg.scan(spool))


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


def test_no_message_is_lost_or_changed_under_fire(tmp_path, chaos_sink):
    sink = chaos_sink
    ini = write_ini(tmp_path, sink, smtp__timeout_seconds=TIMEOUT_SECONDS,
                    gateway__messages_per_check=PER_CHECK, gateway__minutes_between_checks=60,
                    gateway__give_up_after_hours=1440)
    clock = Clock()
    gateway = bg.Gateway(ini, clock)
    gateway.tasks.clear()                   # the daily log is tested on its own
    spool = gateway.settings.spool
    bodies = queue_messages(spool, MESSAGES)
    rounds = 0

    def one_check():
        nonlocal rounds
        rounds += 1
        clock.advance(gateway.settings.interval)   # also past every retry wait (<= 1 hour)
        gateway.tick()

    # 1. Chaos, until few are left.
    while waiting(spool) > CALM_AT and rounds < MAX_ROUNDS:
        one_check()
    left = waiting(spool)
    assert PER_CHECK <= left <= CALM_AT, f"after {rounds} checks, {left} still waiting"

    # 2. The fault clears: the very next check sends a whole batch.
    sink.calm()
    before = len(sink.messages)
    one_check()
    assert len(sink.messages) - before == PER_CHECK
    assert waiting(spool) == left - PER_CHECK
    assert gateway.sender_state[0] == "running"

    # 3. The rest go, in bounded checks.
    while waiting(spool) and rounds < MAX_ROUNDS:
        one_check()
    assert waiting(spool) == 0, f"{waiting(spool)} still waiting after {rounds} checks"

    # 4. Every message is accounted for.
    delivered: dict[int, list[Received]] = defaultdict(list)
    for got in sink.messages:
        number = number_of(got.message["Message-ID"] or "")
        assert number is not None, f"an unknown message arrived: {got.data[:200]!r}"
        delivered[number].append(got)
    bad: dict[int, Path] = {}
    for f in bg.scan(spool, bg.is_bad_name):
        number = number_of(f.path.read_bytes().decode("utf-8", "replace"))
        assert number is not None and number not in bad
        bad[number] = f.path
    assert set(delivered) | set(bad) == set(range(MESSAGES)), "messages were lost"

    for number, copies in delivered.items():
        for got in copies:
            assert body_of(got.data) == bodies[number], f"message {number} changed"
            assert got.rcpt_tos == [address(number)] and got.mail_from == "library@school.example"
        assert len(copies) - 1 <= sink.after_data[number], \
            f"message {number} arrived {len(copies)} times without a reason"
    duplicates = sum(len(c) - 1 for c in delivered.values())
    assert duplicates <= sum(sink.after_data.values())

    refused_for_good = {n for n, replies in sink.replies.items() if replies[-1][0] == "5"}
    assert set(bad) == refused_for_good
    for number, path in bad.items():
        reason = bg.read_reason(path)
        assert sink.replies[number][-1] in reason, f"{path.name}: {reason}"
        if number in delivered:             # kept by the server once, refused later
            assert sink.after_data[number] >= 1
    assert gateway.journal.db.execute("SELECT COUNT(*) FROM spool_state").fetchone()[0] == 0

    # 5. The chaos really happened: every kind of fault, more than once in all.
    assert set(FATES) | {"login refused", ACCEPT} == set(sink.fates), sink.fates
    print(f"\n{MESSAGES} messages, {rounds} checks, {len(delivered)} delivered, {len(bad)} .BAD, "
          f"{duplicates} duplicates; faults: {dict(sorted(sink.fates.items()))}")
