"""Prediction heads: a linear class head and a 3-layer box MLP per decoder layer, with the paper's initialisation."""

from __future__ import annotations

import copy
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops.linear import Linear

# Focal-loss prior: every class starts at probability 0.01 so early training is not swamped by negatives.
CLASS_PRIOR_PROBABILITY = 0.01


class BoxHead(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear predicting a (cx, cy, w, h) delta in logit space."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int = 4, num_layers: int = 3) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(n_in, n_out) for n_in, n_out in zip(dims, [*dims[1:], output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _repeat(module: nn.Module, count: int, shared: bool) -> nn.ModuleList:
    """``count`` references to one module (weights shared across layers) or independent deep copies."""
    if shared:
        return nn.ModuleList([module] * count)
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))


def build_class_heads(d_model: int, num_labels: int, count: int, *, shared: bool) -> nn.ModuleList:
    head = Linear(d_model, num_labels)
    with torch.no_grad():
        head.bias.fill_(-math.log((1 - CLASS_PRIOR_PROBABILITY) / CLASS_PRIOR_PROBABILITY))
    return _repeat(head, count, shared)


def build_box_heads(d_model: int, count: int, *, shared: bool, two_stage: bool) -> nn.ModuleList:
    """Box heads start as the identity on the reference point (last layer zero); the first predicts boxes of
    sigmoid(-2) ~ 0.12 of the image unless proposals already carry a size (two-stage)."""
    head = BoxHead(input_dim=d_model, hidden_dim=d_model)
    with torch.no_grad():
        nn.init.zeros_(_last_layer(head).weight)
        nn.init.zeros_(_last_layer(head).bias)
    heads = _repeat(head, count, shared)
    if not two_stage:
        with torch.no_grad():
            _last_layer(heads[0]).bias[2:] = -2.0
    return heads


def _last_layer(head: nn.Module) -> Linear:
    return cast(Linear, cast(BoxHead, head).layers[-1])
