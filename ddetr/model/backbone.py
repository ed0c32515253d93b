"""ResNet backbone with frozen BatchNorm, returning the feature maps Deformable DETR projects (C3–C5).

Parameter names follow timm / torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``), the
layout of the published checkpoints and of the paper code. DC5 (``dilation=True``) replaces the stride of the last
stage by dilation: its first block keeps dilation 1, the following blocks use dilation 2 (timm / torchvision).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops.conv import conv2d, conv_layout_choice
from ddetr.ops.prepared_weights import prepared


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers (never trained)."""

    # Registered as buffers in __init__; declared here so the type is Tensor rather than nn.Module.__getattr__'s.
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written from a regular BatchNorm carry a step counter that means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map this layer applies: y = x * scale + shift, per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def conv_frozen_bn(
    conv: nn.Conv2d,
    norm: FrozenBatchNorm2d,
    x: torch.Tensor,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(conv(x))`` (plus ``residual``, then ReLU when ``relu``) as one convolution: the frozen affine map
    folds into the kernel and a bias. Mathematically identical (gradients included) and saves two full passes over
    every activation map."""
    dtype = _kernel_dtype(conv.weight)
    if dtype == conv.weight.dtype:
        weight, shift = _folded(conv, norm, dtype)
    else:  # kept between forward passes, like every weight cast (ddetr.ops.prepared_weights)
        sources = (conv.weight, *norm.buffers())
        weight, shift = prepared(sources, ("frozen_bn", dtype), lambda: _folded(conv, norm, dtype))
    return conv2d(x, weight, shift, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  groups=conv.groups, relu=relu, residual=residual)  # fmt: skip


def _kernel_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the convolution computes in: autocast's for a float32 kernel under autocast (the cast it would make
    itself, made once with the fold so that only the bf16 kernel is kept), else the kernel's own."""
    device = weight.device.type
    try:
        autocast = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type without autocast (meta: shape probing)
        return weight.dtype
    if weight.dtype == torch.float32 and autocast:
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _folded(conv: nn.Conv2d, norm: FrozenBatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv`` followed by ``norm`` as one kernel and a bias, in ``dtype``."""
    scale, shift = norm.scale_and_shift()
    return (conv.weight * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype)


def _shortcut(downsample: nn.Sequential | None, x: torch.Tensor) -> torch.Tensor:
    """The residual branch: ``x`` itself, or its projection by ``downsample`` (a Conv2d then a FrozenBatchNorm2d)."""
    if downsample is None:
        return x
    return conv_frozen_bn(cast(nn.Conv2d, downsample[0]), cast(FrozenBatchNorm2d, downsample[1]), x)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, *, in_channels: int, width: int, stride: int = 1, first_dilation: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride, first_dilation)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = FrozenBatchNorm2d(width)
        self.downsample = _downsample(in_channels, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _shortcut(self.downsample, x)
        out = conv_frozen_bn(self.conv1, self.bn1, x, relu=True)
        return conv_frozen_bn(self.conv2, self.bn2, out, relu=True, residual=shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, *, in_channels: int, width: int, stride: int = 1, first_dilation: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        # The stride sits on the 3x3 convolution (ResNet v1.5), as in timm, torchvision and transformers.
        self.conv2 = _conv3x3(width, width, stride, first_dilation)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _shortcut(self.downsample, x)
        out = conv_frozen_bn(self.conv1, self.bn1, x, relu=True)
        out = conv_frozen_bn(self.conv2, self.bn2, out, relu=True)
        return conv_frozen_bn(self.conv3, self.bn3, out, relu=True, residual=shortcut)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), FrozenBatchNorm2d(out_channels)
    )


class ResNet(nn.Module):
    """ResNet feature extractor returning the outputs of the requested stages (1-based: 2, 3, 4 = C3, C4, C5)."""

    def __init__(
        self,
        *,
        layer_type: str = "bottleneck",
        depths: tuple[int, ...] = (3, 4, 6, 3),
        stem_width: int = 64,
        stage_widths: tuple[int, ...] | None = None,
        out_stages: tuple[int, ...] = (2, 3, 4),
        dilation: bool = False,
        num_channels: int = 3,
        freeze_stem_and_layer1: bool = True,
        channels_last_on_cpu: bool | None = None,
    ) -> None:
        super().__init__()
        self.channels_last_on_cpu = channels_last_on_cpu
        if layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type={layer_type!r} must be 'basic' or 'bottleneck'")
        block = Bottleneck if layer_type == "bottleneck" else BasicBlock
        if stage_widths is None:
            stage_widths = tuple(stem_width * 2**i * block.expansion for i in range(4))
        self.out_stages = tuple(out_stages)
        self.conv1 = nn.Conv2d(num_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(stem_width)
        in_channels = stem_width
        current_dilation = 1
        for index, (depth, out_channels) in enumerate(zip(depths, stage_widths)):
            if out_channels % block.expansion:
                raise ValueError(f"stage width {out_channels} is not a multiple of {block.expansion}")
            width = out_channels // block.expansion
            stride = 1 if index == 0 else 2
            previous_dilation = current_dilation
            if dilation and index == 3:
                current_dilation *= stride
                stride = 1
            blocks = []
            for block_index in range(depth):
                blocks.append(
                    block(
                        in_channels=in_channels,
                        width=width,
                        stride=stride if block_index == 0 else 1,
                        first_dilation=previous_dilation if block_index == 0 else current_dilation,
                        dilation=current_dilation,
                    )
                )
                in_channels = out_channels
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.out_channels = tuple(stage_widths[stage - 1] for stage in self.out_stages)
        if freeze_stem_and_layer1:
            # The paper code trains only layer2-layer4 of the backbone.
            for module in (self.conv1, self.layer1):
                module.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if pixel_values.device.type == "cpu" and self._channels_last(pixel_values):
            # oneDNN convolves channels-last activations natively and reorders NCHW ones around every convolution:
            # ResNet-50 at 800x1066 on 2 threads took 0.40 s instead of 0.89 s (AMD EPYC). The feature maps stay
            # channels-last; the (batch, tokens, channels) view the encoder takes of them is then free.
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = conv_frozen_bn(self.conv1, self.bn1, pixel_values, relu=True)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        features = []
        for stage in range(1, max(self.out_stages) + 1):
            x = getattr(self, f"layer{stage}")(x)
            if stage in self.out_stages:
                features.append(x)
        return features

    def _channels_last(self, pixel_values: torch.Tensor) -> bool:
        """``channels_last_on_cpu`` when set, else this machine's measured choice for the dtype and mode."""
        if self.channels_last_on_cpu is not None:
            return self.channels_last_on_cpu
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else pixel_values.dtype
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return conv_layout_choice(dtype, training=training).option == "channels_last"


class ConvEncoder(nn.Module):
    """The ResNet plus the pixel mask resized to each feature map (``model`` holds the ResNet, as on disk)."""

    def __init__(self, *, resnet: ResNet) -> None:
        super().__init__()
        self.model = resnet

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.model.out_channels

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        features = self.model(pixel_values)
        return [(feature, resize_mask(pixel_mask, feature.shape[-2:])) for feature in features]


def resize_mask(pixel_mask: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """(batch, height, width) 0/1 mask to a boolean mask of ``size`` by nearest-neighbour sampling."""
    return F.interpolate(pixel_mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class Backbone(nn.Module):
    """Container whose only job is to give the backbone weights their on-disk prefix ``backbone.conv_encoder``."""

    def __init__(self, *, conv_encoder: ConvEncoder) -> None:
        super().__init__()
        self.conv_encoder = conv_encoder

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.conv_encoder(pixel_values, pixel_mask)
