"""The Fine-tune tab's pieces, called directly: dataset choices, owned jobs, polling, the trained model."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

import app_support.finetune_tab as finetune_tab_module
import ddetr
from app_support.dataset_sources import DatasetChoiceError, hub_choice, resolve_dataset, shapes_choice
from app_support.downloads import DownloadFolder
from app_support.finetune_tab import FinetuneServices, FinetuneTab
from app_support.finetune_view import loss_frame, map_frame, metrics_rows
from app_support.jobs import JobBusyError, TrainingJobs
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities
from app_support.paths import AppPaths, PathNotAllowedError
from app_support.training import APP_OVERRIDES, APP_TRAINING_DEFAULTS, CheckpointPreviews
from app_support.uploads import UploadStore
from app_support.visitors import Visitors
from ddetr.export import ExportError, export_onnx
from finetune.config import TrainConfig

TINY_SHAPES = {"kind": "shapes", "shapes_train": 16, "shapes_validation": 4, "shapes_size": 128}
FORM_DEFAULTS = {"hub_id": "", "folder": "", "upload": None}


def form(**overrides) -> list:
    values = {**TINY_SHAPES, **FORM_DEFAULTS, **overrides}
    return [
        values[k] for k in ("kind", "shapes_train", "shapes_validation", "shapes_size", "hub_id", "folder", "upload")
    ]


def start_args(visitor: str | None, *, epochs: int = 1, max_steps: int = 0, save_every: int = 2) -> list:
    # base model, epochs, max steps, batch size, lr, image size, eval every, checkpoint every, the browser's token
    return [*form(), "preset:tiny", epochs, max_steps, 4, 2e-4, 0, 1, save_every, visitor]


@pytest.fixture
def paths(tmp_path: Path) -> AppPaths:
    return AppPaths.from_root(tmp_path, work=tmp_path / "work")


def make_tab(paths: AppPaths, launcher=None) -> FinetuneTab:
    jobs = TrainingJobs(paths.runs, launcher=launcher)
    registry = ModelRegistry(paths.models, hub_reachable=lambda: False, finetuned=jobs.finished_models)
    services = FinetuneServices(
        paths=paths,
        jobs=jobs,
        registry=registry,
        downloads=DownloadFolder(paths.scratch("models")),
        identities=Identities(Visitors(paths.labels), admin_token=ADMIN_TOKEN),
        uploads=UploadStore(paths.scratch("uploads")),
        previews=CheckpointPreviews(),
    )
    return FinetuneTab(services)


ADMIN_TOKEN = "admin-secret-for-tests"


@pytest.fixture
def tab(paths: AppPaths) -> FinetuneTab:
    tab = make_tab(paths)
    yield tab
    tab.jobs.shutdown(30)
    tab.jobs.wait(60)


class FinishedAtOnce:
    """A launched job that ends at once (the tests of what the server does before training need no training)."""

    state = "finished"
    done = True
    error = None

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def records(self, *, kind=None) -> list:
        return []

    def stop(self, *, wait=False, timeout=None) -> None:
        return None

    def stop_then_kill(self, grace: float) -> str:
        return self.state

    def wait(self, timeout=None) -> None:
        return None

    def log_tail(self, lines: int = 20) -> str:
        return ""


@pytest.fixture
def launched() -> list[TrainConfig]:
    return []


@pytest.fixture
def quick_tab(paths: AppPaths, launched: list[TrainConfig]) -> FinetuneTab:
    """The tab with jobs that end as soon as they are launched (their configs in ``launched``)."""

    def launch(config: TrainConfig) -> FinishedAtOnce:
        launched.append(config)
        return FinishedAtOnce(config)

    tab = make_tab(paths, launcher=launch)
    yield tab
    tab.jobs.shutdown(5)


@pytest.fixture
def visitor(tab: FinetuneTab) -> str:
    """A browser's token, as the page load issues it."""
    token, _ = tab.identities.visitors.claim(None)
    return token


def own_snapshot(tab: FinetuneTab, visitor: str):
    return tab.jobs.snapshot(tab.jobs.latest_job(tab.identities.owner(visitor)))


def wait_for(predicate, timeout: float = 120.0, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def coco_zip(path: Path) -> Path:
    images, annotations = [], []
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(6):
            image = PIL.Image.new("RGB", (96, 64), (240, 240, 240))
            image.paste((200, 20, 20), (10 + index, 10, 40 + index, 40))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            archive.writestr(f"set/images/{index}.png", buffer.getvalue())
            images.append({"id": index, "file_name": f"{index}.png", "width": 96, "height": 64})
            annotations.append({"id": index, "image_id": index, "category_id": 7, "bbox": [10 + index, 10, 30, 30]})
        annotations.append({"id": 99, "image_id": 0, "category_id": 7, "bbox": [50, 50, -4, 3]})  # degenerate
        coco = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "block"}]}
        archive.writestr("set/annotations.json", json.dumps(coco))
    return path


# -- dataset choices -------------------------------------------------------------------------------------------- #


def test_dataset_choices_are_bounded_and_never_leave_the_allow_list(paths: AppPaths, tmp_path: Path):
    assert shapes_choice(16, 4, 128).source == "shapes:train=16,validation=4,test=0,size=128"
    for train, validation, size in ((4, 4, 128), (10**6, 4, 128), (16, 4, 100)):
        with pytest.raises(DatasetChoiceError):
            shapes_choice(train, validation, size)
    assert hub_choice("rishitdagli/cppe-5").source == "rishitdagli/cppe-5"
    (tmp_path / "local-name").mkdir()
    for bad in ("", "../etc", "/etc/passwd", "a/b/c", "shapes", "local-name", "owner/..", "x y"):
        with pytest.raises(DatasetChoiceError):
            hub_choice(bad, cwd=tmp_path)
    for bad in ("/etc", "../runs", "missing"):
        with pytest.raises(PathNotAllowedError):
            resolve_dataset(paths, "folder", folder=bad)
    with pytest.raises(DatasetChoiceError, match="upload"):
        resolve_dataset(paths, "upload", upload=None)
    with pytest.raises(DatasetChoiceError, match="unknown dataset kind"):
        resolve_dataset(paths, "ftp")


def test_check_dataset_previews_an_uploaded_coco_zip(tab: FinetuneTab, tmp_path: Path, visitor: str):
    archive = coco_zip(tmp_path / "d.zip")
    report, gallery = tab.check_dataset(*form(kind="upload", upload=str(archive)), visitor)
    assert "1 classes (block)" in report
    assert "zero_or_negative_size" in report  # the degenerate box is reported, not trained on
    assert str(tmp_path) not in report  # server paths are not shown to visitors
    assert len(gallery) == 4 and all(isinstance(image, PIL.Image.Image) for image, _ in gallery)
    assert gallery[0][1] == "1 objects"
    # Checking the same zip again (or starting on it) unpacks nothing more: one folder, the same bytes on disk.
    uploads = tab.services.uploads.root
    before = sorted(p for p in uploads.rglob("*"))
    tab.check_dataset(*form(kind="upload", upload=str(archive)), visitor)
    assert sorted(p for p in uploads.rglob("*")) == before and len(list(uploads.glob("*/*"))) == 1


def test_check_dataset_reports_broken_zips(tab: FinetuneTab, tmp_path: Path, visitor: str):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 nope")
    with pytest.raises(gr.Error, match="not a zip"):
        tab.check_dataset(*form(kind="upload", upload=str(tmp_path / "bad.zip")), visitor)
    with pytest.raises(gr.Error, match="outside the allowed folder"):
        tab.check_dataset(*form(kind="folder", folder="../../etc"), visitor)
    assert list(tab.services.uploads.root.rglob("*.png")) == []  # a refused upload leaves nothing behind


# -- the training job ------------------------------------------------------------------------------------------- #


def test_one_job_stop_within_a_step_resume_and_use_in_detect(tab: FinetuneTab, visitor: str):
    jobs = tab.jobs
    started = tab.start(*start_args(visitor, epochs=4))  # 16 steps: enough to stop in the middle, quick to finish
    run = started["run"]
    assert started["place_in_line"] == 0 and len(started["token"]) >= 32
    wait_for(lambda: own_snapshot(tab, visitor).state == "running")
    # One more job of this owner may wait in line, not two.
    waiting = tab.start(*start_args(visitor))
    assert waiting["place_in_line"] == 1
    with pytest.raises(gr.Error, match="already have a job waiting"):
        tab.start(*start_args(visitor))
    assert tab.stop(waiting["token"]).startswith(f"stopping run {waiting['run']}")  # leaves the line
    with pytest.raises(JobBusyError):
        jobs.resume(run, tab.identities.owner(visitor), None)

    wait_for(lambda: own_snapshot(tab, visitor).step >= 2 and own_snapshot(tab, visitor).run_name == run)
    step_at_stop = own_snapshot(tab, visitor).step
    assert tab.stop("", visitor).startswith(f"stopping run {run}")
    jobs.wait(60)
    wait_for(lambda: own_snapshot(tab, visitor).state == "stopped", timeout=10)
    stopped = own_snapshot(tab, visitor)
    assert step_at_stop <= stopped.step <= step_at_stop + 2  # the step in flight finishes, then a checkpoint
    owner_key = tab.identities.owner_key(visitor)
    assert jobs.resumable_runs(owner_key) == [run]
    assert tab.stop("", visitor) == "you have no job running or waiting"

    # Polling: everything on a change, and only the status text when nothing changed since the last poll.
    status, losses, maps, table, gallery, use, download, resumable, version = tab.refresh(None, visitor)
    assert "stopped" in status and f"step {stopped.step}" in status
    assert isinstance(losses, pd.DataFrame) and set(losses["series"]) >= {"loss", "loss_ce"}
    assert isinstance(maps, pd.DataFrame) and [row[0] for row in table] == sorted({row[0] for row in table})
    assert len(gallery) == 4  # the latest checkpoint's predictions on the validation images
    assert use["interactive"] is False and download["visible"] is False
    assert resumable["choices"] == [run]
    again = tab.refresh(version, visitor)
    assert all(
        isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1 for value in again[1:8]
    )

    assert tab.resume(run, "", visitor) == f"run {run} resumed"
    wait_for(lambda: own_snapshot(tab, visitor).state == "running", timeout=60)
    jobs.wait(120)
    wait_for(lambda: own_snapshot(tab, visitor).state == "finished", timeout=10)
    finished = own_snapshot(tab, visitor)
    assert finished.step == finished.total_steps
    steps = [r["step"] for r in finished.records if r.get("type") == "train"]
    assert steps[0] == 1 and steps == sorted(set(steps))  # one record per step, the resumed ones continuing
    assert jobs.resumable_runs(owner_key) == []

    *_, use, download, _, _ = tab.refresh(None, visitor)
    assert use["interactive"] is True and download["visible"] is True
    detect_update, tabs_update = tab.use_in_detect(visitor)
    assert (
        detect_update["value"] == f"run:{run}"
        and (f"{run} (fine-tuned here)", f"run:{run}") in detect_update["choices"]
    )
    assert tabs_update.selected == "detect"

    # The downloadable zip unpacks to a folder that ddetr loads.
    with zipfile.ZipFile(download["value"]) as archive:
        archive.extractall(tab.paths.work / "unzipped")
    folder = tab.paths.work / "unzipped" / f"ddetr-{run}"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    detector = ddetr.pipeline(model=folder)
    assert sorted(detector.model.config.id2label.values()) == sorted(
        ["circle", "square", "triangle", "star", "cross", "ring"]
    )
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForObjectDetection.from_pretrained(folder)
    assert reference.config.id2label == {int(k): v for k, v in detector.model.config.id2label.items()}


def test_a_dataset_is_validated_once_per_start_in_the_server(quick_tab: FinetuneTab, validations: list):
    # (The training child validates once more for itself, in its own process.)
    tab = quick_tab
    visitor, _ = tab.identities.visitors.claim(None)
    tab.check_dataset(*form(), visitor)
    splits = len(validations)
    assert splits >= 2  # train and validation at least, once each
    # Start after Check queues the checked data: no further validation in the server.
    first = tab.start(*start_args(visitor, max_steps=1))["run"]
    assert len(validations) == splits
    tab.jobs.wait(120)
    # Start without Check (the checked data was for one Start): validated once.
    second = tab.start(*start_args(visitor, max_steps=1))["run"]
    assert second != first and len(validations) == 2 * splits
    tab.jobs.wait(120)
    # Checking another dataset first does not hand its data to a Start on this one.
    tab.check_dataset(*form(shapes_train=17), visitor)
    tab.start(*start_args(visitor, max_steps=1))
    assert len(validations) == 4 * splits


def test_the_form_starts_at_the_app_training_defaults(tab: FinetuneTab):
    with gr.Blocks() as demo, gr.Tabs() as tabs:
        with gr.Tab("Detect", id="detect"):
            detect_model = gr.Dropdown([], label="Model")
        with gr.Tab("Fine-tune", id="finetune"):
            tab.build(detect_model=detect_model, tabs=tabs, visitor=gr.BrowserState(None))
    fields = {getattr(block, "label", None): block for block in demo.blocks.values()}
    initial = {
        "epochs": fields["Epochs"].value,
        "max_steps": fields["Max steps (0: by epochs)"].value,
        "batch_size": fields["Batch size"].value,
        "lr": fields["Learning rate"].value,
        "image_size": fields["Image size (shortest edge)"].value,
        "eval_every": fields["Evaluate every (epochs)"].value,
        "save_every": fields["Checkpoint every (steps)"].value,
    }
    assert initial == {
        "epochs": APP_TRAINING_DEFAULTS.epochs,
        "max_steps": APP_TRAINING_DEFAULTS.max_steps or 0,
        "batch_size": APP_TRAINING_DEFAULTS.batch_size,
        "lr": APP_TRAINING_DEFAULTS.lr,
        "image_size": APP_TRAINING_DEFAULTS.image_size or 0,
        "eval_every": APP_TRAINING_DEFAULTS.eval_every,
        "save_every": APP_TRAINING_DEFAULTS.save_every,
    }
    # The app's defaults are TrainConfig's except for APP_OVERRIDES (and the placeholders replaced on Start).
    declared = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    expected = {**declared, **APP_OVERRIDES, "dataset": "shapes"}
    assert APP_TRAINING_DEFAULTS.to_dict() == expected
    assert APP_TRAINING_DEFAULTS.backbone_lr == APP_TRAINING_DEFAULTS.lr / 10


def test_started_runs_take_the_form_settings_and_derive_the_backbone_lr(
    quick_tab: FinetuneTab, launched: list[TrainConfig]
):
    visitor, _ = quick_tab.identities.visitors.claim(None)
    run = quick_tab.start(*form(), "preset:tiny", 3, 1, 2, 1e-3, 128, 0, 7, visitor)["run"]
    (config,) = launched
    owner_key = quick_tab.identities.owner_key(visitor)
    assert Path(config.output_dir) == quick_tab.paths.runs / str(owner_key) / run  # in the owner's folder
    expected = APP_TRAINING_DEFAULTS.with_overrides(
        dataset=config.dataset, model="tiny", output_dir=config.output_dir, epochs=3, max_steps=1, batch_size=2,
        lr=1e-3, image_size=128, eval_every=0, save_every=7,
    )  # fmt: skip
    assert config.to_dict() == expected.to_dict()
    assert config.lr_backbone is None and config.log_every == 1 and config.num_workers == 0
    assert config.backbone_lr == pytest.approx(1e-4)


async def _collect(stream) -> list:
    return [update async for update in stream]


def test_use_in_detect_needs_a_finished_job(tab: FinetuneTab, visitor: str):
    with pytest.raises(gr.Error, match="has not finished"):
        tab.use_in_detect(visitor)
    assert tab.status_json() == {
        "busy": False, "state": "idle", "step": 0, "total_steps": 0, "eta_seconds": None, "waiting": 0
    }  # fmt: skip
    with pytest.raises(gr.Error, match="no job of yours"):
        asyncio.run(_collect(tab.stream("", visitor)))


def test_bad_settings_are_refused_before_anything_runs(tab: FinetuneTab, visitor: str):
    with pytest.raises(gr.Error, match="batch_size"):
        tab.start(*form(), "preset:tiny", 1, 0, 0, 2e-4, 0, 1, 2, visitor)
    with pytest.raises(gr.Error, match="not available"):
        tab.start(*form(), "dir:../../etc", 1, 0, 4, 2e-4, 0, 1, 2, visitor)
    # A "preset" is one of the presets: nothing typed becomes a folder or a repo id the training child loads.
    for typed in ("preset:/etc", "preset:someone/private-model", "preset:../../runs", "preset:"):
        with pytest.raises(gr.Error, match="not available"):
            tab.start(*form(), typed, 1, 0, 4, 2e-4, 0, 1, 2, visitor)
    with pytest.raises(gr.Error, match="not a run name"):
        tab.resume("../../etc", "", visitor)
    assert own_snapshot(tab, visitor).state == "idle" and list(tab.paths.runs.iterdir()) == []


def test_metric_frames_have_fixed_types():
    records = [
        {"type": "train", "step": 1, "loss": 3.0, "loss_ce": 1.0, "loss_bbox": float("nan")},
        {"type": "eval", "step": 1, "epoch": 1.0, "map": 0.25, "map_50": 0.5, "map_75": -1.0, "mar_100": 0.3},
    ]
    losses = loss_frame(records)
    assert list(losses["series"]) == ["loss", "loss_ce"]  # NaN is left out, not plotted
    assert str(losses["value"].dtype) == "float64" and str(loss_frame([])["value"].dtype) == "float64"
    assert map_frame(records)["value"].tolist() == [0.25, 0.5, 0.0]
    assert metrics_rows(records) == [[1, 1.0, 0.25, 0.5, "n/a", 0.3]]


# -- the ONNX download ------------------------------------------------------------------------------------------ #


def test_download_onnx_needs_a_finished_job(tab: FinetuneTab, visitor: str):
    with pytest.raises(gr.Error, match="has not finished"):
        tab.download_onnx(visitor)
    # The button follows the model download that the poll sets: enabled with a model, and an old ONNX zip hidden.
    button, onnx_file = tab.onnx_controls(None)
    assert button["interactive"] is False and onnx_file["visible"] is False and onnx_file["value"] is None
    assert tab.onnx_controls("ddetr-run.zip")[0]["interactive"] is True
    with gr.Blocks() as demo, gr.Tabs() as tabs:
        with gr.Tab("Detect", id="detect"):
            detect_model = gr.Dropdown([], label="Model")
        with gr.Tab("Fine-tune", id="finetune"):
            tab.build(detect_model=detect_model, tabs=tabs, visitor=gr.BrowserState(None))
    buttons = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "download-onnx"]
    assert len(buttons) == 1 and buttons[0].value == "Download ONNX" and buttons[0].interactive is False


def test_download_onnx_exports_a_finished_run_once_and_matches_pytorch(
    tab: FinetuneTab, visitor: str, monkeypatch: pytest.MonkeyPatch
):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    run = tab.start(*start_args(visitor, max_steps=1))["run"]
    tab.jobs.wait(120)
    wait_for(lambda: own_snapshot(tab, visitor).state == "finished", timeout=10)
    snapshot = own_snapshot(tab, visitor)
    assert snapshot.state == "finished" and snapshot.model_dir is not None

    # A failed export is a message for the visitor, without server paths, and is not cached.
    def failing(model, output, **settings):
        raise ExportError(f"cannot load a model from {str(model)!r}")

    monkeypatch.setattr(finetune_tab_module, "export_onnx", failing)
    with pytest.raises(gr.Error, match=f"run {run} could not be exported") as failed:
        tab.download_onnx(visitor)
    assert str(tab.paths.runs) not in str(failed.value) and "runs/" in str(failed.value)

    def without_onnx(model, output, **settings):
        raise ModuleNotFoundError("No module named 'onnx'")

    monkeypatch.setattr(finetune_tab_module, "export_onnx", without_onnx)
    with pytest.raises(gr.Error, match="needs the onnx package"):
        tab.download_onnx(visitor)

    # Two clicks at once export once; a later click gets the same zip without exporting again.
    exports = []

    def counting(*args, **settings):
        exports.append(args)
        return export_onnx(*args, **settings)

    monkeypatch.setattr(finetune_tab_module, "export_onnx", counting)
    together = threading.Barrier(2)
    results: list = [None, None]

    def click(index: int) -> None:
        together.wait()
        try:
            results[index] = tab.download_onnx(visitor)
        except Exception as error:  # reported by the assertion below
            results[index] = error

    threads = [threading.Thread(target=click, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(isinstance(result, dict) and result["visible"] is True for result in results), results
    assert results[0]["value"] == results[1]["value"] and len(exports) == 1
    assert tab.download_onnx(visitor)["value"] == results[0]["value"] and len(exports) == 1

    zipped = Path(results[0]["value"])
    assert zipped.name == f"{run}-onnx.zip"
    with zipfile.ZipFile(zipped) as archive:
        names = ["config.json", "model.onnx", "preprocessor_config.json"]
        assert sorted(archive.namelist()) == [f"{run}-onnx/{name}" for name in names]
        archive.extractall(tab.paths.work / "unzipped")
    folder = tab.paths.work / "unzipped" / f"{run}-onnx"
    model = ddetr.DeformableDetrForObjectDetection.from_pretrained(snapshot.model_dir).eval()
    assert json.loads((folder / "config.json").read_text())["id2label"] == {
        str(index): name for index, name in model.config.id2label.items()
    }

    # The exported file gives the PyTorch model's logits, at a size it was not traced at and with padding.
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 96, generator=generator)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, 48:, :] = 0
    pixel_mask[1, :, 72:] = 0
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask).logits.numpy()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 1e-4


@pytest.mark.parametrize("layout", ["coco-roboflow", "yolo-roboflow", "voc", "label-studio", "cvat"])
def test_uploaded_zips_in_every_layout_are_checked(
    tab: FinetuneTab, tmp_path: Path, visitor: str, detection_spec, layout: str
):
    folder = detection_spec.write(layout, tmp_path / "layout" / "dataset")
    archive = tmp_path / f"{layout}.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                bundle.write(file, f"dataset/{file.relative_to(folder).as_posix()}")
    report, gallery = tab.check_dataset(*form(kind="upload", upload=str(archive)), visitor)
    assert f"{len(detection_spec.classes)} classes" in report
    assert gallery


def test_labelled_kind_needs_the_visitors_own_dataset(tab: FinetuneTab):
    with pytest.raises(gr.Error, match="label some in the Label tab"):
        tab.check_dataset(*form(kind="labelled"), "a" * 32)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../secret.png", "../../../secret.png"])
def test_uploads_naming_files_outside_the_dataset_are_refused_and_deleted(
    tab: FinetuneTab, tmp_path: Path, visitor: str, name: str
):
    (tmp_path / "secret.png").write_bytes(b"not for visitors")
    images = [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}, {"id": 2, "file_name": name}]
    annotations = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    archive = tmp_path / "outside.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("set/annotations.json", json.dumps(annotations))
        bundle.writestr("set/a.png", buffer.getvalue())
    for action in (lambda: tab.check_dataset(*form(kind="upload", upload=str(archive)), visitor),
                   lambda: tab.start(*form(kind="upload", upload=str(archive)), "preset:tiny", 1, 1, 1, 2e-4, 0, 1, 2,
                                     visitor)):  # fmt: skip
        with pytest.raises(gr.Error, match="outside the dataset folder") as refused:
            action()
        assert "must keep all its files inside" in str(refused.value) and str(tmp_path) not in str(refused.value)
        assert "allow-outside-files" not in str(refused.value)  # not something a visitor can switch on
        assert list(tab.services.uploads.root.rglob("*")) == [
            tab.services.uploads.root / tab.identities.owner_key(visitor)
        ]
    assert own_snapshot(tab, visitor).state == "idle"


def test_checks_in_the_server_are_bounded(tab: FinetuneTab, visitor: str, monkeypatch: pytest.MonkeyPatch):
    import app_support.training as training

    monkeypatch.setattr(training, "CHECK_BUDGET", training.CheckBudget(max_images=10, max_seconds=60))
    for action in (lambda: tab.check_dataset(*form(), visitor), lambda: tab.start(*start_args(visitor))):
        with pytest.raises(gr.Error, match=r"more than 10 images.*checks datasets of up to 10 images"):
            action()
    assert own_snapshot(tab, visitor).state == "idle"


def test_push_to_hub_sends_the_owners_finished_model_only(tab: FinetuneTab, visitor: str, hub_standin, caplog):
    secret = hub_standin.token
    with pytest.raises(gr.Error, match="has not finished"):
        tab.push_to_hub("tester/mine", secret, True, visitor)
    tab.start(*start_args(visitor, max_steps=2))
    tab.jobs.wait(120)
    wait_for(lambda: own_snapshot(tab, visitor).state == "finished", timeout=10)
    with pytest.raises(gr.Error, match="token"):
        tab.push_to_hub("tester/mine", "", True, visitor)  # no pasted token, not signed in
    assert hub_standin.requests == []
    message, cleared = tab.push_to_hub("tester/mine", secret, True, visitor)
    assert "Pushed run" in message and "private" in message and cleared == ""
    assert hub_standin.repos["tester/mine"]["visibility"] == "private"
    pushed = hub_standin.stored["tester/mine"]
    model_dir = own_snapshot(tab, visitor).model_dir
    assert model_dir is not None and pushed["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    assert "pipeline_tag: object-detection" in pushed["README.md"].decode()
    # Another visitor has no finished model here, whatever they name.
    other, _ = tab.identities.visitors.claim(None)
    with pytest.raises(gr.Error, match="has not finished"):
        tab.push_to_hub("tester/theirs", secret, True, other)
    assert "tester/theirs" not in hub_standin.repos
    assert secret not in caplog.text
