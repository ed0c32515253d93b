"""ddetr.video's reader, writer and limits, and annotate_video's file hygiene.

Every video here is made by the test itself with PyAV (never with ``VideoWriter`` when the writer is not what is
tested), so what a test expects comes from the frames it wrote: their count, size, timestamps and pixels.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ddetr
from ddetr.video import (
    DetectionSettings,
    VideoInputError,
    VideoLimitError,
    VideoLimits,
    VideoReader,
    VideoWriter,
    annotate_video,
)

av = pytest.importorskip("av")

pytestmark = pytest.mark.usefixtures("single_thread")

FPS = 15
WIDTH, HEIGHT = 160, 120


# -- test videos, written with PyAV directly ---------------------------------------------------------------------- #


def _frames(count: int, width: int = WIDTH, height: int = HEIGHT) -> list[np.ndarray]:
    """Moving ramps whose blue level, 10 + 8 × index, names the frame. The motion spreads the bits over all frames
    (a still picture puts most of a file in its first frame, and a cut at 60 % would keep one frame)."""
    y, x = np.mgrid[0:height, 0:width]
    return [
        np.stack([(3 * x + 7 * i) % 256, (2 * y + 3 * i) % 256, np.full_like(x, 10 + 8 * i)], axis=-1).astype(np.uint8)
        for i in range(count)
    ]


def _index_of(image: np.ndarray) -> int:
    """The frame index a decoded ``_frames`` image shows (its blue level)."""
    return round((float(image[..., 2].mean()) - 10) / 8)


def _encode(
    path: Path,
    frames: Sequence[np.ndarray],
    *,
    codec: str = "libx264",
    fps: int = FPS,
    format: str | None = None,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
) -> Path:
    """``frames`` into ``path``; ``pts`` (in ``time_base`` units) gives each frame its own timestamp."""
    with av.open(str(path), "w", format=format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = options or {}
        if time_base is not None:
            stream.codec_context.time_base = time_base
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if pix_fmt.startswith(("bgr", "rgb")):
                frame = frame.reformat(format=pix_fmt)
            if pts is not None:
                frame.pts, frame.time_base = pts[index], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _blank_frames(path: Path, size: tuple[int, int], pts: Sequence[int], *, time_base: Fraction, codec: str) -> Path:
    """Grey ``size`` (width, height) frames at ``pts``, made in YUV directly (cheap even at 8K)."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        stream.codec_context.time_base = time_base
        for timestamp in pts:
            frame = av.VideoFrame(width, height, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([128]) * plane.buffer_size)
            frame.pts, frame.time_base = timestamp, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _decode(path: Path) -> list[np.ndarray]:
    """Every frame of ``path`` as RGB, decoded with PyAV directly (not with the reader under test)."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _read_all(reader: VideoReader) -> list[Any]:
    with reader:
        return list(reader)


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def clip30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 ``_frames`` at 15 fps, H.264 in a faststart mp4 (the index before the data, as browsers upload)."""
    path = tmp_path_factory.mktemp("clip30") / "clip30.mp4"
    return _encode(path, _frames(30), container_options={"movflags": "faststart"})


@pytest.fixture(scope="module")
def undeclared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 frames at 25 fps as a raw H.264 stream: no container, so no declared frame count or duration."""
    path = tmp_path_factory.mktemp("raw") / "stream.h264"
    return _encode(path, _frames(60, 64, 48), fps=25, format="h264", options={"preset": "ultrafast"})


@pytest.fixture(scope="module")
def eight_k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 7680×4320 frames (MPEG-4 part 2 in AVI: a few hundred KB, written in well under a second)."""
    path = tmp_path_factory.mktemp("8k") / "eight_k.avi"
    return _blank_frames(path, (7680, 4320), [0, 1], time_base=Fraction(1, 10), codec="mpeg4")


@pytest.fixture(scope="module")
def ten_hours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny frames 10 hours apart: a few KB that declare a 10-hour video."""
    path = tmp_path_factory.mktemp("long") / "ten_hours.mkv"
    return _blank_frames(path, (64, 48), [0, 36000], time_base=Fraction(1, 1), codec="mpeg4")


@pytest.fixture(scope="module")
def detector(tiny_model_dir: Path) -> ddetr.ObjectDetectionPipeline:
    return ddetr.pipeline(model=tiny_model_dir)


SMALL = DetectionSettings(size=64)  # the tiny model at a small inference size: these tests are about files


# -- writer → reader ---------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "h264"), (".webm", "vp9")])
def test_writer_then_reader_round_trip(tmp_path: Path, suffix: str, codec: str) -> None:
    frames = _frames(12)
    with VideoWriter(tmp_path / f"out{suffix}", width=WIDTH, height=HEIGHT, fps=FPS) as writer:
        for pixels in frames:
            writer.write(pixels)
    assert writer.frames == 12
    with VideoReader(tmp_path / f"out{suffix}") as reader:
        info = reader.info
        decoded = list(reader)
    assert (info.width, info.height, info.codec) == (WIDTH, HEIGHT, codec)
    assert info.fps == pytest.approx(FPS)
    assert [frame.index for frame in decoded] == list(range(12))
    assert [frame.time for frame in decoded] == pytest.approx([i / FPS for i in range(12)], abs=2e-3)
    for original, frame in zip(frames, decoded):
        assert frame.image.shape == (HEIGHT, WIDTH, 3) and frame.image.dtype == np.uint8
        assert _mean_abs(frame.image, original) < 6.0  # lossy, but the same picture
    assert reader.ended_early is None


def test_writer_file_appears_only_on_close(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with VideoWriter(target, width=WIDTH, height=HEIGHT, fps=FPS) as writer:
        for pixels in _frames(30):  # enough for the encoder to have muxed packets: the temporary file exists
            writer.write(pixels)
        assert not target.exists()
        (partial,) = tmp_path.iterdir()
        assert partial.name.startswith(".") and ".partial" in partial.name
    assert _leftovers(tmp_path) == ["out.mp4"]
    assert len(_decode(target)) == 30


def test_writer_removes_its_temporary_file_on_abort_and_on_errors(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "aborted.mp4", width=WIDTH, height=HEIGHT, fps=FPS)
    for pixels in _frames(30):
        writer.write(pixels)
    assert _leftovers(tmp_path)  # the temporary file
    writer.abort()
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="aborted"):
        writer.close()
    assert _leftovers(tmp_path) == []

    with (
        pytest.raises(RuntimeError, match="the caller failed"),
        VideoWriter(tmp_path / "failed.mp4", width=WIDTH, height=HEIGHT, fps=FPS) as writer,
    ):
        for pixels in _frames(30):
            writer.write(pixels)
        raise RuntimeError("the caller failed")
    assert _leftovers(tmp_path) == []

    with (
        pytest.raises(ValueError, match=r"\(120, 160, 3\) uint8"),
        VideoWriter(tmp_path / "wrong.mp4", width=WIDTH, height=HEIGHT, fps=FPS) as writer,
    ):
        writer.write(_frames(1)[0])
        writer.write(np.zeros((HEIGHT, WIDTH + 2, 3), np.uint8))
    assert _leftovers(tmp_path) == []


def test_writer_without_frames_makes_no_file_and_closing_twice_is_harmless(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="no frames were written"),
        VideoWriter(tmp_path / "empty.mp4", width=WIDTH, height=HEIGHT, fps=FPS),
    ):
        pass
    assert _leftovers(tmp_path) == []
    with VideoWriter(tmp_path / "twice.mp4", width=WIDTH, height=HEIGHT, fps=FPS) as writer:
        writer.write(_frames(1)[0])
        assert writer.close() == tmp_path / "twice.mp4"
    assert writer.close() == tmp_path / "twice.mp4"
    assert _leftovers(tmp_path) == ["twice.mp4"] and len(_decode(tmp_path / "twice.mp4")) == 1


def test_writer_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must end in"):
        VideoWriter(tmp_path / "out.avi", width=WIDTH, height=HEIGHT, fps=FPS)
    with pytest.raises(ValueError, match="frame size"):
        VideoWriter(tmp_path / "out.mp4", width=0, height=HEIGHT, fps=FPS)
    for fps in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps"):
            VideoWriter(tmp_path / "out.mp4", width=WIDTH, height=HEIGHT, fps=fps)
    assert _leftovers(tmp_path) == []


def test_writer_pads_odd_sizes_by_repeating_the_edge(tmp_path: Path) -> None:
    # Green, with a red band along the right edge and a blue band along the bottom: the padding must continue them.
    image = np.zeros((241, 321, 3), np.uint8)
    image[:] = (0, 160, 0)
    image[:, 300:] = (200, 0, 0)
    image[220:, :] = (0, 0, 200)
    with VideoWriter(tmp_path / "odd.mp4", width=321, height=241, fps=FPS) as writer:
        for _ in range(3):
            writer.write(image)
    decoded = _decode(tmp_path / "odd.mp4")
    assert len(decoded) == 3 and decoded[0].shape == (242, 322, 3)
    padded = decoded[0].astype(np.int16)
    np.testing.assert_allclose(padded[10:200, 321].mean(axis=0), (200, 0, 0), atol=25)  # red, not black
    np.testing.assert_allclose(padded[241, 10:280].mean(axis=0), (0, 0, 200), atol=25)  # blue, not black
    assert _mean_abs(decoded[0][:241, :321], image) < 6.0
    with VideoReader(tmp_path / "odd.mp4") as reader:
        assert (reader.info.width, reader.info.height) == (322, 242)


def test_odd_size_input_is_read_at_its_true_size(tmp_path: Path, detector: ddetr.ObjectDetectionPipeline) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (241, 321, 3), dtype=np.uint8) for _ in range(3)]
    source = _encode(tmp_path / "odd.mkv", frames, codec="ffv1", fps=10, pix_fmt="bgr0")  # lossless, odd sizes allowed
    with VideoReader(source) as reader:
        assert (reader.info.width, reader.info.height) == (321, 241)
        decoded = list(reader)
    assert len(decoded) == 3
    for original, frame in zip(frames, decoded):
        np.testing.assert_array_equal(frame.image, original)

    (*_, last) = annotate_video(detector, source, tmp_path / "out", SMALL)
    assert last.result is not None and last.result.frames == 3
    record = json.loads(last.result.detections_json.read_text())
    assert (record["width"], record["height"]) == (321, 241)
    assert [entry["index"] for entry in record["frames"]] == [0, 1, 2]
    video = _decode(last.result.video)
    assert len(video) == 3 and video[0].shape == (242, 322, 3)  # H.264 needs even sides: one padded column and row


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_times_follow_the_timestamps(tmp_path: Path, suffix: str) -> None:
    pts = [0, 100, 150, 400, 410, 1000]  # milliseconds: nothing like index / fps
    source = _encode(tmp_path / f"vfr{suffix}", _frames(6, 64, 48), fps=10, pts=pts, time_base=Fraction(1, 1000))
    frames = _read_all(VideoReader(source))
    assert [frame.index for frame in frames] == list(range(6))
    assert [frame.time for frame in frames] == pytest.approx([p / 1000 for p in pts], abs=1e-3)
    assert [_index_of(frame.image) for frame in frames] == list(range(6))


def test_stride_yields_every_nth_frame(tmp_path: Path, undeclared: Path) -> None:
    source = _encode(tmp_path / "ten.mp4", _frames(10))
    with VideoReader(source, stride=3) as reader:
        assert reader.info.frame_count == 10
        assert [reader.info.frames_after_stride(n) for n in (1, 3, 4, 10, 11)] == [10, 4, 3, 1, 1]
        frames = list(reader)
    assert [frame.index for frame in frames] == [0, 3, 6, 9]
    assert [_index_of(frame.image) for frame in frames] == [0, 3, 6, 9]  # the pixels of those frames
    assert [frame.time for frame in frames] == pytest.approx([0, 3 / FPS, 6 / FPS, 9 / FPS], abs=2e-3)
    with VideoReader(undeclared) as reader:
        assert reader.info.frame_count is None and reader.info.frames_after_stride(2) is None
    for stride in (0, -1):
        with pytest.raises(ValueError, match="stride"):
            VideoReader(source, stride=stride)


def test_reader_keeps_no_earlier_frame(clip30: Path) -> None:
    """Memory does not grow with the video: once the caller lets go of a frame, nothing holds its pixels."""
    earlier: list[weakref.ref[np.ndarray]] = []
    with VideoReader(clip30) as reader:
        for frame in reader:
            assert all(ref() is None for ref in earlier), f"frames before {frame.index} are still held"
            earlier.append(weakref.ref(frame.image))
    assert len(earlier) == 30


# -- bad input ---------------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.mp4", b"this is a text file, not a video\n" * 40),
        ("noise.mp4", np.random.default_rng(7).bytes(20_000)),
        ("empty.mp4", b""),
    ],
)
def test_files_that_are_not_video_are_refused(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VideoInputError, match="could not be opened as a video") as refused:
        VideoReader(path)
    message = str(refused.value)
    assert message.startswith(name)
    assert str(tmp_path) not in message  # the base name only: no server paths in messages


def test_missing_paths_and_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VideoInputError, match=r"^missing\.mp4: no such file"):
        VideoReader(tmp_path / "missing.mp4")
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(VideoInputError, match=r"^folder\.mp4 is a folder"):
        VideoReader(tmp_path / "folder.mp4")


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_truncated_file_yields_the_frames_before_the_cut(tmp_path: Path, suffix: str) -> None:
    frames = _frames(30)
    options = {"movflags": "faststart"} if suffix == ".mp4" else {}
    whole = _encode(tmp_path / f"whole{suffix}", frames, container_options=options)
    with VideoReader(whole) as reader:
        assert len(list(reader)) == 30 and reader.ended_early is None  # the uncut file: no complaint
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with VideoReader(cut) as reader:
        decoded = list(reader)
    assert 0 < len(decoded) < 30
    assert [frame.index for frame in decoded] == list(range(len(decoded)))
    # The frames well before the cut are the clip's own; the last few may be concealed from a packet the cut split.
    trusted = decoded[:-3]
    assert len(trusted) >= 2
    for frame in trusted:
        assert _mean_abs(frame.image, frames[frame.index]) < 6.0
    assert reader.ended_early is not None
    assert "truncated" in reader.ended_early and f"after {len(decoded)} frames" in reader.ended_early


def test_file_cut_before_its_first_frame_is_refused(tmp_path: Path, clip30: Path) -> None:
    data = clip30.read_bytes()
    cut = tmp_path / "header_only.mp4"
    cut.write_bytes(data[: data.index(b"mdat") + 16])  # the whole index, none of the frames
    with VideoReader(cut) as reader:
        assert reader.info.frame_count == 30  # it opens: the header is intact
        with pytest.raises(VideoInputError, match=r"^header_only\.mp4 has no frames"):
            list(reader)


@pytest.mark.parametrize(
    ("name", "format", "codec", "expected"),
    [
        ("zero.mp4", None, "libx264", r"^zero\.mp4"),  # FFmpeg drops an mp4 track without samples
        ("zero.avi", None, "mpeg4", r"^zero\.avi has no frames"),
        ("zero.y4m", "yuv4mpegpipe", "rawvideo", r"^zero\.y4m has no frames"),
    ],
)
def test_zero_frame_files_are_refused(tmp_path: Path, name: str, format: str | None, codec: str, expected: str) -> None:
    path = tmp_path / name
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # the header, with its video stream, and then no frame
    assert path.stat().st_size > 0
    with pytest.raises(VideoInputError, match=expected):
        _read_all(VideoReader(path))


def test_audio_only_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "voice.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=48000, layout="mono")
        for index in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(VideoInputError, match=r"^voice\.mp4 has no video stream \(it has only audio streams\)"):
        VideoReader(path)


def test_8k_frames_are_refused_above_the_side_limit(eight_k: Path) -> None:
    with VideoReader(eight_k) as reader:  # the default limit (8192) takes 8K
        assert (reader.info.width, reader.info.height) == (7680, 4320)
    limits = VideoLimits(max_side=3840, flags={"max_side": "--max-side"})
    with pytest.raises(VideoLimitError) as refused:
        VideoReader(eight_k, limits=limits)  # refused when opened, before any frame is decoded
    message = str(refused.value)
    assert re.search(r"7680\s*[×x]\s*4320", message) and "3840" in message and "--max-side" in message
    assert isinstance(refused.value, ValueError)


def test_declared_ten_hours_are_refused_before_decoding(ten_hours: Path) -> None:
    assert ten_hours.stat().st_size < 100_000  # the length is declared, not present
    limits = VideoLimits(max_seconds=3600, flags={"max_seconds": "--max-seconds"})
    with pytest.raises(VideoLimitError) as refused:
        VideoReader(ten_hours, limits=limits)  # the constructor refuses: nothing was decoded
    message = str(refused.value)
    assert "3600" in message and "--max-seconds" in message and "36001" in message


def test_declared_frame_count_is_refused_before_decoding(clip30: Path) -> None:
    limits = VideoLimits(max_frames=10, flags={"max_frames": "--max-frames"})
    with pytest.raises(VideoLimitError, match=r"has 30 frames: at most 10 .*\(--max-frames\)"):
        VideoReader(clip30, limits=limits)


def test_undeclared_length_is_stopped_while_decoding(undeclared: Path) -> None:
    """A stream that declares neither count nor duration opens, yields frames as they decode and is stopped at the
    limit: the frames before the refusal arrived one by one, not after decoding the whole file."""
    received: list[Any] = []
    limits = VideoLimits(max_frames=20, flags={"max_frames": "--max-frames"})
    with VideoReader(undeclared, limits=limits) as reader:
        assert reader.info.frame_count is None and reader.info.duration is None
        with pytest.raises(VideoLimitError, match=r"more than 20 frames.*\(--max-frames\)"):
            for frame in reader:
                received.append(frame.index)
    assert received == list(range(20))

    received.clear()
    with (
        VideoReader(undeclared, limits=VideoLimits(max_seconds=1.0)) as reader,
        pytest.raises(VideoLimitError, match="more than 1 s"),
    ):
        for frame in reader:
            received.append(frame.time)
    assert len(received) == 26 and max(received) == pytest.approx(1.0)  # 25 fps: frames at 0 … 1.0 s


# -- annotate_video: every output complete or absent -------------------------------------------------------------- #


@pytest.mark.parametrize("case", ["text", "8k", "ten_hours"])
def test_annotate_refused_file_creates_no_outputs(
    tmp_path: Path, case: str, eight_k: Path, ten_hours: Path, detector: ddetr.ObjectDetectionPipeline
) -> None:
    if case == "text":
        source = tmp_path / "notes.mp4"
        source.write_text("not a video")
        limits, error = None, VideoInputError
    else:
        source = eight_k if case == "8k" else ten_hours
        limits, error = VideoLimits(max_side=3840, max_seconds=3600), VideoLimitError
    out = tmp_path / "out"
    with pytest.raises(error):
        list(annotate_video(detector, source, out, SMALL, limits=limits))
    assert _leftovers(out) == []


def test_annotate_failing_midway_leaves_nothing(
    tmp_path: Path, undeclared: Path, detector: ddetr.ObjectDetectionPipeline
) -> None:
    out = tmp_path / "out"
    done = []
    run = annotate_video(detector, undeclared, out, SMALL, batch_size=4, limits=VideoLimits(max_frames=20))
    with pytest.raises(VideoLimitError):
        for progress in run:
            done.append(progress.done)
            assert any(".partial" in name for name in _leftovers(out))  # written as it goes, under temporary names
    assert done == list(range(1, 21))  # five batches of four written, then the 21st frame broke the limit
    assert _leftovers(out) == []


def test_annotate_consumer_stopping_early_leaves_nothing(
    tmp_path: Path, clip30: Path, detector: ddetr.ObjectDetectionPipeline
) -> None:
    out = tmp_path / "out"
    run = annotate_video(detector, clip30, out, SMALL, batch_size=4)
    assert next(run).done == 1 and next(run).done == 2
    assert _leftovers(out) and all(".partial" in name for name in _leftovers(out))
    run.close()  # what a browser disconnect or a Ctrl-C in the consumer does
    assert _leftovers(out) == []


def test_annotate_cancel_finishes_the_outputs_with_the_frames_done(
    tmp_path: Path, clip30: Path, detector: ddetr.ObjectDetectionPipeline
) -> None:
    cancel = threading.Event()
    out = tmp_path / "out"
    items = []
    for progress in annotate_video(detector, clip30, out, SMALL, batch_size=4, cancel=cancel):
        items.append(progress)
        if progress.done == 3:
            cancel.set()
    result = items[-1].result
    assert result is not None and result.cancelled and result.frames == 3 and result.total_frames == 30
    assert result.note is not None and "cancelled" in result.note
    assert _leftovers(out) == ["clip30.annotated.mp4", "clip30.detections.csv", "clip30.detections.json"]
    record = json.loads(result.detections_json.read_text())
    assert (record["fps"], record["width"], record["height"]) == (FPS, WIDTH, HEIGHT)
    assert [entry["index"] for entry in record["frames"]] == [0, 1, 2]
    video = _decode(result.video)
    assert len(video) == 3 and video[0].shape == (HEIGHT, WIDTH, 3)
    rows = result.detections_csv.read_text().splitlines()
    assert rows[0].split(",")[:3] == ["frame", "time", "track_id"]
    assert len(rows) - 1 == sum(len(entry["detections"]) for entry in record["frames"])


def test_annotate_truncated_file_keeps_what_decoded_and_says_so(
    tmp_path: Path, clip30: Path, detector: ddetr.ObjectDetectionPipeline
) -> None:
    data = clip30.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    (*_, last) = annotate_video(detector, cut, tmp_path / "out", SMALL)
    result = last.result
    assert result is not None and not result.cancelled and 0 < result.frames < 30
    assert result.note is not None and "truncated" in result.note
    assert len(json.loads(result.detections_json.read_text())["frames"]) == result.frames
    assert len(_decode(result.video)) == result.frames
