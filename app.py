"""Deformable DETR demo: live detection and point-and-click fine-tuning (Gradio 6).

Run ``python app.py`` and open http://127.0.0.1:7860 (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured);
``python app.py --model DIR_OR_REPO`` starts with another model; ``python app.py --help`` lists the options.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import logging
import os
import shutil
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from app_support.detect_tab import DetectTab
from app_support.detector_cache import DetectorCache, load_detector
from app_support.downloads import DownloadFolder
from app_support.finetune_tab import FinetuneServices, FinetuneTab
from app_support.hardening import DELETE_CACHE, launch_options, limit_pillow, no_implicit_hub_token, queue_options
from app_support.jobs import TrainingJobs
from app_support.label_store import dataset_folder
from app_support.label_tab import KEYBOARD_JS, LabelTab
from app_support.live_tab import LiveSettings, LiveTab
from app_support.model_choices import ModelRegistry
from app_support.owners import ADMIN_TOKEN_ENV, Identities
from app_support.paths import REPO_ROOT, AppPaths
from app_support.slice_jobs import SliceRun
from app_support.training import CheckpointPreviews
from app_support.uploads import UploadStore
from app_support.video_tab import VideoSettings, VideoTab
from app_support.visitors import Visitors
from app_support.zerogpu import on_zerogpu
from ddetr.runtime.allocator import keep_freed_memory
from ddetr.runtime.precision import PRECISIONS
from ddetr.runtime.threads import ADAPTIVE, configure_threads, parse_threads

TITLE = "Deformable DETR: detect and fine-tune"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHUTDOWN_GRACE_S = 60.0  # how long a training job may take to save its checkpoint when the server stops
TRAINING_MODES = ("auto", "process", "slices")


@dataclass(frozen=True)
class AppConfig:
    model: str | None = None
    models_dir: Path | None = None
    data_dir: Path | None = None
    labels_dir: Path | None = None
    runs_dir: Path | None = None
    max_loaded_models: int = 2
    # "auto": bf16 where native (>= 95% of fp32's top-100 detections kept), else fp32
    precision: str = "auto"
    # torch's CPU threads for forward passes: a count, or "adaptive" (per input shape, whichever of the usable CPUs
    # and one thread has lately been faster: beside other busy processes one thread wins)
    threads: int | str = ADAPTIVE
    admin_token: str | None = None  # stops any visitor's job (else DDETR_ADMIN_TOKEN, or the Space's author)
    # "Sign in with Hugging Face" (visitors are then their login): None = when the Space has OAuth (hf_oauth: true).
    login: bool | None = None
    # How jobs train: "process" (a child process, one at a time), "slices" (GPU slices driven by the owner's page,
    # as on ZeroGPU) or "auto" (slices on a ZeroGPU Space, else a process).
    training: str = "auto"
    live: LiveSettings = field(default_factory=LiveSettings)
    video: VideoSettings = field(default_factory=VideoSettings)


def oauth_configured() -> bool:
    """Whether this runs on a Space with ``hf_oauth: true`` (Spaces then sets the OAuth client's variables)."""
    return bool(os.environ.get("OAUTH_CLIENT_ID")) and os.environ.get("SYSTEM") == "spaces"


def example_images(paths: AppPaths) -> dict[str, list[Path]]:
    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []

    return {
        "Shapes (for the bundled shapes model)": images(paths.examples / "shapes"),
        "Photos (for the COCO models)": images(paths.examples / "photos"),
    }


@dataclass
class AppServer:
    """What the page runs on: its folders, the training jobs and the uploads; ``shutdown`` for exit."""

    paths: AppPaths
    jobs: TrainingJobs
    uploads: UploadStore
    _done: threading.Event = field(default_factory=threading.Event)

    def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Checkpoint and stop the training job (killed after ``grace`` s), then delete the work folders."""
        if self._done.is_set():
            return
        self._done.set()
        self.jobs.shutdown(grace)
        self.jobs.wait(grace + 10)
        self.uploads.clear()
        shutil.rmtree(self.paths.work, ignore_errors=True)


def create_app(config: AppConfig = AppConfig()) -> tuple[gr.Blocks, AppServer]:
    """Build the Blocks app (not launched) and what it runs on."""
    limit_pillow()
    no_implicit_hub_token()
    paths = AppPaths.from_root(
        REPO_ROOT, models=config.models_dir, data=config.data_dir, runs=config.runs_dir, labels=config.labels_dir
    )
    visitors = Visitors(paths.labels)
    identities = Identities.from_environment(visitors, admin_token=config.admin_token)
    if config.training not in TRAINING_MODES:
        raise ValueError(f"training must be one of {TRAINING_MODES}, got {config.training!r}")
    slices = config.training == "slices" or (config.training == "auto" and on_zerogpu())
    jobs = TrainingJobs(paths.runs, launcher=SliceRun, max_running=8) if slices else TrainingJobs(paths.runs)
    uploads = UploadStore(paths.scratch("uploads"))
    previews = CheckpointPreviews()
    registry = ModelRegistry(paths.models, cli_model=config.model, finetuned=jobs.finished_models)
    detections = DownloadFolder(paths.scratch("detections"))
    loader = functools.partial(load_detector, precision=config.precision, threads=config.threads)
    detectors = DetectorCache(max_loaded=config.max_loaded_models, loader=loader)
    detect_tab = DetectTab(registry, detectors, detections, identities)
    live_tab = LiveTab(registry, detectors, config.live, identities)
    video_tab = VideoTab(
        registry, detectors, DownloadFolder(paths.scratch("videos"), keep=20), config.video, identities
    )
    label_tab = LabelTab(
        visitors,
        registry,
        detectors,
        jobs=jobs,
        previews=previews,
        identities=identities,
        work=paths.scratch("label-uploads"),
        downloads=DownloadFolder(paths.scratch("label-exports"), keep=20),
    )

    def labelled_folder(token: str | None) -> Path | None:
        folder = visitors.folder(token)
        return dataset_folder(folder) if folder is not None else None

    finetune_tab = FinetuneTab(
        FinetuneServices(
            paths=paths,
            jobs=jobs,
            registry=registry,
            # A folder of its own: the many small detection files must never prune away a trained model's zip.
            downloads=DownloadFolder(paths.scratch("models"), keep=10),
            identities=identities,
            uploads=uploads,
            previews=previews,
            labelled_folder=labelled_folder,
            slices=slices,
            login_required=on_zerogpu(),
        )
    )

    with gr.Blocks(title=TITLE, delete_cache=DELETE_CACHE) as demo:
        with gr.Row():
            gr.Markdown(f"# {TITLE}")
            if config.login if config.login is not None else oauth_configured():
                gr.LoginButton(scale=0, elem_id="login")
        visitor = label_tab.visitor_state()
        with gr.Tabs(selected="detect") as tabs:
            with gr.Tab("Detect", id="detect"):
                detect = detect_tab.build(example_images(paths), live=live_tab, video=video_tab, visitor=visitor)
            with gr.Tab("Label", id="label"):
                label = label_tab.build(visitor)
            with gr.Tab("Fine-tune", id="finetune"):
                dataset_kind = finetune_tab.build(detect_model=detect["model"], tabs=tabs, visitor=visitor)
        label["finetune"].click(
            lambda: (gr.Tabs(selected="finetune"), "labelled"),
            None,
            [tabs, dataset_kind],
            api_name="ui_finetune_labelled",
            api_visibility="private",
        )
        load_fn, load_inputs, load_outputs = label["load"]
        # The visitor's token first (issued if new), then what depends on who they are: their own models.
        demo.load(load_fn, load_inputs, load_outputs, api_name="ui_label_session", api_visibility="private").then(
            detect_tab.refresh_models,
            [detect["model"], visitor],
            [detect["model"]],
            api_name="ui_visitor_models",
            api_visibility="private",
        )
        demo.unload(finetune_tab.release_session)
        demo.load(None, js=KEYBOARD_JS)
        demo.load(
            detect_tab.select_model,
            [detect["model"]],
            [detect["model_info"], detect["classes"]],
            api_name="ui_initial_model",
            api_visibility="private",
        )
    return demo, AppServer(paths=paths, jobs=jobs, uploads=uploads)


# (settings field, its help): each becomes --live-<field> / --video-<field>, defaulting to the settings' value.
LIVE_FLAGS = (
    ("stream_every", "seconds between frames the browser sends"),
    ("time_limit", "seconds of processing per visitor before they rejoin the queue"),
    ("max_side", "camera frames are scaled to this longer side before detection"),
    ("streams", "visitors streaming at once"),
)
VIDEO_FLAGS = (
    ("max_seconds", "longest accepted video, in seconds"),
    ("max_frames", "most frames accepted"),
    ("max_side", "largest accepted frame side, in pixels"),
    ("batch_size", "frames per forward pass"),
)


def _settings_flags(
    group: argparse._ArgumentGroup, prefix: str, defaults: object, flags: Sequence[tuple[str, str]]
) -> None:
    for name, help_text in flags:
        default = getattr(defaults, name)
        group.add_argument(
            prefix + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{help_text} (default {default:g})",
        )


def threads_argument(text: str) -> int | str:
    """``--threads``: a count or ``adaptive`` (argparse shows the reason of a refusal)."""
    try:
        return parse_threads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or hub repo id to start the Detect tab with")
    parser.add_argument("--models-dir", type=Path, help="allow-listed folder of model directories (default: models/)")
    parser.add_argument("--data-dir", type=Path, help="allow-listed folder of datasets (default: data/)")
    parser.add_argument("--runs-dir", type=Path, help="where fine-tuning runs are written (default: runs/)")
    parser.add_argument(
        "--labels-dir", type=Path, help="where visitors' Label-tab datasets are kept (default: labels/)"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="inference precision: auto (bf16 where the CPU/GPU has it natively, else fp32), fp32 or bf16",
    )
    parser.add_argument(
        "--threads",
        type=threads_argument,
        default=ADAPTIVE,
        help="torch CPU threads of forward passes: a count, or adaptive (default): per input shape, whichever of the "
        "CPUs this process may use (cgroup quota included) and one thread has lately been faster",
    )
    live = parser.add_argument_group("webcam stream (Detect tab, Webcam mode)")
    _settings_flags(live, "--live-", LiveSettings(), LIVE_FLAGS)
    live.add_argument(
        "--no-mirror-webcam", action="store_true", help="show and send the camera unmirrored (default: mirrored)"
    )
    video = parser.add_argument_group("video files (Detect tab, Video mode, and /detect_video)")
    _settings_flags(video, "--video-", VideoSettings(), VIDEO_FLAGS)
    parser.add_argument(
        "--training",
        choices=TRAINING_MODES,
        default="auto",
        help="how fine-tuning jobs run: in a child process one at a time, or in GPU slices driven by the owner's "
        "page as on ZeroGPU (default auto: slices on a ZeroGPU Space, else a process)",
    )
    parser.add_argument(
        "--admin-token",
        help=f"a secret that stops any visitor's job when given as the token (default: ${ADMIN_TOKEN_ENV})",
    )
    parser.add_argument("--share", action="store_true", help="create a temporary public gradio.live link")
    parser.add_argument("--host", help="address to bind (default: GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: GRADIO_SERVER_PORT or the first free from 7860)")
    return parser.parse_args(argv)


@dataclass
class LaunchedApp:
    demo: gr.Blocks
    url: str
    server: AppServer

    def close(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Stop serving, checkpoint the training job, delete the work folders."""
        self.demo.close()
        self.server.shutdown(grace)


def launch(
    config: AppConfig = AppConfig(),
    *,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> LaunchedApp:
    """Build, queue and launch the app with the hardened settings.

    ``block=False`` returns once the server is up (tests, notebooks); close it with ``.close()``. With
    ``block=True`` it returns when the server stops (Ctrl-C or SIGTERM), after the training job was checkpointed.
    """
    demo, server = create_app(config)
    atexit.register(server.shutdown)
    if block:
        _stop_on_sigterm()
    _, url, _ = demo.queue(**queue_options()).launch(
        prevent_thread_lock=not block, **launch_options(server.paths, server_name=host, server_port=port, share=share)
    )
    launched = LaunchedApp(demo=demo, url=url, server=server)
    if block:  # Gradio's blocking loop has ended: the server was asked to stop
        launched.close()
    return launched


def _stop_on_sigterm() -> None:
    """SIGTERM (what Spaces, Docker and systemd send) ends the server like Ctrl-C does, so that the training job is
    checkpointed before the process exits instead of losing every step since its last periodic checkpoint."""

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def config_from_args(args: argparse.Namespace) -> AppConfig:
    """The app's settings from its command line; ValueError names a bad value."""
    live = {name: getattr(args, f"live_{name}") for name, _ in LIVE_FLAGS}
    video = {name: getattr(args, f"video_{name}") for name, _ in VIDEO_FLAGS}
    return AppConfig(
        model=args.model,
        models_dir=args.models_dir,
        data_dir=args.data_dir,
        runs_dir=args.runs_dir,
        labels_dir=args.labels_dir,
        precision=args.precision,
        threads=args.threads,
        admin_token=args.admin_token,
        training=args.training,
        live=LiveSettings(**live, mirror=not args.no_mirror_webcam),
        video=VideoSettings(**video),
    )


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        raise SystemExit(f"app.py: error: {error}") from None
    pinned = args.threads if isinstance(args.threads, int) else None
    count = configure_threads(pinned)
    how = "pinned" if pinned else "adaptive: this many or one, whichever is faster per input shape"
    logging.getLogger(__name__).info("torch uses %d CPU threads (%s)", count, how)
    keep_freed_memory()
    launch(config, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    main()
