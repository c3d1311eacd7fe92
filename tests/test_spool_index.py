"""The spool index: what `run` knows of the waiting files between checks, and
the readings of the folder that `status`, `queue` and the pages make. What is
read is counted here; how long it takes is in bench/drain.py."""

import io
import json
import os
import time

import bibliogate as bg
from conftest import eml
from test_page_load import counting, settle
from test_sender import drop


def test_only_names_not_seen_before_are_looked_at(tmp_path, monkeypatch):
    for n in range(30):
        drop(tmp_path, f"m{n:02d}.TMP", eml(), age=600 - n)
    settle(tmp_path)
    looks = counting(monkeypatch, "look_at")
    index = bg.SpoolIndex.read(tmp_path)        # the first reading: one pass of scandir
    assert looks == [] and len(index.waiting) == 30 and index.readings == 1
    index.refresh()
    assert looks == [] and index.readings == 1   # the folder did not change: nothing read
    (tmp_path / "m00.TMP").unlink()
    drop(tmp_path, "new.TMP", eml(), age=10)
    settle(tmp_path)
    index.refresh()
    assert index.readings == 2
    assert [args[1] for args in looks] == ["new.TMP"]       # only the new name
    assert [f.name for f in index.in_order()][-2:] == ["m29.TMP", "new.TMP"]
    assert "m00.TMP" not in index and len(index.waiting) == 30


def test_the_order_is_the_sending_order_as_files_come_and_go(tmp_path):
    index = bg.SpoolIndex(tmp_path)
    expected = {}
    for round_ in range(5):
        for n in range(20):
            name = f"r{round_}-{n:02d}.TMP"
            age = 1000 - round_ * 7 - n * 13 % 50
            drop(tmp_path, name, eml(), age=age)
            expected[name] = (tmp_path / name).stat().st_mtime
        for name in sorted(expected)[::3]:
            (tmp_path / name).unlink()
            del expected[name]
        index.refresh()
        got = [f.name for f in index.in_order()]
        assert got == sorted(expected, key=lambda name: bg.queue_order(name, expected[name]))
    drop(tmp_path, "PRIORITY-test-1.TMP", eml(), age=5)
    index.refresh()
    assert next(index.in_order()).name == "PRIORITY-test-1.TMP"


def test_the_first_page_of_a_fresh_reading_is_the_head_of_the_sending_order(tmp_path):
    """`queue` takes its first page from a fresh reading without sorting
    every file; it must still be exactly the first of the sending order."""
    for n in range(60):
        drop(tmp_path, f"m{n:02d}.TMP", eml(), age=1000 - n * 37 % 101)
    drop(tmp_path, "PRIORITY-test-1.TMP", eml(), age=3)
    drop(tmp_path, "old.BAD", eml(), age=5000)
    whole = [f.name for f in bg.SpoolIndex.read(tmp_path).in_order()]
    assert whole[0] == "PRIORITY-test-1.TMP" and len(whole) == 61
    for limit in (1, 7, 50, 61, 80):
        bad, first, count = bg.SpoolIndex.read(tmp_path).head(limit)
        assert [f.name for f in first] == whole[:limit]
        assert [f.name for f in bad] == ["old.BAD"] and count == 61
    index = bg.SpoolIndex.read(tmp_path)
    index.head(5)
    assert [f.name for f in index.in_order()] == whole     # still whole after a head


def test_a_file_still_being_written_is_looked_at_again_until_it_is_quiet(tmp_path):
    path = drop(tmp_path, "slow.TMP", b"To: a@example.org\n", age=0)
    index = bg.SpoolIndex.read(tmp_path)
    settled = time.time() - bg.STABLE_SECONDS
    assert bg.pick_batch(index.in_order(), 10, time.time(), {}, settled) == []
    path.write_bytes(eml())
    os.utime(path, (time.time() - 60,) * 2)           # now complete, and quiet
    index.refresh()                                   # the folder itself did not change
    [f] = bg.pick_batch(index.in_order(), 10, time.time(), {}, settled)
    assert f.name == "slow.TMP" and f.size == len(eml())


def test_status_counts_the_names_without_looking_at_any_file(gateway, monkeypatch):
    bg.ensure_layout(gateway.ini)
    for n in range(5):
        drop(gateway.spool, f"m{n}.TMP", eml())
    drop(gateway.spool, "x.BAD", b"junk")
    looks = counting(monkeypatch, "look_at")
    opened = counting(monkeypatch, "peek")
    settings = bg.load_settings(gateway.ini)
    info = bg.status_info(settings)
    assert (info["waiting"], info["bad"]) == (5, 1)
    assert looks == [] and opened == []


def test_queue_prints_a_page_and_says_how_many_more(gateway):
    bg.ensure_layout(gateway.ini)
    for n in range(bg.QUEUE_PAGE + 7):
        drop(gateway.spool, f"m{n:03d}.TMP", eml(subject=f"letter {n}"), age=600 - n)
    drop(gateway.spool, "x.BAD", b"junk")
    out = gateway.cli("queue", check=0).stdout
    assert out.splitlines()[0].startswith("x.BAD")
    assert "'letter 0'" in out and f"'letter {bg.QUEUE_PAGE - 2}'" in out
    assert f"'letter {bg.QUEUE_PAGE - 1}'" not in out
    assert out.rstrip().endswith("… 8 more; `queue --all` lists them all.")
    every = gateway.cli("queue", "--all", check=0).stdout
    assert f"'letter {bg.QUEUE_PAGE + 6}'" in every and "more;" not in every
    rows = json.loads(gateway.cli("queue", "--json", check=0).stdout)
    assert len(rows) == bg.QUEUE_PAGE + 8 and rows[0]["file"] == "x.BAD"
    assert [r["subject"] for r in rows[1:3]] == ["letter 0", "letter 1"]


def test_queue_json_is_written_as_it_goes():
    out = io.StringIO()
    seen = []

    def rows():
        for n in range(3):
            seen.append(out.getvalue().count("{"))    # what was written before this row
            yield {"n": n}

    bg.write_json_list(out, rows())
    assert seen == [0, 1, 2] and json.loads(out.getvalue()) == [{"n": 0}, {"n": 1}, {"n": 2}]
    out = io.StringIO()
    bg.write_json_list(out, iter(()))
    assert json.loads(out.getvalue()) == []
