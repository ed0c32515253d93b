"""The Label tab in a real browser: draw and name a box, reload and find it, label assist, fine-tune the result."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import AppConfig
from app_support.paths import REPO_ROOT

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*", "ignore:The copy keyword is deprecated.*"),
    pytest.mark.slow,
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("gradio_image_annotation")

BUNDLED = REPO_ROOT / "ddetr" / "bundled" / "ddetr-shapes"
SHAPES = [REPO_ROOT / "examples" / "shapes" / f"shapes_{index}.jpg" for index in range(3)]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("labels")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, labels_dir: Path, launched_app) -> Iterator[str]:
    root = tmp_path_factory.mktemp("label-app")
    config = AppConfig(
        model=str(BUNDLED), models_dir=root / "models", runs_dir=root / "runs", labels_dir=labels_dir, precision="fp32"
    )
    with launched_app(config) as (_, url):
        yield url


@pytest.fixture(scope="module")
def browser(chromium_executable: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_label_tab(context: Any, url: str) -> Any:
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_role("tab", name="Label").click()
    wait_status(page, "Image \\d+ of|No images yet")
    return page


def status(page: Any) -> str:
    return page.locator("#label-status").inner_text()


def wait_status(page: Any, pattern: str) -> None:
    page.wait_for_function(
        "pattern => new RegExp(pattern).test(document.querySelector('#label-status').innerText)", arg=pattern
    )


def saved_state(visitor: Path) -> dict[str, Any]:
    return json.loads((visitor / "progress.json").read_text())


def test_label_reload_assist_and_finetune(app_url: str, browser: Any, labels_dir: Path):
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = open_label_tab(context, app_url)
    page.locator("#label-upload input[type=file]").set_input_files([str(path) for path in SHAPES])
    wait_status(page, "0 of 3 labelled")
    page.locator("#label-classes textarea, #label-classes input").first.fill("circle, square, triangle")
    page.locator("#label-set-classes").click()
    wait_status(page, "triangle 0")

    # Draw a box with the mouse and name its class in the annotator's dialog.
    canvas = page.locator("#label-annotator canvas").first
    canvas.wait_for()
    area = canvas.bounding_box()
    x, y = area["x"] + area["width"] * 0.45, area["y"] + area["height"] * 0.4
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 70, y + 50, steps=8)
    page.mouse.up()
    dialog = page.get_by_role("button", name="OK")
    dialog.wait_for()
    label_input = page.locator("input[role=listbox], .modal input").first
    label_input.click()
    page.get_by_role("option", name="triangle").click()
    dialog.click()
    wait_status(page, "1 of 3 labelled.*triangle 1")
    (visitor,) = [folder for folder in labels_dir.iterdir() if folder.is_dir()]
    (box,) = saved_state(visitor)["images"][0]["boxes"]
    assert box["label"] == "triangle" and box["xmax"] - box["xmin"] > 10 and box["ymax"] - box["ymin"] > 10

    # A reload (same browser, so the same stored token) finds the box again, and opens the first unlabelled image.
    page.reload()
    page.get_by_role("tab", name="Label").click()
    wait_status(page, "Image 2 of 3.*1 of 3 labelled.*triangle 1")
    page.locator("#label-prev").click()
    wait_status(page, "Image 1 of 3 \\(labelled\\)")
    assert page.locator("#label-classes textarea, #label-classes input").first.input_value() == (
        "circle, square, triangle"
    )

    # Another browser is another visitor: it starts empty and cannot see the first one's images.
    stranger = browser.new_context()
    other = open_label_tab(stranger, app_url)
    wait_status(other, "No images yet")
    stranger.close()

    # Label assist on the next image: the bundled model's boxes, mapped to these classes by name.
    page.locator("#label-next").click()
    wait_status(page, "Image 2 of 3 \\(unlabelled\\)")
    page.locator("#label-assist").click()
    wait_status(page, "2 of 3 labelled")
    assisted = saved_state(visitor)["images"][1]
    assert assisted["status"] == "labelled" and assisted["boxes"]
    assert {b["label"] for b in assisted["boxes"]} <= {"circle", "square", "triangle"}

    # The third is background; then the three images start a fine-tune.
    page.keyboard.press("Alt+ArrowRight")
    wait_status(page, "Image 3 of 3")
    page.locator("#label-background input").check()
    wait_status(page, "3 of 3 labelled")
    page.locator("#label-download").click()
    page.wait_for_selector("#label-download-file a")
    page.locator("#label-finetune").click()
    page.wait_for_function("() => document.querySelector('#dataset-kind input[value=labelled]')?.checked === true")
    page.locator("#check-dataset").click()
    page.wait_for_function("() => document.body.innerText.includes('your labelled images')")
    page.locator("#max-steps input").fill("2")
    page.locator("#batch-size input[type=number]").fill("1")
    page.locator("#batch-size input[type=number]").press("Enter")
    page.locator("#finetune-start").click()
    page.wait_for_function(
        "() => /finished|step [12] \\//.test(document.querySelector('#finetune-status-text')?.innerText || '')"
    )
    assert re.search(r"running|finished", page.locator("#finetune-status-text").inner_text())
    context.close()
