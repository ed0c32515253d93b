"""End to end in a real browser: Playwright drives Debian's Chromium against the launched app.

Set-up on a fresh Debian machine: ``apt-get install -y chromium`` and ``pip install playwright`` (no browser
download: the system Chromium is used through ``executable_path``; ``CHROMIUM_PATH`` overrides where it is).
Screenshots go to ``outputs/app-screenshots/`` (or ``APP_SCREENSHOT_DIR``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import AppConfig
from app_support.paths import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*", "ignore:The copy keyword is deprecated.*")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

EXAMPLE = REPO_ROOT / "examples" / "shapes" / "shapes_0.jpg"
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("APP_SCREENSHOT_DIR", REPO_ROOT / "outputs" / "app-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, launched_app) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser-app")
    with launched_app(AppConfig(model=str(tiny_model_dir), models_dir=root / "models", runs_dir=root / "runs")) as (
        _,
        url,
    ):
        yield url


@pytest.fixture(scope="module")
def page(app_url: str, chromium_executable: str) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        yield page
        context.close()
        browser.close()


def detection_count(page) -> int:
    text = page.locator("#detect-summary").inner_text()
    match = re.search(r"(\d+) detections?", text)
    assert match, f"no detection count in {text!r}"
    return int(match.group(1))


def test_upload_then_threshold_slider_changes_the_boxes(page, screenshots: Path):
    page.wait_for_selector("#model-info :text('3 classes')")
    page.locator("#detect-input input[type=file]").set_input_files(str(EXAMPLE))
    page.wait_for_selector("#detect-summary :text('detections')")
    before = detection_count(page)
    assert before > 0
    page.screenshot(path=str(screenshots / "01-detect-threshold-0.5.png"), full_page=True)

    # Drag the threshold handle most of the way right, as a user would.
    track = page.locator("#threshold input[type=range]")
    box = track.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.wait_for_function(
        "before => !document.querySelector('#detect-summary').innerText.includes(before + ' detection')", arg=before
    )
    after = detection_count(page)
    assert after < before
    threshold = float(page.locator("#threshold input[type=number]").input_value())
    assert threshold > 0.7
    page.screenshot(path=str(screenshots / "02-detect-threshold-high.png"), full_page=True)


def choose(page, dropdown_id: str, option: str) -> None:
    page.locator(f"#{dropdown_id} input").click()
    page.get_by_role("option", name=option).first.click()


def status_text(page) -> str:
    return page.locator("#finetune-status-text").inner_text()


def test_start_and_stop_a_tiny_finetune(page, screenshots: Path):
    page.get_by_role("tab", name="Fine-tune").click()
    for slider, value in (("shapes-train", "16"), ("shapes-validation", "4")):
        page.locator(f"#{slider} input[type=number]").fill(value)
        page.keyboard.press("Enter")
    choose(page, "shapes-size", "128")
    choose(page, "base-model", "tiny preset")
    page.locator("#epochs input").fill("200")  # far more than it will run: Stop must end it
    page.locator("#check-dataset").click()
    page.wait_for_selector("text=no problems found")

    page.locator("#finetune-start").click()
    page.wait_for_function(
        "() => { const s = document.querySelector('#finetune-status-text');"
        " return s && s.innerText.includes('running') && /step [2-9]/.test(s.innerText); }"
    )
    page.wait_for_selector("#loss-plot canvas, #loss-plot svg")
    page.screenshot(path=str(screenshots / "03-finetune-running.png"), full_page=True)

    # The job lives in the server: a reloaded page finds it still running.
    page.reload()
    page.get_by_role("tab", name="Fine-tune").click()
    page.wait_for_selector("#finetune-status-text:has-text('running')")

    page.locator("#finetune-stop").click()
    page.wait_for_selector("#finetune-status-text:has-text('stopped')")
    stopped_at = int(re.search(r"step (\d+) /", status_text(page)).group(1))
    assert 2 <= stopped_at < 200 * 4
    # The stopped run is offered for resuming: a checkpoint was left behind.
    page.locator("#finetune-status").scroll_into_view_if_needed()
    page.wait_for_function("() => document.body.innerText.includes('Your stopped runs')")
    page.screenshot(path=str(screenshots / "04-finetune-stopped.png"), full_page=True)
