"""The spool and the import folder as a Windows server really behaves, while
a batch drains to a real SMTP server on 127.0.0.1.

On Windows a file another program has open cannot be renamed or deleted
(WinError 32, "being used by another process"), a file about to be deleted or
scanned by the antivirus says "access denied" (WinError 5), and the folder
listing reports a size and time that NTFS updates lazily while a writer keeps
the file open. Linux does none of this, so these tests make os.rename,
os.replace, os.unlink, os.open and open raise PermissionError with `winerror`
set, where and when Windows would, and make os.scandir report stale sizes and
times. The SMTP server, the database and the files themselves are real.

What must hold: nothing lost, nothing sent twice, nothing half-sent, no
recursion, and the rest of the queue keeps moving.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import random
import time
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import eml, write_ini

#: At most this many checks drain a batch below; each test stays bounded.
MAX_CHECKS = 60


# -- the Windows file system, simulated ------------------------------------------

def win_error(code: int, path) -> PermissionError:
    text = {32: "The process cannot access the file because it is being used by another "
                "process", 5: "Access is denied"}[code]
    exc = PermissionError(13, text, str(path))
    exc.winerror = code
    return exc


class WindowsFS:
    """Faults for files in one folder. `held` maps a file name to the error
    code every operation on it gets (a program holding it open); `flaky`
    makes any operation fail at random, in bursts, from a seeded generator;
    `stale` makes the listing report (mtime, size) recorded earlier. Every
    pause patiently() makes is counted, never slept."""

    def __init__(self, monkeypatch, folder: Path):
        self.folder = Path(folder).resolve()
        self.held: dict[str, int] = {}
        self.writing: set = set()
        self.held_ops = {"rename", "replace", "unlink", "open"}
        self.stale: dict[str, tuple] = {}
        self.rng, self.rate, self.burst = None, 0.0, 0
        self.failing: dict[tuple, int] = {}
        self.errors = collections.Counter()
        self.pauses = []
        real = {name: getattr(os, name) for name in ("rename", "replace", "unlink", "open",
                                                      "scandir")}
        real_open = builtins.open
        self.real, self.real_open = real, real_open
        monkeypatch.setattr(bg, "in_use_pause", self.pauses.append)

        def two(op):
            def fake(src, dst, *a, **k):
                self._maybe_fail(op, src, dst)
                return real[op](src, dst, *a, **k)
            return fake

        def fake_unlink(path, *a, **k):
            self._maybe_fail("unlink", path)
            return real["unlink"](path, *a, **k)

        def fake_os_open(path, flags, *a, **k):
            self._maybe_fail("open", path)
            return real["open"](path, flags, *a, **k)

        def fake_open(file, *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)):
                self._maybe_fail("open", file)
            return real_open(file, *a, **k)

        monkeypatch.setattr(os, "rename", two("rename"))
        monkeypatch.setattr(os, "replace", two("replace"))
        monkeypatch.setattr(os, "unlink", fake_unlink)
        monkeypatch.setattr(os, "remove", fake_unlink)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)          # pathlib's read_bytes()
        monkeypatch.setattr(os, "scandir", self._scandir)

    def _mine(self, path) -> str | None:
        """The queue name a path of the folder stands for (a claimed file
        counts as its waiting one), or None for paths elsewhere."""
        try:
            path = Path(os.fsdecode(path))
        except TypeError:
            return None
        if path.parent.resolve() != self.folder:
            return None
        name = path.name
        if name.startswith(".bibliogate-"):     # the sender's own lock file
            return None
        if bg.is_claim_name(name):
            name = name[1:-len(bg.CLAIM_SUFFIX)]
        return name

    def _maybe_fail(self, op, *paths):
        names = [n for n in map(self._mine, paths) if n]
        if not names:
            return
        for name in names:
            code = self.held.get(name)
            if code and op in self.held_ops:
                self.errors[op, code] += 1
                raise win_error(code, paths[0])
            if name in self.writing:
                if op == "open":                # its writer shares reading only
                    return
                self.errors[op, 32] += 1
                raise win_error(32, paths[0])
        key = (op, names[0])
        left = self.failing.get(key, 0)
        if left == 0 and self.rng is not None and self.rng.random() < self.rate:
            left = self.rng.randint(1, self.burst)       # sometimes longer than patience
        if left:
            self.failing[key] = left - 1
            code = self.rng.choice((5, 32)) if self.rng else 32
            self.errors[op, code] += 1
            raise win_error(code, paths[0])

    def flaky(self, seed: int, rate: float = 0.3, burst: int = 14) -> None:
        self.rng, self.rate, self.burst = random.Random(seed), rate, burst

    def calm(self) -> None:
        self.rng, self.held, self.writing = None, {}, set()
        self.failing.clear()

    def _scandir(self, path="."):
        entries = self.real["scandir"](path)
        if Path(os.fsdecode(path)).resolve() != self.folder or not self.stale:
            return entries
        return _StaleListing(entries, self.stale)


class _StaleEntry:
    def __init__(self, entry, stale):
        self._entry, self._stale = entry, stale
        self.name, self.path = entry.name, entry.path

    def stat(self, follow_symlinks=True):
        st = self._entry.stat(follow_symlinks=follow_symlinks)
        if self.name not in self._stale:
            return st
        mtime, size = self._stale[self.name]
        values = list(st)
        values[6], values[8] = size, int(mtime)            # st_size, st_mtime (int slot)
        return os.stat_result(values, {"st_mtime": mtime})

    def __getattr__(self, name):
        return getattr(self._entry, name)


class _StaleListing:
    def __init__(self, entries, stale):
        self._entries, self._stale = entries, stale

    def __enter__(self):
        self._entries.__enter__()
        return self

    def __exit__(self, *exc):
        return self._entries.__exit__(*exc)

    def __iter__(self):
        return (_StaleEntry(e, self._stale) for e in self._entries)

    def close(self):
        self._entries.close()


# -- the gateway -----------------------------------------------------------------

@pytest.fixture
def spool_gateway(tmp_path, sink):
    settings, _ = bg.ensure_layout(write_ini(tmp_path / "gw", sink))
    journal = bg.Journal(settings.database)
    yield settings, journal
    journal.db.close()


def queue(spool: Path, count: int, tag: str = "m", body: str = "Hi.\n") -> dict:
    """count waiting files, oldest first; Message-ID -> the bytes queued."""
    sent, base = {}, time.time() - 600
    for n in range(count):
        mid = f"<{tag}-{n}@win.test>"
        data = eml(to=f"patron{n}@example.org", subject=f"{tag} {n}", body=body,
                   Message_ID=mid)
        path = spool / f"{tag}{n:03d}.TMP"
        path.write_bytes(data)
        os.utime(path, (base + n, base + n))
        sent[mid] = data
    return sent


def arrived(sink) -> collections.Counter:
    return collections.Counter(m.message["Message-ID"] for m in sink.messages)


def left_in(spool: Path) -> list:
    return sorted(p.name for p in spool.iterdir()
                  if not p.name.startswith(".bibliogate-") and not p.name.endswith(".lock"))


def drain(settings, journal, until, checks=MAX_CHECKS) -> int:
    """Checks (send --all) until `until()` or MAX_CHECKS; returns how many ran."""
    for n in range(1, checks + 1):
        bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
        if until():
            return n
    return checks


def assert_each_once_and_whole(sink, queued: dict) -> None:
    got = arrived(sink)
    assert [mid for mid in queued if got[mid] != 1] == [], got
    assert sum(got.values()) == len(queued)
    for message in sink.messages:               # nothing half-sent
        body = message.message.get_content()
        original = queued[message.message["Message-ID"]]
        assert body.strip() == original.split(b"\n\n", 1)[1].decode().strip()


# -- the RecursionError, as found ------------------------------------------------

def past_give_up(journal, name: str) -> None:
    long_ago = time.time() - 100 * 3600
    with journal.db:
        journal.db.execute("INSERT INTO spool_state(file, attempts, first_failed, next_try, "
                           "last_error) VALUES (?, 9, ?, NULL, '451 busy')", (name, long_ago))


@pytest.mark.parametrize("code", [32, 5])
def test_a_file_past_give_up_that_cannot_be_renamed_bad_does_not_stop_the_queue(
        monkeypatch, spool_gateway, sink, code):
    """As found: the file is held open by another program past
    give_up_after_hours; _later called _bad, which called _later ... until
    RecursionError, and the messages behind it were never sent."""
    settings, journal = spool_gateway
    fs = WindowsFS(monkeypatch, settings.spool)
    queued = queue(settings.spool, 3)
    past_give_up(journal, "m000.TMP")
    fs.held["m000.TMP"] = code
    result = bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert result.sent == 2 and result.problem is None
    assert left_in(settings.spool) == ["m000.TMP"]              # not lost, not .BAD
    fs.calm()
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert_each_once_and_whole(sink, queued)
    assert left_in(settings.spool) == []


def test_a_refused_file_past_give_up_whose_bad_rename_fails_waits_for_the_next_check(
        monkeypatch, make_sink, tmp_path):
    """The server says 451 once more past give-up; the rename to .BAD meets
    WinError 32 (the antivirus scanning it). No recursion: it stays queued,
    the next message goes, and a later check makes it .BAD."""
    sink = make_sink(fail_first=1)
    settings, _ = bg.ensure_layout(write_ini(tmp_path / "gw", sink))
    journal = bg.Journal(settings.database)
    fs = WindowsFS(monkeypatch, settings.spool)
    queue(settings.spool, 2)
    past_give_up(journal, "m000.TMP")
    fs.held["m000.TMP"] = 32
    fs.held_ops = {"replace"}                   # only the rename to .BAD fails
    result = bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert (result.sent, result.bad, result.deferred) == (1, 0, 1)
    assert arrived(sink) == {"<m-1@win.test>": 1}
    assert "m000.TMP" in left_in(settings.spool)
    assert len(fs.pauses) >= len(bg.IN_USE_PAUSES)          # it was retried for a while
    [row] = journal.db.execute("SELECT last_error FROM spool_state WHERE file = 'm000.TMP'")
    assert "could not be renamed .BAD" in row[0] and "in use" in row[0]
    fs.calm()
    sink.fail_first = sink.data_commands + 1
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert sorted(n for n in left_in(settings.spool) if bg.is_bad_name(n)) == ["m000.BAD"]
    assert sum(arrived(sink).values()) == 1
    journal.db.close()


# -- in use at random moments ----------------------------------------------------

def start_writing(fs: WindowsFS, spool: Path, name: str, mid: str) -> bytes:
    """A foreign program has written half of name and keeps it open; the
    listing says it has not changed for an hour. Returns the whole text."""
    data = eml(subject=name, body="One line of a long letter.\n" * 300, Message_ID=mid)
    (spool / name).write_bytes(data[:len(data) // 3])
    fs.stale[name] = (time.time() - 3600, 10)
    fs.writing.add(name)
    return data


def finish_writing(fs: WindowsFS, spool: Path, name: str, data: bytes) -> None:
    with fs.real_open(spool / name, "wb") as fh:        # the writer is not the one faulted
        fh.write(data)
    os.utime(spool / name, (time.time() - 60, time.time() - 60))
    fs.writing.discard(name)
    del fs.stale[name]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_in_use_errors_at_random_moments_lose_nothing_and_send_nothing_twice(
        monkeypatch, spool_gateway, sink, seed):
    """Every rename, replace, delete and open in the spool fails at random
    (30 %) with WinError 32 or 5, in bursts of 1 to 14 attempts: some shorter
    than the ~2 s of patience, some longer. Meanwhile three files are still
    being written behind a stale listing, and one file waits past
    give_up_after_hours. The batch drains regardless, each message once and
    whole."""
    settings, journal = spool_gateway
    fs = WindowsFS(monkeypatch, settings.spool)
    queued = queue(settings.spool, 30)
    queued.update(queue(settings.spool, 1, tag="late"))
    past_give_up(journal, "late000.TMP")
    writers = {f"w{n}.TMP": f"<w{n}@win.test>" for n in range(3)}
    texts = {name: start_writing(fs, settings.spool, name, mid) for name, mid in writers.items()}
    fs.flaky(seed)
    checks = 0

    def step():
        nonlocal checks
        checks += 1
        if checks == 3:                         # the writers finish and close their files
            for name, data in texts.items():
                finish_writing(fs, settings.spool, name, data)
        return checks > 3 and not left_in(settings.spool)
    drain(settings, journal, step)
    assert sum(fs.errors.values()) > 20                      # the faults did happen
    fs.calm()
    drain(settings, journal, lambda: not left_in(settings.spool), checks=3)
    queued.update({writers[name]: data for name, data in texts.items()})
    assert_each_once_and_whole(sink, queued)
    assert left_in(settings.spool) == []                    # no claimed file left behind


def test_a_delivered_file_that_cannot_be_removed_is_removed_later_not_sent_again(
        monkeypatch, spool_gateway, sink):
    settings, journal = spool_gateway
    fs = WindowsFS(monkeypatch, settings.spool)
    queued = queue(settings.spool, 3)
    fs.held["m001.TMP"] = 5
    fs.held_ops = {"unlink"}                    # claimed and sent; the delete is refused
    result = bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert result.sent == 3
    assert left_in(settings.spool) == ["m001.TMP"]          # back under its name
    for _ in range(2):                          # still held: never sent again
        bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    fs.calm()
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert_each_once_and_whole(sink, queued)
    assert left_in(settings.spool) == []


def test_a_claimed_file_that_cannot_be_put_back_keeps_its_ledger_row(
        monkeypatch, spool_gateway, sink):
    """Delivered, not removed, and not put back under its name either (both
    refused): the next check must not forget that it was delivered."""
    settings, journal = spool_gateway
    fs = WindowsFS(monkeypatch, settings.spool)
    queued = queue(settings.spool, 2)
    fs.held["m000.TMP"] = 32
    fs.held_ops = {"unlink"}
    real_rename = os.rename

    def no_put_back(src, dst, *a, **k):
        if bg.is_claim_name(Path(src).name):
            raise win_error(32, src)
        return real_rename(src, dst, *a, **k)
    monkeypatch.setattr(os, "rename", no_put_back)
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert ".m000.TMP" + bg.CLAIM_SUFFIX in left_in(settings.spool)
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)    # still stuck
    monkeypatch.setattr(os, "rename", real_rename)
    fs.calm()
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert_each_once_and_whole(sink, queued)
    assert left_in(settings.spool) == []


# -- stale listings: a file still being written ----------------------------------

def test_a_file_still_being_written_is_not_sent_half_way_though_the_listing_says_old(
        monkeypatch, spool_gateway, sink):
    """NTFS: while the library system keeps loan.TMP open and writes it, the
    folder listing shows an old time and size. The file's own time decides."""
    settings, journal = spool_gateway
    fs = WindowsFS(monkeypatch, settings.spool)
    queued = queue(settings.spool, 2)
    data = eml(subject="letter", body="A long letter.\n" * 200, Message_ID="<letter@win.test>")
    path = settings.spool / "letter.TMP"
    path.write_bytes(data[:len(data) // 2])                 # half written, just now
    fs.stale["letter.TMP"] = (time.time() - 3600, 0)
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert "<letter@win.test>" not in arrived(sink)
    assert left_in(settings.spool) == ["letter.TMP"]
    with open(path, "ab") as fh:                           # the writer finishes and closes
        fh.write(data[len(data) // 2:])
    os.utime(path, (time.time() - 60, time.time() - 60))
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    queued["<letter@win.test>"] = data
    assert_each_once_and_whole(sink, queued)


def test_a_file_held_open_by_its_writer_is_left_for_the_next_check(
        monkeypatch, spool_gateway, sink):
    """The writer holds the file open (sharing reads, as most programs do):
    renaming it fails with WinError 32, but reading would succeed. The
    listing is stale. The sender must not take it until the writer is done."""
    settings, journal = spool_gateway
    fs = WindowsFS(monkeypatch, settings.spool)
    queued = queue(settings.spool, 2)
    data = eml(subject="held", body="Many lines.\n" * 300, Message_ID="<held@win.test>")
    path = settings.spool / "held.TMP"
    path.write_bytes(data[:300])
    os.utime(path, (time.time() - 3600, time.time() - 3600))   # what the listing reports
    fs.held["held.TMP"] = 32
    fs.held_ops = {"rename", "replace", "unlink"}          # open for reading still works
    result = bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert result.sent == 2 and "<held@win.test>" not in arrived(sink)
    assert left_in(settings.spool) == ["held.TMP"]
    path.write_bytes(data)
    os.utime(path, (time.time() - 60, time.time() - 60))
    fs.calm()
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    queued["<held@win.test>"] = data
    assert_each_once_and_whole(sink, queued)


def test_a_file_that_grows_while_it_is_read_is_not_sent(monkeypatch, spool_gateway, sink):
    """The bytes read must be the whole file: the size of the open file
    before and after reading must match what was read."""
    settings, journal = spool_gateway
    queued = queue(settings.spool, 1)
    path = settings.spool / "m000.TMP"
    real_fstat, calls, inode = os.fstat, [], path.stat().st_ino

    def growing(fd):
        st = real_fstat(fd)
        if st.st_ino == inode:                  # the message's (not the journal's)
            calls.append(fd)
        if st.st_ino == inode and len(calls) == 2:      # after the read: the writer appended
            values = list(st)
            values[6] += 100
            return os.stat_result(values)
        return st
    monkeypatch.setattr(os, "fstat", growing)
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert arrived(sink) == {} and left_in(settings.spool) == ["m000.TMP"]
    monkeypatch.setattr(os, "fstat", real_fstat)
    os.utime(path, (time.time() - 60, time.time() - 60))
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert_each_once_and_whole(sink, queued)


# -- a killed process leaves a claimed file --------------------------------------

def test_a_claimed_file_left_by_a_killed_process_is_taken_back_and_sent_once(
        spool_gateway, sink):
    settings, journal = spool_gateway
    queued = queue(settings.spool, 2)
    os.rename(settings.spool / "m000.TMP", bg.claim_path(settings.spool / "m000.TMP"))
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert_each_once_and_whole(sink, queued)
    assert left_in(settings.spool) == []
    [(kind, file)] = journal.db.execute("SELECT kind, file FROM events WHERE kind = 'recovered'")
    assert file == "m000.TMP"


def test_a_claimed_file_delivered_before_the_kill_is_not_sent_again(spool_gateway, sink):
    """Killed between the server's 250 and the removal: the ledger row
    stands, the file is still claimed. It is put back and removed."""
    settings, journal = spool_gateway
    queue(settings.spool, 2)
    import hashlib
    data = (settings.spool / "m000.TMP").read_bytes()
    with journal.db:
        journal.db.execute("INSERT INTO sent(file, digest, at) VALUES (?,?,?)",
                           ("m000.TMP", hashlib.sha256(data).hexdigest(), time.time()))
    os.rename(settings.spool / "m000.TMP", bg.claim_path(settings.spool / "m000.TMP"))
    bg.Sender(settings, journal).check(limit=0, ignore_waits=True)
    assert arrived(sink) == {"<m-1@win.test>": 1}
    assert left_in(settings.spool) == []


# -- retry and delete on a held file ---------------------------------------------

@pytest.mark.parametrize("command", ["delete", "retry"])
def test_retry_and_delete_of_a_held_file_say_what_holds_it(
        monkeypatch, tmp_path, sink, capsys, command):
    ini = write_ini(tmp_path / "gw", sink)
    settings, _ = bg.ensure_layout(ini)
    name = "m000.TMP" if command == "delete" else "m000.BAD"
    (settings.spool / name).write_bytes(eml())
    fs = WindowsFS(monkeypatch, settings.spool)
    fs.held[name] = 32
    code = bg.main(["--config", str(ini), command, name])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert err.count("\n") == 1, err
    assert f"{name} is in use: another program has it open" in err
    assert (settings.spool / name).exists()
    assert len(fs.pauses) == len(bg.IN_USE_PAUSES)          # ~2 s of retries, not slept
    fs.calm()
    assert bg.main(["--config", str(ini), command, name]) == 0


def test_a_short_in_use_is_retried_and_then_succeeds(monkeypatch, tmp_path, sink, capsys):
    ini = write_ini(tmp_path / "gw", sink)
    settings, _ = bg.ensure_layout(ini)
    (settings.spool / "m000.BAD").write_bytes(eml())
    fs = WindowsFS(monkeypatch, settings.spool)
    fs.failing[("replace", "m000.BAD")] = 3     # the antivirus, for three attempts
    assert bg.main(["--config", str(ini), "retry", "m000.BAD"]) == 0
    assert len(fs.pauses) == 3
    assert (settings.spool / "m000.TMP").exists()


# -- files that are not messages: checked before they are opened -----------------

POSIX = pytest.mark.skipif(os.name == "nt", reason="FIFOs and /dev/zero are POSIX")


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_sparse(path: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate(40 * 1024 ** 3)             # 40 GB, no disk used


def make_dev_zero_link(path: Path) -> None:
    os.symlink("/dev/zero", path)


def make_private_link(path: Path) -> None:
    secret = path.parent.parent / "secret.txt"
    secret.write_text("To: thief@example.org\nSubject: the password\n\nS3cret\n")
    os.chmod(secret, 0o600)
    os.symlink(secret, path)


@POSIX
@pytest.mark.parametrize("make, reason", [
    (make_fifo, "not a plain file"),
    (make_sparse, "the limit here is 40 MB"),
    (make_dev_zero_link, "link"),
    (make_private_link, "link"),
], ids=["fifo", "sparse-40GB", "link-to-dev-zero", "link-to-private-file"])
def test_a_spool_file_that_is_not_a_message_is_set_aside_unread_and_the_rest_goes(
        gateway, sink, make, reason):
    bg.ensure_layout(gateway.ini)
    queued = queue(gateway.spool, 2)
    odd = gateway.spool / "odd.TMP"
    make(odd)
    os.utime(odd, (time.time() - 60, time.time() - 60), follow_symlinks=False)
    for _ in range(2):                          # the listing pages too: never blocked
        gateway.cli("queue", "--json", check=0, timeout=30)
    r = gateway.cli("send", "--all", timeout=30)
    assert "2 sent, 1 failed for good" in r.stdout, r.stdout + r.stderr
    assert_each_once_and_whole(sink, queued)
    assert sorted(n for n in left_in(gateway.spool) if not n.endswith(".lock")) == [
        "odd.BAD", "odd.BAD" + bg.REASON_SUFFIX]
    text = (gateway.spool / ("odd.BAD" + bg.REASON_SUFFIX)).read_text(encoding="utf-8")
    assert reason in text
    assert not any("thief" in m.data.decode() for m in sink.messages)
    log = "".join(p.read_text(encoding="utf-8") for p in (gateway.dir / "logs").glob("*.log"))
    assert "S3cret" not in log


# -- the import folder: claimed before it is read, checked before it is opened ---

NOON = 1772449200.0          # 2026-03-02 12:00 UTC; only differences matter here
PATRONS_CSV = ("patron_id,name,email,guardian_email,group,auto_overdue\r\n"
               "P1,Ann Smith,ann@example.org,,7A,yes\r\nP2,Bob Jones,,,7A,no\r\n")


class StepClock:
    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now


def import_gateway(tmp_path):
    clock = StepClock(NOON)
    gw = bg.Gateway(write_ini(tmp_path / "gw"), clock=clock)
    return gw, clock, bg.ImportWatch()


def settle(gw, clock, watcher, rounds=2):
    for _ in range(rounds):
        watcher(gw, clock())
        clock.now += bg.STABLE_SECONDS + 1


def patron_ids(gw):
    return [r[0] for r in gw.journal.db.execute("SELECT patron_id FROM patrons ORDER BY 1")]


def everything_logged(gw) -> str:
    events = " ".join(r["detail"] for r in gw.journal.db.execute("SELECT detail FROM events"))
    files = "".join(p.read_text(encoding="utf-8", errors="replace")
                    for folder in (gw.settings.log_folder, gw.settings.import_folder / "failed")
                    if folder.exists() for p in folder.iterdir() if p.suffix in (".log", ".txt"))
    return events + files


def test_a_dropped_file_held_by_its_writer_is_imported_once_it_is_free(monkeypatch, tmp_path):
    gw, clock, watcher = import_gateway(tmp_path)
    folder = gw.settings.import_folder
    folder.mkdir(exist_ok=True)
    fs = WindowsFS(monkeypatch, folder)
    path = folder / "patrons.csv"
    path.write_text(PATRONS_CSV[:60], encoding="utf-8")     # half a file, still open
    fs.writing.add("patrons.csv")
    settle(gw, clock, watcher, rounds=3)
    assert patron_ids(gw) == [] and path.exists()
    assert not (folder / "failed").exists()                 # not refused: waiting
    with fs.real_open(path, "w", encoding="utf-8") as fh:
        fh.write(PATRONS_CSV)
    fs.calm()
    settle(gw, clock, watcher)
    assert patron_ids(gw) == ["P1", "P2"] and not path.exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_a_dropped_file_behind_a_stale_listing_is_not_imported_half_way(monkeypatch, tmp_path):
    gw, clock, watcher = import_gateway(tmp_path)
    folder = gw.settings.import_folder
    folder.mkdir(exist_ok=True)
    fs = WindowsFS(monkeypatch, folder)
    path = folder / "patrons.csv"
    path.write_text(PATRONS_CSV[:90], encoding="utf-8")     # the header and half of P1
    fs.stale["patrons.csv"] = (NOON - 3600, 30)
    settle(gw, clock, watcher, rounds=3)
    assert patron_ids(gw) == [] and path.exists() and not (folder / "failed").exists()
    path.write_text(PATRONS_CSV, encoding="utf-8")
    del fs.stale["patrons.csv"]
    settle(gw, clock, watcher)
    assert patron_ids(gw) == ["P1", "P2"]


def test_a_file_run_had_taken_when_it_was_stopped_is_imported_at_the_next_start(tmp_path):
    gw, clock, watcher = import_gateway(tmp_path)
    folder = gw.settings.import_folder
    folder.mkdir(exist_ok=True)
    (folder / (".patrons.csv" + bg.IMPORTING_SUFFIX)).write_text(PATRONS_CSV, encoding="utf-8")
    settle(gw, clock, watcher, rounds=3)
    assert patron_ids(gw) == ["P1", "P2"]


@POSIX
@pytest.mark.parametrize("make, words", [
    (make_fifo, "not a plain file"),
    (make_dev_zero_link, "link"),
    (make_private_link, "link"),
], ids=["fifo", "link-to-dev-zero", "link-to-private-file"])
def test_a_dropped_name_that_is_not_a_plain_file_is_refused_unread(tmp_path, make, words):
    gw, clock, watcher = import_gateway(tmp_path)
    folder = gw.settings.import_folder
    folder.mkdir(exist_ok=True)
    make(folder / "patrons.csv")
    os.utime(folder / "patrons.csv", (NOON - 60, NOON - 60), follow_symlinks=False)
    settle(gw, clock, watcher, rounds=3)                    # never blocks, never reads
    failed = sorted(p.name for p in (folder / "failed").iterdir())
    assert len(failed) == 2 and failed[1].endswith(".txt")
    assert words in (folder / "failed" / failed[1]).read_text(encoding="utf-8")
    assert "S3cret" not in everything_logged(gw) and "thief" not in everything_logged(gw)


@pytest.mark.parametrize("gigabytes, words", [
    (1.5, "loans.csv line 2: longer than 1,048,576 bytes"),
    (10, "the file is 10,240 MB; the limit here is 2,048 MB"),
])
def test_a_gigabyte_line_is_refused_without_reading_it_whole(tmp_path, gigabytes, words):
    """One line of NUL bytes (a sparse file: no disk used) read as a whole
    line filled the memory at every attempt."""
    gw, clock, watcher = import_gateway(tmp_path)
    folder = gw.settings.import_folder
    folder.mkdir(exist_ok=True)
    path = folder / "loans.csv"
    with open(path, "wb") as fh:
        fh.write(b"patron_id,barcode,title,due_date\r\nP1,B1,")
        fh.truncate(int(gigabytes * 1024 ** 3))
    os.utime(path, (NOON - 60, NOON - 60))
    settle(gw, clock, watcher, rounds=3)
    [report] = [p for p in (folder / "failed").iterdir() if p.suffix == ".txt"]
    assert words in report.read_text(encoding="utf-8")


def test_a_refused_file_shows_only_a_short_escaped_excerpt(tmp_path):
    gw, clock, watcher = import_gateway(tmp_path)
    folder = gw.settings.import_folder
    folder.mkdir(exist_ok=True)
    secret = "root:$6$saltsalt$" + "x" * 80 + "\x1b[2J:18000:0:99999:7:::"
    (folder / "patrons.csv").write_text(secret + "\n", encoding="utf-8")
    os.utime(folder / "patrons.csv", (NOON - 60, NOON - 60))
    settle(gw, clock, watcher, rounds=3)
    logged = everything_logged(gw)
    assert "the header holds 'root:$6$saltsalt$xxx" in logged
    assert "\x1b" not in logged and "x" * 41 not in logged and "99999" not in logged


# -- the spool permission check: a probe file, not os.access ---------------------

def test_a_spool_folder_this_account_may_not_write_in_is_a_settings_problem(
        monkeypatch, tmp_path):
    """Windows: os.access on a folder ignores its ACL, and says yes. Creating
    a file is what the ACL refuses (WinError 5)."""
    ini = write_ini(tmp_path / "gw")
    spool = bg.ensure_layout(ini)[0].spool
    assert not [p for p in bg.load_settings(ini).problems if "spool_folder" in p]
    real_open = os.open

    def acl_refuses(path, flags, *a, **k):
        if Path(os.fsdecode(path)).parent == spool and flags & os.O_CREAT:
            raise win_error(5, path)
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", acl_refuses)
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    settings, _ = bg.ensure_layout(ini)
    assert any("spool_folder" in p and "cannot be read and written by this account" in p
               for p in settings.problems), settings.problems
    monkeypatch.setattr(os, "open", real_open)
    assert [p.name for p in spool.iterdir()] == []           # no probe left behind
    settings, _ = bg.ensure_layout(ini)
    assert not [p for p in settings.problems if "spool_folder" in p]


# -- writing into the spool while the antivirus looks ----------------------------

def test_enqueue_waits_out_a_brief_in_use_and_says_so_when_it_lasts(
        monkeypatch, tmp_path, sink, capsys):
    """Before: a rename refused for a moment (WinError 5, the antivirus
    scanning the new file) gave "free some disk space ... nothing was queued"."""
    ini = write_ini(tmp_path / "gw", sink)
    settings, _ = bg.ensure_layout(ini)
    letter = tmp_path / "letter.eml"
    letter.write_bytes(eml())
    fs = WindowsFS(monkeypatch, settings.spool)
    real_replace = fs.real["replace"]
    refusals = {"left": 3}

    def antivirus(src, dst, *a, **k):
        if Path(dst).parent.resolve() == fs.folder and str(dst).endswith(".TMP") \
                and refusals["left"]:
            refusals["left"] -= 1
            raise win_error(5, dst)
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", antivirus)
    assert bg.main(["--config", str(ini), "enqueue", str(letter)]) == 0
    assert len(fs.pauses) == 3 and len(list(settings.spool.glob("*.TMP"))) == 1
    refusals["left"] = 100
    capsys.readouterr()
    assert bg.main(["--config", str(ini), "enqueue", str(letter)]) == 1
    err = capsys.readouterr().err
    assert "is in use" in err and "disk space" not in err and "Nothing was queued" in err
    assert len(list(settings.spool.glob("*.TMP"))) == 1
    assert not [p for p in settings.spool.iterdir() if p.name.endswith(bg.PART_SUFFIX)]
