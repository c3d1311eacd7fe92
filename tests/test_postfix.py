"""The sender against real Postfix: its test server smtp-sink and a private
smtpd instance (tests/postfix_support.py), on 127.0.0.1 at random ports."""

import email
import email.policy
import json
import os
import time
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import Clock, eml
from postfix_support import make_postfix, make_smtp_sink  # noqa: F401 (fixtures)
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


def test_smtp_sink_refusing_data_does_not_poison_the_next_message(tmp_path, make_smtp_sink):
    server = make_smtp_sink(refuse=("DATA",))
    settings, sender = make_sender(tmp_path, server)
    for n in range(3):
        drop(settings.spool, f"m{n}.TMP", eml(subject=f"m{n}"), age=100 - n)
    result = sender.check()
    assert (result.sent, result.bad, result.deferred) == (0, 0, 3)
    assert sorted(p.name for p in settings.spool.glob("*.TMP")) == ["m0.TMP", "m1.TMP", "m2.TMP"]
