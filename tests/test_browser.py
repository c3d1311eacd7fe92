"""The config page in a real browser: Debian's Chromium, driven by Playwright.

Skipped, with the reason, when Playwright or Chromium is missing; with the
environment variable CI=true it fails instead, so CI cannot skip it quietly.
Takes screenshots of the Settings and Queue pages; with the environment
variable BIBLIOGATE_SCREENSHOTS=docs they replace docs/settings.png and
docs/queue.png, the pictures in the README."""

import os
import time

import pytest

from conftest import REPO, eml
from page_support import SECRET, open_page  # noqa: F401  (a fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = REPO / "docs"


def shot_folder(tmp_path):
    """docs/ when asked for (to refresh the README's pictures), else a temp folder."""
    return DOCS if os.environ.get("BIBLIOGATE_SCREENSHOTS") == "docs" else tmp_path


def missing_browser() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"there is no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    return ""


@pytest.fixture
def browser():
    why = missing_browser()
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"the browser test must run in CI, but {why}")
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def stage_queue(page):
    """A queue worth a picture: two letters waiting, one .BAD with its reason."""
    for name, subject, age in (("letter-0001.TMP", "Overdue: The Hobbit", 400),
                               ("letter-0002.TMP", "Reminder: Matilda", 90)):
        path = page.spool / name
        path.write_bytes(eml(to="pat.reader@example.org", subject=subject))
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
    bad = page.spool / "letter-0000.BAD"
    bad.write_bytes(eml(to="gone@example.org", subject="Overdue: Charlotte's Web"))
    (page.spool / "letter-0000.BAD-reason.txt").write_text(
        "2026-03-02 06:31:07 every recipient was refused: gone@example.org: "
        "550 5.1.1 No such user\n", encoding="utf-8")


def test_settings_test_queue_and_patron_in_a_browser(open_page, browser, tmp_path):
    page = open_page()
    db = page.db()
    with db:
        db.execute("INSERT INTO patrons (patron_id, name, email, guardian_email, grp, "
                   "auto_overdue) VALUES ('p7', 'Bob Noemail', '', '', '7B', 0)")
    db.close()
    url = f"http://127.0.0.1:{page.port}"
    tab = browser.new_page(viewport={"width": 1100, "height": 900})
    complaints = []
    tab.on("console", lambda msg: complaints.append(msg.text) if msg.type == "error" else None)

    # The librarian opens the page as `python bibliogate.py page` does: a one-time link.
    tab.goto(page.login_link())
    assert tab.url == url + "/"
    # Settings: change two values, Save, see them in the ini and on the page.
    tab.goto(url + "/")
    tab.fill('[name="gateway.messages_per_check"]', "4")
    tab.fill('[name="library.name"]', "Hill School Library & Media Centre")
    tab.click("form[action='/settings'] button[type=submit]")
    tab.wait_for_selector(".flash")
    assert "Saved [gateway] messages_per_check, [library] name" in tab.inner_text(".flash")
    ini = page.ini.read_text(encoding="utf-8")
    assert "messages_per_check = 4\n" in ini and "name = Hill School Library & Media Centre ;" in ini
    assert tab.input_value('[name="gateway.messages_per_check"]') == "4"
    assert tab.input_value('[name="smtp.password"]') == ""
    shots = shot_folder(tmp_path)
    shots.mkdir(exist_ok=True)
    form_end = tab.locator("form[action='/test']").bounding_box()       # not the paths below
    height = form_end["y"] + form_end["height"] + 16
    tab.screenshot(path=str(shots / "settings.png"), full_page=True,
                   clip={"x": 0, "y": 0, "width": 1100, "height": height})

    # Test: a .TMP file appears in the spool folder. (Save's restart has sent
    # whatever waited, so the letters to show on the Queue page come now.)
    stage_queue(page)
    tab.click("form[action='/test'] button[type=submit]")
    tab.wait_for_selector(".flash")
    tests = list(page.spool.glob("PRIORITY-test-*.TMP"))
    assert len(tests) == 1 and tests[0].name in tab.inner_text(".flash")
    assert "The next check, at" in tab.inner_text(".flash")

    # Queue: the messages and the reason of the .BAD one.
    tab.click("header >> text=Queue")
    tab.wait_for_selector("table")
    text = tab.inner_text("main")
    assert "550 5.1.1 No such user" in text and "Reminder: Matilda" in text
    tab.screenshot(path=str(shots / "queue.png"), full_page=True)

    # Patrons: find Bob, who has no email, and give him one.
    tab.click("header >> text=Patrons")
    tab.fill('[name="q"]', "bob")
    tab.click("button:has-text('Search')")
    assert "no email" in tab.inner_text("tr.missing")
    tab.click("tr.missing >> text=Edit")
    tab.fill('[name="email"]', "bob@example.org")
    tab.check('[name="auto_overdue"]')
    tab.click("form[action='/patron'] button[type=submit]")
    tab.wait_for_selector(".flash")
    assert "Saved patron p7" in tab.inner_text(".flash")
    assert tab.get_attribute("a:text-is('Email')", "href").startswith("mailto:bob@example.org?")
    db = page.db()
    row = db.execute("SELECT email, auto_overdue FROM patrons WHERE patron_id = 'p7'").fetchone()
    db.close()
    assert tuple(row) == ("bob@example.org", 1)

    # On a phone the settings fit the screen's width.
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.on("console", lambda msg: complaints.append(msg.text) if msg.type == "error" else None)
    phone.goto(page.login_link())
    assert phone.url == url + "/"
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert complaints == []          # among them any Content-Security-Policy refusal
    assert SECRET not in tab.content() + phone.content()
