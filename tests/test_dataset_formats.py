"""Every dataset export format reads to the same records, and every kind of bad input is counted or refused.

The spec dataset (conftest's ``detection_spec``: 8 PNGs in train / validation / test, float boxes of 3 classes, one
background image) is written by test code in each layout, and each must read back to the spec: the same pixels,
boxes within 1e-6 relative (YOLO and Label Studio store normalised / percent values, VOC and CVAT corners, the
Hugging Face schemas float32), labels by name, splits. Bad inputs are small hand-written datasets.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from finetune import cli as train_cli
from finetune.api import prepare_dataset
from finetune.config import TrainConfig
from finetune.data.formats import DATASET_FORMATS, normalise_format
from finetune.data.formats.detect import detect_format
from finetune.data.prepare import PreparedData, prepare_data
from finetune.data.sources import open_dataset
from finetune.evaluate import cli as evaluate_cli

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO / "ddetr" / "bundled" / "ddetr-shapes"
LAYOUTS = ["coco", "coco-roboflow", "yolo-ultralytics", "yolo-roboflow", "voc", "voc-roboflow", "label-studio",
           "cvat", "hf-cppe5", "hf-xyxy"]  # fmt: skip


def _pixels(source: bytes | str) -> np.ndarray:
    with PIL.Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        return np.asarray(image.convert("RGB"))


def _records(data: PreparedData) -> dict[str, list[tuple[np.ndarray, np.ndarray, list[str], tuple[int, int]]]]:
    return {
        name: [
            (
                _pixels(split.image_source(index)),
                sample.boxes,
                [data.class_names[label] for label in sample.labels],
                (sample.width, sample.height),
            )
            for index, sample in enumerate(split.samples)
        ]
        for name, split in data.splits.items()
    }


def _assert_matches_spec(data: PreparedData, spec) -> None:
    assert sorted(data.class_names) == sorted(spec.classes)
    records = _records(data)
    assert list(records) == ["train", "validation", "test"]
    for split, images in spec.splits.items():
        assert len(records[split]) == len(images), split
        for (pixels, boxes, labels, size), image in zip(records[split], images):
            np.testing.assert_array_equal(pixels, _pixels(image.png))
            assert size == (image.width, image.height)
            assert labels == [label for label, _ in image.objects]
            expected = np.asarray([box for _, box in image.objects], dtype=np.float64).reshape(-1, 4)
            np.testing.assert_allclose(boxes, expected, rtol=1e-6, atol=0)


def _write_png(path: Path, size: tuple[int, int] = (64, 48), colour=(40, 160, 90), format: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, colour).save(path, format=format)
    return path


def _report(data: PreparedData, split: str = "train"):
    (report,) = [report for report in data.reports if report.split == split]
    return report


# -- the same records from every format ------------------------------------------------------------------------ #


def test_the_parametrized_layouts_are_every_layout(detection_layouts: dict[str, str]) -> None:
    assert sorted(LAYOUTS) == sorted(detection_layouts)
    assert set(detection_layouts.values()) == set(DATASET_FORMATS) - {"auto"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_to_the_spec_records(layout: str, detection_spec, detection_layouts, tmp_path: Path) -> None:
    folder = detection_spec.write(layout, tmp_path / layout)
    assert detect_format(folder) == detection_layouts[layout]
    for chosen in ("auto", detection_layouts[layout]):
        data = prepare_data(str(folder), validation_fraction=0.0, format=chosen)
        _assert_matches_spec(data, detection_spec)
        for report in data.reports:
            expected = 1 if report.split == "test" else 0  # the background image, kept as a negative example
            assert report.counts["empty_image"] == expected and report.problem_count == expected, report.format()
            assert report.conversions == {}
        assert _report(data, "test").images_kept == 3


def test_roboflow_placeholder_category_is_left_out(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("coco-roboflow", tmp_path / "rf")
    document = json.loads((folder / "train" / "_annotations.coco.json").read_text())
    assert document["categories"][0]["name"] == "shapes-abc"
    assert open_dataset(folder).categories.names == ("circle", "square", "triangle")


def test_yolo_list_files_and_lists_of_folders(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("yolo-ultralytics", tmp_path / "yolo")
    # CVAT's Ultralytics export: split list files naming the images.
    for split, name in (("train", "train"), ("val", "val")):
        images = sorted((folder / "images" / name).iterdir())
        lines = [f"images/{name}/{image.name}" for image in images]
        if split == "val":
            lines = [f"./{line}" for line in lines]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / "data.yaml").write_text(
        "path: ./\ntrain: train.txt\nval: val.txt\ntest: [images/test]\nnames:\n  0: circle\n  1: square\n"
        "  2: triangle\n"
    )
    _assert_matches_spec(prepare_data(str(folder), validation_fraction=0.0), detection_spec)


def test_voc_without_image_sets_is_one_train_split(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("voc", tmp_path / "voc")
    shutil.rmtree(folder / "ImageSets")
    data = prepare_data(str(folder), validation_fraction=0.0)
    assert list(data.splits) == ["train"] and len(data.split("train")) == 8
    by_pixels = {_pixels(image.png).tobytes(): image for images in detection_spec.splits.values() for image in images}
    for index, sample in enumerate(data.split("train").samples):
        image = by_pixels[_pixels(data.split("train").image_source(index)).tobytes()]
        np.testing.assert_allclose(sample.boxes, np.asarray([b for _, b in image.objects]).reshape(-1, 4), rtol=1e-6)


def test_a_zip_of_a_dataset_folder_opens_like_the_folder(
    detection_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path / "cache"))
    folder = detection_spec.write("yolo-roboflow", tmp_path / "export" / "shapes.v1i.yolov8")
    archive = shutil.make_archive(str(tmp_path / "dataset"), "zip", tmp_path / "export")  # one top-level folder
    data = prepare_data(archive, validation_fraction=0.0)
    _assert_matches_spec(data, detection_spec)
    assert "unpacked from" in data.description and str(folder) not in data.description
    assert len(list((tmp_path / "cache" / "archives").iterdir())) == 1
    # The second time from the unpacked copy; a named format looks into the zip's one folder too.
    _assert_matches_spec(prepare_data(archive, validation_fraction=0.0, format="yolo"), detection_spec)
    assert len(list((tmp_path / "cache" / "archives").iterdir())) == 1


def test_a_zip_with_an_unsafe_member_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path / "cache"))
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("data.yaml", "names: [a]\ntrain: images\n")
        archive.writestr("../../escaped.txt", "x")
    with pytest.raises(ValueError, match=r"escaped\.txt.*outside the dataset folder"):
        open_dataset(tmp_path / "evil.zip")
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize("layout", ["coco", "yolo-roboflow", "voc", "cvat"])
def test_evaluate_prints_the_same_metrics_for_every_format(
    layout: str, detection_spec, detection_layouts, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One metrics table per format, compared against the COCO layout's (computed once per module)."""
    reference = _reference_metrics(detection_spec, tmp_path.parent / "metrics-reference", capsys)
    folder = detection_spec.write(layout, tmp_path / layout)
    arguments = ["--model", str(BUNDLED_MODEL), "--dataset", str(folder), "--split", "test", "--device", "cpu",
                 "--dataset-format", detection_layouts[layout]]  # fmt: skip
    assert evaluate_cli.main(arguments) == 0
    output = capsys.readouterr().out
    assert output == reference
    headline = json.loads(output.strip().splitlines()[-1])
    assert set(headline) >= {"map", "map_50", "mar_100"}


_REFERENCE: dict[str, str] = {}


def _reference_metrics(spec, folder: Path, capsys: pytest.CaptureFixture) -> str:
    if "coco" not in _REFERENCE:
        capsys.readouterr()
        dataset = spec.write("coco", folder / "reference")
        arguments = ["--model", str(BUNDLED_MODEL), "--dataset", str(dataset), "--split", "test", "--device", "cpu"]
        assert evaluate_cli.main(arguments) == 0
        _REFERENCE["coco"] = capsys.readouterr().out
        headline = json.loads(_REFERENCE["coco"].strip().splitlines()[-1])
        assert headline["map_50"] > 0  # the bundled shapes model finds some of the drawn shapes
    return _REFERENCE["coco"]


# -- the format option ----------------------------------------------------------------------------------------- #


@pytest.mark.usefixtures("single_thread")
def test_training_reads_the_format_from_the_command_line_and_the_api(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("voc-roboflow", tmp_path / "voc")
    run = tmp_path / "run"
    arguments = ["--dataset", str(folder), "--dataset-format", "voc", "--model", "tiny", "--output-dir", str(run),
                 "--max-steps", "1", "--batch-size", "2", "--image-size", "64", "--eval-every", "0",
                 "--no-progress"]  # fmt: skip
    assert train_cli.main(arguments) == 0
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["dataset_format"] == "voc"
    config = TrainConfig(dataset=str(folder), dataset_format="voc", output_dir=str(tmp_path / "other"))
    data = prepare_dataset(config)
    assert data.settings.format == "voc" and len(data.split("test")) == 3
    with pytest.raises(ValueError, match=r"a YOLO dataset needs a data\.yaml"):
        prepare_dataset(TrainConfig(dataset=str(folder), dataset_format="yolo"))


def test_format_names_and_the_training_config(tmp_path: Path) -> None:
    assert normalise_format("label_studio") == "label-studio" and normalise_format("Pascal-VOC") == "voc"
    with pytest.raises(ValueError, match="unknown dataset format 'darknet'"):
        normalise_format("darknet")
    assert TrainConfig(dataset="x", dataset_format="label_studio").dataset_format == "label-studio"
    assert TrainConfig(dataset="x").dataset_format == "auto"
    with pytest.raises(ValueError, match="dataset_format must be one of"):
        TrainConfig(dataset="x", dataset_format="darknet")
    with pytest.raises(ValueError, match="no 'yolo' format"):
        open_dataset("shapes", format="yolo")
    with pytest.raises(ValueError, match="needs a local folder"):
        open_dataset("someone/dataset", format="voc")


def test_mixed_formats_are_refused_and_an_explicit_format_overrides(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("yolo-ultralytics", tmp_path / "mixed")
    detection_spec.write("cvat", folder)
    with pytest.raises(ValueError, match=r"mixed formats in .*data\.yaml \(YOLO\) and annotations\.xml \(CVAT\)"):
        open_dataset(folder)
    _assert_matches_spec(prepare_data(str(folder), format="yolo", validation_fraction=0.0), detection_spec)
    _assert_matches_spec(prepare_data(str(folder), format="cvat", validation_fraction=0.0), detection_spec)


def test_mixed_formats_in_one_zip_are_refused(detection_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path / "cache"))
    folder = detection_spec.write("voc", tmp_path / "mixed")
    detection_spec.write("label-studio", folder)
    archive = shutil.make_archive(str(tmp_path / "mixed"), "zip", folder)
    with pytest.raises(ValueError, match=r"mixed formats.*Annotations/\*\.xml \(Pascal VOC\).*\(Label Studio\)"):
        open_dataset(archive)


def test_an_unknown_hugging_face_schema_names_the_features(tmp_path: Path) -> None:
    features = datasets.Features(
        {"image": datasets.Image(), "annotations": datasets.List({"box": datasets.List(datasets.Value("float32"))})}
    )
    rows = {"image": [{"bytes": _write_png(tmp_path / "a.png").read_bytes(), "path": None}], "annotations": [[]]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError) as raised:
        open_dataset(tmp_path / "hf")
    message = str(raised.value)
    assert "no 'objects' column" in message and "annotations (box)" in message and "image (Image)" in message
    assert "objects.bbox" in message and "objects.boxes" in message and "xmin/ymin/xmax/ymax" in message


def test_hugging_face_corner_fields(tmp_path: Path) -> None:
    label = datasets.ClassLabel(names=["cat", "dog"])
    value = datasets.List(datasets.Value("float32"))
    objects = {"xmin": value, "ymin": value, "xmax": value, "ymax": value, "label": datasets.List(label)}
    features = datasets.Features({"image": datasets.Image(), "objects": objects})
    png = _write_png(tmp_path / "a.png").read_bytes()
    row = {"xmin": [2.5], "ymin": [4.0], "xmax": [22.5], "ymax": [14.0], "label": [1]}
    datasets.Dataset.from_dict(
        {"image": [{"bytes": png, "path": None}], "objects": [row]}, features=features
    ).save_to_disk(str(tmp_path / "hf"))
    data = prepare_data(str(tmp_path / "hf"), validation_fraction=0.0)
    np.testing.assert_allclose(data.split("train").samples[0].boxes, [[2.5, 4.0, 20.0, 10.0]])
    assert data.class_names == ["cat", "dog"] and data.split("train").samples[0].labels.tolist() == [1]


# -- bad input: malformed files -------------------------------------------------------------------------------- #

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><filename>a.png</filename><object><name>&lol9;</name></object></annotation>
"""


def _voc_folder(root: Path, xml: str, name: str = "a") -> Path:
    _write_png(root / "JPEGImages" / f"{name}.png")
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{name}.xml").write_text(xml)
    return root


def _voc_xml(objects: str, file_name: str = "a.png", size: tuple[int, int] = (64, 48)) -> str:
    return (
        f"<annotation><filename>{file_name}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
        f"</size>{objects}</annotation>"
    )


def _voc_object(name: str, box: tuple) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
        f"<ymax>{ymax}</ymax></bndbox></object>"
    )


def test_xml_bomb_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _voc_folder(tmp_path / "voc", BILLION_LAUGHS)
    with pytest.raises(ValueError, match=r"Annotations/a\.xml: XML with a DOCTYPE \(DTD\) is refused"):
        open_dataset(folder)


def test_xml_external_entity_is_refused_and_not_read(tmp_path: Path, touched: list[str]) -> None:
    secret = _write_png(tmp_path / "outside" / "secret.png")
    xml = (
        f'<?xml version="1.0"?>\n<!DOCTYPE annotation [<!ENTITY leak SYSTEM "file://{secret}">]>\n'
        "<annotation><filename>a.png</filename><object><name>&leak;</name></object></annotation>"
    )
    folder = _voc_folder(tmp_path / "voc", xml)
    touched.clear()  # from here on: what reading the dataset touches
    with pytest.raises(ValueError, match=r"Annotations/a\.xml: XML with a DOCTYPE"):
        open_dataset(folder)
    assert not _inside(touched, secret.parent)


def test_a_bare_dtd_is_refused_in_cvat_too(detection_spec, tmp_path: Path) -> None:
    folder = detection_spec.write("cvat", tmp_path / "cvat")
    text = (folder / "annotations.xml").read_text()
    (folder / "annotations.xml").write_text(text.replace("<annotations>", "<!DOCTYPE annotations []>\n<annotations>"))
    with pytest.raises(ValueError, match=r"annotations\.xml: XML with a DOCTYPE \(DTD\) is refused"):
        open_dataset(folder, format="cvat")


def test_malformed_xml_names_the_file_and_line(tmp_path: Path) -> None:
    xml = "<annotation>\n  <filename>a.png</filename>\n  <object><name>cat</name>\n</annotation>\n"
    with pytest.raises(ValueError, match=r"Annotations/a\.xml line 4, column \d+: malformed XML"):
        open_dataset(_voc_folder(tmp_path / "voc", xml))
    cvat = tmp_path / "cvat"
    cvat.mkdir()
    (cvat / "annotations.xml").write_text("<annotations>\n<image id='0' name='a.png'>\n</annotations>\n")
    with pytest.raises(ValueError, match=r"annotations\.xml line 3, column \d+: malformed XML"):
        open_dataset(cvat / "annotations.xml")


def test_malformed_json_names_the_file_and_line(tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    coco.mkdir()
    (coco / "annotations.json").write_text('{"images": [\n  {"id": 1,}\n]}\n')
    with pytest.raises(ValueError, match=r"annotations\.json is not valid JSON: .*line 2"):
        open_dataset(coco)
    studio = tmp_path / "studio"
    studio.mkdir()
    (studio / "export.json").write_text('[\n {"id": 1, "data": {"image": "a.png"}},\n {"id": 2\n]\n')
    with pytest.raises(ValueError, match=r"export\.json line 4, column \d+: not valid JSON"):
        open_dataset(studio)


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "yolo"
    _write_png(folder / "images" / "train" / "a.png")
    (folder / "data.yaml").write_text("train: images/train\nnames: [cat, dog\nval: images/val\n")
    with pytest.raises(ValueError, match=r"data\.yaml line \d+, column \d+: malformed YAML"):
        open_dataset(folder)
    (folder / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(ValueError, match=r"data\.yaml needs 'names'"):
        open_dataset(folder, format="yolo")


def test_cvat_for_video_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cvat"
    folder.mkdir()
    (folder / "annotations.xml").write_text(
        '<annotations><version>1.1</version><track id="0" label="cat"><box frame="0" xtl="1" ytl="1" xbr="5" '
        'ybr="5" outside="0" occluded="0" keyframe="1"/></track></annotations>'
    )
    with pytest.raises(ValueError, match="CVAT for video"):
        open_dataset(folder)


# -- bad input: labels, images and boxes ----------------------------------------------------------------------- #


def _yolo_folder(root: Path, labels: dict[str, str], images: tuple[str, ...] = ("a.png",), names="[cat, dog]") -> Path:
    for image in images:
        _write_png(root / "images" / "train" / image, size=(100, 50))
    for name, text in labels.items():
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train" / name).write_text(text)
    (root / "data.yaml").write_text(f"train: images/train\nnames: {names}\n")
    return root


def test_yolo_label_file_without_image_is_a_missing_image(tmp_path: Path) -> None:
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "0 0.5 0.5 0.2 0.2\n", "ghost.txt": "1 0.5 0.5 0.1 0.1\n"})
    report = _report(prepare_data(str(folder), validation_fraction=0.0))
    assert report.counts["missing_image"] == 1 and report.images_kept == 1 and report.boxes_dropped == 1
    assert "label file labels/train/ghost.txt has no image" in report.examples["missing_image"][0]


def test_image_without_label_file_is_a_counted_background_image(tmp_path: Path) -> None:
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "0 0.5 0.5 0.2 0.2\n"}, images=("a.png", "b.png"))
    data = prepare_data(str(folder), validation_fraction=0.0)
    report = _report(data)
    assert report.counts["empty_image"] == 1 and report.images_kept == 2
    assert "images/train/b.png" in report.examples["empty_image"][0]
    assert [len(sample.labels) for sample in data.split("train").samples] == [1, 0]


def test_class_id_outside_names_is_counted_naming_file_and_line(tmp_path: Path) -> None:
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "0 0.5 0.5 0.2 0.2\n\n7 0.5 0.5 0.2 0.2\n-1 0.5 0.5 0.1 0.1\n"})
    report = _report(prepare_data(str(folder), validation_fraction=0.0))
    assert report.counts["unknown_category"] == 2 and report.objects_kept == 1
    assert "labels/train/a.txt:3" in report.examples["unknown_category"][0]
    assert "category 7 is not a class" in report.examples["unknown_category"][0]


def test_malformed_yolo_lines_are_counted_naming_file_and_line(tmp_path: Path) -> None:
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "0 0.5 0.5 0.2\n1 0.5 x 0.2 0.2\n0 0.5 0.5 0.2 0.2\n"})
    report = _report(prepare_data(str(folder), validation_fraction=0.0))
    assert report.counts["non_finite"] == 2 and report.objects_kept == 1
    assert "labels/train/a.txt:1" in report.examples["non_finite"][0]
    assert "labels/train/a.txt:2" in report.examples["non_finite"][1]


def test_yolo_segments_become_boxes_and_are_counted(tmp_path: Path) -> None:
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "1 0.1 0.2 0.5 0.2 0.3 0.6\n"})
    data = prepare_data(str(folder), validation_fraction=0.0)
    np.testing.assert_allclose(data.split("train").samples[0].boxes, [[10, 10, 40, 20]], rtol=1e-6)
    assert _report(data).conversions == {"segment_to_box": 1}


def test_zero_area_and_out_of_image_boxes_are_counted(tmp_path: Path) -> None:
    # YOLO: a zero-width box, one half outside (clipped), one entirely outside (dropped).
    labels = "0 0.5 0.5 0.0 0.2\n0 1.0 0.5 0.4 0.4\n1 3.0 3.0 0.1 0.1\n0 0.5 0.5 0.2 0.2\n"
    yolo = prepare_data(str(_yolo_folder(tmp_path / "y", {"a.txt": labels})), validation_fraction=0.0)
    report = _report(yolo)
    assert report.counts["zero_or_negative_size"] == 1 and report.counts["outside_image"] == 2
    assert report.boxes_clipped == 1 and report.objects_kept == 2
    np.testing.assert_allclose(yolo.split("train").samples[0].boxes, [[80, 15, 20, 20], [40, 20, 20, 10]], rtol=1e-6)
    # VOC: the same in pixel corners.
    objects = "".join(
        _voc_object(name, box)
        for name, box in (("cat", (10, 10, 10, 30)), ("cat", (50, 10, 80, 30)), ("dog", (200, 200, 210, 210)))
    )
    voc = prepare_data(str(_voc_folder(tmp_path / "voc", _voc_xml(objects))), validation_fraction=0.0)
    report = _report(voc)
    assert report.counts["zero_or_negative_size"] == 1 and report.counts["outside_image"] == 2
    assert report.boxes_clipped == 1 and report.objects_kept == 1
    np.testing.assert_allclose(voc.split("train").samples[0].boxes, [[50, 10, 14, 20]])


def test_duplicate_file_names_are_counted(tmp_path: Path) -> None:
    # YOLO: a.png and a.jpg would share labels/train/a.txt.
    _write_png(tmp_path / "y" / "images" / "train" / "a.jpg", format="JPEG")
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "0 0.5 0.5 0.2 0.2\n"}, images=("a.png",))
    report = _report(prepare_data(str(folder), validation_fraction=0.0))
    assert report.counts["duplicate_image_id"] == 1 and report.images_kept == 1
    assert "share the label file labels/train/a.txt" in report.examples["duplicate_image_id"][0]
    # VOC: two annotation files naming one image file.
    voc = _voc_folder(tmp_path / "voc", _voc_xml(_voc_object("cat", (1, 1, 9, 9))))
    (voc / "Annotations" / "b.xml").write_text(_voc_xml(_voc_object("cat", (2, 2, 8, 8))))
    report = _report(prepare_data(str(voc), validation_fraction=0.0))
    assert report.counts["duplicate_image_id"] == 1 and report.images_kept == 1
    assert "already used by an earlier record" in report.examples["duplicate_image_id"][0]
    # COCO: two image entries with one file name.
    _write_png(tmp_path / "coco" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (tmp_path / "coco" / "annotations.json").write_text(json.dumps(coco))
    report = _report(prepare_data(str(tmp_path / "coco"), validation_fraction=0.0))
    assert report.counts["duplicate_image_id"] == 1 and report.images_kept == 1


def test_rotated_boxes_are_axis_aligned_and_counted(tmp_path: Path) -> None:
    _write_png(tmp_path / "ls" / "images" / "a.png", size=(100, 50))
    value = {"x": 10, "y": 20, "width": 20, "height": 20, "rotation": 90, "rectanglelabels": ["cat"]}
    result = {"type": "rectanglelabels", "original_width": 100, "original_height": 50, "value": value}
    polygon = {"type": "polygonlabels", "value": {"points": [[1, 1], [5, 5], [1, 5]], "polygonlabels": ["cat"]}}
    task = {"id": 5, "data": {"image": "/data/upload/2/a.png"}, "annotations": [{"result": [result, polygon]}]}
    (tmp_path / "ls" / "export.json").write_text(json.dumps([task]))
    data = prepare_data(str(tmp_path / "ls"), validation_fraction=0.0)
    # 20 x 10 px at (10, 10), turned 90 degrees clockwise about its top-left corner: x in [0, 10], y in [10, 30].
    np.testing.assert_allclose(data.split("train").samples[0].boxes, [[0, 10, 10, 20]], atol=1e-5)
    assert _report(data).conversions == {"rotated_box_axis_aligned": 1, "non_rectangle_ignored": 1}
    assert "rotated by 90 degrees" in _report(data).format()

    cvat = tmp_path / "cvat"
    _write_png(cvat / "images" / "a.png", size=(100, 50))
    (cvat / "annotations.xml").write_text(
        "<annotations><meta><task><labels><label><name>cat</name></label></labels></task></meta>"
        '<image id="0" name="a.png" width="100" height="50"><box label="cat" xtl="20" ytl="10" xbr="40" ybr="20" '
        'rotation="90"/><polygon label="cat" points="1,1;5,5;1,5"/></image></annotations>'
    )
    data = prepare_data(str(cvat), validation_fraction=0.0)
    np.testing.assert_allclose(data.split("train").samples[0].boxes, [[25, 5, 10, 20]], atol=1e-5)
    assert _report(data).conversions == {"rotated_box_axis_aligned": 1, "non_box_shape_ignored": 1}


# -- bad input: paths leaving the dataset folder --------------------------------------------------------------- #


@pytest.fixture
def touched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened, stat-ed, listed or read as a link (builtins.open, os.open/stat/lstat/scandir/readlink,
    PIL.Image.open) while the test runs (``touched.clear()`` once the test has written its files)."""
    seen: list[str] = []

    def recording(function):
        def wrapper(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)):
                seen.append(os.fsdecode(path))
            return function(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    for name in ("open", "stat", "lstat", "scandir", "readlink"):
        monkeypatch.setattr(os, name, recording(getattr(os, name)))
    monkeypatch.setattr(PIL.Image, "open", recording(PIL.Image.open))
    return seen


def _inside(paths: list[str], folder: Path) -> list[str]:
    """The ``paths`` that lie in ``folder`` (or are it)."""
    top = os.path.abspath(folder)
    return [path for path in paths if os.path.commonpath([os.path.abspath(path), top]) == top]


def _escape_dataset(kind: str, root: Path, reference: str) -> Path:
    """A one-image dataset of ``kind`` whose only image path is ``reference``."""
    folder = root / "dataset"
    _write_png(folder / "images" / "inside.png")
    if kind == "coco":
        coco = {
            "images": [{"id": 1, "file_name": reference}],
            "annotations": [],
            "categories": [{"id": 1, "name": "a"}],
        }
        (folder / "annotations.json").write_text(json.dumps(coco))
    elif kind == "yolo":
        (folder / "train.txt").write_text(f"images/inside.png\n{reference}\n")
        (folder / "data.yaml").write_text("train: train.txt\nnames: [a]\n")
    elif kind == "voc":
        (folder / "Annotations").mkdir()
        (folder / "Annotations" / "x.xml").write_text(_voc_xml(_voc_object("a", (1, 1, 5, 5)), file_name=reference))
    elif kind == "label-studio":
        value = {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["a"]}
        result = {"type": "rectanglelabels", "original_width": 64, "original_height": 48, "value": value}
        task = {"id": 1, "data": {"image": reference}, "annotations": [{"result": [result]}]}
        (folder / "export.json").write_text(json.dumps([task]))
    elif kind == "cvat":
        (folder / "annotations.xml").write_text(
            f'<annotations><meta><task><labels><label><name>a</name></label></labels></task></meta><image id="0" '
            f'name="{reference}" width="64" height="48"></image></annotations>'
        )
    return folder


@pytest.mark.parametrize("kind", ["coco", "yolo", "voc", "label-studio", "cvat"])
@pytest.mark.parametrize("spelling", ["relative", "absolute"])
def test_paths_leaving_the_dataset_refuse_it_without_touching_them(
    kind: str, spelling: str, tmp_path: Path, touched: list[str]
) -> None:
    """An outside reference is an attack or a mistake, not a missing image: the whole dataset is refused (strict or
    not), with the same message whether or not the file exists, and nothing outside is opened or stat-ed."""
    secret = _write_png(tmp_path / "outside" / "secret.png")
    reference = "../outside/secret.png" if spelling == "relative" else str(secret)
    if kind == "coco" and spelling == "relative":
        reference = "../../outside/secret.png"  # from images/, one of the folders COCO images are looked for in
    folder = _escape_dataset(kind, tmp_path, reference)
    touched.clear()
    with pytest.raises(ValueError, match="leads outside the dataset folder") as refused:
        prepare_data(str(folder), validation_fraction=0.0)
    message = str(refused.value)
    assert repr(reference) in message and "--allow-outside-files" in message
    assert not _inside(touched, tmp_path / "outside")
    with pytest.raises(ValueError) as again:
        open_dataset(folder)
    assert str(again.value) == message

    # The message does not tell whether the outside file exists.
    secret.unlink()
    with pytest.raises(ValueError) as missing:
        prepare_data(str(folder), validation_fraction=0.0)
    assert str(missing.value) == message
    assert not _inside(touched, tmp_path / "outside")


@pytest.mark.parametrize("link", ["absolute image link", "relative image link", "label link"])
def test_symlinks_leading_outside_refuse_the_dataset(link: str, tmp_path: Path, touched: list[str]) -> None:
    secret = _write_png(tmp_path / "outside" / "secret.png")
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "0 0.5 0.5 0.2 0.2\n"})
    images, labels = folder / "images" / "train", folder / "labels" / "train"
    (images / "inner.png").symlink_to(images / "a.png")  # a link that stays inside is followed
    assert len(prepare_data(str(folder), validation_fraction=0.0).split("train")) >= 1
    name, target = {
        "absolute image link": (images / "link.png", secret),
        "relative image link": (images / "relative.png", Path("..") / ".." / ".." / "outside" / "secret.png"),
        # the label file of an inside image, leading to a file outside that does not exist
        "label link": (labels / "inner.txt", tmp_path / "outside" / "labels.txt"),
    }[link]
    name.symlink_to(target)
    touched.clear()
    for strict in (False, True):
        with pytest.raises(ValueError, match="leads outside the dataset folder") as refused:
            prepare_data(str(folder), validation_fraction=0.0, strict=strict)
        message = str(refused.value)
        assert name.relative_to(folder).as_posix() in message and "--allow-outside-files" in message
        assert str(tmp_path / "outside") not in message
    assert not _inside(touched, tmp_path / "outside")


def test_yaml_paths_leaving_the_dataset_are_not_followed(tmp_path: Path, touched: list[str]) -> None:
    outside = tmp_path / "outside"
    _write_png(outside / "images" / "secret.png")
    folder = _yolo_folder(tmp_path / "y", {"a.txt": "0 0.5 0.5 0.2 0.2\n"})
    (folder / "data.yaml").write_text(f"path: {outside}\ntrain: images/train\nval: {outside}/images\nnames: [a]\n")
    touched.clear()
    data = prepare_data(str(folder), validation_fraction=0.0)
    assert list(data.splits) == ["train"] and len(data.split("train")) == 1
    (folder / "data.yaml").write_text(f"train: {outside}/images\nnames: [a]\n")
    with pytest.raises(ValueError, match=r"data\.yaml \(train\): the path .* leads outside the dataset folder"):
        open_dataset(folder)
    assert not _inside(touched, outside)


def test_image_folder_metadata_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    _write_png(tmp_path / "outside" / "secret.png")
    _write_png(tmp_path / "folder" / "a.png")
    rows = [
        {"file_name": name, "objects": {"bbox": [[1, 1, 5, 5]], "category": [0]}}
        for name in ("a.png", "../outside/secret.png")
    ]
    (tmp_path / "folder" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"cannot read the image folder .*\.\./outside/secret\.png"):
        open_dataset(tmp_path / "folder")
