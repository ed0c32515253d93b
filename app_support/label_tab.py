"""The Label tab: upload photos, name the classes, draw boxes in the browser, with a model's boxes as a start.

Each browser is a visitor (``visitors``: a server-issued token kept in ``gr.BrowserState``) with one dataset in
its own folder (``label_store``), saved after every change, so a reload or a server restart loses nothing. Boxes
are drawn with ``gradio_image_annotation`` (draw: drag on the image; move/resize: drag a box or its handles;
relabel: double-click; delete: select and press Delete). Images are stepped through with the buttons or with the
Alt+← / Alt+→ keys. Label assist pre-fills boxes from any listed model or from the fine-tuning run's latest
checkpoint. "Fine-tune on this dataset" hands the folder to the Fine-tune tab.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr
from gradio_image_annotation import image_annotator

from app_support.archives import extract_zip
from app_support.detector_cache import DetectorCache
from app_support.downloads import DownloadFolder
from app_support.errors import user_errors
from app_support.jobs import TrainingJobs
from app_support.label_store import IMAGE_SUFFIXES, LabelStore
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities
from app_support.training import CheckpointPreviews
from app_support.visitors import BROWSER_SECRET, BROWSER_STORAGE_KEY, Visitors
from finetune.data.export_coco import export_coco
from finetune.data.hub_push import push_dataset

ASSIST_THRESHOLD = 0.5
CURRENT_RUN = "current-run"  # label assist from the fine-tuning run's latest checkpoint
# Alt+arrow keys step through the images (plain arrows belong to text fields and sliders).
KEYBOARD_JS = """
() => {
  document.addEventListener("keydown", (event) => {
    if (!event.altKey) return;
    const target = event.key === "ArrowRight" ? "#label-next" : event.key === "ArrowLeft" ? "#label-prev" : null;
    if (target && document.querySelector(target)) { event.preventDefault(); document.querySelector(target).click(); }
  });
}
"""


def _summary(store: LabelStore, index: int) -> str:
    if not store.images:
        return "No images yet: upload photos (or a zip of them) above."
    counts = ", ".join(f"{name} {count}" for name, count in store.class_counts().items()) or "no classes yet"
    image = store.images[index]
    return (
        f"**Image {index + 1} of {len(store.images)}** ({image.status}) · **{store.labelled_count()} of "
        f"{len(store.images)} labelled** · boxes per class: {counts}"
    )


class LabelTab:
    def __init__(
        self,
        visitors: Visitors,
        registry: ModelRegistry,
        detectors: DetectorCache,
        *,
        jobs: TrainingJobs,
        previews: CheckpointPreviews,
        identities: Identities,
        work: Path,
        downloads: DownloadFolder,
    ) -> None:
        self.jobs = jobs
        self.previews = previews
        self.identities = identities
        self.visitors = visitors
        self.registry = registry
        self.detectors = detectors
        self.work = Path(work)
        self.downloads = downloads
        self._stores: dict[Path, LabelStore] = {}
        self._stores_lock = threading.Lock()

    def store(self, token: str | None) -> LabelStore:
        """The visitor's dataset; refuses a token this server did not issue. One store per visitor, read from disk
        once: its lock is what keeps two events of one page (a box drawn, a background mark) from racing."""
        folder = self.visitors.folder(token)
        if folder is None:
            raise ValueError("your labelling session was not found: reload the page")
        with self._stores_lock:
            store = self._stores.get(folder)
            if store is None:
                store = self._stores[folder] = LabelStore(folder)
            return store

    def _view(self, store: LabelStore, index: int, boxes: list[dict[str, Any]] | None = None) -> tuple[Any, ...]:
        """(annotator value, background flag, index, summary) for image ``index``."""
        if not store.images:
            return gr.update(value=None, label_list=store.classes), False, 0, _summary(store, 0)
        index = min(max(index, 0), len(store.images) - 1)
        image = store.images[index]
        shown = boxes if boxes is not None else image.boxes
        value = {
            "image": str(store.image_path(index)),
            "boxes": [
                {"label": box["label"], **{key: round(box[key]) for key in ("xmin", "ymin", "xmax", "ymax")}}
                for box in shown
            ],
        }
        annotator = gr.update(value=value, label_list=store.classes)
        return annotator, image.status == "background", index, _summary(store, index)

    # -- event handlers ----------------------------------------------------------------------------------------- #

    def open_session(self, token: str | None) -> tuple[Any, ...]:
        """Page load: keep the browser's token when it is ours, else issue one; show where the visitor left off."""
        token, _ = self.visitors.claim(token)
        store = self.store(token)
        first_unlabelled = next((i for i, image in enumerate(store.images) if image.status == "unlabelled"), 0)
        return (token, ", ".join(store.classes), *self._view(store, first_unlabelled))

    @user_errors
    def upload(self, token: str | None, files: list[str] | None, index: int) -> tuple[Any, ...]:
        store = self.store(token)
        paths: list[Path] = []
        scratch = Path(tempfile.mkdtemp(dir=self.work))
        try:
            for name in files or []:
                path = Path(name)
                if path.suffix.lower() == ".zip":
                    root = extract_zip(path, scratch)
                    paths += sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
                elif path.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(path)
            added, problems = store.add_images(paths)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if problems:
            gr.Warning("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        gr.Info(f"{added} image{'s' if added != 1 else ''} added")
        return (*self._view(store, index if added == 0 else len(store.images) - added), None)

    @user_errors
    def set_classes(self, token: str | None, text: str, index: int) -> tuple[Any, ...]:
        store = self.store(token)
        store.set_classes(text.split(","))
        return self._view(store, index)

    @user_errors
    def save(self, token: str | None, value: dict[str, Any] | None, background: bool, index: int) -> str:
        """The annotator changed (a box drawn, moved, relabelled or deleted) or the background mark did."""
        store = self.store(token)
        if not store.images or not value:
            return _summary(store, 0)
        store.save_boxes(index, list(value.get("boxes") or []), background=bool(background))
        return _summary(store, index)

    @user_errors
    def step(self, token: str | None, index: int, delta: int) -> tuple[Any, ...]:
        store = self.store(token)
        return self._view(store, (index + delta) % max(1, len(store.images)))

    @user_errors
    def assist(
        self,
        token: str | None,
        index: int,
        model_key: str | None,
        threshold: float,
        profile: gr.OAuthProfile | None = None,
    ) -> tuple[Any, ...]:
        """Pre-fill the current image with a model's boxes (above ``threshold``) whose class names match the
        visitor's classes (case-insensitive); the visitor corrects them, and they are saved like drawn ones."""
        store = self.store(token)
        if not store.images:
            raise ValueError("upload images first")
        if not store.classes:
            raise ValueError("name your classes first: boxes are matched to them by name")
        owner = self.identities.owner(token, profile)
        if model_key == CURRENT_RUN:
            job = self.jobs.latest_job(owner)
            found = self.jobs.checkpoint_dir(job)
            if job is None or found is None:
                raise ValueError("you have no fine-tuning run with a checkpoint yet")
            (run_name, step), checkpoint = found
            detector = self.previews.detector((run_name, step), job.directory, checkpoint)
            source = f"run {run_name} at step {step}"
            with self.detectors.inference_lock:  # a checkpoint's detector is not in the cache: in this process
                (candidates,) = detector.candidates([store.image_path(index)])
        else:
            choice = self.registry.pick(model_key, owner.key if owner is not None else None)
            (candidates,) = self.detectors.candidates(choice, [store.image_path(index)])
            source = choice.label
        by_name = {name.lower(): name for name in store.classes}
        boxes = [
            {"label": by_name[d["label"].lower()], **d["box"]}
            for d in candidates.detections(float(threshold), 100)
            if d["label"].lower() in by_name
        ]
        if not boxes:
            gr.Info(f"{source} found nothing of your classes above {threshold:.2f}")
        store.save_boxes(index, boxes, background=False)
        return self._view(store, index)

    @user_errors
    def download(self, token: str | None) -> str:
        """The labelled images as a COCO zip (``finetune.data.export_coco``: what every importer reads back)."""
        store = self.store(token)
        if not store.labelled_count():
            raise ValueError("nothing is labelled yet")
        target = self.downloads.new_folder() / "labelled-coco.zip"
        export_coco(str(store.folder), target, format="coco")
        return str(target)

    @user_errors
    def push(self, token: str | None, repo_id: str, hub_token: str, private: bool) -> tuple[str, str]:
        """Push the visitor's labelled images to their Hub namespace; the pasted token is used once and cleared."""
        store = self.store(token)
        if not store.labelled_count():
            raise ValueError("nothing is labelled yet")
        url = push_dataset(store.folder, (repo_id or "").strip(), token=hub_token, private=bool(private))
        return f"Pushed to [{repo_id}]({url}) ({'private' if private else 'public'}).", ""

    # -- layout ------------------------------------------------------------------------------------------------- #

    @staticmethod
    def visitor_state() -> gr.BrowserState:
        """The browser's token. Create it outside the tabs: a component in a tab not yet shown is not mounted,
        so it would not have read the stored token when the page-load event runs (and a new one would be issued)."""
        return gr.BrowserState(None, storage_key=BROWSER_STORAGE_KEY, secret=BROWSER_SECRET)

    def build(self, token: gr.BrowserState) -> dict[str, Any]:
        index = gr.State(0)
        gr.Markdown(
            "Upload photos, name your classes, then draw boxes: drag on the image to draw, drag a box to move it, "
            "double-click to relabel, Delete to remove. Every change is saved; Alt+← / Alt+→ step through images."
        )
        with gr.Row():
            uploads = gr.File(
                file_count="multiple",
                file_types=[*IMAGE_SUFFIXES, ".zip"],
                label="Photos (or a zip of them)",
                elem_id="label-upload",
            )
            with gr.Column():
                classes = gr.Textbox(label="Classes (comma-separated)", placeholder="cat, dog", elem_id="label-classes")
                set_classes = gr.Button("Set classes", elem_id="label-set-classes")
        status = gr.Markdown(elem_id="label-status")
        annotator = image_annotator(
            label_list=[], image_type="filepath", sources=[], label="Boxes", elem_id="label-annotator", height=520
        )
        with gr.Row():
            previous = gr.Button("← Previous", elem_id="label-prev")
            background = gr.Checkbox(label="Background (nothing to label)", elem_id="label-background")
            following = gr.Button("Next →", elem_id="label-next")
        with gr.Row():
            assist_model = gr.Dropdown(
                [*self.registry.dropdown_choices(), ("your fine-tuning run (latest checkpoint)", CURRENT_RUN)],
                value=None,
                label="Label assist: model",
                scale=3,
            )
            assist_threshold = gr.Slider(0.05, 0.95, value=ASSIST_THRESHOLD, step=0.05, label="above score")
            assist = gr.Button("Pre-fill boxes", elem_id="label-assist")
        with gr.Row():
            finetune = gr.Button("Fine-tune on this dataset", variant="primary", elem_id="label-finetune")
            download = gr.Button("Download as COCO zip", elem_id="label-download")
        download_file = gr.File(label="COCO zip", interactive=False, elem_id="label-download-file")
        with gr.Accordion("Push to the Hugging Face Hub", open=False):
            with gr.Row():
                push_repo = gr.Textbox(
                    label="Dataset repo", placeholder="your-name/my-dataset", elem_id="label-push-repo"
                )
                push_token = gr.Textbox(
                    label="Token with write access (used once, never stored)",
                    type="password",
                    elem_id="label-push-token",
                )
                push_private = gr.Checkbox(True, label="Private")
            push = gr.Button("Push", elem_id="label-push")
            push_result = gr.Markdown(elem_id="label-push-result")

        private = {"api_visibility": "private"}
        view = [annotator, background, index, status]
        uploads.upload(self.upload, [token, uploads, index], [*view, uploads], **private)
        set_classes.click(self.set_classes, [token, classes, index], view, **private)
        classes.submit(self.set_classes, [token, classes, index], view, **private)
        # Saving on every change of the annotator (also when it is given the next image: the same boxes again).
        annotator.change(self.save, [token, annotator, background, index], status, **private)
        background.input(self.save, [token, annotator, background, index], status, **private)
        previous.click(lambda t, i: self.step(t, i, -1), [token, index], view, **private)
        following.click(lambda t, i: self.step(t, i, +1), [token, index], view, **private)
        assist.click(self.assist, [token, index, assist_model, assist_threshold], view, **private)
        download.click(self.download, [token], download_file, **private)
        push.click(self.push, [token, push_repo, push_token, push_private], [push_result, push_token], **private)
        return {
            "finetune": finetune,
            "load": (self.open_session, [token], [token, classes, *view]),
        }
