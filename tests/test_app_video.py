"""The Webcam and Video modes' handlers, and ``/detect_video`` over HTTP, with the bundled shapes model."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file

from app import AppConfig, config_from_args, parse_args
from app_support.detector_cache import DetectorCache, load_detector
from app_support.downloads import DownloadFolder
from app_support.live_tab import LiveSettings, LiveTab
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities
from app_support.paths import REPO_ROOT
from app_support.video_tab import VideoSettings, VideoTab
from app_support.visitors import Visitors
from ddetr.boxes import box_iou

av = pytest.importorskip("av")

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*", "ignore:The copy keyword is deprecated.*")

BUNDLED = REPO_ROOT / "ddetr" / "bundled" / "ddetr-shapes"
EXAMPLE = REPO_ROOT / "examples" / "shapes" / "shapes_0.jpg"


def app_config(root: Path, **overrides: Any) -> AppConfig:
    return AppConfig(
        model=str(BUNDLED), models_dir=root / "models", runs_dir=root / "runs", precision="fp32", **overrides
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, launched_app) -> Iterator[tuple[Any, str]]:
    with launched_app(app_config(tmp_path_factory.mktemp("video-app"))) as served:
        yield served


@pytest.fixture(scope="module")
def client(server: tuple[Any, str]) -> Iterator[Client]:
    client = Client(server[1], verbose=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def handlers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The Webcam and Video modes' handler objects, built as the app builds them (not launched)."""
    patcher = pytest.MonkeyPatch()
    patcher.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("handlers")
    registry = ModelRegistry(root / "models", cli_model=str(BUNDLED))
    detectors = DetectorCache(loader=functools.partial(load_detector, precision="fp32"))
    identities = Identities(Visitors(root / "visitors"))
    yield {
        "live": LiveTab(registry, detectors, LiveSettings(), identities),
        "video": VideoTab(registry, detectors, DownloadFolder(root / "videos"), VideoSettings(), identities),
    }
    patcher.undo()


def no_bar(*args: Any, **kwargs: Any) -> None:
    """Stands in for gr.Progress outside a running app."""


def decoded_frames(path: str | Path) -> list[Any]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]


def test_detect_video_endpoint_follows_and_tracks_the_shapes(client: Client, moving_shapes_clip: Any):
    video_path, json_path = client.predict(handle_file(str(moving_shapes_clip.path)), 0.3, api_name="/detect_video")
    frames = decoded_frames(video_path)
    assert len(frames) == len(moving_shapes_clip.truth)
    assert frames[0].shape == (moving_shapes_clip.height, moving_shapes_clip.width, 3)

    report = json.loads(Path(json_path).read_text())
    assert (report["width"], report["height"]) == (moving_shapes_clip.width, moving_shapes_clip.height)
    assert report["fps"] == pytest.approx(moving_shapes_clip.fps)
    assert [entry["index"] for entry in report["frames"]] == list(range(len(moving_shapes_clip.truth)))
    times = [entry["time"] for entry in report["frames"]]
    assert times == pytest.approx([index / moving_shapes_clip.fps for index in range(len(times))], abs=1e-3)

    matched = total = 0
    circle_ids: list[int] = []
    for entry, truth in zip(report["frames"], moving_shapes_clip.truth):
        for detection in entry["detections"]:
            assert set(detection) == {"score", "label", "box", "track_id"}
            assert detection["score"] > 0.3 and detection["track_id"] >= 1
        for label, box in truth:
            total += 1
            same_class = [d for d in entry["detections"] if d["label"] == label]
            if not same_class:
                continue
            found = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in same_class])
            iou, _ = box_iou(torch.tensor([box], dtype=torch.float), found.float())
            best = int(iou[0].argmax())
            if float(iou[0, best]) >= 0.5:
                matched += 1
                if label == "circle":
                    circle_ids.append(same_class[best]["track_id"])
    assert matched / total >= 0.7, (matched, total)
    # The circle crosses the whole frame: one id all the way.
    assert len(circle_ids) >= 0.7 * len(moving_shapes_clip.truth)
    assert len(set(circle_ids)) == 1, circle_ids


def test_bad_videos_are_refused_and_the_server_keeps_serving(
    client: Client, server: tuple[Any, str], tmp_path: Path, moving_shapes_clip: Any
):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(moving_shapes_clip.path.read_bytes()[:200])
    for path in (text, cut):
        with pytest.raises(Exception) as caught:
            client.predict(handle_file(str(path)), 0.5, api_name="/detect_video")
        assert path.name in str(caught.value)
        assert str(tmp_path) not in str(caught.value) and "/tmp" not in str(caught.value)  # no server paths
    assert client.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect")


def test_a_video_over_the_limits_is_refused_naming_the_limit(tmp_path: Path, moving_shapes_clip: Any, launched_app):
    with launched_app(app_config(tmp_path, video=VideoSettings(max_frames=10))) as (_, url):
        client = Client(url, verbose=False)
        with pytest.raises(Exception) as caught:
            client.predict(handle_file(str(moving_shapes_clip.path)), 0.5, api_name="/detect_video")
        client.close()
    assert "at most 10" in str(caught.value) and "--video-max-frames" in str(caught.value)


def test_live_frames_follow_the_threshold_and_keep_track_ids(handlers: dict[str, Any], moving_shapes_clip: Any):
    live = handlers["live"]
    frames = decoded_frames(moving_shapes_clip.path)
    assert live.stream_frame(None, None, 0, 0.5, 100, [], None, None)[1].startswith("Waiting")
    session = None
    for frame in frames[:8]:
        image, stats, session = live.stream_frame(frame, None, 0, 0.3, 100, [], None, session)
        assert image.size == (moving_shapes_clip.width, moving_shapes_clip.height)
        assert "fps" in stats and "model" in stats
        assert re.search(r"model \d+ ms on [12] threads? ·", stats), stats
    assert session is not None and session.frames == 8 and session.fps() > 0
    assert sum(session.tracker.seen().values()) >= 2  # at least two shapes tracked over the frames
    _, stats, session = live.stream_frame(frames[8], None, 0, 0.99, 100, [], None, session)
    assert " 0 boxes" in stats
    # The class filter applies too.
    image, stats, session = live.stream_frame(frames[9], None, 0, 0.3, 100, ["star"], None, session)
    assert " 0 boxes" in stats
    # Big camera frames are scaled down before detection.
    big = np.repeat(np.repeat(frames[0], 4, axis=0), 4, axis=1)
    image, _, _ = live.stream_frame(big, None, 0, 0.3, 100, [], None, None)
    assert max(image.size) == live.settings.max_side


def test_video_mode_reports_progress_and_cancel_keeps_what_is_done(handlers: dict[str, Any], moving_shapes_clip: Any):
    video = handlers["video"]
    request = gr.Request(session_hash="visitor-a")
    assert video.cancel(request) == "No video is being processed."
    updates = []
    for update in video.process(
        str(moving_shapes_clip.path), None, 0, 0.3, 100, [], None, 1, request, progress_bar=no_bar
    ):
        updates.append(update)
        if len(updates) == 1:  # "Reading the video…": Cancel as the first frames are processed
            assert video.cancel(request).startswith("Cancelling")
    _, status, video_path, json_path, csv_path = updates[-1]
    assert status.startswith("**Cancelled")
    kept = len(json.loads(Path(json_path).read_text())["frames"])
    assert 0 < kept < len(moving_shapes_clip.truth)
    assert len(decoded_frames(video_path)) == kept
    assert Path(csv_path).read_text().splitlines()[0].startswith("frame,time,track_id,label")
    assert video.cancel(request) == "No video is being processed."  # the session's entry is gone


def test_a_refused_upload_leaves_no_files(handlers: dict[str, Any], tmp_path: Path):
    video = handlers["video"]
    text = tmp_path / "fake.webm"
    text.write_text("nope")
    before = {p for p in video.outputs.folder.rglob("*") if p.is_file()}
    with pytest.raises(gr.Error) as caught:
        list(
            video.process(str(text), None, 0, 0.5, 100, [], None, 1, gr.Request(session_hash="b"), progress_bar=no_bar)
        )
    assert "fake.webm" in str(caught.value)
    assert {p for p in video.outputs.folder.rglob("*") if p.is_file()} == before


def test_command_line_sets_the_live_and_video_settings():
    config = config_from_args(
        parse_args(
            ["--live-stream-every", "0.1", "--live-streams", "3", "--no-mirror-webcam", "--video-max-frames", "50"]
        )
    )
    assert config.live == LiveSettings(stream_every=0.1, streams=3, mirror=False)
    assert config.video == VideoSettings(max_frames=50)
    assert config_from_args(parse_args([])).live == LiveSettings()
    for bad in (["--live-streams", "0"], ["--video-batch-size", "0"], ["--video-max-seconds", "-1"]):
        with pytest.raises(ValueError):
            config_from_args(parse_args(bad))
