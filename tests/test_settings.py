"""Settings, first run and templates: every bad value gets a sentence naming it."""

from pathlib import Path

import pytest

import bibliogate as bg
from conftest import REPO, write_ini


def test_first_run_writes_a_commented_ini_templates_and_folders(tmp_path):
    ini = tmp_path / "bibliogate.ini"
    settings, created = bg.ensure_layout(ini)
    assert ini.read_text(encoding="utf-8") == bg.DEFAULT_INI
    assert "; IP address or name of the local SMTP server" in bg.DEFAULT_INI
    for kind in bg.TEMPLATE_FIELDS:
        assert (tmp_path / "templates" / f"{kind}.txt").is_file()
    assert (tmp_path / "spool").is_dir() and (tmp_path / "logs").is_dir()
    assert len(created) == 3 + len(bg.DEFAULT_TEMPLATES)
    # not configured: the sender will not run, and says why
    assert any("[smtp] host = '': not set" in p for p in settings.problems)
    assert any("[gateway] from_address = '': not set" in p for p in settings.problems)
    _, created_again = bg.ensure_layout(ini)
    assert created_again == []


def test_the_shipped_ini_and_templates_are_the_defaults():
    assert (REPO / "bibliogate.ini").read_text(encoding="utf-8") == bg.DEFAULT_INI
    for kind, text in bg.DEFAULT_TEMPLATES.items():
        assert (REPO / "templates" / f"{kind}.txt").read_text(encoding="utf-8") == text
        bg.parse_template(kind, text, Path(f"{kind}.txt"))        # each one is valid


def test_relative_paths_are_relative_to_the_ini(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    ini = write_ini(tmp_path, gateway__spool_folder="queue", data__database="data/bg.db")
    settings = bg.load_settings(ini)
    assert settings.spool == tmp_path.resolve() / "queue"
    assert settings.database == tmp_path.resolve() / "data" / "bg.db"


@pytest.mark.parametrize("key, value, words", [
    ("smtp__port", "abc", "bibliogate.ini [smtp] port = 'abc': not a number. Use 25, 587 (starttls) or 465 (tls)."),
    ("smtp__port", "70000", "[smtp] port = '70000': out of range"),
    ("smtp__security", "ssl", "[smtp] security = 'ssl': must be none, starttls or tls."),
    ("smtp__host", "mail server", "[smtp] host = 'mail server': not a server name"),
    ("smtp__timeout_seconds", "0", "[smtp] timeout_seconds = '0': out of range"),
    ("smtp__ca_file", "nowhere.pem", "[smtp] ca_file = 'nowhere.pem': no such file"),
    ("gateway__from_address", "library at school", "[gateway] from_address = 'library at school': not an email address"),
    ("gateway__minutes_between_checks", "three", "[gateway] minutes_between_checks = 'three': not a number"),
    ("gateway__messages_per_check", "2.5", "[gateway] messages_per_check = '2.5': not a number"),
    ("gateway__test_to_address", "me@", "[gateway] test_to_address = 'me@': not an email address"),
    ("gateway__give_up_after_hours", "-1", "[gateway] give_up_after_hours = '-1': out of range"),
    ("smtp__colour", "blue", "[smtp] colour: unknown setting"),
])
def test_a_bad_setting_is_named_with_its_fix(tmp_path, key, value, words):
    settings = bg.load_settings(write_ini(tmp_path, **{key: value}))
    assert any(words in p for p in settings.problems), settings.problems


def test_a_broken_ini_is_reported_not_fatal(tmp_path):
    ini = tmp_path / "bibliogate.ini"
    ini.write_text("[smtp]\nhost = x\nthis line is not a setting\n", encoding="utf-8")
    settings = bg.load_settings(ini)
    assert settings.problems[0].startswith("bibliogate.ini line 3: 'this line is not a setting' is not")
    assert settings.smtp_host == "x"          # the good lines still count


def test_decimal_minutes_are_allowed(tmp_path):
    settings = bg.load_settings(write_ini(tmp_path, gateway__minutes_between_checks="0.5"))
    assert settings.problems == () and settings.interval == 30


def test_bad_settings_stop_send_with_exit_2_but_queueing_goes_on(gateway):
    gateway.configure(smtp__port="abc")
    r = gateway.cli("send")
    assert r.returncode == 2 and "[smtp] port = 'abc': not a number" in r.stderr
    r = gateway.cli("test")
    assert r.returncode == 0 and (gateway.spool / r.stdout.strip()).exists()
    r = gateway.cli("status", "--json")
    assert r.returncode == 1 and "[smtp] port" in r.stdout


def test_template_with_unknown_placeholder_names_file_and_line(tmp_path):
    ini = write_ini(tmp_path)
    bg.ensure_layout(ini)
    path = tmp_path / "templates" / "test.txt"
    text = path.read_text(encoding="utf-8").replace("Hello,", "Hello ${patron_nmae},")
    path.write_text(text, encoding="utf-8")
    lineno = text.splitlines().index("Hello ${patron_nmae},") + 1
    settings, _ = bg.ensure_layout(ini)
    assert any(f"test.txt line {lineno}: unknown placeholder ${{patron_nmae}}" in p
               for p in settings.problems), settings.problems


@pytest.mark.parametrize("text, words", [
    ("# only notes\n", "must be 'Subject: ...'"),
    ("Subject: hi\nbody right away\n", "leave one blank line"),
    ("Subject: costs $5\n\nbody\n", "a lone '$' must be written '$$'"),
])
def test_template_shape_errors(text, words):
    with pytest.raises(bg.TemplateError, match=words.replace("$", r"\$").replace("(", r"\(")):
        bg.parse_template("test", text, Path("test.txt"))


def test_a_missing_template_is_written_again_and_said(tmp_path):
    ini = write_ini(tmp_path)
    bg.ensure_layout(ini)
    path = tmp_path / "templates" / "daily_log.txt"
    path.unlink()
    settings, created = bg.ensure_layout(ini)
    assert created == [f"Wrote the default template {path}."]
    assert path.read_text(encoding="utf-8") == bg.DEFAULT_TEMPLATES["daily_log"]
    assert settings.problems == ()


def test_an_unreadable_template_is_a_problem_that_names_it(tmp_path):
    ini = write_ini(tmp_path)
    bg.ensure_layout(ini)
    (tmp_path / "templates" / "test.txt").write_bytes(b"Subject: \xff\xfe\n\nbody\n")
    settings, _ = bg.ensure_layout(ini)
    assert any("test.txt: cannot be read" in p and "UTF-8" in p for p in settings.problems)


def test_a_subject_can_never_become_two_headers():
    template = bg.parse_template("test", "Subject: for ${to_address}\n\nbody\n", Path("t.txt"))
    subject, _ = template.fill({"to_address": "x\r\nBcc: evil@example.org"})
    assert "\n" not in subject and "\r" not in subject


def test_a_spool_folder_that_cannot_be_made_names_the_key(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder", encoding="utf-8")
    settings, _ = bg.ensure_layout(write_ini(tmp_path, gateway__spool_folder="blocker/spool"))
    assert any(p.startswith("bibliogate.ini [gateway] spool_folder = 'blocker/spool':")
               and "cannot be created" in p for p in settings.problems), settings.problems


def test_no_ini_at_all_reads_as_the_defaults(tmp_path):
    settings = bg.load_settings(tmp_path / "nowhere.ini")
    assert settings.per_check == 10 and settings.interval == 180
    assert any("[smtp] host" in p for p in settings.problems)


def test_composed_messages_read_back_exactly(tmp_path):
    import email
    import email.policy
    settings = bg.load_settings(write_ini(tmp_path, library__name="Bibliothèque Zoë"))
    bodies = ["plain\ntext\n", "Zoë, café = 3 €\n" + "x" * 1200 + "\n. a dot line\n", "é"]
    for body in bodies:
        data = bg.compose(settings, "ann@example.org", "Prêt " + "long " * 30, body,
                          "Ann\r\nBcc: evil@example.org", 0)
        assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
        msg = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
        assert msg.get_content() == body
        assert msg["Subject"] == "Prêt " + ("long " * 30).strip()
        assert msg["From"] == "Bibliothèque Zoë <library@school.example>"
        assert msg["Bcc"] is None and msg["To"].addresses[0].addr_spec == "ann@example.org"
        assert msg["Auto-Submitted"] == "auto-generated" and msg["Message-ID"] and msg["Date"]


def fake_dpapi():
    """A stand-in for DPAPI with the same shape: bytes in, other bytes out."""
    key = 0x5A
    protect = lambda data: b"DP" + bytes(b ^ key for b in data)          # noqa: E731

    def unprotect(data: bytes) -> bytes:
        if not data.startswith(b"DP"):
            raise OSError(13, "not ours")
        return bytes(b ^ key for b in data[2:])
    return protect, unprotect


def test_the_smtp_password_round_trips_through_the_ini_encrypted_where_there_is_dpapi(
        tmp_path, monkeypatch):
    monkeypatch.setattr(bg, "DPAPI", fake_dpapi())
    ini = write_ini(tmp_path, smtp__username="lib")
    stored = bg.stored_smtp_password("S3cret pw;é")
    assert stored.startswith("dpapi:") and "S3cret" not in stored
    assert bg.ini_value_problem(stored) is None
    ini.write_text(bg.update_ini_text(ini.read_text(encoding="utf-8"),
                                      {("smtp", "password"): stored}), encoding="utf-8")
    assert stored in ini.read_text(encoding="utf-8")
    assert bg.load_settings(ini).password == "S3cret pw;é"
    # a plain password typed by hand keeps working
    ini.write_text(ini.read_text(encoding="utf-8").replace(stored, "typed-by-hand"), encoding="utf-8")
    assert bg.load_settings(ini).password == "typed-by-hand"
    # one encrypted elsewhere is a problem with its fix, not garbage sent to the server
    ini.write_text(ini.read_text(encoding="utf-8").replace("typed-by-hand", "dpapi:QUJD"),
                   encoding="utf-8")
    s = bg.load_settings(ini)
    assert s.password == "" and any("Type the password again" in p for p in s.problems)
    # without DPAPI (Linux) the page writes the password itself
    monkeypatch.setattr(bg, "DPAPI", None)
    assert bg.stored_smtp_password("plain") == "plain"


def test_addresses_are_matched_whole():
    assert bg.valid_address("a@b.example")
    for bad in ("a@b.example\n", "a@b.example\nBcc: x@evil.example", "a@b.example\r"):
        assert not bg.valid_address(bad)
