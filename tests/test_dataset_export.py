"""COCO export: import -> export -> import gives back exactly the same samples, the zip appears whole or not at all,
and ``python -m finetune.export_coco`` drives it from the shell."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import finetune.data.export_coco as export_module
from finetune.api import export_dataset
from finetune.config import TrainConfig
from finetune.data.export_coco import export_coco
from finetune.data.prepare import PreparedData, prepare_data
from finetune.data.sources import open_dataset
from finetune.export_coco import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zips opened as datasets unpack under the test's own folder."""
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path / "cache"))


def _image_bytes(source: bytes | str) -> bytes:
    return Path(source).read_bytes() if isinstance(source, str) else bytes(source)


def _assert_same_samples(first: PreparedData, second: PreparedData) -> None:
    """Exactly equal: class names, split names and order, image bytes, sizes, boxes (bit for bit) and labels."""
    assert first.class_names == second.class_names
    assert list(first.splits) == list(second.splits)
    for name, split in first.splits.items():
        other = second.splits[name]
        assert len(split) == len(other), name
        for index, (a, b) in enumerate(zip(split.samples, other.samples)):
            assert _image_bytes(split.image_source(index)) == _image_bytes(other.image_source(index))
            assert (a.width, a.height) == (b.width, b.height)
            assert a.boxes.dtype == b.boxes.dtype and np.array_equal(a.boxes, b.boxes), (name, index)
            assert np.array_equal(a.labels, b.labels)


@pytest.mark.parametrize("layout", ["yolo-roboflow", "voc", "label-studio", "cvat", "hf-cppe5", "hf-xyxy", "coco"])
def test_import_export_import_round_trips_exactly(layout: str, detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write(layout, tmp_path / layout)
    original = prepare_data(str(folder), validation_fraction=0.0)
    result = export_coco(str(folder), tmp_path / "out" / "coco.zip")
    assert result.path == tmp_path / "out" / "coco.zip"
    assert result.images == {"train": 3, "validation": 2, "test": 3}
    assert result.objects == {"train": 6, "validation": 3, "test": 3}
    # Straight from the zip, and from its unpacked folder.
    from_zip = prepare_data(str(result.path), validation_fraction=0.0)
    _assert_same_samples(original, from_zip)
    with zipfile.ZipFile(result.path) as archive:
        archive.extractall(tmp_path / "unpacked")
    assert open_dataset(tmp_path / "unpacked").format == "coco"
    _assert_same_samples(original, prepare_data(str(tmp_path / "unpacked"), validation_fraction=0.0))
    # And once more: the export of the export is the same again.
    again = export_coco(str(tmp_path / "unpacked"), tmp_path / "again.zip")
    _assert_same_samples(original, prepare_data(str(again.path), validation_fraction=0.0))


def test_the_zip_layout(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("hf-cppe5", tmp_path / "hf")
    path = export_coco(str(folder), tmp_path / "coco.zip").path
    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
        document = json.loads(archive.read("validation/_annotations.coco.json"))
        image = archive.read(f"validation/{document['images'][0]['file_name']}")
    assert "train/_annotations.coco.json" in names and "test/_annotations.coco.json" in names
    # Hugging Face rows carry no file name: numbered, with the suffix of their format.
    assert "train/000000.png" in names and len([n for n in names if n.startswith("test/")]) == 4
    assert [c["name"] for c in document["categories"]] == ["circle", "square", "triangle"]
    assert [c["id"] for c in document["categories"]] == [1, 2, 3]
    first = document["annotations"][0]
    assert first["category_id"] == 1 and first["iscrowd"] == 0
    np.testing.assert_allclose(first["bbox"], [20.2, 15.15, 50.5, 48.48], rtol=1e-6)
    with PIL.Image.open(io.BytesIO(image)) as decoded:
        assert decoded.size == (128, 96)


def test_what_is_exported_is_what_validation_kept(tmp_path: Path) -> None:
    folder = tmp_path / "yolo"
    for name in ("a.png", "a.jpg", "b.png"):
        (folder / "images" / "train").mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (100, 50)).save(folder / "images" / "train" / name)
    (folder / "labels" / "train").mkdir(parents=True)
    (folder / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 1.0 0.5 0.4 0.4\n5 0.5 0.5 0.1 0.1\n")
    (folder / "labels" / "train" / "b.txt").write_text("1 0.5 0.5 0.0 0.2\n")
    (folder / "data.yaml").write_text("train: images/train\nnames: [cat, dog]\n")
    result = export_coco(str(folder), tmp_path / "out.zip")
    (report,) = result.reports
    assert report.counts["duplicate_image_id"] == 1 and report.boxes_clipped == 1
    assert result.images == {"train": 2} and result.objects == {"train": 2}
    with zipfile.ZipFile(result.path) as archive:
        document = json.loads(archive.read("train/_annotations.coco.json"))
    assert [image["file_name"] for image in document["images"]] == ["a.jpg", "b.png"]
    assert [annotation["bbox"] for annotation in document["annotations"]] == [
        [40.0, 20.0, 20.0, 10.0],
        [80.0, 15.0, 20.0, 20.0],
    ]
    assert [annotation["image_id"] for annotation in document["annotations"]] == [0, 0]


def test_repeated_file_names_in_a_split_are_kept_apart(tmp_path: Path) -> None:
    for folder, colour in (("one", (255, 0, 0)), ("two", (0, 0, 255))):
        (tmp_path / "voc" / folder).mkdir(parents=True)
        PIL.Image.new("RGB", (32, 32), colour).save(tmp_path / "voc" / folder / "img.png")
    (tmp_path / "voc" / "Annotations").mkdir()
    for stem, folder in (("x", "one"), ("y", "two")):
        (tmp_path / "voc" / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{folder}/img.png</filename><object><name>a</name><bndbox><xmin>1</xmin>"
            "<ymin>2</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object></annotation>"
        )
    original = prepare_data(str(tmp_path / "voc"), validation_fraction=0.0)
    path = export_coco(str(tmp_path / "voc"), tmp_path / "out.zip").path
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["train/_annotations.coco.json", "train/img-2.png", "train/img.png"]
    _assert_same_samples(original, prepare_data(str(path), validation_fraction=0.0))


def test_a_failed_export_leaves_no_file(detection_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = detection_spec.write("voc", tmp_path / "voc")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.zip").write_bytes(b"the previous export")
    calls = []
    original = export_module._read

    def failing(source):
        calls.append(source)
        if len(calls) == 4:
            raise OSError("disk full")
        return original(source)

    monkeypatch.setattr(export_module, "_read", failing)
    with pytest.raises(OSError, match="disk full"):
        export_coco(str(folder), tmp_path / "out" / "new.zip")
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        export_coco(str(folder), tmp_path / "out" / "old.zip")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.zip"]
    assert (tmp_path / "out" / "old.zip").read_bytes() == b"the previous export"


def test_prepared_data_is_exported_as_prepared(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("coco", tmp_path / "coco")
    data = prepare_data(str(folder), validation_fraction=0.0)
    data.splits.pop("validation")
    result = export_coco(data, tmp_path / "out.zip")
    assert result.images == {"train": 3, "test": 3}


def test_the_api_exports_a_config_dataset(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("label-studio", tmp_path / "ls")
    config = TrainConfig(dataset=str(folder), dataset_format="label-studio", output_dir=str(tmp_path / "run"))
    result = export_dataset(config, tmp_path / "out.zip")
    assert result.images == {"train": 3, "validation": 2, "test": 3}


def test_the_shell_command(detection_spec, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = detection_spec.write("cvat", tmp_path / "cvat")
    output = tmp_path / "out.zip"
    assert main(["--dataset", str(folder), "--dataset-format", "cvat", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "[test] 3 images" in printed and "empty_image" in printed
    assert printed.strip().splitlines()[-1].startswith(f"wrote {output}: train 3 images / 6 objects")
    assert main(["--dataset", str(folder), "--output", str(output)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--dataset", str(folder), "--output", str(output), "--overwrite"]) == 0
    assert main(["--dataset", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.zip")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--dataset", str(folder), "--dataset-format", "yolo", "--output", str(tmp_path / "y.zip")]) == 2
    assert "data.yaml" in capsys.readouterr().err and not (tmp_path / "y.zip").exists()


def test_the_shell_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune.export_coco", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for flag in ("--dataset", "--dataset-format", "--output", "--overwrite", "label-studio"):
        assert flag in result.stdout
