"""Fine-tuning in slices (``finetune.run.slices``), each slice run as ZeroGPU runs a ``@spaces.GPU`` call: in a
forked child, its arguments and its result pickled through a multiprocessing queue. A job in three slices, a job
whose slice is killed midway, and a slice on a wall-clock budget end where one uninterrupted run does, bit for bit
(CPU, one thread on both sides)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from safetensors.torch import load_file

from ddetr import DeformableDetrForObjectDetection
from finetune.config import TrainConfig
from finetune.data.shapes import SHAPE_CLASSES, make_shapes_dataset
from finetune.presets import preset_config
from finetune.run.checkpoints import latest_checkpoint, load_checkpoint
from finetune.run.launch import run_training
from finetune.run.metrics_log import read_metrics
from finetune.run.slices import (
    MIN_MARGIN_SECONDS,
    SliceResult,
    SliceTimings,
    _SliceClock,
    estimate_margin,
    run_slice,
    slice_config,
    slices_needed,
)
from finetune.run.trainer import NextStep

pytestmark = pytest.mark.usefixtures("single_thread")

TOTAL_STEPS = 8
CHILD_TIMEOUT_S = 300
# How far past its budget a slice on the clock may end: its margin (3 s or more) is kept for a step of ~0.3 s and a
# checkpoint, so only a machine stalled for seconds would use this.
ALLOWED_OVERRUN_S = 2.0


# -- a forked child, as spaces.GPU runs its function ------------------------------------------------------------- #


def _child_main(inbox: Any, outbox: Any) -> None:
    # The call and its result cross as pickles, as through spaces' queues: what does not pickle fails here.
    try:
        function, args, kwargs = pickle.loads(inbox.get())
        outbox.put(("ok", pickle.dumps(function(*args, **kwargs))))
    except BaseException:
        outbox.put(("error", traceback.format_exc()))


class ForkedCall:
    """``function(*args, **kwargs)`` in a child forked from this process (multiprocessing's ``fork`` context)."""

    def __init__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        context = multiprocessing.get_context("fork")
        self._inbox, self._outbox = context.Queue(), context.Queue()
        self.process = context.Process(target=_child_main, args=(self._inbox, self._outbox), daemon=True)
        self.process.start()
        self._inbox.put(pickle.dumps((function, args, kwargs)))

    def result(self, timeout: float) -> Any:
        """The call's unpickled result; RuntimeError if it raised or the child died, TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                kind, payload = self._outbox.get(timeout=0.2)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    try:  # it may have put its answer just before ending
                        kind, payload = self._outbox.get(timeout=1.0)
                        break
                    except queue.Empty:
                        raise RuntimeError(f"the child ended with {self.process.exitcode} and no result") from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"the child gave no result in {timeout} s") from None
        self.process.join(timeout=30)
        if kind == "error":
            raise RuntimeError(f"the call failed in the child:\n{payload}")
        return pickle.loads(payload)

    def kill(self) -> None:
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=30)


def run_in_forked_child(function: Callable[..., Any], *args: Any, timeout: float, **kwargs: Any) -> Any:
    return ForkedCall(function, *args, **kwargs).result(timeout)


def _slice_and_new_threads(config: TrainConfig, **kwargs: Any) -> tuple[SliceResult, list[str]]:
    """run_slice, and the threads it left running (a ZeroGPU worker may be reused for the next call)."""
    before = set(threading.enumerate())
    result = run_slice(config, **kwargs)
    return result, sorted(thread.name for thread in set(threading.enumerate()) - before if thread.is_alive())


# -- the job ------------------------------------------------------------------------------------------------------ #


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slices") / "data"
    datasets.DatasetDict(
        {
            "train": make_shapes_dataset(6, seed=1, image_size=64),
            "validation": make_shapes_dataset(2, seed=2, image_size=64),
        }
    ).save_to_disk(folder)
    return folder


def _config(dataset: Path, output: Path, **overrides: Any) -> TrainConfig:
    # Dropout and the paper's augmentation draw random numbers at every step: a resume that lost its RNG state
    # would show. threads=1 on both sides: bit-exact resume on CPU needs the same thread count.
    config = TrainConfig(
        dataset=str(dataset), model="tiny", output_dir=str(output), max_steps=TOTAL_STEPS, batch_size=2,
        image_size=64, save_every=2, log_every=1, eval_every=0, progress=False, seed=5, dropout=0.1,
        augment="paper", threads=1,
    )  # fmt: skip
    return config.with_overrides(**overrides)


@pytest.fixture(scope="module")
def straight(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job as one uninterrupted run, in this process."""
    output = tmp_path_factory.mktemp("straight") / "run"
    assert run_training(_config(dataset, output)).state == "finished"
    return output


@pytest.fixture(scope="module")
def sliced(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SliceResult]]:
    """The same job in slices of 3 steps, each in a forked child; the next slice gets the last one's timings."""
    output = tmp_path_factory.mktemp("sliced") / "run"
    config = _config(dataset, output)
    results: list[SliceResult] = []
    while not results or not results[-1].done:
        assert len(results) < 6, results
        timings = results[-1].timings if results else None
        results.append(
            run_in_forked_child(
                run_slice, config, budget_seconds=600.0, max_steps_this_slice=3, timings=timings,
                timeout=CHILD_TIMEOUT_S,
            )
        )  # fmt: skip
    return output, results


def _assert_same_weights(expected_run: Path, actual_run: Path) -> None:
    expected = load_file(str(expected_run / "model" / "model.safetensors"))
    actual = load_file(str(actual_run / "model" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs"


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl", kind="train")]


def _train_steps_logged(run: Path) -> int:
    return max((r["step"] for r in read_metrics(run / "metrics.jsonl", kind="train")), default=0)


# -- the tests ---------------------------------------------------------------------------------------------------- #


def test_a_job_in_three_forked_slices_ends_bitwise_equal_to_one_run(
    straight: Path, sliced: tuple[Path, list[SliceResult]]
) -> None:
    output, results = sliced
    assert [r.state for r in results] == ["stopped", "stopped", "finished"]
    assert [(r.start_step, r.step, r.checkpoint_step) for r in results] == [(0, 3, 3), (3, 6, 6), (6, 8, 8)]
    assert all(r.total_steps == TOTAL_STEPS and r.error is None for r in results)
    assert "took its 3 steps" in results[0].message
    _assert_same_weights(straight, output)
    # Every step logged once, with the same loss: no step lost or repeated at a slice boundary.
    assert _losses(output) == _losses(straight)
    final = results[-1]
    assert final.train_metrics["step"] == TOTAL_STEPS and "loss" in final.train_metrics
    assert "map" in final.eval_metrics
    # What the slices measured travels to the next one, and only grows.
    assert final.timings.step is not None and final.timings.save is not None and final.timings.setup is not None
    assert results[1].timings.save >= results[0].timings.save  # type: ignore[operator]


def test_a_slice_of_a_finished_job_returns_at_once(dataset: Path, sliced: tuple[Path, list[SliceResult]]) -> None:
    output, _ = sliced
    before = _losses(output)
    again = run_slice(_config(dataset, output), budget_seconds=60.0)
    assert (again.state, again.step, again.steps_done) == ("finished", TOTAL_STEPS, 0)
    assert again.seconds < 5.0
    assert _losses(output) == before


def test_slice_arguments_and_results_pickle_and_stay_small(
    dataset: Path, tmp_path: Path, sliced: tuple[Path, list[SliceResult]]
) -> None:
    _, results = sliced
    arguments = (
        (_config(dataset, tmp_path / "run"),),
        {"budget_seconds": 55.0, "save_margin_seconds": None, "max_steps_this_slice": 3, "timings": results[0].timings},
    )
    assert pickle.loads(pickle.dumps(arguments)) == arguments
    for result in results:
        blob = pickle.dumps(result)
        assert pickle.loads(blob) == result
        assert len(blob) < 10_000, len(blob)
        assert isinstance(result.output_dir, str)
        assert all(type(value) is float for value in {**result.train_metrics, **result.eval_metrics}.values())


def test_a_killed_slice_keeps_its_last_checkpoint_and_the_next_resumes_from_it(
    dataset: Path, straight: Path, tmp_path: Path
) -> None:
    output = tmp_path / "killed"
    config = _config(dataset, output)
    call = ForkedCall(run_slice, config, budget_seconds=600.0)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    # Kill it while it trains past a complete checkpoint (save_every=2).
    while True:
        latest = latest_checkpoint(output / "checkpoints")
        if latest is not None and _train_steps_logged(output) > latest.step:
            break
        assert call.process.is_alive(), "the slice ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    call.kill()
    assert call.process.exitcode == -signal.SIGKILL
    kept = latest_checkpoint(output / "checkpoints")
    assert kept is not None and latest.step <= kept.step < TOTAL_STEPS
    model = DeformableDetrForObjectDetection(preset_config("tiny", list(SHAPE_CLASSES)))
    assert load_checkpoint(kept, model)["step"] == kept.step

    resumed = run_in_forked_child(run_slice, config, budget_seconds=600.0, timeout=CHILD_TIMEOUT_S)
    assert (resumed.state, resumed.start_step, resumed.step) == ("finished", kept.step, TOTAL_STEPS)
    # The killed slice's steps after the checkpoint were dropped from the log and trained again: the resumed
    # slice's first record is the checkpoint's step + 1, and every step is there once.
    assert [step for step, _ in _losses(output)] == list(range(1, TOTAL_STEPS + 1))
    assert _losses(output) == _losses(straight)
    _assert_same_weights(straight, output)


def test_a_wall_clock_budget_stops_in_time_with_a_checkpoint_and_no_threads(dataset: Path, tmp_path: Path) -> None:
    config = _config(dataset, tmp_path / "clock", max_steps=1000, save_every=0)
    budget = 8.0
    started = time.monotonic()
    result, new_threads = run_in_forked_child(
        _slice_and_new_threads, config, budget_seconds=budget, timeout=CHILD_TIMEOUT_S
    )
    assert time.monotonic() - started < budget + ALLOWED_OVERRUN_S + 10  # the child's start and the pickles
    assert result.state == "stopped" and 0 < result.step < 1000, result.message
    assert result.checkpoint_step == result.step
    assert result.seconds <= budget + ALLOWED_OVERRUN_S, result
    assert "budget left" in result.message
    assert new_threads == []
    timings = result.timings
    assert timings.step is not None and timings.save is not None and timings.setup is not None
    assert timings.setup < result.seconds and timings.step < result.seconds


def test_a_slice_with_no_room_for_a_step_leaves_the_job_where_it_was(dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    config = _config(dataset, output)
    first = run_slice(config, budget_seconds=600.0, max_steps_this_slice=2)
    assert (first.state, first.step) == ("stopped", 2)
    squeezed = run_slice(config, budget_seconds=1.0, save_margin_seconds=0.999)
    assert (squeezed.state, squeezed.start_step, squeezed.step, squeezed.checkpoint_step) == ("stopped", 2, 2, 2)
    assert "no step fitted" in squeezed.message


def test_slices_keep_the_job_settings(dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    config = _config(dataset, output, max_size=None)
    assert slice_config(config).resume is False
    assert run_slice(config, budget_seconds=600.0, max_steps_this_slice=1).step == 1
    # The saved settings, resumed: the size the run resolved (64 x 1333 / 800) stands for None.
    resumed = slice_config(config.with_overrides(threads=2))
    assert (resumed.resume, resumed.max_size, resumed.threads, resumed.progress) == (True, 107, 2, False)
    with pytest.raises(ValueError, match="holds another training job"):
        slice_config(config.with_overrides(lr=1e-3))


def test_a_failure_during_training_comes_back_as_a_failed_result(tmp_path: Path) -> None:
    config = _config(tmp_path / "no-such-dataset", tmp_path / "run")
    result = run_in_forked_child(run_slice, config, budget_seconds=60.0, timeout=CHILD_TIMEOUT_S)
    assert (result.state, result.step, result.checkpoint_step, result.done) == ("failed", 0, None, True)
    assert result.error is not None and "no-such-dataset" in result.error and result.error in result.message


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"budget_seconds": 0}, "budget_seconds must be a positive"),
        ({"budget_seconds": float("inf")}, "budget_seconds must be a positive"),
        ({"budget_seconds": 10, "save_margin_seconds": 10}, "less than budget_seconds"),
        ({"budget_seconds": 10, "max_steps_this_slice": 0}, "max_steps_this_slice"),
        ({"budget_seconds": 10, "timings": {"step": 1.0}}, "timings must be a SliceTimings"),
    ],
)
def test_bad_slice_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_slice(TrainConfig(dataset="shapes", output_dir=str(tmp_path / "run")), **arguments)
    assert not (tmp_path / "run").exists()


# -- the stop decision, on a fake clock --------------------------------------------------------------------------- #


def _step(number: int, *, evaluates: bool = False, saves: bool = False, batches: int = 1) -> NextStep:
    finishes = number == 100
    return NextStep(number, 100, evaluates, saves or finishes, finishes, batches)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _clock(budget: float, **known: float) -> tuple[_SliceClock, FakeTime]:
    fake = FakeTime()
    clock = _SliceClock(
        started=0.0, budget_seconds=budget, save_margin_seconds=None, max_steps=None,
        known=SliceTimings(**known), unmeasured_save_seconds=0.0, now=fake,
    )  # fmt: skip
    return clock, fake


def test_the_margin_is_twice_the_next_step_and_a_checkpoint_but_a_few_seconds_at_least() -> None:
    assert estimate_margin(0.1, 0.2) == MIN_MARGIN_SECONDS
    assert estimate_margin(4.0, 1.5) == 9.5


def test_the_clock_measures_steps_checkpoints_and_evaluations() -> None:
    clock, fake = _clock(1000.0)
    fake.now = 2.0  # setup
    assert not clock(_step(11))
    fake.now = 3.0
    assert not clock(_step(12, saves=True))
    fake.now = 4.5
    assert not clock(_step(13, evaluates=True, batches=4))
    fake.now = 9.5
    assert not clock(_step(14))
    assert clock.start_step == 10
    assert clock.timings(0.7) == SliceTimings(setup=2.0, step=1.0, save=0.7, evaluation=4.0)


def test_a_step_whose_evaluation_would_not_fit_starts_the_next_slice() -> None:
    clock, fake = _clock(60.0, step=1.0, save=0.5)
    fake.now = 40.0
    assert not clock(_step(11))  # 2 x 1 s + 0.5 s fits the 20 s left
    fake.now = 41.0
    # 30 batches of evaluation, estimated at a training step each: 2 x 31 s + 0.5 s does not fit the 19 s left.
    assert clock(_step(12, evaluates=True, batches=30))
    assert "evaluation" in clock.reason and clock.stopped_at == 41.0


def test_the_first_step_of_a_slice_is_taken_when_it_fits_once() -> None:
    clock, fake = _clock(60.0, step=1.0, save=0.5, evaluation=40.0)
    fake.now = 10.0
    assert not clock(_step(100, evaluates=True))  # 1 + 40 + 2 x 0.5 s, once, fits the 50 s left
    clock, fake = _clock(60.0, step=1.0, save=0.5, evaluation=40.0)
    fake.now = 20.0
    assert clock(_step(100, evaluates=True))
    assert "last step with its evaluation and the model export" in clock.reason
    # Nothing known yet: a step is taken while the minimum margin is left.
    clock, fake = _clock(60.0)
    fake.now = 60.0 - MIN_MARGIN_SECONDS
    assert not clock(_step(1))


def test_slices_needed() -> None:
    assert slices_needed(0, steps_per_second=2.0, budget_seconds=60.0) == 0
    assert slices_needed(250, steps_per_second=2.0, budget_seconds=60.0, setup_seconds=5.0, margin_seconds=5.0) == 3
    with pytest.raises(ValueError, match="fits no step"):
        slices_needed(10, steps_per_second=0.1, budget_seconds=10.0, setup_seconds=2.0)
    with pytest.raises(ValueError, match="steps_per_second"):
        slices_needed(10, steps_per_second=0.0, budget_seconds=10.0)
