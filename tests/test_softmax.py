"""The short-dimension softmax fast path against F.softmax, its reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddetr.ops.softmax import short_softmax


@pytest.mark.parametrize("shape", [(1, 1816, 8, 12), (2, 100, 8, 16), (3, 5, 1, 4), (7, 1)])
def test_matches_f_softmax(shape: tuple[int, ...]):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 6
    with torch.inference_mode():
        torch.testing.assert_close(short_softmax(x), F.softmax(x, dim=-1), rtol=0, atol=1e-15)
        single = x.float()
        torch.testing.assert_close(short_softmax(single), F.softmax(single, dim=-1), rtol=0, atol=1e-6)


def test_large_logits_stay_finite_and_inputs_are_untouched():
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-3e38, 0.0, 3e38]])
    before = x.clone()
    with torch.no_grad():
        result = short_softmax(x)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, F.softmax(x, dim=-1))
    assert torch.equal(x, before)


def test_training_takes_the_reference_with_its_gradient():
    x = torch.randn(4, 9, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(short_softmax, (x,))
    (grad,) = torch.autograd.grad(short_softmax(x).pow(2).sum(), x)
    (expected,) = torch.autograd.grad(F.softmax(x, dim=-1).pow(2).sum(), x)
    torch.testing.assert_close(grad, expected)
