"""The batch sender against a real SMTP server (aiosmtpd on 127.0.0.1)."""

import functools
import json
import os
import time
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

import bibliogate as bg
from conftest import Clock, Sink, eml, write_ini




def drop(spool: Path, name: str, data: bytes, age: float = 60.0) -> Path:
    """A foreign program's file: written in place, dated `age` seconds back."""
    path = spool / name
    path.write_bytes(data)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def make_sender(folder: Path, sink=None, clock=None, **overrides):
    ini = write_ini(folder, sink, **overrides)
    settings, _ = bg.ensure_layout(ini)
    assert settings.problems == ()
    journal = bg.Journal(settings.database, clock or time.time)
    return settings, bg.Sender(settings, journal, clock or time.time)


def events(settings, kind):
    db = bg.open_db(settings.database)
    try:
        return [dict(r) for r in db.execute("SELECT * FROM events WHERE kind = ?", (kind,))]
    finally:
        db.close()


def test_batch_is_oldest_first_over_one_connection(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink, gateway__messages_per_check=3)
    for n in range(5):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"number {n}"), age=100 - n)
    result = sender.check()
    assert (result.sent, result.bad, result.deferred) == (3, 0, 0)
    assert [m.message["Subject"] for m in sink.messages] == ["number 0", "number 1", "number 2"]
    assert sink.sessions == 1
    assert sorted(p.name for p in settings.spool.glob("*.TMP")) == ["m3.TMP", "m4.TMP"]


def test_headers_are_rewritten_as_promised(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink, library__name="Hill School Library")
    raw = eml(to="pat@example.org", subject="Books", Bcc="hidden@example.org",
              **{"Reply-To": "desk@school.example"})
    drop(settings.spool, "one.tmp", raw)
    assert sender.check().sent == 1
    got = sink.messages[0]
    msg = got.message
    assert got.mail_from == "library@school.example"
    assert sorted(got.rcpt_tos) == ["hidden@example.org", "pat@example.org"]
    assert msg["From"] == "Hill School Library <library@school.example>"
    assert msg["Bcc"] is None and b"hidden@" not in got.data
    assert msg["Reply-To"] == "desk@school.example"
    assert msg["Date"] and msg["Message-ID"]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content() == "Hi.\n"


def test_message_id_of_a_foreign_file_is_the_same_on_every_try(tmp_path):
    raw = eml()
    a = bg.prepare_message(raw, "library@school.example", "", 0, "x.TMP")
    b = bg.prepare_message(raw, "library@school.example", "", 5, "x.TMP")
    assert a.message_id == b.message_id and a.message_id.endswith("@school.example>")


def test_priority_messages_jump_the_queue(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink, gateway__messages_per_check=2)
    for n in range(4):
        drop(settings.spool, f"letter{n}.TMP", eml(subject=f"letter {n}"), age=1000)
    path = bg.queue_test(settings, "librarian@school.example", time.time())
    assert path.name.startswith(bg.PRIORITY_PREFIX)
    sender.check()
    assert [m.message["Subject"].startswith("BiblioGate test") for m in sink.messages] == [True, False]


def test_550_makes_the_file_bad_with_the_reply_as_reason(tmp_path, make_sink):
    sink = make_sink(data_reply="550 5.7.1 Message refused by policy")
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "refused.TMP", eml())
    result = sender.check()
    assert result.bad == 1
    bad = settings.spool / "refused.BAD"
    assert bad.exists() and bad.read_bytes() == eml()
    reason = bg.read_reason(bad)
    assert "550 5.7.1 Message refused by policy" in reason
    assert events(settings, "bad")[0]["file"] == "refused.TMP"


def test_451_stays_waiting_and_is_retried_after_a_growing_wait(tmp_path, make_sink):
    sink = make_sink(fail_first=2)
    clock = Clock()
    settings, sender = make_sender(tmp_path, sink, clock)
    drop(settings.spool, "later.TMP", eml())
    assert sender.check().deferred == 1
    rows = bg.queue_rows(settings, sender.db)
    assert rows[0]["state"] == "waiting" and rows[0]["attempts"] == 1
    assert "451" in rows[0]["reason"]
    clock.advance(60)                      # within the first wait: not tried
    assert sender.check().deferred == 0 and len(sink.messages) == 0
    clock.advance(bg.RETRY_FIRST_SECONDS)  # tried, refused again: wait doubles
    assert sender.check().deferred == 1
    row = sender.db.execute("SELECT * FROM spool_state").fetchone()
    assert row["next_try"] - clock() == pytest.approx(2 * bg.RETRY_FIRST_SECONDS)
    clock.advance(2 * bg.RETRY_FIRST_SECONDS)
    assert sender.check().sent == 1
    assert sender.db.execute("SELECT COUNT(*) FROM spool_state").fetchone()[0] == 0


def test_gives_up_after_give_up_after_hours(tmp_path, make_sink):
    sink = make_sink(data_reply="451 4.3.0 Mailbox busy")
    clock = Clock()
    settings, sender = make_sender(tmp_path, sink, clock, gateway__give_up_after_hours=2)
    drop(settings.spool, "stuck.TMP", eml())
    for _ in range(30):                     # bounded: 30 hours of hourly checks at most
        sender.check()
        if (settings.spool / "stuck.BAD").exists():
            break
        clock.advance(3600)
    reason = bg.read_reason(settings.spool / "stuck.BAD")
    assert "after trying for 2 hours" in reason and "451 4.3.0 Mailbox busy" in reason


def test_some_recipients_refused_the_rest_get_it(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"gone@example.org": "550 5.1.1 No such user"})
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "two.TMP", eml(to="pat@example.org, gone@example.org"))
    assert sender.check().sent == 1
    assert sink.messages[0].rcpt_tos == ["pat@example.org"]
    refused = events(settings, "refused")
    assert "gone@example.org" in refused[0]["detail"] and "550 5.1.1" in refused[0]["detail"]


def test_every_recipient_refused_for_good_is_bad(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"gone@example.org": "550 5.1.1 No such user"})
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "gone.TMP", eml(to="gone@example.org"))
    assert sender.check().bad == 1
    assert "gone@example.org: 550 5.1.1 No such user" in bg.read_reason(settings.spool / "gone.BAD")


BAD_FILES = {
    "empty": (b"", "empty"),
    "blank": (b"\n\n  \n", "empty"),
    "binary": (bytes(range(256)) * 4, "not an email message"),
    "prose": (b"Dear patron, your book is late.\n", "not an email message"),
    "no recipient": (b"Subject: hi\n\nbody\n", "no recipient"),
    "bad address": (b"To: not-an-address\nSubject: hi\n\nbody\n", "no valid recipient"),
    "injection": (b"To: pat@example.org\nSubject: hi\rBcc: evil@example.org\n\nbody\n",
                  "carriage return"),
    "broken header": (b"To: pat@example.org\nthis line is no header\nSubject: x\n\nbody\n",
                      "no 'Name:'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_become_bad_with_a_reason_and_never_stop_the_rest(tmp_path, sink, kind):
    data, words = BAD_FILES[kind]
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "bad.TMP", data, age=100)
    drop(settings.spool, "good.TMP", eml(subject="still goes"), age=50)
    result = sender.check()
    assert (result.bad, result.sent) == (1, 1)
    assert words in bg.read_reason(settings.spool / "bad.BAD")
    assert sink.messages[0].message["Subject"] == "still goes"


def test_a_file_still_being_written_is_left_for_the_next_check(tmp_path, sink):
    clock = Clock()
    settings, sender = make_sender(tmp_path, sink, clock)
    path = settings.spool / "growing.TMP"
    path.write_bytes(b"To: pat@example.org\nSubject: half")   # just written
    assert sender.check().sent == 0 and path.exists()
    path.write_bytes(eml(subject="whole"))
    old = time.time() - 10
    os.utime(path, (old, old))                                 # quiet for 10 s
    assert sender.check().sent == 1
    assert sink.messages[0].message["Subject"] == "whole"


def test_server_down_keeps_messages_and_sends_when_it_is_back(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "wait.TMP", eml())
    sink.stop()
    result = sender.check()
    assert result.problem is not None and not result.problem.lasting
    assert "Could not reach the SMTP server 127.0.0.1" in str(result.problem)
    assert (settings.spool / "wait.TMP").exists()
    sink.start()
    assert sender.check().sent == 1           # no per-message wait after an outage


def test_connection_dropped_after_data_keeps_the_message(tmp_path, make_sink):
    sink = make_sink(drop_after_data=True)
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "a.TMP", eml(subject="a"), age=20)
    drop(settings.spool, "b.TMP", eml(subject="b"), age=10)
    result = sender.check()
    assert result.deferred == 1 and result.sent == 0
    assert (settings.spool / "a.TMP").exists() and (settings.spool / "b.TMP").exists()
    assert "connection" in bg.queue_rows(settings, sender.db)[0]["reason"]


def test_a_slow_server_is_cut_off_by_the_timeout(tmp_path, make_sink):
    sink = make_sink(delay=5)
    settings, sender = make_sender(tmp_path, sink, smtp__timeout_seconds=1)
    drop(settings.spool, "slow.TMP", eml())
    started = time.monotonic()
    result = sender.check()
    assert time.monotonic() - started < 4.5
    assert result.deferred == 1 and (settings.spool / "slow.TMP").exists()


def test_login_is_used_and_a_refused_login_stops_the_check(tmp_path, make_sink):
    sink = make_sink(auth=("library", "s3cret"))
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "a.TMP", eml())
    assert sender.check().sent == 1 and sink.logins == ["library"]
    settings, sender = make_sender(tmp_path / "wrong", sink, smtp__password="nope")
    for n in range(3):
        drop(settings.spool, f"w{n}.TMP", eml())
    result = sender.check()
    assert result.problem.lasting and "refused the login of 'library'" in str(result.problem)
    assert result.sent == 0 and len(list(settings.spool.glob("*.TMP"))) == 3


def test_starttls_verifies_the_certificate(tmp_path, make_sink):
    sink = make_sink(starttls=True)
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "tls.TMP", eml())
    assert sender.check().sent == 1
    settings, sender = make_sender(tmp_path / "untrusted", sink, smtp__ca_file="")
    drop(settings.spool, "tls.TMP", eml())
    result = sender.check()
    assert result.problem.lasting and "TLS" in str(result.problem)
    assert (settings.spool / "tls.TMP").exists()


def test_implicit_tls(tmp_path, make_sink):
    sink = make_sink(implicit_tls=True)
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "tls.TMP", eml())
    assert sender.check().sent == 1


def test_eight_bit_body_arrives_intact(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink)
    raw = ("To: pat@example.org\nSubject: =?utf-8?q?Pr=C3=AAt?=\nMIME-Version: 1.0\n"
           "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
           "Merci, Zoë — à bientôt.\n").encode("utf-8")
    drop(settings.spool, "fr.TMP", raw)
    assert sender.check().sent == 1
    assert sink.messages[0].message.get_content() == "Merci, Zoë — à bientôt.\n"


def test_a_file_already_delivered_before_a_crash_is_not_sent_again(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink)
    raw = eml()
    drop(settings.spool, "again.TMP", raw)
    import hashlib
    with sender.db:
        sender.db.execute("INSERT INTO sent(file, digest, at) VALUES (?,?,?)",
                          ("again.TMP", hashlib.sha256(raw).hexdigest(), time.time()))
    result = sender.check()
    assert sink.messages == [] and not (settings.spool / "again.TMP").exists()
    assert result.bad == 0


def test_two_senders_on_one_spool_do_not_overlap(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "a.TMP", eml())
    holder = bg.FileLock(settings.spool / ".bibliogate-sender.lock")
    assert holder.acquire()
    try:
        result = sender.check()
        assert "another BiblioGate process" in result.skipped and sink.messages == []
    finally:
        holder.release()
    assert sender.check().sent == 1


def test_cli_send_queue_retry_delete(gateway):
    spool = gateway.spool
    r = gateway.cli("enqueue", "-", input=eml(subject="from stdin").decode())
    assert r.returncode == 0, r.stderr
    name = r.stdout.strip()
    assert (spool / name).exists() and name.endswith(".TMP")
    drop(spool, "junk.TMP", b"\x00\x01 not mail")
    r = gateway.cli("send", "--all")
    assert r.returncode == 0, r.stderr
    assert "1 sent, 1 failed for good" in r.stdout
    rows = json.loads(gateway.cli("queue", "--json").stdout)
    assert [(x["file"], x["state"]) for x in rows] == [("junk.BAD", "bad")]
    assert "not an email message" in rows[0]["reason"]
    assert {"file", "state", "reason", "attempts", "to", "subject"} <= set(rows[0])
    assert gateway.cli("status").returncode == 1          # a .BAD file waits
    r = gateway.cli("retry", "junk.BAD")
    assert r.returncode == 0 and (spool / "junk.TMP").exists()
    assert not (spool / ("junk.BAD" + bg.REASON_SUFFIX)).exists()
    r = gateway.cli("delete", "junk.TMP")
    assert r.returncode == 0 and not (spool / "junk.TMP").exists()
    assert gateway.cli("status").returncode == 0
    r = gateway.cli("delete", "../bibliogate.ini")
    assert r.returncode == 1 and "not a file name in the spool folder" in r.stderr
    assert gateway.ini.exists()


def test_enqueue_refuses_what_could_never_be_sent(gateway, tmp_path):
    junk = tmp_path / "letter.txt"
    junk.write_text("Dear patron\n", encoding="utf-8")
    r = gateway.cli("enqueue", str(junk))
    assert r.returncode == 1 and "not an email message" in r.stderr
    assert list(gateway.spool.iterdir()) == [] or not list(gateway.spool.glob("*.TMP"))


def test_a_421_closing_the_connection_does_not_blame_the_next_message(tmp_path, make_sink):
    sink = make_sink(data_reply="421 4.3.2 Shutting down")
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "a.TMP", eml(subject="a"), age=20)
    drop(settings.spool, "b.TMP", eml(subject="b"), age=10)
    result = sender.check()
    assert result.deferred == 1
    rows = {r["file"]: r for r in bg.queue_rows(settings, sender.db)}
    assert rows["a.TMP"]["attempts"] == 1 and "421 4.3.2" in rows["a.TMP"]["reason"]
    assert rows["b.TMP"]["attempts"] == 0


def test_a_vanished_spool_folder_stops_the_sender_with_a_reason(tmp_path, sink):
    ini = write_ini(tmp_path, sink)
    gateway = bg.Gateway(ini)
    gateway.settings.spool.rmdir()
    gateway.tick()
    state, reason = gateway.sender_state
    assert state == "stopped" and "spool folder" in reason and "[gateway] spool_folder" in reason


def test_a_very_long_foreign_name_still_becomes_bad(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink)
    name = "x" * 240 + ".TMP"
    drop(settings.spool, name, b"not a message at all")
    assert sender.check().bad == 1
    bad = [p for p in settings.spool.iterdir() if p.name.endswith(".BAD")]
    assert len(bad) == 1 and "not an email message" in bg.read_reason(bad[0])


class HangUpAfterEachMessage(SMTP):
    """A server that closes the session right after accepting a message."""

    async def smtp_DATA(self, arg):
        await super().smtp_DATA(arg)
        if self.transport is not None:
            self.transport.close()


def test_a_server_that_hangs_up_after_each_message_blames_no_one(tmp_path):
    from conftest import Sink
    sink = type("HangUpSink", (Sink,), {"protocol_class": HangUpAfterEachMessage})()
    sink.start()
    try:
        settings, sender = make_sender(tmp_path, sink)
        drop(settings.spool, "a.TMP", eml(subject="a"), age=20)
        drop(settings.spool, "b.TMP", eml(subject="b"), age=10)
        result = sender.check()
        assert result.sent == 1 and result.deferred == 1
        row = sender.db.execute("SELECT * FROM spool_state").fetchone()
        assert row["file"] == "b.TMP" and row["next_try"] is None     # no wait imposed
        assert "before the message was handed over" in row["last_error"]
        assert sender.check().sent == 1                            # goes at the next check
        assert [m.message["Subject"] for m in sink.messages] == ["a", "b"]
    finally:
        sink.stop()


# timeout_seconds bounds each step, not the whole upload ######################

class SlowReader:
    """An SMTP server on 127.0.0.1 that takes the first `slow_bytes` of the
    message's data slowly and steadily: `step` bytes, then a pause, with a
    small receive buffer, as a slow link does; the rest at full speed, so
    that what the client's buffers still hold at the end never makes the
    test depend on how busy the machine is. Each message it received whole
    is in .messages."""

    def __init__(self, step: int = 8192, pause: float = 0.02, slow_bytes: int = 1_000_000):
        import socket
        import threading
        self.step, self.pause, self.slow_bytes, self.messages = step, pause, slow_bytes, []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.host, self.security, self.ca_file, self.auth = "127.0.0.1", "none", None, None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(30)
                    self._session(conn, deadline)
        except OSError:
            pass

    def _session(self, conn, deadline):
        conn.sendall(b"220 slow.test ESMTP\r\n")
        buf = b""
        while time.monotonic() < deadline:
            while b"\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-slow.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                while not buf.endswith(b"\r\n.\r\n") and time.monotonic() < deadline:
                    slow = len(buf) < self.slow_bytes
                    chunk = conn.recv(self.step if slow else 1 << 20)
                    if not chunk:
                        return
                    buf += chunk
                    if slow:
                        time.sleep(self.pause)
                self.messages.append(buf)
                buf = b""
                conn.sendall(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 Ok\r\n")

    def close(self):
        self.sock.close()


def test_a_large_message_on_a_slow_link_goes_with_a_short_timeout(tmp_path):
    """timeout_seconds = 1 and an upload of about three seconds (the first
    1 MB at about 400 KB/s): every step is quick, so the message goes."""
    server = SlowReader()
    try:
        settings, sender = make_sender(tmp_path, server, smtp__timeout_seconds=1)
        body = ("x" * 75 + "\n") * 16000
        drop(settings.spool, "big.TMP", eml(subject="big", body=body))
        result = sender.check()
        assert (result.sent, result.deferred, result.bad) == (1, 0, 0), events(settings, "deferred")
        assert len(server.messages) == 1 and len(server.messages[0]) > 1_200_000
    finally:
        server.close()


# Files from Windows tools ####################################################

@pytest.mark.parametrize("encode", [
    lambda text: b"\xef\xbb\xbf" + text.encode("utf-8"),          # Notepad: UTF-8 with BOM
    lambda text: text.encode("utf-16"),                            # PowerShell 5.1 Out-File
    lambda text: b"\xfe\xff" + text.encode("utf-16-be"),
], ids=["utf-8 BOM", "utf-16 LE", "utf-16 BE"])
def test_files_from_windows_tools_are_sent(tmp_path, sink, encode):
    settings, sender = make_sender(tmp_path, sink)
    text = "To: pat@example.org\r\nSubject: Bücher zurück\r\n\r\nGrüße, die Bücherei.\r\n"
    drop(settings.spool, "win.TMP", encode(text))
    result = sender.check()
    assert (result.sent, result.bad) == (1, 0), list(settings.spool.iterdir())
    msg = sink.messages[0].message
    assert sink.messages[0].rcpt_tos == ["pat@example.org"]
    assert msg["Subject"] == "Bücher zurück"
    assert msg.get_content() == "Grüße, die Bücherei.\n"


def test_a_size_over_the_limit_is_said_with_one_decimal_not_rounded_down():
    with pytest.raises(bg.BadMessage) as err:
        head = b"To: pat@example.org\n\n"
        bg.prepare_message(head + b"x" * (41 * 1048576 - len(head)), "l@s.example", "", 0, "x.TMP")
    assert "41.0 MB" in str(err.value) and "40.0 MB" in str(err.value)
    assert bg.megabytes(40 * 1048576 + 1) == "40.1 MB"


# Extensions the server offers ################################################

class OptionsSink(Sink):
    """A Sink offering SMTPUTF8 that records every MAIL command's parameters."""
    protocol_class = functools.partial(SMTP, enable_SMTPUTF8=True)

    def __init__(self, **options):
        super().__init__(**options)
        self.mail_options = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_options.append(list(mail_options))
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


def test_size_and_8bitmime_are_declared_where_offered(tmp_path):
    server = OptionsSink().start()
    try:
        settings, sender = make_sender(tmp_path, server)
        drop(settings.spool, "m.TMP", eml(body="Grüße\n"))
        assert sender.check().sent == 1
        [options] = server.mail_options
        size = len(server.messages[0].data)
        assert "BODY=8BITMIME" in options and "SMTPUTF8" not in options
        assert any(o.startswith("SIZE=") and abs(int(o[5:]) - size) < 8 for o in options)
        assert "Grüße".encode() in server.messages[0].data           # sent as it is
    finally:
        server.stop()


def test_smtputf8_is_used_where_offered_and_needed(tmp_path):
    server = OptionsSink().start()
    try:
        settings, sender = make_sender(tmp_path, server)
        drop(settings.spool, "m.TMP", eml(to="jörg@bücherei.example"))
        assert sender.check().sent == 1
        assert "SMTPUTF8" in server.mail_options[0]
        assert server.messages[0].rcpt_tos == ["jörg@bücherei.example"]
    finally:
        server.stop()


def test_a_broken_utf16_file_is_refused_with_a_reason_naming_the_encoding():
    with pytest.raises(bg.BadMessage) as err:
        bg.prepare_message(b"\xff\xfe" + "To: pat@example.org\n\nHi".encode("utf-16-le") + b"\x00\xd8",
                           "l@s.example", "", 0, "x.TMP")
    assert "UTF-16" in str(err.value) and "save it again as UTF-8" in str(err.value)


def test_smtputf8_is_used_for_a_utf8_header_where_offered(tmp_path):
    server = OptionsSink().start()
    try:
        settings, sender = make_sender(tmp_path, server)
        drop(settings.spool, "m.TMP", "To: pat@example.org\nSubject: Bücher\n\nHi.\n".encode())
        assert sender.check().sent == 1
        assert "SMTPUTF8" in server.mail_options[0]
    finally:
        server.stop()


# Bookkeeping per message ######################################################

def test_a_check_reads_the_ledger_once_and_flushes_once_per_group(tmp_path, sink, monkeypatch):
    """230 messages in one check: the sent ledger and the recipients are
    read once for the check (and once more for what left the queue by
    other ways), not once per message, and the database is flushed to disk
    once per Sender.GROUP_MESSAGES messages and at the end: 3 flushes."""
    settings, sender = make_sender(tmp_path, sink, clock=Clock())
    for n in range(230):
        drop(settings.spool, f"m{n:03d}.TMP", eml(subject=f"number {n}"), age=600 - n)
    flushes = []
    real_sync = bg.sync_db
    monkeypatch.setattr(bg, "sync_db", lambda conn, relaxed=False: (
        flushes.append(relaxed), real_sync(conn, relaxed)))
    statements = []
    sender.db.set_trace_callback(statements.append)
    assert sender.check(limit=0).sent == 230
    sender.db.set_trace_callback(None)
    ledger_reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")
                    and " FROM SENT" in s.upper()]
    recipient_reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")
                       and " FROM RECIPIENTS" in s.upper()]
    assert len(ledger_reads) == 2 and len(recipient_reads) == 2, ledger_reads + recipient_reads
    assert flushes == [True, True, False]
    assert len(sink.messages) == 230 and list(settings.spool.glob("*.TMP")) == []
    # between checks every commit is flushed again (synchronous = FULL)
    assert sender.db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_each_address_is_parsed_once(tmp_path, sink, monkeypatch):
    """prepare_message() finds the addresses; MAIL and RCPT do not parse
    them again (smtplib's quoteaddr() would, with email.utils.parseaddr)."""
    settings, sender = make_sender(tmp_path, sink)
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(to=["a@example.org", "b@example.org"]))
    import email.utils
    parsed = []
    real = email.utils.parseaddr
    monkeypatch.setattr(email.utils, "parseaddr", lambda *a, **k: (parsed.append(a), real(*a, **k))[1])
    assert sender.check().sent == 3
    assert parsed == []
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.org", "b@example.org"]] * 3


def test_the_days_log_file_is_opened_once_for_many_lines(tmp_path, monkeypatch):
    import builtins
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if "bibliogate-" in str(file):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    handler = bg.DailyFileHandler(tmp_path)
    try:
        for n in range(50):
            handler.emit(bg.logging.LogRecord("bibliogate", bg.logging.INFO, "", 0,
                                              f"line {n}", None, None))
        day = time.strftime("%Y-%m-%d")
        lines = (tmp_path / f"bibliogate-{day}.log").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 50 and lines[-1].endswith("line 49")   # each line flushed
        assert len(opened) == 1
        tomorrow = bg.logging.LogRecord("bibliogate", bg.logging.INFO, "", 0, "next day", None, None)
        tomorrow.created += 86400
        handler.emit(tomorrow)                     # a new day: its own file
        assert len(opened) == 2
    finally:
        handler.close()


# -- the journal of deliveries: when it cannot be used ---------------------------

def sent_files(settings):
    return sorted(e["file"] for e in events(settings, "sent"))


def test_without_a_journal_of_deliveries_each_delivery_is_committed(tmp_path, sink):
    """A journal that cannot be opened (here a folder in its place): the
    sender records each delivery with a commit of its own, as before."""
    settings, sender = make_sender(tmp_path, sink)
    (settings.spool / bg.DELIVERIES_FILE).mkdir()
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"number {n}"))
    recorded = []
    real_record = sender._record
    sender._record = lambda rows: (recorded.append(len(rows)), real_record(rows))
    assert sender.check(limit=0).sent == 3
    assert recorded == [1, 1, 1]            # one commit per delivery, none left for the flush
    assert sent_files(settings) == ["m0.TMP", "m1.TMP", "m2.TMP"]
    assert len(sink.messages) == 3


def test_a_journal_that_fails_to_be_written_is_left_for_commits(tmp_path, sink, monkeypatch,
                                                                 caplog):
    """A write that fails (a full disk): that delivery and the rest are
    committed one by one; each is recorded once and sent once."""
    settings, sender = make_sender(tmp_path, sink)
    for n in range(4):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"number {n}"), age=100 - n)
    real_add, calls = bg.DeliveryJournal.add, []

    def add(self, token, row):
        calls.append(row[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_add(self, token, row)
    monkeypatch.setattr(bg.DeliveryJournal, "add", add)
    monkeypatch.setattr(bg.log, "propagate", True)     # (an earlier test may have set it off)
    assert sender.check(limit=0).sent == 4
    assert calls == ["m0.TMP", "m1.TMP"]             # no journal after the failure
    assert "No space left on device" in caplog.text
    assert sent_files(settings) == ["m0.TMP", "m1.TMP", "m2.TMP", "m3.TMP"]
    assert len(sink.messages) == 4 and not list(settings.spool.glob("*.TMP"))


def test_a_line_written_in_part_is_not_trusted(tmp_path, sink, monkeypatch):
    """A write() that takes only part of a line (a disk filling up) counts
    as a failure: the journal is left, and every delivery is recorded once."""
    settings, sender = make_sender(tmp_path, sink)
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"number {n}"), age=100 - n)
    real_write, lines = os.write, []

    def write(fd, data):
        if data.startswith(b'["'):                  # a line of the journal
            lines.append(data)
            if b"m1.TMP" in data:
                return real_write(fd, data[:20])
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)
    assert sender.check(limit=0).sent == 3
    assert [b"m0.TMP" in line for line in lines] == [True, False]     # none after the torn one
    assert sent_files(settings) == ["m0.TMP", "m1.TMP", "m2.TMP"]


def test_an_idle_check_leaves_the_journal_of_deliveries_alone(tmp_path, sink):
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "m0.TMP", eml())
    assert sender.check().sent == 1
    journal = settings.spool / bg.DELIVERIES_FILE
    before = journal.stat()
    assert before.st_size == 0
    time.sleep(0.02)
    assert sender.check().sent == 0
    assert journal.stat().st_mtime_ns == before.st_mtime_ns
