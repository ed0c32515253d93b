"""Training in a child process (``finetune.run.process``): the same weights as in a thread, a stop that checkpoints
the current step, kills and broken data reported as failures, exact resume, and no child outliving its parent."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from finetune.api import ProcessRun, prepare_dataset, resume_config, start_process_run
from finetune.config import TrainConfig
from finetune.data.shapes import make_shapes_dataset
from finetune.run.checkpoints import latest_checkpoint
from finetune.run.launch import run_training
from finetune.run.metrics_log import read_metrics
from finetune.run.process import MetricsTail, settle_outcome

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64
STEPS = 30
SAVE_EVERY = 4
# Bounds for waits on a shared, busy CPU; a child takes a few seconds to import torch and start.
TIMEOUT = 180.0

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    datasets.DatasetDict(
        {
            "train": make_shapes_dataset(6, seed=21, image_size=IMAGE_SIZE),
            "validation": make_shapes_dataset(2, seed=22, image_size=IMAGE_SIZE),
        }
    ).save_to_disk(folder)
    return folder


def _config(dataset: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict = {
        "dataset": str(dataset),
        "model": "tiny",
        "output_dir": str(output),
        "batch_size": 2,
        "image_size": IMAGE_SIZE,
        "augment": "paper",  # random crops and flips: the child's RNG has to match too
        "dropout": 0.1,
        "seed": 5,
        "log_every": 1,
        "eval_every": 0,
        "save_every": SAVE_EVERY,
        "max_steps": STEPS,
        "threads": 1,
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def reference(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of the same training run made in this process's thread with the same thread count."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert run_training(_config(shapes_dir, output)).state == "finished"
    return output


@pytest.fixture
def started() -> Iterator[list[ProcessRun]]:
    """Runs a test starts; any still going at its end is killed (only those: the test's own children)."""
    runs: list[ProcessRun] = []
    yield runs
    for run in runs:
        if not run.done:
            run.kill()
            run.wait(timeout=30)


def _start(runs: list[ProcessRun], config: TrainConfig) -> ProcessRun:
    run = start_process_run(config, threads=1)
    runs.append(run)
    return run


def _wait_for_step(run: ProcessRun, step: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and not run.done:
        logged = [r["step"] for r in run.records(kind="train")]
        if logged and logged[-1] >= step:
            return logged[-1]
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}: {run.state}, {run.error}\n{run.log_tail(30)}")


def _assert_same_weights(expected_run: Path, actual_run: Path) -> None:
    expected = load_file(str(expected_run / "model" / "model.safetensors"))
    actual = load_file(str(actual_run / "model" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def _losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if r["type"] == "train"]


def test_a_process_run_matches_the_same_run_in_a_thread(
    shapes_dir: Path, reference: Path, tmp_path: Path, started: list[ProcessRun]
) -> None:
    run = _start(started, _config(shapes_dir, tmp_path / "run"))
    assert run.state == "running" and run.pid is not None
    # Its own session: a Ctrl-C in this process's terminal does not reach it.
    assert os.getsid(run.pid) == run.pid != os.getsid(0)
    result = run.wait(timeout=TIMEOUT)
    assert run.state == "finished", f"{run.error}\n{run.log_tail(30)}"
    assert run.error is None and run.exit_code == 0
    assert result is not None and result.step == result.total_steps == STEPS
    _assert_same_weights(reference, tmp_path / "run")
    records = run.records()
    assert records == read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert _losses(records) == _losses(read_metrics(reference / "metrics.jsonl"))
    assert records[-1]["type"] == "status" and records[-1]["state"] == "finished"
    assert f"process {run.pid}" in run.log_tail(200) and "finished 30 steps" in run.log_tail(3)


def test_stop_checkpoints_the_current_step_and_a_resumed_process_run_is_exact(
    shapes_dir: Path, reference: Path, tmp_path: Path, started: list[ProcessRun]
) -> None:
    output = tmp_path / "run"
    run = _start(started, _config(shapes_dir, output))
    _wait_for_step(run, 3)
    streamed = []
    run.stop()
    for record in run.stream(poll=0.05, timeout=TIMEOUT):
        streamed.append(record)
    assert run.state == "stopped" and run.error is None, f"{run.error}\n{run.log_tail(30)}"
    assert run.exit_code == 0 and streamed == run.records()
    reached = run.records(kind="train")[-1]["step"]
    assert reached < STEPS and run.result is not None and run.result.step == reached
    assert json.loads((output / "status.json").read_text())["step"] == reached
    checkpoint = latest_checkpoint(output / "checkpoints")
    assert checkpoint is not None and checkpoint.step == reached  # not the last multiple of save_every

    resumed = _start(started, resume_config(output))
    assert resumed.config.threads == 1  # the saved thread count: bit-exact resume on CPU needs it
    resumed.wait(timeout=TIMEOUT)
    assert resumed.state == "finished", f"{resumed.error}\n{resumed.log_tail(30)}"
    _assert_same_weights(reference, output)
    assert _losses(resumed.records()) == _losses(read_metrics(reference / "metrics.jsonl"))


def test_a_killed_child_fails_with_the_signal_and_resumes_from_its_last_checkpoint(
    shapes_dir: Path, reference: Path, tmp_path: Path, started: list[ProcessRun]
) -> None:
    output = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    run = _start(started, _config(shapes_dir, output))
    _wait_for_step(run, SAVE_EVERY + 2)
    run.kill()
    assert run.wait(timeout=TIMEOUT) is None
    assert run.state == "failed" and run.exit_code == -signal.SIGKILL
    assert run.error is not None and "SIGKILL" in run.error
    log = run.log_tail(200)
    assert f"process {run.pid}" in log and "dataset" in log
    assert signal.getsignal(signal.SIGTERM) is handler  # this process: untouched
    checkpoint = latest_checkpoint(output / "checkpoints")
    assert checkpoint is not None and SAVE_EVERY <= checkpoint.step < STEPS

    resumed = _start(started, resume_config(output))
    # Until the child cuts metrics.jsonl back to the checkpoint, the killed run's later steps are left out.
    assert all(r["step"] <= checkpoint.step for r in resumed.records())
    resumed.wait(timeout=TIMEOUT)
    assert resumed.state == "finished", f"{resumed.error}\n{resumed.log_tail(30)}"
    assert [step for step, _ in _losses(resumed.records())] == list(range(1, STEPS + 1))
    _assert_same_weights(reference, output)
    assert resumed.log_tail(200).count("process ") >= 2  # one log, appended by both processes


def test_a_broken_dataset_fails_with_the_childs_exception(tmp_path: Path, started: list[ProcessRun]) -> None:
    broken = tmp_path / "data"
    broken.mkdir()
    (broken / "_annotations.coco.json").write_text('{"images": [')
    config = _config(broken, tmp_path / "run")
    with pytest.raises(ValueError) as raised:
        prepare_dataset(config)
    run = _start(started, config)
    run.wait(timeout=TIMEOUT)
    assert run.state == "failed" and run.exit_code == 1 and run.result is None
    assert run.error == f"ValueError: {raised.value}"
    assert "not valid JSON" in run.log_tail()


def test_stop_before_the_first_step_writes_nothing(shapes_dir: Path, tmp_path: Path, started: list[ProcessRun]) -> None:
    output = tmp_path / "run"
    run = _start(started, _config(shapes_dir, output))
    run.stop(wait=True, timeout=TIMEOUT)
    assert run.state == "stopped" and run.error is None, f"{run.error}\n{run.log_tail(30)}"
    assert run.result is not None and run.result.step == 0
    assert latest_checkpoint(output / "checkpoints") is None and not (output / "model").exists()
    # Nothing to refuse a new start on: the folder holds no run.
    again = _start(started, _config(shapes_dir, output, max_steps=2))
    again.wait(timeout=TIMEOUT)
    assert again.state == "finished", f"{again.error}\n{again.log_tail(30)}"


def test_a_niced_child_yields_the_cpu_to_its_parent(
    shapes_dir: Path, tmp_path: Path, started: list[ProcessRun]
) -> None:
    run = ProcessRun(_config(shapes_dir, tmp_path / "run"), niceness=10)
    started.append(run)
    run.start()
    assert run.pid is not None and os.getpriority(os.PRIO_PROCESS, run.pid) == 10
    group = Path(f"/proc/{run.pid}/autogroup")
    if group.exists():  # Linux schedules a session as one group: its share must drop too
        assert group.read_text().split()[-1] == "10"
    run.stop(wait=True, timeout=TIMEOUT)
    for bad in (-1, 20, 2.5, True):
        with pytest.raises(ValueError, match="niceness"):
            ProcessRun(_config(shapes_dir, tmp_path / "other"), niceness=bad)  # type: ignore[arg-type]


def test_stop_then_kill_waits_for_the_graceful_stop_up_to_its_grace(
    shapes_dir: Path, tmp_path: Path, started: list[ProcessRun]
) -> None:
    output = tmp_path / "run"
    run = _start(started, _config(shapes_dir, output))
    _wait_for_step(run, 2)
    assert run.stop_then_kill(TIMEOUT) == "stopped"
    resumed = _start(started, resume_config(output))
    _wait_for_step(resumed, run.records(kind="train")[-1]["step"] + 1)
    assert resumed.stop_then_kill(0) == "failed"  # no time to save: killed
    assert resumed.error == "killed by signal SIGKILL (by kill())"
    with pytest.raises(ValueError, match="grace"):
        resumed.stop_then_kill(-1)


def test_metrics_are_read_incrementally_through_torn_lines_and_replacement(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 5}\n')
    tail = MetricsTail(path, keep_through=2)  # a resume from step 2: step 5 is about to be cut
    assert [r["step"] for r in tail.read()] == [1]
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"type": "train", "step": 1}\n{"type": "train", "st')
    os.replace(replacement, path)  # the resume's truncation, then a line half written
    assert [r["step"] for r in tail.read()] == [1]
    with open(path, "a") as handle:
        handle.write('ep": 3}\n')
    assert [r["step"] for r in tail.read()] == [1, 3]
    with open(path, "a") as handle:
        handle.write('{"type": "train", "step": 5}\n')
    assert [r["step"] for r in tail.read()] == [1, 3, 5]  # the new file is read whole, past keep_through


_PARENT = """
import sys, time
from finetune.api import start_process_run
from finetune.config import TrainConfig
run = start_process_run(TrainConfig.load(__import__("pathlib").Path(sys.argv[1])))
print(run.pid, flush=True)
deadline = time.monotonic() + 150
while not run.records(kind="train") and not run.done and time.monotonic() < deadline:
    time.sleep(0.02)
print(run.state, flush=True)
time.sleep(600)
"""


def _read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the parent process said nothing"
    return stream.readline().strip()


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel (a zombie counts as alive here)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie awaiting its new parent's reaping has ended


def test_the_child_stops_when_its_parent_dies(shapes_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    _config(shapes_dir, output, max_steps=100_000).save(tmp_path / "config.json")
    environment = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path / "config.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=environment,
    )
    child = None
    try:
        child = int(_read_line(parent.stdout, TIMEOUT))
        assert _read_line(parent.stdout, TIMEOUT) == "running"
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the child outlived its parent"
        # The parent's death was a SIGTERM to the child: a graceful stop, with a checkpoint at its step.
        status = json.loads((output / "status.json").read_text())
        checkpoint = latest_checkpoint(output / "checkpoints")
        assert status["state"] == "stopped" and checkpoint is not None and checkpoint.step == status["step"]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)
        if child is not None and not _gone(child):
            os.killpg(child, signal.SIGKILL)  # the test's own grandchild, in its own process group


def test_start_refuses_a_folder_with_another_run_before_writing(reference: Path) -> None:
    before = sorted(path.name for path in reference.iterdir())
    with pytest.raises(ValueError, match="already holds a training run"):
        start_process_run(TrainConfig.load(reference / "train_config.json").with_overrides(resume=False))
    assert sorted(path.name for path in reference.iterdir()) == before
    with pytest.raises(ValueError, match="threads"):
        ProcessRun(TrainConfig(dataset="shapes"), threads=0)
    with pytest.raises(ValueError, match="env"):
        ProcessRun(TrainConfig(dataset="shapes"), env={"OMP_NUM_THREADS": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("returncode", "status", "child_error", "stop_sent", "kill_sent", "expected"),
    [
        (1, {"state": "finished"}, None, False, False, ("finished", None)),  # the engine's word comes first
        (1, None, "ValueError: bad", False, False, ("failed", "ValueError: bad")),
        (0, None, None, True, False, ("stopped", None)),
        (-signal.SIGTERM, None, None, True, False, ("stopped", None)),
        (-signal.SIGTERM, None, None, False, False, ("failed", "killed by signal SIGTERM")),
        (-signal.SIGKILL, {"state": "failed", "message": ""}, None, False, False, ("failed", "the run failed")),
        (-signal.SIGKILL, None, None, False, False, ("failed", "killed by signal SIGKILL (e.g. out of memory)")),
        (-signal.SIGKILL, None, None, False, True, ("failed", "killed by signal SIGKILL (by kill())")),
        (7, None, None, False, False, ("failed", "exited with code 7: boom")),
    ],
)
def test_settle_outcome(returncode, status, child_error, stop_sent, kill_sent, expected) -> None:
    outcome = settle_outcome(
        returncode=returncode,
        status=status,
        child_error=child_error,
        stop_sent=stop_sent,
        kill_sent=kill_sent,
        last_log_line="boom",
    )
    assert outcome == expected
