"""Kernel choices made by measurement: the faster candidate wins, the first stored choice is kept by every process,
DDETR_KERNELS overrides, and both linear choices give F.linear's results."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddetr.model.backbone import ResNet
from ddetr.ops.conv import CONV_RELU_OPTIONS, conv2d
from ddetr.ops.linear import _HAS_ONEDNN_LINEAR, LINEAR_OPTIONS, linear, linear_choice, onednn_dtype
from ddetr.runtime import kernel_choice
from ddetr.runtime.kernel_choice import CACHE_FILE, Decision, choose, overrides

DECISION = Decision(family="demo", mode="fp32-inference", options=("first", "second"))


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDETR_KERNELS", raising=False)
    kernel_choice.forget()
    yield
    kernel_choice.forget()


def fixed_timer(seconds: Mapping[str, float], calls: list[int] | None = None) -> Callable[..., Mapping[str, float]]:
    def timer(candidates: Mapping[str, Callable[[], object]]) -> Mapping[str, float]:
        assert set(candidates) == set(seconds)
        if calls is not None:
            calls.append(1)
        return seconds

    return timer


def no_candidates() -> dict[str, Callable[[], object]]:
    return {"first": lambda: None, "second": lambda: None}


def test_the_faster_candidate_is_chosen_and_stored(tmp_path: Path) -> None:
    choice = choose(DECISION, no_candidates, folder=tmp_path, timer=fixed_timer({"first": 2.0, "second": 1.0}))
    assert (choice.option, choice.source) == ("second", "measured")
    stored = json.loads((tmp_path / CACHE_FILE).read_text())
    (entry,) = stored.values()
    assert entry == {"option": "second", "seconds": {"first": 2.0, "second": 1.0}}

    kernel_choice.forget()
    calls: list[int] = []
    again = choose(DECISION, no_candidates, folder=tmp_path, timer=fixed_timer({"first": 0.1, "second": 9.0}, calls))
    assert (again.option, again.source, calls) == ("second", "cache", [])


def test_a_choice_is_measured_once_per_process(tmp_path: Path) -> None:
    calls: list[int] = []
    timer = fixed_timer({"first": 1.0, "second": 2.0}, calls)
    for _ in range(3):
        assert choose(DECISION, no_candidates, folder=tmp_path, timer=timer).option == "first"
    assert calls == [1]


def test_decisions_are_kept_per_thread_count(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = choose(DECISION, no_candidates, folder=tmp_path, timer=fixed_timer({"first": 1.0, "second": 2.0}))
        torch.set_num_threads(2)
        two = choose(DECISION, no_candidates, folder=tmp_path, timer=fixed_timer({"first": 2.0, "second": 1.0}))
    finally:
        torch.set_num_threads(threads)
    assert (one.option, two.option) == ("first", "second")
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_an_earlier_stored_choice_wins_over_a_new_measurement(tmp_path: Path) -> None:
    """Another process stored 'first' while this one measured 'second' faster: this one adopts 'first'."""

    def timer(candidates: Mapping[str, Callable[[], object]]) -> Mapping[str, float]:
        key = f"{kernel_choice.machine_key()}/{DECISION.key}"
        (tmp_path / CACHE_FILE).write_text(json.dumps({key: {"option": "first", "seconds": {}}}))
        return {"first": 5.0, "second": 1.0}

    assert choose(DECISION, no_candidates, folder=tmp_path, timer=timer).option == "first"


def _choose_in_child(folder: str, favoured: str, results: multiprocessing.Queue) -> None:
    kernel_choice.forget()
    seconds = {"first": 1.0, "second": 2.0} if favoured == "first" else {"first": 2.0, "second": 1.0}
    results.put(choose(DECISION, no_candidates, folder=Path(folder), timer=fixed_timer(seconds)).option)


def test_processes_that_measure_differently_all_run_the_same_choice(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    children = [
        context.Process(target=_choose_in_child, args=(str(tmp_path), ("first", "second")[i % 2], results))
        for i in range(6)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    chosen = {results.get(timeout=10) for _ in children}
    assert len(chosen) == 1


def test_a_damaged_cache_file_is_measured_again_and_rewritten(tmp_path: Path) -> None:
    (tmp_path / CACHE_FILE).write_text("{not json")
    choice = choose(DECISION, no_candidates, folder=tmp_path, timer=fixed_timer({"first": 1.0, "second": 2.0}))
    assert (choice.option, choice.source) == ("first", "measured")
    assert json.loads((tmp_path / CACHE_FILE).read_text())


def test_a_candidate_that_cannot_run_leaves_the_reference_option(tmp_path: Path) -> None:
    def broken() -> dict[str, Callable[[], object]]:
        def refused() -> object:
            raise RuntimeError("could not create a primitive descriptor")

        return {"first": refused, "second": lambda: None}

    choice = choose(DECISION, broken, folder=tmp_path)
    assert choice.option == "second" and choice.source.startswith("fallback")
    assert not (tmp_path / CACHE_FILE).exists()


def test_override_wins_and_is_not_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_KERNELS", "other=x, demo=second")
    calls: list[int] = []
    choice = choose(DECISION, no_candidates, folder=tmp_path, timer=fixed_timer({"first": 1, "second": 2}, calls))
    assert (choice.option, choice.source, calls) == ("second", "override", [])
    assert not (tmp_path / CACHE_FILE).exists()


@pytest.mark.parametrize(
    ("value", "message"), [("demo=third", "choose one of"), ("demo", "not family=option"), ("=x", "family=option")]
)
def test_bad_overrides_are_refused_by_name(value: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_KERNELS", value)
    with pytest.raises(ValueError, match=message):
        choose(DECISION, no_candidates, folder=Path("/nonexistent"))


def test_overrides_parse() -> None:
    assert overrides({"DDETR_KERNELS": " linear=aten ,conv_layout=contiguous,"}) == {
        "linear": "aten",
        "conv_layout": "contiguous",
    }
    assert overrides({}) == {}


def test_real_measurement_times_both_linear_libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_CACHE_DIR", str(tmp_path))
    if not _HAS_ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN linear")
    choice = linear_choice(torch.float32)
    assert choice.source == "measured" and set(choice.seconds) == set(LINEAR_OPTIONS)
    assert choice.option == min(choice.seconds, key=choice.seconds.__getitem__)
    assert all(seconds > 0 for seconds in choice.seconds.values())


@pytest.mark.parametrize("option", LINEAR_OPTIONS)
def test_both_linear_choices_match_f_linear(option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_KERNELS", f"linear={option}")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 24, generator=generator)
    weight = torch.randn(40, 24, generator=generator)
    bias = torch.randn(40, generator=generator)
    expected = F.relu(F.linear(x.double(), weight.double(), bias.double()))
    with torch.no_grad():
        uses_onednn = onednn_dtype(x, weight, bias) is not None
        torch.testing.assert_close(linear(x, weight, bias, relu=True).double(), expected, rtol=1e-5, atol=1e-5)
    assert uses_onednn == (option == "onednn" and _HAS_ONEDNN_LINEAR)

    # Training: gradients of either path equal float64 autograd.
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    linear(*leaves, relu=True).square().sum().backward()
    reference = [t.double().detach().requires_grad_() for t in (x, weight, bias)]
    F.relu(F.linear(*reference)).square().sum().backward()
    for leaf, expected_leaf in zip(leaves, reference, strict=True):
        torch.testing.assert_close(leaf.grad.double(), expected_leaf.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", CONV_RELU_OPTIONS)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("residual_layout", [None, torch.channels_last, torch.contiguous_format])
def test_both_conv_relu_choices_match_f_conv2d(
    option: str, autocast: bool, residual_layout: torch.memory_format | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """relu(conv(x) + bias [+ residual]), the residual in either layout (a shortcut may be either)."""
    monkeypatch.setenv("DDETR_KERNELS", f"conv_relu={option}")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 13, 17, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(12, 8, 3, 3, generator=generator) / 8
    bias = torch.randn(12, generator=generator)
    residual = None
    expected = F.conv2d(x.double(), weight.double(), bias.double(), 2, 1)
    if residual_layout is not None:
        residual = torch.randn(2, 12, 7, 9, generator=generator).contiguous(memory_format=residual_layout)
        expected = expected + residual.double()
    expected = F.relu(expected)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if residual is not None and autocast:
            residual = residual.bfloat16()  # as a shortcut computed under autocast is
        out = conv2d(x, weight, bias, stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1, relu=True,
                     residual=residual)  # fmt: skip
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    tolerance = 3e-2 if autocast else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_fused_and_unfused_resnets_give_the_same_features(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = dict(layer_type="bottleneck", depths=(1, 1, 1, 1), stem_width=16, stage_widths=(32, 64, 96, 128))
    torch.manual_seed(0)
    model = ResNet(**fields).eval()
    images = torch.randn(1, 3, 70, 94)
    features = {}
    for option in CONV_RELU_OPTIONS:
        monkeypatch.setenv("DDETR_KERNELS", f"conv_relu={option}")
        with torch.inference_mode():
            features[option] = model(images)
    for fused, unfused in zip(features["fused"], features["unfused"], strict=True):
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    # Fused, the residual sums and ReLUs of the blocks are in oneDNN's epilogues: no separate pass runs.
    monkeypatch.setenv("DDETR_KERNELS", "conv_relu=fused")
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(images)
    ran = {event.key for event in profile.key_averages()}
    assert "mkldnn::_convolution_pointwise" in ran
    assert not ran & {"aten::add_", "aten::relu_", "aten::clamp_min_"}, ran


def test_training_convolutions_keep_autograd_whatever_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDETR_KERNELS", "conv_relu=fused")
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def function(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conv2d(x, weight, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True)

    assert torch.autograd.gradcheck(function, (x, weight))


def test_candidates_are_timed_outside_the_callers_autocast(tmp_path: Path) -> None:
    seen: list[bool] = []

    def candidates() -> dict[str, Callable[[], object]]:
        return {"first": lambda: seen.append(torch.is_autocast_enabled("cpu")), "second": lambda: None}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        choose(DECISION, candidates, folder=tmp_path)
        assert torch.is_autocast_enabled("cpu")
    assert seen and not any(seen)
