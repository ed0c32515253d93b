"""The command line that annotates images, folders and videos with one model.

Each input is planned before anything runs (what it is, where its outputs go), so name clashes and unreadable
paths are reported before the first forward pass. A bad file is reported and skipped; the exit status is 1 when
any input failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ddetr.checkpoint.hub import CheckpointNotFoundError
from ddetr.drawing import draw_detections
from ddetr.pipeline import ObjectDetectionPipeline, pipeline
from ddetr.runtime.precision import PRECISIONS
from ddetr.video import DetectionSettings, VideoLimits, annotate_video, output_paths
from ddetr.video.frames import DEFAULT_BATCH_SIZE

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".ts"})

_EPILOG = """\
outputs, in --output (folders keep their sub-folders):
  image   <stem>.annotated.png (.jpg for JPEG inputs) and <stem>.detections.json (the hub's object-detection schema)
  video   <stem>.annotated.mp4 (H.264), <stem>.detections.json ({fps, width, height, frames: [{index, time,
          detections: [{score, label, box, track_id}]}]}) and <stem>.detections.csv (one row per box)

examples:
  python -m ddetr.annotate examples/shapes --model ddetr/bundled/ddetr-shapes --output annotated/
  python -m ddetr.annotate clip.mp4 --output annotated/ --size 480 --precision bf16 --stride 2
"""


@dataclass(frozen=True)
class Job:
    source: Path
    folder: Path  # where its outputs go
    kind: str  # "image" or "video"

    def outputs(self) -> tuple[Path, ...]:
        if self.kind == "video":
            return output_paths(self.source, self.folder)
        return image_outputs(self.source, self.folder)


def image_outputs(source: Path, folder: Path) -> tuple[Path, Path]:
    suffix = ".jpg" if source.suffix.lower() in {".jpg", ".jpeg"} else ".png"
    return folder / f"{source.stem}.annotated{suffix}", folder / f"{source.stem}.detections.json"


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def plan(inputs: Sequence[Path], output: Path) -> list[Job]:
    """One job per image or video: files as given, folders walked (sorted); raises ValueError on clashes.

    Walking a folder skips hidden files and folders (macOS ``._photo.jpg`` resource forks are not images; an
    interrupted run's ``.partial`` files are not inputs) and an --output folder inside it, so annotating again does
    not annotate the annotations.
    """
    jobs: list[Job] = []
    for given in inputs:
        if given.is_dir():
            skipped = output if _inside(output, given) and not _inside(given, output) else None
            for path in sorted(p for p in given.rglob("*") if p.is_file() and _kind(p)):
                hidden = any(part.startswith(".") for part in path.relative_to(given).parts)
                if hidden or (skipped is not None and _inside(path, skipped)):
                    continue
                jobs.append(Job(path, output / path.parent.relative_to(given), _kind(path) or ""))
        elif given.is_file():
            kind = _kind(given)
            if kind is None:
                raise ValueError(f"{given}: not an image or video file (by its extension)")
            jobs.append(Job(given, output, kind))
        else:
            raise ValueError(f"{given}: no such file or folder")
    if not jobs:
        raise ValueError("no images or videos found in the inputs")
    claimed: dict[Path, Path] = {}
    for job in jobs:
        for target in job.outputs():
            if target in claimed:
                raise ValueError(
                    f"{claimed[target]} and {job.source} would both write {target}: rename one or annotate them "
                    "into different --output folders"
                )
            claimed[target] = job.source
    return jobs


def annotate_image(detector: ObjectDetectionPipeline, job: Job, settings: DetectionSettings) -> int:
    picture = detector.processor.load_image(job.source)
    (candidates,) = detector.candidates([picture], size=settings.size)
    detections = candidates.detections(settings.threshold, settings.max_detections, settings.classes)
    image_path, json_path = image_outputs(job.source, job.folder)
    job.folder.mkdir(parents=True, exist_ok=True)
    drawn = draw_detections(picture, detections, id2label=detector.model.config.id2label)
    # Written under a temporary name first, so an interrupted run leaves no half-written outputs.
    for path, write in (
        (image_path, lambda p: drawn.save(p, format="JPEG" if p.suffix == ".jpg" else "PNG", quality=90)),
        (json_path, lambda p: p.write_text(json.dumps(detections, indent=1), encoding="utf-8")),
    ):
        partial = path.with_name(f".{path.name}.partial")
        write(partial)
        partial.replace(path)
    return len(detections)


def annotate_one_video(
    detector: ObjectDetectionPipeline, job: Job, settings: DetectionSettings, args: argparse.Namespace
) -> str:
    limits = _limits(args)
    bar = tqdm(desc=job.source.name, unit="frame", leave=True, disable=args.quiet)
    final = None
    try:
        for progress in annotate_video(
            detector, job.source, job.folder, settings, batch_size=args.batch_size, stride=args.stride, limits=limits
        ):
            bar.total = progress.total
            bar.n = progress.done
            bar.refresh()
            final = progress
    finally:
        bar.close()
    if final is None or final.result is None:
        raise RuntimeError(f"{job.source}: no result")  # annotate_video always ends with one
    result = final.result
    seen = ", ".join(f"{count} {name}" for name, count in result.seen.items()) or "none"
    note = f" ({result.note})" if result.note else ""
    return f"{result.frames} frames, tracks seen: {seen}{note}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr.annotate",
        description="Detect objects on images, folders of images and videos; write annotated copies and detections.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files, video files or folders of them")
    parser.add_argument("--output", "-o", type=Path, required=True, help="folder to write the outputs into")
    parser.add_argument("--model", help="model folder or hub id (default: SenseTime/deformable-detr, else bundled)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold (default 0.5)")
    parser.add_argument("--max-detections", type=int, default=100, help="boxes per image or frame (default 100)")
    parser.add_argument("--classes", default="", help="comma-separated class names to keep (default: all)")
    parser.add_argument("--size", type=int, help="inference shortest edge in pixels (default: the model's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="default auto: bf16 where native")
    parser.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the usable CPUs)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"video frames per forward (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--stride", type=int, default=1, help="process every N-th video frame (default 1)")
    parser.add_argument("--no-track", action="store_true", help="no track ids on video boxes")
    parser.add_argument("--max-seconds", type=float, help="refuse longer videos (default: no limit)")
    parser.add_argument("--max-frames", type=int, help="refuse videos with more frames (default: no limit)")
    parser.add_argument("--max-side", type=int, default=8192, help="refuse larger video frames (default 8192 px)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def _limits(args: argparse.Namespace) -> VideoLimits:
    """The video limits, whose refusals name the flag that raises each one."""
    return VideoLimits(
        max_seconds=args.max_seconds,
        max_frames=args.max_frames,
        max_side=args.max_side,
        flags={"max_seconds": "--max-seconds", "max_frames": "--max-frames", "max_side": "--max-side"},
    )


def _settings(args: argparse.Namespace) -> DetectionSettings:
    classes = tuple(name.strip() for name in args.classes.split(",") if name.strip())
    return DetectionSettings(
        threshold=args.threshold,
        max_detections=args.max_detections,
        classes=classes,
        size=args.size,
        track=not args.no_track,
    )


def _run(
    jobs: list[Job], detector: ObjectDetectionPipeline, settings: DetectionSettings, args: argparse.Namespace
) -> Iterator[str | None]:
    """Runs the jobs in order; yields an error message per failed job (None for a success)."""
    images = tqdm(total=sum(job.kind == "image" for job in jobs), desc="images", unit="image", disable=args.quiet)
    try:
        for job in jobs:
            try:
                if job.kind == "image":
                    annotate_image(detector, job, settings)
                    images.update(1)
                else:
                    summary = annotate_one_video(detector, job, settings, args)
                    if not args.quiet:
                        tqdm.write(f"{job.source}: {summary}")
                yield None
            except (ValueError, OSError) as error:  # a bad input file: report it, go on with the others
                yield f"{job.source}: {error}"
    finally:
        images.close()


def _check(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before anything runs, each message naming its flag."""
    if not 0.0 <= args.threshold <= 1.0:  # NaN fails too
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold:g}")
    if args.size is not None and args.size < 32:
        raise ValueError(f"--size must be at least 32 pixels, got {args.size}")
    for name in ("max_detections", "batch_size", "stride", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("max_seconds", "max_frames", "max_side"):
        value = getattr(args, name)
        if value is not None and not value > 0:  # NaN fails too
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value:g}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        settings = _settings(args)
        _limits(args)
        jobs = plan(args.inputs, args.output)
    except ValueError as error:
        parser.error(str(error))
    try:
        detector = pipeline(model=args.model, device=args.device, precision=args.precision, threads=args.threads)
    except CheckpointNotFoundError as error:  # a mistyped --model is a bad argument, not a crash
        parser.error(f"--model: {error}")
    failures = [message for message in _run(jobs, detector, settings, args) if message is not None]
    for message in failures:
        print(f"error: {message}", file=sys.stderr)
    done = len(jobs) - len(failures)
    print(f"annotated {done} of {len(jobs)} inputs into {args.output}", file=sys.stderr)
    return 1 if failures else 0
