"""``Trainer``: trains a run from a ``TrainConfig`` -- data, model, loop, evaluation, checkpoints, outputs.
``finetune.run.launch.run_training`` starts it (process group, run directory, signals, failed status).

Per optimizer step: check the stop flag (all processes agree), train on ``grad_accum_steps`` batches, step the LR
schedule, update the EMA, log every ``log_every`` steps, evaluate after every ``eval_every`` epochs, and save a
checkpoint every ``save_every`` steps. A stop saves a checkpoint and ends the run as ``stopped``; a run of
``max_nonfinite_steps`` skipped steps in a row ends it as ``diverged`` without touching the last good checkpoint.
The end of training evaluates the validation split, saves a last checkpoint and exports ``model/``.

Only rank 0 writes files. Everything random is seeded or restored, so on CPU a resumed run reproduces an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ddetr import DeformableDetrForObjectDetection
from ddetr.runtime.precision import resolve_precision
from finetune.config import TrainConfig
from finetune.data.augment import AugmentConfig
from finetune.data.collate import DetectionCollator, TrainingImages, make_processor
from finetune.data.prepare import PreparedData
from finetune.data.records import DetectionSplit
from finetune.data.sampler import ResumableBatchSampler, batches_per_epoch
from finetune.data.validation import format_reports
from finetune.evaluate.coco import CocoMetrics
from finetune.evaluate.sharded import evaluate_model
from finetune.run.checkpoints import (
    CheckpointInfo,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from finetune.run.distributed import (
    DistributedContext,
    any_process,
    gather_objects,
    sum_over_processes,
)
from finetune.run.ema import ModelEma
from finetune.run.files import (
    CHECKPOINTS,
    METRICS,
    MODEL_DIR,
    VALIDATION_REPORT,
    export_model,
    write_json,
    write_status,
)
from finetune.run.metrics_log import MetricsLog, read_metrics
from finetune.run.optim import build_optimizer, build_scheduler
from finetune.run.plots import plot_run
from finetune.run.setup import (
    build_run_model,
    check_prepared_data,
    prepare_run_data,
    save_run_settings,
    seed_everything,
)
from finetune.run.step import LOGGED_TERMS, StepOutcome, train_step

logger = logging.getLogger(__name__)
Record = dict[str, Any]


@dataclass
class RunResult:
    """How a run ended: ``state`` is finished, stopped or diverged (failures raise). ``total_steps`` is -1 for a run
    stopped before it had prepared its data (its length was not known yet)."""

    state: str
    step: int
    total_steps: int
    output_dir: Path
    metrics: dict[str, Any] | None
    message: str = ""


@dataclass(frozen=True)
class NextStep:
    """The step a run is about to take and the work that follows it, for ``stop_before`` (a stop policy deciding
    whether that step still fits a time box: ``finetune.run.slices``). ``step`` is its number (1-based);
    ``evaluates``: an evaluation of the validation split follows it (an evaluated epoch's end, or the final one);
    ``saves``: a checkpoint follows it (periodic or final); ``finishes``: it is the last step, after which the model
    is exported as well. ``evaluation_batches``: how many batches an evaluation takes on this process."""

    step: int
    total_steps: int
    evaluates: bool
    saves: bool
    finishes: bool
    evaluation_batches: int


class Trainer:
    """One training run: ``__init__`` prepares the data (unless given), the model, optimizer and any checkpoint to
    resume from; ``run`` trains, evaluates, checkpoints and exports.

    ``finetune.run.launch.run_training`` is the way in: it joins the process group (``context``), checks the run
    directory (``checkpoint``: the one to resume from, None for step 0), and turns signals and failures into a
    run status around this class. ``stop_event`` (checked every step) stops the run resumably; ``on_record``
    receives every metrics record on rank 0 as it is written. ``data``: the dataset already prepared (validated) by
    ``finetune.data.prepare.prepare_data`` with the config's source, ``strict``, ``seed`` and
    ``validation_fraction`` (ValueError otherwise); None prepares it here (under torchrun rank 0 validates and the
    others receive its verdict). Under torchrun every process given ``data`` must be given the same.
    ``stop_before`` is asked before every step, with what that step will do (``NextStep``): True stops the run
    there, as ``stop_event`` would (under torchrun the run stops when any process says so).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        context: DistributedContext,
        checkpoint: CheckpointInfo | None,
        stop_event: threading.Event | None = None,
        on_record: Callable[[Record], None] | None = None,
        data: PreparedData | None = None,
        stop_before: Callable[[NextStep], bool] | None = None,
    ) -> None:
        self.context = context
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.stop_before = stop_before
        self.on_record = on_record
        self.output_dir = Path(config.output_dir)
        if data is not None:
            check_prepared_data(data, config)
        self.data = data if data is not None else prepare_run_data(config, context)
        self.train_split = self.data.split("train")
        self.validation_split = self.data.splits.get("validation")
        model, default_size = build_run_model(config, self.data.class_names, resuming=checkpoint is not None)
        # Built from the shared seed (same weights everywhere); from here on each process draws its own numbers.
        seed_everything(config.seed + context.rank)
        image_size = config.image_size or default_size or 800
        max_size = config.max_size or round(image_size * 1333 / 800)
        if (config.image_size, config.max_size) != (image_size, max_size):
            config = config.with_overrides(image_size=image_size, max_size=max_size)
        self.config = config
        self.metrics = MetricsLog(self.output_dir / METRICS)
        if context.is_main:
            save_run_settings(config, model)
            write_json(self.output_dir / VALIDATION_REPORT, [report.to_dict() for report in self.data.reports])
            logger.info("dataset %s\n%s", self.data.description, format_reports(self.data.reports))

        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = context.device
        self.precision = resolve_precision(config.precision, self.device, training=True)
        self.model = model.to(self.device)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.processor = make_processor(image_size, max_size)
        self.augment = AugmentConfig(image_size=image_size, max_size=max_size, mode=config.augment)

        per_epoch = batches_per_epoch(len(self.train_split), config.batch_size, context.world_size)
        self.steps_per_epoch = per_epoch // config.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {len(self.train_split)} images: not enough for one step of "
                f"{config.batch_size} images x {context.world_size} processes x {config.grad_accum_steps} "
                "accumulation steps"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.scale_loss else None
        self.ema = ModelEma(self.model, decay=config.ema_decay) if config.ema else None
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.last_saved_step = -1
        self.last_eval_step = -1
        if checkpoint is not None:
            self._restore(checkpoint)
        elif context.is_main and config.resume:
            self.metrics.truncate_after(0)
        self.ddp_model: torch.nn.Module = self.model
        if context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self._window: list[float] = []
        self._window_terms: dict[str, float] = {}
        self._window_grad: list[float] = []
        self._started = time.monotonic()
        self._start_step = self.step

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def _train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            # Where the data stands: the epoch's seeded order is rebuilt and resumed at this batch.
            "data_position": {
                "epoch": self.step // self.steps_per_epoch,
                "batch": (self.step % self.steps_per_epoch) * self.config.grad_accum_steps,
                "seed": self.config.seed,
            },
            "world_size": self.context.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": gather_objects(capture_rng_state(), self.context),
            "skipped_steps": self.skipped_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "class_names": self.data.class_names,
        }

    def _save(self) -> None:
        state = self._train_state()  # a collective: every process takes part
        if self.context.is_main:
            save_checkpoint(
                self.output_dir / CHECKPOINTS,
                step=self.step,
                epoch=self.step // self.steps_per_epoch,
                model=self.model,
                train_state=state,
                keep=self.config.keep_checkpoints,
            )
        self.last_saved_step = self.step

    def _restore(self, checkpoint: CheckpointInfo) -> None:
        state = load_checkpoint(checkpoint, self.model)
        if state["world_size"] != self.context.world_size:
            raise ValueError(
                f"the checkpoint was written by {state['world_size']} processes; resume it with the same number "
                f"(now {self.context.world_size}) so that batches and data order stay the same"
            )
        if state["class_names"] != self.data.class_names:
            raise ValueError(
                f"checkpoint classes {state['class_names']} differ from the data's {self.data.class_names}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        restore_rng_state(state["rng"][self.context.rank])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.last_saved_step = self.step
        if self.context.is_main:
            self.metrics.truncate_after(self.step)
        evaluated = [r for r in read_metrics(self.output_dir / METRICS, kind="eval") if r.get("step") == self.step]
        self.last_eval_step = self.step if evaluated else -1
        logger.info("resumed from %s (step %d of %d)", checkpoint.path, self.step, self.total_steps)

    # ------------------------------------------------------------------------------------------------------------
    # Records

    def _emit(self, record: Record) -> None:
        if not self.context.is_main:
            return
        self.metrics.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def _status(self, state: str, message: str = "") -> None:
        if self.context.is_main:
            write_status(self.output_dir, state=state, step=self.step, total_steps=self.total_steps, message=message)

    def _log_training(self) -> None:
        names = sorted(self._window_terms)
        totals = sum_over_processes(
            [sum(self._window), float(len(self._window)), sum(self._window_grad), float(len(self._window_grad))]
            + [self._window_terms[name] for name in names],
            self.context,
        )
        loss_sum, loss_count, grad_sum, grad_count, *term_sums = totals
        elapsed = time.monotonic() - self._started
        record: Record = {
            "type": "train",
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": loss_sum / loss_count if loss_count else None,
            "lr": self.optimizer.param_groups[-1]["lr"],
            "grad_norm": grad_sum / grad_count if grad_count else None,
            "skipped_steps": self.skipped_steps,
            "steps_per_second": (self.step - self._start_step) / elapsed if elapsed > 0 else None,
            "time": time.time(),
        }
        for name, value in zip(names, term_sums):
            record[name] = value / loss_count if loss_count else None
        self._emit(record)
        self._window, self._window_terms, self._window_grad = [], {}, []

    def _account(self, outcome: StepOutcome) -> None:
        if outcome.skipped:
            self.skipped_steps += 1
            logger.warning("step %d skipped: %s", self.step, outcome.reason)
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if outcome.counts_as_divergence else 0
        if not math.isnan(outcome.loss):
            self._window.append(outcome.loss)
            for name in LOGGED_TERMS:
                if name in outcome.terms:
                    self._window_terms[name] = self._window_terms.get(name, 0.0) + outcome.terms[name]
        if outcome.grad_norm is not None and math.isfinite(outcome.grad_norm):
            self._window_grad.append(outcome.grad_norm)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation

    def evaluate(self, split: DetectionSplit) -> CocoMetrics:
        """COCO metrics of the current (or EMA) weights on ``split``, sharded across processes."""
        return evaluate_model(
            model=self._output_model(),
            split=split,
            class_names=self.data.class_names,
            processor=self.processor,
            context=self.context,
            precision=self.precision,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            num_workers=self.config.num_workers,
        )

    def _evaluate_and_log(self) -> CocoMetrics | None:
        if self.validation_split is None or len(self.validation_split) == 0:
            return None
        metrics = self.evaluate(self.validation_split)
        self.last_eval_step = self.step
        self._emit(
            {
                "type": "eval",
                "split": "validation",
                "step": self.step,
                "epoch": round(self.step / self.steps_per_epoch, 4),
                "time": time.time(),
                **metrics.to_dict(),
            }
        )
        if self.context.is_main:
            logger.info("step %d, validation:\n%s", self.step, metrics.format())
            plot_run(self.output_dir)
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def _evaluates_after(self, step: int) -> bool:
        """Whether the loop evaluates after ``step`` (an evaluated epoch's end; the final one is ``_finish``'s)."""
        eval_every = self.config.eval_every
        return (
            step % self.steps_per_epoch == 0
            and bool(eval_every)
            and (step // self.steps_per_epoch) % eval_every == 0
            and step < self.total_steps
        )

    def _saves_after(self, step: int) -> bool:
        """Whether the loop writes a periodic checkpoint after ``step`` (the final one is ``_finish``'s)."""
        return bool(self.config.save_every) and step % self.config.save_every == 0 and step < self.total_steps

    def _next_step(self) -> NextStep:
        upcoming = self.step + 1
        finishes = upcoming >= self.total_steps
        validation = len(self.validation_split) if self.validation_split is not None else 0
        batch_size = self.config.eval_batch_size or self.config.batch_size
        # Evaluation is sharded: each process takes every world_size-th image.
        per_process = math.ceil(validation / self.context.world_size)
        return NextStep(
            step=upcoming,
            total_steps=self.total_steps,
            evaluates=validation > 0 and (finishes or self._evaluates_after(upcoming)),
            saves=finishes or self._saves_after(upcoming),
            finishes=finishes,
            evaluation_batches=math.ceil(per_process / batch_size),
        )

    def _stop_requested(self) -> bool:
        if self.stop_event.is_set():
            return True
        return self.stop_before is not None and self.stop_before(self._next_step())

    def _loader(self, epoch: int, start_batch: int) -> Iterator[Any]:
        sampler = ResumableBatchSampler(
            dataset_size=len(self.train_split),
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            epoch=epoch,
            rank=self.context.rank,
            world_size=self.context.world_size,
            start_batch=start_batch,
            stop_batch=self.steps_per_epoch * self.config.grad_accum_steps,
        )
        loader = torch.utils.data.DataLoader(
            TrainingImages(split=self.train_split, augment=self.augment, seed=self.config.seed),
            batch_sampler=sampler,
            collate_fn=DetectionCollator(processor=self.processor, resize=False),
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating a loader must not draw from the global RNG that dropout uses.
            generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch),
        )
        return iter(loader)

    def run(self) -> RunResult:
        """Train to the end, a stop or a divergence; failures raise."""
        config = self.config
        self._status("running")
        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (config.progress and self.context.is_main),
            desc="train",
            dynamic_ncols=True,
        )
        accumulation = config.grad_accum_steps
        try:
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                batches = self._loader(epoch, in_epoch * accumulation)
                for _ in range(in_epoch, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    if any_process(self._stop_requested(), self.context):
                        return self._stop(progress)
                    micro_batches = [next(batches).to(self.device) for _ in range(accumulation)]
                    outcome = train_step(
                        model=self.ddp_model,
                        batches=micro_batches,
                        optimizer=self.optimizer,
                        parameters=self.parameters,
                        precision=self.precision,
                        scaler=self.scaler,
                        clip_grad_norm=config.clip_grad_norm,
                        context=self.context,
                    )
                    self.scheduler.step()
                    self.step += 1
                    self._account(outcome)
                    if self.consecutive_nonfinite >= config.max_nonfinite_steps:
                        return self._diverged(progress, outcome)
                    if self.ema is not None and not outcome.skipped:
                        self.ema.update(self.model)
                    progress.update(1)
                    if not math.isnan(outcome.loss):
                        lr = self.optimizer.param_groups[-1]["lr"]
                        progress.set_postfix(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}")
                    if self.step % config.log_every == 0 or self.step == self.total_steps:
                        self._log_training()
                    if self._evaluates_after(self.step):
                        self._evaluate_and_log()
                    if self._saves_after(self.step):
                        self._save()
            return self._finish(progress)
        finally:
            progress.close()

    def _stop(self, progress: tqdm) -> RunResult:
        if self._window:
            self._log_training()
        if self.step != self.last_saved_step:
            self._save()
        message = f"stopped at step {self.step} of {self.total_steps}; resume with --resume"
        self._emit({"type": "status", "state": "stopped", "step": self.step, "time": time.time()})
        self._status("stopped", message)
        if self.context.is_main:
            plot_run(self.output_dir)
        if self.context.is_main:
            progress.write(message)
        return RunResult("stopped", self.step, self.total_steps, self.output_dir, None, message)

    def _diverged(self, progress: tqdm, outcome: StepOutcome) -> RunResult:
        message = (
            f"training diverged: {self.consecutive_nonfinite} steps in a row skipped (last: {outcome.reason}); "
            f"the last good checkpoint (step {max(self.last_saved_step, 0)}) is kept. Lower --lr or use "
            "--precision fp32, then resume"
        )
        self._emit({"type": "status", "state": "diverged", "step": self.step, "time": time.time()})
        self._status("diverged", message)
        logger.error(message)
        return RunResult("diverged", self.step, self.total_steps, self.output_dir, None, message)

    def _finish(self, progress: tqdm) -> RunResult:
        metrics = None
        if self.last_eval_step != self.step:
            evaluated = self._evaluate_and_log()
            metrics = evaluated.to_dict() if evaluated is not None else None
        if self.step != self.last_saved_step:
            self._save()
        if self.context.is_main:
            export_model(self._output_model(), self.processor, self.output_dir / MODEL_DIR)
            plot_run(self.output_dir)
        self._emit({"type": "status", "state": "finished", "step": self.step, "time": time.time()})
        message = f"finished {self.step} steps; model saved to {self.output_dir / MODEL_DIR}"
        self._status("finished", message)
        return RunResult("finished", self.step, self.total_steps, self.output_dir, metrics, message)

    def _output_model(self) -> DeformableDetrForObjectDetection:
        """The weights to evaluate and export: the EMA's when there is one (a copy of the same model)."""
        if self.ema is None:
            return self.model
        return cast(DeformableDetrForObjectDetection, self.ema.shadow)
