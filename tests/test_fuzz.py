"""Queued files, bibliogate.ini values and template text that once broke
BiblioGate, each kept as a plain test."""

from __future__ import annotations

import pytest

import bibliogate as bg
from conftest import write_ini

FROM = "library@school.example"


# Messages ####################################################################


def test_a_body_with_lone_carriage_returns_leaves_with_crlf_only():
    raw = b"To: pat@example.org\n\nline one\rline two\r.\r\nend\r\r\n"
    out = bg.prepare_message(raw, FROM, "", 1.7e9, "x.TMP")
    assert out.data.partition(b"\r\n\r\n")[2] == b"line one\r\nline two\r\n.\r\nend\r\n\r\n"


@pytest.mark.parametrize("queued_at", [-1e12, 1e12, -62135600000.0])
def test_a_file_dated_out_of_the_calendar_still_goes(queued_at):
    out = bg.prepare_message(b"To: pat@example.org\n\nHi.\n", FROM, "", queued_at, "x.TMP")
    assert b"\r\nDate: " in out.data


# Settings ####################################################################


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
    assert bg.load_settings(ini).problems == [
        "bibliogate.ini line 5: '= 5' is not 'key = value' nor a [section]. Fix or delete that line."]
