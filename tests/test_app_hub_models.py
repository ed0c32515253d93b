"""Loading a pushed model back into the Detect tab's picker by its repo id (``DetectTab.add_hub_model``), against
the local stand-in of the Hub's HTTP API: listed and selected for the visitor who added it only, refused with a
clear message for bad ids (before any request), missing or private repos and repos that are not a model."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest

import ddetr
from app_support.detect_tab import DetectTab, table_rows
from app_support.detector_cache import DetectorCache
from app_support.downloads import DownloadFolder
from app_support.model_choices import (
    HubModelError,
    ModelRegistry,
    UnknownModelError,
    check_hub_model_id,
    fetch_hub_model,
)
from app_support.owners import Identities
from app_support.visitors import Visitors
from finetune.hub_commit import commit_files
from finetune.run.hub_model import push_model

TOKEN = "hf_standin_write_token"  # the stand-in's token (conftest's hub_standin)
SHAPES = "shapes:train=4,validation=2,test=0,size=64"
REPO = "tester/tiny-shapes"
BAD_IDS = ("../x", "/etc", "/etc/passwd", "http://huggingface.co/a/b", "https://x/y", "hf://a/b", "a/b/c", "",
           "   ", None, "no-owner", "a/..", "../..", "./a", "a/.b", "~/a", "a//b", "a/b/", "C:\\x\\y", "a\\b",
           "owner/two words", "owner/x..y", "owner/x--y", "owner/name?rev=x", "owner/%2e%2e", "ow\u00e9ner/name",
           "owner/" + "n" * 100)  # fmt: skip

pytestmark = pytest.mark.usefixtures("single_thread", "isolated_shapes_cache")


@pytest.fixture(scope="module")
def finished_run(finished_tiny_run: Path) -> Path:
    return finished_tiny_run


@pytest.fixture(autouse=True)
def no_server_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ambient token unless a test sets one: the downloads must use only what the handler is given."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login"))


@pytest.fixture
def hub_cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


@pytest.fixture
def tab(tmp_path: Path, hub_cache: Path, tiny_model_dir: Path) -> DetectTab:
    """The Detect tab as the app builds it, offline for the shared models (only --model), downloading into a cache
    of the test's own; fp32 detectors, so its detections can be compared with ``ddetr.pipeline``'s."""
    registry = ModelRegistry(
        tmp_path / "models", cli_model=str(tiny_model_dir), hub_reachable=lambda: False, bundled_dir=tmp_path / "none"
    )
    return DetectTab(
        registry,
        DetectorCache(loader=lambda source: ddetr.pipeline(model=source)),
        DownloadFolder(tmp_path / "downloads"),
        Identities(Visitors(tmp_path / "visitors")),
        fetch_hub=functools.partial(fetch_hub_model, cache_dir=hub_cache),
    )


def new_visitor(tab: DetectTab) -> str:
    token, _ = tab.identities.visitors.claim(None)
    return token


def login(token: str = TOKEN) -> gr.OAuthToken:
    return gr.OAuthToken(token=token, scope="read-repos", expires_at=0)


def keys(update: dict) -> list[str]:
    return [key for _, key in update["choices"]]


def auth_headers(hub_standin) -> set[str]:
    return {auth for _, _, auth in hub_standin.requests}


# -- adding, listing, detecting --------------------------------------------------------------------------------- #


def test_a_pushed_model_is_added_listed_selected_and_detects_like_its_folder(
    hub_standin, tab: DetectTab, finished_run: Path, shapes_image: Path, hub_cache: Path
) -> None:
    push_model(finished_run, REPO, token=TOKEN)  # private
    hub_standin.requests.clear()
    visitor = new_visitor(tab)
    update = tab.add_hub_model(f"  {REPO} ", visitor, None, login())
    key = f"user-hub:{REPO}"
    assert update["value"] == key
    assert keys(update) == ["cli", key]  # after the shared models
    assert dict(update["choices"])[f"{REPO} (added from the Hub)"] == key
    assert keys(tab.refresh_models(key, visitor)) == ["cli", key]
    assert tab.refresh_models(key, visitor)["value"] == key
    # Only the model files were fetched (not the card or the curves), every request with the visitor's token.
    fetched = {
        path.rsplit("/", 1)[-1] for method, path, _ in hub_standin.requests if method == "GET" and "/resolve/" in path
    }
    assert fetched == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert auth_headers(hub_standin) == {f"Bearer {TOKEN}"}

    # Its source is the snapshot folder in the hub cache: loading and detecting never ask the Hub again.
    choice = tab.registry.get(key, tab.identities.owner_key(visitor))
    assert choice.kind == "hub" and Path(choice.source).is_relative_to(hub_cache.resolve())
    asked = len(hub_standin.requests)
    info, _ = tab.select_model(key, visitor)
    assert REPO in info and "6 classes" in info
    _, rows, json_file, summary, view = tab.detect(str(shapes_image), key, 0, 0.0, 100, [], visitor)
    assert len(hub_standin.requests) == asked
    assert f"{REPO} (added from the Hub)" in summary

    reference = ddetr.pipeline(model=finished_run / "model")
    (expected,) = reference.candidates([reference.processor.load_image(str(shapes_image))])
    np.testing.assert_array_equal(view.candidates.scores, expected.scores)
    np.testing.assert_array_equal(view.candidates.boxes, expected.boxes)
    assert view.candidates.names == expected.names
    assert rows == table_rows(expected.detections(0.0, 100)) and rows
    assert json.loads(Path(json_file).read_text()) == expected.detections(0.0, 100)


def test_another_visitor_neither_sees_nor_picks_it(hub_standin, tab: DetectTab, finished_run: Path) -> None:
    push_model(finished_run, REPO, token=TOKEN)
    owner, stranger = new_visitor(tab), new_visitor(tab)
    key = tab.add_hub_model(REPO, owner, None, login())["value"]
    assert keys(tab.refresh_models(None, stranger)) == ["cli"]
    assert tab.refresh_models(key, stranger)["value"] == "cli"  # a stale key falls back to the default
    for who in (stranger, None, "a-token-this-server-never-issued"):
        with pytest.raises(gr.Error, match="not available"):
            tab.select_model(key, who)
        with pytest.raises(gr.Error, match="not available"):
            tab.detect("unused.png", key, 0, 0.5, 100, [], who)
    with pytest.raises(gr.Error, match="not available"):
        tab.api_detect("unused.png", model=key)  # the public API has no owner
    owner_key, stranger_key = tab.identities.owner_key(owner), tab.identities.owner_key(stranger)
    with pytest.raises(UnknownModelError):
        tab.registry.get(key, stranger_key)
    assert tab.registry.get(key, owner_key).key == key

    # A login follows its holder (any browser), and is an owner of its own.
    alice = SimpleNamespace(username="alice")
    assert tab.add_hub_model(REPO, None, alice, login())["value"] == key
    assert keys(tab.refresh_models(None, new_visitor(tab), alice)) == ["cli", key]
    assert keys(tab.refresh_models(None, None, SimpleNamespace(username="bob"))) == ["cli"]


def test_a_visitor_without_an_owner_is_refused(hub_standin, tab: DetectTab, finished_run: Path) -> None:
    push_model(finished_run, REPO, token=TOKEN)
    hub_standin.requests.clear()
    for visitor in (None, "a-token-this-server-never-issued"):
        with pytest.raises(gr.Error, match="needs a browser session or a Hugging Face login"):
            tab.add_hub_model(REPO, visitor, None, login())
    with pytest.raises(HubModelError, match="browser session"):
        tab.registry.add_hub_model(None, REPO, finished_run / "model")
    assert hub_standin.requests == []


# -- refusals ----------------------------------------------------------------------------------------------------- #


def test_bad_ids_are_refused_before_any_request(hub_standin, tab: DetectTab, tiny_model_dir: Path) -> None:
    visitor = new_visitor(tab)
    for bad in BAD_IDS:
        message = "type a hub model's repo id" if not (bad or "").strip() else "is not a hub repo id"
        with pytest.raises(gr.Error, match=message):
            tab.add_hub_model(bad, visitor, None, login())
        with pytest.raises(HubModelError):
            fetch_hub_model(bad, TOKEN)  # type: ignore[arg-type]
        with pytest.raises(HubModelError):
            tab.registry.add_hub_model(tab.identities.owner_key(visitor), bad, tiny_model_dir)  # type: ignore[arg-type]
    assert hub_standin.requests == []
    assert keys(tab.refresh_models(None, visitor)) == ["cli"]
    assert check_hub_model_id(" SenseTime/deformable-detr\n") == "SenseTime/deformable-detr"
    assert isinstance(HubModelError("x"), ValueError)


def test_a_missing_repo_is_a_clear_error(hub_standin, tab: DetectTab) -> None:
    visitor = new_visitor(tab)
    with pytest.raises(gr.Error, match=r"tester/nothing-here was not found on the Hub, or it is private"):
        tab.add_hub_model("tester/nothing-here", visitor, None, login())
    assert keys(tab.refresh_models(None, visitor)) == ["cli"]
    assert not any("/resolve/" in path for _, path, _ in hub_standin.requests)


def test_a_private_repo_needs_the_visitors_own_token(
    hub_standin, tab: DetectTab, finished_run: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_model(finished_run, REPO, token=TOKEN)
    # The server holds a token that could read the repo: an anonymous visitor must not be lent it.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_standin.requests.clear()
    anonymous, owner = new_visitor(tab), new_visitor(tab)
    with pytest.raises(gr.Error, match=rf"{REPO} was not found on the Hub, or it is private \(sign in"):
        tab.add_hub_model(REPO, anonymous, None, None)
    assert auth_headers(hub_standin) == {""}
    with pytest.raises(gr.Error, match="not found on the Hub, or it is private \\(your account cannot read it"):
        tab.add_hub_model(REPO, anonymous, None, login("hf_someone_elses_token"))
    assert keys(tab.refresh_models(None, anonymous)) == ["cli"]

    # Once its owner has downloaded it, the files are in the shared cache; still nobody else gets them.
    tab.add_hub_model(REPO, owner, None, login())
    assert any(hub_cache.rglob("model.safetensors"))
    with pytest.raises(gr.Error, match="not found on the Hub, or it is private"):
        tab.add_hub_model(REPO, anonymous, None, None)
    assert keys(tab.refresh_models(None, anonymous)) == ["cli"]


def test_a_public_repo_is_added_anonymously_without_any_token(
    hub_standin, tab: DetectTab, finished_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_model(finished_run, "tester/open", token=TOKEN, private=False)
    monkeypatch.setenv("HF_TOKEN", "hf_the_servers_own")
    hub_standin.requests.clear()
    visitor = new_visitor(tab)
    assert tab.add_hub_model("tester/open", visitor, None, None)["value"] == "user-hub:tester/open"
    assert hub_standin.requests and auth_headers(hub_standin) == {""}


def test_repos_that_are_not_a_detr_model_are_refused_and_never_listed(
    hub_standin, tab: DetectTab, finished_run: Path, hub_cache: Path
) -> None:
    model = finished_run / "model"
    visitor = new_visitor(tab)

    def repo(name: str, files: dict[str, Path | bytes]) -> str:
        commit_files(f"tester/{name}", files, repo_type="model", token=TOKEN, private=True, commit_message="x")
        return f"tester/{name}"

    card_only = repo("card-only", {"README.md": b"# nothing to load"})
    hub_standin.requests.clear()
    with pytest.raises(gr.Error, match=r"card-only is not a Deformable DETR model: it has no config\.json"):
        tab.add_hub_model(card_only, visitor, None, login())
    assert not any("/resolve/" in path for _, path, _ in hub_standin.requests)  # refused from the listing alone

    detr = json.loads((model / "config.json").read_text()) | {"model_type": "detr"}
    other = repo(
        "plain-detr", {"config.json": json.dumps(detr).encode(), "model.safetensors": model / "model.safetensors"}
    )
    with pytest.raises(
        gr.Error, match=r"plain-detr is not a Deformable DETR model: its config\.json has model_type 'detr'"
    ):
        tab.add_hub_model(other, visitor, None, login())
    broken = repo("broken", {"config.json": b"{not json", "model.safetensors": model / "model.safetensors"})
    with pytest.raises(gr.Error, match=r"broken is not a Deformable DETR model: its config\.json is not valid JSON"):
        tab.add_hub_model(broken, visitor, None, login())
    garbage = repo("garbage", {"config.json": model / "config.json", "model.safetensors": b"\0" * 64})
    with pytest.raises(gr.Error, match="garbage is not a Deformable DETR model this app can load"):
        tab.add_hub_model(garbage, visitor, None, login())
    assert keys(tab.refresh_models(None, visitor)) == ["cli"]

    # A repo far larger than a checkpoint is refused before its files are downloaded.
    pushed = repo(
        "tiny-but-limited", {"config.json": model / "config.json", "model.safetensors": model / "model.safetensors"}
    )
    hub_standin.requests.clear()
    with pytest.raises(HubModelError, match="more than the 0 MB this app downloads"):
        fetch_hub_model(pushed, TOKEN, cache_dir=hub_cache, max_bytes=1000)
    assert not any("/resolve/" in path for _, path, _ in hub_standin.requests)


def test_an_offline_app_refuses_without_a_request(hub_standin, tab: DetectTab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(gr.Error, match="runs offline"):
        tab.add_hub_model(REPO, new_visitor(tab), None, login())
    assert hub_standin.requests == []


# -- the per-owner list ------------------------------------------------------------------------------------------- #


def test_each_owner_keeps_a_bounded_in_memory_list_oldest_dropped(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "runs" / "run-1" / "model"
    shutil.copytree(tiny_model_dir, run_dir)
    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "local")
    registry = ModelRegistry(
        tmp_path / "models",
        hub_reachable=lambda: False,
        bundled_dir=tmp_path / "none",
        finetuned=lambda owner: [("run-1", run_dir)] if owner == "owner-a" else [],
        hub_models_per_owner=2,
    )
    for name in ("one", "two", "three"):
        choice = registry.add_hub_model("owner-a", f"tester/{name}", tiny_model_dir)
        assert choice.key == f"user-hub:tester/{name}" and choice.source == str(tiny_model_dir.resolve())
    # After the shared models and the owner's fine-tuned ones; the oldest went.
    listed = [choice.key for choice in registry.choices("owner-a")]
    assert listed == ["run:run-1", "dir:local", "user-hub:tester/two", "user-hub:tester/three"]
    with pytest.raises(UnknownModelError):
        registry.get("user-hub:tester/one", "owner-a")
    registry.add_hub_model("owner-a", "tester/two", tiny_model_dir)  # added again: the newest now
    registry.add_hub_model("owner-a", "tester/four", tiny_model_dir)
    assert [c.key for c in registry.choices("owner-a")][2:] == ["user-hub:tester/two", "user-hub:tester/four"]
    assert [c.key for c in registry.choices("owner-b")] == ["dir:local"]
    assert [c.key for c in registry.choices()] == ["dir:local"]
    with pytest.raises(HubModelError, match="not a Deformable DETR model"):
        registry.add_hub_model("owner-a", "tester/empty", tmp_path / "runs")
    # A snapshot deleted from the cache since is no longer offered; a new registry (a restart) knows none.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "snapshot")
    registry.add_hub_model("owner-b", "tester/gone", copy)
    shutil.rmtree(copy)
    assert [c.key for c in registry.choices("owner-b")] == ["dir:local"]
    restarted = ModelRegistry(tmp_path / "models", hub_reachable=lambda: False, bundled_dir=tmp_path / "none")
    assert [c.key for c in restarted.choices("owner-a")] == ["dir:local"]
