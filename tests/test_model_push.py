"""Keeping a fine-tuned model on the Hub (``finetune.run.hub_model.push_model``, ``python -m finetune --push-to-hub``),
against the local stand-in of the Hub's HTTP API."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import traceback
from pathlib import Path

import PIL.Image
import pytest
import torch
import yaml

import ddetr
from finetune import cli, run_training
from finetune.hub_commit import HubPushError
from finetune.run.files import read_status, write_status
from finetune.run.hub_model import model_card, push_model, read_finished_run
from finetune.run.metrics_log import read_metrics

TOKEN = "hf_standin_write_token"
SHAPES = "shapes:train=4,validation=2,test=0,size=64"
MODEL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json"}
TINY_RUN = ["--dataset", SHAPES, "--model", "tiny", "--max-steps", "2", "--batch-size", "2", "--image-size", "64",
            "--log-every", "1", "--no-progress"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("single_thread", "isolated_shapes_cache")


@pytest.fixture(scope="module")
def finished_run(finished_tiny_run: Path) -> Path:
    return finished_tiny_run


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _files_holding(folder: Path, secret: str) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_push_commits_the_model_its_curves_and_a_card_to_a_private_repo(
    hub_standin, finished_run: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    url = push_model(finished_run, "tester/tiny-shapes", token=TOKEN)
    assert url == f"{hub_standin.url}/tester/tiny-shapes"
    assert hub_standin.repos["tester/tiny-shapes"]["visibility"] == "private"
    assert hub_standin.repos["tester/tiny-shapes"].get("type") in (None, "model")
    assert len(hub_standin.commits) == 1 and hub_standin.commits[0][0] == "/api/models/tester/tiny-shapes/commit/main"
    files = hub_standin.files()
    assert set(files) == MODEL_FILES | {"README.md", "loss.png", "map.png"}
    for name in MODEL_FILES:
        assert files[name] == (finished_run / "model" / name).read_bytes(), name
    assert files["loss.png"] == (finished_run / "loss.png").read_bytes()

    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "object-detection" and meta["library_name"] == "transformers"
    assert {"object-detection", "deformable-detr", "ddetr"} <= set(meta["tags"])
    assert "datasets" not in meta and "base_model" not in meta  # synthetic data, a preset trained from scratch
    final = read_metrics(finished_run / "metrics.jsonl", kind="eval")[-1]
    assert final["step"] == read_status(finished_run)["step"] == 2
    (index,) = meta["model-index"]
    assert index["name"] == "tiny-shapes"
    (result,) = index["results"]
    assert result["task"]["type"] == "object-detection" and result["dataset"]["split"] == "validation"
    metrics = {metric["type"]: metric["value"] for metric in result["metrics"]}
    assert metrics == {"mAP": final["map"], "mAP@50": final["map_50"], "mAP@75": final["map_75"]}
    expected = [
        "![Training loss](loss.png)",
        "![Validation mAP](map.png)",
        f"| mAP@0.5 | {final['map_50']:.4f} |",
        "| batch_size | `2` |",
        'ddetr.pipeline(model="tester/tiny-shapes")',
        'DeformableDetrForObjectDetection.from_pretrained("tester/tiny-shapes")',
        'AutoModelForObjectDetection.from_pretrained("tester/tiny-shapes")',
        'AutoImageProcessor.from_pretrained("tester/tiny-shapes")',
        SHAPES,
    ]
    for text in expected:
        assert text in card, text
    assert str(finished_run) not in card and "output_dir" not in card  # settings without paths

    # The token went only into the Authorization header: not into logs, files or the card.
    assert hub_standin.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub_standin.requests)
    assert TOKEN not in caplog.text and TOKEN not in card
    assert not _files_holding(tmp_path, TOKEN) and not _files_holding(finished_run, TOKEN)


def test_the_pushed_folder_downloads_and_loads_with_ddetr_and_transformers(
    hub_standin, finished_run: Path, tmp_path: Path
) -> None:
    from huggingface_hub import hf_hub_download

    push_model(finished_run, "tester/loadable", token=TOKEN)
    folder = tmp_path / "downloaded"
    for name in sorted(hub_standin.files()):
        hf_hub_download("tester/loadable", name, endpoint=hub_standin.url, token=TOKEN, local_dir=folder)
    for name in MODEL_FILES:
        assert (folder / name).read_bytes() == (finished_run / "model" / name).read_bytes(), name

    model = ddetr.DeformableDetrForObjectDetection.from_pretrained(folder).eval()
    assert list(model.config.id2label.values()) == ["circle", "square", "triangle", "star", "cross", "ring"]
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=pixels)
    image = PIL.Image.fromarray(pixels[0].permute(1, 2, 0).mul(255).byte().numpy())
    assert isinstance(ddetr.pipeline(model=str(folder))(image, threshold=0.0), list)

    transformers = pytest.importorskip("transformers")
    theirs_model = transformers.AutoModelForObjectDetection.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    assert processor.size["shortest_edge"] == 64
    with torch.no_grad():
        theirs = theirs_model(pixel_values=pixels)
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs.pred_boxes, ours.pred_boxes, atol=1e-4, rtol=1e-4)


def test_the_card_names_hub_sources_and_leaves_local_paths_out(finished_run: Path, tmp_path: Path) -> None:
    run = read_finished_run(finished_run)
    from_hub = dataclasses.replace(
        run, settings={**run.settings, "dataset": "tester/labelled", "model": "SenseTime/deformable-detr"}
    )
    card = model_card(from_hub, "tester/fine-tuned")
    meta = _front_matter(card)
    assert meta["datasets"] == ["tester/labelled"] and meta["base_model"] == "SenseTime/deformable-detr"
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "tester/labelled"
    assert "fine-tuned from [SenseTime/deformable-detr](https://huggingface.co/SenseTime/deformable-detr)" in card
    local = tmp_path / "private" / "my-boxes"
    local.mkdir(parents=True)
    checkpoint = tmp_path / "previous" / "model"
    for dataset, model in ((str(local), str(checkpoint)), ("data/gone.zip", "runs/a/model"), ("./x/y", "tiny")):
        card = model_card(
            dataclasses.replace(run, settings={**run.settings, "dataset": dataset, "model": model}), "t/m"
        )
        meta = _front_matter(card)
        assert "datasets" not in meta and "base_model" not in meta, (dataset, model)
        assert str(tmp_path) not in card and "data/gone" not in card and "runs/a" not in card
    assert "a local dataset (`my-boxes`)" in model_card(
        dataclasses.replace(run, settings={**run.settings, "dataset": str(local)}), "t/m"
    )
    no_validation = dataclasses.replace(run, final_eval=None, curves={"loss.png": finished_run / "loss.png"})
    card = model_card(no_validation, "t/m")
    assert "model-index" not in _front_matter(card) and "no validation split" in card and "map.png" not in card


def test_public_on_request_with_the_given_commit_message(hub_standin, finished_run: Path) -> None:
    push_model(finished_run, "tester/open", token=TOKEN, private=False, commit_message="Shapes, 2 steps")
    assert hub_standin.repos["tester/open"]["visibility"] == "public"
    header = hub_standin.commits[-1][1][0]
    assert header["key"] == "header" and header["value"]["summary"] == "Shapes, 2 steps"


def test_no_token_or_a_bad_repo_id_is_refused_before_any_request(hub_standin, finished_run: Path) -> None:
    for token in (None, "", "   "):
        with pytest.raises(HubPushError, match="token with write access"):
            push_model(finished_run, "tester/model", token=token)
    for repo in ("no-owner", "../x/y", "a/b/c", "tester/two words", "tester/x..y", "tester/", "/model"):
        with pytest.raises(HubPushError, match="not a repo id"):
            push_model(finished_run, repo, token=TOKEN)
    assert isinstance(HubPushError("x"), ValueError)
    assert hub_standin.requests == []


def test_a_run_without_a_finished_model_is_refused(hub_standin, finished_run: Path, tmp_path: Path) -> None:
    stopped = shutil.copytree(finished_run, tmp_path / "stopped")
    write_status(stopped, state="stopped", step=1, total_steps=2, message="stopped at step 1 of 2")
    with pytest.raises(HubPushError, match=r"no finished model to push: it stopped at step 1\. Finish it first"):
        push_model(stopped, "tester/model", token=TOKEN)
    write_status(stopped, state="running", step=1, total_steps=2)
    with pytest.raises(HubPushError, match="still running"):
        push_model(stopped, "tester/model", token=TOKEN)
    incomplete = shutil.copytree(finished_run, tmp_path / "incomplete")
    (incomplete / "model" / "model.safetensors").unlink()
    with pytest.raises(HubPushError, match=r"lacks \['model.safetensors'\]"):
        push_model(incomplete, "tester/model", token=TOKEN)
    with pytest.raises(HubPushError, match="not a run folder"):
        push_model(tmp_path / "nothing", "tester/model", token=TOKEN)
    assert hub_standin.requests == []


def test_a_refused_token_is_a_clear_error_that_does_not_repeat_it(
    hub_standin, finished_run: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "hf_wrong_token_123456"
    with pytest.raises(HubPushError) as caught:
        push_model(finished_run, "tester/model", token=wrong)
    message = str(caught.value)
    assert "refused the token (401)" in message and "write access to tester" in message
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value) + str(caught.value.__context__)
    assert wrong not in shown and wrong not in caplog.text
    assert not _files_holding(tmp_path, wrong) and not _files_holding(finished_run, wrong)
    assert hub_standin.commits == [] and hub_standin.repos == {}


def test_the_command_line_trains_then_pushes(
    hub_standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = tmp_path / "run"
    assert cli.main([*TINY_RUN, "--output-dir", str(run), "--push-to-hub", "tester/cli-run"]) == 0
    out, err = capsys.readouterr()
    assert f"pushed the model to {hub_standin.url}/tester/cli-run (private)" in out
    assert hub_standin.repos["tester/cli-run"]["visibility"] == "private"
    files = hub_standin.files()
    assert MODEL_FILES | {"README.md", "loss.png", "map.png"} == set(files)
    assert files["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
    final = read_metrics(run / "metrics.jsonl", kind="eval")[-1]
    (result,) = _front_matter(files["README.md"].decode())["model-index"][0]["results"]
    assert result["metrics"][0] == {"type": "mAP", "value": final["map"], "name": "COCO mAP@[.5:.95]"}
    assert TOKEN not in out + err + caplog.text and not _files_holding(tmp_path, TOKEN)


def test_the_command_line_pushes_a_finished_run_later_and_reports_a_refusal(
    hub_standin, finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = shutil.copytree(finished_run, tmp_path / "run")
    wrong = "hf_not_the_right_one_42"
    monkeypatch.setenv("HF_TOKEN", wrong)
    later = ["--resume", "--output-dir", str(run), "--no-progress", "--push-to-hub", "tester/later", "--hub-public"]
    assert cli.main(later) == cli.EXIT_PUSH_FAILED
    out, err = capsys.readouterr()
    assert "error: not pushed to tester/later: the Hub refused the token (401)" in err and wrong not in out + err
    assert f"--resume --output-dir {run} --push-to-hub tester/later --hub-public" in err  # how to retry
    assert (run / "model" / "model.safetensors").is_file()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(later) == 0
    assert "(public)" in capsys.readouterr().out
    assert hub_standin.repos["tester/later"]["visibility"] == "public" and len(hub_standin.commits) == 1


def test_the_command_line_does_not_push_a_stopped_run(
    hub_standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    stop = threading.Event()
    stop.set()  # as Ctrl-C would: the run stops at its first step, resumable
    monkeypatch.setattr(cli, "run_training", lambda config: run_training(config, stop_event=stop))
    run = tmp_path / "run"
    assert cli.main([*TINY_RUN, "--output-dir", str(run), "--push-to-hub", "tester/stopped"]) == 0
    err = capsys.readouterr().err
    assert "not pushed to tester/stopped: the run stopped before the end" in err
    assert f"--resume --output-dir {run} --push-to-hub tester/stopped" in err
    assert read_status(run)["state"] == "stopped" and hub_standin.requests == []


def test_the_command_line_checks_the_token_and_repo_before_training(
    hub_standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login"))
    run = tmp_path / "run"
    assert cli.main([*TINY_RUN, "--output-dir", str(run), "--push-to-hub", "tester/x"]) == cli.EXIT_BAD_INPUT
    assert "--push-to-hub needs a Hugging Face token with write access" in capsys.readouterr().err
    # A stored login (`hf auth login`) is used as well.
    (tmp_path / "no-login").write_text(TOKEN)
    assert cli.hub_token("tester/x") == TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main([*TINY_RUN, "--output-dir", str(run), "--push-to-hub", "no-owner"]) == cli.EXIT_BAD_INPUT
    assert "'no-owner' is not a repo id" in capsys.readouterr().err
    secret = "hf_typed_on_the_command_line"
    for flags in (["--hub-token", secret], [f"--hub-token={secret}"]):
        assert cli.main([*TINY_RUN, "--output-dir", str(run), "--push-to-hub", "tester/x", *flags]) == 2
        err = capsys.readouterr().err
        assert "--hub-token is not accepted" in err and "HF_TOKEN" in err and secret not in err
    assert not run.exists() and hub_standin.requests == []


def test_help_documents_the_hub_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--push-to-hub REPO", "--hub-public", "HF_TOKEN", "hf auth login", "default: private",
                   "stopped or diverged run is not pushed"):  # fmt: skip
        assert phrase in text, phrase
    assert "--hub-token" not in text
