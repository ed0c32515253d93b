"""Pushing a COCO dataset folder (``annotations.json`` + ``images/``, e.g. the app's Label-tab dataset) to the Hub.

One commit holds the folder's files and a dataset card (classes, counts, the layout, how to train on it). The repo
is created private unless asked otherwise. The token is only handed to ``huggingface_hub``: it is never logged,
never written to disk and never part of an error message (a refusal says what to fix, not what was sent).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from ddetr.checkpoint.hub import looks_like_repo_id

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


class HubPushError(ValueError):
    """The push was refused or failed; the message says why (without the token)."""


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
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    source = Path(folder)
    if not token or not token.strip():
        raise HubPushError("a Hugging Face token with write access is needed to push (huggingface.co/settings/tokens)")
    if not looks_like_repo_id(repo_id) or "/" not in repo_id:
        raise HubPushError(f"{repo_id!r} is not a repo id: expected 'owner/name'")
    if not (source / "annotations.json").is_file():
        raise HubPushError("nothing to push: the dataset has no annotations.json yet")
    files = [source / "annotations.json", *_referenced_images(source)]
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(source).as_posix(), path_or_fileobj=str(path))
        for path in files
    ]
    operations.append(
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=dataset_card(source, repo_id).encode("utf-8"))
    )
    # HF_ENDPOINT read now, not when huggingface_hub was imported (a Space, or a test's stand-in, sets it).
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token.strip())
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id, repo_type="dataset", operations=operations, commit_message="Upload labelled dataset"
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubPushError(
                f"the Hub refused the token ({status}): it needs write access to {repo_id.split('/')[0]}"
            ) from None
        raise HubPushError(f"the Hub answered {status} while pushing {repo_id}") from None
    except Exception as error:  # connection and protocol errors: their text may carry request details
        raise HubPushError(f"could not push to the Hub ({type(error).__name__})") from None
    return str(commit.commit_url)
