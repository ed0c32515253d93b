"""Which of two equivalent kernels runs on this machine: measured at first use, cached per machine, overridable.

The fast paths were tuned on one CPU and the best kernel differs by CPU: oneDNN's linear took 0.4-0.6x MKL's time
on an AMD EPYC, and the order is not the same on every Intel Xeon; channels-last convolutions were 2.2x faster there
but need not be everywhere. So a decision (``linear``: ``onednn`` or ``aten``, i.e. ``F.linear``; ``conv_layout``:
channels-last or contiguous; ``conv_relu``: fused or not) is made per machine by timing both candidates on a
representative shape the first time it is needed, in each precision and mode it is needed in, and for the thread
count in use.

The result is cached in ``$DDETR_CACHE_DIR/kernel_choices.json`` (the compiled kernel's cache folder), keyed by the
CPU (model and flags), torch's version and the thread count. The first process to write a decision wins: a process
that measured differently adopts the stored choice, so every process on a machine (training children, slices,
workers) runs the same kernels and gives the same bits. ``DDETR_KERNELS`` overrides, e.g.
``DDETR_KERNELS=linear=aten,conv_layout=contiguous``; an override is never written to the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the last writer's choice is kept
    fcntl = None  # type: ignore[assignment]

from ddetr.runtime.machine import cache_dir, cpu_signature

OVERRIDE_ENV = "DDETR_KERNELS"
CACHE_FILE = "kernel_choices.json"
# Timed repeats per candidate, interleaved, after one untimed warm-up each; the median decides.
REPEATS = 5


@dataclass(frozen=True)
class Decision:
    """One choice: ``family`` is what ``DDETR_KERNELS`` names (``linear``), ``mode`` where it applies
    (``fp32-inference``), ``options`` the candidates, the reference last: the plain op that runs wherever the
    others may not, so it is what a failed measurement leaves (a fast candidate this CPU or build refuses)."""

    family: str
    mode: str
    options: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.family}/{self.mode}/threads={torch.get_num_threads()}"


@dataclass(frozen=True)
class Choice:
    """What was chosen and why: ``source`` is ``override``, ``cache``, ``measured`` or ``fallback``; ``seconds``
    the median time of each candidate when this process or an earlier one measured them."""

    option: str
    source: str
    seconds: Mapping[str, float]


def mode_name(dtype: torch.dtype, *, training: bool) -> str:
    """``fp32-inference``, ``bf16-inference``, ``fp32-training``, ...: a decision's mode for a compute dtype."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
    return f"{names.get(dtype, str(dtype).removeprefix('torch.'))}-{'training' if training else 'inference'}"


_memo: dict[str, Choice] = {}
_memo_lock = threading.Lock()


def overrides(environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """``DDETR_KERNELS`` parsed into {family: option}; a malformed entry is a ValueError naming it."""
    return dict(_parse_overrides((os.environ if environment is None else environment).get(OVERRIDE_ENV, "")))


@functools.lru_cache(maxsize=8)
def _parse_overrides(text: str) -> tuple[tuple[str, str], ...]:
    """Parsed once per distinct value: every linear and convolution call consults the overrides."""
    parsed: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        family, separator, option = entry.partition("=")
        if not separator or not family.strip() or not option.strip():
            raise ValueError(f"{OVERRIDE_ENV} entry {entry!r} is not family=option (e.g. linear=aten)")
        parsed[family.strip()] = option.strip()
    return tuple(parsed.items())


def machine_key() -> str:
    """What a measurement depends on besides the thread count: the CPU and torch's build."""
    digest = hashlib.sha256(f"{cpu_signature()}\0{torch.__version__}".encode()).hexdigest()
    return digest[:16]


def measure(candidates: Mapping[str, Callable[[], object]], *, repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds per call of each candidate, run interleaved (a, b, a, b, ...) after one warm-up each."""
    for run in candidates.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def choose(
    decision: Decision,
    candidates: Callable[[], Mapping[str, Callable[[], object]]],
    *,
    folder: Path | None = None,
    timer: Callable[[Mapping[str, Callable[[], object]]], Mapping[str, float]] = measure,
) -> Choice:
    """The option to run for ``decision`` on this machine (see the module docstring for the order of sources).

    ``candidates`` builds the timed closures, one per option, only when a measurement is needed; ``folder``
    replaces the cache folder and ``timer`` the measurement (tests).
    """
    forced = overrides().get(decision.family)
    if forced is not None:
        if forced not in decision.options:
            raise ValueError(f"{OVERRIDE_ENV} sets {decision.family}={forced!r}; choose one of {decision.options}")
        return Choice(option=forced, source="override", seconds={})
    memo_key = f"{folder}|{decision.key}"
    with _memo_lock:
        if memo_key in _memo:
            return _memo[memo_key]
        choice = _stored_or_measured(decision, candidates, folder, timer)
        _memo[memo_key] = choice
        return choice


def forget() -> None:
    """Drop this process's memory of choices (the cache file stays): the next ``choose`` reads or measures again."""
    with _memo_lock:
        _memo.clear()


def _stored_or_measured(
    decision: Decision,
    candidates: Callable[[], Mapping[str, Callable[[], object]]],
    folder: Path | None,
    timer: Callable[[Mapping[str, Callable[[], object]]], Mapping[str, float]],
) -> Choice:
    try:
        path = (folder if folder is not None else cache_dir()) / CACHE_FILE
    except (OSError, RuntimeError):
        path = None
    stored = _read_entry(path, decision) if path is not None else None
    if stored is not None:
        return stored
    try:
        # Measured outside the caller's autocast (the first use can come from inside a bf16 forward): each
        # candidate sets the precision it stands for itself.
        with torch.autocast("cpu", enabled=False):
            seconds = dict(timer(candidates()))
    except (RuntimeError, ValueError, TypeError) as error:
        # A candidate that cannot run here (an op missing from this build, a dtype this CPU's oneDNN refuses)
        # leaves the reference.
        return Choice(option=decision.options[-1], source=f"fallback ({type(error).__name__}: {error})", seconds={})
    option = min(decision.options, key=lambda name: seconds.get(name, float("inf")))
    measured = Choice(option=option, source="measured", seconds=seconds)
    return _write_first(path, decision, measured) if path is not None else measured


def _entry_key(decision: Decision) -> str:
    return f"{machine_key()}/{decision.key}"


def _load(path: Path) -> dict[str, dict[str, object]]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _parse(entry: object, decision: Decision) -> Choice | None:
    if not isinstance(entry, dict) or entry.get("option") not in decision.options:
        return None
    raw = entry.get("seconds")
    seconds = {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return Choice(option=str(entry["option"]), source="cache", seconds=seconds)


def _read_entry(path: Path, decision: Decision) -> Choice | None:
    return _parse(_load(path).get(_entry_key(decision)), decision)


def _write_first(path: Path, decision: Decision, measured: Choice) -> Choice:
    """Store ``measured`` unless another process stored this decision first; return the stored one."""
    try:
        with open(path.with_name(CACHE_FILE + ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            content = _load(path)
            earlier = _parse(content.get(_entry_key(decision)), decision)
            if earlier is not None:
                return earlier
            content[_entry_key(decision)] = {"option": measured.option, "seconds": dict(measured.seconds)}
            partial = path.with_name(f"{CACHE_FILE}.{os.getpid()}.partial")
            partial.write_text(json.dumps(content, indent=1, sort_keys=True))
            os.replace(partial, path)
    except OSError:
        pass  # an unwritable cache costs a measurement per process, nothing else
    return measured
