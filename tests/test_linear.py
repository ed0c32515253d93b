"""The oneDNN inference path of ddetr.ops.linear against F.linear in float64, and when each path is taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ddetr.ops.onednn_dtypes as onednn_dtypes_module
from ddetr.model.feed_forward import feed_forward
from ddetr.ops.conv import _onednn_conv_dtype, conv2d
from ddetr.ops.linear import _HAS_ONEDNN_LINEAR, Linear, linear, onednn_dtype
from ddetr.ops.onednn_dtypes import onednn_dtypes

needs_onednn = pytest.mark.skipif(not _HAS_ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
needs_onednn_bf16 = pytest.mark.skipif(
    torch.bfloat16 not in onednn_dtypes(), reason="this CPU's oneDNN has no bf16 kernels (no AVX-512)"
)


@pytest.fixture(autouse=True)
def onednn_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests hold the oneDNN path to F.linear: make it the machine's choice whatever was measured here
    (both choices: tests/test_kernel_choice.py)."""
    monkeypatch.setenv("DDETR_KERNELS", "linear=onednn")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    out = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return F.relu(out) if relu else out


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 24), (2, 19, 24), (2, 3, 5, 24)])
def test_onednn_path_matches_float64_reference(shape: tuple[int, ...], with_bias: bool, relu: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(40, 24, generator=generator)
    bias = torch.randn(40, generator=generator) if with_bias else None
    with torch.inference_mode():
        assert onednn_dtype(x, weight, bias) == torch.float32
        out = linear(x, weight, bias, relu=relu)
    assert out.shape == (*shape[:-1], 40)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, weight, bias, relu), rtol=1e-5, atol=1e-5)
    if relu:
        assert (out >= 0).all() and (out == 0).any()


@needs_onednn
def test_onednn_path_takes_non_contiguous_input() -> None:
    generator = torch.Generator().manual_seed(1)
    # (tokens, batch, features) transposed to (batch, tokens, features): not contiguous
    x = torch.randn(11, 3, 16, generator=generator).transpose(0, 1)
    weight = torch.randn(8, 16, generator=generator)
    bias = torch.randn(8, generator=generator)
    with torch.no_grad():
        out = linear(x, weight, bias)
    torch.testing.assert_close(out.double(), reference(x, weight, bias, False), rtol=1e-5, atol=1e-5)


@needs_onednn_bf16
def test_onednn_path_in_bfloat16() -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=generator).bfloat16()
    weight = (0.2 * torch.randn(16, 32, generator=generator)).bfloat16()
    bias = torch.randn(16, generator=generator).bfloat16()
    with torch.inference_mode():
        assert onednn_dtype(x, weight, bias) == torch.bfloat16
        out = linear(x, weight, bias, relu=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(x, weight, bias, True), rtol=2e-2, atol=2e-2)


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("in_features", "out_features"), [(24, 40), (40, 24)])  # both weight-gradient orders
@pytest.mark.parametrize("input_grad", [True, False])
def test_training_path_gradients_match_float64_autograd(
    in_features: int, out_features: int, with_bias: bool, relu: bool, input_grad: bool
) -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 17, in_features, generator=generator).requires_grad_(input_grad)
    weight = torch.randn(out_features, in_features, generator=generator).requires_grad_()
    bias = torch.randn(out_features, generator=generator).requires_grad_() if with_bias else None
    upstream = torch.randn(3, 17, out_features, generator=generator)
    assert onednn_dtype(x, weight, bias) == torch.float32
    out = linear(x, weight, bias, relu=relu)
    out.backward(upstream)

    leaves = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    by_leaf = dict(zip(map(id, leaves), doubles))
    x64, w64 = by_leaf.get(id(x), x.detach().double()), by_leaf[id(weight)]
    b64 = by_leaf[id(bias)] if bias is not None else None
    expected = F.linear(x64, w64, b64)
    expected = F.relu(expected) if relu else expected
    expected.backward(upstream.double())
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for leaf, reference_leaf in zip(leaves, doubles):
        torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, rtol=1e-5, atol=1e-4)
    if not input_grad:
        assert x.grad is None


def test_gradients_under_autocast_take_f_linear() -> None:
    layer = Linear(6, 4)
    x = torch.randn(3, 5, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn_dtype(x, layer.weight, layer.bias) is None
        out = layer.forward_relu(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None


def test_path_selection() -> None:
    weight, bias = torch.randn(4, 6), torch.randn(4)
    x = torch.randn(5, 6)
    fast = torch.float32 if _HAS_ONEDNN_LINEAR else None
    # float64 has no oneDNN linear; frozen weights with grad enabled are still inference
    assert onednn_dtype(x.double(), weight.double(), bias.double()) is None
    assert onednn_dtype(x, weight, bias) == fast
    # trainable weights: the float32 training path; float64 ones: F.linear
    assert onednn_dtype(x, weight.requires_grad_(), bias) == fast
    assert onednn_dtype(x.double(), weight.double(), bias.double()) is None
    with torch.no_grad():
        assert onednn_dtype(x, weight, bias) == fast
        # mixed dtypes go to F.linear, which raises its own error
        assert onednn_dtype(x, weight, bias.double()) is None


@needs_onednn_bf16
def test_bf16_autocast_casts_like_autocast_does() -> None:
    torch.manual_seed(4)
    layer = Linear(32, 16)
    x = torch.randn(3, 10, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn_dtype(x, layer.weight, layer.bias) == torch.bfloat16
        fused = layer.forward_relu(x)
        expected = F.relu(F.linear(x, layer.weight, layer.bias))
        # float64 is not autocast's to cast: those operands keep F.linear (and its error)
        assert onednn_dtype(x.double(), layer.weight, layer.bias) is None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        assert onednn_dtype(x, layer.weight, layer.bias) is None
    assert fused.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(fused, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_feed_forward_matches_the_unfused_block(activation: str) -> None:
    torch.manual_seed(3)
    fc1, fc2 = Linear(8, 32), Linear(32, 8)
    x = torch.randn(2, 7, 8)
    with torch.inference_mode():
        out = feed_forward(x, fc1, fc2, activation, activation_dropout=0.1, training=False)
    act = F.relu if activation == "relu" else F.gelu
    expected = F.linear(act(F.linear(x.double(), fc1.weight.double(), fc1.bias.double())), fc2.weight.double())
    expected = expected + fc2.bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_takes_the_reference_ops_where_onednn_refuses_it(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2-only CPU (AMD EPYC Zen 3): oneDNN's bf16 linear and convolution raise there, F.linear and F.conv2d
    emulate bf16. The fast paths stand aside, whatever kernels were chosen or pinned."""
    monkeypatch.setenv("DDETR_KERNELS", "linear=onednn,conv_relu=fused")
    monkeypatch.setattr(onednn_dtypes_module, "onednn_dtypes", lambda: frozenset({torch.float32}))
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 13, 17, generator=generator)
    conv_weight = torch.randn(12, 8, 3, 3, generator=generator) / 8
    tokens = torch.randn(2, 9, 24, generator=generator)
    weight, bias = torch.randn(16, 24, generator=generator) / 5, torch.randn(16, generator=generator)
    if not autocast:
        x, conv_weight, tokens, weight, bias = (t.bfloat16() for t in (x, conv_weight, tokens, weight, bias))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert onednn_dtype(tokens, weight, bias) is None
        assert _onednn_conv_dtype(x, conv_weight, None) is None
        out = linear(tokens, weight, bias, relu=True)
        expected = F.relu(F.linear(tokens, weight, bias))
        features = conv2d(x, conv_weight, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True)
        expected_features = F.relu(F.conv2d(x, conv_weight, None, 1, 1))
    assert out.dtype == features.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=0)
