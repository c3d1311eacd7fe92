"""Random input for the parts that read what others wrote: queued message
files (prepare_message), bibliogate.ini values (load_settings) and template
files (parse_template). Each must answer every input with a result or with
its own error, never with a crash.

Hypothesis runs derandomized (a fixed seed, no example database), so CI sees
the same examples every time. An example that once failed is kept below as
a plain test.
"""

from __future__ import annotations

import random
import re
import string
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import bibliogate as bg
from conftest import write_ini
from test_sender import drop, make_sender

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FROM = "library@school.example"
LINE_END = re.compile(rb"\r\n|\r|\n")


def normalised(data: bytes) -> bytes:
    """Line endings as SMTP wants them: a CRLF, a lone CR, a lone LF each become CRLF."""
    return LINE_END.sub(b"\r\n", data)


def head_fields(data: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, whole field) of each header of a prepared message."""
    head = data.partition(b"\r\n\r\n")[0]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return [(f.partition(b":")[0].strip().decode("ascii", "replace").lower(), f) for f in fields]


# Messages ####################################################################

ADDRESSES = st.one_of(
    st.sampled_from(["pat@example.org", "A.B+c@school.example", "x@y.zz", "not-an-address",
                     "@example.org", "pat@", '"Quoted, Name" <q@example.org>', "Zoë <zoe@example.org>",
                     "undisclosed-recipients:;", "<>", "pat@example.org (a comment)", "a@b",
                     "=?utf-8?q?Zo=C3=AB?= <zoe@example.org>", "<pat@example.org", '"', "\\"]),
    st.emails(),
    st.text(max_size=30),
)
ADDRESS_LISTS = st.one_of(
    st.lists(ADDRESSES, max_size=6).map(", ".join),
    st.integers(0, 2000).map(lambda n: ", ".join(f"p{i}@example.org" for i in range(n))),
)
ENCODED_WORDS = st.builds(
    lambda charset, enc, text: f"=?{charset}?{enc}?{text}?=",
    st.sampled_from(["utf-8", "iso-8859-1", "x-unknown", "utf-8*fr", "", "utf-7", "ascii"]),
    st.sampled_from(["q", "b", "Q", "B", "x", ""]),
    st.text(alphabet=string.printable, max_size=20))
TEXT_VALUES = st.one_of(
    st.text(max_size=80), ENCODED_WORDS, ADDRESS_LISTS,
    st.integers(1000, 50000).map(lambda n: "x" * n),           # a huge header
    st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=5).map("\n ".join),  # folded
)
#: Header values as bytes, in the encodings files turn up in.
VALUES = st.one_of(
    st.tuples(TEXT_VALUES, st.sampled_from(["utf-8", "latin-1", "cp1252", "utf-16"]))
    .map(lambda t: t[0].encode(t[1], "replace")),
    st.binary(max_size=60),
    TEXT_VALUES.map(str.encode),
)
NAMES = st.one_of(
    st.sampled_from(["To", "Cc", "Bcc", "BCC", "bcc ", "From", "from", "Sender", "Return-Path",
                     "Subject", "Date", "Message-ID", "Reply-To", "MIME-Version", "Content-Type",
                     "Content-Transfer-Encoding", "Auto-Submitted", "X-Mailer"]),
    st.from_regex(r"[!-9;-~]{1,20}", fullmatch=True),
).map(str.encode)
BODIES = st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=500).map(str.encode),
    st.lists(st.sampled_from(["Dear patron,", ".", "..", ".dot", "", "Zoë — à bientôt",
                              "To: evil@example.org", "\r", "x" * 1200, "\x00", "end"]),
             max_size=20).map(lambda lines: "\n".join(lines).encode("utf-8")),
)
EOLS = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def messages(draw) -> tuple[bytes, bytes | None]:
    """(file bytes, expected body or None). Headers may hold CR, LF or NUL
    where a careless program put them; when none do and there is a blank
    line, the body that must come out is known."""
    fields = draw(st.lists(st.tuples(NAMES, VALUES), max_size=12))
    if draw(st.integers(0, 3)):
        fields.insert(draw(st.integers(0, len(fields))), (b"To", draw(ADDRESS_LISTS).encode()))
    lines = [name + draw(st.sampled_from([b": ", b":", b" : ", b":\t"])) + value
             for name, value in fields]
    body = draw(BODIES)
    blank_line = draw(st.booleans())
    raw = b"".join(line + draw(EOLS) for line in lines) + (draw(EOLS) if blank_line else b"") + body
    clean = all(b"\r" not in line and b"\n" not in line.replace(b"\n ", b"")
                and not line.endswith(b"\n") for line in lines)
    return raw, (body if clean and blank_line and lines else None)


def check_prepared(raw: bytes, sender_name: str, queued_at: float, file_name: str,
                   expected_body: bytes | None = None) -> None:
    try:
        out = bg.prepare_message(raw, FROM, sender_name, queued_at, file_name)
    except bg.BadMessage as exc:
        text = str(exc)
        assert text and text.endswith("."), repr(text)
        event("refused as BadMessage")
        return
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", out.data), "a line not ended by CRLF"
    fields = head_fields(out.data)
    froms = [field for name, field in fields if name == "from"]
    assert len(froms) == 1 and FROM.encode() in froms[0]
    assert all(name != "bcc" for name, _ in fields)
    assert b"\x00" not in out.data.partition(b"\r\n\r\n")[0]
    assert out.recipients and all(bg.valid_recipient(a) for a in out.recipients)
    body = out.data.partition(b"\r\n\r\n")[2]
    raw = bg.message_text(raw)[0]       # a file from a Windows tool, as UTF-8
    assert normalised(raw).endswith(body), "the body is not the end of the file"
    if expected_body is not None:
        assert body == normalised(expected_body)
    event("prepared, body compared" if expected_body is not None else "prepared")


@FUZZ
@given(messages(), st.text(max_size=40), st.floats(-1e13, 1e13), st.text(max_size=60))
def test_prepare_message_on_random_messages(message, sender_name, queued_at, file_name):
    raw, expected_body = message
    check_prepared(raw, sender_name, queued_at, file_name, expected_body)


@FUZZ
@given(st.one_of(st.binary(max_size=4000),
                 st.binary(max_size=4000).map(lambda tail: b"To: pat@example.org\n" + tail)))
def test_prepare_message_on_random_bytes(raw):
    check_prepared(raw, "Library", 1.7e9, "x.TMP")


@FUZZ
@given(messages(), st.booleans())
def test_encoding_for_a_server_without_8bitmime_or_smtputf8_never_fails(message, eight_bit_ok):
    raw, _ = message
    try:
        out = bg.prepare_message(raw, FROM, "", 1.7e9, "x.TMP")
    except bg.BadMessage:
        return
    data = bg.ascii_headers(bg.reencoded(out.data, eight_bit_ok))
    body = data.partition(b"\r\n\r\n")[2]
    assert not bg.LONG_LINE_RE.search(body)
    assert eight_bit_ok or body.isascii()


# The sender's fast paths give what the slow way they stand for gives.

PLAIN_WORDS = st.text("abcXYZ019'-_%+=.", min_size=1, max_size=8)
PLAIN_LISTS = st.lists(st.tuples(
    st.one_of(st.just(""), st.lists(PLAIN_WORDS, min_size=1, max_size=3).map(" ".join)),
    st.tuples(PLAIN_WORDS, st.lists(st.text("abc-09.", min_size=1, max_size=6), max_size=3)),
    st.sampled_from([",", ", ", " ,", " , ", ",,"])), min_size=1, max_size=4)


@FUZZ
@given(st.one_of(PLAIN_LISTS.map(lambda items: "".join(
    (f"{name} <{local}@{'.'.join(labels)}>" if name else f"{local}@{'.'.join(labels)}") + sep
    for name, (local, labels), sep in items).rstrip(", ")), ADDRESSES))
@example("Sam O'Neil <sam@x.org> , b@y.org")           # once read as "sam@x.org>"
def test_plain_address_lists_are_read_as_getaddresses_reads_them(value):
    value = " ".join(value.split())             # as _field gives it
    slow = [a for _, a in bg.email.utils.getaddresses([value]) if a]
    event("plain" if bg.PLAIN_ADDRESSES_RE.fullmatch(value) else "parsed")
    assert bg.header_addresses(value) == slow


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 1100), st.sampled_from([b"\r\n", b"\n", b"\r", b""])),
                max_size=6), st.sampled_from([b"a", b"\xc3\xa9", b" "]))
def test_long_lines_are_found_as_the_pattern_finds_them(lines, fill):
    data = b"".join(fill * n + end for n, end in lines)
    assert bg.has_long_line(data) == bool(bg.LONG_LINE_RE.search(data))


@FUZZ
@given(st.text(max_size=60))
def test_a_value_with_no_encoded_word_is_its_own_text(value):
    if "=?" not in value:
        assert bg.decoded(value) == str(bg.email.header.make_header(
            bg.email.header.decode_header(value)))


@FUZZ
@given(st.text(max_size=40))
@example("line\u2028next\x85end\x1b[31m")
def test_log_text_is_escaped_as_the_pattern_escapes_it(text):
    assert bg.printable(text) == bg._CONTROL_RE.sub(lambda m: ascii(m.group())[1:-1], text)


def test_a_body_with_lone_carriage_returns_leaves_with_crlf_only():
    raw = b"To: pat@example.org\n\nline one\rline two\r.\r\nend\r\r\n"
    out = bg.prepare_message(raw, FROM, "", 1.7e9, "x.TMP")
    assert out.data.partition(b"\r\n\r\n")[2] == b"line one\r\nline two\r\n.\r\nend\r\n\r\n"


@pytest.mark.parametrize("queued_at", [-1e12, 1e12, -62135600000.0])
def test_a_file_dated_out_of_the_calendar_still_goes(queued_at):
    out = bg.prepare_message(b"To: pat@example.org\n\nHi.\n", FROM, "", queued_at, "x.TMP")
    assert b"\r\nDate: " in out.data


def test_many_recipients_all_get_it():
    to = ", ".join(f"p{i}@example.org" for i in range(2000))
    out = bg.prepare_message(f"To: {to}\nBcc: hidden@example.org\n\nHi.\n".encode(), FROM, "",
                             1.7e9, "x.TMP")
    assert len(out.recipients) == 2001 and b"hidden@" not in out.data


def test_a_10_mb_attachment_arrives_intact(tmp_path, sink):
    payload = random.Random(10).randbytes(10 * 1024 * 1024)
    msg = EmailMessage()
    msg["To"], msg["Subject"] = "pat@example.org", "The catalogue"
    msg.set_content("The whole catalogue is attached.\n")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream",
                       filename="catalogue.bin")
    raw = msg.as_bytes()
    out = bg.prepare_message(raw, FROM, "", 1.7e9, "big.TMP")
    assert out.data.partition(b"\r\n\r\n")[2] == normalised(raw.partition(b"\n\n")[2])
    settings_, sender = make_sender(tmp_path, sink)
    drop(settings_.spool, "big.TMP", raw)
    assert sender.check().sent == 1
    got = sink.messages[0].message
    [attachment] = list(got.iter_attachments())
    assert attachment.get_filename() == "catalogue.bin"
    assert attachment.get_content() == payload


# Settings ####################################################################

INI_KEYS = [(section, key) for section in bg.DEFAULTS for key in bg.DEFAULTS[section]]
INI_VALUES = st.one_of(
    st.sampled_from(["", " ", "abc", "-1", "0", "1e400", "nan", "inf", "65536", "\x00", "%Y",
                     "%", "[smtp]", "a\nb", "a\n[smtp]\nhost = x", ";", "=", "25 ; comment", "١٢",
                     "yes", "no", "C:\\Spool", "../../etc", "a" * 5000, "\ufeff", "\t", "\x0c"]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=40),
)
#: A CR starts a new line when the file is read back (configparser writes it
#: as it is), so a value holding one may add settings of its own.
ONE_LINE_VALUES = INI_VALUES.map(lambda value: value.replace("\r", ""))
ANY_VALUES = st.one_of(INI_VALUES, st.sampled_from(["\r=", "\r0 = x", "x\r[data]\rport = 1",
                                                    "\x1e\r0", "\r[smtp]", "\r  more"]))
ABOUT_A_KEY = re.compile(r"""bibliogate\.ini \[([^\]]+)\] (.+?)(?: = ['"]|: unknown setting)""")
ABOUT_A_LINE = re.compile(r"bibliogate\.ini line (\d+): (.*?) is not 'key = value'")


def check_problems(settings_: bg.Settings, ini: Path, about: set[tuple[str, str]] | None) -> None:
    """Every problem starts with the ini's name and names the line it is
    about, quoting that line as it is, or a key: one of `about` (None: any
    key the file has or must have)."""
    lines = ini.read_text(encoding="utf-8").split("\n")
    for problem in settings_.problems:
        line, key = ABOUT_A_LINE.match(problem), ABOUT_A_KEY.match(problem)
        assert line or key, problem
        if line:
            assert line.group(2) == repr(lines[int(line.group(1)) - 1].strip()), problem
        elif about is not None:
            assert key.groups() in about, problem
        else:
            assert key.groups() in settings_.raw or key.groups() in INI_KEYS, problem


@FUZZ
@given(st.sampled_from(INI_KEYS), ONE_LINE_VALUES)
def test_any_value_of_any_setting_gives_a_problem_naming_it(tmp_path, key, value):
    section, name = key
    ini = write_ini(tmp_path, None, **{f"{section}__{name}": value})
    # a username wants its password: that problem names the password's line
    also = {("smtp", "password")} if key == ("smtp", "username") else set()
    check_problems(bg.load_settings(ini), ini, {key} | also)


@settings(FUZZ, max_examples=50)
@given(st.fixed_dictionaries({f"{s}__{k}": ANY_VALUES for s, k in INI_KEYS}))
def test_every_setting_random_at_once(tmp_path, values):
    ini = write_ini(tmp_path, None, **values)
    check_problems(bg.load_settings(ini), ini, None)


@pytest.mark.parametrize("key", ["gateway__spool_folder", "data__database", "smtp__ca_file"])
def test_a_path_with_a_nul_byte_is_a_problem_not_a_crash(tmp_path, key):
    section, name = key.split("__")
    settings_ = bg.load_settings(write_ini(tmp_path, None, **{key: "a\x00b"}))
    assert [p for p in settings_.problems if p.startswith(f"bibliogate.ini [{section}] {name} = ")]
    assert "\x00" not in str(settings_.spool) + str(settings_.database) + settings_.ca_file


def test_a_bad_line_is_quoted_as_it_is_past_a_form_feed(tmp_path):
    ini = tmp_path / "bibliogate.ini"
    ini.write_text("[library]\nname = Hill\x0cSchool\nthis line is wrong\n", encoding="utf-8")
    problems = bg.load_settings(ini).problems
    assert "bibliogate.ini line 3: 'this line is wrong' is not 'key = value' nor a [section]. " \
           "Fix or delete that line." in problems


def test_a_line_with_no_name_before_its_equals_sign_is_reported_once(tmp_path):
    ini = tmp_path / "bibliogate.ini"
    ini.write_text("[smtp]\nhost = 127.0.0.1\n[gateway]\nfrom_address = library@school.example\n"
                   "= 5\n", encoding="utf-8")
    assert list(bg.load_settings(ini).problems) == [
        "bibliogate.ini line 5: '= 5' is not 'key = value' nor a [section]. Fix or delete that line."]


# Templates ###################################################################

TEMPLATE_LINES = st.one_of(
    st.sampled_from(["# a note", "#", "", "  ", "Subject: ${library_name}", "subject:plain",
                     "Subject: $", "Subject: ${nope}", "SUBJECT: $$ and $to_address",
                     "body ${to_address}", "$", "$$", "${", "${}", "$1", "${library_name",
                     "$library_name", "${Library_Name}", "${unknown_thing}", "price $5",
                     "Subject: two\nlines", "\ufeffSubject: bom"]),
    st.text(max_size=40),
)
SUBJECT_LINES = st.one_of(
    st.sampled_from(["Subject: ${library_name}", "subject:plain", "Subject:", "Subject: $",
                     "Subject: ${nope}", "SUBJECT: $$5 at $library_name", "Subject: ${library_name"]),
    st.text(max_size=30).map("Subject: ".__add__))
BODY_LINES = st.one_of(
    st.sampled_from(["Dear patron,", "", "${library_name} says hello", "$$", "price $$5",
                     "$library_name.", "# not a note here", "line\ttab", "Zoë — à bientôt"]),
    st.text(max_size=40))


@st.composite
def template_texts(draw) -> str:
    """Random text; a random mix of template-like lines; or notes, a
    Subject, a blank line and a body, with a little noise."""
    shape = draw(st.integers(0, 2))
    if shape == 0:
        return draw(st.text(max_size=300))
    if shape == 1:
        lines = draw(st.lists(TEMPLATE_LINES, max_size=12))
    else:
        lines = (draw(st.lists(st.sampled_from(["# a note", "#", "", "  "]), max_size=3))
                 + [draw(SUBJECT_LINES), draw(st.sampled_from(["", "", "", "no blank line"]))]
                 + draw(st.lists(BODY_LINES, max_size=10)))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


@FUZZ
@given(template_texts(), st.sampled_from(sorted(bg.TEMPLATE_FIELDS)))
def test_any_template_text_parses_or_names_its_line(text, kind):
    path = Path("templates") / f"{kind}.txt"
    try:
        template = bg.parse_template(kind, text, path)
    except bg.TemplateError as exc:
        lines = text.splitlines()
        message = str(exc)
        assert message.startswith(str(path)) and message.endswith(".")
        event("TemplateError" + (" at a line" if exc.lineno else " about the file"))
        if exc.lineno is None:          # about the whole file: nothing but notes in it
            assert all(line.startswith("#") or not line.strip() for line in lines)
            return
        assert message.startswith(f"{path} line {exc.lineno}: ")
        line = lines[exc.lineno - 1]
        if "lone '$'" in message:
            assert "$" in line
        elif "unknown placeholder" in message:
            name = re.search(r"\$\{(\w+)\}", message).group(1)
            assert f"${name}" in line or f"${{{name}}}" in line
        elif "blank line after the Subject" in message:
            assert line.strip() and lines[exc.lineno - 2].lower().startswith("subject:")
        else:
            assert "Subject:" in message and not line.startswith("#") and line.strip()
        return
    event("parsed")
    subject, body = template.fill({name: "v" for name in bg.TEMPLATE_FIELDS[kind]})
    assert "\n" not in subject and "\r" not in subject and body.endswith("\n")
