"""Each recipient's outcome, kept: a recipient refused for now (4xx) is tried
again later, alone, and those who have the message never get it again, across
checks, restarts and kill -9; a recipient refused for good is reported."""

import collections
import hashlib
import json

import bibliogate as bg
from conftest import Clock, eml, write_ini
from test_sender import drop, events, make_sender

BUSY = "450 4.2.1 Mailbox busy, try again later"


def received(sink) -> collections.Counter:
    return collections.Counter(a for m in sink.messages for a in m.rcpt_tos)


def test_a_deferred_recipient_gets_it_later_and_the_others_never_again(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"b@example.org": BUSY})
    clock = Clock()
    settings, sender = make_sender(tmp_path, sink, clock)
    drop(settings.spool, "m.TMP", eml(to=["a@example.org", "b@example.org", "c@example.org"],
                                      subject="Due"))
    result = sender.check()
    assert (result.sent, result.bad, result.deferred) == (0, 0, 1)
    assert received(sink) == {"a@example.org": 1, "c@example.org": 1}
    assert (settings.spool / "m.TMP").exists()                   # b still waits for it
    # "sent to" names only those who accepted
    details = [e["detail"] for e in events(settings, "partly_sent") + events(settings, "sent")]
    assert details and all("b@example.org" not in d.split(":")[0] for d in details)
    assert "b@example.org" in events(settings, "deferred")[0]["detail"]
    db = bg.open_db(settings.database)
    [row] = bg.queue_rows(settings, db)
    db.close()
    assert row["recipients"] == {"sent": ["a@example.org", "c@example.org"],
                                 "waiting": ["b@example.org"], "refused": []}
    assert row["state"] == "waiting" and "b@example.org" in row["reason"]

    # Later, after a restart (new objects, same database), b's mailbox is free.
    sink.rcpt_replies.clear()
    clock.advance(bg.RETRY_FIRST_SECONDS + 1)
    sender = bg.Sender(settings, bg.Journal(settings.database, clock), clock)
    assert sender.check().sent == 1
    assert received(sink) == {"a@example.org": 1, "b@example.org": 1, "c@example.org": 1}
    assert sink.messages[-1].rcpt_tos == ["b@example.org"]
    assert not (settings.spool / "m.TMP").exists()
    [done] = events(settings, "sent")
    assert done["detail"].startswith("sent to b@example.org: 'Due'")
    assert "had it already" in done["detail"]
    assert sender.check().sent == 0 and len(sink.messages) == 2


def test_deferred_recipients_go_together_with_the_other_deferred_ones(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"b@example.org": BUSY, "d@example.org": BUSY})
    clock = Clock()
    settings, sender = make_sender(tmp_path, sink, clock)
    people = ["a@example.org", "b@example.org", "c@example.org", "d@example.org"]
    drop(settings.spool, "m.TMP", eml(to=people))
    sender.check()
    sink.rcpt_replies.clear()
    clock.advance(3600)
    sender.check()
    assert [sorted(m.rcpt_tos) for m in sink.messages] == [["a@example.org", "c@example.org"],
                                                            ["b@example.org", "d@example.org"]]


def test_a_recipient_refused_for_good_is_reported_not_retried(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"gone@example.org": "550 5.1.1 No such user"})
    settings, sender = make_sender(tmp_path, sink)
    drop(settings.spool, "m.TMP", eml(to=["a@example.org", "gone@example.org"]))
    assert sender.check().sent == 1
    assert received(sink) == {"a@example.org": 1}
    assert "gone@example.org (550 5.1.1 No such user)" in events(settings, "refused")[0]["detail"]
    assert not list(settings.spool.glob("m.*"))


def test_bad_only_when_no_recipient_can_ever_get_it(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"a@example.org": BUSY, "gone@example.org": "550 5.1.1 No"})
    clock = Clock()
    settings, sender = make_sender(tmp_path, sink, clock)
    drop(settings.spool, "m.TMP", eml(to=["a@example.org", "gone@example.org"]))
    result = sender.check()
    assert (result.bad, result.deferred) == (0, 1)       # a may still get it
    db = bg.open_db(settings.database)
    [row] = bg.queue_rows(settings, db)
    assert row["recipients"]["refused"] == ["gone@example.org"]
    db.close()
    sink.rcpt_replies["a@example.org"] = "550 5.1.1 No such user"
    clock.advance(3600)
    result = sender.check()
    assert result.bad == 1 and len(sink.messages) == 0
    assert bg.read_reason(next(settings.spool.glob("*.BAD"))).count("550") == 1


def test_deferred_recipients_given_up_after_the_give_up_time(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"b@example.org": BUSY})
    clock = Clock()
    settings, sender = make_sender(tmp_path, sink, clock, gateway__give_up_after_hours=1)
    drop(settings.spool, "m.TMP", eml(to=["a@example.org", "b@example.org"]))
    sender.check()
    clock.advance(3601)
    assert sender.check().sent == 1               # a has it: not .BAD, removed
    assert received(sink) == {"a@example.org": 1}
    assert "not delivered after trying for 1 hours" in events(settings, "refused")[0]["detail"]
    assert list(settings.spool.glob("m.*")) == []


def test_everyone_had_it_before_a_crash_the_file_goes_without_sending(tmp_path, sink):
    """A kill -9 after the 'sent' rows were written but before the file was
    removed: the next check removes it and sends nothing."""
    settings, sender = make_sender(tmp_path, sink)
    raw = eml(to=["a@example.org", "b@example.org"], subject="Due")
    drop(settings.spool, "m.TMP", raw)
    db = bg.open_db(settings.database)
    digest = hashlib.sha256(raw).hexdigest()
    with db:
        bg.record_recipients(db, "m.TMP", digest, "sent",
                             {"a@example.org": "250 OK", "b@example.org": "250 OK"}, 0)
    db.close()
    assert sender.check().sent == 1
    assert sink.messages == [] and not (settings.spool / "m.TMP").exists()
    assert "every recipient had it already" in events(settings, "sent")[0]["detail"]


def test_a_changed_file_is_a_new_message_for_everyone(tmp_path, sink):
    """Outcomes belong to the file's content: a file rewritten under the same
    name (a program reusing its names) goes to everyone."""
    settings, sender = make_sender(tmp_path, sink)
    db = bg.open_db(settings.database)
    with db:
        bg.record_recipients(db, "m.TMP", "0" * 64, "sent", {"a@example.org": "250 OK"}, 0)
    db.close()
    drop(settings.spool, "m.TMP", eml(to=["a@example.org", "b@example.org"]))
    assert sender.check().sent == 1
    assert sorted(sink.messages[0].rcpt_tos) == ["a@example.org", "b@example.org"]


def test_the_daily_log_says_who_has_it_who_waits_and_who_was_refused(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"b@example.org": BUSY, "gone@example.org": "550 5.1.1 No"})
    clock = Clock()
    gateway = bg.Gateway(write_ini(tmp_path, sink), clock=clock)
    sender = bg.Sender(gateway.settings, gateway.journal, clock)
    people = ["a@example.org", "b@example.org", "gone@example.org"]
    drop(gateway.settings.spool, "m.TMP", eml(to=people, subject="Due"))
    sender.check()
    day = bg.local_day(clock()).isoformat()
    summary = bg.daily_summary(gateway, day)
    assert "sent to a@example.org: 'Due'; still waiting: b@example.org" in summary["activity"]
    assert "gone@example.org (550 5.1.1 No)" in summary["refused_list"]
    assert "waiting for b@example.org (450 4.2.1 Mailbox busy" in summary["log_lines"]
    assert summary["sent_count"] == 0


def test_the_queue_command_shows_who_has_it_and_who_waits(gateway):
    gateway.sink.rcpt_replies["b@example.org"] = BUSY
    bg.ensure_layout(gateway.ini)
    drop(gateway.spool, "m.TMP", eml(to=["a@example.org", "b@example.org"], subject="Due"))
    gateway.cli("send", "--all", check=0)
    text = gateway.cli("queue", check=0).stdout
    assert "has it: a@example.org" in text and "waiting: b@example.org" in text
    [row] = json.loads(gateway.cli("queue", "--json", check=0).stdout)
    assert row["recipients"] == {"sent": ["a@example.org"], "waiting": ["b@example.org"],
                                 "refused": []}
    assert {"file", "state", "reason", "attempts", "to", "subject"} <= set(row)
