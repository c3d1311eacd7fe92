"""The config page with a long queue and many requests at once: the Queue page
opens only the files it lists, pages share a slow reading of the spool folder,
a page is built once while nothing it shows changes, and only a few pages are
built at a time so that the sender keeps its pace.
(How fast: bench/page_load.py. Here: what is done, never how long it takes.)"""

import os
import re
import socket
import threading
import time

import bibliogate as bg
from conftest import eml
from page_support import flashes, open_page  # noqa: F401
from test_page import add_patrons, drop


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
    server = bg.new_page_server(page.gateway, "127.0.0.1", 0)   # listening, not yet taking any
    connections = []
    try:
        for _ in range(40):
            connections.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
    finally:
        for sock in connections:
            sock.close()
        server.server_close()


# -- pages kept while what they show is the same ---------------------------------------------

def builds(monkeypatch) -> dict:
    """Count the pages built, by a function each view calls once per build."""
    return {path: counting(monkeypatch, name) for path, name in (
        ("/", "settings_facts"), ("/queue", "queue_rows"), ("/patrons", "find_patrons"),
        ("/log", "log_tail"))}


def tokens(text: str) -> set:
    return set(re.findall(r'name="token" value="([^"]*)"', text))


def own_token(page, client) -> str:
    return page.server.sessions[client.cookie.split("=", 1)[1]].token


def test_a_page_is_built_once_while_nothing_it_shows_changes(open_page, monkeypatch):
    page = open_page()
    add_patrons(page, ("p1", "Ann Reader", "ann@example.org", "", "7B", 1))
    drop(page.spool, "one.TMP", eml(subject="letter one"))
    settle(page.spool)
    ann, bob = page.client(), page.client()
    built = builds(monkeypatch)
    for c in (ann, bob, ann, bob):
        for path in ("/", "/queue", "/patrons", "/log"):
            text = c.get(path).text
            assert tokens(text) == {own_token(page, c)}, path     # its own form token, only
            assert getattr(bg, "TOKEN_MARK", "\0") not in text    # (older code: none)
        assert "letter one" in c.get("/queue").text and "Ann Reader" in c.get("/patrons").text
    assert {path: len(calls) for path, calls in built.items()} == dict.fromkeys(built, 1)


def test_a_kept_page_shows_each_change_at_once(open_page, monkeypatch):
    page = open_page()
    add_patrons(page, ("p1", "Ann Reader", "ann@example.org", "", "7B", 1))
    c = page.client()
    for path in ("/", "/queue", "/patrons", "/log"):
        c.get(path)
    # the database: a patron changed by another program
    db = page.db()
    with db:
        db.execute("UPDATE patrons SET name = 'Ann Newname' WHERE patron_id = 'p1'")
    db.close()
    assert "Ann Newname" in c.get("/patrons").text
    # the spool folder
    drop(page.spool, "new.TMP", eml(subject="a new letter"), age=30)
    settle(page.spool)
    assert "a new letter" in c.get("/queue").text and "Waiting: 1 ·" in c.get("/").text
    # an age shown: the gateway's clock moves on a minute
    assert re.search(r'<td class="nowrap">0 min</td>', c.get("/queue").text)
    page.clock.advance(60)
    assert re.search(r'<td class="nowrap">1 min</td>', c.get("/queue").text)
    # the ini, edited by hand
    text = page.ini.read_text(encoding="utf-8")
    page.ini.write_text(text.replace("name = Hill School Library", "name = Dale School Library"),
                        encoding="utf-8")
    assert 'value="Dale School Library"' in c.get("/").text
    # a check: the sender's state, the last and next check
    page.gateway.run_check(page.gateway.clock())
    last = bg.fmt_time(bg.get_state(page.gateway.journal.db, "last_check"))
    assert f"Last check: {last}" in c.get("/").text and "new.TMP" not in c.get("/queue").text
    # the day's log: a line more, then an earlier day's file
    log = page.gateway.settings.log_folder / f"bibliogate-{bg.local_day(page.clock()).isoformat()}.log"
    for line in ("a first line", "a line written just now"):
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        assert line in c.get("/log").text
    (log.parent / "bibliogate-2020-01-02.log").write_text("older\n", encoding="utf-8")
    assert "/log?day=2020-01-02" in c.get("/log").text


def test_a_message_shown_once_is_never_kept_nor_shown_to_another(open_page, monkeypatch):
    page = open_page()
    ann, bob = page.client(), page.client()
    for c in (ann, bob):
        c.get("/")
    r = ann.post("/test", {"token": ann.token()})             # follows to / with its messages
    assert any("Queued the test message" in f for f in flashes(r.text))
    assert not flashes(ann.get("/").text)                       # shown once
    assert not flashes(bob.get("/").text)
    assert tokens(bob.page) == {own_token(page, bob)}


def test_a_message_added_while_a_kept_page_is_built_stays_with_its_own_browser(open_page,
                                                                              monkeypatch):
    """Another tab of Ann's browser is refused a Save just while her Settings
    page is being built to be kept: the message is Ann's, for her next page,
    and never in the page kept for everyone (Bob's)."""
    page = open_page()
    ann, bob = page.client(), page.client()
    for c in (ann, bob):
        c.get("/queue")
    real = bg.page_html
    sids = []

    def page_html(server, session, *args, **kwargs):
        if not sids:            # the first page built: Ann's other tab is refused meanwhile
            sids.append(session.sid)
            server.sessions[session.sid].flash.append(("error", "Port: not a number (Ann's tab)."))
        return real(server, session, *args, **kwargs)

    monkeypatch.setattr(bg, "page_html", page_html)
    first = ann.get("/").text
    assert "Ann&#x27;s tab" not in first and "Ann's tab" not in first
    assert "Ann&#x27;s tab" not in bob.get("/").text and "Ann's tab" not in bob.page
    assert any("Ann" in f for f in flashes(ann.get("/").text))             # hers, once
    assert not flashes(ann.get("/").text)


def test_a_reading_begun_before_a_pages_own_change_is_not_kept(open_page, monkeypatch):
    """A page's Delete lands while another page is reading the spool: that
    older reading serves its own page but is not kept for the next ones."""
    page = open_page()
    drop(page.spool, "gone.BAD", b"junk")
    settle(page.spool)
    real = bg.read_spool_view

    def read_while_deleted(*args):
        view = real(*args)
        page.server.forget_spool_view()         # the Delete, as the reading ends
        return view

    monkeypatch.setattr(bg, "read_spool_view", read_while_deleted)
    assert len(page.server.spool_view().bad) == 1
    assert page.server._seen is None            # the next page reads again


def test_a_reading_that_shows_the_same_keeps_the_pages(open_page, monkeypatch):
    page = open_page()
    drop(page.spool, "one.TMP", eml(subject="letter one"))
    settle(page.spool)
    c = page.client()
    built, readings = counting(monkeypatch, "queue_rows"), counting(monkeypatch, "spool_names")
    c.get("/queue")
    os.utime(page.spool, (time.time() - 30, time.time() - 30))     # read again: the same files
    assert "letter one" in c.get("/queue").text
    assert len(readings) == 2 and len(built) == 1


def test_a_slow_reading_is_not_repeated_at_once_but_the_pages_own_change_shows(open_page,
                                                                               monkeypatch):
    monkeypatch.setattr(bg, "SLOW_READING_SECONDS", -1.0, raising=False)   # every one is slow
    monkeypatch.setattr(bg, "SPOOL_REST_SECONDS", 600.0, raising=False)
    monkeypatch.setattr(bg, "SPOOL_REST_FACTOR", 1e9, raising=False)
    page = open_page()
    drop(page.spool, "gone.BAD", b"junk")
    settle(page.spool)
    c = page.client()
    readings = counting(monkeypatch, "spool_names")
    assert '"bad": 1' in c.get("/health").text
    drop(page.spool, "two.TMP", eml())
    settle(page.spool)
    assert '"waiting": 0' in c.get("/health").text and len(readings) == 1    # resting
    c.get("/queue")
    c.post("/queue/delete", {"token": c.token(), "file": "gone.BAD"})        # read at once after
    assert '"bad": 0, ' in c.get("/health").text.replace("\n", " ")
    assert '"waiting": 1' in c.get("/health").text


def test_the_pages_own_retry_shows_though_the_folders_time_lags(open_page):
    """A network share's client may report a folder's old time for a few
    seconds after a change: the page after the librarian's own Retry lists
    the folder again all the same, and no longer offers the .BAD file."""
    page = open_page()
    old = time.time() - 3600
    drop(page.spool, "gone.BAD", eml(subject="again"))
    os.utime(page.spool / "gone.BAD", (old, old))
    os.utime(page.spool, (old, old))
    c = page.client()
    assert 'value="gone.BAD"' in c.get("/queue").text
    c.post("/queue/retry", {"token": c.token(), "file": "gone.BAD"}, follow=False)
    os.utime(page.spool, (old, old))          # the time the share's client still reports
    assert (page.spool / "gone.TMP").exists()
    text = c.get("/queue").text
    assert "gone.BAD is waiting again" in text
    assert 'value="gone.BAD"' not in text and "gone.TMP" in text
