"""The delivery promises, with real processes and a real SMTP server.

No message is lost on a kill -9, a power cut between two steps, an SMTP
outage, a full disk, or with two gateway processes on one spool folder; none
is sent twice by two processes; after a crash at most the message that was in
its SMTP transaction goes again. Every message carries a unique Message-ID,
so what arrived at the sink can be counted one by one.
"""

import asyncio
import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import REPO, Clock, Gateway, Sink, eml

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="kill -9 is TerminateProcess on "
                                "Windows, a different path; these tests use SIGKILL")


# Helpers #####################################################################

def queue(spool: Path, count: int, tag: str = "m") -> list:
    """count message files, oldest first, as a foreign program leaves them;
    returns their Message-IDs."""
    ids, base = [], time.time() - 600
    for n in range(count):
        mid = f"<{tag}-{n}@crash.test>"
        path = spool / f"{tag}{n:03d}.TMP"
        path.write_bytes(eml(to=f"patron{n}@example.org", subject=f"{tag} {n}", Message_ID=mid))
        os.utime(path, (base + n, base + n))
        ids.append(mid)
    return ids


def arrived(sink) -> collections.Counter:
    return collections.Counter(m.message["Message-ID"] for m in sink.messages)


def waiting(spool: Path) -> list:
    return sorted(p.name for p in spool.iterdir() if bg.is_waiting_name(p.name))


def bad(spool: Path) -> list:
    return sorted(p.name for p in spool.iterdir() if bg.is_bad_name(p.name))


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.01)


def start(gw: Gateway, *args) -> subprocess.Popen:
    """bibliogate.py in the background; its output goes to a file in gw.dir."""
    out = open(gw.dir / f"out-{time.monotonic_ns()}.txt", "w", encoding="utf-8")
    cmd = [sys.executable, str(REPO / "bibliogate.py"), "--config", str(gw.ini), *args]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(gw.cwd),
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    proc.out_file = out
    return proc


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple:
    """Wait for a background command; (exit status, what it printed)."""
    try:
        code = proc.wait(timeout)
    finally:
        proc.out_file.close()
    return code, Path(proc.out_file.name).read_text(encoding="utf-8")


def stop_run(proc: subprocess.Popen) -> tuple:
    """Stop a `run` the way the service manager does, and wait for it."""
    proc.terminate()
    code, out = finish(proc, 30)
    if os.name != "nt":
        assert code == 0, out       # SIGTERM finishes the message in flight, then exits
    return code, out


@pytest.fixture
def make_gateway(tmp_path):
    def factory(sink, name="gw", **overrides) -> Gateway:
        gw = Gateway(tmp_path / name, sink, cwd=tmp_path / "elsewhere")
        if overrides:
            gw.configure(**overrides)
        bg.ensure_layout(gw.ini)        # the folders, as a first start makes them
        return gw
    return factory


def database(gw: Gateway):
    return bg.open_db(gw.dir / "bibliogate.db")


# kill -9 #####################################################################

@POSIX_ONLY
@pytest.mark.parametrize("kills", [
    [(8, 0.0)],
    [(4, 0.0), (15, 0.02), (27, 0.045)],
], ids=["one kill", "three kills"])
def test_kill_9_mid_batch_loses_nothing(make_sink, make_gateway, kills):
    """Each kill comes once `count` messages arrived, `pause` seconds later:
    right after a 250 reply, or in the middle of the next DATA."""
    sink = make_sink(delay=0.05)
    gw = make_gateway(sink)
    ids = queue(gw.spool, 40)
    for count, pause in kills:
        proc = start(gw, "send", "--all")
        wait_until(lambda: len(sink.messages) >= count or proc.poll() is not None, 30,
                   f"{count} messages to arrive")
        time.sleep(pause)
        assert proc.poll() is None, "the batch ended before the kill"
        proc.send_signal(signal.SIGKILL)
        finish(proc, 10)
    gw.cli("send", "--all", check=0)
    got = arrived(sink)
    assert [mid for mid in ids if mid not in got] == []                  # lost: none
    assert sum(n - 1 for n in got.values()) <= len(kills)                 # at most 1 per kill
    assert max(got.values()) <= 2
    assert waiting(gw.spool) == [] and bad(gw.spool) == []
    # Each delivery recorded once: the records a kill left in the journal of
    # deliveries went into the database once, none lost, none twice.
    db = database(gw)
    try:
        sent = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'sent'").fetchone()[0]
        counted = db.execute("SELECT SUM(recipients) FROM sent_per_day").fetchone()[0]
    finally:
        db.close()
    assert len(ids) <= sent <= sum(got.values()) and counted == sent


def rcpt_counts(sink) -> collections.Counter:
    return collections.Counter(a for m in sink.messages for a in m.rcpt_tos)


class SlowRcptSink(Sink):
    """A Sink that, once `rcpt_delay` is set, waits that long before each
    RCPT reply and counts the RCPT commands it is holding."""

    rcpt_delay = 0.0
    rcpt_waits = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_delay:
            self.rcpt_waits += 1          # only the server thread writes it
            await asyncio.sleep(self.rcpt_delay)
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


@POSIX_ONLY
def test_kill_9_while_deferred_recipients_are_retried(make_gateway):
    """a and c have three messages; b was refused for now. The retries for b
    are killed twice, in the middle of a transaction (its RCPT), the second
    time after one retry got through: afterwards everyone has each message
    exactly once. (A kill between the end of the data and the recorded 250
    could still send one twice: no SMTP client can close that window.)"""
    sink = SlowRcptSink(rcpt_replies={"b@example.org": "450 4.2.1 Mailbox busy"}).start()
    try:
        gw = make_gateway(sink)
        people = ["a@example.org", "b@example.org", "c@example.org"]
        for n in range(3):
            path = gw.spool / f"m{n}.TMP"
            path.write_bytes(eml(to=people, subject=f"m{n}", Message_ID=f"<m{n}@crash.test>"))
            os.utime(path, (time.time() - 600 + n,) * 2)
        gw.cli("send", "--all", check=0)
        assert rcpt_counts(sink) == {"a@example.org": 3, "c@example.org": 3}
        sink.rcpt_replies.clear()
        sink.rcpt_delay = 3.0
        # The first kill holds m0's retry; the second comes once m0 went and
        # m1's retry (the third RCPT held in all) is waiting for its reply.
        for held, delivered in ((1, 0), (3, 1)):
            proc = start(gw, "send", "--all")
            wait_until(lambda: sink.rcpt_waits >= held  # noqa: B023
                       or proc.poll() is not None, 30, "a retry's RCPT")  # noqa: B023
            assert proc.poll() is None and len(sink.messages) == 3 + delivered
            proc.send_signal(signal.SIGKILL)
            finish(proc, 10)
        sink.rcpt_delay = 0
        gw.cli("send", "--all", check=0)
        per_message = collections.Counter((m.message["Message-ID"], a) for m in sink.messages
                                          for a in m.rcpt_tos)
        assert set(per_message.values()) == {1}, per_message              # nobody twice
        assert len(per_message) == 9                                       # nobody lost
        assert waiting(gw.spool) == [] and bad(gw.spool) == []
    finally:
        sink.stop()


# Power cut between two steps #################################################

def test_part_file_of_an_unfinished_write_is_never_sent_and_is_cleaned_at_start(
        sink, make_gateway):
    gw = make_gateway(sink, gateway__minutes_between_checks=0.05)
    old_part = gw.spool / (".msg-old.TMP" + bg.PART_SUFFIX)
    new_part = gw.spool / (".msg-new.TMP" + bg.PART_SUFFIX)
    for path in (old_part, new_part):
        path.write_bytes(eml(subject="half")[:40])
    hours_ago = time.time() - 2 * 3600
    os.utime(old_part, (hours_ago, hours_ago))
    ids = queue(gw.spool, 1)
    gw.cli("send", "--all", check=0)
    assert list(arrived(sink)) == ids                     # the .part files are not messages
    assert old_part.exists() and new_part.exists()
    proc = start(gw, "run")
    try:
        wait_until(lambda: not old_part.exists() or proc.poll() is not None, 20,
                   "`run` to remove the old .part file")
        assert proc.poll() is None
        assert new_part.exists()        # an enqueue may still be writing it
    finally:
        stop_run(proc)
    assert len(sink.messages) == 1


def test_reason_written_but_file_not_renamed_bad_the_message_still_goes(sink, make_gateway):
    gw = make_gateway(sink)
    ids = queue(gw.spool, 1)
    stray = gw.spool / ("m000.BAD" + bg.REASON_SUFFIX)
    stray.write_text("2026-01-01 00:00:00 550 refused\n", encoding="utf-8")
    gw.cli("send", "--all", check=0)
    assert arrived(sink) == {ids[0]: 1}
    assert waiting(gw.spool) == [] and bad(gw.spool) == []
    assert json.loads(gw.cli("queue", "--json").stdout) == []
    assert gw.cli("status").returncode == 0


def test_reason_written_but_file_not_renamed_bad_the_next_bad_uses_its_name(
        make_sink, make_gateway):
    sink = make_sink(data_reply="550 5.1.1 No such mailbox")
    gw = make_gateway(sink)
    queue(gw.spool, 1)
    stray = gw.spool / ("m000.BAD" + bg.REASON_SUFFIX)
    stray.write_text("2026-01-01 00:00:00 an old reason\n", encoding="utf-8")
    gw.cli("send", "--all", check=0)
    assert bad(gw.spool) == ["m000.BAD"]
    [row] = json.loads(gw.cli("queue", "--json").stdout)
    assert row["file"] == "m000.BAD" and "550 5.1.1 No such mailbox" in row["reason"]
    leftovers = sorted(p.name for p in gw.spool.iterdir() if not p.name.startswith("."))
    assert leftovers == ["m000.BAD", "m000.BAD" + bg.REASON_SUFFIX]


def ledger(gw: Gateway, name: str, data: bytes) -> None:
    """What a crash between the server's 250 reply and the file's removal leaves."""
    db = database(gw)
    with db:
        db.execute("INSERT INTO sent(file, digest, at) VALUES (?,?,?)",
                   (name, hashlib.sha256(data).hexdigest(), time.time()))
    db.close()


def test_delivered_but_not_removed_is_removed_not_sent_again(sink, make_gateway):
    gw = make_gateway(sink)
    queue(gw.spool, 2)
    ledger(gw, "m000.TMP", (gw.spool / "m000.TMP").read_bytes())
    r = gw.cli("send", "--all", check=0)
    assert arrived(sink) == {"<m-1@crash.test>": 1}
    assert waiting(gw.spool) == [] and bad(gw.spool) == []
    assert "1 sent" in r.stdout


def test_the_same_file_queued_again_after_it_was_sent_goes_again(sink, make_gateway):
    """A program that reuses its file names, or a person who copies the same
    test file into the folder twice: the second copy is a new message."""
    gw = make_gateway(sink)
    data = eml(subject="weekly test", Message_ID="<weekly@crash.test>")
    for _ in range(2):
        path = gw.spool / "weekly-test.TMP"
        path.write_bytes(data)
        os.utime(path, (time.time() - 60, time.time() - 60))
        gw.cli("send", "--all", check=0)
        assert not path.exists()
    assert arrived(sink) == {"<weekly@crash.test>": 2}


def test_ledger_row_of_a_removed_file_is_forgotten_at_the_next_check(sink, make_gateway):
    """A crash after the removal but before the ledger row went: the next
    check forgets the row, and the same name and text later is sent."""
    gw = make_gateway(sink)
    data = eml(subject="again", Message_ID="<again@crash.test>")
    ledger(gw, "again.TMP", data)
    gw.cli("send", check=0)                               # a check: the file is not there
    path = gw.spool / "again.TMP"
    path.write_bytes(data)
    os.utime(path, (time.time() - 60, time.time() - 60))
    gw.cli("send", check=0)
    assert arrived(sink) == {"<again@crash.test>": 1} and not path.exists()


@pytest.fixture
def immutable():
    """chattr +i: a file that cannot be removed, as one held open on Windows."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux for chattr +i")
    held = []

    def hold(path: Path, on: bool = True) -> None:
        r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            pytest.skip(f"chattr does not work here: {r.stderr.strip()}")
        held.append(path)
    yield hold
    for path in held:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, timeout=30)


def test_a_file_that_cannot_be_renamed_is_not_taken_until_it_can_then_goes_once(
        sink, make_gateway, immutable):
    """A file another program holds (Windows refuses to rename it) is left
    as it is: the sender claims a file by renaming it before reading it."""
    gw = make_gateway(sink)
    ids = queue(gw.spool, 3)
    immutable(gw.spool / "m000.TMP")
    r = gw.cli("send", "--all")
    assert "Traceback" not in r.stderr and "2 sent" in r.stdout, r.stdout + r.stderr
    assert waiting(gw.spool) == ["m000.TMP"]
    assert "not taken for now" in (gw.dir / "logs").joinpath(
        time.strftime("bibliogate-%Y-%m-%d.log")).read_text(encoding="utf-8")
    gw.cli("send", "--all", check=0)                      # still held: still not taken
    assert arrived(sink) == {ids[1]: 1, ids[2]: 1}
    immutable(gw.spool / "m000.TMP", on=False)
    gw.cli("send", "--all", check=0)
    assert waiting(gw.spool) == []
    assert_exactly_once(sink, ids, gw.spool)


def test_retry_state_of_a_vanished_file_is_forgotten(make_sink, make_gateway):
    """A file deleted by hand (or by a crash) while it waited for a retry: the
    next check forgets its state, so a new file of that name starts afresh."""
    sink = make_sink(fail_first=1)
    gw = make_gateway(sink)
    db = database(gw)
    long_ago = time.time() - 100 * 3600                   # past give_up_after_hours
    with db:
        db.execute("INSERT INTO spool_state(file, attempts, first_failed, next_try, last_error) "
                   "VALUES ('m000.TMP', 9, ?, ?, '451 busy')", (long_ago, time.time() + 3600))
    assert json.loads(gw.cli("queue", "--json").stdout) == []
    gw.cli("send", check=0)                               # a check while the file is gone
    assert db.execute("SELECT COUNT(*) FROM spool_state").fetchone()[0] == 0
    db.close()
    ids = queue(gw.spool, 1)                              # a new message, the same name
    r = gw.cli("send")
    assert "1 delayed" in r.stdout, r.stdout + r.stderr   # 451: waits, is not given up
    [row] = json.loads(gw.cli("queue", "--json").stdout)
    assert (row["state"], row["attempts"]) == ("waiting", 1)
    gw.cli("send", "--all", check=0)
    assert arrived(sink) == {ids[0]: 1}


# Two processes on one spool ##################################################

def assert_exactly_once(sink, ids, spool):
    got = arrived(sink)
    assert [mid for mid in ids if got[mid] != 1] == []
    assert sum(got.values()) == len(ids)
    assert waiting(spool) == [] and bad(spool) == []


def test_two_send_all_at_once_with_one_ini(make_sink, make_gateway):
    sink = make_sink(delay=0.01)
    gw = make_gateway(sink)
    ids = queue(gw.spool, 30)
    procs = [start(gw, "send", "--all") for _ in range(2)]
    outcomes = [finish(p) for p in procs]
    assert_exactly_once(sink, ids, gw.spool)
    for code, out in outcomes:
        assert code == 0 or "another BiblioGate process is sending" in out, out


def test_two_inis_on_one_spool_folder(tmp_path, make_sink, make_gateway):
    sink = make_sink(delay=0.01)
    shared = tmp_path / "shared-spool"
    shared.mkdir()
    one = make_gateway(sink, "one", gateway__spool_folder=str(shared))
    two = make_gateway(sink, "two", gateway__spool_folder=str(shared))
    ids = []
    for round_ in range(2):
        ids += queue(shared, 15, tag=f"r{round_}-")
        procs = [start(one, "send", "--all"), start(two, "send", "--all")]
        for p in procs:
            finish(p)
    assert_exactly_once(sink, ids, shared)


def test_run_beside_send_all(make_sink, make_gateway):
    sink = make_sink(delay=0.01)
    gw = make_gateway(sink, gateway__minutes_between_checks=0.05, gateway__messages_per_check=5)
    ids = queue(gw.spool, 30)
    runner = start(gw, "run")
    try:
        for _ in range(40):                     # bounded: send --all until nothing waits
            finish(start(gw, "send", "--all"))
            if not waiting(gw.spool):
                break
            time.sleep(0.1)
        wait_until(lambda: len(sink.messages) >= len(ids), 10, "every message")
    finally:
        stop_run(runner)
    assert_exactly_once(sink, ids, gw.spool)


# An SMTP outage ##############################################################

def test_outage_keeps_every_message_waiting_then_sends_each_once(sink, make_gateway):
    gw = make_gateway(sink)
    ids = queue(gw.spool, 20)
    sink.stop()
    r = gw.cli("send")
    assert r.returncode == 1 and "Could not reach the SMTP server 127.0.0.1" in r.stdout
    r = gw.cli("send", "--all")
    assert r.returncode == 1
    assert len(waiting(gw.spool)) == 20 and bad(gw.spool) == []
    rows = json.loads(gw.cli("queue", "--json").stdout)
    assert {row["state"] for row in rows} == {"waiting"} and len(rows) == 20
    sink.start()
    gw.cli("send", "--all", check=0)
    assert_exactly_once(sink, ids, gw.spool)


def test_server_gone_in_the_middle_of_a_batch(make_sink, make_gateway):
    sink = make_sink(delay=0.05)
    gw = make_gateway(sink)
    ids = queue(gw.spool, 20)
    proc = start(gw, "send", "--all")
    wait_until(lambda: len(sink.messages) >= 5 or proc.poll() is not None, 30, "5 messages")
    sink.stop()
    code, out = finish(proc, 30)
    assert "delayed" in out and bad(gw.spool) == []
    assert len(waiting(gw.spool)) + len(sink.messages) == 20
    sink.start()
    gw.cli("send", "--all", check=0)
    assert_exactly_once(sink, ids, gw.spool)


# A full disk #################################################################

@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs folder (Linux, root); skipped where it cannot be made."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a small tmpfs")
    folder = tmp_path / "small-disk"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill_up(folder: Path) -> Path:
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for _ in range(1000):                   # 64 KB is reached long before
            try:
                fh.write(b"x" * 4096)
            except OSError:
                break
        else:
            raise AssertionError("the small disk never filled")
    return filler


def test_enqueue_on_a_full_disk_says_so_and_leaves_nothing_half_written(
        small_disk, sink, make_gateway, tmp_path):
    gw = make_gateway(sink, gateway__spool_folder=str(small_disk))
    letters = []
    for name in ("before", "after"):
        letter = tmp_path / f"{name}.eml"
        letter.write_bytes(eml(subject=name, body="A line of text.\n" * 120,
                               Message_ID=f"<{name}@crash.test>"))
        letters.append(letter)
    first = gw.cli("enqueue", str(letters[0]), check=0).stdout.strip()
    filler = fill_up(small_disk)
    r = gw.cli("enqueue", str(letters[1]))
    assert r.returncode == 1, r.stdout
    assert "No space left on device" in r.stderr and "nothing was queued" in r.stderr
    assert r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == sorted([first, "filler.bin"])
    gw.cli("send", "--all", check=0)            # a full disk does not stop the sending
    assert arrived(sink) == {"<before@crash.test>": 1}
    filler.unlink()
    second = gw.cli("enqueue", str(letters[1]), check=0).stdout.strip()
    assert waiting(small_disk) == [second]
    assert not [p.name for p in small_disk.iterdir() if p.name.endswith(bg.PART_SUFFIX)]
    gw.cli("send", "--all", check=0)
    assert arrived(sink) == {"<before@crash.test>": 1, "<after@crash.test>": 1}


# Group commit: a kill -9 and a power cut in the middle of a drain #############

@POSIX_ONLY
def test_a_commit_without_a_flush_survives_kill_9(tmp_path):
    """What the group commit rests on: in sqlite's write-ahead log a commit
    under `synchronous = NORMAL` is written to the log file, not flushed, and
    a process killed right after it keeps it (the operating system has it)."""
    db_path = tmp_path / "bibliogate.db"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(REPO)!r}); import bibliogate as bg\n"
              f"db = bg.open_db(__import__('pathlib').Path({str(db_path)!r}))\n"
              "bg.relax_durability(db)\n"
              "for n in range(50):\n"
              "    with db: bg.record_delivery(db, f'm{n}.TMP', 'x', 1.0)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    db = bg.open_db(db_path)
    try:
        assert len(bg.sent_ledger(db)) == 50
    finally:
        db.close()


def journal_line(token: str, row: list) -> bytes:
    journal = bg.DeliveryJournal.__new__(bg.DeliveryJournal)
    payload = json.dumps([token, *row], separators=(",", ":")).encode()
    return payload + b" " + journal._check(payload) + b"\n"


def test_the_journal_of_deliveries_counts_only_whole_lines_of_the_token(tmp_path):
    """A line counts if it carries the database's token and its checksum:
    not one recorded already (another token), torn, or garbage."""
    row = ["m1.TMP", "ab" * 32, 1.0, "2026-11-30", 1, [1.0, "2026-11-30", "sent", "m1.TMP", "x"]]
    other = ["m2.TMP"] + row[1:]
    good, old = journal_line("T2", row), journal_line("T1", other)
    forged = good.replace(b"m1.TMP", b"m3.TMP", 1)              # its checksum no longer fits
    (tmp_path / bg.DELIVERIES_FILE).write_bytes(
        old + b"\x00" * 40 + b"\n" + forged + good + b"garbage\n" + good[:-9])
    journal = bg.DeliveryJournal(tmp_path)
    assert journal.start() == ""
    try:
        assert journal.rows("T2") == [row]
        assert journal.rows("T1") == [other]
        assert journal.rows(None) == []
        journal.clear()
        journal.add("T3", row)
        assert journal.rows("T3") == [row] and journal.rows("T2") == []
    finally:
        journal.close()


def kill_after_delivery(gw, name: str) -> None:
    """`send --all` killed with SIGKILL right after `name`'s delivery is
    recorded (its line in the journal of deliveries, its group not flushed)."""
    script = (f"import os, signal, sys; sys.path.insert(0, {str(REPO)!r}); import bibliogate as bg\n"
              "real = bg.Sender._delivered\n"
              "def delivered(self, row):\n"
              "    real(self, row)\n"
              f"    if row[0] == {name!r}:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "bg.Sender._delivered = delivered\n"
              f"bg.main(['--config', {str(gw.ini)!r}, 'send', '--all'])\n")
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, cwd=str(gw.cwd))
    assert proc.returncode == -signal.SIGKILL


@POSIX_ONLY
def test_a_kill_9_after_the_journal_line_sends_nothing_again(make_sink, make_gateway):
    """Killed right after a delivery's line (its group not yet in the
    database): the next check records it from the journal, once, removes
    the file and sends nothing again; a later check does not record it twice."""
    sink = make_sink()
    gw = make_gateway(sink)
    ids = queue(gw.spool, 3)
    kill_after_delivery(gw, "m001.TMP")
    assert arrived(sink) == {ids[0]: 1, ids[1]: 1}
    assert (gw.spool / bg.DELIVERIES_FILE).stat().st_size > 0
    for _ in range(2):
        gw.cli("send", "--all", check=0)
    assert arrived(sink) == {mid: 1 for mid in ids}
    assert waiting(gw.spool) == [] and bad(gw.spool) == []
    db = database(gw)
    try:
        files = [r[0] for r in db.execute("SELECT file FROM events WHERE kind = 'sent' ORDER BY id")]
        counted = db.execute("SELECT SUM(recipients) FROM sent_per_day").fetchone()[0]
    finally:
        db.close()
    assert sorted(files) == ["m000.TMP", "m001.TMP", "m002.TMP"] and counted == 3


@POSIX_ONLY
def test_deliveries_taken_from_the_journal_are_on_disk_before_it_is_emptied(
        make_sink, make_gateway, monkeypatch):
    """A check that finds a killed one's lines records them and flushes that
    record before it empties the journal, even on a connection left relaxed
    (no flush per commit) by a check that ended badly in the same process: a
    power cut just after must not take both the lines and their record."""
    sink = make_sink()
    gw = make_gateway(sink)
    ids = queue(gw.spool, 2)
    kill_after_delivery(gw, "m000.TMP")
    assert (gw.spool / bg.DELIVERIES_FILE).stat().st_size > 0
    settings, _ = bg.ensure_layout(gw.ini)
    journal = bg.Journal(settings.database)
    steps = []
    real_sync, real_clear = bg.sync_db, bg.DeliveryJournal.clear
    monkeypatch.setattr(bg, "sync_db", lambda conn, relaxed=False: (
        steps.append("flush"), real_sync(conn, relaxed)))
    monkeypatch.setattr(bg.DeliveryJournal, "clear", lambda self: (
        steps.append("empty" if (self.path.stat().st_size if self.path.exists() else 0) else "idle"),
        real_clear(self)))
    try:
        bg.relax_durability(journal.db)
        bg.Sender(settings, journal).check(limit=0)
    finally:
        journal.close()
    assert "empty" in steps and "flush" in steps[:steps.index("empty")], steps
    assert arrived(sink) == {mid: 1 for mid in ids}


@POSIX_ONLY
def test_a_journal_held_open_after_a_kill_holds_the_sending_until_it_can_be_read(
        make_sink, make_gateway, monkeypatch):
    """Killed with deliveries in the journal, then the journal is held open
    by another program (WinError 32: a backup, the antivirus): the next check
    sends nothing and says why; once it can be read, the rest goes, and none
    twice."""
    sink = make_sink()
    gw = make_gateway(sink)
    ids = queue(gw.spool, 4)
    kill_after_delivery(gw, "m001.TMP")
    assert arrived(sink) == {ids[0]: 1, ids[1]: 1}
    settings, _ = bg.ensure_layout(gw.ini)
    journal = bg.Journal(settings.database)
    real_open = os.open

    def held_open(path, *args, **kwargs):
        if os.fspath(path).endswith(bg.DELIVERIES_FILE):
            exc = PermissionError(13, "The process cannot access the file because it is being "
                                      "used by another process")
            exc.winerror = 32
            raise exc
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(bg, "in_use_pause", lambda seconds: None)
    monkeypatch.setattr(os, "open", held_open)
    try:
        result = bg.Sender(settings, journal).check(limit=0)
        assert result.sent == 0 and "journal of deliveries" in str(result.problem)
        assert "would go twice" in str(result.problem)
        assert arrived(sink) == {ids[0]: 1, ids[1]: 1}
        monkeypatch.setattr(os, "open", real_open)
        assert bg.Sender(settings, journal).check(limit=0).sent == 2
    finally:
        journal.close()
    assert arrived(sink) == {mid: 1 for mid in ids}


@POSIX_ONLY
@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_a_link_in_the_journals_place_is_never_followed(make_sink, make_gateway, kind):
    """A link named as the journal of deliveries, planted in the spool folder
    (other programs write there): its target is neither read nor emptied, and
    it does not hold the sending (it can hold no line of ours); the messages
    go, each delivery committed at once."""
    sink = make_sink()
    gw = make_gateway(sink)
    ids = queue(gw.spool, 2)
    victim = gw.dir / "victim.txt"
    victim.write_bytes(b"precious data\n")
    journal = gw.spool / bg.DELIVERIES_FILE
    if kind == "symbolic":
        journal.symlink_to(victim)
    else:
        os.link(victim, journal)
    gw.cli("send", "--all", check=0)
    assert victim.read_bytes() == b"precious data\n"
    assert arrived(sink) == {mid: 1 for mid in ids}
    assert waiting(gw.spool) == []


class PowerCut(BaseException):
    """The machine stops: nothing after it happens (not an Exception, so no
    handler of the sender's catches it)."""


class Disk:
    """What a power cut leaves: the database as of its last flush (sync_db;
    before the check: the state the check began with, every earlier commit
    being flushed), and every file removed from the spool since the folder's
    last flush back in it. The worst case a power cut can leave, for both.
    The journal of deliveries is never flushed: it is left as it was at the
    database's last flush (lines of a group already recorded, which must
    not count again), the worst it can be short of garbage."""

    def __init__(self, monkeypatch, gw_dir: Path, spool: Path):
        self.dir, self.spool = gw_dir, spool
        self.db_files = self._db_bytes()
        self.unflushed_removals: dict = {}
        self.syncs, self.cut_state = 0, None
        real_sync, real_fsync_folder, real_unlink = bg.sync_db, bg.fsync_folder, os.unlink

        def sync_db(conn, relaxed=False):
            real_sync(conn, relaxed)
            if self.cut_state is None:
                self.db_files, self.syncs = self._db_bytes(), self.syncs + 1

        def fsync_folder(folder):
            real_fsync_folder(folder)
            if self.cut_state is None and Path(folder) == spool:
                self.unflushed_removals.clear()

        def unlink(path, *args, **kwargs):
            path = Path(path)
            if self.cut_state is None and path.parent == spool and path.exists():
                self.unflushed_removals[path.name] = (path.read_bytes(), path.stat().st_mtime)
            return real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(bg, "sync_db", sync_db)
        monkeypatch.setattr(bg, "fsync_folder", fsync_folder)
        monkeypatch.setattr(os, "unlink", unlink)

    def _db_bytes(self) -> dict:
        found = {p.name: p.read_bytes() for p in self.dir.glob("bibliogate.db*")
                 if not p.name.endswith("-shm")}
        journal = self.spool / bg.DELIVERIES_FILE
        if journal.exists():
            found[bg.DELIVERIES_FILE] = journal.read_bytes()
        return found

    def cut(self) -> None:
        """The power goes: what is on disk now is kept aside."""
        files = {p.name: (p.read_bytes(), p.stat().st_mtime) for p in self.spool.iterdir()
                 if p.is_file() and p.name != bg.DELIVERIES_FILE}
        files.update(self.unflushed_removals)
        self.cut_state = (dict(self.db_files), files)
        raise PowerCut()

    def restart(self) -> None:
        """The machine is back: the disk as the cut left it."""
        db_files, files = self.cut_state
        for p in list(self.dir.glob("bibliogate.db*")) + list(self.spool.iterdir()):
            if p.is_file():
                p.unlink()
        for name, data in db_files.items():
            (self.spool if name == bg.DELIVERIES_FILE else self.dir).joinpath(name).write_bytes(data)
        for name, (data, mtime) in files.items():
            (self.spool / name).write_bytes(data)
            os.utime(self.spool / name, (mtime, mtime))


def pairs(sink) -> collections.Counter:
    """(Message-ID, recipient) -> copies the server took."""
    return collections.Counter((m.message["Message-ID"], a) for m in sink.messages
                               for a in m.rcpt_tos)


@pytest.mark.parametrize("cut_at, after_reply", [
    (1, False),          # before anything was flushed
    (101, False),        # just after the first group was flushed
    (160, False),        # in the middle of the second group
    (100, True),         # the server took the 100th; its record and flush not yet made
    (130, True),
], ids=["first", "after a flush", "mid-group", "end of a group", "after a reply"])
def test_a_power_cut_sends_again_at_most_the_last_unflushed_group(
        tmp_path, make_sink, monkeypatch, cut_at, after_reply):
    """A power cut in a drain of 220 messages, at the `cut_at`-th transaction
    (before it, or once the server replied 250 and nothing was recorded).
    The disk keeps only what was flushed. After the restart nothing is
    lost, and exactly the pairs (message, recipient) the server took since
    the last flush go again: at most one group, Sender.GROUP_MESSAGES. The
    5th message is partly delivered (b is refused for now) and keeps its
    promise: a and c do not get it twice unless its group was not flushed."""
    from test_sender import make_sender
    sink = make_sink(rcpt_replies={"b@example.org": "450 4.2.1 Mailbox busy"})
    clock = Clock()         # never moves: the groups are closed by their size only
    settings, sender = make_sender(tmp_path, sink, clock=clock)
    ids = queue(settings.spool, 220)
    (settings.spool / "m004.TMP").write_bytes(eml(
        to=["a@example.org", "b@example.org", "c@example.org"], Message_ID=ids[4]))
    os.utime(settings.spool / "m004.TMP", (time.time() - 600 + 4,) * 2)
    disk = Disk(monkeypatch, tmp_path, settings.spool)
    real_transaction, calls = bg.transaction, []
    taken_at_last_flush = []

    def transaction(*args, **kwargs):
        calls.append(1)
        if len(calls) == cut_at and not after_reply:
            disk.cut()
        t = real_transaction(*args, **kwargs)
        if len(calls) == cut_at and after_reply:
            disk.cut()
        return t

    real_sync = bg.sync_db

    def sync_db(conn, relaxed=False):
        real_sync(conn, relaxed)
        if disk.cut_state is None:
            taken_at_last_flush[:] = [sum(pairs(sink).values())]

    monkeypatch.setattr(bg, "transaction", transaction)
    monkeypatch.setattr(bg, "sync_db", sync_db)
    with pytest.raises(PowerCut):
        sender.check(limit=0)
    taken_before_cut = sum(pairs(sink).values())
    repeatable = taken_before_cut - (taken_at_last_flush[0] if taken_at_last_flush else 0)
    sender.journal.close()
    disk.restart()
    monkeypatch.undo()
    sink.rcpt_replies.clear()
    settings, sender = make_sender(tmp_path, sink)
    assert sender.check(limit=0, ignore_waits=True).problem is None
    got = pairs(sink)
    expected = {(mid, f"patron{n}@example.org") for n, mid in enumerate(ids) if n != 4}
    expected |= {(ids[4], f"{x}@example.org") for x in "abc"}
    assert set(got) == expected                                       # nothing lost
    repeats = sum(n - 1 for n in got.values())
    assert repeats == repeatable                                     # the unflushed group only
    assert repeatable <= bg.Sender.GROUP_MESSAGES + 2    # (m004 has 3 recipients)
    assert waiting(settings.spool) == [] and bad(settings.spool) == []
    # One 'sent' event per file: the lines of a group recorded before the cut
    # (left in the journal as it was at that flush) are not recorded again.
    sent = collections.Counter(r[0] for r in sender.db.execute(
        "SELECT file FROM events WHERE kind = 'sent'"))
    assert set(sent.values()) == {1} and len(sent) == 220
