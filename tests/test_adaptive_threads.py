"""AdaptiveThreads: each kind of call runs on the thread count measured faster for it, notices a change of load, and
always leaves torch's own setting as it found it; the pipeline and the app use it per input shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ddetr
from app import parse_args
from ddetr.runtime.threads import ADAPTIVE, AdaptiveThreads, parse_threads, usable_cpus

BUNDLED = Path(ddetr.__file__).parent / "bundled" / "ddetr-shapes"


class Workload:
    """A fake clock whose calls cost ``seconds[threads]`` of fake time, read from torch's setting during the call."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.ran_on: list[int] = []

    def clock(self) -> float:
        return self.now

    def call(self, tuner: AdaptiveThreads, key: object = "frame", seconds: dict[int, float] | None = None) -> int:
        with tuner.running(key) as count:
            assert torch.get_num_threads() == count
            self.ran_on.append(count)
            self.now += (seconds or self.seconds)[count]
        assert tuner.last_count == count
        return count


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(("seconds", "faster"), [({2: 0.25, 1: 0.09}, 1), ({2: 0.06, 1: 0.09}, 2)])
def test_after_measuring_both_counts_calls_run_on_the_faster(two_threads, seconds, faster) -> None:
    work = Workload(seconds)
    tuner = AdaptiveThreads(counts=(2, 1), explore_every=10, clock=work.clock)
    for _ in range(41):
        work.call(tuner)
    slower = 3 - faster
    # warm-up on the first count (not counted), one measurement of each, then the faster one but for explorations
    assert work.ran_on[:3] == [2, 2, 1]
    # both measured by call 3; explorations 10 calls later, then 20, then 40: the slower count stayed slower
    explorations = [call for call in range(4, 42) if work.ran_on[call - 1] == slower]
    assert explorations == [13, 33]
    assert work.ran_on[-1] == faster
    assert tuner.estimates("frame") == pytest.approx(seconds)
    assert torch.get_num_threads() == 2


def test_a_change_of_load_is_noticed_by_the_explorations(two_threads) -> None:
    work = Workload({2: 0.06, 1: 0.09})  # idle machine: two threads win
    tuner = AdaptiveThreads(counts=(2, 1), explore_every=5, smoothing=0.5, clock=work.clock)
    for _ in range(20):
        work.call(tuner)
    # calls 2-20 ran on two threads but for the first measurement of one (3) and the explorations (8, then 10 and
    # 20 calls apart as one thread stays the slower)
    assert [call for call in range(2, 21) if work.ran_on[call - 1] == 1] == [3, 8, 18]
    work.seconds = {2: 0.26, 1: 0.09}  # a busy neighbour: two threads now wait on each other
    for _ in range(20):
        work.call(tuner)
    # two threads once more (21: its estimate rises above one thread's), then one; the change brings explorations
    # back to every 5 calls (26), then 10 (36) as two threads stay the slower
    assert [call for call in range(21, 41) if work.ran_on[call - 1] == 2] == [21, 26, 36]
    work.seconds = {2: 0.06, 1: 0.09}  # the neighbour is gone
    for _ in range(40):
        work.call(tuner)
    # the next exploration (56, 20 calls after 36) finds two threads faster and switches at once (its time replaces
    # the old estimate); one thread is then explored 5 (61) and 10 (71) calls later
    expected = [call for call in range(56, 81) if call not in (61, 71)]
    assert [call for call in range(41, 81) if work.ran_on[call - 1] == 2] == expected


def test_each_key_is_measured_on_its_own(two_threads) -> None:
    work = Workload({2: 0.05, 1: 0.04})  # one frame: one thread is faster
    tuner = AdaptiveThreads(counts=(2, 1), explore_every=100, clock=work.clock)
    for _ in range(5):
        assert work.call(tuner, key=(1, 3, 256, 341)) in (1, 2)
        assert work.call(tuner, key=(8, 3, 256, 341), seconds={2: 0.5, 1: 0.9}) in (1, 2)  # a batch: two threads
    assert work.ran_on[-2:] == [1, 2]
    assert tuner.estimates((1, 3, 256, 341)) == pytest.approx({2: 0.05, 1: 0.04})
    assert tuner.estimates((8, 3, 256, 341)) == pytest.approx({2: 0.5, 1: 0.9})
    assert tuner.estimates("never seen") == {}


def test_old_keys_are_forgotten_beyond_max_keys(two_threads) -> None:
    work = Workload({2: 0.1, 1: 0.2})
    tuner = AdaptiveThreads(counts=(2, 1), max_keys=3, clock=work.clock)
    for key in range(5):
        work.call(tuner, key)
        work.call(tuner, key)
    assert tuner.estimates(0) == {} and tuner.estimates(1) == {}
    assert tuner.estimates(4) == {2: pytest.approx(0.1)}


def test_a_call_that_raises_restores_the_thread_count_and_is_not_counted(two_threads) -> None:
    work = Workload({2: 0.1, 1: 0.2})
    tuner = AdaptiveThreads(counts=(2, 1), clock=work.clock)
    work.call(tuner)  # warm-up
    work.call(tuner)  # two threads measured
    # one thread's first measurement raises
    with pytest.raises(RuntimeError, match="boom"), tuner.running("frame") as count:
        assert count == 1 and torch.get_num_threads() == 1
        work.now += 100.0
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    assert tuner.estimates("frame") == {2: pytest.approx(0.1)}
    assert work.call(tuner) == 1  # measured again, now for real
    assert tuner.estimates("frame") == {2: pytest.approx(0.1), 1: pytest.approx(0.2)}
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "arguments",
    [{"counts": ()}, {"counts": (2, 2)}, {"counts": (0, 1)}, {"counts": (2, True)},
     {"counts": (2, 1), "explore_every": 1}, {"counts": (2, 1), "explore_every": 8, "max_explore_every": 4},
     {"counts": (2, 1), "smoothing": 0.0}, {"counts": (2, 1), "max_keys": 0}],
)  # fmt: skip
def test_bad_settings_are_refused(arguments) -> None:
    with pytest.raises(ValueError):
        AdaptiveThreads(**arguments)


def test_thread_settings_from_the_command_line() -> None:
    assert parse_threads("adaptive") == ADAPTIVE
    assert parse_threads("3") == 3
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="positive whole number or 'adaptive'"):
            parse_threads(bad)
    assert parse_args([]).threads == ADAPTIVE
    assert parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])


@pytest.mark.skipif(usable_cpus() < 2, reason="needs two usable CPUs")
def test_the_adaptive_pipeline_times_each_input_shape_and_detects_as_the_pinned_one(two_threads) -> None:
    pinned = ddetr.pipeline(model=str(BUNDLED), precision="fp32", threads=2)
    adaptive = ddetr.pipeline(model=str(BUNDLED), precision="fp32", threads=ADAPTIVE)
    tuner = adaptive.thread_tuner
    assert pinned.thread_tuner is None and tuner is not None and tuner.counts == (2, 1)
    frame = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    expected = pinned.candidates([frame], size=128)[0]
    for _ in range(4):  # warm-up, two threads, one thread, then the faster
        found = adaptive.candidates([frame], size=128)[0]
        np.testing.assert_allclose(found.scores, expected.scores, atol=1e-4)
        np.testing.assert_allclose(found.boxes, expected.boxes, atol=1e-2)
    (key,) = tuner._timings
    assert key[0] == 1 and key[1] == 3 and min(key[2:]) == 128
    assert set(tuner.estimates(key)) == {1, 2}
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="'adaptive'"):
        ddetr.pipeline(model=str(BUNDLED), threads="fastest")


def test_one_usable_cpu_means_no_tuner() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ddetr.pipeline(model=str(BUNDLED), threads=ADAPTIVE).thread_tuner is None
    finally:
        torch.set_num_threads(previous)
