"""BiblioGate as a Windows appliance: the scheduled task, one `run` per ini,
a `run` with no console (pythonw.exe), errors that must never pass silently,
and settings that take effect without a restart.

The task definition is checked against Microsoft's Task Scheduler schema
(element names, the order where the schema fixes one, the value ranges), and
`install-task` runs with schtasks replaced by a recorder. `run` itself runs as
a real process against a real SMTP server on 127.0.0.1; every process a test
starts is ended at teardown.
"""

import configparser
import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import REPO, eml

SCRIPT = REPO / "bibliogate.py"
NS = {"t": bg.TASK_XMLNS}
#: How pythonw.exe starts a program: no stdin, stdout or stderr at all.
NO_CONSOLE = ("import runpy, sys; "
              "sys.stdin = sys.stdout = sys.stderr = None; "
              "sys.__stdin__ = sys.__stdout__ = sys.__stderr__ = None; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
WAIT = 30.0         # seconds: the most any wait below may take on a busy machine


# -- helpers ---------------------------------------------------------------------

class Recorder:
    """Stands in for schtasks: records each command line, and the task file's
    bytes at the moment /Create reads it."""

    def __init__(self, status=0, run_status=0):
        self.calls, self.xml = [], None
        self.status, self.run_status = status, run_status

    def __call__(self, argv, quiet=False):
        self.calls.append(list(argv))
        if "/Create" in argv:
            self.xml = Path(argv[argv.index("/XML") + 1]).read_bytes()
            return self.status
        if "/Run" in argv:
            return self.run_status
        return 0


def settings_in(folder, **overrides):
    from conftest import write_ini
    ini = write_ini(folder, **overrides)
    settings, _ = bg.ensure_layout(ini)
    return settings


def parse_task(data: bytes) -> ET.Element:
    return ET.fromstring(data)


def text(root, path):
    found = root.find(path, NS)
    assert found is not None, f"no {path}"
    return found.text


def events(db_path, kind):
    conn = sqlite3.connect(str(db_path), timeout=30)
    try:
        return [r[0] for r in conn.execute("SELECT detail FROM events WHERE kind = ? ORDER BY id",
                                           (kind,))]
    finally:
        conn.close()


def state(db_path, key):
    if not Path(db_path).exists():
        return None
    conn = sqlite3.connect(str(db_path), timeout=30)
    try:
        row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:        # the tables are not there yet
        return None
    finally:
        conn.close()
    return None if row is None else json.loads(row[0])


def log_text(folder: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted((folder / "logs").glob("*.log")))


def wait_until(condition, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout:g} s for {what}")


class Runs:
    """`bibliogate.py run` processes; all ended at teardown."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, []

    def start(self, gw, no_console=False) -> subprocess.Popen:
        n = len(self.procs)
        out = open(self.folder / f"run-{n}.stdout", "wb")
        err = open(self.folder / f"run-{n}.stderr", "wb")
        cmd = [sys.executable] + (["-c", NO_CONSOLE] if no_console else [])
        cmd += [str(SCRIPT), "--config", str(gw.ini), "run"]
        proc = subprocess.Popen(cmd, cwd=str(gw.cwd), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
        out.close()
        err.close()
        proc.output = (self.folder / f"run-{n}.stdout", self.folder / f"run-{n}.stderr")
        self.procs.append(proc)
        return proc

    def wait_running(self, gw, proc):
        db = gw.dir / "bibliogate.db"
        wait_until(lambda: proc.poll() is not None or state(db, "run_pid") == proc.pid,
                   f"run (process {proc.pid}) to start")
        assert proc.poll() is None, self.output(proc)

    def stop(self, proc, timeout=WAIT) -> int:
        proc.terminate()            # SIGTERM: `run` finishes what it does and exits 0
        return proc.wait(timeout)

    @staticmethod
    def output(proc) -> str:
        return " / ".join(p.read_text(encoding="utf-8", errors="replace") for p in proc.output)

    def end_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def runs(tmp_path):
    r = Runs(tmp_path)
    yield r
    r.end_all()


@pytest.fixture
def quiet_logger():
    """In-process gateways log to the 'bibliogate' logger; leave it clean."""
    yield
    for handler in list(bg.log.handlers):
        bg.log.removeHandler(handler)
        handler.close()


# -- the task definition ---------------------------------------------------------

#: From Microsoft's Task Scheduler schema (taskschedulerschema-*-complextype):
#: the children each element may have. Lists are xs:sequence (order fixed);
#: sets are xs:all (any order).
TRIGGER_BASE = ["Enabled", "StartBoundary", "EndBoundary", "Repetition", "ExecutionTimeLimit"]
SCHEMA = {
    "Task": {"RegistrationInfo", "Triggers", "Settings", "Data", "Principals", "Actions"},
    "RegistrationInfo": {"URI", "SecurityDescriptor", "Source", "Date", "Author", "Version",
                         "Description", "Documentation"},
    "BootTrigger": TRIGGER_BASE + ["Delay"],
    "TimeTrigger": TRIGGER_BASE + ["RandomDelay"],
    "Repetition": {"Interval", "Duration", "StopAtDurationEnd"},
    "Principals": {"Principal"},
    "Principal": {"UserId", "LogonType", "GroupId", "DisplayName", "RunLevel",
                  "ProcessTokenSidType", "RequiredPrivileges"},
    "Settings": {"AllowStartOnDemand", "RestartOnFailure", "MultipleInstancesPolicy",
                 "DisallowStartIfOnBatteries", "StopIfGoingOnBatteries", "AllowHardTerminate",
                 "StartWhenAvailable", "NetworkProfileName", "RunOnlyIfNetworkAvailable",
                 "WakeToRun", "Enabled", "Hidden", "DeleteExpiredTaskAfter", "IdleSettings",
                 "NetworkSettings", "ExecutionTimeLimit", "Priority", "RunOnlyIfIdle",
                 "UseUnifiedSchedulingEngine", "DisallowStartOnRemoteAppSession"},
    "RestartOnFailure": {"Interval", "Count"},
    "Actions": {"Exec"},
    "Exec": {"Command", "Arguments", "WorkingDirectory"},
}
TRIGGERS = {"BootTrigger", "TimeTrigger", "LogonTrigger", "CalendarTrigger", "EventTrigger",
            "IdleTrigger", "RegistrationTrigger", "SessionStateChangeTrigger"}
ENUMS = {"LogonType": {"S4U", "Password", "InteractiveToken", "InteractiveTokenOrPassword"},
         "RunLevel": {"LeastPrivilege", "HighestAvailable"},
         "MultipleInstancesPolicy": {"Parallel", "Queue", "IgnoreNew", "StopExisting"}}
BOOLEANS = {"Enabled", "StopAtDurationEnd", "AllowStartOnDemand", "DisallowStartIfOnBatteries",
            "StopIfGoingOnBatteries", "AllowHardTerminate", "StartWhenAvailable",
            "RunOnlyIfNetworkAvailable", "WakeToRun", "Hidden"}


def duration_minutes(value: str) -> float:
    import re
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", value)
    assert m and value not in ("P", "PT"), f"{value!r} is not an xs:duration"
    d, h, mi, s = (int(x or 0) for x in m.groups())
    return d * 1440 + h * 60 + mi + s / 60


def check_schema(element: ET.Element) -> None:
    tag = element.tag.split("}")[1]
    assert element.tag == f"{{{bg.TASK_XMLNS}}}{tag}", f"{element.tag} is not in the task namespace"
    children = [c.tag.split("}")[1] for c in element]
    allowed = TRIGGERS if tag == "Triggers" else SCHEMA.get(tag)
    if allowed is None:
        assert not children, f"{tag} may not have children"
    elif isinstance(allowed, list):
        positions = [allowed.index(c) for c in children if c in allowed]
        assert set(children) <= set(allowed), f"{tag}: unknown {set(children) - set(allowed)}"
        assert positions == sorted(positions), f"{tag}: {children} out of schema order {allowed}"
    else:
        assert set(children) <= allowed, f"{tag}: unknown {set(children) - allowed}"
        assert len(children) == len(set(children)) or tag in ("Triggers", "Principals"), tag
    if tag in ENUMS:
        assert element.text in ENUMS[tag], f"{tag} = {element.text!r}"
    if tag in BOOLEANS:
        assert element.text in ("true", "false"), f"{tag} = {element.text!r}"
    for child in element:
        check_schema(child)


def plan_in(folder: Path, user=None, exe_names=("python.exe", "pythonw.exe")) -> "bg.TaskPlan":
    folder.mkdir(parents=True, exist_ok=True)
    bindir = folder / "Python39"
    bindir.mkdir(exist_ok=True)
    for name in exe_names:
        (bindir / name).write_bytes(b"")
    return bg.task_plan(folder / "bibliogate.ini", user, windows=True,
                        executable=str(bindir / "python.exe"))


def test_task_file_is_utf16_with_a_bom_and_says_so(tmp_path):
    data = bg.task_xml_bytes(bg.task_xml(plan_in(tmp_path)))
    assert data[:2] == b"\xff\xfe"
    text_ = data[2:].decode("utf-16-le")
    assert text_.startswith('<?xml version="1.0" encoding="UTF-16"?>\r\n<Task ')
    assert "\n" not in text_.replace("\r\n", "")
    root = parse_task(data)
    assert root.tag == f"{{{bg.TASK_XMLNS}}}Task" and root.get("version") in ("1.2", "1.4")


def test_task_definition_follows_the_task_scheduler_schema(tmp_path):
    for user in (None, r"SCHOOL\bibliogate"):
        root = parse_task(bg.task_xml_bytes(bg.task_xml(plan_in(tmp_path, user))))
        check_schema(root)
        interval = text(root, "t:Settings/t:RestartOnFailure/t:Interval")
        assert 1 <= duration_minutes(interval) <= 31 * 1440
        assert 1 <= int(text(root, "t:Settings/t:RestartOnFailure/t:Count")) <= 255
        assert 1 <= duration_minutes(text(root, "t:Triggers/t:TimeTrigger/t:Repetition/t:Interval"))
        assert duration_minutes(text(root, "t:Triggers/t:BootTrigger/t:Delay")) >= 0
        assert duration_minutes(text(root, "t:Settings/t:ExecutionTimeLimit")) == 0
        assert 0 <= int(text(root, "t:Settings/t:Priority")) <= 10
        principal = root.find("t:Principals/t:Principal", NS)
        assert root.find("t:Actions", NS).get("Context") == principal.get("id")


def test_task_starts_at_boot_and_again_whenever_run_has_stopped(tmp_path):
    plan = plan_in(tmp_path / "Library Server")
    root = parse_task(bg.task_xml_bytes(bg.task_xml(plan, now=1_800_000_000)))
    assert text(root, "t:Triggers/t:BootTrigger/t:Delay") == "PT1M"
    assert text(root, "t:Triggers/t:BootTrigger/t:Enabled") == "true"
    again = root.find("t:Triggers/t:TimeTrigger", NS)
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1_800_000_000))
    assert text(again, "t:StartBoundary") == start
    assert text(again, "t:Repetition/t:Interval") == "PT5M"
    assert again.find("t:Repetition/t:Duration", NS) is None          # indefinitely
    settings = root.find("t:Settings", NS)
    assert text(settings, "t:ExecutionTimeLimit") == "PT0S"
    assert text(settings, "t:MultipleInstancesPolicy") == "IgnoreNew"
    assert text(settings, "t:RestartOnFailure/t:Interval") == "PT1M"
    assert text(settings, "t:DisallowStartIfOnBatteries") == "false"
    assert text(settings, "t:StopIfGoingOnBatteries") == "false"
    assert text(settings, "t:Enabled") == "true"
    principal = root.find("t:Principals/t:Principal", NS)
    assert text(principal, "t:UserId") == "S-1-5-18"
    assert principal.find("t:LogonType", NS) is None       # the service account needs none
    run = root.find("t:Actions/t:Exec", NS)
    assert text(run, "t:Command") == str(tmp_path / "Library Server" / "Python39" / "pythonw.exe")
    ini = (tmp_path / "Library Server" / "bibliogate.ini").resolve()
    assert text(run, "t:Arguments") == f'"{SCRIPT.resolve()}" --config "{ini}" run'
    assert text(run, "t:WorkingDirectory") == str(ini.parent)


def test_python_exe_is_used_when_there_is_no_pythonw_beside_it(tmp_path):
    plan = plan_in(tmp_path, exe_names=("python.exe",))
    assert plan.program.name == "python.exe"
    assert bg.task_plan(tmp_path / "x.ini", windows=False, executable="/usr/bin/python3").program \
        == Path("/usr/bin/python3")


def test_a_named_account_runs_it_with_its_password(tmp_path):
    root = parse_task(bg.task_xml_bytes(bg.task_xml(plan_in(tmp_path, r"SCHOOL\bib-svc"))))
    principal = root.find("t:Principals/t:Principal", NS)
    assert text(principal, "t:UserId") == r"SCHOOL\bib-svc"
    assert text(principal, "t:LogonType") == "Password"       # whether logged on or not
    assert text(principal, "t:RunLevel") == "LeastPrivilege"
    for system in ("SYSTEM", "nt authority\\system", "S-1-5-18"):
        assert plan_in(tmp_path, system).as_system


def test_paths_with_xml_special_characters_survive(tmp_path):
    folder = tmp_path / "R&D <Library> 'x' \u00e9t\u00e9"
    plan = plan_in(folder)
    data = bg.task_xml_bytes(bg.task_xml(plan))
    run = parse_task(data).find("t:Actions/t:Exec", NS)
    assert text(run, "t:WorkingDirectory") == str(folder.resolve())
    assert str(folder.resolve() / "bibliogate.ini") in text(run, "t:Arguments")


def test_a_path_a_command_line_cannot_carry_is_refused(tmp_path):
    with pytest.raises(bg.UsageError, match="quote"):
        bg.task_plan(tmp_path / 'say "hi"' / "bibliogate.ini", windows=True,
                     executable=str(tmp_path / "python.exe"))


# -- install-task / uninstall-task on Windows, schtasks recorded ------------------------

def test_install_task_registers_the_definition_with_schtasks_and_starts_it(tmp_path, capsys):
    settings = settings_in(tmp_path / "gw")
    schtasks = Recorder()
    assert bg.install_task(settings, windows=True, runner=schtasks) == 0
    xml_path = settings.base / bg.TASK_XML_FILE
    assert schtasks.calls == [
        ["schtasks", "/Create", "/TN", "BiblioGate", "/XML", str(xml_path), "/F", "/RU", "SYSTEM"],
        ["schtasks", "/Run", "/TN", "BiblioGate"]]
    assert schtasks.xml[:2] == b"\xff\xfe" and schtasks.xml == xml_path.read_bytes()
    check_schema(parse_task(schtasks.xml))
    out = capsys.readouterr().out
    assert "Registered the scheduled task BiblioGate" in out and "running now" in out
    assert any("registered the scheduled task" in d for d in events(settings.database, "setup"))


def test_install_task_for_an_account_lets_schtasks_ask_its_password(tmp_path):
    settings = settings_in(tmp_path / "gw")
    schtasks = Recorder()
    bg.install_task(settings, user=r"SCHOOL\bib-svc", windows=True, runner=schtasks)
    assert schtasks.calls[0][-4:] == ["/RU", r"SCHOOL\bib-svc", "/RP", "*"]
    assert text(parse_task(schtasks.xml), "t:Principals/t:Principal/t:LogonType") == "Password"


def test_install_task_refused_by_windows_says_what_to_do(tmp_path):
    settings = settings_in(tmp_path / "gw")
    schtasks = Recorder(status=1)
    with pytest.raises(bg.BibliogateError, match="Run as administrator") as caught:
        bg.install_task(settings, windows=True, runner=schtasks)
    assert str(settings.base / bg.TASK_XML_FILE) in str(caught.value)
    assert len(schtasks.calls) == 1                 # nothing started


def test_install_task_leaves_a_running_gateway_alone(tmp_path, capsys):
    settings = settings_in(tmp_path / "gw")
    holder = bg.FileLock(bg.run_lock_path(settings.ini_path))
    assert holder.acquire()
    try:
        schtasks = Recorder()
        bg.install_task(settings, windows=True, runner=schtasks)
    finally:
        holder.release()
    assert [c[1] for c in schtasks.calls] == ["/Create"]         # no second `run`
    assert "Ctrl+C" in capsys.readouterr().out


def test_install_task_print_only_shows_the_definition_and_registers_nothing(tmp_path, capsys):
    settings = settings_in(tmp_path / "gw")
    schtasks = Recorder()
    bg.install_task(settings, print_only=True, windows=True, runner=schtasks)
    out = capsys.readouterr().out
    assert schtasks.calls == [] and not (settings.base / bg.TASK_XML_FILE).exists()
    check_schema(ET.fromstring(out.split("?>", 1)[1]))


def test_uninstall_task_stops_and_removes_the_task(tmp_path, capsys):
    settings = settings_in(tmp_path / "gw")
    schtasks = Recorder()
    assert bg.uninstall_task(settings, windows=True, runner=schtasks) == 0
    assert schtasks.calls == [["schtasks", "/End", "/TN", "BiblioGate"],
                              ["schtasks", "/Delete", "/TN", "BiblioGate", "/F"]]
    assert "Removed the scheduled task" in capsys.readouterr().out
    with pytest.raises(bg.BibliogateError, match="did not remove"):
        bg.uninstall_task(settings, windows=True, runner=lambda argv, quiet=False: 1)


# -- Linux: the systemd unit ---------------------------------------------------------

def unit_values(text_: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read_string(text_)
    return parser


def test_systemd_unit_restarts_run_when_it_fails(tmp_path):
    folder = tmp_path / "school library 100%"
    plan = bg.task_plan(folder / "bibliogate.ini", "bib", windows=False,
                        executable="/usr/bin/python3")
    unit = unit_values(bg.systemd_unit(plan))
    service = unit["Service"]
    assert service["Restart"] == "on-failure" and service["RestartSec"] == "60"
    assert service["User"] == "bib"
    assert service["WorkingDirectory"] == str(folder.resolve()).replace("%", "%%")
    words = [w.replace("%%", "%") for w in shlex.split(service["ExecStart"])]
    assert words == ["/usr/bin/python3", str(SCRIPT.resolve()), "--config",
                     str(folder.resolve() / "bibliogate.ini"), "run"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_install_task_and_uninstall_task_on_the_command_line(gateway):
    printed = gateway.cli("install-task", "--print", check=0).stdout
    if bg.IS_WINDOWS:       # never touch the real Task Scheduler of the computer under test
        assert printed.startswith('<?xml version="1.0" encoding="UTF-16"?>')
        return
    removed = gateway.cli("uninstall-task", check=0).stdout
    assert "Restart=on-failure" in printed and f"ExecStart={sys.executable}" in printed
    assert not (gateway.dir / "bibliogate.service").exists()            # --print writes nothing
    assert "systemctl disable --now bibliogate" in removed
    out = gateway.cli("install-task", check=0).stdout
    assert (gateway.dir / "bibliogate.service").read_text(encoding="utf-8") == printed
    assert "systemctl enable --now bibliogate" in out


# -- errors never pass silently --------------------------------------------------------

@pytest.fixture
def live(tmp_path, sink, quiet_logger):
    """An in-process Gateway on the sink, its log in tmp_path/gw/logs."""
    from conftest import write_ini
    ini = write_ini(tmp_path / "gw", sink)
    settings, _ = bg.ensure_layout(ini)
    bg.setup_logging(settings, console=False)
    return bg.Gateway(ini)


def failing_task(error):
    def task(gateway, now):
        raise error
    return task


def test_an_error_in_a_tick_is_logged_with_its_traceback_and_run_goes_on(live, sink):
    bg.enqueue_bytes(live.settings.spool, eml(subject="still goes"))
    live.tasks.append(failing_task(RuntimeError("the overdue job tripped")))
    guard = bg.RunGuard(live)
    guard.tick()
    assert [m.message["Subject"] for m in sink.wait_for(1)] == ["still goes"]
    assert not live.stop.is_set() and guard.exit_status == 0
    [detail] = events(live.settings.database, "error")
    assert "RuntimeError: the overdue job tripped" in detail and "line " in detail
    log = log_text(live.settings.base)
    assert "Traceback (most recent call last)" in log and "    raise error\n" in log


def test_the_same_error_tick_after_tick_ends_run_with_status_1(live):
    live.tasks.append(failing_task(OSError(5, "Access is denied")))
    guard = bg.RunGuard(live, limit=3)
    for _ in range(2):
        guard.tick()
    assert not live.stop.is_set()
    live.tasks.pop()
    guard.tick()                                # a clean tick: the count starts again
    assert guard.repeats == 0
    live.tasks.append(failing_task(OSError(5, "Access is denied")))
    for _ in range(3):
        guard.tick()
    assert live.stop.is_set() and guard.exit_status == 1
    [crash] = events(live.settings.database, "crash")
    assert "the same error 3 times in a row" in crash and "Access is denied" in crash
    assert len(events(live.settings.database, "error")) == 2     # once per streak, not per tick


def test_an_error_that_ends_a_thread_stops_run_and_is_logged(live):
    guard = bg.RunGuard(live).install()
    try:
        worker = threading.Thread(target=lambda: {}["missing"], name="page-server")
        worker.start()
        worker.join(WAIT)
    finally:
        guard.uninstall()
    assert threading.excepthook is not guard._thread_error and "tick" not in vars(live)
    assert live.stop.is_set() and guard.exit_status == 1
    [crash] = events(live.settings.database, "crash")
    assert "'page-server' stopped on an unexpected error: KeyError: 'missing'" in crash
    assert "Traceback" in log_text(live.settings.base)


@pytest.fixture
def keep_signals():
    saved = {n: signal.getsignal(getattr(signal, n)) for n in ("SIGINT", "SIGTERM", "SIGBREAK")
             if hasattr(signal, n)}
    yield
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)


def give_up_after(seconds):
    """A task that stops `run` after a while, so a test of `run` in-process ends
    even when what it waits for never happens."""
    deadline = time.monotonic() + seconds

    def task(gateway, now):
        if time.monotonic() > deadline:
            gateway.stop.set()
    return task


def test_run_exits_1_when_a_thread_dies(gateway, monkeypatch, keep_signals, quiet_logger):
    def start_a_doomed_thread(gw, now):
        if not getattr(gw, "started_it", False):
            gw.started_it = True
            threading.Thread(target=lambda: 1 / 0, name="doomed").start()
    monkeypatch.setattr(bg, "gateway_tasks", lambda: [start_a_doomed_thread, give_up_after(10)])
    hook = threading.excepthook
    assert bg.main(["--config", str(gateway.ini), "run"]) == 1
    db = gateway.dir / "bibliogate.db"
    assert any("ZeroDivisionError" in d for d in events(db, "crash"))
    assert events(db, "stop") == ["BiblioGate stopped"]
    assert threading.excepthook is hook


def test_run_exits_1_when_the_same_error_keeps_coming(gateway, monkeypatch, keep_signals,
                                                      quiet_logger):
    monkeypatch.setattr(bg, "TICK_ERROR_LIMIT", 2)
    monkeypatch.setattr(bg, "gateway_tasks", lambda: [give_up_after(10), failing_task(ValueError("bad row"))])
    assert bg.main(["--config", str(gateway.ini), "run"]) == 1
    db = gateway.dir / "bibliogate.db"
    [crash] = events(db, "crash")
    assert "the same error 2 times in a row: ValueError: bad row" in crash
    assert len(events(db, "error")) == 1                # the first one was survived


def test_run_exits_1_when_the_main_loop_itself_fails(gateway, monkeypatch, keep_signals,
                                                     quiet_logger):
    def broken(folder, now):
        raise PermissionError(13, "Access is denied", str(folder))
    monkeypatch.setattr(bg, "remove_stale_parts", broken)
    assert bg.main(["--config", str(gateway.ini), "run"]) == 1
    db = gateway.dir / "bibliogate.db"
    [crash] = events(db, "crash")
    assert crash.startswith("BiblioGate stopped on an unexpected error: PermissionError")
    assert "in broken" in crash and "Traceback" in log_text(gateway.dir)
    assert events(db, "stop") == ["BiblioGate stopped"]
    assert not bg.run_is_active(gateway.ini)            # the lock is let go


def test_console_log_keeps_every_line(tmp_path):
    stream = bg.ConsoleLog(tmp_path / "logs")
    print("first line", file=stream)
    stream.write("half a ")
    stream.write("line\nand the rest")
    stream.flush()
    lines = log_text(tmp_path).splitlines()
    assert [line.split(" CONSOLE ", 1)[1] for line in lines] == \
        ["first line", "half a line", "and the rest"]


# -- `run` as a real process -------------------------------------------------------------

def test_a_second_run_on_the_same_settings_exits_at_once_naming_the_first(gateway, runs):
    first = runs.start(gateway)
    runs.wait_running(gateway, first)
    second = gateway.cli("run", timeout=WAIT)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"BiblioGate is already running for {gateway.ini.resolve()} (process {first.pid}); "
        "a second one would do nothing."]
    assert runs.stop(first) == 0


def test_a_killed_run_never_blocks_the_next_start(gateway, runs, sink):
    first = runs.start(gateway)
    runs.wait_running(gateway, first)
    first.kill()                                    # kill -9 (TerminateProcess on Windows)
    first.wait(WAIT)
    assert bg.run_lock_path(gateway.ini).exists()   # the lock file stays; its lock does not
    gateway.cli("enqueue", "-", input=eml(subject="after the crash").decode(), check=0)
    second = runs.start(gateway)
    runs.wait_running(gateway, second)
    assert [m.message["Subject"] for m in sink.wait_for(1, timeout=WAIT)] == ["after the crash"]
    assert runs.stop(second) == 0


def test_a_hand_edit_of_the_ini_takes_effect_without_a_restart(gateway, runs, sink):
    gateway.configure(smtp__host="")
    proc = runs.start(gateway)
    runs.wait_running(gateway, proc)
    db = gateway.dir / "bibliogate.db"
    wait_until(lambda: state(db, "sender_state") == "stopped", "the sender to stop")
    gateway.cli("test", check=0)
    gateway.configure()                             # [smtp] host = the sink, as in Notepad
    assert len(sink.wait_for(1, timeout=WAIT)) == 1
    assert proc.poll() is None and state(db, "run_pid") == proc.pid      # the same process
    assert any("[smtp] host" in d for d in events(db, "settings"))
    assert "settings changed: [smtp] host" in log_text(gateway.dir)
    assert runs.stop(proc) == 0


def test_with_no_console_nothing_is_lost(gateway, runs, sink):
    gateway.cli("enqueue", "-", input=eml(subject="from the task").decode(), check=0)
    proc = runs.start(gateway, no_console=True)
    runs.wait_running(gateway, proc)
    sink.wait_for(1, timeout=WAIT)
    second = runs.start(gateway, no_console=True)
    assert second.wait(WAIT) == 1
    assert runs.stop(proc) == 0
    for p in (proc, second):                        # nothing went to a console...
        assert all(f.read_bytes() == b"" for f in p.output), runs.output(p)
    log = log_text(gateway.dir)                     # ...it is all in the log
    assert f"CONSOLE BiblioGate is already running for {gateway.ini.resolve()} " \
           f"(process {proc.pid})" in log
    assert "sent to patron@example.org" in log and "BiblioGate stopped" in log


def test_with_no_console_errors_before_the_settings_are_read_land_in_the_log(gateway):
    def no_console(*args):
        return subprocess.run([sys.executable, "-c", NO_CONSOLE, str(SCRIPT), *args],
                              capture_output=True, timeout=WAIT, cwd=str(gateway.cwd))
    bad = no_console("--config", str(gateway.ini), "run", "--colour")
    assert bad.returncode == 2 and bad.stdout == bad.stderr == b""
    assert "CONSOLE bibliogate.py: error: unrecognized arguments: --colour" in log_text(gateway.dir)
    gateway.configure(smtp__host="")
    refused = no_console(f"--config={gateway.ini}", "send")
    assert refused.returncode == 2 and refused.stdout == refused.stderr == b""
    log = log_text(gateway.dir)
    assert "CONSOLE The settings need attention before this can run:" in log
    assert "CONSOLE   bibliogate.ini [smtp] host = '': not set." in log
