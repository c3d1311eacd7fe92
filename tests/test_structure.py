"""How bibliogate.py is built: the table of contents tells the truth, wiring
happens in one place, settings do not change once built, and the command
line takes --config where a user puts it."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys

import pytest

import bibliogate as bg
from conftest import REPO, write_ini

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
