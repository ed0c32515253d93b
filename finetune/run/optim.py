"""Optimizer and learning-rate schedule (the paper's AdamW groups; step drop or cosine, both with linear warm-up)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from finetune.config import TrainConfig
from finetune.presets import parameter_groups


@dataclass
class LrSchedule:
    """LR multiplier after ``step`` optimizer steps. A plain object (not a closure) so that ``LambdaLR`` stores it
    in its state dict and a checkpoint records which schedule it was."""

    total_steps: int
    schedule: str = "step"
    warmup_steps: int = 0
    drop_fraction: float = 0.8
    min_factor: float = 0.01

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return 0.001 + (1 - 0.001) * step / self.warmup_steps
        if self.schedule == "step":
            return 0.1 if step >= round(self.drop_fraction * self.total_steps) else 1.0
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown LR schedule {self.schedule!r}")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    groups = parameter_groups(
        model,
        lr=config.lr,
        lr_backbone=config.backbone_lr,
        lr_linear_proj_mult=config.lr_linear_proj_mult,
        weight_decay=config.weight_decay,
    )
    # The fused kernel updates every tensor in one pass; the default per-tensor loop costs more than a tiny
    # model's whole backward on a CPU.
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = LrSchedule(
        total_steps=total_steps,
        schedule=config.lr_schedule,
        warmup_steps=config.warmup_steps,
        drop_fraction=config.lr_drop,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
