"""The Label tab's storage and visitor identity, without a browser."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import PIL.Image
import pytest

from app_support.detector_cache import DetectorCache
from app_support.downloads import DownloadFolder
from app_support.jobs import TrainingJobs
from app_support.label_store import LabelStore, dataset_folder
from app_support.label_tab import CURRENT_RUN, LabelTab
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities
from app_support.training import CheckpointPreviews, training_config
from app_support.visitors import Visitors
from finetune.data.prepare import DataSettings, prepare

SHAPES = Path(__file__).resolve().parents[1] / "examples" / "shapes"


def photos(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"photo{index}.png"
        PIL.Image.new("RGB", (80 + index, 60), (index * 40 % 255, 90, 140)).save(path)
        paths.append(path)
    return paths


def test_tokens_are_issued_by_the_server_and_never_paths(tmp_path: Path):
    visitors = Visitors(tmp_path / "visitors")
    token, folder = visitors.claim(None)
    assert folder.is_dir() and folder.parent == tmp_path / "visitors" and len(token) == 32
    assert visitors.claim(token) == (token, folder)  # a reload keeps the same folder
    (tmp_path / "secret").mkdir()
    for forged in ("../secret", "/etc", "", "x" * 32, token[:-1], None, 42):
        assert visitors.folder(forged) is None  # type: ignore[arg-type]
        fresh, other = visitors.claim(forged)  # type: ignore[arg-type]
        assert fresh != token and other != folder and other.parent == tmp_path / "visitors"


def test_every_change_is_saved_and_survives_a_restart(tmp_path: Path):
    store = LabelStore(tmp_path / "visitor")
    added, problems = store.add_images(photos(tmp_path, 3))
    assert (added, problems) == (3, [])
    assert store.add_images(photos(tmp_path, 1)) == (0, [])  # the same photo again is skipped
    store.set_classes(["cat", " dog ", "cat", ""])
    assert store.classes == ["cat", "dog"]
    store.save_boxes(0, [{"label": "dog", "xmin": -5, "ymin": 10, "xmax": 50.5, "ymax": 200}], background=False)
    store.save_boxes(1, [{"label": "bird", "xmin": 1, "ymin": 1, "xmax": 20, "ymax": 20}], background=False)
    store.save_boxes(2, [], background=True)

    reopened = LabelStore(tmp_path / "visitor")  # what a server restart sees
    assert [image.status for image in reopened.images] == ["labelled", "unlabelled", "background"]
    assert reopened.images[0].boxes == [{"label": "dog", "xmin": 0.0, "ymin": 10.0, "xmax": 50.5, "ymax": 60.0}]
    assert reopened.labelled_count() == 2 and reopened.class_counts() == {"cat": 0, "dog": 1}
    assert not list(tmp_path.rglob("*.partial"))

    # What finetune reads: the labelled image and the background one, with the class list.
    prepared = prepare(DataSettings(source=str(dataset_folder(tmp_path / "visitor")), validation_fraction=0))
    assert prepared.class_names == ["cat", "dog"]
    (train,) = prepared.splits.values()
    assert len(train) == 2
    coco = json.loads((dataset_folder(tmp_path / "visitor") / "annotations.json").read_text())
    assert coco["annotations"][0]["bbox"] == [0.0, 10.0, 50.5, 50.0]
    assert [image["width"] for image in coco["images"]] == [80, 82]


def test_removing_a_class_removes_its_boxes(tmp_path: Path):
    store = LabelStore(tmp_path / "visitor")
    store.add_images(photos(tmp_path, 1))
    store.set_classes(["cat", "dog"])
    store.save_boxes(0, [{"label": "cat", "xmin": 1, "ymin": 1, "xmax": 30, "ymax": 30}], background=False)
    store.set_classes(["dog"])
    assert store.images[0].boxes == [] and store.images[0].status == "unlabelled"
    with pytest.raises(ValueError, match="at least one class"):
        store.set_classes([" ", ""])


def test_bad_uploads_are_reported_by_name_and_nothing_else_changes(tmp_path: Path, truncated_png):
    store = LabelStore(tmp_path / "visitor")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    added, problems = store.add_images([text, truncated_png(tmp_path / "cut.png"), *photos(tmp_path, 1)])
    assert added == 1
    assert len(problems) == 2 and problems[0].startswith("notes.png") and problems[1].startswith("cut.png")
    with pytest.raises(ValueError, match="no image 5"):
        store.save_boxes(4, [], background=True)


def test_label_assist_from_the_runs_latest_checkpoint(tmp_path: Path, tiny_model_dir: Path):
    jobs = TrainingJobs(tmp_path / "runs")
    registry = ModelRegistry(tmp_path / "models", cli_model=str(tiny_model_dir), hub_reachable=lambda: False)
    visitors = Visitors(tmp_path / "visitors")
    identities = Identities(visitors)
    tab = LabelTab(
        visitors,
        registry,
        DetectorCache(),
        jobs=jobs,
        previews=CheckpointPreviews(),
        identities=identities,
        work=tmp_path / "work",
        downloads=DownloadFolder(tmp_path / "downloads"),
    )
    token, folder = visitors.claim(None)
    store = tab.store(token)
    store.add_images([SHAPES / "shapes_0.jpg"])
    store.set_classes(["circle", "square", "triangle", "star", "cross", "ring"])
    with pytest.raises(gr.Error, match="no fine-tuning run with a checkpoint"):
        tab.assist(token, 0, CURRENT_RUN, 0.0)

    owner = identities.owner(token)
    assert owner is not None
    config = training_config(
        dataset="shapes:train=8,validation=4,test=0,size=128",
        model="tiny",
        output_dir=jobs.new_run_dir(owner),
        epochs=1, max_steps=2, batch_size=4, eval_every=1, save_every=1,
    )  # fmt: skip
    job, _ = jobs.submit(owner, config, description="tiny shapes")
    jobs.wait(300)
    assert jobs.snapshot(job).state == "finished"
    # Another visitor has no run: the current run is the visitor's own, not the server's.
    other, _ = visitors.claim(None)
    tab.store(other).add_images([SHAPES / "shapes_0.jpg"])
    tab.store(other).set_classes(["circle"])
    with pytest.raises(gr.Error, match="no fine-tuning run"):
        tab.assist(other, 0, CURRENT_RUN, 0.0)
    # The untrained run's scores are low: threshold 0 keeps its 100 best boxes, all of shape classes.
    tab.assist(token, 0, CURRENT_RUN, 0.0)
    assisted = LabelStore(folder).images[0]
    assert assisted.status == "labelled" and len(assisted.boxes) == 100
    assert {box["label"] for box in assisted.boxes} <= set(store.classes)
    # Someone else's token is not a session here.
    with pytest.raises(gr.Error, match="not found"):
        tab.assist("b" * 32, 0, CURRENT_RUN, 0.0)


def test_push_sends_only_the_visitors_own_dataset(tmp_path: Path, hub_standin):
    visitors = Visitors(tmp_path / "visitors")
    tab = LabelTab(
        visitors,
        ModelRegistry(tmp_path / "models", hub_reachable=lambda: False),
        DetectorCache(),
        jobs=TrainingJobs(tmp_path / "runs"),
        previews=CheckpointPreviews(),
        identities=Identities(visitors),
        work=tmp_path / "work",
        downloads=DownloadFolder(tmp_path / "downloads"),
    )
    token, _ = visitors.claim(None)
    store = tab.store(token)  # the tab's own store: it holds the visitor's lock
    with pytest.raises(gr.Error, match="nothing is labelled"):
        tab.push(token, "tester/mine", "hf_standin_write_token", True)
    store.add_images(photos(tmp_path, 2))
    store.set_classes(["cat"])
    store.save_boxes(1, [{"label": "cat", "xmin": 2, "ymin": 2, "xmax": 30, "ymax": 20}], background=False)
    message, cleared = tab.push(token, "tester/mine", "hf_standin_write_token", True)
    assert "tester/mine" in message and "private" in message and cleared == ""
    # The labelled image only: the unlabelled upload stays on the server.
    assert set(hub_standin.files()) == {"annotations.json", "images/000002.png", "README.md"}
    with pytest.raises(gr.Error, match="refused the token"):
        tab.push(token, "tester/mine", "hf_not_valid", True)
