"""How bibliogate.py is built: one place for the SQL of the retry state and
the sent ledger, one operations layer that the command line and the config
page share, and a page handler that keeps transport and security only."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import bibliogate as bg
from conftest import eml
from page_support import open_page  # noqa: F401

BANNER_RE = re.compile(r"^# (\w[\w -]*?) #{5,}$", re.M)


def sections(text: str) -> dict:
    """Section name -> its text, by the banners."""
    found = list(BANNER_RE.finditer(text))
    ends = [m.start() for m in found[1:]] + [len(text)]
    return {m.group(1): text[m.end():end] for m, end in zip(found, ends)}


def drop(folder: Path, name: str, data: bytes) -> None:
    path = folder / name
    path.write_bytes(data)
    stamp = time.time() - 60
    os.utime(path, (stamp, stamp))


def test_only_the_database_section_has_sql_for_the_retry_state_and_the_ledger():
    found = sections(Path(bg.__file__).read_text(encoding="utf-8"))
    assert {"Database", "Operations", "Config page", "Command line"} <= set(found)
    sql = re.compile(r"spool_state|FROM sent\b|INTO sent\b")
    assert [name for name, text in found.items() if sql.search(text)] == ["Database"]


def test_the_page_handler_routes_to_views_and_actions_of_the_module():
    handler = {name for name in vars(bg.PageHandler) if not name.startswith("__")}
    assert not handler & {"page_settings", "page_queue", "save_settings", "retry", "delete",
                          "send_now", "save_patron", "login", "logout", "health", "_retry"}
    for route in (*bg.GET_PAGES.values(), *bg.POST_ACTIONS.values()):
        assert getattr(bg, route.__name__) is route


def test_the_command_line_and_the_page_retry_and_delete_through_one_operation(
        open_page, monkeypatch, capsys):
    calls = []
    for name in ("retry_file", "delete_queued"):
        real = getattr(bg, name)
        monkeypatch.setattr(bg, name, lambda *a, _real=real, _name=name, **k:
                            calls.append((_name, k.get("by", ""))) or _real(*a, **k))
    page = open_page()
    spool, ini = page.spool, str(page.ini)
    for name in ("a.BAD", "b.BAD", "c.TMP", "d.TMP"):
        drop(spool, name, eml(subject=name))
    assert bg.main(["--config", ini, "retry", "a.BAD"]) == 0
    assert bg.main(["--config", ini, "delete", "c.TMP"]) == 0
    client = page.client()
    client.get("/queue")
    client.post("/queue/retry", {"token": client.token(), "file": "b.BAD"})
    client.post("/queue/delete", {"token": client.token(), "file": "d.TMP"})
    assert calls == [("retry_file", ""), ("delete_queued", ""),
                     ("retry_file", "config page"), ("delete_queued", "config page")]
    assert sorted(p.name for p in spool.glob("*.*") if p.suffix in (".TMP", ".BAD")) == \
        ["a.TMP", "b.TMP"]


def test_status_reports_every_field_of_status_fields(tmp_path, monkeypatch, capsys):
    ini = tmp_path / "bibliogate.ini"
    assert bg.main(["--config", str(ini), "status"]) in (0, 1)
    monkeypatch.setattr(bg, "STATUS_FIELDS", {"shelf_count": lambda settings, db: 42})
    settings, _ = bg.ensure_layout(ini)
    assert bg.status_info(settings)["shelf_count"] == 42
    capsys.readouterr()
    bg.main(["--config", str(ini), "status"])
    assert "shelf count: 42" in capsys.readouterr().out
