"""The config page with a long queue and many requests at once: the Queue page
opens only the files it lists, pages share a slow reading of the spool folder,
and only a few pages are built at a time so that the sender keeps its pace.
(How fast: bench/page_load.py. Here: what is done, never how long it takes.)"""

import os
import socket
import threading
import time

import bibliogate as bg
from conftest import eml
from page_support import open_page  # noqa: F401
from test_page import drop


def counting(monkeypatch, name):
    """Wrap bibliogate's function `name` (it still runs) and count its calls."""
    real, calls = getattr(bg, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(bg, name, wrapper)
    return calls


def later():
    """Let the folder's clock tick: its modification time may be coarse (a few ms)."""
    time.sleep(0.05)


def test_the_index_lists_bad_files_and_the_first_waiting_ones_in_order(tmp_path):
    for n, name in enumerate(["c.TMP", "a.tmp", "PRIORITY-test-1.TMP", "b.TMP", "x.BAD", "w.BAD",
                              "note.txt", ".a.TMP.part", "x.BAD-reason.txt"]):
        drop(tmp_path, name, b"To: a@example.org\n\nx\n", age=100 - n)
    bad, first, waiting = bg.SpoolIndex.read(tmp_path).head(2)
    assert [f.name for f in bad] == ["x.BAD", "w.BAD"]
    assert [f.name for f in first] == ["PRIORITY-test-1.TMP", "c.TMP"]   # as the sender takes them
    assert waiting == 4
    assert first[1].path == tmp_path / "c.TMP" and first[1].size == 21


def test_the_queue_page_opens_only_the_files_it_lists(open_page, monkeypatch):
    monkeypatch.setattr(bg, "QUEUE_SHOWN", 3)
    page = open_page()
    for n in range(40):
        drop(page.spool, f"m{n:02d}.TMP", eml(subject=f"letter {n}"), age=1000 - n)
    drop(page.spool, "z.BAD", b"junk")
    peeks = counting(monkeypatch, "peek")
    text = page.client().get("/queue").text
    assert "letter 0" in text and "letter 2" in text and "letter 3" not in text
    assert "And 37 more waiting messages" in text and "Waiting: 40 · .BAD: 1" in text
    assert sorted(args[0].name for args in peeks) == ["m00.TMP", "m01.TMP", "m02.TMP", "z.BAD"]


def settle(folder) -> None:
    """Date the folder back, as a folder not changed for a while: its time
    is then trusted (a reading just after a change is not, see RACY_SECONDS)."""
    old = time.time() - 60 - len(list(folder.iterdir()))      # a new time at each change
    os.utime(folder, (old, old))


def test_the_checks_and_the_pages_share_one_reading_until_the_folder_changes(open_page,
                                                                            monkeypatch):
    page = open_page()
    drop(page.spool, "one.TMP", eml())
    settle(page.spool)
    readings = counting(monkeypatch, "spool_names")
    c = page.client()
    for path in ("/health", "/", "/queue", "/health"):
        c.get(path)
    assert len(readings) == 1
    page.gateway.run_check(page.gateway.clock())             # the check uses that reading
    assert len(readings) == 1
    settle(page.spool)                                       # it sent one.TMP: a change
    before = len(readings)
    for path in ("/health", "/queue"):
        c.get(path)
    assert len(readings) == before + 1 and '"waiting": 0' in c.get("/health").text
    drop(page.spool, "two.TMP", eml())
    settle(page.spool)
    assert '"waiting": 1' in c.get("/health").text and len(readings) == before + 2
    drop(page.spool, "gone.BAD", b"junk")
    settle(page.spool)
    c.get("/queue")
    c.post("/queue/delete", {"token": c.token(), "file": "gone.BAD"})   # the page's own change
    assert '"bad": 0' in c.get("/health").text


def test_a_reading_just_after_a_change_is_not_trusted(open_page, monkeypatch):
    """A folder's clock may be coarse: a change in the same tick as the last
    reading would not show. A reading that close is repeated until the
    folder has been quiet for RACY_SECONDS."""
    page = open_page()
    drop(page.spool, "one.TMP", eml())
    os.utime(page.spool)                                     # changed just now
    readings = counting(monkeypatch, "spool_names")
    c = page.client()
    for _ in range(3):
        c.get("/health")
    assert len(readings) == 3
    settle(page.spool)
    for _ in range(3):
        c.get("/health")
    assert len(readings) == 4


def test_pages_are_built_a_few_at_a_time_and_forms_are_not_held_back(open_page):
    page = open_page()
    c = page.client()
    c.get("/queue")
    slots = page.server.workers
    for _ in range(bg.PAGE_WORKERS):       # every slot taken, as by pages being built
        assert slots.acquire(timeout=5)
    answered = []
    waiting = threading.Thread(target=lambda: answered.append(page.client().get("/queue").status))
    try:
        waiting.start()
        waiting.join(0.5)
        assert answered == []              # its turn has not come
        assert c.get("/style.css").status == 200
        r = c.post("/test", {"token": c.token()}, follow=False)
        assert r.status == 303 and len(list(page.spool.glob("PRIORITY-test-*.TMP"))) == 1
    finally:
        for _ in range(bg.PAGE_WORKERS):
            slots.release()
    waiting.join(10)
    assert answered == [200]


def test_many_browsers_connecting_at_once_are_let_in(open_page):
    """The connections wait in the operating system's queue until the page
    takes them; a short queue would drop the extra ones for a second or more."""
    page = open_page()
    server = bg.PageServer(page.gateway, "127.0.0.1", 0)   # listening, not yet taking any
    connections = []
    try:
        for _ in range(40):
            connections.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
    finally:
        for sock in connections:
            sock.close()
        server.server_close()
