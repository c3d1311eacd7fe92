"""bibliogate.py runs on a school's Windows server and on Linux, on Python 3.9
and later, with nothing but the standard library.

Most checks read the source with `ast`, so they hold on whichever system the
tests run: no import outside the standard library, no syntax or API newer than
3.9, no POSIX-only (or Windows-only) module or call without a branch for the
other system, no path written with "/" by hand, no text file opened without
an encoding. Each checker is first shown to catch a bad example. Then the
names of the files BiblioGate makes are checked against Windows' rules, and
the Windows lock functions run with msvcrt replaced by a stand-in.
"""

import ast
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import bibliogate as bg
from conftest import REPO, eml, write_ini

SOURCE = (REPO / "bibliogate.py").read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)


def where(node) -> str:
    return f"bibliogate.py line {node.lineno}: {ast.unparse(node)}"


# -- the checkers ---------------------------------------------------------------------

#: Top-level standard library modules of Python 3.9, for a Python without
#: sys.stdlib_module_names (3.9 itself).
STDLIB_39 = frozenset("""
__future__ _thread abc aifc argparse array ast asynchat asyncio asyncore atexit audioop base64
bdb binascii binhex bisect builtins bz2 calendar cgi cgitb chunk cmath cmd code codecs codeop
collections colorsys compileall concurrent configparser contextlib contextvars copy copyreg
cProfile crypt csv ctypes curses dataclasses datetime dbm decimal difflib dis distutils doctest
email encodings ensurepip enum errno faulthandler fcntl filecmp fileinput fnmatch formatter
fractions ftplib functools gc getopt getpass gettext glob graphlib grp gzip hashlib heapq hmac
html http imaplib imghdr imp importlib inspect io ipaddress itertools json keyword lib2to3
linecache locale logging lzma mailbox mailcap marshal math mimetypes mmap modulefinder msilib
msvcrt multiprocessing netrc nis nntplib ntpath numbers operator optparse os ossaudiodev parser
pathlib pdb pickle pickletools pipes pkgutil platform plistlib poplib posix posixpath pprint
profile pstats pty pwd py_compile pyclbr pydoc queue quopri random re readline reprlib
resource rlcompleter runpy sched secrets select selectors shelve shlex shutil signal site
smtpd smtplib sndhdr socket socketserver spwd sqlite3 sre_compile sre_constants sre_parse ssl
stat statistics string stringprep struct subprocess sunau symbol symtable sys sysconfig
syslog tabnanny tarfile telnetlib tempfile termios textwrap threading time timeit tkinter
token tokenize trace traceback tracemalloc tty turtle types typing unicodedata unittest
urllib uu uuid venv warnings wave weakref webbrowser winreg winsound wsgiref xdrlib xml
xmlrpc zipapp zipfile zipimport zlib zoneinfo""".split())
STDLIB = frozenset(getattr(sys, "stdlib_module_names", STDLIB_39))

#: Modules that exist on one system only.
ONE_SYSTEM_MODULES = frozenset({"fcntl", "pwd", "grp", "termios", "tty", "pty", "resource",
                                "syslog", "crypt", "posix", "spwd", "nis", "msvcrt", "winreg",
                                "winsound", "_winapi", "nt"})
#: Calls and constants that exist on one system only.
ONE_SYSTEM_NAMES = {
    "os": {"fork", "forkpty", "getuid", "geteuid", "getgid", "getegid", "setuid", "setgid",
           "setsid", "setpgrp", "getpgid", "killpg", "chown", "lchown", "fchown", "fchmod",
           "mkfifo", "nice", "getloadavg", "sysconf", "statvfs", "wait3", "wait4", "getgroups",
           "pipe2", "sync", "startfile", "O_BINARY"},
    "signal": {"SIGHUP", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD", "SIGPIPE",
               "SIGQUIT", "SIGSTOP", "SIGCONT", "alarm", "setitimer", "pause", "siginterrupt",
               "pthread_kill", "SIGBREAK", "CTRL_C_EVENT", "CTRL_BREAK_EVENT"},
}
#: Python APIs newer than 3.9: (module, name).
NEWER_THAN_39 = frozenset({
    ("itertools", "pairwise"), ("contextlib", "aclosing"), ("contextlib", "chdir"),
    ("asyncio", "TaskGroup"), ("asyncio", "timeout"), ("enum", "StrEnum"),
    ("hashlib", "file_digest"), ("logging", "getLevelNamesMapping"),
    ("sys", "stdlib_module_names"), ("sys", "orig_argv"), ("datetime", "UTC"),
    ("typing", "Self"), ("typing", "TypeAlias"), ("typing", "ParamSpec"),
    ("typing", "TypeGuard"), ("typing", "Never"), ("typing", "assert_never"),
    ("builtins", "aiter"), ("builtins", "anext"), ("builtins", "EncodingWarning"),
    ("builtins", "ExceptionGroup"), ("builtins", "BaseExceptionGroup")})
NEWER_MODULES = frozenset({"tomllib"})


def module_aliases(tree) -> dict:
    """Local name -> module, from `import x` and `import x as y`."""
    aliases = {"aiter": "builtins", "anext": "builtins"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    return aliases


def imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node, node.module


def outside_stdlib(tree) -> list:
    return [where(node) for node, name in imported_modules(tree)
            if name.split(".")[0] not in STDLIB or name.split(".")[0] in NEWER_MODULES]


def newer_than_39(tree) -> list:
    aliases, found = module_aliases(tree), []
    for node in ast.walk(tree):
        pair = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pair = (aliases.get(node.value.id, node.value.id), node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [where(node) for a in node.names if (node.module, a.name) in NEWER_THAN_39]
        elif isinstance(node, ast.Name) and node.id in ("aiter", "anext", "ExceptionGroup",
                                                        "BaseExceptionGroup", "EncodingWarning"):
            pair = ("builtins", node.id)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            words = {k.arg for k in node.keywords}
            if (name == "zip" and "strict" in words) or \
                    (name.endswith("dataclass") and words & {"slots", "kw_only", "match_args"}):
                found.append(where(node))
        if pair in NEWER_THAN_39:
            found.append(where(node))
    return found


def is_platform_test(test) -> bool:
    text = ast.unparse(test)
    return any(word in text for word in ("os.name", "sys.platform", "IS_WINDOWS",
                                         "hasattr(os,", "hasattr(signal,"))


def one_system_only(tree) -> list:
    """Uses of one system's modules or calls that are not inside an
    `if os.name == "nt": ... else: ...` with both sides (or the same with
    sys.platform, IS_WINDOWS or hasattr(os, ...) as the test)."""
    found = []

    def visit(node, guarded):
        if isinstance(node, ast.If) and is_platform_test(node.test) and node.orelse:
            for child in node.body + node.orelse:
                visit(child, True)
            return
        if isinstance(node, ast.IfExp) and is_platform_test(node.test):
            visit(node.body, True)
            visit(node.orelse, True)
            return
        if not guarded:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                if any(n.split(".")[0] in ONE_SYSTEM_MODULES for n in names):
                    found.append(where(node))
                if isinstance(node, ast.ImportFrom) and \
                        any(a.name in ONE_SYSTEM_NAMES.get(node.module, ()) for a in node.names):
                    found.append(where(node))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.attr in ONE_SYSTEM_NAMES.get(node.value.id, ()):
                found.append(where(node))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def _has_slash(node) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return "/" in node.value
    if isinstance(node, ast.JoinedStr):
        return any(_has_slash(v) for v in node.values)
    return False


def slash_paths(tree) -> list:
    """Paths written with "/" inside a string: open("logs/x"), Path("a/b"),
    folder / "a/b", os.path.join("a/b", ...), .joinpath / .with_name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                (_has_slash(node.left) or _has_slash(node.right)):
            found.append(where(node))
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in ("open", "Path", "PurePath", "os.path.join", "io.open") or \
                    name.endswith((".joinpath", ".with_name")):
                if any(_has_slash(a) for a in node.args):
                    found.append(where(node))
    return found


MODE_RE = re.compile(r"^[rwaxbt+]+$")


def _keyword(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def open_without_encoding(tree) -> list:
    """Text-mode opens that leave the encoding to the system's locale (a
    different one on a Windows server than on Linux)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        has_encoding = _keyword(node, "encoding") is not None
        if name in ("open", "io.open", "os.fdopen"):
            mode = node.args[1] if len(node.args) > 1 else _keyword(node, "mode")
            has_encoding = has_encoding or len(node.args) >= 4
        elif name.endswith(".open") and (not node.args or (
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and MODE_RE.match(node.args[0].value))):          # Path.open(mode)
            mode = node.args[0] if node.args else _keyword(node, "mode")
            has_encoding = has_encoding or len(node.args) >= 3
        elif name.endswith(".read_text"):
            mode, has_encoding = None, has_encoding or len(node.args) >= 1
        elif name.endswith(".write_text"):
            mode, has_encoding = None, has_encoding or len(node.args) >= 2
        else:
            continue
        binary = isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "b" in mode.value
        if not binary and not has_encoding:
            found.append(where(node))
    return found


@pytest.mark.parametrize("check, bad, good", [
    (outside_stdlib, ["import requests", "from yaml import safe_load", "import tomllib"],
     ["import json\nfrom email.message import EmailMessage\nfrom . import x"]),
    (newer_than_39, ["import itertools\nitertools.pairwise(x)", "zip(a, b, strict=True)",
                     "import datetime as dt\ndt.UTC", "from typing import Self",
                     "@dataclasses.dataclass(slots=True)\nclass A: pass", "anext(it)"],
     ["import itertools\nitertools.chain(x)\nzip(a, b)\nimport datetime as dt\n"
      "dt.timezone.utc\n@dataclasses.dataclass(frozen=True)\nclass A: pass"]),
    (one_system_only, ["import fcntl", "os.fork()", "signal.SIGHUP", "os.getuid()", "import pwd",
                       "from os import setsid", "if os.name == 'nt':\n    os.killpg(1, 2)",
                       "if x:\n    os.startfile(p)\nelse:\n    pass",
                       "if hasattr(os, 'startfile'):\n    os.startfile(p)"],
     ["if os.name == 'nt':\n    import msvcrt\nelse:\n    import fcntl\n    os.getuid()",
      "x = signal.SIGHUP if sys.platform != 'win32' else signal.SIGBREAK",
      "if sys.platform.startswith('win'):\n    os.startfile(p)\nelse:\n    os.fork()",
      "if hasattr(os, 'startfile'):\n    os.startfile(p)\nelse:\n    webbrowser.open(p)"]),
    (slash_paths, ["open('logs/a.log')", "Path('spool/x')", "folder / 'a/b'",
                   "folder / f'{day}/x.log'", "os.path.join('a/b', c)", "p.with_name('x/y')"],
     ["open(folder / 'a.log')\nPath(__file__).with_name('bibliogate.ini')\n"
      "webbrowser.open('http://127.0.0.1:8025/')\nx = 'a/b'\nfolder / f'{day}.log'"]),
    (open_without_encoding, ["open(p)", "open(p, 'w')", "open(p, mode='a')", "p.open('r')",
                             "p.open()", "p.read_text()", "p.write_text(t)", "io.open(p, 'r')"],
     ["open(p, 'rb')\nopen(p, 'w', encoding='utf-8')\np.open('rb')\n"
      "p.read_text(encoding='utf-8')\np.write_text(t, encoding='utf-8')\n"
      "webbrowser.open(url)\nos.open(p, os.O_RDONLY)"]),
])
def test_each_checker_catches_what_it_is_for(check, bad, good):
    for snippet in bad:
        assert check(ast.parse(snippet)), f"{check.__name__} missed: {snippet!r}"
    for snippet in good:
        assert check(ast.parse(snippet)) == [], snippet


# -- bibliogate.py itself ---------------------------------------------------------------

def test_no_syntax_newer_than_python_3_9():
    ast.parse(SOURCE, feature_version=(3, 9))


def test_no_api_newer_than_python_3_9():
    assert newer_than_39(TREE) == []


def test_only_the_standard_library_is_imported():
    assert outside_stdlib(TREE) == []


def test_one_system_calls_have_a_branch_for_the_other():
    assert one_system_only(TREE) == []


def test_paths_are_joined_by_pathlib_not_by_hand():
    assert slash_paths(TREE) == []


def test_every_text_file_is_opened_with_an_encoding():
    assert open_without_encoding(TREE) == []


def python_39():
    """A Python 3.9 interpreter on this machine, if there is one."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = ["python3.9", *map(str, sorted(root.glob("versions/3.9*/bin/python3.9")))]
    if os.name == "nt":
        candidates = ["py -3.9"]
    for candidate in candidates:
        try:
            out = subprocess.run([*candidate.split(), "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 9)":
            return candidate.split()
    return None


def test_it_runs_on_python_3_9(tmp_path):
    python = python_39()
    if python is None:
        pytest.skip("no Python 3.9 on this machine")
    ini = write_ini(tmp_path / "gw")
    for args in (["status", "--json"], ["install-task", "--print"], ["queue"]):
        out = subprocess.run([*python, str(REPO / "bibliogate.py"), "--config", str(ini), *args],
                             capture_output=True, text=True, encoding="utf-8", timeout=60)
        assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr
    windows_task = ("import sys, bibliogate as bg; plan = bg.task_plan(sys.argv[1], windows=True); "
                    "sys.stdout.write(bg.task_xml(plan))")
    out = subprocess.run([*python, "-c", windows_task, str(ini)], cwd=str(REPO),
                         capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert out.returncode == 0 and "<ExecutionTimeLimit>PT0S</ExecutionTimeLimit>" in out.stdout, \
        out.stderr


# -- names and files on Windows ---------------------------------------------------------

RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)),
            *(f"LPT{n}" for n in range(1, 10))}


def windows_name_problem(name):
    if any(c in name for c in '<>:"/\\|?*') or any(ord(c) < 32 for c in name):
        return "a character Windows forbids"
    if name.endswith((".", " ")):
        return "ends with a dot or space"
    if name.split(".")[0].upper() in RESERVED:
        return "a reserved device name"
    if len(name) > 255:
        return "longer than 255 characters"
    return None


def test_windows_name_problem_knows_the_rules():
    for bad in ("a:b.TMP", "x?.BAD", "end.", "end ", "CON.TMP", "nul.txt", "com1", "x" * 256):
        assert windows_name_problem(bad), bad
    assert windows_name_problem("PRIORITY-test-20260101-063000-0a1b2c3d.TMP") is None


def test_every_name_the_gateway_makes_is_valid_on_windows(tmp_path, sink):
    settings, _ = bg.ensure_layout(write_ini(tmp_path / "gw", sink))
    spool = settings.spool
    names = set()
    for now in (0, 1_000_000_000, time.time(), 4_102_444_799):     # 1970 .. 2099-12-31
        for priority in (False, True):
            for label in ("msg", "test", "daily-log", "overdue-warning", "letter-overdue_first"):
                names.add(bg.new_name(now, priority, label))
    names.add(bg.enqueue_bytes(spool, eml()).name)
    # a foreign program's files, made .BAD, three times under one name
    for foreign in ("LETTER 0001.TMP", "Rappel \u00e9t\u00e9.tmp", "x" * 200 + ".Tmp"):
        for _ in range(3):
            (spool / foreign).write_bytes(b"not mail")
            bad = bg.mark_bad(spool / foreign, "not an email message", time.time())
            names |= {bad.name, bg.reason_path(bad).name}
        names.add(bg.retry_bad(spool, bad.name).name)
    names.add(bg.free_name(spool, "LETTER 0001", bg.BAD_EXT).name)
    # the log, the console log, locks, the task files
    bg.setup_logging(settings, console=False)
    try:
        bg.Journal(settings.database).event("setup", "a line for the log")
    finally:
        for handler in list(bg.log.handlers):
            bg.log.removeHandler(handler)
            handler.close()
    bg.ConsoleLog(settings.log_folder).write("a console line\n")
    names |= {p.name for p in settings.log_folder.iterdir()}
    names |= {bg.run_lock_path(settings.ini_path).name, ".bibliogate-sender.lock",
              bg.TASK_XML_FILE, f"{bg.TASK_NAME.lower()}.service",
              "." + bg.new_name(time.time()) + bg.PART_SUFFIX}
    names |= {p.name for p in spool.iterdir()} | {p.name for p in settings.base.iterdir()}
    problems = {n: windows_name_problem(n) for n in names if windows_name_problem(n)}
    assert problems == {}
    assert any(n.startswith("bibliogate-") and n.endswith(".log") for n in names)


def test_the_spool_takes_tmp_in_any_case(tmp_path, sink):
    settings, _ = bg.ensure_layout(write_ini(tmp_path / "gw", sink))
    for name in ("upper.TMP", "lower.tmp", "mixed.Tmp"):
        path = settings.spool / name
        path.write_bytes(eml(subject=name))
        os.utime(path, (time.time() - 60,) * 2)
    (settings.spool / "other.txt").write_bytes(eml(subject="other.txt"))
    result = bg.Sender(settings, bg.Journal(settings.database)).check()
    assert result.sent == 3
    assert sorted(m.message["Subject"] for m in sink.messages) == \
        ["lower.tmp", "mixed.Tmp", "upper.TMP"]
    assert [p.name for p in settings.spool.iterdir() if not p.name.startswith(".")] == ["other.txt"]


# -- the Windows locks, with msvcrt replaced by a stand-in -----------------------------

class FakeMsvcrt(types.ModuleType):
    """msvcrt.locking as Windows does it: a byte range at the file position,
    held by one handle; LK_NBLCK fails at once (OSError) if another holds it."""

    LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4

    def __init__(self):
        super().__init__("msvcrt")
        self.calls, self.held = [], {}

    def locking(self, fd, mode, nbytes):
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        self.calls.append((mode, offset, nbytes))
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, offset, nbytes)
        if mode == self.LK_NBLCK:
            if key in self.held:
                raise PermissionError(13, "Permission denied")
            self.held[key] = fd
        elif mode == self.LK_UNLCK:
            if self.held.get(key) != fd:
                raise PermissionError(13, "Permission denied")
            del self.held[key]
        else:
            raise AssertionError(f"unexpected locking mode {mode}")


@pytest.fixture
def windows_locks(monkeypatch):
    """_try_lock and _unlock from the Windows branch of bibliogate.py,
    compiled against a FakeMsvcrt."""
    branch = next(node for node in TREE.body if isinstance(node, ast.If)
                  and ast.unparse(node.test) in ("os.name == 'nt'", "sys.platform == 'win32'")
                  and any(getattr(n, "name", "") == "_try_lock" for n in node.body))
    fake = FakeMsvcrt()
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    namespace = {"os": os}
    exec(compile(ast.Module(body=branch.body, type_ignores=[]), "bibliogate.py", "exec"), namespace)
    return fake, namespace["_try_lock"], namespace["_unlock"]


def test_windows_lock_takes_the_first_byte_whatever_the_file_position(tmp_path, windows_locks):
    fake, try_lock, unlock = windows_locks
    path = tmp_path / "bibliogate.ini.lock"
    one = os.open(path, os.O_RDWR | os.O_CREAT)
    two = os.open(path, os.O_RDWR)
    try:
        os.write(one, b"1234")                      # the position moves on
        assert try_lock(one) is True
        assert try_lock(two) is False               # held: refused at once, never waits
        os.lseek(one, 3, os.SEEK_SET)
        unlock(one)
        assert try_lock(two) is True
        assert fake.calls == [(fake.LK_NBLCK, 0, 1), (fake.LK_NBLCK, 0, 1),
                              (fake.LK_UNLCK, 0, 1), (fake.LK_NBLCK, 0, 1)]
    finally:
        os.close(one)
        os.close(two)


def test_file_lock_and_run_detection_with_windows_locks(tmp_path, windows_locks, monkeypatch):
    fake, try_lock, unlock = windows_locks
    monkeypatch.setattr(bg, "_try_lock", try_lock)
    monkeypatch.setattr(bg, "_unlock", unlock)
    ini = tmp_path / "bibliogate.ini"
    running = bg.FileLock(bg.run_lock_path(ini))
    assert running.acquire()
    assert bg.run_is_active(ini)
    assert not bg.FileLock(bg.run_lock_path(ini)).acquire()
    running.release()
    assert not bg.run_is_active(ini)
    assert fake.held == {}
