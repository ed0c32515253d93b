"""The Detect tab's Webcam and Video modes in a real browser, with the bundled shapes model.

Chromium's fake camera plays a generated Y4M of moving shapes (``--use-file-for-fake-video-capture``); the
Video mode gets a generated clip uploaded through the page. Needs Debian's chromium (``apt-get install -y
chromium``; ``CHROMIUM_PATH`` overrides) and playwright; skipped without them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import AppConfig
from app_support.paths import REPO_ROOT
from ddetr.boxes import box_iou
from ddetr.video.frames import FrameTracker

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*", "ignore:The copy keyword is deprecated.*"),
    pytest.mark.slow,
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

BUNDLED = REPO_ROOT / "ddetr" / "bundled" / "ddetr-shapes"
TIMEOUT_MS = 120_000


class DetectionLog:
    """What the tracker handed to the page, per live frame: (the frame's score threshold, detections)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.frames: list[tuple[float, list[dict[str, Any]]]] = []

    def snapshot(self) -> list[tuple[float, list[dict[str, Any]]]]:
        with self.lock:
            return list(self.frames)


@pytest.fixture(scope="module")
def live_log() -> Iterator[DetectionLog]:
    """Records every live frame's detections (the server runs in this process)."""
    log = DetectionLog()
    original = FrameTracker.detections

    def recording(self: FrameTracker, candidates: Any, settings: Any, **kwargs: Any) -> list[dict[str, Any]]:
        detections = original(self, candidates, settings, **kwargs)
        with log.lock:
            log.frames.append((settings.threshold, detections))
        return detections

    patcher = pytest.MonkeyPatch()
    patcher.setattr(FrameTracker, "detections", recording)
    yield log
    patcher.undo()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, live_log: DetectionLog, launched_app) -> Iterator[str]:
    root = tmp_path_factory.mktemp("live-app")
    config = AppConfig(model=str(BUNDLED), models_dir=root / "models", runs_dir=root / "runs", precision="fp32")
    with launched_app(config) as (_, url):
        yield url


@pytest.fixture(scope="module")
def page(app_url: str, moving_shapes_y4m: Any, chromium_executable: str) -> Iterator[Any]:
    flags = [
        "--no-sandbox",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={moving_shapes_y4m.path}",
    ]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable, args=flags)
        context = browser.new_context(viewport={"width": 1400, "height": 1100}, permissions=["camera"])
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        page.wait_for_selector("#model-info :text('6 classes')")
        yield page
        context.close()
        browser.close()


def live_boxes(page: Any) -> int:
    text = page.locator("#live-stats").inner_text()
    match = re.search(r"(\d+) boxes", text)
    return int(match.group(1)) if match else -1


def wait_for_frames(page: Any, log: DetectionLog, count: int, timeout_s: float = 60.0) -> list[Any]:
    """The log once it holds ``count`` frames (a busy CI machine streams slowly; the test only needs a few)."""
    for _ in range(int(timeout_s * 4)):
        frames = log.snapshot()
        if len(frames) >= count:
            return frames
        page.wait_for_timeout(250)
    raise AssertionError(f"only {len(log.snapshot())} live frames arrived in {timeout_s:.0f} s, expected {count}")


def mirrored(box: tuple[float, float, float, float], width: int) -> list[float]:
    xmin, ymin, xmax, ymax = box
    return [width - xmax, ymin, width - xmin, ymax]


def test_webcam_streams_boxes_that_follow_the_threshold(page: Any, live_log: DetectionLog, moving_shapes_y4m: Any):
    page.get_by_role("tab", name="Webcam").click()
    access = page.get_by_text("Click to Access Webcam")
    if access.count():
        access.first.click()
    page.locator("#live-input").get_by_label("capture photo").click()
    page.wait_for_function("() => /[1-9]\\d* boxes/.test(document.querySelector('#live-stats').innerText)")
    page.wait_for_selector("#live-output img")
    assert re.search(r"\d+(\.\d+)? fps", page.locator("#live-stats").inner_text())

    # The boxes sit on the shapes: the camera frames arrive mirrored (the default preview), so compare each live
    # box with the mirrored true position of its shape in any frame of the looping file.
    frames = wait_for_frames(page, live_log, 6)
    truths = {label: [] for label in ("circle", "square", "triangle")}
    for frame_truth in moving_shapes_y4m.truth:
        for label, box in frame_truth:
            truths[label].append(mirrored(box, moving_shapes_y4m.width))
    on_shapes = boxes = 0
    for _, detections in frames:
        for detection in detections:
            boxes += 1
            candidates = truths.get(detection["label"])
            if candidates:
                found = torch.tensor(
                    [[detection["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]], dtype=torch.float
                )
                iou, _ = box_iou(found, torch.tensor(candidates, dtype=torch.float))
                on_shapes += bool(iou.max() >= 0.5)
    assert boxes > 0 and on_shapes / boxes >= 0.8, (on_shapes, boxes)
    assert all(detection["track_id"] >= 1 for _, found in frames for detection in found)

    # A threshold of 0.99 applies from the next frames on, without restarting the stream.
    page.locator("#threshold input[type=number]").fill("0.99")
    page.locator("#threshold input[type=number]").press("Enter")
    page.wait_for_function("() => /(^|\\D)0 boxes/.test(document.querySelector('#live-stats').innerText)")
    # Frames come from the log with the threshold each ran at: a frame captured before the change may still finish
    # after the first one at 0.99 (two stream calls can overlap), but from then on the stream runs at 0.99.
    deadline = time.monotonic() + 60
    while True:
        frames = live_log.snapshot()
        first = next((i for i, (threshold, _) in enumerate(frames) if threshold == pytest.approx(0.99)), None)
        if first is not None and len(frames) - first >= 4 and frames[-1][0] == pytest.approx(0.99):
            break
        assert time.monotonic() < deadline, f"no frames at threshold 0.99 after 60 s: {[t for t, _ in frames]}"
        page.wait_for_timeout(100)
    at_new_threshold = [detections for threshold, detections in frames[first:] if threshold == pytest.approx(0.99)]
    assert len(at_new_threshold) >= 3 and not any(at_new_threshold)

    # Stop: frames stop arriving.
    page.locator("#live-input").get_by_label("capture photo").click()
    page.wait_for_timeout(1500)
    stopped = len(live_log.snapshot())
    page.wait_for_timeout(1500)
    assert len(live_log.snapshot()) == stopped
    page.locator("#threshold input[type=number]").fill("0.5")
    page.locator("#threshold input[type=number]").press("Enter")


def test_video_upload_gives_a_playable_annotated_video(page: Any, moving_shapes_clip: Any, tmp_path: Path):
    page.get_by_role("tab", name="Video").click()
    page.locator("#threshold input[type=number]").fill("0.3")
    page.locator("#threshold input[type=number]").press("Enter")
    page.locator("#video-input input[type=file]").set_input_files(str(moving_shapes_clip.path))
    page.locator("#video-start").click()
    page.wait_for_selector("#video-status :text('Done')")
    status = page.locator("#video-status").inner_text()
    assert f"{len(moving_shapes_clip.truth)} frames annotated" in status
    source = page.locator("#video-output video").get_attribute("src")
    assert source
    response = page.request.get(source)
    assert response.ok
    annotated = tmp_path / "annotated.mp4"
    annotated.write_bytes(response.body())
    with av.open(str(annotated)) as container:
        stream = container.streams.video[0]
        decoded = [frame for frame in container.decode(stream)]
    assert len(decoded) == len(moving_shapes_clip.truth)
    assert (decoded[0].width, decoded[0].height) == (moving_shapes_clip.width, moving_shapes_clip.height)
    # The browser can play it: the <video> element reaches a duration.
    duration = page.locator("#video-output video").evaluate(
        "v => new Promise(done => v.readyState >= 1 ? done(v.duration) : v.addEventListener('loadedmetadata', "
        "() => done(v.duration)))"
    )
    assert duration == pytest.approx(len(moving_shapes_clip.truth) / moving_shapes_clip.fps, abs=0.2)
    assert page.locator("#video-json a").count() and page.locator("#video-csv a").count()
