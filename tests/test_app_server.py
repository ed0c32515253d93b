"""The launched app, driven over HTTP: the /detect API, bad uploads, and what the server refuses to serve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

import ddetr
from app import AppConfig
from app_support.hardening import MAX_UPLOAD, QUEUE_MAX_SIZE
from app_support.paths import REPO_ROOT

# Gradio's queue analytics use a pandas option that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*", "ignore:The copy keyword is deprecated.*")

EXAMPLE = REPO_ROOT / "examples" / "shapes" / "shapes_0.jpg"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, launched_app
) -> Iterator[tuple[object, str]]:
    root = tmp_path_factory.mktemp("app")
    # fp32 so that the served detections can be compared exactly with a pipeline run in this thread
    config = AppConfig(model=str(tiny_model_dir), models_dir=root / "models", runs_dir=root / "runs", precision="fp32")
    with launched_app(config) as served:
        yield served


@pytest.fixture(scope="module")
def client(server) -> Iterator[Client]:
    _, url = server
    client = Client(url, verbose=False)
    yield client
    client.close()


def test_detect_endpoint_returns_hub_schema_detections(client: Client, tiny_model_dir: Path):
    result = client.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect")
    assert result == ddetr.pipeline(model=tiny_model_dir)(str(EXAMPLE), threshold=0.5)
    assert result and set(result[0]) == {"score", "label", "box"}
    assert set(result[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}
    fewer = client.predict(handle_file(str(EXAMPLE)), 0.5, 2, api_name="/detect")
    assert fewer == result[:2]


def test_bad_uploads_give_errors_and_the_server_keeps_serving(client: Client, tmp_path: Path, truncated_png):
    broken = [truncated_png(tmp_path / "cut.png"), tmp_path / "noise.jpg", tmp_path / "page.png"]
    broken[1].write_bytes(bytes(range(256)) * 40)
    broken[2].write_text("<html><body>hello</body></html>")
    for path in broken:
        with pytest.raises(Exception) as caught:
            client.predict(handle_file(str(path)), 0.5, api_name="/detect")
        assert type(caught.value).__name__ == "AppError"
        # The app's own message, naming the file and the problem (not Gradio's bare "error": null).
        assert path.name in str(caught.value) and "verbose error reporting" not in str(caught.value)
    assert client.predict(handle_file(str(EXAMPLE)), 0.0, api_name="/detect")  # still serving


def test_cannot_pick_an_unlisted_model_over_the_api(client: Client):
    with pytest.raises(Exception, match="not available"):
        client.predict(handle_file(str(EXAMPLE)), 0.5, 100, "dir:../../etc", api_name="/detect")


def test_server_refuses_files_it_was_not_asked_to_serve(server):
    _, url = server
    with httpx.Client(base_url=url, timeout=30) as http:
        for target in ("/etc/passwd", str(REPO_ROOT / "app.py"), str(REPO_ROOT / ".git" / "config")):
            response = http.get(f"/gradio_api/file={target}")
            assert response.status_code in (403, 404), target
        # With Gradio's default (enable_monitoring=None) /monitoring/summary answers 200 with queue analytics.
        assert http.get("/monitoring").status_code == 403
        assert http.get("/monitoring/summary").status_code == 403


def test_oversized_uploads_are_rejected(server):
    _, url = server
    limit = int(MAX_UPLOAD.removesuffix("mb")) * 1024 * 1024
    payload = b"\0" * (limit + 1024 * 1024)
    with httpx.Client(base_url=url, timeout=60) as http:
        response = http.post("/gradio_api/upload", files={"files": ("big.png", payload, "image/png")})
    assert response.status_code == 413


def test_queue_is_bounded(server):
    demo, _ = server
    assert demo._queue.max_size == QUEUE_MAX_SIZE
    assert demo.max_file_size is not None


def test_short_finetune_streams_metrics_and_stops_on_request(client: Client):
    started = client.predict(
        kind="shapes",
        shapes_train=16,
        shapes_validation=4,
        shapes_size=128,
        hub_id="",
        folder="",
        upload=None,
        base_model="preset:tiny",
        epochs=100,
        batch_size=4,
        save_every=5,
        api_name="/finetune_start",
    )
    assert set(started) == {"run", "token", "state", "place_in_line"} and len(started["token"]) >= 32
    job = client.submit(started["token"], api_name="/finetune_stream")
    seen_steps, states, stop_requested_at = [], [], None
    last = None
    for update in job:
        assert update["run"] == started["run"]
        states.append(update["state"])
        seen_steps.append(update["step"])
        last = update
        # A detection request while training runs is still answered.
        if stop_requested_at is None and update["step"] >= 2:
            assert client.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect")
            assert client.predict(started["token"], api_name="/finetune_stop").startswith("stopping")
            stop_requested_at = update["step"]
    summary = client.predict(api_name="/finetune_status")
    assert summary["busy"] is False and "records" not in summary and "run" not in summary
    assert len(set(seen_steps)) >= 2 and seen_steps == sorted(seen_steps)  # metrics arrived while it trained
    assert last is not None and states[-1] == "stopped"
    assert stop_requested_at is not None and last["step"] < 400
    losses = [r["loss"] for r in last["records"] if r["type"] == "train"]
    assert losses and all(isinstance(loss, float) for loss in losses)
