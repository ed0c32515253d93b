"""One optimizer step: the numeric core of training, with no files, logging or UI.

A step whose loss or gradients are not finite changes no weight (the gradients are dropped, the optimizer is not
stepped) and reports itself as skipped; under DDP every process skips together, since they all-reduce the verdict
before any gradient is exchanged.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddetr.loss.matcher import NonFinitePredictionError
from ddetr.runtime.precision import Precision
from finetune.data.collate import Batch
from finetune.run.distributed import DistributedContext, any_process

# Per-layer terms of the last decoder layer worth following in the logs (unweighted).
LOGGED_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")


@dataclass
class StepOutcome:
    """What one optimizer step did. ``skipped``: no weight changed; ``reason`` says why."""

    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    skipped: bool = False
    reason: str | None = None
    # Loss-scaler overflows are routine with float16 and do not count as divergence.
    counts_as_divergence: bool = False


def _forward_loss(
    model: nn.Module, batch: Batch, precision: Precision, device: torch.device
) -> tuple[torch.Tensor | None, dict[str, float], str | None]:
    """The batch's loss, or None and why when it is not finite."""
    try:
        with precision.autocast(device):
            outputs = model(batch.pixel_values, batch.pixel_mask, labels=batch.labels)
    except NonFinitePredictionError as error:
        # The matcher refuses NaN/inf predictions: a diverged step. Other errors (a malformed batch, a bad target)
        # are bugs or bad data, and surface.
        return None, {}, f"non-finite predictions ({str(error).splitlines()[0][:160]})"
    loss = outputs.loss
    if not torch.isfinite(loss).item():
        return None, {}, f"non-finite loss ({loss.item()})"
    terms = {name: float(outputs.loss_dict[name].detach()) for name in LOGGED_TERMS if name in outputs.loss_dict}
    return loss, terms, None


def train_step(
    *,
    model: nn.Module,
    batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    parameters: list[nn.Parameter],
    precision: Precision,
    scaler: torch.amp.GradScaler | None,
    clip_grad_norm: float,
    context: DistributedContext,
) -> StepOutcome:
    """Forward and backward over ``batches`` (gradient accumulation), clip, and step the optimizer."""
    optimizer.zero_grad(set_to_none=True)
    device = context.device
    total_loss = 0.0
    summed_terms: dict[str, float] = {}
    for position, batch in enumerate(batches):
        last = position == len(batches) - 1
        # Under DDP, gradients are exchanged only on the last micro-batch of the step.
        sync = cast(DistributedDataParallel, model).no_sync() if (context.distributed and not last) else nullcontext()
        with sync:
            loss, terms, problem = _forward_loss(model, batch, precision, device)
            if any_process(problem is not None, context):
                optimizer.zero_grad(set_to_none=True)
                return StepOutcome(
                    loss=math.nan,
                    skipped=True,
                    reason=problem or "non-finite loss on another process",
                    counts_as_divergence=True,
                )
            assert loss is not None  # no process had a problem, this one included
            scaled = loss / len(batches)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total_loss += float(loss.detach()) / len(batches)
        for name, value in terms.items():
            summed_terms[name] = summed_terms.get(name, 0.0) + value / len(batches)

    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = clip_grad_norm if clip_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    if not math.isfinite(grad_norm):
        if scaler is not None:
            # The scaler skips this step itself and lowers its scale.
            scaler.step(optimizer)
            scaler.update()
            return StepOutcome(
                loss=total_loss,
                terms=summed_terms,
                grad_norm=grad_norm,
                skipped=True,
                reason="float16 overflow (loss scale lowered)",
            )
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(
            loss=total_loss,
            terms=summed_terms,
            grad_norm=grad_norm,
            skipped=True,
            reason="non-finite gradients",
            counts_as_divergence=True,
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepOutcome(loss=total_loss, terms=summed_terms, grad_norm=grad_norm)
