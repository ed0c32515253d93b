"""Dataset validation: a file with every defect yields exactly the expected counts; --strict names the record."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from finetune.data import validation
from finetune.data.prepare import DataSettings, prepare, prepare_data
from finetune.data.shapes import make_shapes_dataset
from finetune.data.validation import PROBLEMS, CheckBudget, CheckBudgetExceeded, DatasetValidationError, probe_image

NAN = float("nan")

# What prepare_data finds in the file of conftest's write_bad_coco.
EXPECTED_COUNTS = {
    "non_finite": 3,
    "unknown_category": 1,
    "duplicate_object_id": 1,
    "zero_or_negative_size": 2,
    "outside_image": 2,
    "missing_image": 1,
    "undecodable_image": 1,
    "duplicate_image_id": 1,
    "size_mismatch": 1,
    "empty_image": 1,
    "orphan_annotation": 1,
}


def test_bad_annotation_file_yields_exactly_the_expected_counts(tmp_path: Path, write_bad_coco) -> None:
    data = prepare_data(str(write_bad_coco(tmp_path)), validation_fraction=0.0)
    (report,) = data.reports
    assert set(PROBLEMS) == set(EXPECTED_COUNTS)
    assert report.counts == EXPECTED_COUNTS
    assert report.images_seen == 6 and report.objects_seen == 15
    assert report.images_kept == 3 and report.images_dropped == 3
    assert report.objects_kept == 4
    assert report.boxes_clipped == 1
    assert report.boxes_dropped == 11  # 8 bad objects + those of the missing/undecodable images + the orphan
    assert report.crowd_ignored == 1
    train = data.split("train")
    by_id = {sample.image_id: sample for sample in train.samples}
    assert sorted(by_id) == [1, 4, 6]
    np.testing.assert_allclose(by_id[1].boxes, [[4, 4, 20, 20], [50, 30, 14, 18], [40, 20, 24, 10]])
    assert by_id[1].labels.tolist() == [0, 0, 0]
    assert len(by_id[4].labels) == 0  # the empty image stays, as a negative example
    with PIL.Image.open(tmp_path / "mismatch.png") as stored_wrongly:  # the file's real size wins
        assert (by_id[6].width, by_id[6].height) == stored_wrongly.size
    text = report.format()
    for problem, count in EXPECTED_COUNTS.items():
        assert problem in text and str(count) in text


def test_strict_mode_names_the_first_bad_record(tmp_path: Path, write_bad_coco) -> None:
    with pytest.raises(DatasetValidationError) as raised:
        prepare_data(str(write_bad_coco(tmp_path)), strict=True)
    message = str(raised.value)
    assert "images[0]" in message and "ok.png" in message and "object 1 (id 2)" in message
    assert "zero_or_negative_size" in message and "--strict" in message


def test_strict_mode_reports_unknown_categories_with_the_id(tmp_path: Path, write_bad_coco) -> None:
    path = write_bad_coco(tmp_path)
    content = json.loads(path.read_text())
    content["annotations"] = [a for a in content["annotations"] if a["id"] in (1, 9)]
    content["images"] = content["images"][:1]
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetValidationError, match=r"category 99 is not a class"):
        prepare_data(str(path), strict=True)


def test_hugging_face_records_are_checked_too(tmp_path: Path) -> None:
    dataset = make_shapes_dataset(2, seed=0, image_size=64)
    rows = dataset.to_dict()
    rows["objects"][0] = {
        "id": [1, 2, 3],
        "area": [1, 1, 1],
        "bbox": [[1, 1, 5, 5], [NAN, 0, 1, 1], [0, 0, 80, 10]],
        "category": [0, -1, 1],
    }
    rows["objects"][1] = {"id": [4], "area": [1], "bbox": [[2, 2, 3, 3]], "category": [2]}
    rows["image_id"][1] = rows["image_id"][0]
    broken = datasets.Dataset.from_dict(rows, features=dataset.features)
    broken.save_to_disk(tmp_path / "hf")
    data = prepare_data(str(tmp_path / "hf"), validation_fraction=0.0)
    (report,) = data.reports
    assert report.counts["non_finite"] == 1
    assert report.counts["outside_image"] == 1 and report.boxes_clipped == 1
    assert report.counts["duplicate_image_id"] == 1
    assert report.images_kept == 1 and report.objects_kept == 2


def test_probe_image_sizes_and_rejections(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (30, 20)).save(buffer, format="JPEG")
    assert probe_image(buffer.getvalue()) == (30, 20)
    rotated = io.BytesIO()
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the image is used as 20x30
    PIL.Image.new("RGB", (30, 20)).save(rotated, format="JPEG", exif=exif)
    assert probe_image(rotated.getvalue()) == (20, 30)
    with pytest.raises(ValueError, match=r"decodable|truncated"):
        probe_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="empty"):
        probe_image(b"")
    with pytest.raises(FileNotFoundError):
        probe_image(str(tmp_path / "absent.png"))
    (tmp_path / "vector.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'></svg>")
    with pytest.raises(ValueError):
        probe_image(str(tmp_path / "vector.svg"))


def test_a_check_budget_bounds_images_and_time_over_all_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = DataSettings(source="shapes:train=20,validation=10,test=0,size=64")
    assert len(prepare(settings, budget=CheckBudget(max_images=30)).splits["validation"]) == 10  # exactly enough
    with pytest.raises(CheckBudgetExceeded, match="more than 29 images"):
        prepare(settings, budget=CheckBudget(max_images=29))  # counted over train and validation together
    clock = iter(range(0, 10_000, 10))  # every reading of the clock is 10 s later than the one before
    monkeypatch.setattr(validation.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(CheckBudgetExceeded, match=r"longer than 5 s \(stopped after 64 images\)"):
        prepare(DataSettings(source="shapes:train=100,validation=10,test=0,size=64"), budget=CheckBudget(max_seconds=5))
