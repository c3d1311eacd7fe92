"""Real Postfix for the interoperability tests: its test server ``smtp-sink``
and a private ``smtpd`` instance, both on 127.0.0.1 at a random port.

* ``SmtpSink(refuse=..., fail=..., hangup=..., hangup_421=...)`` runs
  ``smtp-sink`` with ``-r`` (4xx), ``-f`` (5xx), ``-q`` (disconnect) and ``-Q``
  (421 and disconnect) on the named commands ("MAIL", "RCPT", "DATA", "." for
  the end of the data); each accepted message is dumped to a file (``-d``), so
  ``.messages()`` reads back what arrived.
* ``PostfixServer(relay_port, **main_cf)`` runs Postfix's own ``smtpd`` from a
  throw-away configuration folder (``postfix -c DIR start``, ``stop`` at the
  end). Everything it accepts is relayed to ``relay_port`` on 127.0.0.1 (an
  aiosmtpd Sink from conftest), so nothing leaves this computer and the test
  sees who got what. ``tls=True`` offers STARTTLS with a trustme certificate.

Both skip their test with a reason when Postfix is not installed, except in CI
(``CI`` set): there a missing Postfix fails, since .ci/run installs it.
Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import pytest

from conftest import HOST, _free_port, _test_ca

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
#: The daemons of Debian's postfix package.
DAEMONS = "/usr/lib/postfix/sbin"
START_SECONDS = 20.0


def require_postfix() -> None:
    """Skip without Postfix; in CI, fail: .ci/run must have installed it."""
    if os.path.exists(POSTFIX) and os.path.exists(SMTP_SINK):
        return
    why = "Postfix is not installed (apt-get install postfix)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}, but CI is set: .ci/run should have installed it.")
    pytest.skip(why)


def wait_for_greeting(port: int, proc: Optional[subprocess.Popen] = None,
                      timeout: float = START_SECONDS) -> None:
    """Until a server on 127.0.0.1:port sends its 220 greeting (bounded)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}) before listening")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = greeting.decode("ascii", "replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise AssertionError(f"no SMTP greeting on port {port} within {timeout} s ({last})")


def _shared_folder(prefix: str, mode: int) -> Path:
    """A folder Postfix's own users can reach: pytest's tmp_path sits under a
    folder only root may enter, and the daemons run as `postfix` or `nobody`."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(folder, mode)
    return folder


# smtp-sink ###################################################################

class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, refusing the commands it is told to."""

    def __init__(self, refuse=(), fail=(), hangup=(), hangup_421=(), extra=()):
        self.port = _free_port()
        self.host = HOST
        self.security = "none"
        self.ca_file = None
        self.auth = None
        self.folder = _shared_folder("bibliogate-smtp-sink-", 0o777)
        self.dump = self.folder / "dump"
        self.dump.mkdir()
        os.chmod(self.dump, 0o777)
        cmd = [SMTP_SINK, "-4", "-h", "sink.test", "-d", f"{self.dump}/msg."]
        for option, commands in (("-r", refuse), ("-f", fail), ("-q", hangup), ("-Q", hangup_421)):
            if commands:
                cmd += [option, ",".join(commands)]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]     # smtp-sink refuses to run as root
        cmd += [*extra, f"{HOST}:{self.port}", "64"]
        self.log = open(self.folder / "smtp-sink.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_greeting(self.port, self.proc)
        except AssertionError:
            self.stop()
            raise

    def messages(self) -> List[bytes]:
        """The dumped transactions, each a file's bytes (envelope, then message)."""
        return [p.read_bytes() for p in sorted(self.dump.iterdir())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def make_smtp_sink():
    """Factory: make_smtp_sink(refuse=("DATA",), ...) -> a running SmtpSink."""
    require_postfix()
    made: List[SmtpSink] = []

    def factory(**options) -> SmtpSink:
        s = SmtpSink(**options)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.stop()


# A private Postfix smtpd #####################################################

#: The services a relaying Postfix needs; no chroot (the folder is a temp one).
MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixServer:
    """Postfix's smtpd from a throw-away config folder, relaying to 127.0.0.1.

    main_cf: extra main.cf settings, e.g. smtpd_recipient_limit=10,
    smtpd_data_restrictions="defer", message_size_limit=100000.
    tls: offer STARTTLS with a certificate of the tests' CA (``ca_file``).
    """

    def __init__(self, relay_port: int, tls: bool = False, **main_cf):
        if os.geteuid() != 0:
            pytest.skip("a private Postfix instance must be started as root")
        self.host, self.port = HOST, _free_port()
        self.auth = None
        self.ca_file = _test_ca()[0] if tls else None
        self.security = "starttls" if tls else "none"
        self.folder = _shared_folder("bibliogate-postfix-", 0o755)
        self.config = self.folder / "etc"
        for name in ("etc", "queue", "data"):
            (self.folder / name).mkdir()
        shutil.chown(self.folder / "data", "postfix")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.folder / "queue"),
            "data_directory": str(self.folder / "data"),
            "daemon_directory": DAEMONS,
            "myhostname": "postfix.test",
            "mydestination": "",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # Everything goes to the test's own server: nothing leaves 127.0.0.1.
            "relayhost": f"[{HOST}]:{relay_port}",
            "smtp_tls_security_level": "none",
            "alias_maps": "", "alias_database": "",
            "maillog_file": str(self.folder / "maillog"),
            "maillog_file_prefixes": str(self.folder),
            "smtpd_client_restrictions": "", "smtpd_helo_restrictions": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            # Test mail may go at once, no error back-off between tests.
            "smtpd_error_sleep_time": "0", "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "200",
        }
        if tls:
            pem = self.folder / "server.pem"
            _test_ca()[1].private_key_and_cert_chain_pem.write_to_path(str(pem))
            os.chmod(pem, 0o644)
            settings.update(smtpd_tls_security_level="may", smtpd_tls_chain_files=str(pem))
        settings.update({k: str(v) for k, v in main_cf.items()})
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        (self.config / "main.cf").write_text(text, encoding="utf-8")
        (self.config / "master.cf").write_text(MASTER_CF.format(host=HOST, port=self.port),
                                               encoding="utf-8")
        try:
            self._postfix("start")
            wait_for_greeting(self.port)
        except AssertionError:
            self.stop()
            raise

    def _postfix(self, command: str) -> None:
        proc = subprocess.run([POSTFIX, "-c", str(self.config), command], capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0 and command == "start":
            raise AssertionError(f"postfix start failed: {proc.stdout}{proc.stderr}")

    def stop(self) -> None:
        try:
            self._postfix("stop")
        finally:
            # master exits a moment after `stop`; wait for its pid file to go.
            pid = self.folder / "queue" / "pid" / "master.pid"
            deadline = time.monotonic() + 10
            while pid.exists() and time.monotonic() < deadline:
                try:
                    os.kill(int(pid.read_text().split()[0]), 0)
                except (OSError, ValueError, IndexError):
                    break
                time.sleep(0.05)
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def make_postfix():
    """Factory: make_postfix(relay_port, tls=False, **main_cf) -> a running
    PostfixServer; every one is stopped at teardown."""
    require_postfix()
    made: List[PostfixServer] = []

    def factory(relay_port: int, tls: bool = False, **main_cf) -> PostfixServer:
        server = PostfixServer(relay_port, tls, **main_cf)
        made.append(server)
        return server

    yield factory
    for server in made:
        server.stop()
