"""The channels-last CPU path of the ResNet against the same weights run on NCHW activations."""

from __future__ import annotations

import pytest
import torch

from ddetr.model.backbone import ResNet


@pytest.mark.parametrize(
    "fields",
    [
        dict(layer_type="basic", depths=(1, 1, 1, 1), stem_width=16, stage_widths=(16, 32, 48, 64)),
        dict(layer_type="bottleneck", depths=(1, 2, 1, 1), stem_width=16, stage_widths=(32, 64, 96, 128)),
        dict(
            layer_type="bottleneck", depths=(1, 1, 1, 2), stem_width=16, stage_widths=(32, 64, 96, 128), dilation=True
        ),
    ],
)
def test_channels_last_features_equal_nchw_features(fields: dict, perturb_) -> None:
    torch.manual_seed(0)
    fast = ResNet(**fields, channels_last_on_cpu=True).eval()
    perturb_(fast, seed=1)
    reference = ResNet(**fields, channels_last_on_cpu=False).eval()
    reference.load_state_dict(fast.state_dict())
    images = torch.randn(2, 3, 70, 94)
    with torch.inference_mode():
        fast_features, reference_features = fast(images), reference(images)
    for fast_map, reference_map in zip(fast_features, reference_features, strict=True):
        assert fast_map.is_contiguous(memory_format=torch.channels_last)
        assert reference_map.is_contiguous()
        torch.testing.assert_close(fast_map, reference_map, rtol=1e-4, atol=1e-4)


def test_channels_last_gradients_equal_nchw_gradients() -> None:
    fields = dict(layer_type="basic", depths=(1, 1, 1, 1), stem_width=16, stage_widths=(16, 32, 48, 64))
    torch.manual_seed(0)
    fast = ResNet(**fields, channels_last_on_cpu=True)
    reference = ResNet(**fields, channels_last_on_cpu=False)
    reference.load_state_dict(fast.state_dict())
    images = torch.randn(1, 3, 64, 64)
    for model in (fast, reference):
        sum(feature.square().mean() for feature in model(images)).backward()
    for (name, fast_parameter), reference_parameter in zip(fast.named_parameters(), reference.parameters()):
        if fast_parameter.requires_grad:
            torch.testing.assert_close(fast_parameter.grad, reference_parameter.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_measured_layout_choice_runs_either_layout_with_the_same_features(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset ``channels_last_on_cpu`` follows the machine's choice (here forced by ``DDETR_KERNELS``)."""
    monkeypatch.setenv("DDETR_KERNELS", f"conv_layout={layout}")
    fields = dict(layer_type="bottleneck", depths=(1, 1, 1, 1), stem_width=16, stage_widths=(32, 64, 96, 128))
    torch.manual_seed(0)
    chosen = ResNet(**fields).eval()
    reference = ResNet(**fields, channels_last_on_cpu=False).eval()
    reference.load_state_dict(chosen.state_dict())
    images = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        features, expected = chosen(images), reference(images)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for feature, expected_feature in zip(features, expected, strict=True):
        assert feature.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(feature, expected_feature, rtol=1e-4, atol=1e-4)
