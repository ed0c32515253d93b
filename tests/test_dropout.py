"""The fast CPU dropout against F.dropout's definition: which elements survive, their scale, gradients, statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddetr.ops.dropout import dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_survivors_are_scaled_by_the_inverse_keep_probability(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 6800, 64, dtype=torch.float64) + 0.5  # no zeros, so a zero in the output means dropped
    out = dropout(x, p, training=True)
    kept = out != 0
    exact_keep = 1 - round(p * 65536) / 65536
    torch.testing.assert_close(out[kept], x[kept] / exact_keep, rtol=1e-15, atol=0)
    assert out.dtype == x.dtype and out.shape == x.shape


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_drop_fraction_matches_p_in_every_lane(p: float) -> None:
    # Four mask values come from each 64-bit word; a biased lane (a sign bit that is always 0) would show here.
    torch.manual_seed(1)
    x = torch.ones(1_000_003)
    dropped = dropout(x, p, training=True) == 0
    n = x.numel()
    tolerance = 6 * math.sqrt(p * (1 - p) / (n / 4))
    for lane in range(4):
        fraction = dropped[lane::4].double().mean().item()
        assert abs(fraction - p) < tolerance, (lane, fraction)
    # neighbours are independent: the chance both are dropped is p^2
    both = (dropped[:-1] & dropped[1:]).double().mean().item()
    assert abs(both - p * p) < 6 * math.sqrt(p * p / n)


def test_expected_output_equals_input() -> None:
    torch.manual_seed(2)
    x = torch.full((4_000_000,), 3.0, dtype=torch.float64)
    mean = dropout(x, 0.1, training=True).mean().item()
    assert abs(mean - 3.0) < 6 * 3.0 * math.sqrt(0.1 / 0.9 / x.numel())


def test_gradient_is_the_same_mask_and_scale() -> None:
    torch.manual_seed(3)
    x = (torch.rand(3, 500, 32, dtype=torch.float64) + 0.5).requires_grad_()
    out = dropout(x, 0.25, training=True)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, upstream * out.detach() / x.detach(), rtol=1e-12, atol=0)


def test_bf16_scale_is_rounded_once_like_f_dropout() -> None:
    torch.manual_seed(4)
    x = (torch.rand(10_000) + 0.5).bfloat16()
    out = dropout(x, 0.1, training=True)
    kept = out != 0
    assert out.dtype == torch.bfloat16
    exact_keep = 1 - round(0.1 * 65536) / 65536
    expected = (x.double() / exact_keep).bfloat16()  # the float64 product rounded to bf16 once
    assert torch.equal(out[kept], expected[kept])


def test_non_contiguous_input() -> None:
    torch.manual_seed(5)
    x = (torch.rand(64, 48) + 0.5).t()
    out = dropout(x, 0.5, training=True)
    kept = out != 0
    assert 0.3 < kept.double().mean().item() < 0.7
    torch.testing.assert_close(out[kept], x[kept] * 2)


def test_same_seed_same_mask() -> None:
    x = torch.rand(1000) + 0.5
    torch.manual_seed(6)
    first = dropout(x, 0.3, training=True)
    torch.manual_seed(6)
    assert torch.equal(first, dropout(x, 0.3, training=True))


def test_identity_when_not_training_or_p_zero() -> None:
    x = torch.randn(10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x


def test_p_one_drops_everything_and_keeps_the_graph() -> None:
    x = torch.randn(10, requires_grad=True)
    out = dropout(x, 1.0, training=True)
    assert torch.equal(out, torch.zeros(10))
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros(10))


def test_p_too_small_for_the_grid_takes_f_dropout() -> None:
    # 1e-6 * 65536 rounds to 0: the reference must run, not an identity that silently ignores p.
    x = torch.ones(2_000_000)
    torch.manual_seed(7)
    ours = dropout(x, 1e-6, training=True)
    torch.manual_seed(7)
    assert torch.equal(ours, F.dropout(x, 1e-6, training=True))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_probability_is_a_value_error(p: float) -> None:
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(torch.ones(3), p, training=True)


def test_empty_tensor() -> None:
    x = torch.ones(0, 256)
    assert dropout(x, 0.1, training=True).shape == (0, 256)
