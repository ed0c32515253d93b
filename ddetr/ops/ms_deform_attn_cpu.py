"""Fast CPU multi-scale deformable attention, forward and backward.

``"cpp"``    a small C++/OpenMP kernel (``ms_deform_attn_cpu.cpp``) compiled on first use with the system C++ compiler
             and loaded through ``ctypes``. It needs no torch or Python headers and no ninja, builds in about a second,
             and is cached per source, compiler, flags and CPU in ``$DDETR_CACHE_DIR`` (default
             ``~/.cache/ddetr``). Forward parallelises over (batch, queries); backward over (batch, heads), so every
             task owns its slice of ``grad_value``: no atomics, deterministic. Eager calls go through an
             ``autograd.Function``; under ``torch.compile`` the same kernels sit behind a ``torch.library`` custom op
             (opaque to the compiler, autograd from ``register_autograd``).
``"torch"``  pure PyTorch, differentiated by autograd: the four bilinear corners become flat row indices and
             per-corner weights (bilinear x attention) fed to ``F.embedding_bag(mode="sum")``, a fused gather +
             weighted sum that never materialises the sampled values. Used when the compiler is missing or the build
             fails (a warning is emitted once).

``"auto"`` picks ``"cpp"`` when it builds and loads; otherwise ``"torch"`` for inference and, when gradients are
needed, the grid_sample reference, whose fused backward beats embedding_bag's (which sorts every corner index). The
environment variable ``DDETR_MSDA_CPU_BACKEND=torch`` keeps the kernel from being built or loaded at all.

Sampling runs in float32 (locations, weights, accumulation) for every input dtype but float64, which stays float64
(gradcheck). A bfloat16 value is read as bfloat16 by the kernel (no converted copy); the output and the value gradient
come back in the value's dtype.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ddetr.ops.ms_deform_attn import (
    SpatialShapes,
    check_inputs,
    ms_deform_attn_reference,
    register_implementation,
)
from ddetr.runtime.machine import cache_dir, cpu_signature

__all__ = ["BACKENDS", "cpp_extension_path", "load_cpp_extension", "ms_deform_attn_cpu"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpp", "torch")
_BACKEND_ENV = "DDETR_MSDA_CPU_BACKEND"
_SOURCE = Path(__file__).with_name("ms_deform_attn_cpu.cpp")
_ABI_VERSION = 5
# Tried in order: the first is the fast one; the others trade speed for building with compilers that reject
# -march=native or lack OpenMP (the kernel then runs single-threaded, still far faster than grid_sample).
_FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())
_COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 300
# Below this many sampling points per call the kernels run on one thread.
_MIN_SAMPLES_PER_THREAD = 4096


# ---------------------------------------------------------------------------------------------------------------------
# Building and loading the C++ kernel


class _Kernels:
    """The loaded shared library with typed entry points, indexed by the torch dtype of value."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.library = library
        pointer, index, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.forward: dict[torch.dtype, Callable[..., None]] = {}
        self.backward: dict[torch.dtype, Callable[..., None]] = {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64"), (torch.bfloat16, "bf16")):
            forward = getattr(library, f"ddetr_msda_forward_{suffix}")
            forward.argtypes = [pointer] * 6 + [index] * 7 + [threads]
            forward.restype = None
            backward = getattr(library, f"ddetr_msda_backward_{suffix}")
            backward.argtypes = [pointer] * 9 + [index] * 8 + [threads, threads]
            backward.restype = None
            self.forward[dtype] = forward
            self.backward[dtype] = backward


_kernels: _Kernels | None = None
_load_attempted = False
_load_lock = threading.Lock()


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout


def _library_path(compiler: str, flags: tuple[str, ...], folder: Path) -> Path:
    digest = hashlib.sha256()
    parts = (_SOURCE.read_bytes(), compiler.encode(), _compiler_version(compiler).encode(), " ".join(flags).encode())
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    if "-march=native" in flags:
        digest.update(cpu_signature().encode())
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    return folder / f"msda_cpu_{digest.hexdigest()[:16]}{suffix}"


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent processes never load a half-written library.
    handle, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".partial", dir=target.parent)
    os.close(handle)
    command = [compiler, *_COMMON_FLAGS, *flags, str(_SOURCE), "-o", partial]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _open(path: Path) -> _Kernels:
    library = ctypes.CDLL(str(path))
    version = library.ddetr_msda_abi_version()
    if version != _ABI_VERSION:
        raise RuntimeError(f"{path} has ABI version {version}, expected {_ABI_VERSION}")
    return _Kernels(library, path)


def _build_and_open() -> _Kernels:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    try:
        folder = cache_dir()
    except OSError as error:
        raise RuntimeError(f"no writable cache folder for the compiled kernel: {error}") from error
    errors = []
    for flags in _FLAG_SETS:
        target = _library_path(compiler, flags, folder)
        try:
            if not target.exists():
                logger.info("compiling the deformable-attention CPU kernel into %s", target)
                _compile(compiler, flags, target)
            return _open(target)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as error:
            errors.append(f"flags {flags}: {error}")
    raise RuntimeError("\n".join(errors))


def load_cpp_extension() -> _Kernels | None:
    """Build (once per machine) and load the C++ kernel; ``None`` with a one-time warning when that is impossible.

    Call it at start-up to pay the one-second build before the first request instead of during it. Returns ``None``
    without building when ``DDETR_MSDA_CPU_BACKEND=torch``.
    """
    global _kernels, _load_attempted
    if _load_attempted:
        return _kernels
    with _load_lock:
        if not _load_attempted:
            choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower() or "auto"
            if choice not in BACKENDS:
                raise ValueError(f"{_BACKEND_ENV}={choice!r} is not one of {BACKENDS}")
            if choice == "torch":
                logger.info("%s=torch: the compiled deformable-attention kernel is not used", _BACKEND_ENV)
            else:
                try:
                    _kernels = _build_and_open()
                except Exception as error:  # any failure must degrade to the pure path, never crash inference
                    warnings.warn(
                        "ddetr: could not build the C++ deformable-attention CPU kernel, using the slower "
                        f"pure-PyTorch path instead. Reason: {error}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            _load_attempted = True
    return _kernels


def cpp_extension_path() -> Path | None:
    """Path of the loaded compiled kernel, or ``None`` when the pure-PyTorch path is in use."""
    kernels = load_cpp_extension()
    return None if kernels is None else kernels.path


def _require_kernels() -> _Kernels:
    kernels = load_cpp_extension()
    if kernels is None:
        raise RuntimeError(
            f"backend='cpp' was requested but the C++ kernel is unavailable (build failure warning, or {_BACKEND_ENV})"
        )
    return kernels


def _resolve_backend(backend: str) -> str:
    """``"cpp"`` or ``"torch"``; ``"auto"`` is decided by whether the kernel builds."""
    if backend == "auto":
        return "cpp" if load_cpp_extension() is not None else "torch"
    return backend


# ---------------------------------------------------------------------------------------------------------------------
# Kernels behind the custom op. All take contiguous tensors, locations and weights in the compute dtype (float32 or
# float64), value in that dtype or bfloat16, and the flat [h0, w0, h1, w1, ...] spatial shapes.


def _build_level_tables(spatial_shapes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # (levels, 2) as (height, width), and (levels,) first sequence index of each level
    shapes = torch.tensor(spatial_shapes, dtype=torch.int64).view(-1, 2)
    starts = torch.zeros(shapes.shape[0], dtype=torch.int64)
    starts[1:] = (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]
    return shapes, starts


# Shapes repeat for every layer and call, and the kernels only read the tables.
_level_tables_cached = functools.lru_cache(maxsize=64)(_build_level_tables)


def _level_tables(spatial_shapes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        # Traced graphs bake the tables in as constants; the cache would only earn a Dynamo warning.
        return _build_level_tables(tuple(spatial_shapes))
    return _level_tables_cached(tuple(spatial_shapes))


def _threads_for(samples: int) -> int:
    # Waking a second thread costs more than it saves on tiny problems, much more on an oversubscribed machine.
    return 1 if samples < _MIN_SAMPLES_PER_THREAD else torch.get_num_threads()


def _cpp_forward(
    value: torch.Tensor, spatial_shapes: list[int], sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> torch.Tensor:
    kernels = _require_kernels()
    batch, sequence, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes, starts = _level_tables(spatial_shapes)
    # (batch, queries, heads * head_dim) in the compute dtype (float32 for a bfloat16 value)
    output = sampling_locations.new_empty(batch, queries, heads * head_dim)
    kernels.forward[value.dtype](
        value.data_ptr(),
        shapes.data_ptr(),
        starts.data_ptr(),
        sampling_locations.data_ptr(),
        attention_weights.data_ptr(),
        output.data_ptr(),
        batch,
        sequence,
        queries,
        heads,
        head_dim,
        levels,
        points,
        _threads_for(batch * queries * heads * levels * points),
    )
    return output


def _cpp_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = _require_kernels()
    batch, sequence, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes, starts = _level_tables(spatial_shapes)
    threads = _threads_for(batch * queries * heads * levels * points)
    # The backward kernel parallelises over (batch, heads); with fewer of those than threads, queries are split
    # into chunks that each accumulate into a private copy of grad_value, summed afterwards.
    chunks = max(1, -(-threads // max(1, batch * heads)))
    # Heads-first rows make the scatter ~20% cheaper, which pays for transposing value and grad_value only when the
    # queries sample at least as many points as there are value rows (encoder yes, decoder no).
    heads_first = queries * levels * points >= sequence
    # (batch, heads, sequence, head_dim) or (batch, sequence, heads, head_dim)
    value_layout = value.transpose(1, 2).contiguous() if heads_first else value
    # (chunks, <value layout>) in the compute dtype; the kernel zeroes it before accumulating
    grad_value_layout = sampling_locations.new_empty(chunks, *value_layout.shape)
    grad_locations = torch.empty_like(sampling_locations)
    grad_weights = torch.empty_like(attention_weights)
    kernels.backward[value.dtype](
        value_layout.data_ptr(),
        shapes.data_ptr(),
        starts.data_ptr(),
        sampling_locations.data_ptr(),
        attention_weights.data_ptr(),
        grad_output.data_ptr(),
        grad_value_layout.data_ptr(),
        grad_locations.data_ptr(),
        grad_weights.data_ptr(),
        batch,
        sequence,
        queries,
        heads,
        head_dim,
        levels,
        points,
        chunks,
        int(heads_first),
        threads,
    )
    grad_value = grad_value_layout[0] if chunks == 1 else grad_value_layout.sum(0)
    if heads_first:
        grad_value = grad_value.transpose(1, 2)
    # (batch, sequence, heads, head_dim) contiguous, in value's dtype (the fake implementation promises both)
    grad_value = grad_value.to(value.dtype).contiguous()
    return grad_value, grad_locations, grad_weights


def _axis(
    coordinate: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split pixel coordinates along one axis into the two neighbouring indices (clamped into the map) and their
    bilinear weights, zero where the neighbour is outside the map. Differentiable in ``coordinate``."""
    dtype = coordinate.dtype
    # Clamped to [-2, size + 1]: beyond that both neighbours are outside the map whatever the exact value, and the
    # clamp keeps far-away, infinite or NaN points from overflowing the integer cast or making the fraction NaN.
    coordinate = torch.nan_to_num(coordinate, nan=-2.0).clamp(min=-2.0).minimum((size + 1).to(dtype))
    floor = coordinate.detach().floor()
    # d(fraction)/d(coordinate) = 1, so autograd reproduces grid_sample's gradient, including at integer positions.
    fraction = coordinate - floor
    low = floor.long()
    weight_low = (1 - fraction) * ((low >= 0) & (low < size)).to(dtype)
    weight_high = fraction * ((low >= -1) & (low < size - 1)).to(dtype)
    # Out-of-map neighbours get an in-range index; their zero weight cancels them (and their gradient).
    return low.clamp(min=0).minimum(size - 1), (low + 1).clamp(min=0).minimum(size - 1), weight_low, weight_high


def _torch_msda(
    value: torch.Tensor, spatial_shapes: list[int], sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch path, differentiable by autograd: every bilinear corner becomes a row index into
    ``value.reshape(batch * sequence * heads, head_dim)`` and a weight (bilinear x attention), and
    ``F.embedding_bag(mode="sum")`` gathers and sums them without materialising one row per corner."""
    batch, sequence, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = sampling_locations.dtype
    shapes, starts = _level_tables(spatial_shapes)
    # (levels, 1) so they broadcast against (batch, queries, heads, levels, points)
    height = shapes[:, :1]
    width = shapes[:, 1:]
    # (batch, queries, heads, levels, points) each
    x_low, x_high, weight_x0, weight_x1 = _axis(sampling_locations[..., 0] * width.to(dtype) - 0.5, width)
    y_low, y_high, weight_y0, weight_y1 = _axis(sampling_locations[..., 1] * height.to(dtype) - 0.5, height)
    # Row = (b * sequence + start + y * width + x) * heads + h; the (b, level, h) part is shared by all corners.
    batch_index = torch.arange(batch).view(batch, 1, 1, 1, 1)
    head_index = torch.arange(heads).view(1, 1, heads, 1, 1)
    # (batch, 1, heads, levels, 1)
    base = (batch_index * sequence + starts.view(levels, 1)) * heads + head_index
    row_low = base + y_low * (width * heads)
    row_high = base + y_high * (width * heads)
    x_low = x_low * heads
    x_high = x_high * heads
    # (batch * queries * heads, levels * points * 4), corner order (x0, y0), (x1, y0), (x0, y1), (x1, y1)
    rows = torch.stack((row_low + x_low, row_low + x_high, row_high + x_low, row_high + x_high), dim=-1)
    rows = rows.view(batch * queries * heads, levels * points * 4)
    attention_y0 = attention_weights * weight_y0
    attention_y1 = attention_weights * weight_y1
    corner_weights = torch.stack(
        (attention_y0 * weight_x0, attention_y0 * weight_x1, attention_y1 * weight_x0, attention_y1 * weight_x1), dim=-1
    ).view(rows.shape)
    value_rows = value.reshape(-1, head_dim).to(dtype)
    output = F.embedding_bag(rows, value_rows, per_sample_weights=corner_weights, mode="sum")
    return output.view(batch, queries, heads * head_dim)


def _torch_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Only reached inside the custom op (a traced graph whose kernel turned out not to build at run time), where the
    # autograd dispatch key is already gone: torch.func.vjp brings its own.
    def function(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return _torch_msda(value, spatial_shapes, locations, weights)

    # vjp returns (output, pullback) without has_aux; its annotation is the union with the has_aux triple.
    pullback = torch.func.vjp(function, value, sampling_locations, attention_weights)[1]
    return pullback(grad_output)


# ---------------------------------------------------------------------------------------------------------------------
# Custom op: opaque to torch.compile, autograd via register_autograd.


@torch.library.custom_op("ddetr::msda_cpu_forward", mutates_args=(), device_types="cpu")
def _forward_op(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    forward = _cpp_forward if _resolve_backend(backend) == "cpp" else _torch_msda
    return forward(value, spatial_shapes, sampling_locations, attention_weights)


@_forward_op.register_fake
def _forward_fake(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    return sampling_locations.new_empty(batch, sampling_locations.shape[1], heads * head_dim)


@torch.library.custom_op("ddetr::msda_cpu_backward", mutates_args=(), device_types="cpu")
def _backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backward = _cpp_backward if _resolve_backend(backend) == "cpp" else _torch_backward
    return backward(grad_output, value, spatial_shapes, sampling_locations, attention_weights)


@_backward_op.register_fake
def _backward_fake(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    value, spatial_shapes, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes = spatial_shapes
    ctx.backend = backend


def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = _backward_op(
        grad_output.contiguous(), value, ctx.spatial_shapes, sampling_locations, attention_weights, ctx.backend
    )
    return grad_value, None, grad_locations, grad_weights, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _CppFunction(torch.autograd.Function):
    """The compiled kernel for eager calls: same as the custom op, without the op dispatcher, whose first call imports
    torch._dynamo (about a second before the first inference of an app that never compiles) and which adds ~10 us
    per call."""

    @staticmethod
    def forward(
        ctx: Any,
        value: torch.Tensor,
        spatial_shapes: list[int],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.spatial_shapes = spatial_shapes
        return _cpp_forward(value, spatial_shapes, sampling_locations, attention_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        value, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = _cpp_backward(
            grad_output.contiguous(), value, ctx.spatial_shapes, sampling_locations, attention_weights
        )
        return grad_value, None, grad_locations, grad_weights


# ---------------------------------------------------------------------------------------------------------------------
# Public entry point


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations), ("weights", attention_weights)):
        if tensor.device.type != "cpu":
            raise ValueError(f"{name} is on {tensor.device}; this implementation is CPU-only")


def ms_deform_attn_cpu(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention on CPU, same contract and numerics as ``ms_deform_attn_reference``.

    ``backend``: ``"auto"`` uses the compiled kernel when it builds, else the pure-PyTorch path for inference and
    the reference when gradients are needed; ``"cpp"`` forces the compiled kernel (RuntimeError if unavailable);
    ``"torch"`` forces the pure-PyTorch path. Returns (batch, queries, heads * head_dim) in the dtype of ``value``.
    """
    original_dtype = value.dtype
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    shapes = [(int(height), int(width)) for height, width in spatial_shapes]
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    # float64 stays exact for gradcheck; everything else (bf16, fp16, fp32) is sampled in float32.
    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if value.dtype != torch.bfloat16:
        # bfloat16 values go to the op as they are: the compiled kernel reads them directly, which beats converting
        # the whole value tensor when only a few hundred decoder queries sample it.
        value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)
    flat_shapes = [size for shape in shapes for size in shape]
    if backend == "auto" and not torch.compiler.is_compiling():
        # Eager calls learn now whether the compiled kernel exists (the first one builds it). Compiled graphs read
        # the outcome if it is known and otherwise leave the choice to the op at run time.
        load_cpp_extension()
    kernel_missing = _load_attempted and _kernels is None
    if backend == "auto" and kernel_missing and _needs_grad(value, sampling_locations, attention_weights):
        # Without the compiled kernel, training is faster on the grid_sample reference: embedding_bag's backward
        # sorts all corner indices and loses to grid_sample's fused backward (see benchmarks/msda.py).
        output = ms_deform_attn_reference(value.to(compute_dtype), shapes, sampling_locations, attention_weights)
    elif backend == "torch" or (backend == "auto" and kernel_missing):
        output = _torch_msda(value, flat_shapes, sampling_locations, attention_weights)
    elif torch.compiler.is_compiling():
        arguments = (value.contiguous(), flat_shapes, sampling_locations.contiguous(), attention_weights.contiguous())
        output = _forward_op(*arguments, backend)
    else:
        _require_kernels()
        arguments = (value.contiguous(), flat_shapes, sampling_locations.contiguous(), attention_weights.contiguous())
        output = _CppFunction.apply(*arguments)
    return output.to(original_dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


register_implementation("cpu", ms_deform_attn_cpu)
