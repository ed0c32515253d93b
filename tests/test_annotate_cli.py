"""``python -m ddetr.annotate``: folders of images and videos in, annotated copies and detections out.

``main`` runs in-process (one subprocess test checks the module entry point). The end-to-end test uses the bundled
shapes model on the generated moving-shapes clip, so there are detections to check against the true boxes; the
others use the tiny random model at a small inference size, since they are about files and exit codes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

import ddetr
from ddetr.annotate.cli import main

av = pytest.importorskip("av")

pytestmark = pytest.mark.usefixtures("single_thread")

BUNDLED = Path(ddetr.__file__).parent / "bundled" / "ddetr-shapes"
BOX_KEYS = {"xmin", "ymin", "xmax", "ymax"}


def _run(argv: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main(argv)``'s exit status (argparse's exits included) and what it wrote to stderr."""
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit:
        status = int(exit.code or 0)
    return status, capsys.readouterr().err


def _files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _iou(a: dict[str, int], b: Sequence[float]) -> float:
    ax0, ay0, ax1, ay1 = a["xmin"], a["ymin"], a["xmax"], a["ymax"]
    bx0, by0, bx1, by1 = b
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _matches_truth(detection: dict[str, Any], truth: Sequence[tuple[str, Sequence[float]]]) -> bool:
    return any(label == detection["label"] and _iou(detection["box"], box) > 0.5 for label, box in truth)


def _check_detection(detection: dict[str, Any], width: int, height: int, *, threshold: float) -> None:
    """The hub's object-detection schema, in pixels of the input."""
    assert set(detection) >= {"score", "label", "box"}
    assert isinstance(detection["score"], float) and threshold < detection["score"] <= 1.0
    assert detection["label"] in {"circle", "square", "triangle"}
    box = detection["box"]
    assert set(box) == BOX_KEYS and all(isinstance(box[key], int) for key in BOX_KEYS)
    assert 0 <= box["xmin"] < box["xmax"] <= width and 0 <= box["ymin"] < box["ymax"] <= height


@pytest.fixture
def small_clip(tmp_path: Path, write_clip: Callable[..., Path]) -> Callable[[Path], Path]:
    """``small_clip(path)`` writes six 64×48 frames at 10 fps there."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)]

    def write(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_clip(path, frames, fps=10)

    return write


def _small_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _tiny(model: Path) -> list[object]:
    return ["--model", model, "--size", 64, "--quiet"]


def test_folder_of_images_and_a_video(
    tmp_path: Path, moving_shapes_clip: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = moving_shapes_clip
    frames = _decode(clip.path)
    source = tmp_path / "in"
    (source / "photos" / "more").mkdir(parents=True)
    shutil.copy(clip.path, source / "clip.mp4")
    PIL.Image.fromarray(frames[0]).save(source / "photos" / "first.png")
    PIL.Image.fromarray(frames[10]).save(source / "photos" / "more" / "tenth.jpg", quality=95)
    out = tmp_path / "out"

    status, err = _run([source, "--output", out, "--model", BUNDLED, "--threshold", 0.3, "--quiet"], capsys)

    assert status == 0, err
    assert "annotated 3 of 3 inputs" in err
    assert _files(out) == [
        "clip.annotated.mp4",
        "clip.detections.csv",
        "clip.detections.json",
        "photos/first.annotated.png",
        "photos/first.detections.json",
        "photos/more/tenth.annotated.jpg",
        "photos/more/tenth.detections.json",
    ]

    # Images: the hub's schema, a list of detections, and the shapes that are there.
    for json_name, image_name, index in (
        ("photos/first.detections.json", "photos/first.annotated.png", 0),
        ("photos/more/tenth.detections.json", "photos/more/tenth.annotated.jpg", 10),
    ):
        detections = json.loads((out / json_name).read_text())
        assert isinstance(detections, list) and detections
        for detection in detections:
            _check_detection(detection, clip.width, clip.height, threshold=0.3)
            assert set(detection) == {"score", "label", "box"}
            assert _matches_truth(detection, clip.truth[index]), detection
        with PIL.Image.open(out / image_name) as annotated:
            assert annotated.size == (clip.width, clip.height)
            drawn = np.asarray(annotated.convert("RGB"))
        assert _mean_abs_diff(drawn, frames[index]) > 0.5  # boxes were drawn on it

    # The video: {fps, width, height, frames: [{index, time, detections: [... track_id]}]}, one entry per frame.
    record = json.loads((out / "clip.detections.json").read_text())
    assert set(record) == {"fps", "width", "height", "frames"}
    assert (record["fps"], record["width"], record["height"]) == (clip.fps, clip.width, clip.height)
    assert [entry["index"] for entry in record["frames"]] == list(range(len(clip.truth)))
    for entry in record["frames"]:
        assert set(entry) == {"index", "time", "detections"}
        assert entry["time"] == pytest.approx(entry["index"] / clip.fps, abs=2e-3)
        for detection in entry["detections"]:
            _check_detection(detection, clip.width, clip.height, threshold=0.3)
            assert set(detection) == {"score", "label", "box", "track_id"} and isinstance(detection["track_id"], int)
    detections = [(entry["index"], d) for entry in record["frames"] for d in entry["detections"]]
    assert sum(bool(entry["detections"]) for entry in record["frames"]) >= 0.9 * len(record["frames"])
    right = sum(_matches_truth(d, clip.truth[index]) for index, d in detections)
    assert right >= 0.9 * len(detections)

    rows = (out / "clip.detections.csv").read_text().splitlines()
    assert rows[0] == "frame,time,track_id,label,score,xmin,ymin,xmax,ymax"
    assert len(rows) - 1 == len(detections)
    video = _decode(out / "clip.annotated.mp4")
    assert len(video) == len(clip.truth) and video[0].shape == (clip.height, clip.width, 3)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_bad_files_are_reported_and_the_others_written(
    tmp_path: Path, tiny_model_dir: Path, small_clip: Callable[[Path], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    _small_image(source / "picture.png")
    small_clip(source / "clip.mp4")
    (source / "broken.mp4").write_text("this is not a video")
    (source / "garbage.png").write_bytes(np.random.default_rng(2).bytes(3000))
    out = tmp_path / "out"

    status, err = _run([source, "-o", out, *_tiny(tiny_model_dir)], capsys)

    assert status == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert any("broken.mp4" in line and "could not be opened as a video" in line for line in errors)
    assert any("garbage.png" in line for line in errors)
    assert "annotated 2 of 4 inputs" in err
    assert _files(out) == [
        "clip.annotated.mp4",
        "clip.detections.csv",
        "clip.detections.json",
        "picture.annotated.png",
        "picture.detections.json",
    ]
    assert len(json.loads((out / "clip.detections.json").read_text())["frames"]) == 6


def test_outputs_that_would_clash_are_refused_before_running(
    tmp_path: Path, small_clip: Callable[[Path], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    _small_image(source / "a.jpg")
    small_clip(source / "a.mp4")
    out = tmp_path / "out"
    # A model that does not exist: refusing the clash must come first, before any model is loaded.
    status, err = _run([source, "-o", out, "--model", tmp_path / "no-model", "--quiet"], capsys)
    assert status == 2
    assert "a.jpg" in err and "a.mp4" in err and "a.detections.json" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--stride", "0"], "--stride must be at least 1"),
        (["--size", "8"], "--size must be at least 32"),
        (["--threshold", "2"], "--threshold must be between 0 and 1"),
        (["--threshold", "nan"], "--threshold"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-detections", "0"], "--max-detections"),
        (["--max-side", "0"], "--max-side must be positive"),
        (["--max-seconds", "-1"], "--max-seconds must be positive"),
        (["--threads", "0"], "--threads"),
        (["--stride", "two"], "--stride"),  # argparse's own type check
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    tmp_path: Path, arguments: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _small_image(tmp_path / "in" / "x.png")
    status, err = _run([image, "-o", tmp_path / "out", "--quiet", *arguments], capsys)
    assert status == 2
    assert named in err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_and_model_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = _run([tmp_path / "missing", "-o", tmp_path / "out"], capsys)
    assert status == 2 and "missing: no such file or folder" in err
    (tmp_path / "notes.txt").write_text("hello")
    status, err = _run([tmp_path / "notes.txt", "-o", tmp_path / "out"], capsys)
    assert status == 2 and "notes.txt: not an image or video file" in err
    image = _small_image(tmp_path / "x.png")
    status, err = _run([image, "-o", tmp_path / "out", "--model", tmp_path / "no-such-model"], capsys)
    assert status == 2 and "--model" in err and "no-such-model" in err
    assert not (tmp_path / "out").exists()


def test_video_limits_name_their_flags(
    tmp_path: Path, tiny_model_dir: Path, small_clip: Callable[[Path], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    clip = small_clip(tmp_path / "in" / "clip.mp4")
    out = tmp_path / "out"
    status, err = _run([clip, "-o", out, "--max-side", 32, *_tiny(tiny_model_dir)], capsys)
    assert status == 1
    assert "clip.mp4" in err and "64×48" in err and "(--max-side)" in err
    status, err = _run([clip, "-o", out, "--max-frames", 3, *_tiny(tiny_model_dir)], capsys)
    assert status == 1 and "(--max-frames)" in err
    assert _files(out) == []


def test_output_folder_inside_the_input_and_hidden_files_are_not_inputs(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "photos"
    _small_image(source / "cat.png")
    (source / "._cat.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # not an image
    out = source / "annotated"
    for _ in range(2):  # the second run must not annotate the first run's outputs
        status, err = _run([source, "-o", out, *_tiny(tiny_model_dir)], capsys)
        assert status == 0, err
        assert "annotated 1 of 1 inputs" in err
    assert _files(out) == ["cat.annotated.png", "cat.detections.json"]


def test_module_help_runs() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "ddetr.annotate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: python -m ddetr.annotate")
    assert "--output" in completed.stdout and "detections.json" in completed.stdout
