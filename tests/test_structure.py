"""How bibliogate.py is built: the table of contents tells the truth, wiring
happens in one place, settings do not change once built, the command line
takes --config where a user puts it; one place for the SQL of the retry
state and the sent ledger, one operations layer that the command line and
the config page share, and a page handler that keeps transport and security
only."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import REPO, eml, write_ini
from page_support import open_page  # noqa: F401

SOURCE = (REPO / "bibliogate.py").read_text(encoding="utf-8")
BANNER_RE = re.compile(r"^# (\w[\w &-]*?) #{5,}$", re.MULTILINE)


def toc_sections() -> list[str]:
    """The section names the module docstring lists, in order."""
    names = []
    for line in bg.__doc__.splitlines():
        match = re.match(r"^    (\S.*?)(?:\s{2,}|$)", line)
        if match:
            names.append(match[1])
    return names


def test_the_table_of_contents_lists_every_banner_in_order():
    banners = BANNER_RE.findall(SOURCE)
    assert len(banners) >= 10
    assert toc_sections() == banners


def test_every_error_is_defined_under_errors():
    starts = {m[1]: m.start() for m in BANNER_RE.finditer(SOURCE)}
    errors, settings = starts["Errors"], starts["Settings"]
    tree = ast.parse(SOURCE)
    offsets = [0]
    for line in SOURCE.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    misplaced = [node.name for node in tree.body
                 if isinstance(node, ast.ClassDef) and isinstance(getattr(bg, node.name), type)
                 and issubclass(getattr(bg, node.name), bg.BibliogateError)
                 and not errors <= offsets[node.lineno - 1] < settings]
    assert misplaced == []


def test_no_section_adds_to_a_module_level_registry():
    """Registries are built in the wiring block; nothing appends to one at import."""
    tree = ast.parse(SOURCE)
    mutations = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = node.value.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and func.value.id.isupper()
                    and func.attr in ("append", "extend", "update", "insert", "setdefault")):
                mutations.append(f"line {node.lineno}: {func.value.id}.{func.attr}")
    assert mutations == []
    for name in ("TEMPLATE_FIELDS", "DEFAULT_TEMPLATES", "STATUS_FIELDS"):
        with pytest.raises(TypeError):
            getattr(bg, name)["new"] = None           # read-only mappings


def test_each_gateway_owns_its_tasks(tmp_path, sink):
    a = bg.Gateway(write_ini(tmp_path / "a", sink))
    b = bg.Gateway(write_ini(tmp_path / "b", sink))
    assert a.tasks is not b.tasks and len(a.tasks) == len(b.tasks)
    watchers = [t for t in a.tasks + b.tasks if isinstance(t, bg.ImportWatch)]
    assert len(watchers) == 2 and watchers[0] is not watchers[1]


def test_settings_do_not_change_once_built(tmp_path):
    settings, _ = bg.ensure_layout(write_ini(tmp_path, gateway__minutes_between_checks="x"))
    assert isinstance(settings.problems, tuple) and settings.problems
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.smtp_host = "elsewhere"              # type: ignore[misc]
    assert isinstance(settings.overdue, bg.OverdueSettings)
    with pytest.raises(TypeError):
        settings.raw[("smtp", "host")] = "elsewhere"  # type: ignore[index]


def test_parse_settings_reads_no_file(tmp_path):
    """The same text gives the same settings wherever the folder is, even one
    that does not exist: the checks on disk are a separate step."""
    nowhere = tmp_path / "not" / "there" / "bibliogate.ini"
    text = write_ini(tmp_path / "real", gateway__spool_folder="queue").read_text(encoding="utf-8")
    settings = bg.parse_settings(text, nowhere)
    assert settings.spool == nowhere.parent / "queue"
    assert not nowhere.parent.exists()
    assert not any("spool_folder" in p for p in settings.problems)
    assert any("is not a folder" in p for p in bg.layout_problems(settings))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "bibliogate.py"), *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", timeout=60, cwd=cwd,
                          env={"PYTHONIOENCODING": "utf-8", "PATH": ""})


def test_config_may_come_after_the_command(gateway):
    before = run_cli("--config", gateway.ini, "status", "--json", cwd=gateway.cwd)
    after = run_cli("status", "--json", "--config", gateway.ini, cwd=gateway.cwd)
    assert after.returncode == before.returncode and after.stderr == ""
    assert '"waiting": 0' in after.stdout


@pytest.mark.parametrize("command", [["status"], ["test", "--to", "a@example.org"], ["queue"]])
def test_a_mistyped_config_is_refused_not_created(tmp_path, command):
    typo = tmp_path / "bibliogat.ini"
    proc = run_cli(*command, "--config", typo, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"there is no settings file {typo}" in proc.stderr
    assert "run --config" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []       # nothing created


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
    ini = write_ini(tmp_path)
    monkeypatch.setattr(bg, "STATUS_FIELDS", {"shelf_count": lambda settings, db: 42})
    settings, _ = bg.ensure_layout(ini)
    assert bg.status_info(settings)["shelf_count"] == 42
    capsys.readouterr()
    bg.main(["--config", str(ini), "status"])
    assert "shelf count: 42" in capsys.readouterr().out
