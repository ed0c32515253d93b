"""Pushing a labelled COCO dataset to the Hub, against a local stand-in of the Hub's HTTP API."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import PIL.Image
import pytest

from finetune.data.hub_push import HubPushError, push_dataset

TOKEN = "hf_standin_write_token"


@pytest.fixture
def coco_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "dataset"
    (folder / "images").mkdir(parents=True)
    for index in range(2):
        PIL.Image.new("RGB", (40, 30), (index * 100, 50, 50)).save(folder / "images" / f"{index:06d}.png")
    coco = {
        "images": [{"id": i + 1, "file_name": f"{i:06d}.png", "width": 40, "height": 30} for i in range(2)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder


def test_push_creates_a_private_repo_with_the_files_and_a_card(hub_standin, coco_folder: Path, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    url = push_dataset(coco_folder, "tester/labelled", token=TOKEN)
    assert url.startswith(hub_standin.url) and "tester/labelled" in url
    assert hub_standin.repos["tester/labelled"]["visibility"] == "private"
    assert hub_standin.repos["tester/labelled"]["type"] == "dataset"
    files = hub_standin.files()
    assert set(files) == {"annotations.json", "images/000000.png", "images/000001.png", "README.md"}
    assert files["images/000001.png"] == (coco_folder / "images" / "000001.png").read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\ntask_categories:\n- object-detection\n")
    assert "| dog | 1 |" in card and "| cat | 0 |" in card and "2 images (1 background)" in card
    # The token went only into the Authorization header: not into logs, files or the card.
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub_standin.requests)
    assert TOKEN not in caplog.text and TOKEN not in card
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_public_on_request(hub_standin, coco_folder: Path):
    push_dataset(coco_folder, "tester/open", token=TOKEN, private=False)
    assert hub_standin.repos["tester/open"]["visibility"] == "public"


def test_no_token_or_a_bad_repo_id_is_refused_before_any_request(hub_standin, coco_folder: Path):
    for token in (None, "", "   "):
        with pytest.raises(HubPushError, match="token with write access"):
            push_dataset(coco_folder, "tester/labelled", token=token)
    for repo in ("no-owner", "../x/y", "a/b/c"):
        with pytest.raises(HubPushError, match="not a repo id"):
            push_dataset(coco_folder, repo, token=TOKEN)
    with pytest.raises(HubPushError, match=r"no annotations\.json"):
        push_dataset(coco_folder / "images", "tester/labelled", token=TOKEN)
    assert hub_standin.requests == []


def test_a_refused_token_is_a_clear_error_that_does_not_repeat_it(hub_standin, coco_folder: Path, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "hf_wrong_token_123456"
    with pytest.raises(HubPushError) as caught:
        push_dataset(coco_folder, "tester/labelled", token=wrong)
    assert "refused the token (401)" in str(caught.value) and "write access to tester" in str(caught.value)
    assert wrong not in str(caught.value) and wrong not in repr(caught.value) and wrong not in caplog.text
    assert hub_standin.commits == []
