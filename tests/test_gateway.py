"""The `run` loop: cadence, the daily log, settings picked up on the fly, first run."""

import datetime as dt
import json
import signal
import subprocess
import sys
import time

import bibliogate as bg
from conftest import REPO, Clock, eml, write_ini
from test_sender import drop


def day_at(day: dt.date, hour: int, minute: int = 0) -> float:
    return dt.datetime.combine(day, dt.time(hour, minute)).timestamp()


def test_throttle_sends_messages_per_check_every_interval(tmp_path, sink):
    clock = Clock()
    ini = write_ini(tmp_path, sink, gateway__messages_per_check=10, gateway__minutes_between_checks=3)
    gateway = bg.Gateway(ini, clock=clock)
    for n in range(25):
        drop(gateway.settings.spool, f"m{n:02}.TMP", eml(subject=f"m{n}"), age=1000 - n)
    sent_after, start = [], clock.now
    for seconds in (0, 60, 120, 180, 240, 360, 540):
        clock.now = start + seconds
        gateway.tick()
        sent_after.append(len(sink.messages))
    assert sent_after == [10, 10, 10, 20, 20, 25, 25]
    assert sink.sessions == 3                     # one connection per check
    assert [m.message["Subject"] for m in sink.messages] == [f"m{n}" for n in range(25)]


def test_invalid_settings_keep_the_sender_stopped_until_fixed(tmp_path, sink):
    clock = Clock()
    ini = write_ini(tmp_path, sink, gateway__from_address="")
    gateway = bg.Gateway(ini, clock=clock)
    drop(gateway.settings.spool, "wait.TMP", eml())
    gateway.tick()
    assert sink.messages == []
    assert gateway.sender_state[0] == "stopped" and "from_address" in gateway.sender_state[1]
    write_ini(tmp_path, sink)                     # fixed by hand, no restart
    clock.advance(1)
    gateway.tick()
    assert len(sink.messages) == 1 and gateway.sender_state[0] == "running"
    changes = gateway.journal.events(bg.local_day(clock()).isoformat(), ["settings"])
    assert "[gateway] from_address" in changes[-1]["detail"]


def test_daily_log_is_mailed_once_with_the_days_figures(tmp_path, make_sink):
    sink = make_sink(rcpt_replies={"gone@example.org": "550 5.1.1 No such user"})
    day = dt.date(2026, 3, 2)
    clock = Clock(day_at(day, 9))
    ini = write_ini(tmp_path, sink, library__name="Hill School Library")
    gateway = bg.Gateway(ini, clock=clock)
    spool = gateway.settings.spool
    drop(spool, "a.TMP", eml(subject="a"))
    drop(spool, "b.TMP", eml(subject="b"))
    drop(spool, "c.TMP", eml(to="gone@example.org", subject="lost"))
    gateway.tick()                               # 2 sent, 1 BAD
    assert len(sink.messages) == 2
    clock.now = day_at(day + dt.timedelta(days=1), 0, 1)
    gateway.tick()                               # queues the log, then the next check sends it
    queued = list(spool.glob("PRIORITY-daily-log-*.TMP"))
    clock.advance(gateway.settings.interval)
    gateway.tick()
    assert queued and not queued[0].exists()
    log = sink.messages[-1]
    assert log.rcpt_tos == ["library@school.example"]
    assert log.message["Subject"] == "BiblioGate daily log for 2026-03-02: 2 sent, 1 failed"
    body = log.message.get_content()
    assert "Sent:                        2" in body
    assert "c.TMP: renamed c.BAD: every recipient was refused" in body
    assert ".BAD files waiting for you:  1" in body
    for _ in range(3):                           # not twice the same day
        clock.advance(gateway.settings.interval)
        gateway.tick()
    assert sum("daily log" in m.message["Subject"] for m in sink.messages) == 1


def test_first_run_keeps_running_unconfigured_and_says_why(tmp_path):
    ini = tmp_path / "bibliogate.ini"
    proc = subprocess.Popen([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini), "run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        status = None
        while not (tmp_path / "bibliogate.db").exists() and time.monotonic() < deadline:
            time.sleep(0.1)               # let `run` be the one that writes the ini
        while time.monotonic() < deadline:
            r = subprocess.run([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini),
                                "status", "--json"], capture_output=True, text=True, timeout=30)
            if r.stdout.strip():
                status = json.loads(r.stdout)
                if status["running"]:
                    break
            time.sleep(0.2)
        assert status and status["running"] and status["pid"] == proc.pid
        assert status["sender"] == "stopped" and r.returncode == 1
        assert any("[smtp] host" in p for p in status["problems"])
        assert (tmp_path / "spool").is_dir() and (tmp_path / "bibliogate.db").is_file()
        r = subprocess.run([sys.executable, str(REPO / "bibliogate.py"), "--config", str(ini),
                            "test", "--to", "me@school.example"], capture_output=True, text=True)
        assert r.returncode == 0 and (tmp_path / "spool" / r.stdout.strip()).exists()
    finally:
        proc.send_signal(signal.SIGINT if sys.platform != "win32" else signal.CTRL_C_EVENT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "Wrote the default settings" in err and "not configured yet" in err
    assert "BiblioGate stopped" in err
    logs = list((tmp_path / "logs").glob("bibliogate-*.log"))
    assert logs and "[smtp] host" in logs[0].read_text(encoding="utf-8")


def test_a_long_day_is_cut_in_the_daily_log_with_a_pointer_to_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(bg, "DAILY_LOG_LINES", 5)
    clock = Clock(day_at(dt.date(2026, 3, 2), 9))
    gateway = bg.Gateway(write_ini(tmp_path), clock=clock)
    for n in range(20):
        gateway.journal.event("note", f"line {n}")
    text = bg.daily_summary(gateway, "2026-03-02")["log_lines"]
    shown = [line for line in text.splitlines() if line.startswith("  - ")]
    assert len(shown) == 5 and shown[-1].endswith("line 19")
    assert "logs/bibliogate-2026-03-02.log has them all" in text.splitlines()[0]


def test_days_bibliogate_was_not_running_each_get_their_log_saying_so(tmp_path, sink):
    """Off from Tuesday 10:02 to Friday 08:55: Friday's start mails the logs
    of Tuesday, Wednesday and Thursday, each saying when it was not running."""
    tue = dt.date(2026, 3, 3)
    clock = Clock(day_at(tue - dt.timedelta(days=1), 9))
    gateway = bg.Gateway(write_ini(tmp_path, sink), clock=clock)
    gateway.tick()                               # Monday: the first start
    clock.now = day_at(tue, 0, 1)
    gateway.tick()                               # Monday's log
    clock.now = day_at(tue, 10, 2)
    gateway.tick()
    gateway.journal.db.close()
    clock.now = day_at(tue + dt.timedelta(days=3), 8, 55)
    gateway = bg.Gateway(write_ini(tmp_path, sink), clock=clock)       # the next start, Friday
    gateway.tick()
    clock.advance(gateway.settings.interval)
    gateway.tick()
    logs = {m.message["Subject"].split(" for ")[1][:10]: m.message.get_content()
            for m in sink.messages if "daily log" in m.message["Subject"]}
    assert sorted(logs) == ["2026-03-02", "2026-03-03", "2026-03-04", "2026-03-05"]
    gap = "not running from Tue 2026-03-03 10:02 to Fri 2026-03-06 08:55"
    for day in ("2026-03-03", "2026-03-04", "2026-03-05"):
        assert gap in logs[day], logs[day]
    assert gap not in logs["2026-03-02"]


def test_after_a_long_absence_only_the_last_week_of_logs_is_mailed(tmp_path, sink):
    day = dt.date(2026, 3, 2)
    clock = Clock(day_at(day, 9))
    gateway = bg.Gateway(write_ini(tmp_path, sink), clock=clock)
    gateway.tick()
    clock.now = day_at(day + dt.timedelta(days=30), 9)
    gateway.tick()
    clock.advance(gateway.settings.interval)
    gateway.tick()
    logs = [m for m in sink.messages if "daily log" in m.message["Subject"]]
    assert len(logs) == bg.DAILY_LOG_DAYS_BACK
    skipped = gateway.journal.events(bg.local_day(clock()).isoformat(), ["daily_log"])
    assert any("are not mailed (more than 7 days ago)" in e["detail"] for e in skipped)
