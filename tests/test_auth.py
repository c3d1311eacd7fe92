"""Logging in to the mail service a school really has: replies that say the
settings are wrong, the wait after a refused login, OAuth 2.0 (XOAUTH2) for
Microsoft 365, and the daily cap.

The servers here answer word for word what Microsoft 365, Google and Postfix
answer (the texts below are copied from their replies), on 127.0.0.1; the
token endpoint is an http.server on 127.0.0.1 that speaks like Entra ID's.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import List, Optional

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

import bibliogate as bg
from conftest import HOST, Clock, _free_port, _server_ssl_context, _test_ca, eml, write_ini
from test_sender import drop

# Replies as the real servers word them ----------------------------------------

POSTFIX_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
POSTFIX_AUTH_FAILED = "535 5.7.8 Error: authentication failed: authentication failure"
MS_NOT_AUTHENTICATED = ("530 5.7.57 Client not authenticated to send mail. "
                        "[AM0PR01CA0123.eurprd01.prod.exchangelabs.com 2026-11-30T08:00:00.000Z "
                        "08DCF1A2B3C4D5E6]")
MS_AUTH_DISABLED = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                    "disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more "
                    "information. [LO4P123CA0456.GBRP123.PROD.OUTLOOK.COM 2026-11-30T08:00:00.000Z "
                    "08DCF1A2B3C4D5E6]")
MS_BASIC_OFF = ("550 5.7.30 Basic authentication is not supported for Client Submission. "
                "[DB8PR04CA0001.eurprd04.prod.outlook.com 2026-11-30T08:00:00.000Z 08DCF1A2B3C4D5E6]")
MS_WRONG_PASSWORD = ("535 5.7.3 Authentication unsuccessful "
                     "[LO4P123CA0456.GBRP123.PROD.OUTLOOK.COM 2026-11-30T08:00:00.000Z 08DCF1A2B3C4D5E6]")
GOOGLE_APP_PASSWORD = ("534-5.7.9 Application-specific password required. For more information, "
                       "go to\r\n534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor "
                       "d2e1a72fcca58-6f0a1b2c3d4sm1234567b3a.10 - gsmtp")
GOOGLE_BAD_CREDENTIALS = ("535-5.7.8 Username and Password not accepted. For more information, "
                          "go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials "
                          "d2e1a72fcca58-6f0a1b2c3d4sm1234567b3a.10 - gsmtp")
AIOSMTPD_AUTH_REQUIRED = "530 5.7.0 Authentication required"

USER, PASSWORD = "library@school.example", "Corr3ct-horse"
TENANT, CLIENT_ID = "school.example", "6731de76-14a6-49ae-97bc-6eba6914391e"
SECRET = "Qx8~Zk2.very-secret-client-value_NEVER-SHOWN"


# A server that answers as the cloud services do ----------------------------------

class Cloud:
    """aiosmtpd handler: STARTTLS required (or not), PLAIN/LOGIN against one
    password, XOAUTH2 against the tokens of a TokenEndpoint, and any AUTH,
    MAIL or RCPT reply word for word."""

    def __init__(self, *, auth_reply: Optional[str] = None, mail_reply: Optional[str] = None,
                 rcpt_reply: Optional[str] = None, starttls: bool = True, need_login: bool = True,
                 wrong_password_reply: str = POSTFIX_AUTH_FAILED, endpoint=None,
                 mechanisms=("PLAIN", "LOGIN", "XOAUTH2")):
        self.auth_reply, self.mail_reply, self.rcpt_reply = auth_reply, mail_reply, rcpt_reply
        self.starttls, self.need_login = starttls, need_login
        self.wrong_password_reply = wrong_password_reply
        self.endpoint = endpoint
        self.mechanisms = mechanisms
        self.auth_attempts: List[str] = []      # one entry per AUTH command: its mechanism
        self.xoauth2: List[tuple] = []          # (user, token) of every XOAUTH2 login
        self.messages: List[tuple] = []
        self.ca_file = _test_ca()[0] if starttls else ""
        self.port = _free_port()
        kwargs = dict(hostname=HOST, port=self.port, server_hostname="cloud.test",
                      ready_timeout=10.0, decode_data=False, authenticator=self.check_password,
                      auth_require_tls=starttls,
                      auth_exclude_mechanism=[m for m in ("PLAIN", "LOGIN") if m not in mechanisms])
        if starttls:
            kwargs.update(tls_context=_server_ssl_context(), require_starttls=True)
        self.controller = Controller(self, **kwargs)

    @property
    def security(self) -> str:
        return "starttls" if self.starttls else "none"

    def ini(self, folder: Path, **overrides) -> Path:
        values = dict(smtp__port=self.port, smtp__security=self.security,
                      smtp__ca_file=self.ca_file, smtp__username=USER, smtp__password=PASSWORD,
                      gateway__from_address=USER)
        values.update(overrides)
        return write_ini(folder, **values)

    def check_password(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            USER.encode(), PASSWORD.encode())
        return AuthResult(success=ok, handled=False, auth_data=auth_data,
                          message=None if ok else self.wrong_password_reply)

    async def handle_AUTH(self, server, session, envelope, args):
        self.auth_attempts.append(args[0].upper())
        if args[0].upper() not in self.mechanisms:
            return "504 5.7.4 Unrecognized authentication type"
        return self.auth_reply or MISSING

    async def auth_XOAUTH2(self, server: SMTP, args):
        """As Microsoft and Google do it: a refused token gets a 334 with a
        JSON error, the client answers with an empty line, then 535."""
        blob = base64.b64decode(args[1]) if len(args) > 1 else await server.challenge_auth("")
        fields = dict(part.split("=", 1) for part in blob.decode().split("\x01") if "=" in part)
        user, token = fields.get("user"), fields.get("auth", "").replace("Bearer ", "", 1)
        self.xoauth2.append((user, token))
        if user == USER and self.endpoint and token in self.endpoint.issued:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        await server.challenge_auth(json.dumps({"status": "401", "schemes": "bearer",
                                                "scope": "https://outlook.office365.com/"}))
        return AuthResult(success=False, handled=False, message=MS_WRONG_PASSWORD)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        if self.need_login and not session.authenticated:
            return MS_NOT_AUTHENTICATED
        envelope.mail_from = address
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 OK <x@cloud.test> [Hostname=cloud.test]"


@pytest.fixture
def cloud():
    made: List[Cloud] = []

    def factory(**options) -> Cloud:
        server = Cloud(**options)
        server.controller.start()
        made.append(server)
        return server

    yield factory
    for server in made:
        server.controller.stop()


class TokenEndpoint:
    """Entra ID's token endpoint in miniature: the client-credentials grant,
    tokens tok-1, tok-2, ... or the error set in `.error` (status, body)."""

    def __init__(self, lifetime: int = 3599):
        self.lifetime = lifetime
        self.requests: List[dict] = []
        self.issued: List[str] = []
        self.error: Optional[tuple] = None
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                size = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(size).decode()))
                endpoint.requests.append(form)
                if endpoint.error:
                    status, body = endpoint.error
                elif (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, SECRET):
                    status, body = 401, entra_error("invalid_client", 7000215, "Invalid client "
                                                    "secret provided.")
                else:
                    token = f"tok-{len(endpoint.issued) + 1}"
                    endpoint.issued.append(token)
                    status, body = 200, {"token_type": "Bearer", "expires_in": endpoint.lifetime,
                                         "ext_expires_in": endpoint.lifetime, "access_token": token}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/{TENANT}/oauth2/v2.0/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def entra_error(error: str, code: int, text: str) -> dict:
    """An error body as Entra ID sends it."""
    return {"error": error, "error_description": f"AADSTS{code}: {text}\r\nTrace ID: "
            "0f1e2d3c-aaaa-bbbb-cccc-1234567890ab\r\nCorrelation ID: 11111111-2222-3333-4444-"
            "555555555555\r\nTimestamp: 2026-11-30 08:00:00Z", "error_codes": [code],
            "timestamp": "2026-11-30 08:00:00Z"}


@pytest.fixture
def endpoint():
    e = TokenEndpoint()
    yield e
    e.close()


def oauth_ini(folder: Path, server: Cloud, endpoint: TokenEndpoint, **overrides) -> Path:
    values = dict(smtp__auth="oauth2", smtp__password="", smtp__oauth_tenant=TENANT,
                  smtp__oauth_client_id=CLIENT_ID, smtp__oauth_client_secret=SECRET,
                  smtp__oauth_token_url=endpoint.url)
    values.update(overrides)
    return server.ini(folder, **values)


def waiting(spool: Path) -> List[str]:
    return sorted(p.name for p in spool.iterdir() if p.suffix.upper() == ".TMP")


def bad(spool: Path) -> List[str]:
    return sorted(p.name for p in spool.iterdir() if p.suffix.upper() == ".BAD")


def charged(gateway: bg.Gateway) -> list:
    return [tuple(r) for r in gateway.journal.db.execute("SELECT file, attempts FROM spool_state")]


# 1. Replies that mean "the settings are wrong" -----------------------------------

@pytest.mark.parametrize("reply, words", [
    (POSTFIX_STARTTLS, "security = starttls"),
    ("530 Must issue a STARTTLS command first", "security = starttls"),         # aiosmtpd
    (MS_NOT_AUTHENTICATED, "username and password"),
    ("530 5.7.1 Client was not authenticated", "username and password"),
    (AIOSMTPD_AUTH_REQUIRED, "username and password"),
    (MS_AUTH_DISABLED, "turn on Authenticated SMTP for the mailbox"),
    (MS_AUTH_DISABLED, "auth = oauth2"),
    (MS_BASIC_OFF, "auth = oauth2"),
    (GOOGLE_APP_PASSWORD, "app password"),
    (GOOGLE_APP_PASSWORD, "smtp-relay.gmail.com"),
    (GOOGLE_BAD_CREDENTIALS, "app password"),
    (POSTFIX_AUTH_FAILED, "username and password"),
    (MS_WRONG_PASSWORD, "username and password"),
    ("535 5.7.139 Authentication unsuccessful, the user credentials were incorrect. "
     "[LO2P265CA0001.GBRP265.PROD.OUTLOOK.COM]", "username and password"),
    ("535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
     "authenticated successfully. Contact your administrator.", "auth = oauth2"),
    ("538 5.7.11 Encryption required for requested authentication mechanism", "starttls"),
    ("550 5.7.60 SMTP; Client does not have permissions to send as this sender", "from_address"),
])
def test_a_reply_that_means_the_settings_are_wrong_says_what_to_change(reply, words):
    code, text = int(reply[:3]), reply[4:]
    assert words in bg.settings_fix(code, text)


@pytest.mark.parametrize("reply", [
    "550 5.1.1 <nobody@school.example>: Recipient address rejected: User unknown in local "
    "recipient table",
    "552 5.3.4 Message size exceeds fixed limit",
    "451 4.3.0 Try again later",
    "452 4.5.3 Error: too many recipients",
    "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
    "550 5.4.1 Recipient address rejected: Access denied. AS(201806281) "
    "[DB8EUR05FT012.eop-eur05.prod.protection.outlook.com]",
])
def test_a_reply_about_the_message_is_not_blamed_on_the_settings(reply):
    assert bg.settings_fix(int(reply[:3]), reply[4:]) is None


@pytest.mark.parametrize("where", ["MAIL", "RCPT"])
def test_starttls_required_keeps_every_message_waiting_uncharged(tmp_path, cloud, where):
    server = cloud(starttls=False, need_login=False,
                   **({"mail_reply": POSTFIX_STARTTLS} if where == "MAIL"
                      else {"rcpt_reply": AIOSMTPD_AUTH_REQUIRED}))
    clock = Clock()
    gateway = bg.Gateway(server.ini(tmp_path, smtp__username="", smtp__password="",
                                    gateway__give_up_after_hours=1), clock=clock)
    for n in range(3):
        drop(gateway.settings.spool, f"m{n}.TMP", eml(), age=100 - n)
    for _ in range(3):          # past give_up_after_hours too: still never .BAD
        gateway.tick()
        clock.advance(3600)
    assert waiting(gateway.settings.spool) == ["m0.TMP", "m1.TMP", "m2.TMP"]
    assert bad(gateway.settings.spool) == [] and charged(gateway) == []
    state, reason = gateway.sender_state
    fix = "security = starttls" if where == "MAIL" else "username and password"
    assert state == "stopped" and fix in reason and "Messages stay queued" in reason


@pytest.mark.parametrize("reply, fix", [
    (MS_AUTH_DISABLED, "turn on Authenticated SMTP for the mailbox"),
    (MS_BASIC_OFF, "switch to [smtp] auth = oauth2"),
    (GOOGLE_APP_PASSWORD, "app password"),
])
def test_a_cloud_refusal_at_login_stops_with_its_fix_and_one_attempt(tmp_path, cloud, reply, fix):
    server = cloud(auth_reply=reply)
    clock = Clock()
    gateway = bg.Gateway(server.ini(tmp_path), clock=clock)
    drop(gateway.settings.spool, "m.TMP", eml())
    gateway.tick()
    assert server.auth_attempts == ["PLAIN"]        # smtplib's login() tried LOGIN as well
    state, reason = gateway.sender_state
    assert state == "stopped" and fix in reason and reason.startswith("login refused at ")
    assert waiting(gateway.settings.spool) == ["m.TMP"] and charged(gateway) == []


# 2. The wait after a refused login -----------------------------------------------

def test_a_refused_login_waits_30_minutes_or_a_settings_change(tmp_path, cloud):
    server = cloud(wrong_password_reply=MS_WRONG_PASSWORD)
    clock = Clock(dt.datetime(2026, 11, 30, 10, 0).timestamp())
    ini = server.ini(tmp_path, smtp__password="wrong")
    gateway = bg.Gateway(ini, clock=clock)
    drop(gateway.settings.spool, "m.TMP", eml())
    gateway.tick()
    assert server.auth_attempts == ["PLAIN"]
    expected = ("login refused at 10:00: The SMTP server 127.0.0.1:%d refused the login of "
                "'library@school.example' (%s): check [smtp] username and password; next try "
                "at 10:30 or when the settings change." % (server.port, MS_WRONG_PASSWORD))
    assert gateway.sender_state == ("stopped", expected + " Messages stay queued.")
    for minutes in (3, 6, 29):              # the checks in between do not log in
        clock.now = dt.datetime(2026, 11, 30, 10, minutes).timestamp()
        gateway.next_check = clock.now
        gateway.tick()
    assert server.auth_attempts == ["PLAIN"]
    # The queue is emptied by hand: the state still says so (it said "running").
    (gateway.settings.spool / "m.TMP").unlink()
    clock.now = dt.datetime(2026, 11, 30, 10, 12).timestamp()
    gateway.next_check = clock.now
    gateway.tick()
    assert gateway.sender_state[0] == "stopped" and "next try at 10:30" in gateway.sender_state[1]
    info = bg.status_info(gateway.settings)
    assert info["login"] == expected
    # 30 minutes on, with nothing waiting, one login tells whether it works now.
    clock.now = dt.datetime(2026, 11, 30, 10, 31).timestamp()
    gateway.next_check = clock.now
    gateway.tick()
    assert server.auth_attempts == ["PLAIN", "PLAIN"]
    assert "login refused at 10:31" in gateway.sender_state[1]
    # The password is corrected by hand: tried at once, and the message goes.
    drop(gateway.settings.spool, "n.TMP", eml())
    server.ini(tmp_path)
    clock.advance(60)
    gateway.next_check = clock.now
    gateway.tick()
    assert len(server.messages) == 1 and gateway.sender_state[0] == "running"
    assert bg.status_info(gateway.settings)["login"] is None


def test_status_json_says_the_login_was_refused_with_nothing_waiting(tmp_path, cloud):
    server = cloud(wrong_password_reply=GOOGLE_BAD_CREDENTIALS)
    ini = server.ini(tmp_path, smtp__password="wrong")
    settings, _ = bg.ensure_layout(ini)
    sender = bg.Sender(settings, bg.Journal(settings.database))
    drop(settings.spool, "m.TMP", eml())
    assert sender.check().problem.login
    (settings.spool / "m.TMP").unlink()
    out = subprocess.run([sys.executable, str(Path(bg.__file__)), "--config", str(ini), "status",
                          "--json"], capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout)
    assert out.returncode == 1 and info["waiting"] == 0
    assert info["login"].startswith("login refused at ") and "app password" in info["login"]
    assert info["login"].endswith("or when the settings change.")
    text = subprocess.run([sys.executable, str(Path(bg.__file__)), "--config", str(ini), "status"],
                          capture_output=True, text=True, timeout=60).stdout
    assert "login refused at " in text


# 3. OAuth 2.0 for Microsoft 365 ---------------------------------------------------

def test_oauth2_settings_are_checked_and_never_quote_the_secret(tmp_path):
    ini = write_ini(tmp_path, smtp__auth="oauth2", smtp__security="none")
    problems = bg.load_settings(ini).problems
    for key in ("username", "oauth_tenant", "oauth_client_id", "oauth_client_secret", "security"):
        assert any(f"[smtp] {key} " in p for p in problems), key
    ini = write_ini(tmp_path, smtp__auth="oauth2", smtp__security="starttls", smtp__username=USER,
                    smtp__oauth_tenant=TENANT, smtp__oauth_client_id=CLIENT_ID,
                    smtp__oauth_client_secret=SECRET, smtp__oauth_token_url="ftp://x/" + SECRET)
    problems = bg.load_settings(ini).problems
    assert [p for p in problems if "oauth_token_url" in p]
    ini = write_ini(tmp_path, smtp__auth="oauth2", smtp__security="starttls", smtp__username=USER,
                    smtp__oauth_tenant=TENANT, smtp__oauth_client_id=CLIENT_ID,
                    smtp__oauth_client_secret=SECRET)
    s = bg.load_settings(ini)
    assert not s.problems
    assert s.oauth_token_url == f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
    assert bg.load_settings(write_ini(tmp_path, smtp__auth="kerberos")).problems


def test_oauth2_token_is_fetched_once_reused_and_renewed(tmp_path, cloud, endpoint):
    server = cloud(mechanisms=("LOGIN", "XOAUTH2"), endpoint=endpoint)   # as Microsoft offers
    clock = Clock()
    gateway = bg.Gateway(oauth_ini(tmp_path, server, endpoint), clock=clock)
    assert not gateway.settings.problems
    drop(gateway.settings.spool, "a.TMP", eml(subject="first"))
    gateway.tick()
    assert len(server.messages) == 1 and server.xoauth2 == [(USER, "tok-1")]
    assert endpoint.requests == [{"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                  "client_secret": SECRET,
                                  "scope": "https://outlook.office365.com/.default"}]
    for n in range(3):                  # later checks reuse it
        clock.advance(gateway.settings.interval)
        drop(gateway.settings.spool, f"b{n}.TMP", eml())
        gateway.tick()
    assert len(server.messages) == 4 and len(endpoint.requests) == 1
    assert [t for _, t in server.xoauth2] == ["tok-1"] * 4
    clock.advance(3599 - 4 * 60)        # within a few minutes of its end: a new one
    drop(gateway.settings.spool, "c.TMP", eml())
    gateway.next_check = clock.now
    gateway.tick()
    assert len(server.messages) == 5 and len(endpoint.requests) == 2
    assert server.xoauth2[-1] == (USER, "tok-2")
    assert server.auth_attempts == ["XOAUTH2"] * 5
    assert gateway.sender_state[0] == "running"


@pytest.mark.parametrize("status, body, words", [
    (401, entra_error("invalid_client", 7000215, "Invalid client secret provided. Ensure the "
                      "secret being sent in the request is the client secret value, not the "
                      "client secret ID, for a secret added to app "
                      f"'{CLIENT_ID}'."), "the client secret is wrong"),
    (400, entra_error("invalid_request", 90002, f"Tenant '{TENANT}' not found. Check to make sure "
                      "you have the correct tenant ID and are signing into the correct cloud."),
     "the tenant 'school.example' is unknown"),
    (400, entra_error("unauthorized_client", 700016, f"Application with identifier '{CLIENT_ID}' "
                      "was not found in the directory 'School'."), "oauth_client_id"),
])
def test_a_refused_token_is_one_sentence_with_the_fix(tmp_path, cloud, endpoint, status, body, words):
    server = cloud(endpoint=endpoint)
    endpoint.error = (status, body)
    clock = Clock()
    gateway = bg.Gateway(oauth_ini(tmp_path, server, endpoint), clock=clock)
    drop(gateway.settings.spool, "a.TMP", eml())
    gateway.tick()
    state, reason = gateway.sender_state
    assert state == "stopped" and words in reason and SECRET not in reason
    assert server.auth_attempts == [] and waiting(gateway.settings.spool) == ["a.TMP"]
    assert charged(gateway) == []
    clock.advance(gateway.settings.interval)
    gateway.tick()
    assert len(endpoint.requests) == 1          # not asked again for 30 minutes


def test_an_unreachable_token_endpoint_is_said_and_passes(tmp_path, cloud, endpoint):
    server = cloud(endpoint=endpoint)
    with socket.socket() as s:
        s.bind((HOST, 0))
        closed = s.getsockname()[1]             # nobody listens here once closed
    gateway = bg.Gateway(oauth_ini(tmp_path, server, endpoint,
                                   smtp__oauth_token_url=f"http://{HOST}:{closed}/token"),
                         clock=Clock())
    drop(gateway.settings.spool, "a.TMP", eml())
    gateway.tick()
    state, reason = gateway.sender_state
    assert state == "retrying" and "token endpoint" in reason and "could not be used" in reason
    assert waiting(gateway.settings.spool) == ["a.TMP"]


def test_the_mailbox_refusing_the_token_says_what_to_grant(tmp_path, cloud, endpoint):
    server = cloud(endpoint=None)               # it takes no token at all
    gateway = bg.Gateway(oauth_ini(tmp_path, server, endpoint), clock=Clock())
    drop(gateway.settings.spool, "a.TMP", eml())
    gateway.tick()
    # One XOAUTH2 attempt, answered by an empty line after the 334 (no second token).
    assert server.auth_attempts == ["XOAUTH2"] and len(server.xoauth2) == 1
    assert "Add-MailboxPermission" in gateway.sender_state[1]


def test_the_secret_is_never_logged_shown_or_stored(tmp_path, cloud, endpoint, monkeypatch):
    from page_support import RunningPage, field_error, flashes
    monkeypatch.setattr(bg, "TICK_SECONDS", 0.05)
    server = cloud(endpoint=endpoint)
    ini = oauth_ini(tmp_path / "g", server, endpoint)
    text = ini.read_text(encoding="utf-8")
    page = RunningPage(tmp_path / "g", text, Clock())
    try:
        drop(page.spool, "a.TMP", eml())
        page.gateway.request_check()
        for _ in range(200):
            if server.messages:
                break
            threading.Event().wait(0.05)
        assert len(server.messages) == 1
        endpoint.error = (401, entra_error("invalid_client", 7000215, f"Invalid client secret "
                                           f"provided: {SECRET}"))       # even if echoed back
        page.gateway.tokens.forget()
        drop(page.spool, "b.TMP", eml())
        page.gateway.request_check()
        for _ in range(200):
            if page.gateway.sender_state[0] == "stopped":
                break
            threading.Event().wait(0.05)
        assert "the client secret is wrong" in page.gateway.sender_state[1]
        c = page.client()
        settings_html = c.get("/settings").text
        assert 'name="smtp.oauth_client_secret"' in settings_html
        assert "the client secret is wrong" in settings_html
        for path in ("/", "/queue", "/log", "/health"):
            c.get(path)
        assert not [seen for seen in c.seen if SECRET in seen]
        # Saved again without retyping it: kept.
        c.get("/settings")
        c.post("/settings", {**c.form("/settings"), "gateway.messages_per_check": "9"})
        saved = ini.read_text(encoding="utf-8")
        assert "messages_per_check = 9" in saved and f"oauth_client_secret = {SECRET}" in saved
        # A new token endpoint without the secret typed again: refused.
        c.get("/settings")
        r = c.post("/settings", {**c.form("/settings"),
                                 "smtp.oauth_token_url": "https://login.elsewhere.example/token"})
        assert "type it again" in field_error(r.text, "smtp.oauth_client_secret")
        assert "elsewhere" not in ini.read_text(encoding="utf-8")
        c.get("/settings")
        r = c.post("/settings", {**c.form("/settings"), "smtp.oauth_client_secret": SECRET,
                             "smtp.oauth_token_url": endpoint.url + "?v=2"})
        assert "?v=2" in ini.read_text(encoding="utf-8"), flashes(r.text)
    finally:
        page.close()
    out = subprocess.run([sys.executable, str(Path(bg.__file__)), "--config", str(ini), "status",
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.stdout and SECRET not in out.stdout and SECRET not in out.stderr
    folder = tmp_path / "g"
    for path in folder.rglob("*"):
        if path.is_file() and path != ini:
            assert SECRET.encode() not in path.read_bytes(), path


# 4. The daily cap -----------------------------------------------------------------

def test_max_per_day_is_never_passed_and_the_rest_goes_tomorrow(tmp_path, sink):
    clock = Clock(dt.datetime(2026, 11, 30, 9, 0).timestamp())
    ini = write_ini(tmp_path, sink, gateway__max_per_day=5)
    gateway = bg.Gateway(ini, clock=clock)
    spool = gateway.settings.spool
    recipients = {"m0": ["a@example.org", "b@example.org"], "m1": ["p1@example.org"],
                  "m2": ["p2@example.org"], "m3": ["c@example.org", "d@example.org"],
                  "m4": ["p4@example.org"], "m5": ["p5@example.org"]}
    for n, (name, to) in enumerate(recipients.items()):
        drop(spool, f"{name}.TMP", eml(to=to, subject=name), age=100 - n)
    drop(spool, "big.TMP", eml(to=[f"x{n}@example.org" for n in range(6)]), age=10)
    gateway.tick()
    # 4 recipients went; m3 (2 more) would pass 5, so it and all behind it wait, in order.
    assert [m.message["Subject"] for m in sink.messages] == ["m0", "m1", "m2"]
    state, reason = gateway.sender_state
    assert state == "paused" and "daily cap of 5 recipients reached" in reason
    assert "the rest go tomorrow" in reason
    assert bad(spool) == []
    # A restart the same day: still counted (sqlite); no connection for nothing.
    gateway.journal.close()
    clock.advance(3600)
    gateway = bg.Gateway(ini, clock=clock)
    sessions = sink.sessions
    gateway.tick()
    assert len(sink.messages) == 3 and gateway.sender_state[0] == "paused"
    assert sink.sessions == sessions
    assert bg.status_info(gateway.settings)["sent_today"] == 4
    # The next day: the rest go; the 6-recipient message can never fit.
    clock.now = dt.datetime(2026, 12, 1, 0, 30).timestamp()
    gateway.next_check = clock.now
    gateway.tick()
    assert [m.message["Subject"] for m in sink.messages][3:] == ["m3", "m4", "m5"]
    assert [n for n in waiting(spool) if n.startswith("m")] == []
    assert bad(spool) == ["big.BAD"]
    assert "max_per_day" in (spool / "big.BAD-reason.txt").read_text(encoding="utf-8")
    summary = bg.daily_summary(gateway, "2026-11-30")
    assert "daily cap of 5 recipients reached" in summary["sender_stops"]
    assert "daily cap of 5 recipients reached" in summary["activity"]


def test_a_broken_secret_line_is_reported_without_the_secret(tmp_path):
    ini = write_ini(tmp_path)
    with open(ini, "a", encoding="utf-8") as fh:
        fh.write(f"\n[smtp]\noauth_client_secret {SECRET}\n")
    problems = bg.load_settings(ini).problems
    assert any("oauth_client_secret ... (hidden)" in p for p in problems)
    assert not [p for p in problems if SECRET in p]
