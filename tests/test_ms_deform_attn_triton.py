"""Triton deformable-attention kernels vs the grid_sample reference, on CPU through Triton's interpreter.

Why a subprocess: triton decides whether ``@triton.jit`` compiles or interprets when a kernel is *decorated*, from
``TRITON_INTERPRET``. In the pytest process triton (and our kernels module) may already have been imported without
it, so setting the variable here would be silently ignored; instead every interpreter check runs once in a fresh
``python -m tests.test_ms_deform_attn_triton`` with ``TRITON_INTERPRET=1`` in its environment, which prints the
measured errors as JSON, and the tests below assert on them. Shapes are tiny because the interpreter executes every
kernel operation in numpy (about 0.1-1 s per launch).

A second worker (``--compile``, without the variable) compiles the kernels ahead of time for sm_80/sm_90 cubins,
which needs no GPU and catches what only the GPU compiler rejects; both workers run concurrently. The import-laziness
and fallback checks also run in subprocesses, for a clean ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr.ops import select_implementation
from ddetr.ops.ms_deform_attn import ms_deform_attn_reference
from ddetr.ops.ms_deform_attn_triton import ms_deform_attn_triton

REPOSITORY = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install -r requirements-dev.txt on Linux)"
)
_RESULT_MARKER = "MSDA_TRITON_RESULTS "
_WORKER_TIMEOUT_S = 600

# Several levels with odd sizes (and a 1x1 level), points drawn up to 30% outside the map.
SHAPES = [(5, 7), (3, 5), (2, 3), (1, 1)]
# name -> (value dtype, batch, heads, head_dim, queries, points)
CASES = {
    "fp32": (torch.float32, 2, 2, 8, 5, 3),
    "bf16": (torch.bfloat16, 2, 2, 8, 5, 3),
    "fp16": (torch.float16, 2, 2, 8, 5, 3),
    # head_dim not a power of two: the kernels pad the channel block and mask.
    "fp32_head_dim_6": (torch.float32, 1, 3, 6, 4, 2),
}
QUANTITIES = ("output", "grad_value", "grad_locations", "grad_weights")
# (absolute, relative) tolerances. fp32: accumulation-order noise. bf16/fp16: the output and grad_value are rounded
# once to the value dtype, while location and weight gradients are computed in fp32 from exactly representable
# low-precision values and must match fp32 closely. Round-to-nearest would need a relative 2**-9 (bf16) / 2**-11
# (fp16), but the interpreter converts float32 to bfloat16 by truncation (up to one ulp, 2**-7 relative), whereas
# compiled Triton rounds to nearest even.
_FP32_LEVEL = {"grad_locations": (1e-4, 1e-5), "grad_weights": (1e-5, 1e-5)}
TOLERANCES = {
    "fp32": dict.fromkeys(QUANTITIES, (1e-5, 1e-5)),
    "fp32_head_dim_6": dict.fromkeys(QUANTITIES, (1e-5, 1e-5)),
    "bf16": {"output": (1e-3, 2**-7), "grad_value": (1e-3, 2**-7), **_FP32_LEVEL},
    "fp16": {"output": (1e-3, 2**-10), "grad_value": (1e-3, 2**-10), **_FP32_LEVEL},
}


# ---------------------------------------------------------------------------------------------------------------------
# Worker: runs under TRITON_INTERPRET=1 in a subprocess and reports the errors.


def _random_inputs(
    dtype: torch.dtype, batch: int, heads: int, head_dim: int, queries: int, points: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sequence = sum(height * width for height, width in SHAPES)
    levels = len(SHAPES)
    # (batch, sequence, heads, head_dim)
    value = torch.randn(batch, sequence, heads, head_dim, generator=generator).to(dtype)
    # (batch, queries, heads, levels, points, 2): up to 0.3 beyond each side, so some points are partly or wholly off
    # the map
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * 1.6 - 0.3
    # (batch, queries, heads, levels, points)
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator)
    # (batch, queries, heads * head_dim)
    grad_output = torch.randn(batch, queries, heads * head_dim, generator=generator).to(dtype)
    return value, locations, weights, grad_output


def _errors(
    value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor, grad_output: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantity: (|triton - reference|, reference), the reference run in float32 on the same (rounded) values."""
    gradients = {}
    for name, function, dtype in (
        ("triton", ms_deform_attn_triton, value.dtype),
        ("reference", ms_deform_attn_reference, torch.float32),
    ):
        leaves = [
            value.to(dtype).requires_grad_(True),
            locations.requires_grad_(True),
            weights.requires_grad_(True),
        ]
        output = function(leaves[0], SHAPES, leaves[1], leaves[2])
        grads = torch.autograd.grad(output, leaves, grad_output.to(output.dtype))
        gradients[name] = [output.detach().float(), *(grad.float() for grad in grads)]
    return {
        quantity: ((actual - expected).abs(), expected)
        for quantity, actual, expected in zip(QUANTITIES, gradients["triton"], gradients["reference"])
    }


def _worker() -> dict[str, object]:
    from ddetr.ops.ms_deform_attn_triton import triton_kernels_interpreted

    report: dict[str, object] = {}
    for case, (dtype, batch, heads, head_dim, queries, points) in CASES.items():
        inputs = _random_inputs(dtype, batch, heads, head_dim, queries, points, seed=len(report))
        case_report = {}
        for quantity, (error, expected) in _errors(*inputs).items():
            absolute, relative = TOLERANCES[case][quantity]
            # > 1 means some element is outside atol + rtol * |expected|.
            worst = (error / (absolute + relative * expected.abs())).max().item()
            case_report[quantity] = {"max_abs_error": error.max().item(), "worst_tolerance_ratio": worst}
        report[case] = case_report
    report["interpreted"] = triton_kernels_interpreted()

    # Points on the map's outer edges (0 and 1, half a pixel outside the outermost centres), wholly off the map, far
    # away and non-finite. Not exact pixel centres: bilinear sampling has a kink there, and the reference's own
    # rounding of (2 * location - 1) picks either one-sided derivative.
    value, locations, weights, grad_output = _random_inputs(torch.float32, 1, 2, 4, 6, 2, seed=100)
    infinity = float("inf")
    special = torch.tensor([0.0, 1.0, -0.3, 1.3, 1e30, -1e30, infinity, -infinity, float("nan")])
    flat = locations.view(-1)
    flat[: special.numel()] = special
    flat[-special.numel() :] = special.flip(0)
    # Off-map samples contribute nothing in the kernels (like the original CUDA op), whereas grid_sample turns inf and
    # NaN into NaN: compare against the reference with those coordinates moved far away.
    finite_locations = torch.where(locations.isfinite(), locations, torch.full_like(locations, 1e30))
    leaves = [value.requires_grad_(True), locations.requires_grad_(True), weights.requires_grad_(True)]
    output = ms_deform_attn_triton(leaves[0], SHAPES, leaves[1], leaves[2])
    triton_grads = torch.autograd.grad(output, leaves, grad_output)
    reference_leaves = [
        value.detach().requires_grad_(True),
        finite_locations.requires_grad_(True),
        weights.detach().requires_grad_(True),
    ]
    reference_output = ms_deform_attn_reference(reference_leaves[0], SHAPES, reference_leaves[1], reference_leaves[2])
    reference_grads = torch.autograd.grad(reference_output, reference_leaves, grad_output)
    special_errors = {"output": (output - reference_output).abs().max().item()}
    for quantity, actual, expected in zip(QUANTITIES[1:], triton_grads, reference_grads):
        special_errors[quantity] = (actual - expected).abs().max().item()
    special_errors["all_finite"] = all(tensor.isfinite().all().item() for tensor in (output, *triton_grads))
    report["special_locations"] = special_errors

    # Only locations and weights need gradients: the kernel skips the value scatter entirely.
    value, locations, weights, grad_output = _random_inputs(torch.float32, 1, 2, 4, 3, 2, seed=200)
    triton_grads = torch.autograd.grad(
        ms_deform_attn_triton(value, SHAPES, *(leaf.requires_grad_(True) for leaf in (locations, weights))),
        (locations, weights),
        grad_output,
    )
    reference_grads = torch.autograd.grad(
        ms_deform_attn_reference(value, SHAPES, locations, weights), (locations, weights), grad_output
    )
    report["no_value_grad"] = max((a - b).abs().max().item() for a, b in zip(triton_grads, reference_grads))

    # float64 gradcheck against finite differences, on a very small problem (each evaluation is an interpreter launch).
    generator = torch.Generator().manual_seed(300)
    shapes = [(2, 3), (1, 2)]
    value = torch.randn(1, 8, 1, 2, dtype=torch.float64, generator=generator).requires_grad_(True)
    # (batch, queries, heads, levels, points, 2), kept away from pixel-grid lines where bilinear has kinks
    locations = (torch.rand(1, 2, 1, 2, 1, 2, dtype=torch.float64, generator=generator) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(1, 2, 1, 2, 1, dtype=torch.float64, generator=generator).requires_grad_(True)
    report["gradcheck_fp64"] = torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_triton(v, shapes, loc, w), (value, locations, weights), raise_exception=False
    )
    return report


# (GPU architecture, value dtype, head_dim) compiled ahead of time without a GPU: the interpreter accepts some programs
# the GPU compiler rejects, so this catches GPU-only compile errors in the kernels.
COMPILE_TARGETS = [(90, "fp32", 32), (80, "bf16", 32), (90, "fp64", 6)]


def _compile_worker() -> dict[str, str]:
    """Compile both kernels for each of COMPILE_TARGETS to a cubin; "ok" or the error per target."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from ddetr.ops import _ms_deform_attn_triton_kernels as kernels
    except ImportError as error:
        return {"skipped": f"triton's compiler API is not importable here: {error!r}"}
    results: dict[str, str] = {}
    for arch, value_type, head_dim in COMPILE_TARGETS:
        compute_type = "fp64" if value_type == "fp64" else "fp32"
        meta = {"HEADS": 8, "HEAD_DIM": head_dim, "LEVELS": 4, "POINTS": 4, "BLOCK_ROWS": 64}
        meta["BLOCK_DIM"] = triton.next_power_of_2(head_dim)
        scalars = {"sequence": "i32", "queries": "i32", "size_class": "i32"}
        forward_types = {"value_ptr": value_type, "output_ptr": value_type}
        backward_types = {"value_ptr": value_type, "grad_output_ptr": value_type}
        for name in ("locations_ptr", "weights_ptr", "grad_value_ptr", "grad_locations_ptr", "grad_weights_ptr"):
            backward_types[name] = compute_type
        for name in ("locations_ptr", "weights_ptr"):
            forward_types[name] = compute_type
        for kernel, types, extra in (
            (kernels._forward_kernel, forward_types, {}),
            (kernels._backward_kernel, backward_types, {"VALUE_GRAD": True}),
        ):
            function = kernel.fn
            constants = {**meta, **extra}
            signature = {}
            for argument in function.arg_names:
                if argument in constants:
                    signature[argument] = "constexpr"
                elif argument in scalars:
                    signature[argument] = scalars[argument]
                else:
                    signature[argument] = "*" + types.get(argument, "i32")
            label = f"{function.__name__} sm_{arch} {value_type} head_dim {head_dim}"
            try:
                source = ASTSource(fn=function, signature=signature, constexprs=constants)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
                results[label] = "ok" if compiled.asm.get("cubin") else "no cubin produced"
            except Exception as error:  # reported to the test, which shows it
                results[label] = f"{type(error).__name__}: {error}"[:2000]
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def _environment(interpret: bool | None) -> dict[str, str]:
    """This process's environment with the repository importable and TRITON_INTERPRET set (True), unset (False) or
    inherited (None)."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    if interpret:
        environment["TRITON_INTERPRET"] = "1"
    elif interpret is False:
        environment.pop("TRITON_INTERPRET", None)
    return environment


def _run_python(code: str) -> str:
    command = [sys.executable, "-c", code]
    result = subprocess.run(
        command, cwd=REPOSITORY, env=_environment(None), capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S
    )
    if result.returncode != 0:
        pytest.fail(f"subprocess {command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def worker_reports() -> dict[str, dict]:
    """Run the interpreter worker and the compile worker concurrently (one core each) and parse their reports."""
    module = [sys.executable, "-m", "tests.test_ms_deform_attn_triton"]
    processes = {
        "interpreter": subprocess.Popen(
            module, cwd=REPOSITORY, env=_environment(True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
        "compile": subprocess.Popen(
            [*module, "--compile"],
            cwd=REPOSITORY,
            env=_environment(False),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }
    reports = {}
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=_WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith(_RESULT_MARKER)]
        if process.returncode != 0 or not lines:
            pytest.fail(f"{name} worker failed ({process.returncode}):\n{stdout}\n{stderr[-4000:]}")
        reports[name] = json.loads(lines[-1][len(_RESULT_MARKER) :])
    return reports


@pytest.fixture(scope="module")
def interpreter_report(worker_reports: dict[str, dict]) -> dict:
    return worker_reports["interpreter"]


@requires_triton
def test_kernels_ran_in_the_interpreter(interpreter_report: dict) -> None:
    assert interpreter_report["interpreted"] is True


@requires_triton
@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(interpreter_report: dict, case: str, quantity: str) -> None:
    measured = interpreter_report[case][quantity]
    assert measured["worst_tolerance_ratio"] <= 1.0, f"{case} {quantity}: {measured}"


@requires_triton
def test_special_locations(interpreter_report: dict) -> None:
    report = interpreter_report["special_locations"]
    assert report.pop("all_finite") is True, "non-finite locations must contribute nothing, not NaN"
    for quantity, error in report.items():
        assert error <= 1e-5, f"{quantity}: {error}"


@requires_triton
def test_gradients_without_value_gradient(interpreter_report: dict) -> None:
    assert interpreter_report["no_value_grad"] <= 1e-5


@requires_triton
def test_gradcheck_float64(interpreter_report: dict) -> None:
    assert interpreter_report["gradcheck_fp64"] is True


@requires_triton
def test_kernels_compile_for_gpus(worker_reports: dict[str, dict]) -> None:
    results = dict(worker_reports["compile"])
    if "skipped" in results:
        pytest.skip(results["skipped"])
    failures = {label: outcome for label, outcome in results.items() if outcome != "ok"}
    assert not failures, failures
    assert len(results) == 2 * len(COMPILE_TARGETS)


@requires_triton
def test_cuda_dispatch_selects_triton() -> None:
    # Registration must not depend on a CUDA device being present.
    assert select_implementation("cuda") is ms_deform_attn_triton
    assert select_implementation("cuda", "reference") is ms_deform_attn_reference


def test_import_does_not_load_triton() -> None:
    code = (
        "import sys, ddetr.ops, ddetr.ops.ms_deform_attn_triton\n"
        "print('ddetr.ops._ms_deform_attn_triton_kernels' in sys.modules)\n"
    )
    assert _run_python(code).strip() == "False"


def test_without_triton_cuda_falls_back_to_reference() -> None:
    # A None entry in sys.modules makes `import triton` fail and find_spec report it missing, as if uninstalled.
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "from ddetr.ops import select_implementation, ms_deform_attn_reference\n"
        "print(select_implementation('cuda') is ms_deform_attn_reference)\n"
    )
    assert _run_python(code).strip() == "True"


def test_unloadable_kernels_fall_back_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddetr.ops import ms_deform_attn_triton as module

    # As after a failed import of the kernels (broken triton install).
    monkeypatch.setattr(module, "_load_attempted", True)
    monkeypatch.setattr(module, "_kernels", None)
    value, locations, weights, _ = _random_inputs(torch.bfloat16, 1, 2, 4, 3, 2, seed=400)
    output = ms_deform_attn_triton(value, SHAPES, locations, weights)
    expected = ms_deform_attn_reference(value.float(), SHAPES, locations, weights).to(torch.bfloat16)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("value_shape", "location_shape", "weight_shape", "shapes", "message"),
    [
        ((1, 6, 2, 4), (1, 3, 2, 1, 2), (1, 3, 2, 1, 2), [(2, 3)], "sampling_locations must be"),
        ((1, 6, 2, 4), (1, 3, 3, 1, 2, 2), (1, 3, 3, 1, 2), [(2, 3)], "disagrees with value"),
        ((1, 6, 2, 4), (1, 3, 2, 1, 2, 2), (1, 3, 2, 1, 3), [(2, 3)], "attention_weights must have shape"),
        ((1, 6, 2, 4), (1, 3, 2, 1, 2, 2), (1, 3, 2, 1, 2), [(2, 3), (1, 1)], "spatial shapes given"),
        ((1, 7, 2, 4), (1, 3, 2, 1, 2, 2), (1, 3, 2, 1, 2), [(2, 3)], "do not cover"),
        ((6, 2, 4), (1, 3, 2, 1, 2, 2), (1, 3, 2, 1, 2), [(2, 3)], "value must be"),
    ],
)
def test_bad_inputs_raise_value_error(
    value_shape: tuple, location_shape: tuple, weight_shape: tuple, shapes: list, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ms_deform_attn_triton(torch.zeros(value_shape), shapes, torch.zeros(location_shape), torch.zeros(weight_shape))


def test_integer_value_rejected() -> None:
    with pytest.raises(ValueError, match=r"value must be (float32|a floating-point)"):
        ms_deform_attn_triton(
            torch.zeros(1, 6, 2, 4, dtype=torch.int32),
            [(2, 3)],
            torch.zeros(1, 3, 2, 1, 2, 2),
            torch.zeros(1, 3, 2, 1, 2),
        )


@requires_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="CPU tensors are valid under the interpreter")
def test_cpu_tensors_rejected_without_interpreter() -> None:
    with pytest.raises(ValueError, match="need GPU tensors"):
        ms_deform_attn_triton(
            torch.zeros(1, 6, 2, 4), [(2, 3)], torch.zeros(1, 3, 2, 1, 2, 2), torch.zeros(1, 3, 2, 1, 2)
        )


def test_benchmark_help_and_missing_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import triton_kernels as bench_triton

    with pytest.raises(SystemExit) as exit_info:
        bench_triton.main(["--help"])
    assert exit_info.value.code == 0
    assert "reference" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert bench_triton.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err


if __name__ == "__main__":
    # Worker modes (see the module docstring): interpreter checks need TRITON_INTERPRET=1 in the environment;
    # --compile compiles the kernels for GPUs and must run without it.
    if sys.argv[1:] == ["--compile"]:
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("--compile must run without TRITON_INTERPRET=1")
        print(_RESULT_MARKER + json.dumps(_compile_worker()))
    elif os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 in the environment (or pass --compile)")
    else:
        print(_RESULT_MARKER + json.dumps(_worker()))
