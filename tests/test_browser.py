"""The studio in a real browser (Debian's Chromium through Playwright): keyboard-only labelling with undo,
hostile text shown as text, and an admin starting a round on `tiny` and watching it finish with a plot.

Screenshots of the review screen and the Rounds tab go to ``$PREFLOOP_SCREENSHOTS`` when set
(``docs/make_screenshots.py`` sets it to ``docs/``), else to the test's temp folder.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from app.server import AppContext
from app.server.app import launch
from app.server.runner import studio_of
from storage import prompts as prompts_db
from storage import rounds
from storage import users as users_db
from tests.helpers import free_port, make_image, review_workspace

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_IMG = "<img src=x onerror=window.__xss=1>"
XSS_SCRIPT = "<script>window.__xss=2</script>"
ROUND_CONFIG = {"generation.k": 2, "generation.max_new_tokens": 8, "generation.views": ["original", "aug:hflip"],
                "train.batch_size": 2, "review.queue_order": "in_order", "round.eval_judge": None}
N_PROMPTS = 6

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                                                                "(apt-get install chromium)")]


def shots_dir(tmp_path_factory) -> Path:
    d = os.environ.get("PREFLOOP_SCREENSHOTS")
    return Path(d) if d else tmp_path_factory.mktemp("shots")


def browser_workspace(root: Path, tiny_model_dir: Path):
    """Tiny model, 6 train prompts with 3 imported answers each (hostile text in questions and answers) and an
    imported preference, users lead (admin) and ann; round 1 stands at its review step (generate and judge
    have nothing to do: the answers were imported and no judge is configured)."""
    data = root / "data"
    rows = []
    for i in range(N_PROMPTS):
        make_image(data / f"img{i}.png", size=(64, 48), color=(40 * i % 255, 120, 200 - 25 * i))
        rows.append({"id": f"q{i}", "image": f"img{i}.png",
                     "question": f"Shape {i}: what colour is it? {XSS_IMG}",
                     "candidates": [f"It is red, shape {i}.", f"Maybe blue {XSS_SCRIPT}", f"Green {XSS_IMG}"],
                     "chosen": 0, "rejected": 1})
    ws = review_workspace(root, tiny_model_dir, rows, ROUND_CONFIG, name="browser demo")
    cur = ws.cursor()
    users_db.add_user(cur, "lead", "admin", "lead-password")
    users_db.add_user(cur, "ann", "annotator", "ann-password")
    return ws


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_model_dir):
    ws = browser_workspace(tmp_path_factory.mktemp("browser"), tiny_model_dir)
    ctx = AppContext(ws)
    demo, url = launch(ctx, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, ctx
    demo.close()
    studio_of(ctx).runner.wait(300)
    ws.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def login(browser, url: str, name: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url)
    page.get_by_label("username").fill(name)
    page.get_by_label("password").fill(f"{name}-password")
    page.get_by_role("button", name=re.compile("login", re.IGNORECASE)).click()
    page.locator("#pf-item").wait_for()
    return page


def wait_item(page) -> str:
    """Wait until a review item (its prompt line and the answer radios) is on screen; its prompt id."""
    page.locator("#pf-chosen input[type=radio]").first.wait_for(state="attached")
    t0 = time.time()
    while shown_prompt(page) is None:
        assert time.time() - t0 < 30, "no review item appeared"
        page.wait_for_timeout(100)
    return shown_prompt(page)


def shown_prompt(page) -> str | None:
    m = re.search(r"· prompt ([\w-]+)", page.locator("#pf-item").inner_text())
    return m.group(1) if m else None


def wait_prompt_change(page, old: str | None, timeout: float = 30) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        now = shown_prompt(page)
        if now and now != old:
            return now
        page.wait_for_timeout(100)
    raise AssertionError(f"the screen still shows {old} after {timeout} s")


def test_label_three_with_the_keyboard_and_undo(browser, app_url, tmp_path_factory):
    from playwright.sync_api import expect

    url, ctx = app_url
    page = login(browser, url, "ann")
    labelled = []
    current = wait_item(page)
    for _ in range(3):
        page.keyboard.press("Digit1")
        page.keyboard.press("Shift+Digit2")
        expect(page.locator("#pf-chosen input[type=radio]").nth(0)).to_be_checked()
        expect(page.locator("#pf-rejected input[type=radio]").nth(1)).to_be_checked()
        page.keyboard.press("Enter")
        labelled.append(current)
        current = wait_prompt_change(page, current)
    page.keyboard.press("b")
    assert wait_prompt_change(page, current) == labelled[-1], "undo shows the undone item again"
    page.keyboard.press("Digit1")  # a decision in progress, not submitted, for the screenshot
    page.keyboard.press("Shift+Digit2")
    page.wait_for_timeout(2500)  # the "saved" notices fade
    page.screenshot(path=str(shots_dir(tmp_path_factory) / "review.png"))
    rows = prompts_db.list_labels(ctx.ws.cursor())
    mine = [r for r in rows if r["annotator"] == "ann"]
    assert sorted(r["kind"] for r in mine) == ["label", "label", "label", "undo"]
    assert [r["prompt_id"] for r in mine if r["kind"] == "label"] == labelled
    (undo,) = [r for r in mine if r["kind"] == "undo"]
    assert undo["prompt_id"] == labelled[-1]
    for r in mine:
        if r["kind"] == "label":
            assert (r["chosen_id"], r["rejected_id"]) != (None, None) and r["chosen_id"] != r["rejected_id"]
    page.close()


def test_hostile_text_is_shown_as_text(browser, app_url):
    url, _ = app_url
    page = login(browser, url, "ann")
    wait_item(page)
    item = page.locator("#pf-item")
    assert item.get_by_text(XSS_IMG).first.is_visible()
    assert item.get_by_text(XSS_SCRIPT).first.is_visible()
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert item.locator("img[src='x']").count() == 0 and item.locator("script").count() == 0
    page.wait_for_timeout(500)
    assert page.evaluate("typeof window.__xss") == "undefined"
    page.close()


def test_admin_starts_a_round_and_sees_it_finish(browser, app_url, tmp_path_factory):
    url, ctx = app_url
    page = login(browser, url, "lead")
    page.get_by_role("tab", name="Rounds").click()
    page.locator("#pf-round-state").wait_for()
    page.locator("#pf-round-start").click()
    page.locator("#pf-round-progress [data-status='running']").wait_for()
    page.locator("#pf-round-progress [data-status='done'], #pf-round-progress [data-status='failed']").wait_for(
        timeout=300_000)
    run = studio_of(ctx).runner.snapshot()
    assert run["status"] == "done", run["lines"]
    assert page.locator("#pf-round-progress progress").get_attribute("value") == "1.000"
    curve = page.locator("#pf-train-curve")
    assert curve.is_visible()
    for metric in ("loss", "margin", "accuracy"):  # each training plot draws its line
        line = page.locator(f"#pf-train-{metric} .mark-line path").first
        line.wait_for()
        assert len(line.get_attribute("d") or "") > 10, metric
    pairs = page.locator("#pf-round-pairs").inner_text()
    assert "human" in pairs and "imported" in pairs
    assert "done: trained 1 round(s); round 2 is ready for review" in page.locator("#pf-round-log textarea").input_value()
    assert "round 2" in page.locator("#pf-round-state").inner_text()
    page.screenshot(path=str(shots_dir(tmp_path_factory) / "rounds.png"), full_page=True)
    assert rounds.get_round(ctx.ws.cursor(), 1)["status"] == "done"
    page.close()
