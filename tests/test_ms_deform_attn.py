"""Multi-scale deformable attention: fast CPU paths against the grid_sample reference."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ddetr.ops import ms_deform_attn, ms_deform_attn_reference, select_implementation
from ddetr.ops import ms_deform_attn_cpu as msda_cpu
from ddetr.ops.ms_deform_attn_cpu import ms_deform_attn_cpu
from ddetr.runtime import machine

BACKENDS = ["cpp", "torch"]


def _require(backend: str) -> None:
    if backend == "cpp" and msda_cpu.load_cpp_extension() is None:
        pytest.skip("no C++ compiler: the compiled kernel is unavailable here")


def _inputs(
    batch: int,
    queries: int,
    heads: int,
    head_dim: int,
    spatial_shapes: list[tuple[int, int]],
    points: int,
    dtype: torch.dtype = torch.float64,
    margin: float = 0.3,
    seed: int = 0,
) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sequence = sum(height * width for height, width in spatial_shapes)
    levels = len(spatial_shapes)
    # (batch, sequence, heads, head_dim)
    value = torch.randn(batch, sequence, heads, head_dim, generator=generator, dtype=dtype)
    # (batch, queries, heads, levels, points, 2); the margin puts a good share of points partly or fully outside
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype)
    locations = locations * (1 + 2 * margin) - margin
    # (batch, queries, heads, levels, points)
    logits = torch.randn(batch, queries, heads, levels * points, generator=generator, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, spatial_shapes, locations, weights


def _outputs_and_grads(
    function: Callable[..., torch.Tensor],
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]] | None,
    locations: torch.Tensor,
    weights: torch.Tensor,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    leaves = [tensor.detach().requires_grad_(True) for tensor in (value, locations, weights)]
    output = function(leaves[0], spatial_shapes, leaves[1], leaves[2])
    if grad_output is None:
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    grads = torch.autograd.grad(output, leaves, grad_output)
    return output, grads


def _assert_matches_reference(
    backend: str,
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> None:
    expected, expected_grads = _outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    actual, actual_grads = _outputs_and_grads(
        lambda *args: ms_deform_attn_cpu(*args, backend=backend), value, spatial_shapes, locations, weights
    )
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for name, got, want in zip(("value", "locations", "weights"), actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


CASES = {
    # batch, queries, heads, head_dim, spatial shapes, points
    "one-level": (1, 7, 2, 32, [(6, 5)], 3),
    "odd-sizes": (2, 9, 3, 5, [(7, 5), (3, 9), (1, 1)], 2),
    "four-levels-d64": (2, 11, 2, 64, [(8, 10), (4, 5), (2, 3), (1, 2)], 4),
    "one-head": (1, 13, 1, 32, [(5, 4), (2, 2)], 4),
    "self-attention": (2, 54, 4, 8, [(6, 7), (3, 4)], 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_float64(backend: str, case: str) -> None:
    _require(backend)
    _assert_matches_reference(backend, *_inputs(*CASES[case]))


@pytest.mark.parametrize("threads", [3, 8])
@pytest.mark.parametrize("case", ["one-head", "odd-sizes", "self-attention"])
def test_multithreaded_kernel_matches_reference(monkeypatch: pytest.MonkeyPatch, threads: int, case: str) -> None:
    # Small problems normally run on one thread; force several, more than the (batch, head) tasks, so the forward
    # splits queries across threads and the backward accumulates query chunks into private grad_value copies.
    _require("cpp")
    monkeypatch.setattr(msda_cpu, "_threads_for", lambda samples: threads)
    _assert_matches_reference("cpp", *_inputs(*CASES[case]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_points_far_outside_and_on_borders(backend: str) -> None:
    _require(backend)
    spatial_shapes = [(4, 8), (2, 2)]
    value, _, locations, weights = _inputs(1, 4, 2, 32, spatial_shapes, 6)
    for level, (height, width) in enumerate(spatial_shapes):
        # Pixel coordinates loc * size - 0.5 at the edges: -1 (outer rim of the zero padding: zero value, non-zero
        # gradient), -0.5, 0, size - 1, size - 0.5, size. Dyadic, so exact in both implementations.
        # (points=6,) each
        x = (torch.tensor([-1.0, -0.5, 0.0, width - 1.0, width - 0.5, float(width)]) + 0.5) / width
        y = (torch.tensor([-1.0, -0.5, 0.0, height - 1.0, height - 0.5, float(height)]) + 0.5) / height
        locations[0, 0, :, level] = torch.stack((x, y), dim=-1).double()
        locations[0, 1, :, level] = torch.stack((x, torch.full_like(y, 0.5)), dim=-1).double()
        locations[0, 2, :, level] = torch.stack((torch.full_like(x, 0.3), y.flip(0)), dim=-1).double()
    # Far away, including beyond int32 pixel coordinates.
    locations[0, 3, 0] = 1e6
    locations[0, 3, 1, :, :, 1] = -3e9
    _assert_matches_reference(backend, value, spatial_shapes, locations, weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend: str) -> None:
    _require(backend)
    value, spatial_shapes, locations, weights = _inputs(2, 6, 3, 4, [(5, 3), (2, 2)], 2)
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    locations_t = locations.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    weights_t = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    _assert_matches_reference(backend, value_t, spatial_shapes, locations_t, weights_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_reference(backend: str) -> None:
    _require(backend)
    inputs = _inputs(2, 40, 8, 32, [(12, 10), (6, 5), (3, 3)], 4, dtype=torch.float32)
    _assert_matches_reference(backend, *inputs, rtol=1e-4, atol=1e-4)


def test_gradcheck_reference() -> None:
    value, spatial_shapes, locations, weights = _inputs(1, 3, 2, 3, [(3, 4), (2, 1)], 2, margin=0.1)
    leaves = tuple(tensor.requires_grad_(True) for tensor in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_reference(v, spatial_shapes, loc, w), leaves, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fast(backend: str) -> None:
    _require(backend)
    value, spatial_shapes, locations, weights = _inputs(2, 3, 2, 3, [(3, 4), (2, 1)], 2, margin=0.1)
    leaves = tuple(tensor.requires_grad_(True) for tensor in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_cpu(v, spatial_shapes, loc, w, backend=backend), leaves, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend: str) -> None:
    _require(backend)
    value, spatial_shapes, locations, weights = _inputs(1, 10, 2, 32, [(6, 6), (3, 3)], 4, dtype=torch.float32)
    # The reference on the bf16-rounded value in fp32: what the fast paths compute before rounding the output.
    # A grad_output exact in bf16, so both sides backpropagate the same numbers.
    grad_output = torch.randn(1, 10, 64).bfloat16()
    expected, expected_grads = _outputs_and_grads(
        ms_deform_attn_reference, value.bfloat16().float(), spatial_shapes, locations, weights, grad_output.float()
    )
    # bf16 value with fp32 locations and weights: the usual autocast situation
    value_bf16 = value.bfloat16()
    actual, actual_grads = _outputs_and_grads(
        lambda *args: ms_deform_attn_cpu(*args, backend=backend),
        value_bf16,
        spatial_shapes,
        locations,
        weights,
        grad_output,
    )
    assert actual.dtype == torch.bfloat16
    assert [grad.dtype for grad in actual_grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(actual.float(), expected, rtol=1e-2, atol=1e-2)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    # everything bf16 still works (sampled in fp32 internally)
    output_all = ms_deform_attn_cpu(value_bf16, spatial_shapes, locations.bfloat16(), weights.bfloat16())
    torch.testing.assert_close(output_all.float(), expected, rtol=5e-2, atol=5e-2)


def test_dispatcher_uses_fast_path_on_cpu() -> None:
    assert select_implementation("cpu") is ms_deform_attn_cpu
    assert select_implementation(torch.device("cpu"), "reference") is ms_deform_attn_reference
    value, spatial_shapes, locations, weights = _inputs(1, 5, 2, 4, [(3, 3)], 2)
    torch.testing.assert_close(
        ms_deform_attn(value, spatial_shapes, locations, weights),
        ms_deform_attn(value, spatial_shapes, locations, weights, implementation="reference"),
    )


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_compile(backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if backend == "auto":
        # The hardest case for "auto": the first call ever is traced, before anyone knows whether the kernel builds.
        monkeypatch.setattr(msda_cpu, "_kernels", None)
        monkeypatch.setattr(msda_cpu, "_load_attempted", False)
        monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path))
    value, spatial_shapes, locations, weights = _inputs(1, 6, 2, 4, [(4, 3), (2, 2)], 2, dtype=torch.float32)

    def layer(v: torch.Tensor, loc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if backend == "auto":
            sampled = ms_deform_attn(v * 2, spatial_shapes, loc, w.softmax(-1))
        else:
            sampled = ms_deform_attn_cpu(v * 2, spatial_shapes, loc, w.softmax(-1), backend=backend)
        return torch.relu(sampled) + 1

    compiled = torch.compile(layer, fullgraph=True)
    inputs = (value, None, locations, weights)
    actual, actual_grads = _outputs_and_grads(lambda v, _, loc, w: compiled(v, loc, w), *inputs)
    expected, expected_grads = _outputs_and_grads(lambda v, _, loc, w: layer(v, loc, w), *inputs)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_custom_op_registration() -> None:
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch of the op that torch.compile sees;
    # eager calls use an equivalent autograd.Function instead.
    _require("cpp")
    value, spatial_shapes, locations, weights = _inputs(2, 5, 2, 4, [(3, 4), (2, 2)], 2)
    flat_shapes = [size for shape in spatial_shapes for size in shape]
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)
    torch.library.opcheck(msda_cpu._forward_op, (value, flat_shapes, locations, weights, "cpp"))
    grad_output = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.library.opcheck(
        msda_cpu._backward_op, (grad_output, value.detach(), flat_shapes, locations.detach(), weights.detach(), "cpp")
    )


def test_custom_op_pure_path_matches_reference() -> None:
    # The op falls back to pure PyTorch (backward through torch.func.vjp) when a graph traced before the first eager
    # call finds at run time that the kernel does not build.
    value, spatial_shapes, locations, weights = _inputs(2, 9, 3, 5, [(7, 5), (3, 9), (1, 1)], 2)
    flat_shapes = [size for shape in spatial_shapes for size in shape]
    expected, expected_grads = _outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    actual, actual_grads = _outputs_and_grads(
        lambda v, _, loc, w: msda_cpu._forward_op(v, flat_shapes, loc, w, "torch"), value, None, locations, weights
    )
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_invalid_inputs_raise_value_error() -> None:
    value, spatial_shapes, locations, weights = _inputs(1, 5, 2, 4, [(3, 3)], 2)
    with pytest.raises(ValueError, match="do not cover"):
        ms_deform_attn_cpu(value, [(3, 4)], locations, weights)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn_cpu(value, [(3, 3), (1, 1)], locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_cpu(value, spatial_shapes, locations, weights[..., :1])
    with pytest.raises(ValueError, match="value must be"):
        ms_deform_attn_cpu(value[0], spatial_shapes, locations, weights)
    with pytest.raises(ValueError, match="floating-point"):
        ms_deform_attn_cpu(value.long(), spatial_shapes, locations, weights)
    with pytest.raises(ValueError, match="backend"):
        ms_deform_attn_cpu(value, spatial_shapes, locations, weights, backend="cuda")


def _forget_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make the next call try to build from scratch, into an empty cache."""
    monkeypatch.setattr(msda_cpu, "_kernels", None)
    monkeypatch.setattr(msda_cpu, "_load_attempted", False)
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path))


def test_build_failure_falls_back_to_pure_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _forget_kernel(monkeypatch, tmp_path)
    monkeypatch.setattr(msda_cpu, "_compiler", lambda: str(tmp_path / "no-such-compiler"))
    value, spatial_shapes, locations, weights = _inputs(1, 5, 2, 4, [(3, 3)], 2)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        output = ms_deform_attn_cpu(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(output, ms_deform_attn_reference(value, spatial_shapes, locations, weights))
    assert msda_cpu.cpp_extension_path() is None
    # warned once; later calls quietly take the pure path (inference) or the reference (training)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            ms_deform_attn_cpu(value, spatial_shapes, locations, weights)
        _assert_matches_reference("auto", value, spatial_shapes, locations, weights)
    with pytest.raises(RuntimeError, match="unavailable"):
        ms_deform_attn_cpu(value, spatial_shapes, locations, weights, backend="cpp")


def test_build_from_scratch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if msda_cpu._compiler() is None:
        pytest.skip("no C++ compiler")
    _forget_kernel(monkeypatch, tmp_path)
    path = msda_cpu.cpp_extension_path()
    assert path is not None and path.parent == tmp_path
    assert [file.name for file in tmp_path.iterdir()] == [path.name]  # no partial files left behind
    _assert_matches_reference("cpp", *_inputs(1, 5, 2, 4, [(3, 3)], 2))


def test_build_retries_with_plainer_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if msda_cpu._compiler() is None:
        pytest.skip("no C++ compiler")
    _forget_kernel(monkeypatch, tmp_path)
    # A flag the compiler rejects, then no flags at all: the single-threaded build without OpenMP.
    monkeypatch.setattr(msda_cpu, "_FLAG_SETS", (("-fno-such-flag-for-ddetr",), ()))
    assert msda_cpu.cpp_extension_path() is not None
    _assert_matches_reference("cpp", *_inputs(2, 7, 2, 32, [(4, 5), (2, 2)], 3))


def test_environment_variable_disables_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _forget_kernel(monkeypatch, tmp_path)
    monkeypatch.setenv("DDETR_MSDA_CPU_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert msda_cpu.load_cpp_extension() is None
    assert list(tmp_path.iterdir()) == []
    _forget_kernel(monkeypatch, tmp_path)
    monkeypatch.setenv("DDETR_MSDA_CPU_BACKEND", "gpu")
    with pytest.raises(ValueError, match="DDETR_MSDA_CPU_BACKEND"):
        msda_cpu.load_cpp_extension()


def test_unwritable_cache_folder_uses_private_temp_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DDETR_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(machine.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folder = machine.cache_dir()
    assert folder.parent == tmp_path / "tmp"
    assert folder.stat().st_mode & 0o077 == 0
