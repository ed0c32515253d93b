"""No dataset reference makes us read a file outside the dataset's own folder, unless the user allows it.

Each test writes a small crafted dataset under ``tmp_path/dataset`` naming a secret PNG in ``tmp_path/outside``:
image cells of Hugging Face data (``save_to_disk`` Arrow files, parquet and arrow data files, the Hub) holding
``{"bytes": None, "path": ...}``, ``state.json`` / ``dataset_dict.json`` naming files outside, symlinks among data
files, image-folder metadata, and every importer's image reference. Refused: ValueError naming
``--allow-outside-files`` (the whole dataset, strict or not: an outside reference is an attack or a mistake, not a
missing image), the same message whether or not the secret exists, and the secret never opened (every ``open``
audit event is recorded while a test runs); the command lines exit non-zero naming the option. Allowed: the same
dataset loads and the secret is read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune import cli as train_cli
from finetune import export_coco as export_cli
from finetune.api import prepare_dataset
from finetune.config import TrainConfig
from finetune.data.export_coco import export_coco
from finetune.data.prepare import PreparedData, prepare_data
from finetune.data.sources import open_dataset
from finetune.evaluate import cli as evaluate_cli
from finetune.run.setup import data_settings

OPTION = "--allow-outside-files"
CLASSES = ["circle", "square", "triangle"]  # tiny_model_dir's, so that evaluation matches them by name
SECRET_COLOUR = (200, 30, 60)
INSIDE_COLOUR = (20, 160, 90)

pytestmark = pytest.mark.usefixtures("single_thread")


# -- what is opened ------------------------------------------------------------------------------------------------ #
# An audit hook cannot be removed, so one is installed once per session and records only while a test has armed it.
# -- test data ----------------------------------------------------------------------------------------------------- #


def _png(path: Path, colour: tuple[int, int, int] = INSIDE_COLOUR, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def _png_bytes(colour: tuple[int, int, int] = INSIDE_COLOUR) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _features() -> datasets.Features:
    box = datasets.List(datasets.List(datasets.Value("float32"), length=4))
    label = datasets.List(datasets.ClassLabel(names=CLASSES))
    return datasets.Features({"image": datasets.Image(), "objects": {"bbox": box, "category": label}})


def _hf_rows(reference: str | None) -> datasets.Dataset:
    """Two rows: an inline image, and (when ``reference`` is given) an image stored as that path only. Building it
    opens nothing: from_dict keeps the path as text."""
    images: list[dict[str, Any]] = [{"bytes": _png_bytes(), "path": None}]
    objects = [{"bbox": [[4.0, 4.0, 20.0, 16.0]], "category": [0]}]
    if reference is not None:
        images.append({"bytes": None, "path": reference})
        objects.append({"bbox": [[10.0, 8.0, 30.0, 20.0]], "category": [1]})
    return datasets.Dataset.from_dict({"image": images, "objects": objects}, features=_features())


def _write_arrow(table: pa.Table, path: Path) -> None:
    """An Arrow IPC stream, as ``save_to_disk`` and the arrow builder read them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _saved(folder: Path, reference: str) -> None:
    """A save_to_disk folder whose Arrow file was written by hand: save_to_disk itself embeds the bytes of the
    files it is given, so the path-only cell is put in afterwards, as a crafted upload would hold it."""
    _hf_rows(None).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    _write_arrow(_hf_rows(reference).data.table, arrow)


def _parquet(folder: Path, reference: str) -> None:
    folder.mkdir(parents=True)
    pq.write_table(_hf_rows(reference).data.table, folder / "train.parquet")


def _arrow_files(folder: Path, reference: str) -> None:
    _write_arrow(_hf_rows(reference).data.table, folder / "train.arrow")


def _state_json(folder: Path, reference: str) -> None:
    """state.json names an Arrow file outside (``reference``, a copy of a valid one there)."""
    _hf_rows(None).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    outside = Path(os.path.normpath(folder / reference)) if not os.path.isabs(reference) else Path(reference)
    outside.parent.mkdir(parents=True, exist_ok=True)
    _write_arrow(_hf_rows(None).data.table, outside)  # what would be read: a valid one-row split
    arrow.unlink()
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"] = [{"filename": reference}]
    (folder / "state.json").write_text(json.dumps(state))


def _dataset_dict(folder: Path, reference: str) -> None:
    """dataset_dict.json lists a split folder outside (``reference``, a saved split there)."""
    outside = Path(os.path.normpath(folder / reference)) if not os.path.isabs(reference) else Path(reference)
    _hf_rows(None).save_to_disk(str(outside))
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": [reference]}))


def _linked_parquet(folder: Path, reference: str) -> None:
    """A folder of data files whose parquet file is a symlink to one outside (``reference``)."""
    target = Path(os.path.normpath(folder / reference)) if not os.path.isabs(reference) else Path(reference)
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_hf_rows(None).data.table, target)
    folder.mkdir(parents=True)
    (folder / "train.parquet").symlink_to(reference)


HF_CASES: dict[str, Callable[[Path, str], None]] = {
    "save_to_disk image path": _saved,
    "parquet image path": _parquet,
    "arrow image path": _arrow_files,
}
FILE_CASES: dict[str, tuple[Callable[[Path, str], None], str, str]] = {
    # builder, the outside file it names (relative to tmp_path), and the name the refusal quotes
    "state.json _data_files": (_state_json, "outside/x.arrow", "'../outside/x.arrow'"),
    "dataset_dict.json splits": (_dataset_dict, "outside/saved", "'../outside/saved'"),
    "symlinked parquet file": (_linked_parquet, "outside/data.parquet", "'train.parquet'"),
}


def _pixels(source: bytes | str) -> np.ndarray:
    with PIL.Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
        return np.asarray(image.convert("RGB"))


def _read_all(data: PreparedData) -> list[np.ndarray]:
    return [_pixels(split.image_source(i)) for split in data.splits.values() for i in range(len(split))]


def _refusal(call: Callable[[], object]) -> str:
    with pytest.raises(ValueError) as refused:
        call()
    message = str(refused.value)
    assert OPTION in message and "allow_outside_files=True" in message, message
    assert "leads outside the dataset folder" in message, message
    return message


# -- Hugging Face image cells -------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", sorted(HF_CASES))
@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_hf_image_paths_outside_are_refused_before_any_is_opened(
    case: str, spelling: str, tmp_path: Path, opened: Any
) -> None:
    secret = _png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)
    reference = str(secret) if spelling == "absolute" else "../outside/secret.png"
    folder = tmp_path / "dataset"
    HF_CASES[case](folder, reference)
    opened.clear()
    message = _refusal(lambda: open_dataset(folder))
    assert "row 1 (column 'image')" in message and repr(reference) in message and str(folder) in message
    assert _refusal(lambda: prepare_data(str(folder))) == message
    assert not opened.within(secret.parent)

    # Nothing in the message depends on whether the outside file exists.
    secret.unlink()
    assert _refusal(lambda: open_dataset(folder)) == message
    assert not opened.within(secret.parent)

    _png(secret, SECRET_COLOUR)
    data = prepare_data(str(folder), validation_fraction=0.0, allow_outside_files=True)
    assert data.settings.allow_outside_files
    assert len(data.split("train")) == 2
    np.testing.assert_array_equal(_read_all(data)[1], _pixels(_png_bytes(SECRET_COLOUR)))
    assert opened.within(secret.parent)


def _counting(function: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    def counted(path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(path)
        return function(path, *args, **kwargs)

    return counted


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_saved_dataset_files_outside_are_refused_before_load_from_disk(
    case: str, tmp_path: Path, opened: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    build, target, quoted = FILE_CASES[case]
    folder = tmp_path / "dataset"
    build(folder, f"../{target}")
    outside = tmp_path / target
    # pyarrow maps Arrow and parquet files without an audit event: the readers must not even be called.
    loads: list[str] = []
    for name in ("load_from_disk", "load_dataset"):
        monkeypatch.setattr(datasets, name, _counting(getattr(datasets, name), loads))
    opened.clear()
    message = _refusal(lambda: open_dataset(folder))
    assert quoted in message and str(tmp_path / "outside") not in message
    assert not loads and not opened.within(tmp_path / "outside")

    moved = tmp_path / "moved-away"
    shutil.move(str(outside), moved)
    assert _refusal(lambda: open_dataset(folder)) == message
    shutil.move(str(moved), outside)

    data = prepare_data(str(folder), validation_fraction=0.0, allow_outside_files=True)
    assert len(data.split("train")) == 1
    np.testing.assert_array_equal(_read_all(data)[0], _pixels(_png_bytes()))


def test_dataset_dict_split_names_that_fsspec_would_read_elsewhere_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dataset"
    _hf_rows(None).save_to_disk(str(folder / "train"))
    for name in (str(tmp_path / "elsewhere"), "zip://x::/tmp/other.zip", "memory://x"):
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", name]}))
        assert repr(name) in _refusal(lambda: open_dataset(folder))


def test_symlinked_state_json_leading_outside_is_refused(tmp_path: Path, opened: Any) -> None:
    _hf_rows(None).save_to_disk(str(tmp_path / "outside" / "saved"))
    folder = tmp_path / "dataset"
    _hf_rows(None).save_to_disk(str(folder))
    (folder / "state.json").unlink()
    (folder / "state.json").symlink_to(tmp_path / "outside" / "saved" / "state.json")
    opened.clear()
    assert "state.json: the path 'state.json'" in _refusal(lambda: open_dataset(folder))
    assert not opened.within(tmp_path / "outside")


def test_relative_image_paths_are_read_from_the_dataset_folder_not_the_working_directory(
    tmp_path: Path, opened: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "dataset"
    _png(folder / "images" / "b.png", SECRET_COLOUR)
    _saved(folder, "images/b.png")
    # The same relative name in the working directory (a server's examples/, say) must not be what is read.
    elsewhere = tmp_path / "cwd"
    _png(elsewhere / "images" / "b.png", (0, 0, 255))
    monkeypatch.chdir(elsewhere)
    opened.clear()
    data = prepare_data(str(folder), validation_fraction=0.0)
    np.testing.assert_array_equal(_read_all(data)[1], _pixels(_png_bytes(SECRET_COLOUR)))
    assert not opened.within(elsewhere)


# -- image folders ------------------------------------------------------------------------------------------------- #


def _metadata(folder: Path, kind: str, names: list[str]) -> None:
    rows = [{"file_name": name, "objects": {"bbox": [[1, 1, 5, 5]], "category": [0]}} for name in names]
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:  # csv holds no nested objects; the file names are what is tested
        (folder / "metadata.csv").write_text("file_name,note\n" + "".join(f"{name},x\n" for name in names))


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_image_folder_metadata_names_outside_are_refused_without_opening_them(
    kind: str, tmp_path: Path, opened: Any
) -> None:
    secret = _png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)
    folder = tmp_path / "dataset"
    _png(folder / "a.png")
    for reference in ("../outside/secret.png", str(secret)):
        _metadata(folder, kind, ["a.png", reference])
        opened.clear()
        # datasets' imagefolder refuses these names itself (with or without the option: it is not ours to lift).
        with pytest.raises(ValueError, match="cannot read the image folder") as refused:
            open_dataset(folder)
        assert not opened.within(secret.parent)
        secret.unlink()
        with pytest.raises(ValueError) as again:
            open_dataset(folder)
        assert str(again.value) == str(refused.value)
        _png(secret, SECRET_COLOUR)


def test_image_folder_names_that_are_symlinks_leading_outside_are_refused(tmp_path: Path, opened: Any) -> None:
    secret = _png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)
    folder = tmp_path / "dataset"
    _png(folder / "a.png")
    (folder / "b.png").symlink_to(secret)
    _metadata(folder, "jsonl", ["a.png", "b.png"])
    opened.clear()
    message = _refusal(lambda: open_dataset(folder))
    assert "b.png" in message and str(secret) not in message
    assert not opened.within(secret.parent)
    secret.unlink()
    assert _refusal(lambda: open_dataset(folder)) == message

    _png(secret, SECRET_COLOUR)
    data = prepare_data(str(folder), validation_fraction=0.0, allow_outside_files=True)
    assert any(np.array_equal(pixels, _pixels(_png_bytes(SECRET_COLOUR))) for pixels in _read_all(data))
    assert opened.within(secret.parent)


# -- the Hub ------------------------------------------------------------------------------------------------------- #


def test_hub_dataset_images_must_lie_in_the_datasets_cache(
    tmp_path: Path, opened: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    cached = _png(cache / "downloads" / "extracted" / "abc" / "img.png", SECRET_COLOUR)
    secret = _png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)
    served: dict[str, datasets.Dataset] = {}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: datasets.DatasetDict({"train": served[name]}))

    served["someone/cached"] = _hf_rows(str(cached))
    data = prepare_data("someone/cached", validation_fraction=0.0)
    np.testing.assert_array_equal(_read_all(data)[1], _pixels(_png_bytes(SECRET_COLOUR)))

    served["someone/crafted"] = _hf_rows(str(secret))
    opened.clear()
    message = _refusal(lambda: open_dataset("someone/crafted"))
    assert "hub dataset someone/crafted" in message and str(cache) in message
    assert not opened.within(secret.parent)
    secret.unlink()
    assert _refusal(lambda: open_dataset("someone/crafted")) == message

    # A relative path is relative to the cache, never to the working directory.
    monkeypatch.chdir(tmp_path)
    served["someone/relative"] = _hf_rows("outside/secret.png")
    _png(secret, SECRET_COLOUR)
    opened.clear()
    report = prepare_data("someone/relative", validation_fraction=0.0).reports[0]
    assert report.images_kept == 1 and report.counts["missing_image"] == 1
    assert not opened.within(secret.parent)

    data = prepare_data("someone/crafted", validation_fraction=0.0, allow_outside_files=True)
    np.testing.assert_array_equal(_read_all(data)[1], _pixels(_png_bytes(SECRET_COLOUR)))


# -- the importers ------------------------------------------------------------------------------------------------- #
# tests/test_dataset_formats.py checks that these refusals touch (stat, list, open) nothing outside; here: the whole
# dataset is refused by every way of opening it, strict or not, with a message naming the option, and the option
# reads the file.

IMPORTERS = ["coco", "yolo", "voc", "label-studio", "cvat"]


def _importer_dataset(kind: str, folder: Path, reference: str) -> None:
    """A one-image dataset of ``kind`` whose image is ``reference`` (64x48), with one box of class ``circle``."""
    folder.mkdir(parents=True)
    if kind == "coco":
        coco = {
            "images": [{"id": 1, "file_name": reference, "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "circle"}],
        }
        (folder / "annotations.json").write_text(json.dumps(coco))
    elif kind == "yolo":
        (folder / "train.txt").write_text(f"{reference}\n")
        (folder / "data.yaml").write_text("train: train.txt\nnames: [circle]\n")
    elif kind == "voc":
        (folder / "Annotations").mkdir()
        (folder / "Annotations" / "x.xml").write_text(
            f"<annotation><filename>{reference}</filename><size><width>64</width><height>48</height></size>"
            "<object><name>circle</name><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>24</xmax><ymax>20</ymax></bndbox>"
            "</object></annotation>"
        )
    elif kind == "label-studio":
        value = {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["circle"]}
        result = {"type": "rectanglelabels", "original_width": 64, "original_height": 48, "value": value}
        (folder / "export.json").write_text(
            json.dumps([{"id": 1, "data": {"image": reference}, "annotations": [{"result": [result]}]}])
        )
    elif kind == "cvat":
        (folder / "annotations.xml").write_text(
            "<annotations><meta><task><labels><label><name>circle</name></label></labels></task></meta>"
            f'<image id="0" name="{reference}" width="64" height="48"><box label="circle" xtl="4" ytl="4" xbr="24" '
            'ybr="20"/></image></annotations>'
        )


def _importer_reference(kind: str, spelling: str, secret: Path) -> str:
    if spelling == "absolute":
        return str(secret)
    # COCO also looks in images/, from where one more ../ is needed to reach the same file.
    return "../../outside/secret.png" if kind == "coco" else "../outside/secret.png"


@pytest.mark.parametrize("kind", IMPORTERS)
@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_importer_references_outside_refuse_the_dataset_and_load_with_the_option(
    kind: str, spelling: str, tmp_path: Path, opened: Any
) -> None:
    secret = _png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)
    reference = _importer_reference(kind, spelling, secret)
    folder = tmp_path / "dataset"
    _importer_dataset(kind, folder, reference)
    output = tmp_path / "export.zip"
    opened.clear()
    message = _refusal(lambda: open_dataset(folder))
    assert repr(reference) in message and str(folder) in message
    for strict in (False, True):
        assert _refusal(lambda strict=strict: prepare_data(str(folder), strict=strict)) == message
        assert _refusal(lambda strict=strict: export_coco(folder, output, strict=strict)) == message
    assert not output.exists()
    assert not opened.within(secret.parent)

    # Nothing in the message depends on whether the outside file exists.
    secret.unlink()
    assert _refusal(lambda: open_dataset(folder)) == message
    assert _refusal(lambda: prepare_data(str(folder))) == message
    assert not opened.within(secret.parent)

    _png(secret, SECRET_COLOUR)
    data = prepare_data(str(folder), validation_fraction=0.0, allow_outside_files=True)
    assert len(data.split("train")) == 1 and data.reports[0].counts["missing_image"] == 0
    np.testing.assert_array_equal(_read_all(data)[0], _pixels(_png_bytes(SECRET_COLOUR)))
    assert opened.within(secret.parent)


@pytest.mark.parametrize("kind", IMPORTERS)
def test_importer_references_outside_are_refused_by_the_commands(
    kind: str, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], opened: Any
) -> None:
    secret = _png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)
    folder = tmp_path / "dataset"
    _importer_dataset(kind, folder, _importer_reference(kind, "relative", secret))
    output = tmp_path / "out.zip"
    training = ["--dataset", str(folder), "--model", "tiny", "--max-steps", "1", "--batch-size", "1",
                "--image-size", "32", "--validation-fraction", "0", "--no-progress", "--threads", "1",
                "--output-dir", str(tmp_path / "run")]  # fmt: skip
    # 64: with one image, 32 px would leave a 1x1 feature map, which GroupNorm refuses for a batch of one
    evaluation = ["--model", str(tiny_model_dir), "--dataset", str(folder), "--image-size", "64", "--device", "cpu"]
    export = ["--dataset", str(folder), "--output", str(output)]
    opened.clear()
    for main, arguments in ((train_cli.main, training), (evaluate_cli.main, evaluation), (export_cli.main, export)):
        assert main(arguments) != 0
        error = capsys.readouterr().err
        assert OPTION in error and "leads outside the dataset folder" in error, error
    assert not (tmp_path / "run" / "model").exists() and not output.exists()
    assert not opened.within(secret.parent)

    # With the option the outside image is read (training with it: the HF case above covers it).
    assert evaluate_cli.main([*evaluation, OPTION]) == 0
    assert "map" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert export_cli.main([*export, OPTION]) == 0
    with zipfile.ZipFile(output) as archive:
        assert sum(name.endswith(".png") for name in archive.namelist()) == 1
    assert opened.within(secret.parent)


# -- the command lines --------------------------------------------------------------------------------------------- #


def _crafted(tmp_path: Path) -> Path:
    secret = _png(tmp_path / "outside" / "secret.png", SECRET_COLOUR)
    folder = tmp_path / "dataset"
    _saved(folder, str(secret))
    return folder


def test_training_command_refuses_then_allows_outside_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], opened: Any
) -> None:
    folder = _crafted(tmp_path)
    arguments = ["--dataset", str(folder), "--model", "tiny", "--max-steps", "1", "--batch-size", "2",
                 "--image-size", "32", "--validation-fraction", "0", "--no-progress", "--threads", "1"]  # fmt: skip
    opened.clear()
    assert train_cli.main([*arguments, "--output-dir", str(tmp_path / "refused")]) == train_cli.EXIT_BAD_INPUT
    assert OPTION in capsys.readouterr().err
    assert not opened.within(tmp_path / "outside") and not (tmp_path / "refused" / "model").exists()

    run = tmp_path / "allowed"
    assert train_cli.main([*arguments, "--output-dir", str(run), OPTION]) == 0
    assert json.loads((run / "train_config.json").read_text())["allow_outside_files"] is True
    assert opened.within(tmp_path / "outside")


def test_evaluate_command_refuses_then_allows_outside_files(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], opened: Any
) -> None:
    folder = _crafted(tmp_path)
    arguments = ["--model", str(tiny_model_dir), "--dataset", str(folder), "--image-size", "32", "--device", "cpu"]
    opened.clear()
    assert evaluate_cli.main(arguments) == 2
    assert OPTION in capsys.readouterr().err
    assert not opened.within(tmp_path / "outside")

    assert evaluate_cli.main([*arguments, OPTION]) == 0
    assert "map" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert opened.within(tmp_path / "outside")


def test_export_command_refuses_then_allows_outside_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], opened: Any
) -> None:
    folder = _crafted(tmp_path)
    output = tmp_path / "out.zip"
    opened.clear()
    assert export_cli.main(["--dataset", str(folder), "--output", str(output)]) == 2
    assert OPTION in capsys.readouterr().err and not output.exists()
    assert not opened.within(tmp_path / "outside")
    assert export_cli.main(["--dataset", str(folder), "--output", str(output), OPTION]) == 0
    with zipfile.ZipFile(output) as archive:
        assert sum(name.endswith(".png") for name in archive.namelist()) == 2


@pytest.mark.parametrize("command", [train_cli.build_parser, evaluate_cli.build_parser, export_cli.build_parser])
def test_help_documents_the_option(command: Callable[[], Any]) -> None:
    assert OPTION in command().format_help()


def test_the_option_is_a_data_setting_off_by_default(tmp_path: Path) -> None:
    config = TrainConfig(dataset=str(_crafted(tmp_path)))
    assert config.allow_outside_files is False
    with pytest.raises(ValueError, match="allow_outside_files must be True or False"):
        TrainConfig(dataset="shapes", allow_outside_files="false")  # type: ignore[arg-type]
    _refusal(lambda: prepare_dataset(config))
    allowed = config.with_overrides(allow_outside_files=True)
    data = prepare_dataset(allowed)
    assert data.settings == data_settings(allowed) and data.settings.allow_outside_files
    with pytest.raises(ValueError, match="allow_outside_files: True -> False"):
        data.check_settings(data_settings(config))
