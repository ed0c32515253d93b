"""``run_training``: one training run from start to end, around ``Trainer``.

It joins the torchrun process group (if any), checks the run directory (refusing to overwrite a run, or to resume
with changed settings), turns SIGINT / SIGTERM into a resumable stop, and records a failure as the run's
``failed`` status before re-raising it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.data.prepare import PreparedData
from finetune.run.distributed import cleanup_distributed, setup_distributed
from finetune.run.files import write_status
from finetune.run.setup import check_run_directory
from finetune.run.trainer import NextStep, Record, RunResult, Trainer

logger = logging.getLogger(__name__)


class StoppedDuringSetup(Exception):
    """A stop signal arrived while the run was still preparing its data and model: nothing to save yet."""


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, training: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM ask the run to stop at the next step (saving a checkpoint) instead of killing it.

    Before ``training`` is set there is no step to wait for, and preparing a large dataset can take minutes, so the
    signal interrupts the setup at once (``StoppedDuringSetup``). Only in the main thread (where signals arrive);
    elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if not training.is_set():
            raise StoppedDuringSetup(f"signal {signum}")
        logger.warning("signal %d: stopping after this step (a checkpoint will be saved); again to abort", signum)
        stop.set()
        # A second signal gets the default treatment, for when waiting for the step is not an option.
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(
    config: TrainConfig,
    *,
    stop_event: threading.Event | None = None,
    on_record: Callable[[Record], None] | None = None,
    data: PreparedData | None = None,
    stop_before: Callable[[NextStep], bool] | None = None,
) -> RunResult:
    """Run one training job to its end. ``stop_event`` (checked every step) stops it resumably; ``on_record``
    receives every metrics record on rank 0 as it is written. ``stop_before`` is asked before every step, with what
    that step will do (``finetune.run.trainer.NextStep``); True stops the run there, as ``stop_event`` would.

    ``data``: the dataset already prepared by ``finetune.data.prepare.prepare_data`` with the config's source,
    ``strict``, ``seed`` and ``validation_fraction``, so that it is not validated again (data prepared otherwise is
    refused with ValueError before anything is written). None: the run prepares it (under torchrun rank 0 validates
    and the other processes receive its verdict).
    """
    stop_event = stop_event if stop_event is not None else threading.Event()
    context = setup_distributed(config.device)
    try:
        # Refusals here leave the folder as it is: it may hold someone else's finished run.
        checkpoint = check_run_directory(config)
        training = threading.Event()
        try:
            with stop_on_signals(stop_event, training):
                trainer = Trainer(
                    config,
                    context=context,
                    checkpoint=checkpoint,
                    stop_event=stop_event,
                    on_record=on_record,
                    data=data,
                    stop_before=stop_before,
                )
                training.set()
                return trainer.run()
        except StoppedDuringSetup:
            # No step was taken: a new run has no checkpoint, a resumed one keeps its last.
            step = checkpoint.step if checkpoint is not None else 0
            if checkpoint is None:
                message = "stopped while preparing the data and model, before the first step; no checkpoint written"
            else:
                message = f"stopped before resuming; the run is still at step {step}; resume with --resume"
            logger.warning("%s", message)
            return RunResult("stopped", step, -1, Path(config.output_dir), None, message)
        except BaseException as error:
            if context.is_main and Path(config.output_dir).is_dir():
                write_status(
                    Path(config.output_dir),
                    state="failed",
                    step=-1,
                    total_steps=-1,
                    message=f"{type(error).__name__}: {error}",
                )
            raise
    finally:
        cleanup_distributed(context)
