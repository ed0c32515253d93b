"""Exponential moving average of the model's weights, evaluated and exported instead of the raw weights when on."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


class ModelEma:
    """``shadow = d * shadow + (1 - d) * weights`` after each optimizer step, with ``d`` ramping up to ``decay``
    over the first ``warmup`` updates (an average over few steps would otherwise be dominated by the random
    initialisation). Buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, *, decay: float = 0.9997, warmup: int = 2000) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval()
        self.shadow.requires_grad_(False)

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / max(1, self.warmup)))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        # named_parameters / named_buffers list tied tensors once, in the same order for the model and its copy.
        for (_, averaged), (_, current) in zip(self.shadow.named_parameters(), model.named_parameters()):
            if averaged.dtype.is_floating_point:
                averaged.lerp_(current.detach(), 1 - decay)
            else:
                averaged.copy_(current)
        for (_, averaged_buffer), (_, current_buffer) in zip(self.shadow.named_buffers(), model.named_buffers()):
            averaged_buffer.copy_(current_buffer)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.updates = int(state["updates"])
