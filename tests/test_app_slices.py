"""Fine-tuning as on ZeroGPU, on CPU: a job in GPU slices driven by its owner's page, charged to their quota, waiting
(resumable) when a slice cannot run, and only for a signed-in owner where the Space says so."""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest

import app_support.slice_jobs as slice_jobs
from app_support.downloads import DownloadFolder
from app_support.finetune_tab import FinetuneServices, FinetuneTab
from app_support.jobs import TrainingJobs
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities
from app_support.paths import AppPaths
from app_support.slice_jobs import SliceRun
from app_support.training import CheckpointPreviews
from app_support.uploads import UploadStore
from app_support.visitors import Visitors
from finetune.run.checkpoints import latest_checkpoint
from finetune.run.files import read_status
from finetune.run.metrics_log import read_metrics

# A slice's setup (1.5-2.6 s: child, model, data) and the 3 s kept for stopping leave 2.5-3.5 s of training in a
# slice of 8 s: 30-70 steps of the tiny model on the CPUs seen, so a job of 120 steps takes two slices or more.
SLICE_SECONDS = 8.0
FORM = ["shapes", 16, 4, 128, "", "", None]


def start_args(visitor: str, *, max_steps: int = 60) -> list:
    # base model, epochs, max steps, batch size, lr, image size, eval every, checkpoint every, the browser's token
    return [*FORM, "preset:tiny", 100, max_steps, 2, 2e-4, 0, 0, 1000, visitor]


def make_tab(paths: AppPaths, *, login_required: bool = False) -> FinetuneTab:
    jobs = TrainingJobs(paths.runs, launcher=functools.partial(SliceRun, slice_seconds=SLICE_SECONDS), max_running=8)
    services = FinetuneServices(
        paths=paths,
        jobs=jobs,
        registry=ModelRegistry(paths.models, hub_reachable=lambda: False, finetuned=jobs.finished_models),
        downloads=DownloadFolder(paths.scratch("models")),
        identities=Identities(Visitors(paths.labels)),
        uploads=UploadStore(paths.scratch("uploads")),
        previews=CheckpointPreviews(),
        slices=True,
        login_required=login_required,
    )
    return FinetuneTab(services)


@pytest.fixture
def tab(tmp_path: Path) -> Iterator[FinetuneTab]:
    tab = make_tab(AppPaths.from_root(tmp_path, work=tmp_path / "work"))
    yield tab
    tab.jobs.shutdown(30)


def visitor_of(tab: FinetuneTab) -> str:
    token, _ = tab.identities.visitors.claim(None)
    return token


def test_a_job_trains_slice_by_slice_in_its_owners_event_and_finishes(tab: FinetuneTab):
    visitor = visitor_of(tab)
    run = tab.start(*start_args(visitor, max_steps=120))["run"]
    job = tab.jobs.latest_job(tab.identities.owner(visitor))
    assert job is not None and job.run is not None and job.run.state == "pending"  # nothing trains without a page

    lines = list(tab.train_slices(visitor))
    assert job.run.state == "finished", lines
    slices = job.run.slices
    assert slices >= 2 and len(lines) == slices + 1 and lines[0].startswith("slice 1: step ")
    steps = [r["step"] for r in read_metrics(job.directory / "metrics.jsonl") if r.get("type") == "train"]
    assert steps == list(range(1, 121))  # every step once, across the slices
    assert (read_status(job.directory) or {})["state"] == "finished"
    status = tab.refresh(None, visitor)[0]
    assert f"your run {run}" in status and f"{slices} GPU slices" in status and "daily GPU quota used" in status


def test_a_slice_that_cannot_run_leaves_the_job_waiting_and_resume_continues(
    tab: FinetuneTab, monkeypatch: pytest.MonkeyPatch
):
    visitor = visitor_of(tab)
    run = tab.start(*start_args(visitor, max_steps=150))["run"]
    real = slice_jobs.train_slice
    calls: list[int] = []

    def quota_after_one(*args):
        calls.append(1)
        if len(calls) > 1:
            raise gr.Error("You have exceeded your free GPU quota (300s left vs. 60s requested)")
        return real(*args)

    monkeypatch.setattr(slice_jobs, "train_slice", quota_after_one)
    lines = list(tab.train_slices(visitor))
    job = tab.jobs.latest_job(tab.identities.owner(visitor))
    assert job is not None and job.run is not None and job.run.state == "waiting"
    assert "exceeded your free GPU quota" in lines[-1] and "Resume continues" in lines[-1]
    checkpoint = latest_checkpoint(job.directory / "checkpoints")
    assert checkpoint is not None and checkpoint.step > 0  # the first slice's work is kept
    assert "waiting" in tab.refresh(None, visitor)[0] and "quota" in tab.refresh(None, visitor)[0]
    owner_key = tab.identities.owner_key(visitor)
    assert tab.jobs.resumable_runs(owner_key) == [run]

    monkeypatch.setattr(slice_jobs, "train_slice", real)  # the next day
    assert tab.resume(run, "", visitor) == f"run {run} resumed"
    list(tab.train_slices(visitor))
    resumed = tab.jobs.latest_job(tab.identities.owner(visitor))
    assert resumed is not None and resumed.run is not None and resumed.run.state == "finished"
    steps = [r["step"] for r in read_metrics(resumed.directory / "metrics.jsonl") if r.get("type") == "train"]
    assert steps[0] == 1 and steps[-1] == 150 and steps == sorted(set(steps))


def test_stop_ends_the_job_after_the_running_slice_with_a_checkpoint(tab: FinetuneTab):
    visitor = visitor_of(tab)
    tab.start(*start_args(visitor, max_steps=200))
    slices = tab.train_slices(visitor)
    first = next(slices)
    assert first.startswith("slice 1")
    assert tab.stop("", visitor).startswith("stopping run")
    rest = list(slices)
    job = tab.jobs.latest_job(tab.identities.owner(visitor))
    assert job is not None and job.run is not None and job.run.state == "stopped" and job.run.slices == 1, rest
    checkpoint = latest_checkpoint(job.directory / "checkpoints")
    last = [r["step"] for r in read_metrics(job.directory / "metrics.jsonl") if r.get("type") == "train"][-1]
    assert checkpoint is not None and checkpoint.step == last < 200


def test_on_zerogpu_training_needs_a_signed_in_owner(tmp_path: Path):
    tab = make_tab(AppPaths.from_root(tmp_path, work=tmp_path / "work"), login_required=True)
    try:
        visitor = visitor_of(tab)
        with pytest.raises(gr.Error, match="sign in with Hugging Face"):
            tab.start(*start_args(visitor))
        started = tab.start(*start_args(visitor), profile=types.SimpleNamespace(username="tester"))
        job = tab.jobs.job(started["run"])
        assert job is not None and job.directory.parent.name.startswith("hf-")  # filed under the login
    finally:
        tab.jobs.shutdown(30)


def test_a_job_no_page_drives_waits_resumable_instead_of_holding_a_place(
    tab: FinetuneTab, monkeypatch: pytest.MonkeyPatch
):
    visitor = visitor_of(tab)
    run = tab.start(*start_args(visitor))["run"]  # e.g. an API start, or a page closed before its first slice
    job = tab.jobs.job(run)
    assert job is not None and job.run is not None and job.run.state == "pending"
    monkeypatch.setattr(slice_jobs, "UNDRIVEN_SECONDS", 0.0)
    assert job.run.state == "waiting" and "no open page" in job.run.log_tail()
    assert not tab.jobs.public_summary()["busy"]
