"""Pushing a COCO dataset folder (``annotations.json`` + ``images/``, e.g. the app's Label-tab dataset) to the Hub.

One commit holds the folder's files and a dataset card (classes, counts, the layout, how to train on it). The repo
is created private unless asked otherwise. The checks, the commit and the token's handling (only handed to
``huggingface_hub``: never logged, written to disk or part of an error message) are ``finetune.hub_commit``'s.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from finetune.hub_commit import HubPushError, check_push_target, commit_files

__all__ = ["HubPushError", "dataset_card", "push_dataset"]

CARD_TEMPLATE = """---
task_categories:
- object-detection
tags:
- coco
- ddetr
---

# {name}

An object-detection dataset in COCO format: `annotations.json` (boxes as `[x, y, width, height]` in pixels) and
the images in `images/`. {images} images ({background} background), {boxes} boxes, {classes} classes.

| class | boxes |
|---|---|
{rows}

Fine-tune a Deformable DETR on it with ddetr's `finetune` after downloading it:

```bash
huggingface-cli download {repo_id} --repo-type dataset --local-dir {name}
python -m finetune --dataset {name} --model SenseTime/deformable-detr --output-dir runs/{name}
```
"""


def dataset_card(folder: Path, repo_id: str) -> str:
    coco = json.loads((folder / "annotations.json").read_text(encoding="utf-8"))
    names = {category["id"]: category["name"] for category in coco.get("categories", [])}
    counts = Counter(names.get(annotation["category_id"], "?") for annotation in coco.get("annotations", []))
    annotated = {annotation["image_id"] for annotation in coco.get("annotations", [])}
    images = coco.get("images", [])
    rows = "\n".join(f"| {name} | {counts.get(name, 0)} |" for name in names.values())
    return CARD_TEMPLATE.format(
        name=repo_id.split("/")[-1],
        repo_id=repo_id,
        images=len(images),
        background=sum(image["id"] not in annotated for image in images),
        boxes=sum(counts.values()),
        classes=len(names),
        rows=rows,
    )


def _referenced_images(folder: Path) -> list[Path]:
    """The images ``annotations.json`` names (in ``images/`` or beside it), inside the folder only: unlabelled
    uploads and stray files stay behind."""
    coco = json.loads((folder / "annotations.json").read_text(encoding="utf-8"))
    root = folder.resolve()
    found = []
    for image in coco.get("images", []):
        for candidate in (folder / "images" / str(image["file_name"]), folder / str(image["file_name"])):
            if candidate.resolve().is_relative_to(root) and candidate.is_file():
                found.append(candidate)
                break
        else:
            raise HubPushError(f"annotations.json names {image['file_name']!r}, which is not in the dataset folder")
    return found


def push_dataset(
    folder: str | os.PathLike, repo_id: str, *, token: str | None, private: bool = True, endpoint: str | None = None
) -> str:
    """Create ``repo_id`` (a dataset repo) if needed and commit the folder and its card; returns the commit URL.

    ``endpoint`` defaults to ``HF_ENDPOINT`` (huggingface.co). Raises ``HubPushError`` for a missing token, a bad
    repo id, a folder that is not a COCO dataset, or a refusal by the Hub.
    """
    source = Path(folder)
    check_push_target(repo_id, token)  # before the folder is read: the caller's mistake first
    if not (source / "annotations.json").is_file():
        raise HubPushError("nothing to push: the dataset has no annotations.json yet")
    files: dict[str, Path | bytes] = {
        path.relative_to(source).as_posix(): path for path in [source / "annotations.json", *_referenced_images(source)]
    }
    files["README.md"] = dataset_card(source, repo_id).encode("utf-8")
    commit = commit_files(
        repo_id,
        files,
        repo_type="dataset",
        token=token,
        private=private,
        commit_message="Upload labelled dataset",
        endpoint=endpoint,
    )
    return commit.commit_url
