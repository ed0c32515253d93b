"""The Fine-tune tab: choose data and a base model, start/stop/resume an owned job, watch it learn.

Jobs belong to whoever started them (``owners``: the HF login, else the browser's token; API clients get a job
token). The page polls (``gr.Timer``) its owner's latest job, so a reload still shows and controls it; other
visitors see only the public summary. Each poll sends only what changed since the page's last poll (``gr.skip()``
for the rest), and reads a cached snapshot, so any number of idle pages cost almost nothing.

API: ``/finetune_start(...form...)`` returns ``{"run", "token", "state", "place_in_line"}``; ``/finetune_stop(token)``,
``/finetune_resume(run_name, token)`` and ``/finetune_stream(token)`` take that token as their last argument;
``/finetune_status()`` is the public summary. The admin token (``--admin-token``) stops any job.

A finished run's model downloads as a zip of its folder (``ddetr-<run>.zip``) and, on request, as ONNX
(``<run>-onnx.zip``: model.onnx, config.json, preprocessor_config.json), for its owner only. The ONNX export runs
in the request that asks for it, once per run: a lock makes the cache lookup and the export one step.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app_support.dataset_sources import (
    DATASET_KINDS,
    SHAPES_SIZES,
    SHAPES_TRAIN_RANGE,
    SHAPES_VALIDATION_RANGE,
    DatasetChoice,
    data_folder_entries,
    resolve_dataset,
)
from app_support.downloads import DownloadFolder
from app_support.errors import UserFacingError, as_user_error, user_errors
from app_support.finetune_view import METRIC_COLUMNS, loss_frame, map_frame, metrics_rows, status_html
from app_support.jobs import Job, JobSnapshot, NotYourJobError, TrainingJobs
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities, Owner, owner_of_job_token
from app_support.paths import AppPaths
from app_support.session_limits import RateLimit, SessionLimits, session_key
from app_support.slice_jobs import SliceRun
from app_support.training import (
    APP_TRAINING_DEFAULTS,
    CheckpointPreviews,
    base_model_choices,
    prepare_for_app,
    preview_dataset,
    training_config,
    validation_images,
)
from app_support.uploads import UploadStore
from ddetr.drawing import draw_detections
from ddetr.export import ExportError, export_onnx
from finetune.data.prepare import PreparedData
from finetune.presets import PRESETS
from finetune.run.hub_model import push_model
from finetune.run.setup import data_settings

POLL_SECONDS = 2.0
STREAM_POLL_SECONDS = 0.5
IMAGE_SIZES: tuple[tuple[str, int], ...] = (
    ("model default", 0),
    ("128 px", 128),
    ("192 px", 192),
    ("256 px", 256),
    ("320 px", 320),
    ("512 px", 512),
    ("800 px", 800),
)
ONNX_FILE = "model.onnx"
CHECKED_KEPT = 8  # owners whose last checked dataset is kept for their next Start
SLICE_QUEUE_WAIT_SECONDS = 600.0  # how long a page waits for its queued ZeroGPU job to start


class OnnxExportFailedError(UserFacingError):
    """A finished run's model could not be exported to ONNX; the message says why."""


@dataclass
class DatasetForm:
    """The dataset fields of the form, in the order the components are wired."""

    kind: str
    shapes_train: int
    shapes_validation: int
    shapes_size: int
    hub_id: str
    folder: str
    upload: str | None


@dataclass(frozen=True)
class FinetuneServices:
    """What the tab works with besides the page: jobs, models, identities, uploads and the visitor's datasets."""

    paths: AppPaths
    jobs: TrainingJobs
    registry: ModelRegistry
    downloads: DownloadFolder
    identities: Identities
    uploads: UploadStore
    previews: CheckpointPreviews
    labelled_folder: Callable[[str | None], Path | None] = lambda token: None
    # ZeroGPU: jobs train in GPU slices driven by their owner's page (``slice_jobs``), and only for a signed-in
    # owner, whose quota pays for them.
    slices: bool = False
    login_required: bool = False


class FinetuneTab:
    def __init__(self, services: FinetuneServices) -> None:
        self.services = services
        self.paths = services.paths
        self.jobs = services.jobs
        self.registry = services.registry
        self.downloads = services.downloads
        self.identities = services.identities
        self._checked: OrderedDict[str, PreparedData] = OrderedDict()  # owner key -> data their Check validated
        self._checked_lock = threading.Lock()
        self._zips: dict[str, str] = {}  # run name -> downloadable zip of its model
        self._onnx_zips: dict[str, Path] = {}  # run name -> downloadable zip of its ONNX export
        # Held while exporting and while looking up the cache, so two clicks never export the same run twice.
        self._onnx_lock = threading.Lock()
        self.streams = SessionLimits("progress streams", per_session=2, total=16)
        self.checks = SessionLimits("dataset checks", per_session=1, total=2)
        self.status_rate = RateLimit("status", calls=10, seconds=1.0)
        self._upload_sessions: dict[str, str] = {}  # session -> owner key, for sessions that uploaded a dataset

    # -- who is asking ------------------------------------------------------------------------------------------ #

    def _owner(self, visitor: str | None, profile: Any) -> Owner | None:
        return self.identities.owner(visitor, profile)

    def _own_job(self, visitor: str | None, profile: Any, token: str | None = None) -> Job | None:
        return self.jobs.latest_job(self._owner(visitor, profile), token)

    # -- dataset ------------------------------------------------------------------------------------------------ #

    def _dataset(
        self, form: DatasetForm, visitor: str | None, owner: Owner | None, request: gr.Request | None
    ) -> DatasetChoice:
        if form.kind == "upload" and owner is not None:
            self._upload_sessions[session_key(request)] = owner.key
        return resolve_dataset(
            self.paths,
            form.kind,
            shapes_train=form.shapes_train,
            shapes_validation=form.shapes_validation,
            shapes_size=form.shapes_size,
            hub_id=form.hub_id,
            folder=form.folder,
            upload=form.upload,
            uploads=self.services.uploads,
            owner_key=owner.key if owner is not None else None,
            labelled=self.services.labelled_folder(visitor) if form.kind == "labelled" else None,
        )

    def _prepare(self, choice: DatasetChoice, config: Any, owner_key: str | None) -> PreparedData:
        """The validated dataset: the one this owner's last Check validated with these settings, else afresh. A
        refused upload is deleted."""
        with self._checked_lock:
            checked = self._checked.pop(owner_key, None) if owner_key else None
        if checked is not None and checked.settings == data_settings(config):
            return checked
        try:
            return prepare_for_app(config, choice.label)
        except ValueError:
            self.services.uploads.discard(Path(choice.source), keep=self.jobs.active_datasets())
            raise

    @user_errors
    def check_dataset(
        self,
        kind: str,
        shapes_train: int,
        shapes_validation: int,
        shapes_size: int,
        hub_id: str,
        folder: str,
        upload: str | None,
        visitor: str | None = None,
        request: gr.Request | None = None,
        profile: gr.OAuthProfile | None = None,
    ) -> tuple[str, list[tuple[Any, str]]]:
        """Validate the chosen dataset and show its report and a few images with their boxes."""
        owner = self._owner(visitor, profile)
        form = DatasetForm(kind, shapes_train, shapes_validation, shapes_size, hub_id, folder, upload)
        with self.checks.hold(request):
            choice = self._dataset(form, visitor, owner, request)
            config = APP_TRAINING_DEFAULTS.with_overrides(dataset=choice.source)
            prepared = self._prepare(choice, config, None)
        if owner is not None:
            with self._checked_lock:
                self._checked[owner.key] = prepared
                while len(self._checked) > CHECKED_KEPT:
                    self._checked.popitem(last=False)
        preview = preview_dataset(prepared, choice.label)
        sizes = ", ".join(f"{name} {count}" for name, count in preview.split_sizes.items())
        header = f"{choice.label}: {len(preview.class_names)} classes ({', '.join(preview.class_names)}); {sizes}"
        gallery = [(draw_detections(image, truth), f"{len(truth)} objects") for image, truth in preview.samples]
        return f"{self.paths.redact(header)}\n\n{self.paths.redact(preview.report)}", gallery

    def release_session(self, request: gr.Request) -> None:
        """A page closed (or reloaded): delete the uploads its owner unpacked, except those a job trains on."""
        owner_key = self._upload_sessions.pop(session_key(request), None)
        if owner_key is not None:
            self.services.uploads.release(owner_key, keep=self.jobs.active_datasets())

    # -- control ------------------------------------------------------------------------------------------------ #

    @user_errors
    def start(
        self,
        kind: str,
        shapes_train: int,
        shapes_validation: int,
        shapes_size: int,
        hub_id: str,
        folder: str,
        upload: str | None,
        base_model: str,
        epochs: int,
        max_steps: int,
        batch_size: int,
        lr: float,
        image_size: int,
        eval_every: int,
        save_every: int,
        visitor: str | None = None,
        request: gr.Request | None = None,
        profile: gr.OAuthProfile | None = None,
    ) -> dict[str, Any]:
        """Validate the dataset and queue a training job owned by the requester; returns the run's name, the token
        that controls it, and its place in line."""
        if self.services.login_required and getattr(profile, "username", None) is None:
            raise ValueError(
                "sign in with Hugging Face to fine-tune here: training on this ZeroGPU Space uses your account's "
                "daily GPU quota"
            )
        owner = self._owner(visitor, profile)
        token = None
        if owner is None:  # an API client: the job's own token is its owner
            token, owner = owner_of_job_token()
        form = DatasetForm(kind, shapes_train, shapes_validation, shapes_size, hub_id, folder, upload)
        self.jobs.check_can_queue(owner.key)  # before validating: a refusal should cost nothing
        with self.checks.hold(request):
            choice = self._dataset(form, visitor, owner, request)
            # TrainConfig settings; 0 in the "max steps" and "image size" fields means "not set".
            settings = {
                "epochs": int(epochs),
                "max_steps": int(max_steps) if max_steps else None,
                "batch_size": int(batch_size),
                "lr": float(lr),
                "image_size": int(image_size) if image_size else None,
                "eval_every": int(eval_every),
                "save_every": int(save_every),
            }
            config = training_config(
                dataset=choice.source,
                model=self._base_model_source(base_model, owner),
                output_dir=self.jobs.new_run_dir(owner),
                **settings,
            )
            prepared = self._prepare(choice, config, owner.key)
        job, token = self.jobs.submit(
            owner, config, description=choice.label, validation_images=validation_images(prepared), token=token
        )
        snapshot = self.jobs.snapshot(job)
        where = "training" if snapshot.place_in_line == 0 else f"waiting, place {snapshot.place_in_line} in line"
        gr.Info(f"Run {job.name} queued: {where}")
        return {"run": job.name, "token": token, "state": snapshot.state, "place_in_line": snapshot.place_in_line}

    def _base_model_source(self, key: str, owner: Owner) -> str:
        """The base model a listed key names: a preset by name, else a model the registry lists for ``owner``.
        Nothing typed ever becomes a folder or a repo id."""
        if key and key.startswith("preset:"):
            name = key.removeprefix("preset:")
            if name not in PRESETS:
                raise ValueError(f"base model {key!r} is not available (refresh the page)")
            return name
        return self.registry.get(key, owner_key=owner.key).source

    @user_errors
    def stop(self, token: str | None, visitor: str | None = None, profile: gr.OAuthProfile | None = None) -> str:
        admin = self.identities.is_admin(token, profile)
        stopped = self.jobs.stop(self._owner(visitor, profile), token, admin=admin)
        if stopped is None:
            return "you have no job running or waiting" if not admin else "no job is running"
        return f"stopping run {stopped} after the current step (a checkpoint is saved)"

    @user_errors
    def resume(
        self,
        run_name: str | None,
        token: str | None,
        visitor: str | None = None,
        profile: gr.OAuthProfile | None = None,
    ) -> str:
        if not run_name:
            raise ValueError("pick a stopped run to resume")
        owner = self._owner(visitor, profile)
        known = self.jobs.job(run_name)
        pending = known is not None and isinstance(known.run, SliceRun) and known.run.state == "pending"
        if pending and known is not None and known.allows(owner, token):
            return f"run {run_name} resumed"  # started, never driven: this page's slices event trains it now
        job = self.jobs.resume(run_name, owner, token)
        snapshot = self.jobs.snapshot(job)
        if snapshot.place_in_line:
            return f"run {job.name} resumes when it is its turn (place {snapshot.place_in_line} in line)"
        return f"run {job.name} resumed"

    def train_slices(self, visitor: str | None = None, profile: gr.OAuthProfile | None = None) -> Iterator[str]:
        """ZeroGPU: train the owner's job slice after slice in this event (so the GPU time is charged to them)
        while the page is open; yields a line per slice for the notice."""
        if not self.services.slices:
            return
        job = self.jobs.latest_job(self._owner(visitor, profile))
        deadline = time.monotonic() + SLICE_QUEUE_WAIT_SECONDS
        while job is not None and job.run is None and time.monotonic() < deadline:
            yield f"run {job.name} waits for a place among the jobs training"
            time.sleep(2.0)  # in line (as many jobs train as the server allows): it starts when one ends
        run = job.run if job is not None else None
        if not isinstance(run, SliceRun):
            return
        try:
            for result in run.drive():
                yield (
                    f"slice {run.slices}: step {result.step} / {result.total_steps}, "
                    f"{run.gpu_seconds / 60:.1f} min of GPU used"
                )
        except ValueError as error:
            yield str(error)
            return
        yield run.message or f"run {job.name if job else ''}: {run.state}"

    # -- reporting ---------------------------------------------------------------------------------------------- #

    def _predictions(self, job: Job | None) -> list[tuple[Any, list[dict[str, Any]]]]:
        found = self.jobs.checkpoint_dir(job)
        if job is None or found is None or not job.validation_images:
            return []
        key, checkpoint = found
        return self.services.previews.predictions(key, job.directory, checkpoint, job.validation_images)

    @user_errors
    def refresh(
        self, last_version: Any, visitor: str | None = None, profile: gr.OAuthProfile | None = None
    ) -> tuple[Any, ...]:
        """One poll: status always; plots, table, predictions and buttons only when the owner's job changed."""
        owner = self._owner(visitor, profile)
        job = self.jobs.latest_job(owner)
        snapshot = self.jobs.snapshot(job)
        status = status_html(snapshot, self.paths, self.jobs.public_summary())
        version = (owner.key if owner else None, snapshot.version)
        if version == last_version:
            return (status, *([gr.skip()] * 7), last_version)
        finished = snapshot.state == "finished" and snapshot.model_dir is not None
        gallery = [
            (draw_detections(image, found), f"{len(found)} detections") for image, found in self._predictions(job)
        ]
        return (
            status,
            loss_frame(snapshot.records),
            map_frame(snapshot.records),
            metrics_rows(snapshot.records),
            gallery,
            gr.update(interactive=finished),
            gr.update(value=self._model_zip(snapshot) if finished else None, visible=finished),
            gr.update(choices=self.jobs.resumable_runs(owner.key if owner else None)),
            version,
        )

    def _model_zip(self, snapshot: JobSnapshot) -> str | None:
        name = snapshot.run_name or ""
        cached = self._zips.get(name)
        if (cached is None or not Path(cached).is_file()) and snapshot.model_dir is not None:
            # (again when the download folder pruned it)
            self._zips[name] = str(self.downloads.zip_directory(snapshot.model_dir, f"ddetr-{name}"))
        return self._zips.get(name)

    def _finished(self, visitor: str | None, profile: Any) -> tuple[str, Path]:
        """(run name, model folder) of the requester's last job, which must have finished."""
        snapshot = self.jobs.snapshot(self._own_job(visitor, profile))
        if snapshot.state != "finished" or snapshot.run_name is None or snapshot.model_dir is None:
            raise ValueError("your last training job has not finished, so it has no model yet")
        return snapshot.run_name, snapshot.model_dir

    @user_errors
    def download_onnx(self, visitor: str | None = None, profile: gr.OAuthProfile | None = None) -> Any:
        """Export the owner's finished model to ONNX (once per run) and offer the zip of it and its JSON files."""
        name, model_dir = self._finished(visitor, profile)
        return gr.update(value=str(self._onnx_zip(name, model_dir)), visible=True)

    def _onnx_zip(self, name: str, model_dir: Path) -> Path:
        with self._onnx_lock:
            cached = self._onnx_zips.get(name)
            if cached is not None and cached.is_file():  # the download folder may have pruned it: export again
                return cached
            with tempfile.TemporaryDirectory(dir=self.paths.scratch("onnx-export")) as directory:
                try:
                    export_onnx(model_dir, Path(directory) / ONNX_FILE)
                except ExportError as error:
                    message = self.paths.redact(str(error))
                    raise OnnxExportFailedError(f"the model of run {name} could not be exported: {message}") from error
                except ImportError as error:  # onnx is an optional dependency of ddetr
                    raise OnnxExportFailedError(
                        "ONNX export is not available on this server: it needs the onnx package "
                        '(pip install "ddetr[export]")'
                    ) from error
                zipped = self.downloads.zip_directory(Path(directory), f"{name}-onnx")
            self._onnx_zips[name] = zipped
            return zipped

    def onnx_controls(self, model_zip: Any) -> tuple[Any, Any]:
        """When the model download changes: "Download ONNX" works only while there is a model, and an earlier
        run's ONNX zip is hidden."""
        return gr.update(interactive=bool(model_zip)), gr.update(value=None, visible=False)

    @user_errors
    def use_in_detect(self, visitor: str | None = None, profile: gr.OAuthProfile | None = None) -> tuple[Any, Any]:
        """Switch the Detect tab to the model the owner's last job exported."""
        name, _ = self._finished(visitor, profile)
        owner = self._owner(visitor, profile)
        owner_key = owner.key if owner else None
        key = f"run:{name}"
        self.registry.get(key, owner_key=owner_key)  # listed, i.e. its export is complete
        return gr.update(choices=self.registry.dropdown_choices(owner_key), value=key), gr.Tabs(selected="detect")

    @user_errors
    def push_to_hub(
        self,
        repo_id: str,
        pasted_token: str,
        private: bool,
        visitor: str | None = None,
        profile: gr.OAuthProfile | None = None,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, str]:
        """Push the owner's finished model to the Hub with their login's token (write scope) or a pasted one, used
        once: returns the result and an empty token field (the pasted token leaves the page)."""
        name, _ = self._finished(visitor, profile)
        repo = (repo_id or "").strip()
        username = getattr(profile, "username", None)
        if repo and "/" not in repo and username:  # a bare name goes to the signed-in visitor's namespace
            repo = f"{username}/{repo}"
        token = (pasted_token or "").strip() or (oauth_token.token if oauth_token is not None else None)
        job = self._own_job(visitor, profile)
        if job is None:
            raise ValueError("your last training job has not finished, so it has no model yet")
        url = push_model(job.directory, repo, token=token, private=bool(private))
        return f"Pushed run {name} to [{repo}]({url}) ({'private' if private else 'public'}).", ""

    @user_errors
    def status_json(self, request: gr.Request | None = None) -> dict[str, Any]:
        """The public summary (cached, rate-limited per session): anyone may know whether the server trains."""
        self.status_rate.check(request)
        return self.jobs.public_summary()

    def _job_status(self, job: Job) -> dict[str, Any]:
        snapshot = self.jobs.snapshot(job)
        return {
            "run": snapshot.run_name,
            "state": snapshot.state,
            "step": snapshot.step,
            "total_steps": snapshot.total_steps,
            "place_in_line": snapshot.place_in_line,
            "message": self.paths.redact(snapshot.message),
            "records": snapshot.records,
        }

    async def stream(
        self, token: str | None, visitor: str | None = None, request: gr.Request | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the token's job status (with all records so far) whenever it changes, until the job ends. Async:
        a waiting stream holds no worker thread, and it never queues (the session's slot is taken or refused)."""
        try:
            with self.streams.hold(request):
                job = self.jobs.latest_job(self._owner(visitor, None), token)
                if job is None:
                    raise NotYourJobError("no job of yours to stream: pass the token /finetune_start returned")
                last = None
                while True:
                    snapshot = self.jobs.snapshot(job)
                    if snapshot.version != last:
                        last = snapshot.version
                        yield self._job_status(job)
                    if not snapshot.active:
                        return
                    await asyncio.sleep(STREAM_POLL_SECONDS)
        except Exception as error:
            raise as_user_error(error) from error

    # -- layout ------------------------------------------------------------------------------------------------- #

    def build(self, *, detect_model: gr.Dropdown, tabs: gr.Tabs, visitor: gr.BrowserState) -> gr.Radio:
        """Create the tab's components inside the current ``gr.Tab`` and wire their events; ``visitor`` is the
        browser's token (who owns jobs, and the Label tab's dataset). Returns the dataset-kind picker."""
        private = {"api_visibility": "private"}
        # Check and Start validate datasets: a group of their own (never Stop's or Detect's), two at a time, each
        # session one at a time (``self.checks``).
        control = {"concurrency_id": "finetune_check", "concurrency_limit": 2}
        with gr.Row():
            with gr.Column():
                gr.Markdown("### 1. Dataset")
                kind = gr.Radio(list(DATASET_KINDS), value="shapes", label="Dataset", elem_id="dataset-kind")
                with gr.Group(visible=True) as shapes_group:
                    shapes_train = gr.Slider(
                        *SHAPES_TRAIN_RANGE, value=200, step=1, label="Training images", elem_id="shapes-train"
                    )
                    shapes_validation = gr.Slider(
                        *SHAPES_VALIDATION_RANGE,
                        value=40,
                        step=1,
                        label="Validation images",
                        elem_id="shapes-validation",
                    )
                    shapes_size = gr.Dropdown(
                        list(SHAPES_SIZES), value=192, label="Image size (px)", elem_id="shapes-size"
                    )
                with gr.Group(visible=False) as hub_group:
                    hub_id = gr.Textbox("", label="Hub dataset id (cppe-5 schema)", placeholder="owner/name")
                with gr.Group(visible=False) as folder_group:
                    folder = gr.Dropdown(
                        data_folder_entries(self.paths),
                        value="",
                        allow_custom_value=True,
                        label="Path under data/ (COCO JSON + images, image folder + metadata.jsonl, or save_to_disk)",
                    )
                with gr.Group(visible=False) as upload_group:
                    upload = gr.File(
                        file_types=[".zip"],
                        label="Dataset zip (COCO, YOLO, Pascal VOC, Label Studio, CVAT, or images + metadata.jsonl)",
                    )
                with gr.Group(visible=False) as labelled_group:
                    gr.Markdown("The images you labelled in the Label tab (saved as COCO in your own folder).")
                check = gr.Button("Check dataset", elem_id="check-dataset")
                report = gr.Code(label="Validation report", language=None, interactive=False, lines=6)
                preview = gr.Gallery(label="Training images with their boxes", columns=4, height=220)
            with gr.Column():
                gr.Markdown("### 2. Model and settings")
                base_choices = base_model_choices(self.registry.dropdown_choices())
                default_base = "bundled" if any(key == "bundled" for _, key in base_choices) else "preset:small"
                base_model = gr.Dropdown(base_choices, value=default_base, label="Base model", elem_id="base-model")
                initial = APP_TRAINING_DEFAULTS  # the form starts at the app's training defaults
                with gr.Row():
                    epochs = gr.Number(
                        initial.epochs, label="Epochs", precision=0, minimum=1, maximum=500, elem_id="epochs"
                    )
                    max_steps = gr.Number(
                        initial.max_steps or 0,
                        label="Max steps (0: by epochs)",
                        precision=0,
                        minimum=0,
                        elem_id="max-steps",
                    )
                    batch_size = gr.Slider(
                        1, 16, value=initial.batch_size, step=1, label="Batch size", elem_id="batch-size"
                    )
                with gr.Row():
                    lr = gr.Number(initial.lr, label="Learning rate", minimum=1e-7, maximum=1e-2)
                    image_size = gr.Dropdown(
                        list(IMAGE_SIZES), value=initial.image_size or 0, label="Image size (shortest edge)"
                    )
                with gr.Row():
                    eval_every = gr.Number(
                        initial.eval_every, label="Evaluate every (epochs)", precision=0, minimum=0, maximum=100
                    )
                    save_every = gr.Number(
                        initial.save_every, label="Checkpoint every (steps)", precision=0, minimum=1, maximum=100000
                    )
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="finetune-start")
                    stop = gr.Button("Stop", variant="stop", elem_id="finetune-stop")
                with gr.Row():
                    resumable = gr.Dropdown(
                        [], label="Your stopped runs", allow_custom_value=True, scale=3, elem_id="resumable-runs"
                    )
                    resume = gr.Button("Resume", scale=1, elem_id="finetune-resume")
                notice = gr.Textbox(label="Last action", interactive=False, elem_id="finetune-notice")
        gr.Markdown("### 3. Training")
        status = gr.HTML(elem_id="finetune-status")
        with gr.Row():
            loss_plot = gr.LinePlot(
                x="step", y="value", color="series", title="Training loss", height=260, elem_id="loss-plot"
            )
            map_plot = gr.LinePlot(
                x="step",
                y="value",
                color="series",
                title="Validation mAP",
                y_lim=[0, 1],
                height=260,
                elem_id="map-plot",
            )
        metrics = gr.Dataframe(headers=list(METRIC_COLUMNS), label="Evaluations", interactive=False)
        predictions = gr.Gallery(
            label="Latest checkpoint on validation images (after the first checkpoint)", columns=4, height=240
        )
        with gr.Row():
            use = gr.Button("Use in Detect", interactive=False, elem_id="use-in-detect")
            download = gr.File(
                label="Trained model (zip: loads with ddetr and transformers)", interactive=False, visible=False
            )
            onnx = gr.Button("Download ONNX", interactive=False, elem_id="download-onnx")
            onnx_file = gr.File(
                label="ONNX model (zip: model.onnx, config.json, preprocessor_config.json)",
                interactive=False,
                visible=False,
                elem_id="download-onnx-file",
            )
        with gr.Accordion("Push the finished model to the Hugging Face Hub", open=False):
            with gr.Row():
                push_repo = gr.Textbox(
                    label="Model repo (owner/name; a bare name goes to your account when signed in)",
                    placeholder="your-name/my-detector",
                    elem_id="push-model-repo",
                )
                push_token = gr.Textbox(
                    label="Token with write access (used once, never stored; empty: your sign-in's)",
                    type="password",
                    elem_id="push-model-token",
                )
                push_private = gr.Checkbox(True, label="Private", elem_id="push-model-private")
            push = gr.Button("Push to Hub", elem_id="push-model")
            push_result = gr.Markdown(elem_id="push-model-result")
        version = gr.State(None)

        groups = {
            "shapes": shapes_group,
            "hub": hub_group,
            "folder": folder_group,
            "upload": upload_group,
            "labelled": labelled_group,
        }
        kind.change(
            lambda value: [gr.update(visible=value == name) for name in groups],
            kind,
            list(groups.values()),
            **private,
            api_name="ui_dataset_kind",
        )
        dataset_inputs = [kind, shapes_train, shapes_validation, shapes_size, hub_id, folder, upload]
        check.click(
            self.check_dataset, [*dataset_inputs, visitor], [report, preview], **control, **private, api_name="ui_check"
        )
        settings_inputs = [base_model, epochs, max_steps, batch_size, lr, image_size, eval_every, save_every]
        # The browser's token goes last: state is not part of the API, so /finetune_start keeps its arguments.
        # The page's own job token stays empty: the browser's token (state, not part of the API) says who it is.
        with gr.Row(visible=False):
            job_token = gr.Textbox("", label="job token", elem_id="finetune-token")
            started = gr.JSON(label="started")
        started_event = start.click(
            self.start, [*dataset_inputs, *settings_inputs, visitor], started, **control, api_name="finetune_start"
        ).then(_started_notice, started, notice, queue=False, **private, api_name="ui_started_notice")
        # Unqueued: Stop answers however full the queue is.
        stop.click(self.stop, [job_token, visitor], notice, queue=False, api_name="finetune_stop")
        resumed_event = resume.click(
            self.resume, [resumable, job_token, visitor], notice, queue=False, api_name="finetune_resume"
        )
        if self.services.slices:  # ZeroGPU: the page that started (or resumed) a job trains it, slice by slice
            slices = {"concurrency_id": "finetune_slices", "concurrency_limit": None, **private}
            started_event.then(self.train_slices, visitor, notice, api_name="ui_train_slices", **slices)
            resumed_event.then(self.train_slices, visitor, notice, api_name="ui_resume_slices", **slices)
        poll_outputs = [status, loss_plot, map_plot, metrics, predictions, use, download, resumable, version]
        timer = gr.Timer(POLL_SECONDS)
        timer.tick(self.refresh, [version, visitor], poll_outputs, show_progress="hidden", queue=False, **private)
        use.click(self.use_in_detect, visitor, [detect_model, tabs], **private, api_name="ui_use_in_detect")
        # The poll sets the model download when a job finishes (or a new one starts); the ONNX controls follow it.
        download.change(
            self.onnx_controls, download, [onnx, onnx_file], queue=False, **private, api_name="ui_onnx_controls"
        )
        onnx.click(
            self.download_onnx,
            visitor,
            onnx_file,
            concurrency_id="finetune_onnx",
            concurrency_limit=1,
            **private,
            api_name="ui_download_onnx",
        )

        push.click(
            self.push_to_hub,
            [push_repo, push_token, push_private, visitor],
            [push_result, push_token],
            concurrency_id="hub_push",
            concurrency_limit=2,
            **private,
            api_name="ui_push_model",
        )

        with gr.Row(visible=False):
            status_json = gr.JSON(label="status")
            status_trigger = gr.Button("status")
            stream_trigger = gr.Button("stream")
        status_trigger.click(self.status_json, None, status_json, queue=False, api_name="finetune_status")
        # No concurrency slot to wait for: a stream starts at once or is refused (``self.streams``).
        stream_trigger.click(
            self.stream,
            [job_token, visitor],
            status_json,
            concurrency_limit=None,
            api_name="finetune_stream",
        )
        return kind


def _started_notice(result: Any) -> str:
    if not isinstance(result, dict) or "run" not in result:
        return ""
    place = result.get("place_in_line") or 0
    return f"run {result['run']} started" if not place else f"run {result['run']} waits: place {place} in line"
