"""Crash safety: SIGKILL at random moments, then ``--resume``, ends bitwise equal to an uninterrupted run (CPU), and
a checkpoint write killed at any point never leaves a folder that is taken for a complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_model

from ddetr import DeformableDetrForObjectDetection
from finetune.config import TrainConfig
from finetune.data.shapes import SHAPE_CLASSES, make_shapes_dataset
from finetune.presets import preset_config
from finetune.run import trainer as trainer_module
from finetune.run.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from finetune.run.launch import run_training
from finetune.run.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# A fresh random moment every run; set FINETUNE_KILL_SEED to replay a failure (the seed is in the assert message).
KILL_SEED = int(os.environ.get("FINETUNE_KILL_SEED", time.time_ns() % 2**31))
TRAINING = [
    "--model", "tiny", "--max-steps", "16", "--batch-size", "2", "--image-size", "64", "--save-every", "2",
    "--log-every", "1", "--eval-every", "0", "--no-progress", "--seed", "5", "--dropout", "0.1",
    "--augment", "paper",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("single_thread")


def _environment() -> dict[str, str]:
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _finetune(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "finetune", *arguments]


def _train_steps_logged(output: Path) -> int:
    return max((r["step"] for r in read_metrics(output / "metrics.jsonl", kind="train")), default=0)


def _assert_latest_checkpoint_loads(output: Path) -> None:
    info = latest_checkpoint(output / "checkpoints")
    if info is None:
        return
    model = DeformableDetrForObjectDetection(preset_config("tiny", list(SHAPE_CLASSES)))
    state = load_checkpoint(info, model)
    assert state["step"] == info.step
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    datasets.DatasetDict(
        {"train": make_shapes_dataset(10, seed=1, image_size=64), "validation": make_shapes_dataset(2, seed=2)}
    ).save_to_disk(tmp_path / "data")
    dataset = ["--dataset", str(tmp_path / "data")]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _finetune(*dataset, "--output-dir", str(straight), *TRAINING),
        env=_environment(),
        check=True,
        capture_output=True,
        timeout=600,
    )

    rng = random.Random(KILL_SEED)
    kills = []
    for attempt in range(3):
        arguments = ["--resume", "--output-dir", str(killed)] if attempt else [*dataset, "--output-dir", str(killed)]
        process = subprocess.Popen(
            _finetune(*arguments, *TRAINING), env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        target = rng.randint(1, 15)
        deadline = time.monotonic() + 300
        while process.poll() is None and _train_steps_logged(killed) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        kills.append((target, _train_steps_logged(killed)))
        _assert_latest_checkpoint_loads(killed)

    finished = subprocess.run(
        _finetune("--resume", "--output-dir", str(killed), "--no-progress"),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    context = f"kill seed {KILL_SEED}, kills (target step, logged step) {kills}"
    expected, actual = (
        load_file(str(straight / "model" / "model.safetensors")),
        load_file(str(killed / "model" / "model.safetensors")),
    )
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs ({context})"
    losses = [(r["step"], r["loss"]) for r in read_metrics(straight / "metrics.jsonl", kind="train")]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(killed / "metrics.jsonl", kind="train")]
    assert resumed == losses, context


# Saves checkpoints step after step until killed. A fresh interpreter, not a fork of pytest's: by now pytest's
# process may hold threads (earlier tests' servers), and a fork child can deadlock on a lock one of them held.
_KEEP_SAVING = """
import sys
from pathlib import Path
import torch
from safetensors.torch import load_model
from ddetr import DeformableDetrForObjectDetection
from finetune.data.shapes import SHAPE_CLASSES
from finetune.presets import preset_config
from finetune.run.checkpoints import save_checkpoint

directory, weights, step = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model = DeformableDetrForObjectDetection(preset_config("tiny", list(SHAPE_CLASSES)))
load_model(model, weights)
payload = torch.arange(200_000, dtype=torch.float32)
print("ready", flush=True)
while True:
    step += 1
    save_checkpoint(directory, step=step, epoch=0, model=model, train_state={"step": step, "payload": payload}, keep=2)
"""


@pytest.mark.slow
def test_checkpoint_writes_killed_at_random_points_never_look_complete(tmp_path: Path) -> None:
    model = DeformableDetrForObjectDetection(preset_config("tiny", list(SHAPE_CLASSES)))
    restored = DeformableDetrForObjectDetection(preset_config("tiny", list(SHAPE_CLASSES)))
    payload = torch.arange(200_000, dtype=torch.float32)
    weights, checkpoints = tmp_path / "weights.safetensors", tmp_path / "checkpoints"
    save_model(model, str(weights))
    # Kill moments scale with this disk's write time (fsync can take long on a busy host): 0.3 to 6 writes in.
    started = time.perf_counter()
    save_checkpoint(tmp_path / "timing", step=1, epoch=0, model=model, train_state={"step": 1, "payload": payload})
    write_seconds = time.perf_counter() - started
    rng = random.Random(KILL_SEED)
    seen_steps = set()
    for _ in range(12):
        latest = latest_checkpoint(checkpoints)
        start = latest.step if latest is not None else 0
        child = subprocess.Popen(
            [sys.executable, "-c", _KEEP_SAVING, str(checkpoints), str(weights), str(start)],
            env=_environment(),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            # The kill moment is counted from the first write, not from the interpreter's start-up.
            assert child.stdout is not None and child.stdout.readline() == "ready\n", "the saving child did not start"
            time.sleep(min(rng.uniform(0.3, 6.0) * write_seconds + 0.02, 5.0))
        finally:
            child.kill()
            child.wait(timeout=30)
            if child.stdout is not None:
                child.stdout.close()
        for info in list_checkpoints(checkpoints):
            state = load_checkpoint(info, restored)
            assert state["step"] == info.step and torch.equal(state["payload"], payload), f"kill seed {KILL_SEED}"
            for name, value in model.state_dict().items():
                assert torch.equal(value, restored.state_dict()[name]), f"{name} (kill seed {KILL_SEED})"
            seen_steps.add(info.step)
    # Kills landed in different writes (and deletions of old checkpoints), not always in the first one.
    assert len(seen_steps) >= 5, f"too few checkpoints completed: {sorted(seen_steps)}"


@pytest.mark.slow
def test_sigterm_stops_the_command_line_run_with_a_checkpoint(tmp_path: Path) -> None:
    make_shapes_dataset(6, seed=3, image_size=64).save_to_disk(tmp_path / "data")
    output = tmp_path / "run"
    arguments = [*TRAINING[:2], "--max-steps", "1000", *TRAINING[4:]]
    process = subprocess.Popen(
        _finetune("--dataset", str(tmp_path / "data"), "--output-dir", str(output), *arguments),
        env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while _train_steps_logged(output) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped at step" in stdout
    status = json.loads((output / "status.json").read_text())
    assert status["state"] == "stopped"
    assert latest_checkpoint(output / "checkpoints").step == status["step"] < 1000


@pytest.mark.parametrize("resuming", [False, True])
def test_a_signal_during_setup_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resuming: bool) -> None:
    output = tmp_path / "run"
    base = TrainConfig(dataset="shapes", model="tiny", output_dir=str(output), progress=False)
    if resuming:
        # A run folder with its settings and a step-3 checkpoint, as a stopped run leaves it.
        make_shapes_dataset(4, seed=3, image_size=64).save_to_disk(tmp_path / "data")
        first = base.with_overrides(dataset=str(tmp_path / "data"), max_steps=3, batch_size=2, image_size=64)
        first = first.with_overrides(eval_every=0, save_every=3)
        assert run_training(first).state == "finished"
        base = TrainConfig.load(output / "train_config.json").with_overrides(resume=True)

    def folder_state() -> list[tuple[str, int]]:
        return sorted((str(path.relative_to(output)), path.stat().st_mtime_ns) for path in output.rglob("*"))

    before = folder_state() if resuming else []
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))

    def slow_preparation(*_args: object, **_kwargs: object) -> None:
        timer.start()  # the signal comes once the run is inside its setup
        time.sleep(60)  # a large dataset being generated or converted
        raise AssertionError("the signal did not interrupt the data preparation")

    monkeypatch.setattr(trainer_module, "prepare_run_data", slow_preparation)
    previous_handler = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    result = run_training(base)
    timer.join()
    assert time.monotonic() - started < 30
    assert result.state == "stopped"
    assert result.step == (3 if resuming else 0)
    assert ("resume with --resume" in result.message) == resuming
    # The folder is untouched and the process's own SIGTERM handling is back.
    if resuming:
        assert folder_state() == before
    else:
        assert not output.exists()
    assert signal.getsignal(signal.SIGTERM) is previous_handler
