"""Every supported dataset format opens, with the right splits, class names, boxes and labels."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from finetune.data.prepare import prepare_data
from finetune.data.shapes import SHAPE_CLASSES, make_shapes_dataset
from finetune.data.sources import open_dataset, shapes_dataset_dict


def _image(path: Path, size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (90, 30, 200)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, colour).save(path)


def _coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    return {"images": images, "annotations": annotations, "categories": categories}


CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]  # sparse, unsorted, 1-based ids


def _write_coco_split(folder: Path, json_path: Path, count: int, offset: int = 0) -> None:
    images, annotations = [], []
    for index in range(count):
        name = f"img{offset + index}.png"
        _image(folder / name)
        images.append({"id": offset + index + 1, "file_name": name, "width": 64, "height": 48})
        annotations.append(
            {
                "id": offset * 10 + index + 1,
                "image_id": offset + index + 1,
                "category_id": 7 if index % 2 else 3,
                "bbox": [4.0, 5.0, 20.0 + index, 10.0],
                "area": 200.0,
                "iscrowd": 0,
            }
        )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_coco(images, annotations, CATEGORIES)))


def test_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    source = datasets.DatasetDict(
        {"train": make_shapes_dataset(5, seed=1, image_size=64), "valid": make_shapes_dataset(2, seed=2, image_size=64)}
    )
    source.save_to_disk(tmp_path / "dd")
    data = prepare_data(str(tmp_path / "dd"))
    assert data.class_names == list(SHAPE_CLASSES)
    assert sorted(data.splits) == ["train", "validation"]
    assert len(data.split("train")) == 5 and len(data.split("validation")) == 2
    sample = data.split("train").samples[2]
    row = source["train"][2]
    np.testing.assert_allclose(sample.boxes, np.asarray(row["objects"]["bbox"]), atol=1e-4)
    assert sample.labels.tolist() == row["objects"]["category"]
    assert (sample.width, sample.height) == (64, 64)


def test_save_to_disk_single_dataset_without_splits(tmp_path: Path) -> None:
    make_shapes_dataset(4, seed=5, image_size=64).save_to_disk(tmp_path / "single")
    opened = open_dataset(tmp_path / "single")
    assert list(opened.splits) == ["train"]
    data = prepare_data(str(tmp_path / "single"), validation_fraction=0.0)
    assert list(data.splits) == ["train"] and len(data.split("train")) == 4
    held_out = prepare_data(str(tmp_path / "single"), validation_fraction=0.25, seed=1)
    assert len(held_out.split("train")) == 3 and len(held_out.split("validation")) == 1


def test_parquet_folder_like_a_hub_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "hub_like" / "data"
    folder.mkdir(parents=True)
    make_shapes_dataset(3, seed=8, image_size=64).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    make_shapes_dataset(2, seed=9, image_size=64).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    data = prepare_data(str(tmp_path / "hub_like"))
    assert data.class_names == list(SHAPE_CLASSES)
    assert len(data.split("train")) == 3 and len(data.split("test")) == 2


def test_coco_json_file_with_sparse_category_ids(tmp_path: Path) -> None:
    _write_coco_split(tmp_path / "images", tmp_path / "annotations.json", 3)
    data = prepare_data(str(tmp_path / "annotations.json"), validation_fraction=0.0)
    # Sorted COCO ids 3, 7 become classes 0, 1.
    assert data.class_names == ["dog", "cat"]
    train = data.split("train")
    assert len(train) == 3
    assert [int(s.labels[0]) for s in train.samples] == [0, 1, 0]
    np.testing.assert_allclose(train.samples[1].boxes, [[4.0, 5.0, 21.0, 10.0]])
    assert [s.image_id for s in train.samples] == [1, 2, 3]


def test_coco_folder_roboflow_layout(tmp_path: Path) -> None:
    _write_coco_split(tmp_path / "train", tmp_path / "train" / "_annotations.coco.json", 4)
    _write_coco_split(tmp_path / "valid", tmp_path / "valid" / "_annotations.coco.json", 2, offset=10)
    _write_coco_split(tmp_path / "test", tmp_path / "test" / "_annotations.coco.json", 1, offset=20)
    data = prepare_data(str(tmp_path))
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 4, "validation": 2, "test": 1}
    assert data.class_names == ["dog", "cat"]
    assert all(report.problem_count == 0 for report in data.reports)


def test_coco_folder_2017_layout(tmp_path: Path) -> None:
    _write_coco_split(tmp_path / "train2017", tmp_path / "annotations" / "instances_train2017.json", 3)
    _write_coco_split(tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json", 2, offset=10)
    data = prepare_data(str(tmp_path))
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 3, "validation": 2}


def test_coco_splits_must_share_categories(tmp_path: Path) -> None:
    _write_coco_split(tmp_path / "train", tmp_path / "train" / "_annotations.coco.json", 2)
    _write_coco_split(tmp_path / "valid", tmp_path / "valid" / "_annotations.coco.json", 1, offset=5)
    other = json.loads((tmp_path / "valid" / "_annotations.coco.json").read_text())
    other["categories"] = [{"id": 1, "name": "bird"}]
    (tmp_path / "valid" / "_annotations.coco.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="share one category list"):
        open_dataset(tmp_path)


def _write_metadata(folder: Path, rows: list[tuple[str, list, list]], key: str = "category") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as handle:
        for name, boxes, categories in rows:
            _image(folder / name)
            objects = {"bbox": boxes, key: categories}
            handle.write(json.dumps({"file_name": name, "objects": objects}) + "\n")


def test_imagefolder_with_metadata_and_named_categories(tmp_path: Path) -> None:
    _write_metadata(
        tmp_path / "train",
        [("a.png", [[1, 2, 10, 10]], ["zebra"]), ("b.png", [[3, 3, 5, 6], [0, 0, 4, 4]], ["apple", "zebra"])],
    )
    _write_metadata(tmp_path / "validation", [("c.png", [[2, 2, 8, 8]], ["apple"])])
    data = prepare_data(str(tmp_path))
    assert data.class_names == ["apple", "zebra"]
    assert len(data.split("train")) == 2 and len(data.split("validation")) == 1
    labels = sorted(tuple(s.labels.tolist()) for s in data.split("train").samples)
    assert labels == [(0, 1), (1,)]
    assert all(s.width == 64 and s.height == 48 for s in data.split("train").samples)


def test_imagefolder_with_integer_categories_under_the_readme_key(tmp_path: Path) -> None:
    # transformers' README writes "categories" while its script reads "category"; both are accepted.
    _write_metadata(tmp_path, [("a.png", [[1, 2, 10, 10]], [2]), ("b.png", [[3, 3, 5, 6]], [0])], key="categories")
    data = prepare_data(str(tmp_path), validation_fraction=0.0)
    assert data.class_names == ["0", "1", "2"]
    assert sorted(int(s.labels[0]) for s in data.split("train").samples) == [0, 2]


def test_shapes_spec_is_cached_and_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path / "cache"))
    spec = "shapes:train=3,validation=2,test=1,size=64"
    first = shapes_dataset_dict(spec)
    cached = list((tmp_path / "cache" / "shapes").iterdir())
    assert len(cached) == 1 and (cached[0] / "dataset_dict.json").is_file()
    second = shapes_dataset_dict(spec)
    assert first["train"]["objects"] == second["train"]["objects"]
    data = prepare_data(spec)
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 3, "validation": 2, "test": 1}
    # Fixed seeds per split: the splits hold different images.
    assert first["train"][0]["objects"] != first["validation"][0]["objects"]


def test_unusable_sources_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset(str(tmp_path / "nope" / "data"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not COCO JSON"):
        open_dataset(tmp_path / "notes.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_dataset(tmp_path / "bad.json")
    no_objects = datasets.Dataset.from_dict({"text": ["a photo"], "label": [1]})
    no_objects.save_to_disk(tmp_path / "plain")
    with pytest.raises(ValueError, match="no image column"):
        open_dataset(tmp_path / "plain")


def test_hub_ids_with_an_owner_reach_the_hub_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    local = make_shapes_dataset(2, seed=5, image_size=64)

    def fake_load_dataset(name: str, *args, **kwargs):
        asked.append(name)
        return datasets.DatasetDict({"train": local})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = open_dataset("someone/cppe-5")
    assert asked == ["someone/cppe-5"] and "someone/cppe-5" in loaded.description


def test_coco_file_names_cannot_leave_the_image_folder(tmp_path: Path) -> None:
    _write_coco_split(tmp_path / "data" / "images", tmp_path / "data" / "annotations.json", 2)
    _image(tmp_path / "secret.png")  # exists, but outside the dataset folder
    coco = json.loads((tmp_path / "data" / "annotations.json").read_text())
    coco["images"][1]["file_name"] = "../../secret.png"
    (tmp_path / "data" / "annotations.json").write_text(json.dumps(coco))
    # An outside reference refuses the whole dataset (strict or not), naming the record and the opt-out.
    refusal = r"annotations\.json images\[1\]: the path '\.\./\.\./secret\.png' leads outside .*--allow-outside-files"
    for strict in (False, True):
        with pytest.raises(ValueError, match=refusal):
            prepare_data(str(tmp_path / "data" / "annotations.json"), validation_fraction=0.0, strict=strict)
    data = prepare_data(str(tmp_path / "data" / "annotations.json"), validation_fraction=0.0, allow_outside_files=True)
    assert [s.image_id for s in data.split("train").samples] == [1, 2]
