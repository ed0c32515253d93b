"""Strangers sharing one server, over the API: owned jobs, the public summary, a queue nobody can lock, and a
training child whose death does not take the server with it."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client import Client, handle_file

from app import AppConfig
from app_support.paths import REPO_ROOT
from finetune.run.checkpoints import latest_checkpoint
from finetune.run.files import read_status
from finetune.run.metrics_log import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*", "ignore:The copy keyword is deprecated.*")

EXAMPLE = REPO_ROOT / "examples" / "shapes" / "shapes_0.jpg"
ADMIN = "admin-token-for-the-sharing-tests"
TINY_JOB = {
    "kind": "shapes",
    "shapes_train": 16,
    "shapes_validation": 4,
    "shapes_size": 128,
    "hub_id": "",
    "folder": "",
    "upload": None,
    "base_model": "preset:tiny",
    "batch_size": 4,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, launched_app) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("shared")
    config = AppConfig(model=str(tiny_model_dir), models_dir=root / "models", runs_dir=root / "runs", admin_token=ADMIN)
    with launched_app(config) as (_, url):
        yield url, root / "runs"


@pytest.fixture
def clients(served: tuple[str, Path]) -> Iterator[tuple[Client, Client]]:
    url, _ = served
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    yield a, b
    for client in (a, b):
        client.predict(ADMIN, api_name="/finetune_stop")  # leave the server idle for the next test
        client.close()
    wait_until(lambda: not a.predict(api_name="/finetune_status")["busy"], timeout=60)


def wait_until(predicate: Any, *, timeout: float, poll: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(poll)


def start(client: Client, **settings: Any) -> dict[str, Any]:
    return client.predict(**{**TINY_JOB, **settings}, api_name="/finetune_start")


def refused(call: Any, match: str) -> str:
    with pytest.raises(Exception, match=match) as caught:
        call()
    assert type(caught.value).__name__ == "AppError"
    return str(caught.value)


def stream_until(client: Client, token: str, predicate: Any, *, timeout: float = 120) -> dict[str, Any]:
    """Follow the job's stream until ``predicate(update)``; returns that update (or the last one)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    job = client.submit(token, api_name="/finetune_stream")
    try:
        for update in job:
            last = update
            if predicate(update) or time.monotonic() > deadline:
                break
    finally:
        job.cancel()  # frees the session's stream slot on the server
    return last


def test_a_job_belongs_to_its_token_and_others_see_only_the_public_summary(clients):
    a, b = clients
    started = start(a, epochs=100, save_every=2)
    token, run = started["token"], started["run"]
    stream_until(a, token, lambda update: update["step"] >= 2)

    # B sees that the server trains, and nothing else.
    summary = b.predict(api_name="/finetune_status")
    assert summary["busy"] is True and summary["step"] >= 2 and summary["total_steps"] > 0
    assert set(summary) == {"busy", "state", "step", "total_steps", "eta_seconds", "waiting"}
    assert run not in str(summary)

    # B can neither stop, resume nor follow A's job, with no token or with a guessed one.
    assert b.predict("", api_name="/finetune_stop") == "you have no job running or waiting"
    refused(lambda: b.predict("guessed-" + "x" * 24, api_name="/finetune_stop"), "does not control")
    refused(lambda: b.predict(run, "", api_name="/finetune_resume"), "not yours")
    near_miss = token[:-1] + ("x" if token[-1] != "x" else "y")  # one character off (a token can end in "x")
    refused(lambda: b.predict(run, near_miss, api_name="/finetune_resume"), "not yours")
    refused(lambda: b.predict("", api_name="/finetune_stream"), "no job of yours")
    refused(lambda: b.predict(token[::-1], api_name="/finetune_stream"), "no job of yours")
    assert a.predict(api_name="/finetune_status")["busy"] is True  # still training

    # A stops it (a checkpoint at the step reached), resumes it with the token, and it finishes.
    assert a.predict(token, api_name="/finetune_stop").startswith(f"stopping run {run}")
    stopped = stream_until(a, token, lambda update: update["state"] == "stopped")
    assert stopped["state"] == "stopped"
    assert a.predict(run, token, api_name="/finetune_resume") == f"run {run} resumed"
    assert a.predict(token, api_name="/finetune_stop").startswith("stopping")


def test_a_finished_model_is_its_owners_only(clients, served):
    a, b = clients
    started = start(a, max_steps=2, save_every=1, epochs=1)
    final = stream_until(a, started["token"], lambda update: update["state"] == "finished")
    assert final["state"] == "finished"
    # Nobody detects with a fine-tuned model over the API: the model picker knows it only in its owner's browser.
    for client in (a, b):
        refused(
            lambda client=client: client.predict(
                handle_file(str(EXAMPLE)), 0.5, 10, f"run:{started['run']}", api_name="/detect"
            ),
            "not available",
        )
    assert b.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect") is not None  # the shared model still works


def test_forty_stream_joins_and_a_status_flood_leave_detect_and_stop_answering(clients):
    a, _ = clients
    started = start(a, epochs=100, save_every=50)
    token = started["token"]
    stream_until(a, token, lambda update: update["state"] == "running")
    started_at = time.monotonic()
    baseline = time.monotonic()
    assert a.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect") is not None
    baseline = time.monotonic() - baseline

    joins = [a.submit(token, api_name="/finetune_stream") for _ in range(40)]

    def flood(_: int) -> tuple[int, int]:
        answered = limited = 0
        for _ in range(40):
            try:
                a.predict(api_name="/finetune_status")
                answered += 1
            except Exception as error:  # the rate limit answers at once with a message; anything else fails below
                assert "too many status requests" in str(error), error
                limited += 1
        return answered, limited

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(flood, index) for index in range(4)]
        during = time.monotonic()
        assert a.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect") is not None
        during = time.monotonic() - during
        results = [future.result(timeout=120) for future in floods]
    assert sum(limited for _, limited in results) > 0 and all(answered > 0 for answered, _ in results)
    assert during < max(10 * baseline, 5.0), (baseline, during)

    # Most joins were refused at once (two streams per session); none holds a queue slot.
    outcomes = []
    for job in joins:
        try:
            job.result(timeout=0.5)
            outcomes.append("ended")
        except Exception as error:
            outcomes.append("refused" if "already has" in str(error) else type(error).__name__)
    assert outcomes.count("refused") >= 35, outcomes
    # Stop answers through all of it.
    assert a.predict(token, api_name="/finetune_stop").startswith("stopping")
    for job in joins:
        job.cancel()
    assert time.monotonic() - started_at < 120


def _training_children() -> list[int]:
    """Pids of this process's children that run the training engine (the app under test started them)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"finetune.run.child" in cmdline:
            found.append(int(status.parent.name))
    return found


def test_a_killed_training_child_fails_the_job_not_the_server_and_resume_finishes_it(clients):
    a, _ = clients
    started = start(a, epochs=3, save_every=2)  # 12 steps
    token, run = started["token"], started["run"]
    reached = stream_until(a, token, lambda update: update["step"] >= 3)
    assert reached["step"] >= 3
    (child,) = _training_children()
    os.kill(child, signal.SIGKILL)

    failed = stream_until(a, token, lambda update: update["state"] == "failed", timeout=30)
    assert failed["state"] == "failed" and "SIGKILL" in failed["message"]
    assert a.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect") is not None  # still serving
    assert a.predict(run, token, api_name="/finetune_resume") == f"run {run} resumed"
    finished = stream_until(a, token, lambda update: update["state"] in ("finished", "failed"))
    assert finished["state"] == "finished" and finished["step"] == finished["total_steps"] == 12


def test_sigterm_checkpoints_the_running_job_and_removes_the_work_folders(
    tmp_path: Path, tiny_model_dir: Path, free_tcp_port: int
):
    runs, scratch = tmp_path / "runs", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch)}
    command = [
        sys.executable, "app.py", "--model", str(tiny_model_dir), "--models-dir", str(tmp_path / "models"),
        "--runs-dir", str(runs), "--labels-dir", str(tmp_path / "labels"), "--host", "127.0.0.1",
        "--port", str(free_tcp_port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{free_tcp_port}/"
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _answers(url), timeout=120)
        assert list(scratch.glob("ddetr-app-*")), "the server's work folder"
        client = Client(url, verbose=False)
        started = start(client, epochs=100, save_every=1000)  # no periodic checkpoint to fall back on
        reached = stream_until(client, started["token"], lambda update: update["step"] >= 3)["step"]
        client.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    (run_dir,) = runs.glob(f"*/{started['run']}")
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "train"]
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.step == steps[-1] >= reached
    assert (read_status(run_dir) or {}).get("state") == "stopped"
    assert not list(scratch.glob("ddetr-app-*"))  # uploads, downloads and exports went with the server
    # The training child went with the server (it runs with the run folder on its command line).
    assert not [status for status in Path("/proc").glob("[0-9]*/cmdline") if str(run_dir).encode() in _read(status)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended while we looked
        return b""


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
