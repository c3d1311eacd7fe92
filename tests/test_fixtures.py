"""Tests of the test fixtures themselves (conftest.py), with plain smtplib."""

import configparser
import email
import email.policy
import smtplib
import socket
import ssl

import pytest

from conftest import eml, write_ini

FROM = "library@school.example"
TO = "patron@example.org"


def client(sink, timeout=5):
    return smtplib.SMTP(sink.host, sink.port, timeout=timeout)


def crlf(msg: bytes) -> bytes:
    # smtplib fixes line endings only for str messages, never for bytes.
    return msg.replace(b"\n", b"\r\n")


def send(sink, to=TO, msg=None):
    with client(sink) as smtp:
        return smtp.sendmail(FROM, to, crlf(msg or eml(to=to)))


def test_message_arrives(sink):
    msg = eml(to=TO, subject="Overdue book", body="Please return it.\n", Reply_To="desk@school.example")
    assert send(sink, msg=msg) == {}
    [got] = sink.messages
    assert got.mail_from == FROM
    assert got.rcpt_tos == [TO]
    assert got.data == crlf(msg)
    assert got.message["Subject"] == "Overdue book"
    assert got.message["Reply-To"] == "desk@school.example"
    assert got.message.get_content() == "Please return it.\n"
    assert got.username is None
    assert sink.sessions == 1  # aiosmtpd's own readiness probe is not counted
    assert sink.data_commands == 1


def test_big_message(sink):
    body = ("x" * 76 + "\n") * 40000  # ~3 MB
    send(sink, msg=eml(body=body))
    assert len(sink.wait_for(1)[0].data) > 3_000_000


def test_data_reply(make_sink):
    s = make_sink(data_reply="550 5.7.1 No thanks")
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(s)
    assert e.value.smtp_code == 550
    assert s.messages == []


def test_rcpt_replies(make_sink):
    s = make_sink(rcpt_replies={"nobody@example.org": "550 5.1.1 No such user"})
    refused = send(s, to=["nobody@example.org", TO])
    assert refused == {"nobody@example.org": (550, b"5.1.1 No such user")}
    assert s.messages[0].rcpt_tos == [TO]
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(s, to="nobody@example.org")


def test_mail_reply(make_sink):
    s = make_sink(mail_reply="451 4.7.1 Greylisted")
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        send(s)
    assert e.value.smtp_code == 451


def test_drop_after_data(make_sink):
    s = make_sink(drop_after_data=True)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(s)
    assert s.messages == []
    assert [d.rcpt_tos for d in s.dropped] == [[TO]]


def test_delay(make_sink):
    s = make_sink(delay=1.0)
    with client(s, timeout=0.3) as smtp:
        with pytest.raises((socket.timeout, smtplib.SMTPServerDisconnected)):
            smtp.sendmail(FROM, TO, eml())
    assert s.messages == []  # client gave up before the reply: not delivered


def test_auth(make_sink):
    s = make_sink(auth=("gate", "s3cret"))
    with pytest.raises(smtplib.SMTPSenderRefused) as e:  # no login
        send(s)
    assert e.value.smtp_code == 530
    with client(s) as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as e:
        smtp.login("gate", "wrong")
    assert e.value.smtp_code == 535
    for mechanism in ("PLAIN", "LOGIN"):
        with client(s) as smtp:
            smtp.ehlo()
            smtp.user, smtp.password = "gate", "s3cret"
            code, _ = smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower()))
            assert code == 235
            smtp.sendmail(FROM, TO, eml())
    assert s.logins == ["gate", "gate"]
    assert [m.username for m in s.messages] == ["gate", "gate"]


def test_starttls_verified(make_sink):
    s = make_sink(starttls=True, auth=("gate", "s3cret"))
    assert s.security == "starttls" and s.ca_file
    with client(s) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")  # only offered once encrypted
        smtp.starttls(context=ssl.create_default_context(cafile=s.ca_file))
        smtp.login("gate", "s3cret")
        smtp.sendmail(FROM, TO, eml())
    assert len(s.messages) == 1


def test_starttls_untrusted_fails(make_sink):
    s = make_sink(starttls=True)
    with client(s) as smtp, pytest.raises(ssl.SSLCertVerificationError):
        smtp.starttls(context=ssl.create_default_context())  # system CAs only


def test_require_starttls(make_sink):
    s = make_sink(require_starttls=True)
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        send(s)
    assert e.value.smtp_code == 530


def test_implicit_tls(make_sink):
    s = make_sink(implicit_tls=True, auth=("gate", "s3cret"))
    assert s.security == "tls"
    ctx = ssl.create_default_context(cafile=s.ca_file)
    for host in ("127.0.0.1", "localhost"):
        with smtplib.SMTP_SSL(host, s.port, context=ctx, timeout=5) as smtp:
            smtp.login("gate", "s3cret")
            smtp.sendmail(FROM, TO, eml())
    assert len(s.messages) == 2
    assert s.sessions == 2


def test_stop_and_start_same_port(sink):
    port = sink.port
    with client(sink) as idle:  # an open connection must not block stop()
        sink.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            idle.noop()
    with pytest.raises(ConnectionRefusedError):
        client(sink)
    sink.start()
    assert sink.port == port
    send(sink)
    assert len(sink.messages) == 1


def test_fail_first(make_sink):
    s = make_sink(fail_first=2)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(s)
        assert e.value.smtp_code == 451
    send(s)
    assert len(s.messages) == 1
    assert s.data_commands == 3


def test_write_ini(tmp_path, make_sink):
    s = make_sink(starttls=True, auth=("gate", "pw"))
    ini = write_ini(tmp_path, s, gateway__messages_per_check=5, overdue__enabled=True)
    assert ini == tmp_path / "bibliogate.ini"
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(ini, encoding="utf-8")
    assert cp.sections() == ["smtp", "gateway", "overdue", "library", "web", "data"]
    assert dict(cp["smtp"]) == {
        "host": "127.0.0.1", "port": str(s.port), "security": "starttls",
        "ca_file": s.ca_file, "ehlo": "", "username": "gate", "password": "pw",
        "timeout_seconds": "5",
    }
    assert cp["gateway"]["messages_per_check"] == "5"
    assert cp["gateway"]["from_address"] == "library@school.example"
    assert cp["gateway"]["test_to_address"] == "librarian@school.example"
    assert cp["gateway"]["minutes_between_checks"] == "3"
    assert cp["overdue"]["enabled"] == "yes"
    assert cp["library"]["date_format"] == "%Y-%m-%d"
    assert cp["web"]["port"] == "0"
    plain = configparser.ConfigParser(interpolation=None)
    plain.read(write_ini(tmp_path / "plain", None))
    assert plain["smtp"]["security"] == "none" and plain["smtp"]["ca_file"] == ""


def test_gateway_fixture(gateway, sink):
    assert gateway.sink is sink
    assert gateway.ini == gateway.dir / "bibliogate.ini"
    assert gateway.spool == gateway.dir / "spool"
    assert f"port = {sink.port}" in gateway.ini.read_text()
    gateway.configure(gateway__messages_per_check=2)
    assert "messages_per_check = 2" in gateway.ini.read_text()


def test_eml():
    raw = eml(to=["a@example.org", "b@example.org"], subject="Hi", body="Grüße\n", Bcc="c@example.org")
    assert b"\r" not in raw
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == "someone@elsewhere.example"
    assert msg["To"] == "a@example.org, b@example.org"
    assert msg["Bcc"] == "c@example.org"
    assert msg.get_content() == "Grüße\n"
    assert eml().startswith(b"From: someone@elsewhere.example\nTo: patron@example.org\nSubject: Hello\n\nHi.\n")
