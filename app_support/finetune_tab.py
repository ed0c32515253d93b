"""The Fine-tune tab: choose data and a base model, start/stop/resume one server-side job, watch it learn.

Progress is polled (``gr.Timer``) from the server's single job rather than streamed to the page that started it,
so a reload, or a second visitor, sees the same running job. Each poll sends only what changed since the page's
last poll (``gr.skip()`` for the rest), so an idle page costs almost nothing.

A finished run's model downloads as a zip of its folder (``ddetr-<run>.zip``) and, on request, as ONNX
(``<run>-onnx.zip``: model.onnx, config.json, preprocessor_config.json). The ONNX export runs in the request that
asks for it, once per run: a lock makes the cache lookup and the export one step, and later requests get the
cached zip.
"""

from __future__ import annotations

import html
import math
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app_support.dataset_sources import (
    DATASET_KINDS,
    SHAPES_SIZES,
    SHAPES_TRAIN_RANGE,
    SHAPES_VALIDATION_RANGE,
    data_folder_entries,
    resolve_dataset,
)
from app_support.downloads import DownloadFolder
from app_support.errors import UserFacingError, user_errors
from app_support.model_choices import ModelRegistry
from app_support.paths import AppPaths
from app_support.training import APP_TRAINING_DEFAULTS, JobSnapshot, TrainingJobs, base_model_choices
from ddetr.drawing import draw_detections
from ddetr.export import ExportError, export_onnx

POLL_SECONDS = 2.0
IMAGE_SIZES: tuple[tuple[str, int], ...] = (
    ("model default", 0),
    ("128 px", 128),
    ("192 px", 192),
    ("256 px", 256),
    ("320 px", 320),
    ("512 px", 512),
    ("800 px", 800),
)
LOSS_SERIES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
MAP_SERIES = ("map", "map_50", "map_75")
METRIC_COLUMNS = ("step", "epoch", "map", "map_50", "map_75", "mar_100")
# Explicit column types: the plot fixes its axis types from the first frame it gets, and an empty frame would
# otherwise make every column "nominal" (one tick per distinct loss value, no line).
PLOT_TYPES = {"step": "int64", "value": "float64", "series": "string"}
ONNX_FILE = "model.onnx"


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
    visitor: str | None = None  # the browser's token (gr.BrowserState), for the Label tab's dataset


def loss_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {"step": r["step"], "value": r[name], "series": name}
        for r in records
        if r.get("type") == "train"
        for name in LOSS_SERIES
        if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])
    ]
    return pd.DataFrame(rows, columns=list(PLOT_TYPES)).astype(PLOT_TYPES)


def map_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {"step": r["step"], "value": max(0.0, r[name]), "series": name}
        for r in records
        if r.get("type") == "eval"
        for name in MAP_SERIES
        if isinstance(r.get(name), (int, float))
    ]
    return pd.DataFrame(rows, columns=list(PLOT_TYPES)).astype(PLOT_TYPES)


def metrics_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    def shown(value: Any) -> Any:
        # COCO reports -1 for an area bucket without objects; a table should say n/a.
        return "n/a" if isinstance(value, (int, float)) and value < 0 else value

    return [
        [shown(round(r[c], 4)) if isinstance(r.get(c), float) else r.get(c) for c in METRIC_COLUMNS]
        for r in records
        if r.get("type") == "eval"
    ]


def status_html(snapshot: JobSnapshot, paths: AppPaths) -> str:
    if snapshot.run_name is None:
        return "<p>No training job has run since the server started.</p>"
    total = max(snapshot.total_steps, 1)
    train = [r for r in snapshot.records if r.get("type") == "train"]
    speed = train[-1].get("steps_per_second") if train else None
    details = [f"<b>{html.escape(snapshot.state)}</b>", f"step {snapshot.step} / {snapshot.total_steps or '?'}"]
    if train and isinstance(train[-1].get("loss"), float):
        details.append(f"loss {train[-1]['loss']:.3f}")
    if snapshot.active and speed:
        remaining = (snapshot.total_steps - snapshot.step) / speed
        details.append(f"{speed:.2f} steps/s, about {remaining / 60:.1f} min left")
    if snapshot.message:
        details.append(html.escape(paths.redact(snapshot.message)))
    return (
        f'<div id="finetune-status-text">run {html.escape(snapshot.run_name)} · {" · ".join(details)}</div>'
        f'<progress value="{snapshot.step}" max="{total}" style="width:100%"></progress>'
    )


class FinetuneTab:
    def __init__(
        self,
        paths: AppPaths,
        jobs: TrainingJobs,
        registry: ModelRegistry,
        downloads: DownloadFolder,
        *,
        labelled_folder: Callable[[str | None], Path | None] = lambda token: None,
    ) -> None:
        self.paths = paths
        self.labelled_folder = labelled_folder
        self.jobs = jobs
        self.registry = registry
        self.downloads = downloads
        self._uploads: dict[str, Any] = {}  # upload path -> DatasetChoice, so Check then Start unpacks once
        self._zips: dict[str, str] = {}  # run name -> downloadable zip of its model
        self._onnx_zips: dict[str, Path] = {}  # run name -> downloadable zip of its ONNX export
        # Held while exporting and while looking up the cache, so two clicks never export the same run twice.
        self._onnx_lock = threading.Lock()

    # -- event handlers ----------------------------------------------------------------------------------------- #

    def _dataset(self, form: DatasetForm) -> Any:
        if form.kind == "upload" and form.upload and form.upload in self._uploads:
            return self._uploads[form.upload]
        choice = resolve_dataset(
            self.paths,
            form.kind,
            shapes_train=form.shapes_train,
            shapes_validation=form.shapes_validation,
            shapes_size=form.shapes_size,
            hub_id=form.hub_id,
            folder=form.folder,
            upload=form.upload,
            labelled=self.labelled_folder(form.visitor) if form.kind == "labelled" else None,
        )
        if form.kind == "upload" and form.upload:
            self._uploads = {form.upload: choice}
        return choice

    @user_errors
    def check_dataset(self, *form_values: Any) -> tuple[str, list[tuple[Any, str]]]:
        """Validate the chosen dataset and show its report and a few images with their boxes."""
        choice = self._dataset(DatasetForm(*form_values))
        preview = self.jobs.check_dataset(choice.source, choice.label)
        sizes = ", ".join(f"{name} {count}" for name, count in preview.split_sizes.items())
        header = f"{choice.label}: {len(preview.class_names)} classes ({', '.join(preview.class_names)}); {sizes}"
        gallery = [(draw_detections(image, truth), f"{len(truth)} objects") for image, truth in preview.samples]
        return f"{self.paths.redact(header)}\n\n{self.paths.redact(preview.report)}", gallery

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
    ) -> str:
        """Start a training job (one per server); returns the run's name."""
        form = DatasetForm(kind, shapes_train, shapes_validation, shapes_size, hub_id, folder, upload, visitor)
        choice = self._dataset(form)
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
        name = self.jobs.start(
            dataset_source=choice.source,
            description=choice.label,
            base_model=self._base_model_source(base_model),
            settings=settings,
        )
        gr.Info(f"Training started: run {name}")
        return name

    def _base_model_source(self, key: str) -> str:
        if key and key.startswith("preset:"):
            return key.removeprefix("preset:")
        return self.registry.get(key).source

    @user_errors
    def stop(self) -> str:
        stopped = self.jobs.stop()
        return "stopping after the current step (a checkpoint is saved)" if stopped else "no job is running"

    @user_errors
    def resume(self, run_name: str | None) -> str:
        if not run_name:
            raise ValueError("pick a stopped run to resume")
        return self.jobs.resume(run_name)

    @user_errors
    def refresh(self, last_version: Any) -> tuple[Any, ...]:
        """One poll: status always; plots, table, predictions and buttons only when the job changed."""
        snapshot = self.jobs.snapshot()
        status = status_html(snapshot, self.paths)
        if snapshot.version == last_version:
            return (status, *([gr.skip()] * 7), last_version)
        finished = snapshot.state == "finished" and snapshot.model_dir is not None
        gallery = [
            (draw_detections(image, found), f"{len(found)} detections") for image, found in self.jobs.predictions()
        ]
        return (
            status,
            loss_frame(snapshot.records),
            map_frame(snapshot.records),
            metrics_rows(snapshot.records),
            gallery,
            gr.update(interactive=finished),
            gr.update(value=self._model_zip(snapshot) if finished else None, visible=finished),
            gr.update(choices=self.jobs.resumable_runs()),
            snapshot.version,
        )

    def _model_zip(self, snapshot: JobSnapshot) -> str | None:
        name = snapshot.run_name or ""
        if name not in self._zips and snapshot.model_dir is not None:
            self._zips[name] = str(self.downloads.zip_directory(snapshot.model_dir, f"ddetr-{name}"))
        return self._zips.get(name)

    @user_errors
    def download_onnx(self) -> Any:
        """Export the last job's finished model to ONNX (once per run) and offer the zip of it and its JSON files."""
        snapshot = self.jobs.snapshot()
        if snapshot.state != "finished" or snapshot.run_name is None or snapshot.model_dir is None:
            raise ValueError("the last training job has not finished, so it has no model to export to ONNX yet")
        return gr.update(value=str(self._onnx_zip(snapshot.run_name, snapshot.model_dir)), visible=True)

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
    def use_in_detect(self) -> tuple[Any, Any]:
        """Switch the Detect tab to the model the last job exported."""
        snapshot = self.jobs.snapshot()
        if snapshot.state != "finished" or snapshot.run_name is None:
            raise ValueError("the last training job has not finished, so it has no model yet")
        key = f"run:{snapshot.run_name}"
        self.registry.get(key)  # listed, i.e. its export is complete
        return gr.update(choices=self.registry.dropdown_choices(), value=key), gr.Tabs(selected="detect")

    def status_json(self) -> dict[str, Any]:
        snapshot = self.jobs.snapshot()
        return {
            "run": snapshot.run_name,
            "state": snapshot.state,
            "step": snapshot.step,
            "total_steps": snapshot.total_steps,
            "records": snapshot.records,
        }

    def stream(self) -> Any:
        """Yield the job's status (with all records so far) whenever it changes, until the job ends."""
        last = None
        while True:
            snapshot = self.jobs.snapshot()
            if snapshot.version != last:
                last = snapshot.version
                yield self.status_json()
            if not snapshot.active:
                return
            self.jobs.wait(POLL_SECONDS / 4)

    # -- layout ------------------------------------------------------------------------------------------------- #

    def build(self, *, detect_model: gr.Dropdown, tabs: gr.Tabs, visitor: gr.BrowserState) -> gr.Radio:
        """``visitor`` is the browser's token (the Label tab's dataset); returns the dataset-kind picker."""
        """Create the tab's components inside the current ``gr.Tab`` and wire their events."""
        private = {"api_visibility": "private"}
        control = {"concurrency_id": "finetune_control", "concurrency_limit": 1}
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
                    resumable = gr.Dropdown(self.jobs.resumable_runs(), label="Stopped runs", scale=3)
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
        start.click(
            self.start, [*dataset_inputs, *settings_inputs, visitor], notice, **control, api_name="finetune_start"
        )
        stop.click(self.stop, None, notice, queue=False, api_name="finetune_stop")
        resume.click(self.resume, resumable, notice, **control, api_name="finetune_resume")
        poll_outputs = [status, loss_plot, map_plot, metrics, predictions, use, download, resumable, version]
        timer = gr.Timer(POLL_SECONDS)
        timer.tick(self.refresh, version, poll_outputs, show_progress="hidden", queue=False, **private)
        use.click(self.use_in_detect, None, [detect_model, tabs], **private, api_name="ui_use_in_detect")
        # The poll sets the model download when a job finishes (or a new one starts); the ONNX controls follow it.
        download.change(
            self.onnx_controls, download, [onnx, onnx_file], queue=False, **private, api_name="ui_onnx_controls"
        )
        onnx.click(
            self.download_onnx,
            None,
            onnx_file,
            concurrency_id="finetune_onnx",
            concurrency_limit=1,
            **private,
            api_name="ui_download_onnx",
        )

        with gr.Row(visible=False):
            status_json = gr.JSON(label="status")
            status_trigger = gr.Button("status")
            stream_trigger = gr.Button("stream")
        status_trigger.click(self.status_json, None, status_json, queue=False, api_name="finetune_status")
        stream_trigger.click(
            self.stream,
            None,
            status_json,
            concurrency_id="finetune_stream",
            concurrency_limit=8,
            api_name="finetune_stream",
        )
        return kind
