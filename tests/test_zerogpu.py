"""``app_support.zerogpu``: ``gpu(duration=...)`` is the function itself off ZeroGPU and ``spaces.GPU`` on it. No
ZeroGPU machinery is started: on ZeroGPU ``spaces.GPU`` is replaced by a recorder."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import spaces

from app_support import zerogpu


def _double(value: int) -> int:
    return 2 * value


@pytest.fixture
def off_zerogpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)


class GpuRecorder:
    """Stands in for ``spaces.GPU``: records how it was called and wraps the function in a marked one."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, task: Callable[..., Any] | None = None, **options: Any) -> Any:
        assert task is None, "gpu() must call spaces.GPU(duration=...) and apply the result"

        def apply(function: Callable[..., Any]) -> Callable[..., Any]:
            self.calls.append({"function": function, **options})

            def on_gpu(*args: Any, **kwargs: Any) -> Any:
                return function(*args, **kwargs)

            return on_gpu

        return apply


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> GpuRecorder:
    recording = GpuRecorder()
    monkeypatch.setattr(spaces, "GPU", recording)
    return recording


@pytest.mark.usefixtures("off_zerogpu")
def test_off_zerogpu_the_function_is_itself_and_runs_in_this_process() -> None:
    assert not zerogpu.on_zerogpu()
    calls: list[int] = []

    def handler(value: int) -> int:
        calls.append(os.getpid())
        return value + 1

    decorated = zerogpu.gpu(duration=120)(handler)
    assert decorated is handler
    assert decorated(1) == 2 and calls == [os.getpid()]
    assert zerogpu.gpu()(_double) is _double


@pytest.mark.usefixtures("off_zerogpu")
def test_spaces_gpu_is_a_no_op_off_zerogpu() -> None:
    # spaces read SPACES_ZERO_GPU when it was imported (unset): its GPU returns the very function.
    assert spaces.GPU(_double) is _double
    assert spaces.GPU(duration=120)(_double) is _double


@pytest.mark.usefixtures("off_zerogpu")
def test_off_zerogpu_the_app_does_not_need_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spaces", None)  # "import spaces" now fails
    assert zerogpu.gpu(duration=30)(_double) is _double


@pytest.mark.parametrize("value", ["true", "True", "1", "t", "T"])
def test_on_zerogpu_gpu_hands_the_function_to_spaces_gpu_with_its_duration(
    monkeypatch: pytest.MonkeyPatch, recorder: GpuRecorder, value: str
) -> None:
    monkeypatch.setenv("SPACES_ZERO_GPU", value)
    assert zerogpu.on_zerogpu()
    decorated = zerogpu.gpu(duration=90)(_double)
    assert decorated is not _double
    assert recorder.calls == [{"function": _double, "duration": 90}]
    assert decorated(4) == 8


def test_a_duration_that_depends_on_the_arguments_passes_through(
    monkeypatch: pytest.MonkeyPatch, recorder: GpuRecorder
) -> None:
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")

    def duration(value: int) -> int:
        return 10 + value

    zerogpu.gpu(duration=duration)(_double)
    assert recorder.calls == [{"function": _double, "duration": duration}]
    assert zerogpu.gpu()(_double) is not _double
    assert recorder.calls[-1]["duration"] == zerogpu.DEFAULT_DURATION_SECONDS


@pytest.mark.parametrize("value", ["", "0", "false", "no", "yes"])
def test_other_values_are_not_zerogpu(monkeypatch: pytest.MonkeyPatch, recorder: GpuRecorder, value: str) -> None:
    monkeypatch.setenv("SPACES_ZERO_GPU", value)
    assert not zerogpu.on_zerogpu()
    assert zerogpu.gpu(duration=5)(_double) is _double
    assert recorder.calls == []


def test_on_zerogpu_a_missing_spaces_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)
    with pytest.raises(ImportError, match="pip install spaces"):
        zerogpu.gpu(duration=30)(_double)


@pytest.mark.parametrize("duration", [0, -5, 1.5, True, "60", None])
def test_a_bad_duration_is_refused(duration: Any) -> None:
    with pytest.raises(ValueError, match="duration must be"):
        zerogpu.gpu(duration=duration)
