"""The sender against real Postfix: its test server smtp-sink and a private
smtpd instance (tests/postfix_support.py), on 127.0.0.1 at random ports."""

import email
import email.policy
import time

import pytest

import bibliogate as bg
from conftest import Clock, eml
from test_sender import drop, events, make_sender


def rcpts(sink) -> list:
    """Every recipient the relay sink received, one entry per delivery."""
    return sorted(a for m in sink.messages for a in m.rcpt_tos)


def wait_rcpts(sink, count: int, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = rcpts(sink)
        if len(got) >= count:
            return got
        time.sleep(0.05)
    raise AssertionError(f"expected {count} recipients at the relay, got {rcpts(sink)}")


def test_postfix_recipient_limit_the_rest_go_in_further_transactions(tmp_path, sink, make_postfix):
    postfix = make_postfix(sink.port, smtpd_recipient_limit=10)
    settings, sender = make_sender(tmp_path, postfix)
    people = [f"p{n:02d}@example.org" for n in range(15)]
    drop(settings.spool, "many.TMP", eml(to=people, subject="Fifteen"))
    result = sender.check()
    assert (result.sent, result.bad) == (1, 0)
    assert wait_rcpts(sink, 15) == people            # each once, none lost
    assert list(settings.spool.glob("*.TMP")) == []


def test_postfix_deferred_recipient_gets_it_at_a_later_check_and_nobody_twice(
        tmp_path, sink, make_postfix):
    restriction = "check_recipient_access inline:{ busy@example.org=DEFER }, permit_mynetworks"
    postfix = make_postfix(sink.port, smtpd_recipient_restrictions=restriction)
    clock = Clock()
    settings, sender = make_sender(tmp_path, postfix, clock)
    people = ["a@example.org", "busy@example.org", "c@example.org"]
    drop(settings.spool, "m.TMP", eml(to=people, subject="Due"))
    assert sender.check().deferred == 1
    assert wait_rcpts(sink, 2) == ["a@example.org", "c@example.org"]
    assert (settings.spool / "m.TMP").exists()
    postfix.stop()                                   # the next check: a server without the rule
    settings, sender = make_sender(tmp_path, make_postfix(sink.port), clock)
    clock.advance(3600)
    assert sender.check().sent == 1
    assert wait_rcpts(sink, 3) == ["a@example.org", "busy@example.org", "c@example.org"]
    time.sleep(0.5)                                  # nothing else trickles in
    assert len(rcpts(sink)) == 3 and not (settings.spool / "m.TMP").exists()


def test_smtp_sink_refusing_data_does_not_poison_the_next_message(tmp_path, make_smtp_sink):
    server = make_smtp_sink(refuse=("DATA",))
    settings, sender = make_sender(tmp_path, server)
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"m{n}"), age=100 - n)
    result = sender.check()
    assert (result.sent, result.bad, result.deferred) == (0, 0, 3)
    assert sorted(p.name for p in settings.spool.glob("*.TMP")) == ["m0.TMP", "m1.TMP", "m2.TMP"]


def dumped(server, count: int, timeout: float = 10.0) -> list:
    """smtp-sink's dumps: (envelope header lines, message bytes) per message."""
    deadline = time.monotonic() + timeout
    while len(server.messages()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    found = []
    for raw in server.messages():
        head, _, rest = raw.partition(b"\nReceived: ")
        message = rest.partition(b"\n")[2]
        while message[:1] in (b"\t", b" "):             # the rest of Received:
            message = message.partition(b"\n")[2]
        # smtp-sink ends each dump with a line of its own
        found.append((head.decode("utf-8", "replace"), message[:-1]))
    assert len(found) >= count, f"expected {count} dumped message(s), got {len(found)}"
    return found


# A refusal affects only its own message ######################################

def test_postfix_data_deferred_for_one_message_the_next_is_delivered(tmp_path, sink, make_postfix):
    postfix = make_postfix(
        sink.port, smtpd_data_restrictions="check_recipient_access inline:{ busy@example.org=DEFER }")
    settings, sender = make_sender(tmp_path, postfix)
    drop(settings.spool, "m0.TMP", eml(to="busy@example.org", subject="first"), age=100)
    drop(settings.spool, "m1.TMP", eml(to="ok@example.org", subject="second"), age=90)
    result = sender.check()
    assert (result.sent, result.bad, result.deferred) == (1, 0, 1)
    assert wait_rcpts(sink, 1) == ["ok@example.org"]
    assert [p.name for p in settings.spool.glob("*.TMP")] == ["m0.TMP"]
    assert list(settings.spool.glob("*.BAD")) == []


def test_postfix_refusal_after_the_data_affects_only_that_message(tmp_path, sink, make_postfix):
    postfix = make_postfix(
        sink.port,
        smtpd_end_of_data_restrictions="check_recipient_access inline:{ busy@example.org=DEFER }")
    settings, sender = make_sender(tmp_path, postfix)
    drop(settings.spool, "m0.TMP", eml(to="busy@example.org", subject="first"), age=100)
    drop(settings.spool, "m1.TMP", eml(to="ok@example.org", subject="second"), age=90)
    result = sender.check()
    assert (result.sent, result.bad, result.deferred) == (1, 0, 1)
    assert wait_rcpts(sink, 1) == ["ok@example.org"]


@pytest.mark.parametrize("options", [dict(refuse=(".",)), dict(refuse=("MAIL",)),
                                     dict(refuse=("RCPT",))], ids=["after data", "MAIL", "RCPT"])
def test_smtp_sink_refusing_for_now_keeps_every_message_waiting(tmp_path, make_smtp_sink, options):
    server = make_smtp_sink(**options)
    settings, sender = make_sender(tmp_path, server)
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"m{n}"), age=100 - n)
    result = sender.check()
    assert (result.sent, result.bad, result.deferred) == (0, 0, 3)


@pytest.mark.parametrize("options", [dict(hangup=("RCPT",)), dict(hangup_421=("MAIL",)),
                                     dict(hangup=(".",))], ids=["hang up", "421", "after data"])
def test_smtp_sink_hanging_up_leaves_the_messages_waiting(tmp_path, make_smtp_sink, options):
    server = make_smtp_sink(**options)
    settings, sender = make_sender(tmp_path, server)
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"m{n}"), age=100 - n)
    result = sender.check()
    assert result.bad == 0 and result.sent == 0
    assert len(list(settings.spool.glob("*.TMP"))) == 3


def test_smtp_sink_refusing_the_greeting_is_a_sentence(tmp_path, make_smtp_sink):
    server = make_smtp_sink(fail=("EHLO", "HELO"))
    settings, sender = make_sender(tmp_path, server)
    drop(settings.spool, "m.TMP", eml())
    problem = str(sender.check().problem)
    assert "refused our greeting" in problem and "(500, b" not in problem, problem
    assert "500 5.3.0 Error: command failed" in problem


def test_postfix_demanding_starttls_keeps_the_queue_waiting_and_names_the_setting(
        tmp_path, sink, make_postfix):
    """security = none against a port that takes mail only over TLS (the
    usual port 587): Postfix answers MAIL with 530 5.7.0. That is the
    settings' fault: nothing becomes .BAD, even past give_up_after_hours."""
    postfix = make_postfix(sink.port, tls=True, smtpd_tls_security_level="encrypt")
    clock = Clock()
    settings, sender = make_sender(tmp_path, postfix, clock, smtp__security="none",
                                   smtp__ca_file="", gateway__give_up_after_hours="0.01")
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"m{n}"), age=100 - n)
    for _ in range(2):
        result = sender.check()
        clock.advance(3600)
        assert result.problem is not None and result.bad == 0
    assert "530" in str(result.problem) and "security = starttls" in str(result.problem)
    assert sorted(p.name for p in settings.spool.glob("*.TMP")) == ["m0.TMP", "m1.TMP", "m2.TMP"]
    assert list(settings.spool.glob("*.BAD")) == [] and sink.messages == []


# Extensions ##################################################################

def test_postfix_size_limit_sets_a_large_message_aside_at_once(tmp_path, sink, make_postfix):
    postfix = make_postfix(sink.port, message_size_limit=1048576)
    settings, sender = make_sender(tmp_path, postfix)
    drop(settings.spool, "big.TMP", eml(subject="big", body=("y" * 70 + "\n") * 22000), age=100)
    drop(settings.spool, "small.TMP", eml(subject="small"), age=90)
    result = sender.check()
    assert (result.sent, result.bad) == (1, 1)
    [bad] = settings.spool.glob("*.BAD")
    reason = bg.read_reason(bad)
    assert "the message is 1.6 MB" in reason and "at most 1.0 MB" in reason, reason
    assert wait_rcpts(sink, 1) == ["patron@example.org"]
    assert [m.message["Subject"] for m in sink.messages] == ["small"]


def test_postfix_starttls_with_auth_only(tmp_path, sink, make_postfix):
    postfix = make_postfix(sink.port, tls=True, smtpd_tls_auth_only="yes")
    settings, sender = make_sender(tmp_path, postfix)
    drop(settings.spool, "m.TMP", eml(subject="over TLS"))
    assert sender.check().sent == 1
    assert wait_rcpts(sink, 1) == ["patron@example.org"]


def test_an_8bit_body_is_reencoded_for_a_server_without_8bitmime(tmp_path, make_smtp_sink):
    server = make_smtp_sink(extra=("-8",))          # -8: no 8BITMIME offered
    settings, sender = make_sender(tmp_path, server)
    text = "Grüße aus der Bücherei: „Der Zauberberg“ ist da.\n"
    drop(settings.spool, "m.TMP", eml(body=text))
    assert sender.check().sent == 1
    [(envelope, data)] = dumped(server, 1)
    assert data.isascii() and "BODY=8BITMIME" not in envelope
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content() == text


def test_lines_over_998_characters_are_reencoded(tmp_path, make_smtp_sink):
    server = make_smtp_sink()
    settings, sender = make_sender(tmp_path, server)
    text = "start " + "z" * 1500 + " end\nsecond line\n"
    drop(settings.spool, "m.TMP", eml(body=text))
    assert sender.check().sent == 1
    [(_, data)] = dumped(server, 1)
    assert max(len(line) for line in data.split(b"\n")) <= 998
    assert email.message_from_bytes(data, policy=email.policy.default).get_content() == text


def test_an_internationalised_domain_goes_as_idna_without_smtputf8(tmp_path, make_smtp_sink):
    server = make_smtp_sink()                       # smtp-sink offers no SMTPUTF8
    settings, sender = make_sender(tmp_path, server)
    drop(settings.spool, "m.TMP", eml(to="leser@bücherei.example"))
    assert sender.check().sent == 1
    [(envelope, _)] = dumped(server, 1)
    assert "X-Rcpt-Args: <leser@xn--bcherei-n2a.example>" in envelope
    assert "SMTPUTF8" not in envelope


def test_a_utf8_local_part_without_smtputf8_is_refused_for_good(tmp_path, make_smtp_sink):
    server = make_smtp_sink()
    settings, sender = make_sender(tmp_path, server)
    drop(settings.spool, "m.TMP", eml(to=["jörg@bücherei.example", "pat@example.org"]))
    assert sender.check().sent == 1
    [(envelope, _)] = dumped(server, 1)
    assert "<pat@example.org>" in envelope and "j" not in envelope.split("X-Rcpt-Args:")[1][:3]
    assert "SMTPUTF8" in events(settings, "refused")[0]["detail"]


def test_utf8_headers_are_encoded_for_a_server_without_smtputf8(tmp_path, make_smtp_sink):
    server = make_smtp_sink()
    settings, sender = make_sender(tmp_path, server)
    raw = "To: Jörg Müller <leser@bücherei.example>\nSubject: Bücher zurück, bitte\n\nHi.\n"
    drop(settings.spool, "m.TMP", raw.encode("utf-8"))
    assert sender.check().sent == 1
    [(_, data)] = dumped(server, 1)
    head = data.partition(b"\n\n")[0]
    assert head.isascii(), head
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "Bücher zurück, bitte"
    assert msg["To"].addresses[0].display_name == "Jörg Müller"
    assert msg["To"].addresses[0].addr_spec == "leser@xn--bcherei-n2a.example"
