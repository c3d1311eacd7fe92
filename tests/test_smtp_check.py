"""`smtp-check`: the conversation with the server step by step, nothing sent."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import bibliogate as bg
from conftest import HOST
import test_auth
from test_auth import GOOGLE_APP_PASSWORD, USER, oauth_ini

#: The servers of test_auth.py: a cloud-like SMTP server and a token endpoint.
cloud = test_auth.cloud
endpoint = test_auth.endpoint


def smtp_check(ini: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(bg.__file__)), "--config", str(ini),
                           "smtp-check"], capture_output=True, text=True, timeout=60)


def test_every_step_is_shown_and_nothing_is_sent(tmp_path, cloud):
    server = cloud()
    out = smtp_check(server.ini(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["connect", "TLS", "EHLO", "login", "QUIT"]
    assert all(line.split()[1] == "ok" for line in lines[:-1])
    assert "220 cloud.test" in lines[0]
    assert "STARTTLS; certificate for localhost, valid until 3000-01-01" in lines[1]
    assert "AUTH LOGIN PLAIN XOAUTH2" in lines[2] and "8BITMIME" in lines[2] and "SIZE" in lines[2]
    assert f"logged in as {USER} (PLAIN)" in lines[3]
    assert server.messages == [] and server.auth_attempts == ["PLAIN"]


def test_the_step_that_fails_says_what_to_change(tmp_path, cloud):
    server = cloud(auth_reply=GOOGLE_APP_PASSWORD)
    out = smtp_check(server.ini(tmp_path))
    assert out.returncode == 1
    login = [line for line in out.stdout.splitlines() if line.startswith("login")][0]
    assert "FAILED" in login and "app password" in login
    # security = none against a server that wants STARTTLS first
    server = cloud()
    out = smtp_check(server.ini(tmp_path / "plain", smtp__security="none", smtp__ca_file=""))
    assert out.returncode == 1
    assert "security = starttls" in out.stdout


def test_oauth2_shows_the_token_step(tmp_path, cloud, endpoint):
    server = cloud(endpoint=endpoint)
    out = smtp_check(oauth_ini(tmp_path, server, endpoint))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fetched an access token from 127.0.0.1:" in out.stdout
    assert f"logged in as {USER} (XOAUTH2)" in out.stdout
    assert len(endpoint.requests) == 1


def test_nobody_listening_fails_at_connect(tmp_path, cloud):
    server = cloud()
    with socket.socket() as s:
        s.bind((HOST, 0))
        closed = s.getsockname()[1]
    out = smtp_check(server.ini(tmp_path, smtp__port=closed))
    assert out.returncode == 1
    assert out.stdout.splitlines()[0].split()[:2] == ["connect", "FAILED"]
    assert "[smtp] host and port" in out.stdout


def test_steps_are_data_the_page_can_show(tmp_path, cloud):
    server = cloud(starttls=False, need_login=False)
    settings = bg.load_settings(server.ini(tmp_path, smtp__username="", smtp__password=""))
    steps = bg.smtp_steps(settings)
    assert [(s.name, s.ok) for s in steps] == [("connect", True), ("EHLO", True), ("login", True),
                                                ("QUIT", True)]


def test_the_page_test_button_shows_the_same_steps(tmp_path, cloud, monkeypatch):
    from page_support import RunningPage, flashes
    from test_auth import PASSWORD
    from conftest import Clock
    monkeypatch.setattr(bg, "TICK_SECONDS", 0.05)
    server = cloud()
    ini = server.ini(tmp_path / "g", gateway__test_to_address="librarian@school.example")
    page = RunningPage(tmp_path / "g", ini.read_text(encoding="utf-8"), Clock())
    try:
        c = page.client()
        c.get("/")
        notes = flashes(c.submit("/test").text)
        steps = [n for n in notes if n.startswith("Server check, ")]
        assert [n.split(":")[0] for n in steps] == [f"Server check, {name}" for name in
                                                    ("connect", "TLS", "EHLO", "login", "QUIT")]
        assert all(": ok — " in n for n in steps)
        assert any(n.startswith("Queued the test message") for n in notes)
        assert server.messages == [] and PASSWORD not in c.page
    finally:
        page.close()


def test_an_untrusted_certificate_fails_at_tls_with_the_fix(tmp_path, cloud):
    server = cloud()
    out = smtp_check(server.ini(tmp_path, smtp__ca_file=""))
    assert out.returncode == 1
    tls = [line for line in out.stdout.splitlines() if line.startswith("TLS")][0]
    assert "FAILED" in tls and "certificate verify failed" in tls and "ca_file" in tls


def test_settings_never_show_their_secrets_in_a_repr(tmp_path):
    from test_auth import SECRET
    settings = bg.load_settings(test_auth.write_ini(tmp_path, smtp__password="pw-" + SECRET,
                                                    smtp__oauth_client_secret=SECRET))
    assert SECRET in settings.oauth_client_secret and SECRET not in repr(settings)
