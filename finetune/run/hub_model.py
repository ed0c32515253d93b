"""Pushing a finished run's model to the Hub: ``model/`` (config.json, model.safetensors, preprocessor_config.json),
its training curves and a generated model card, in one commit (``finetune.hub_commit``; private unless asked
otherwise, and the token is only handed to ``huggingface_hub``).

The card's front matter has ``library_name`` (set explicitly: on the Hub a ``config.json`` alone no longer implies
a library), ``pipeline_tag: object-detection``, tags, ``datasets`` and ``base_model`` when the run's dataset or
starting checkpoint was a Hub repo, and a ``model-index`` with the COCO metrics of the run's final evaluation (the
weights that ``model/`` holds). The body has those metrics, the curves, the dataset, the settings (paths left out)
and how to load the model with ddetr and with transformers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.hub_commit import HubPushError, check_push_target, commit_files
from finetune.presets import is_preset
from finetune.run.files import MODEL_DIR, TRAIN_CONFIG, VALIDATION_REPORT, read_status
from finetune.run.metrics_log import read_metrics

__all__ = ["FinishedRun", "HubPushError", "model_card", "push_model", "read_finished_run"]

logger = logging.getLogger(__name__)

# The checkpoint has transformers' layout and names, and transformers loads it: its Hub snippets and widget apply.
LIBRARY_NAME = "transformers"
TAGS = ("object-detection", "deformable-detr", "ddetr")
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
# Curve images of the run folder (finetune.run.plots) -> their caption in the card.
CURVES = {"loss.png": "Training loss", "map.png": "Validation mAP"}
# metrics.jsonl key -> (model-index type, display name); the first three are the card's metadata.
INDEXED_METRICS = {
    "map": ("mAP", "COCO mAP@[.5:.95]"),
    "map_50": ("mAP@50", "COCO mAP@0.5"),
    "map_75": ("mAP@75", "COCO mAP@0.75"),
}
TABLE_METRICS = {
    "map": "mAP@[.5:.95]",
    "map_50": "mAP@0.5",
    "map_75": "mAP@0.75",
    "map_small": "mAP small",
    "map_medium": "mAP medium",
    "map_large": "mAP large",
    "mar_100": "AR@100",
}
# Settings left out of the card: paths (the dataset and model have their own sections, by name only) and how the
# run was executed rather than what it computed.
UNSHOWN_SETTINGS = frozenset(
    {"output_dir", "dataset", "model", "resume", "progress", "device", "num_workers", "threads", "allow_outside_files"}
)
# Local files that a dataset source can name, never Hub ids.
_FILE_SUFFIXES = (".zip", ".json", ".yaml", ".yml", ".xml")


@dataclass(frozen=True)
class FinishedRun:
    """What the card and the commit need from a finished run folder."""

    run_dir: Path
    settings: dict[str, Any]  # train_config.json
    steps: int
    classes: list[str]
    final_eval: dict[str, Any] | None  # the last ``eval`` record of metrics.jsonl; None: the run had no validation
    model_files: dict[str, Path]  # name in the repo -> file in model/
    curves: dict[str, Path]  # name in the repo -> image in the run folder
    splits: list[dict[str, Any]]  # validation_report.json: the images and boxes kept per split


def read_finished_run(run_dir: str | os.PathLike) -> FinishedRun:
    """The run's settings, metrics and model files; HubPushError saying what to do unless it finished."""
    folder = Path(run_dir)
    status = read_status(folder)
    if status is None:
        raise HubPushError(f"{folder} is not a run folder of python -m finetune: it has no readable status.json")
    state = status.get("state")
    if state != "finished":
        how = "it is still running" if state == "running" else f"it {state} at step {status.get('step')}"
        raise HubPushError(
            f"the run in {folder} has no finished model to push: {how}. Finish it first "
            f"(python -m finetune --resume --output-dir {folder})"
        )
    model_dir = folder / MODEL_DIR
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise HubPushError(f"the run in {folder} has no complete model to push: {MODEL_DIR}/ lacks {missing}")
    try:
        settings = json.loads((folder / TRAIN_CONFIG).read_text(encoding="utf-8"))
        model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise HubPushError(f"cannot read the run's settings in {folder} ({type(error).__name__})") from None
    # Everything export_model wrote (plain files only: the repo must hold exactly what the run exported).
    model_files = {
        path.name: path
        for path in sorted(model_dir.iterdir())
        if path.is_file() and not path.is_symlink() and path.name != "README.md"
    }
    evals = read_metrics(folder / "metrics.jsonl", kind="eval")
    curves = {name: folder / name for name in CURVES if (folder / name).is_file()}
    if not evals:
        curves.pop("map.png", None)  # it would only say "no data yet"
    try:
        splits = json.loads((folder / VALIDATION_REPORT).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        splits = []
    labels = model_config.get("id2label") or {}
    return FinishedRun(
        run_dir=folder,
        settings=settings,
        steps=int(status.get("step", 0)),
        classes=[labels[key] for key in sorted(labels, key=int)],
        final_eval=evals[-1] if evals else None,
        model_files=model_files,
        curves=curves,
        splits=[split for split in splits if isinstance(split, dict)],
    )


def _hub_repo(source: Any) -> str | None:
    """``source`` when it names a Hub repo rather than a preset, the synthetic dataset or a local path.

    The run folder records only the string it was given, so a relative path whose folder is gone reads like a hub
    id; paths that exist, absolute or dotted ones and dataset file names are never taken for one.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(source, str) or source.count("/") != 1 or source.startswith(("/", ".", "~", "shapes")):
        return None
    if source.lower().endswith(_FILE_SUFFIXES) or is_preset(source) or Path(source).exists():
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def _dataset_name(source: str) -> str:
    """How the card names a dataset that is not on the Hub: the synthetic spec, or the folder's name (no path)."""
    if source == "shapes" or source.startswith("shapes:"):
        return source
    return Path(source).name or "local dataset"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "default"
    return f"`{value}`"


def _metric(value: Any) -> str:
    # COCO gives -1 where a metric is undefined (no object of that size in the split).
    return f"{value:.4f}" if isinstance(value, (int, float)) and value >= 0 else "n/a"


def _front_matter(run: FinishedRun, repo_id: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    dataset_source = str(run.settings.get("dataset", ""))
    dataset_repo = _hub_repo(dataset_source)
    base_model = _hub_repo(run.settings.get("model"))
    dataset_name = dataset_repo or _dataset_name(dataset_source)
    # model-index wants an id as the type: the Hub repo's, else a short name ("shapes", the folder's).
    dataset_type = dataset_repo or dataset_name.partition(":")[0]
    results = []
    if run.final_eval is not None:
        for key, (metric_type, metric_name) in INDEXED_METRICS.items():
            value = run.final_eval.get(key)
            if isinstance(value, (int, float)) and value >= 0:
                results.append(
                    EvalResult(
                        task_type="object-detection",
                        dataset_type=dataset_type,
                        dataset_name=dataset_name,
                        dataset_split=str(run.final_eval.get("split", "validation")),
                        metric_type=metric_type,
                        metric_value=value,
                        metric_name=metric_name,
                    )
                )
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="object-detection",
        tags=list(TAGS),
        datasets=[dataset_repo] if dataset_repo else None,
        base_model=base_model,
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )
    return data.to_yaml()


def model_card(run: FinishedRun, repo_id: str) -> str:
    """The README.md of the pushed repo: front matter for the Hub, then metrics, curves, data, settings, usage."""
    settings = run.settings
    dataset_source = str(settings.get("dataset", ""))
    dataset_repo = _hub_repo(dataset_source)
    base_model = _hub_repo(settings.get("model"))
    model_source = str(settings.get("model", ""))
    if is_preset(model_source):
        origin = f"trained from scratch (the `{model_source}` preset)"
    elif base_model:
        origin = f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})"
    else:
        origin = "fine-tuned from a local checkpoint"
    if dataset_repo:
        dataset = f"[{dataset_repo}](https://huggingface.co/datasets/{dataset_repo})"
    elif dataset_source == "shapes" or dataset_source.startswith("shapes:"):
        dataset = f"the synthetic shapes dataset (`{dataset_source}`, made by `finetune.data.shapes`)"
    else:
        dataset = f"a local dataset (`{_dataset_name(dataset_source)}`)"

    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A Deformable DETR object detector for {len(run.classes)} classes, {origin} with ddetr's fine-tuning "
        f"engine (`python -m finetune`) for {run.steps} steps on {dataset}. The checkpoint has transformers' "
        "layout and names: ddetr and transformers both load it.",
        "",
        "## Results",
        "",
    ]
    if run.final_eval is None:
        lines.append("The run had no validation split, so there are no metrics.")
    else:
        images = run.final_eval.get("images", "?")
        lines += [
            f"COCO box metrics of these weights on the {run.final_eval.get('split', 'validation')} split "
            f"({images} images), at step {run.final_eval.get('step')} (the run's final evaluation):",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {name} | {_metric(run.final_eval.get(key))} |" for key, name in TABLE_METRICS.items()),
        ]
        per_class = run.final_eval.get("per_class_ap") or {}
        if per_class:
            lines += ["", "| class | AP@[.5:.95] |", "|---|---|"]
            lines += [f"| {name} | {_metric(per_class.get(name))} |" for name in run.classes]
    if run.curves:
        lines += ["", "## Training curves", ""]
        lines += [f"![{CURVES[name]}]({name})" for name in run.curves]
    lines += ["", "## Dataset", "", f"{dataset[0].upper()}{dataset[1:]}. Classes: {', '.join(run.classes)}."]
    kept = [split for split in run.splits if "split" in split]
    if kept:
        lines += ["", "| split | images | boxes |", "|---|---|---|"]
        lines += [f"| {s['split']} | {s.get('images_kept', '?')} | {s.get('objects_kept', '?')} |" for s in kept]
    lines += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
    # max_steps overrides epochs: showing both would misstate the run's length.
    hidden = UNSHOWN_SETTINGS | ({"epochs"} if settings.get("max_steps") is not None else set())
    lines += [f"| {key} | {_value(settings[key])} |" for key in sorted(settings) if key not in hidden]
    lines += [
        "",
        "## Usage",
        "",
        "With ddetr (pure PyTorch):",
        "",
        "```python",
        "import ddetr",
        "",
        f'detector = ddetr.pipeline(model="{repo_id}")',
        'detector("photo.jpg", threshold=0.5)  # [{"score": ..., "label": ..., "box": {"xmin": ...}}, ...]',
        "",
        "from ddetr import DeformableDetrForObjectDetection",
        "",
        f'model = DeformableDetrForObjectDetection.from_pretrained("{repo_id}")',
        "```",
        "",
        "With transformers:",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModelForObjectDetection",
        "",
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
        f'model = AutoModelForObjectDetection.from_pretrained("{repo_id}")',
        'image = Image.open("photo.jpg").convert("RGB")',
        "with torch.no_grad():",
        '    outputs = model(**processor(images=image, return_tensors="pt"))',
        "detections = processor.post_process_object_detection(",
        "    outputs, threshold=0.5, target_sizes=[image.size[::-1]]",
        ")[0]",
        "```",
        "",
        "A private repo needs a token with read access (`HF_TOKEN`, or `hf auth login`).",
        "",
    ]
    return f"---\n{_front_matter(run, repo_id)}\n---\n\n" + "\n".join(lines)


def push_model(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None,
    private: bool = True,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Commit a finished run's ``model/`` files, its curves and a model card to the model repo ``repo_id`` (created
    if needed, private unless ``private=False``) in one commit; returns the repo's URL.

    ``endpoint`` defaults to ``HF_ENDPOINT`` (huggingface.co). HubPushError (a ValueError) for a missing token or a
    bad repo id (before any request), a run that did not finish, or a refusal by the Hub (401/403: the token lacks
    write access); no message contains the token.
    """
    check_push_target(repo_id, token)  # the caller's mistakes first, before the run folder is read
    run = read_finished_run(run_dir)
    files: dict[str, Path | bytes] = dict(run.model_files)
    files.update(run.curves)
    files["README.md"] = model_card(run, repo_id).encode("utf-8")
    commit = commit_files(
        repo_id,
        files,
        repo_type="model",
        token=token,
        private=private,
        commit_message=commit_message or f"Upload Deformable DETR fine-tuned for {run.steps} steps",
        endpoint=endpoint,
    )
    logger.info("pushed the model of %s to %s", run.run_dir, commit.repo_url)
    return commit.repo_url
