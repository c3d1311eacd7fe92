"""Composing our own messages (Templates and Messages): the short cuts the
overdue job takes, thousands of times a run, give exactly what the general
ways give: a filled template what string.Template gives, a name in To what
email.utils.formataddr writes, a value one_line's regex, a body the same
bytes, and a run's messages one Date.

Hypothesis runs derandomized (a fixed seed, no example database), as in
test_fuzz.py, so CI sees the same examples every time."""

from __future__ import annotations

import email
import email.policy
import email.quoprimime
import email.utils
import re
import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bibliogate as bg
from conftest import write_ini

SAME = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
#: Text with what makes header values and bodies hard: controls, quotes and
#: the specials of an address, spaces of other kinds, line ends, non-ASCII.
HARD = st.text(alphabet=st.one_of(
    st.sampled_from(list(" \t\r\n\x00\x1f\x7f\x85\xa0\u2028\u3000\"\\()<>@,:;.[]=?$_{}'"
                         "aZ09é中\U0001F600")),
    st.characters(blacklist_categories=("Cs",))), max_size=60)


@SAME
@given(HARD)
@example("Ann  Smith")
@example(" Ann")
@example("Ann\u00a0Smith")
def test_one_line_is_what_the_regex_and_split_give(text):
    assert bg.one_line(text) == " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())


@SAME
@given(HARD, st.sampled_from(["ann@example.org", "a.b+c@school.example"]))
def test_a_mailbox_is_what_formataddr_writes(name, address):
    name = bg.one_line(name)
    assert bg.mailbox(name, address) == email.utils.formataddr((name, address), "utf-8")


PIECE = st.one_of(st.text(alphabet=st.characters(blacklist_characters="$",
                                                 blacklist_categories=("Cs",)), max_size=8),
                  st.just("$$"), st.sampled_from(["${a}", "${b_2}", "$a", "$a ", "$b_2."]),
                  st.just("$"), st.just("${"), st.just("$1"), st.just("$A"))


@SAME
@given(st.lists(PIECE, max_size=12))
def test_a_filled_template_is_what_substitute_gives(pieces):
    text = "".join(pieces)
    values = {"a": "A$a", "b_2": 7}
    try:
        split = bg.template_pieces(text)
    except ValueError:          # a lone '$' (parse_template lets none through): refused too
        with pytest.raises((ValueError, KeyError)):
            string.Template(text).substitute(values)
        return
    try:
        expected = string.Template(text).substitute(values)
    except KeyError as exc:     # a name without a value ("$A"): both name the first one
        with pytest.raises(KeyError) as raised:
            bg.fill_pieces(split, values)
        assert raised.value.args == exc.args
        return
    assert bg.fill_pieces(split, values) == expected


def old_body_part(body: str) -> tuple[str, bytes]:
    """body_part as it was written first, line by line."""
    text = "\r\n".join(body.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    if text.isascii() and all(len(line) <= 998 for line in text.split("\r\n")):
        return "7bit", text.encode("ascii")
    encoded = email.quoprimime.body_encode(text.encode("utf-8").decode("latin-1"), eol="\r\n")
    return "quoted-printable", encoded.encode("ascii")


@SAME
@given(HARD, st.sampled_from(["", "x" * 998, "x" * 999, "\n" + "y" * 1500]))
def test_a_body_is_encoded_as_it_always_was(body, long_line):
    assert bg.body_part(body + long_line) == old_body_part(body + long_line)


def test_a_runs_messages_share_one_date_and_read_back_exactly(tmp_path):
    settings = bg.load_settings(write_ini(tmp_path, library__name='The "Best" Library'))
    composer = bg.Composer(settings, 1_800_000_000)
    messages = [composer.message([(name, "ann@example.org"), ("Parent of Zoë", "p@example.org")],
                                 "Library books", "Dear Ann,\n") for name in ("Ann", "Dr. Ann O'Neil")]
    dates = {email.message_from_bytes(m).get("Date") for m in messages}
    assert dates == {email.utils.formatdate(1_800_000_000, localtime=True)}
    for data, name in zip(messages, ("Ann", "Dr. Ann O'Neil")):
        msg = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
        assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == \
            [(name, "ann@example.org"), ("Parent of Zoë", "p@example.org")]
        assert msg["From"].addresses[0].display_name == 'The "Best" Library'
    ids = [email.message_from_bytes(m)["Message-ID"] for m in messages]
    assert len(set(ids)) == 2 and all(i.endswith(".bibliogate@school.example>") for i in ids)
