"""The position-wise feed-forward block shared by encoder and decoder layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops.dropout import dropout
from ddetr.ops.linear import fusable

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation_function={name!r} must be one of {sorted(ACTIVATIONS)}")


def feed_forward(
    x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, activation: str, activation_dropout: float, training: bool
) -> torch.Tensor:
    """fc2(dropout(activation(fc1(x)))); the layers own fc1 / fc2 so weights keep their on-disk names."""
    if activation == "relu" and fusable(fc1):
        hidden = fc1.forward_relu(x)
    else:
        hidden = ACTIVATIONS[activation](fc1(x))
    return fc2(dropout(hidden, activation_dropout, training))
