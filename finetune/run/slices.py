"""Fine-tuning in slices: one training job run as a series of time-boxed calls, as ZeroGPU runs GPU work.

On a ZeroGPU Space every GPU call is a ``@spaces.GPU(duration=...)`` function, run in a forked child process with
its arguments and result pickled through a queue, and killed at the end of its time box. ``run_slice`` is such a
call's body: it continues the job in ``config.output_dir`` from its last complete checkpoint (or starts it), trains
while the next step still fits ``budget_seconds``, stops with a checkpoint at the step it reached, and returns a
small picklable ``SliceResult``. Resume is bitwise exact on CPU (same thread count), so a job trained in N slices
ends with exactly the weights of one uninterrupted run; a slice that is killed loses only the steps since its last
checkpoint, and the next slice repeats them identically.

    result = run_slice(config, budget_seconds=50)
    while result.state == "stopped":
        result = run_slice(config, budget_seconds=50, timings=result.timings)

When to stop. Before every step the trainer says what that step will do (``NextStep``: an evaluation, a checkpoint,
the end of the job with its model export). The slice predicts that step's cost from what it measured -- the slowest
plain step, the longest checkpoint write (a periodic one beyond its step, or the final one of a stop) and the
longest evaluation -- and from ``timings`` (what earlier slices measured, ``SliceResult.timings``). Its margin is

    margin = max(MIN_MARGIN_SECONDS, 2 x (cost of the next step) + (the checkpoint written when it stops))

and the step is taken only while ``elapsed + margin <= budget_seconds``; the factor 2 absorbs a step slower than
any seen so far. An evaluation never measured is estimated as one slowest training step per evaluation batch (a
forward pass costs about a third of a training step), a checkpoint never measured from the size of the job's last
one at ``ASSUMED_WRITE_BYTES_PER_SECOND`` (none yet: the minimum margin covers it). The first step of a slice is
taken without the factor 2 (elapsed + its cost + the checkpoint <= budget, or elapsed + MIN_MARGIN_SECONDS when
nothing is known yet), so that a slice whose setup leaves room for one step makes progress. So a step with an
evaluation or the job's final step, which would not fit what is left, starts the next slice instead of being killed
with it -- a killed slice would be repeated the same way each time. ``elapsed`` counts from the call's start, so
the setup (opening and checking the dataset, building the model, loading the checkpoint) is inside the budget. An
explicit ``save_margin_seconds`` replaces all of this: the slice then stops at the first step boundary after
``budget_seconds - save_margin_seconds``, and the margin must cover a step, its evaluation or checkpoint, and the
final checkpoint.

What the caller (the process that forks, e.g. the Gradio app) must and must not do:

* pass only the ``TrainConfig`` and numbers (``timings`` is a small dataclass): no model, tensors, prepared dataset,
  events, locks or open files -- they do not pickle, and the child builds everything itself inside the call;
* not initialise CUDA before the fork (on ZeroGPU: import ``spaces`` before torch touches CUDA, which the package
  checks); ``run_slice`` itself needs no CUDA state from the parent, the device is chosen inside the call;
* read the job's progress from the ``SliceResult`` or the run folder (``finetune.api.read_run``): whatever the child
  changes in its own memory is lost when it ends;
* give ``spaces.GPU`` a duration a few seconds longer than ``budget_seconds`` (the child's start and the transfer of
  arguments and result happen outside the budget), and stop a job by not starting its next slice.

``run_slice`` starts no thread (the stop decision is taken by the trainer's own loop, before each step) and shows no
progress bar (tqdm's would start a monitor thread); it returns once training has ended.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import RESUMABLE_OVERRIDES, TrainConfig
from finetune.run.checkpoints import CheckpointInfo, latest_checkpoint
from finetune.run.files import CHECKPOINTS, METRICS, TRAIN_CONFIG, read_status
from finetune.run.launch import run_training
from finetune.run.metrics_log import read_metrics
from finetune.run.trainer import NextStep

logger = logging.getLogger(__name__)

SLICE_STATES = ("finished", "stopped", "diverged", "failed")
# The least time kept for stopping: a checkpoint, the status file and the plots.
MIN_MARGIN_SECONDS = 3.0
# For a checkpoint never timed: a modest disk's sustained write rate, fsync included.
ASSUMED_WRITE_BYTES_PER_SECOND = 200e6
# An error's text is shown to a visitor and pickled back to the parent: a few lines, not a whole log.
MAX_ERROR_CHARS = 2000
# Settings a run resolves when it starts (None: the model's default): the saved value answers None.
RESOLVED_AT_START = ("image_size", "max_size")
# A job in one of these states is over: another slice would only repeat it (a diverged run diverges again).
ENDED_STATES = ("finished", "diverged")


def _larger(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    if second is None:
        return first
    return max(first, second)


@dataclass(frozen=True)
class SliceTimings:
    """Seconds measured by a job's slices (the largest seen), to carry from one slice to the next: ``setup`` from the
    call's start to the first step, ``step`` the slowest training step without evaluation or checkpoint, ``save``
    the longest checkpoint write (including a stop's status and plots), ``evaluation`` the longest evaluation. None:
    not measured yet."""

    setup: float | None = None
    step: float | None = None
    save: float | None = None
    evaluation: float | None = None

    def merged(self, other: SliceTimings | None) -> SliceTimings:
        """The larger of each time in ``self`` and ``other``."""
        if other is None:
            return self
        return SliceTimings(
            **{
                field.name: _larger(getattr(self, field.name), getattr(other, field.name))
                for field in dataclasses.fields(self)
            }
        )


@dataclass(frozen=True)
class SliceResult:
    """How a slice ended; small and made of plain values, so that it pickles back to the parent.

    ``state``: finished, stopped (the job continues with the next slice), diverged, or failed (``error`` says why).
    ``step``: where the job stands (for a failed slice its last checkpoint's step); ``start_step``: where this slice
    began; ``total_steps``: the job's length (-1 when not known). ``seconds``: the time this call took.
    ``checkpoint_step``: the job's latest complete checkpoint (None: none). ``train_metrics`` / ``eval_metrics``: the
    numbers of the job's last training and evaluation records (empty when there is none yet). ``timings``: what was
    measured, to pass to the next slice. ``message``: what happened, for people.
    """

    output_dir: str
    state: str
    step: int
    start_step: int
    total_steps: int
    seconds: float
    checkpoint_step: int | None
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    timings: SliceTimings
    message: str
    error: str | None = None

    def __post_init__(self) -> None:
        if self.state not in SLICE_STATES:
            raise ValueError(f"a slice ends {' / '.join(SLICE_STATES)}, not {self.state!r}")

    @property
    def steps_done(self) -> int:
        """Steps this slice trained (0 for a slice that found the job over or fitted no step)."""
        return self.step - self.start_step

    @property
    def done(self) -> bool:
        """True once no further slice will make progress (finished, diverged or failed)."""
        return self.state != "stopped"


def estimate_margin(step_seconds: float, save_seconds: float) -> float:
    """The time kept back before a step that costs ``step_seconds`` (its evaluation and checkpoint included), when a
    stop after it writes a checkpoint of ``save_seconds``."""
    return max(MIN_MARGIN_SECONDS, 2 * step_seconds + save_seconds)


def slices_needed(
    remaining_steps: int,
    *,
    steps_per_second: float,
    budget_seconds: float,
    setup_seconds: float = 0.0,
    margin_seconds: float = MIN_MARGIN_SECONDS,
) -> int:
    """About how many slices of ``budget_seconds`` train ``remaining_steps`` at ``steps_per_second``, each spending
    ``setup_seconds`` before its first step and keeping ``margin_seconds`` for its checkpoint. Evaluations are not
    counted: with them a job needs more. ValueError when a slice fits no step at all."""
    if isinstance(remaining_steps, bool) or not isinstance(remaining_steps, int) or remaining_steps < 0:
        raise ValueError(f"remaining_steps must be a non-negative integer, got {remaining_steps!r}")
    for name, value in (("steps_per_second", steps_per_second), ("budget_seconds", budget_seconds)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    for name, value in (("setup_seconds", setup_seconds), ("margin_seconds", margin_seconds)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    per_slice = math.floor((budget_seconds - setup_seconds - margin_seconds) * steps_per_second)
    if per_slice < 1:
        raise ValueError(
            f"a slice of {budget_seconds} s fits no step: {setup_seconds} s of setup and a {margin_seconds} s margin "
            f"leave less than one step at {steps_per_second} steps/s"
        )
    return math.ceil(remaining_steps / per_slice)


def slice_config(config: TrainConfig) -> TrainConfig:
    """The settings a slice of the job in ``config.output_dir`` trains with: once the folder holds the job's saved
    settings (its first slice has started), those, resumed (``resume=True``: from the latest complete checkpoint, or
    from step 0 when there is none yet); before that, ``config`` as a new run. Only the device, worker and thread
    counts may differ from the saved settings (as for any resume); anything else is refused with ValueError, since
    the folder then holds another job. No progress bar either way (its monitor thread would outlive the call)."""
    output_dir = Path(config.output_dir)
    saved_path = output_dir / TRAIN_CONFIG
    if not saved_path.is_file():
        return config.with_overrides(resume=False, progress=False)
    saved = TrainConfig.load(saved_path)
    differing = [
        f"{name}: {getattr(saved, name)!r} there, {value!r} here"
        for name, value in config.to_dict().items()
        if name not in RESUMABLE_OVERRIDES
        and value != getattr(saved, name)
        and not (name in RESOLVED_AT_START and value is None)
    ]
    if differing:
        raise ValueError(
            f"{output_dir} holds another training job ({'; '.join(differing)}); give this job its own output_dir"
        )
    kept = {name: getattr(config, name) for name in RESUMABLE_OVERRIDES}
    return saved.with_overrides(**{**kept, "resume": True, "progress": False})


def _checkpoint_bytes(info: CheckpointInfo | None) -> int:
    if info is None:
        return 0
    try:
        return sum(path.stat().st_size for path in info.path.iterdir() if path.is_file())
    except OSError:
        return 0


class _SliceClock:
    """``stop_before`` for the trainer: measures the steps, evaluations and checkpoints between its calls (one per
    step) and says stop once the next step, by the rules of this module's docstring, would not fit the budget."""

    def __init__(
        self,
        *,
        started: float,
        budget_seconds: float,
        save_margin_seconds: float | None,
        max_steps: int | None,
        known: SliceTimings,
        unmeasured_save_seconds: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.started = started
        self.budget = budget_seconds
        self.fixed_margin = save_margin_seconds
        self.max_steps = max_steps
        self.known = known
        self.unmeasured_save = unmeasured_save_seconds
        self.now = now
        self.measured = SliceTimings()
        self.fastest: float | None = None
        self.fastest_plain: float | None = None
        self.start_step: int | None = None
        self.previous: tuple[NextStep, float] | None = None
        self.stopped_at: float | None = None
        self.reason = ""

    # -- what was measured --------------------------------------------------------------------------------------

    def _measure(self, step: NextStep, began: float, ended: float) -> None:
        seconds = ended - began
        # What an evaluation or checkpoint added to its step: beyond the fastest plain step of this slice (none yet:
        # all of it), so that it is overestimated rather than under.
        extra = max(0.0, seconds - (self.fastest_plain or 0.0))
        self.fastest = seconds if self.fastest is None else min(self.fastest, seconds)
        if step.evaluates:
            extra = max(0.0, extra - (self.save_seconds() if step.saves else 0.0))
            self.measured = dataclasses.replace(self.measured, evaluation=_larger(self.measured.evaluation, extra))
        elif step.saves:
            self.measured = dataclasses.replace(self.measured, save=_larger(self.measured.save, extra))
        else:
            self.measured = dataclasses.replace(self.measured, step=_larger(self.measured.step, seconds))
            self.fastest_plain = seconds if self.fastest_plain is None else min(self.fastest_plain, seconds)

    def step_seconds(self) -> float | None:
        known = _larger(self.measured.step, self.known.step)
        return known if known is not None else self.fastest

    def save_seconds(self) -> float:
        known = _larger(self.measured.save, self.known.save)
        return known if known is not None else self.unmeasured_save

    def evaluation_seconds(self, step: NextStep) -> float | None:
        known = _larger(self.measured.evaluation, self.known.evaluation)
        if known is not None:
            return known
        per_batch = self.step_seconds()
        return None if per_batch is None else step.evaluation_batches * per_batch

    def cost(self, step: NextStep) -> float | None:
        """Predicted seconds of ``step`` with what follows it (evaluation, checkpoint, export); None: not known."""
        seconds = self.step_seconds()
        evaluation = self.evaluation_seconds(step)
        if seconds is None or evaluation is None:
            return None
        if step.evaluates:
            seconds += evaluation
        if step.saves:
            seconds += self.save_seconds()
        if step.finishes:
            seconds += self.save_seconds()  # the model export writes the weights once more
        return seconds

    def timings(self, stop_seconds: float | None) -> SliceTimings:
        measured = dataclasses.replace(self.measured, save=_larger(self.measured.save, stop_seconds))
        if measured.step is None and self.fastest is not None:
            measured = dataclasses.replace(measured, step=self.fastest)  # only steps with extra work were seen
        return measured.merged(self.known)

    # -- the decision -------------------------------------------------------------------------------------------

    def __call__(self, step: NextStep) -> bool:
        now = self.now()
        if self.previous is None:
            self.start_step = step.step - 1
            self.measured = dataclasses.replace(self.measured, setup=now - self.started)
        else:
            self._measure(*self.previous, now)
        self.previous = (step, now)
        reason = self._reason_to_stop(step, now)
        if reason is None:
            return False
        self.reason = reason
        self.stopped_at = now
        return True

    def _reason_to_stop(self, step: NextStep, now: float) -> str | None:
        assert self.start_step is not None
        done = step.step - 1 - self.start_step
        if self.max_steps is not None and done >= self.max_steps:
            return f"the slice took its {self.max_steps} steps"
        elapsed = now - self.started
        left = self.budget - elapsed
        if self.fixed_margin is not None:
            if left < self.fixed_margin:
                return f"{left:.1f} s of the {self.budget:g} s budget left, a {self.fixed_margin:g} s margin kept"
            return None
        cost = self.cost(step)
        after = 0.0 if step.finishes else self.save_seconds()
        if done == 0:
            needed = MIN_MARGIN_SECONDS if cost is None else cost + after
        else:
            assert cost is not None  # a step of this slice was measured
            needed = estimate_margin(cost, after)
        if needed <= left:
            return None
        work = "step"
        if step.evaluates:
            work += " with its evaluation"
        if step.finishes:
            work = f"last {work} and the model export"
        return f"{left:.1f} s of the {self.budget:g} s budget left, {needed:.1f} s kept for the next {work}"


def _scalars(record: dict[str, Any] | None) -> dict[str, float]:
    if record is None:
        return {}
    return {
        name: float(value)
        for name, value in record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def _last_records(output_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    records = read_metrics(output_dir / METRICS)
    train = next((r for r in reversed(records) if r.get("type") == "train"), None)
    evaluation = next((r for r in reversed(records) if r.get("type") == "eval"), None)
    return _scalars(train), _scalars(evaluation)


def _check_arguments(
    budget_seconds: float,
    save_margin_seconds: float | None,
    max_steps_this_slice: int | None,
    timings: SliceTimings | None,
) -> None:
    if isinstance(budget_seconds, bool) or not isinstance(budget_seconds, (int, float)):
        raise ValueError(f"budget_seconds must be a number of seconds, got {budget_seconds!r}")
    if not math.isfinite(budget_seconds) or budget_seconds <= 0:
        raise ValueError(f"budget_seconds must be a positive number of seconds, got {budget_seconds!r}")
    if save_margin_seconds is not None:
        if isinstance(save_margin_seconds, bool) or not isinstance(save_margin_seconds, (int, float)):
            raise ValueError(f"save_margin_seconds must be a number of seconds or None, got {save_margin_seconds!r}")
        if not 0 <= save_margin_seconds < budget_seconds:
            raise ValueError(
                f"save_margin_seconds must be at least 0 and less than budget_seconds={budget_seconds}, "
                f"got {save_margin_seconds!r}"
            )
    if max_steps_this_slice is not None and (
        isinstance(max_steps_this_slice, bool) or not isinstance(max_steps_this_slice, int) or max_steps_this_slice < 1
    ):
        raise ValueError(f"max_steps_this_slice must be a positive integer or None, got {max_steps_this_slice!r}")
    if timings is not None and not isinstance(timings, SliceTimings):
        raise ValueError(f"timings must be a SliceTimings (a SliceResult's .timings) or None, got {timings!r}")


def run_slice(
    config: TrainConfig,
    *,
    budget_seconds: float,
    save_margin_seconds: float | None = None,
    max_steps_this_slice: int | None = None,
    timings: SliceTimings | None = None,
) -> SliceResult:
    """Train the job of ``config`` (its ``output_dir`` is the job) for one slice of at most about ``budget_seconds``
    and return how it ended; see the module docstring for how the budget is kept and what the caller must not do.

    The first slice starts the job; later ones continue it (``slice_config``), and one called on a finished or
    diverged job returns at once. ``save_margin_seconds``: stop at the first step after ``budget_seconds`` minus this
    (None: estimated from measured times). ``max_steps_this_slice``: stop after so many steps at most (a slice of
    exactly known length, whatever the clock says). ``timings``: what earlier slices measured (the last
    ``SliceResult.timings``), so that this one keeps the right margin from its first step. A failure during training
    is returned as state ``failed`` with its text (the job keeps its last checkpoint); bad arguments, or a folder
    holding another job, raise ValueError before anything is touched.
    """
    started = time.monotonic()
    _check_arguments(budget_seconds, save_margin_seconds, max_steps_this_slice, timings)
    config = slice_config(config)
    output_dir = Path(config.output_dir)
    before = latest_checkpoint(output_dir / CHECKPOINTS)
    status = read_status(output_dir) if config.resume else None
    known_total = int(status["total_steps"]) if status and int(status.get("total_steps", -1)) > 0 else -1
    known = timings if timings is not None else SliceTimings()

    def result(
        state: str,
        step: int,
        start_step: int,
        total_steps: int,
        message: str,
        measured: SliceTimings,
        error: str | None,
    ) -> SliceResult:
        train_metrics, eval_metrics = _last_records(output_dir)
        latest = latest_checkpoint(output_dir / CHECKPOINTS)
        return SliceResult(
            output_dir=str(output_dir),
            state=state,
            step=step,
            start_step=start_step,
            total_steps=total_steps,
            seconds=time.monotonic() - started,
            checkpoint_step=latest.step if latest is not None else None,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            timings=measured,
            message=message,
            error=error,
        )

    if status is not None and status.get("state") in ENDED_STATES:
        step = int(status.get("step", 0))
        return result(status["state"], step, step, known_total, str(status.get("message", "")), known, None)

    clock = _SliceClock(
        started=started,
        budget_seconds=budget_seconds,
        save_margin_seconds=save_margin_seconds,
        max_steps=max_steps_this_slice,
        known=known,
        unmeasured_save_seconds=_checkpoint_bytes(before) / ASSUMED_WRITE_BYTES_PER_SECOND,
    )
    start_step = before.step if before is not None else 0
    try:
        run = run_training(config, stop_before=clock)
    except Exception as error:
        logger.exception("training slice of %s failed", output_dir)
        text = f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
        kept = latest_checkpoint(output_dir / CHECKPOINTS)  # periodic checkpoints of this slice count
        step = kept.step if kept is not None else 0
        return result("failed", step, start_step, known_total, f"the slice failed: {text}", clock.timings(None), text)
    # A stop's own cost (checkpoint, status, plots) is what the next slice must keep back for its stop.
    stop_seconds = time.monotonic() - clock.stopped_at if clock.stopped_at is not None else None
    measured = clock.timings(stop_seconds if run.state == "stopped" else None)
    if clock.start_step is not None:
        start_step = clock.start_step
    message = run.message
    if run.state == "stopped" and clock.reason:
        message = f"{message} ({clock.reason})"
        if run.step == start_step:
            message += "; no step fitted in this slice: give it a longer budget"
    return result(run.state, run.step, start_step, run.total_steps, message, measured, None)
