"""``ProcessRun``: a training run in a child process, so that a crash or an out-of-memory kill in training cannot
take the calling process (a web server) down with it.

    run = start_process_run(config, threads=1)   # ValueError at once for a folder that holds another run
    for record in run.stream():                   # metrics records, read from the run's metrics.jsonl
        show(record)
    run.stop()                                    # SIGTERM: the run saves a checkpoint at its current step
    run = start_process_run(resume_config(run.output_dir))

The child is ``python -m finetune.run.child RUN_DIR``, which runs the same engine as ``python -m finetune``
(``run_training``) on the exact ``TrainConfig`` that this side wrote, atomically, to ``process_config.json`` in the
run folder: a JSON file round-trips every setting (the command line does not spell them all), has no quoting or
length limits, and leaves a record of what the process was asked to run. Several CUDA GPUs (device ``auto`` or
``cuda``) make the child run itself under torchrun, one process per GPU (see ``finetune.run.child``).

What the parent sees, and where it comes from:

* ``state``: pending, running, then finished / stopped / diverged / failed. The final state is the one the engine
  wrote to ``status.json`` during this process's life (a status left by an earlier process is ignored); without one,
  the exit tells: 0 or the SIGTERM of ``stop()`` before the engine took over its signals is ``stopped`` (the run
  ended before its first step, nothing written), anything else is ``failed``.
* ``error``: for a failed run, ``"Type: message"`` of the exception the child raised (written by the child to
  ``process_error.json``), else ``"killed by signal SIGKILL (e.g. out of memory)"`` or ``"exited with code N: <the
  log's last line>"``.
* ``log_tail()``: the child's stdout and stderr go to ``train.log`` in the run folder, appended across resumes.
* ``records()``: ``metrics.jsonl`` read incrementally (only new bytes, a half-written last line left for the next
  read). A resumed run first cuts that file back to its checkpoint's step; until it has, the records of later steps
  (from the interrupted process) are left out, so the list only ever grows.

The child lives in its own session, so a Ctrl-C in the parent's terminal does not reach it, and it never outlives
the parent: when the parent ends (killed, crashed or just exited) the child makes a graceful stop with a checkpoint,
told by the kernel (Linux ``PR_SET_PDEATHSIG``) or, elsewhere, by polling ``os.getppid()`` every second (see
``finetune.run.child``). The kernel's death signal fires when the *thread* that started the child ends, so every
child is started from one long-lived thread of this module rather than from the caller's (a web server's worker
threads come and go).

Threads: ``threads`` sets the child's torch CPU threads (``TrainConfig.threads``, also OMP/MKL's). Bit-exact resume on
CPU needs the thread count of the interrupted run; ``resume_config(dir)`` keeps the saved count, so resume with it
(or pass the same number). POSIX only (signals, sessions).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.run.files import METRICS, read_status
from finetune.run.setup import check_run_directory
from finetune.run.trainer import Record, RunResult

# The run folder's files of a process run (besides the engine's own).
PROCESS_CONFIG = "process_config.json"  # the TrainConfig, written (atomically) by the parent before the start
PROCESS_ERROR = "process_error.json"  # written by the child when training raised: {"error": "Type: message", ...}
LOG = "train.log"  # the child's stdout and stderr, appended across resumes
ENDED = ("finished", "stopped", "diverged", "failed")
# Eval record keys that are bookkeeping rather than metrics (RunResult.metrics holds only the metrics).
_EVAL_BOOKKEEPING = ("type", "split", "step", "epoch", "time")
# How long a SIGKILLed child may take to be reaped: the kernel frees its memory first.
_REAP_TIMEOUT = 60.0

# One long-lived thread starts every child: PR_SET_PDEATHSIG fires when the thread that forked the child ends.
_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-launcher")


class MetricsTail:
    """The records of a metrics file that grows by appends, read incrementally. A replaced file (the resume's
    truncation renames a new one into place) is read again from its start. ``keep_through``: while the file is
    still the one found at the start, leave out records after this step (what the resume's truncation will drop)."""

    def __init__(self, path: Path, keep_through: int | None) -> None:
        self.path = path
        self.records: list[Record] = []
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._partial = b""
        self._keep_through = keep_through if keep_through is not None else 0
        # None (no file, or nothing to leave out) never equals an open file's identity.
        self._stale = self._file_identity() if keep_through is not None else None

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    def read(self) -> list[Record]:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 -- closed below; reopened each time to see a replacement
        except FileNotFoundError:
            return self.records
        with handle:
            info = os.fstat(handle.fileno())
            identity = (info.st_dev, info.st_ino)
            if identity != self._identity or info.st_size < self._offset:
                self._identity, self._offset, self._partial, self.records = identity, 0, b"", []
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # b"" after a complete line; else a line still being written
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line torn by a crash
            if not isinstance(record, dict):
                continue
            step = record.get("step", 0)
            if identity == self._stale and isinstance(step, (int, float)) and step > self._keep_through:
                continue
            self.records.append(record)
        return self.records


def _read_tail(path: Path, lines: int, start: int = 0) -> list[str]:
    """The last ``lines`` lines of a text file, reading backwards from its end but not before byte ``start``."""
    if lines <= 0:
        return []
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed below
    except FileNotFoundError:
        return []
    with handle:
        end = handle.seek(0, os.SEEK_END)
        data, chunk = b"", 8192
        while end > start and data.count(b"\n") <= lines:
            begin = max(start, end - chunk)
            handle.seek(begin)
            data = handle.read(end - begin) + data
            end, chunk = begin, chunk * 2
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def settle_outcome(
    *,
    returncode: int,
    status: Mapping[str, Any] | None,
    child_error: str | None,
    stop_sent: bool,
    kill_sent: bool,
    last_log_line: str,
) -> tuple[str, str | None]:
    """(state, error) of an ended child. ``status``: what the engine wrote to status.json during this child's life
    (None: nothing). ``child_error``: the exception the child reported. The engine's word comes first: a run that
    wrote "finished" finished, whatever happened to the process after."""
    state = status.get("state") if status is not None else None
    if state in ("finished", "stopped", "diverged"):
        return str(state), None
    if child_error is not None or state == "failed":
        message = child_error if child_error is not None else str(status.get("message", "")) if status else ""
        return "failed", message or "the run failed"
    if returncode == 0:
        return "stopped", None  # stopped while preparing, before the first step: nothing was written
    if returncode < 0:
        number = -returncode
        if number == signal.SIGTERM and stop_sent:
            return "stopped", None  # stop() arrived before the engine took over SIGTERM: nothing was written yet
        reason = ""
        if number == signal.SIGKILL:
            reason = " (by kill())" if kill_sent else " (e.g. out of memory)"
        return "failed", f"killed by signal {_signal_name(number)}{reason}"
    suffix = f": {last_log_line}" if last_log_line else ""
    return "failed", f"exited with code {returncode}{suffix}"


def _child_environment(config: TrainConfig, extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # The child imports the same ``finetune`` as this process, installed or from a checkout.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(part for part in (root, env.get("PYTHONPATH", "")) if part)
    env["PYTHONUNBUFFERED"] = "1"  # the log shows each line when it is written
    if config.threads is not None:
        # torch.set_num_threads comes only once the trainer is built; the data preparation before it uses these.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(config.threads)
    env.update(extra)
    return env


class ProcessRun:
    """One training run in a child process; the same interface as ``finetune.api.TrainingRun`` except that
    ``error`` is a message (the exception stays in the child) and a prepared dataset cannot be handed over.
    ``start()`` (or ``start_process_run``) starts it; see the module docstring for how state, error and records
    are known."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        threads: int | None = None,
        env: Mapping[str, str] | None = None,
        niceness: int = 0,
    ) -> None:
        if not isinstance(niceness, int) or isinstance(niceness, bool) or not 0 <= niceness <= 19:
            raise ValueError(f"niceness must be a whole number from 0 to 19, got {niceness!r}")
        self.niceness = niceness
        overrides: dict[str, Any] = {"progress": False}  # the log is a file: a progress bar would only fill it
        if threads is not None:
            overrides["threads"] = threads
        self.config = config.with_overrides(**overrides)  # validates threads
        environment = dict(env or {})
        bad = sorted(
            str(key) for key, value in environment.items() if not isinstance(key, str) or not isinstance(value, str)
        )
        if bad:
            raise ValueError(f"env maps names to values, both strings; not so for {bad}")
        self._env = environment
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._state = "pending"
        self._stop_sent = False
        self._kill_sent = False
        self._metrics: MetricsTail | None = None
        self._metrics_lock = threading.Lock()
        self._status_before: dict[str, Any] | None = None
        self._log_start = 0
        self._resume_step = 0
        self.error: str | None = None
        self.result: RunResult | None = None
        self.exit_code: int | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def state(self) -> str:
        return self._state

    @property
    def done(self) -> bool:
        return self._state in ENDED

    # ------------------------------------------------------------------------------------------------------------
    # Start and end

    def start(self) -> ProcessRun:
        """Check the run folder (ValueError, before anything is written: it holds another run, or there is nothing
        to resume), write the config for the child and start it."""
        if os.name != "posix":
            raise NotImplementedError("process runs need a POSIX system (signals and sessions)")
        with self._lock:
            if self._process is not None:
                raise ValueError("this run was already started; start_process_run(resume_config(dir)) continues it")
            checkpoint = check_run_directory(self.config)
            self._resume_step = checkpoint.step if checkpoint is not None else 0
            output_dir = self.output_dir
            output_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(output_dir / PROCESS_CONFIG)  # written aside and renamed: the child never reads half
            (output_dir / PROCESS_ERROR).unlink(missing_ok=True)
            self._status_before = read_status(output_dir)
            self._metrics = MetricsTail(output_dir / METRICS, self._resume_step if self.config.resume else None)
            command = [sys.executable, "-m", "finetune.run.child", str(output_dir), "--parent-pid", str(os.getpid())]
            with open(self.log_path, "ab") as log:
                self._log_start = os.fstat(log.fileno()).st_size
                self._process = _LAUNCHER.submit(
                    subprocess.Popen,
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_child_environment(self.config, self._env),
                    start_new_session=True,  # its own process group: a terminal's Ctrl-C is not sent to it
                ).result()
            if self.niceness:
                _lower_priority(self._process.pid, self.niceness)
            self._state = "running"
        threading.Thread(target=self._monitor, name=f"finetune-process:{output_dir.name}", daemon=True).start()
        return self

    def _monitor(self) -> None:
        assert self._process is not None
        returncode = self._process.wait()
        status = read_status(self.output_dir)
        fresh = status if status is not None and status != self._status_before else None
        state, error = settle_outcome(
            returncode=returncode,
            status=fresh,
            child_error=self._child_error(),
            stop_sent=self._stop_sent,
            kill_sent=self._kill_sent,
            last_log_line=next(
                (line for line in reversed(_read_tail(self.log_path, 5, self._log_start)) if line.strip()), ""
            ),
        )
        with self._lock:
            self.exit_code = returncode
            self.error = error
            self.result = self._result(state, fresh)
            self._state = state
        self._ended.set()

    def _child_error(self) -> str | None:
        try:
            report = json.loads((self.output_dir / PROCESS_ERROR).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        error = report.get("error") if isinstance(report, dict) else None
        return str(error) if error else None

    def _result(self, state: str, status: Mapping[str, Any] | None) -> RunResult | None:
        if state == "failed":
            return None
        if status is None:  # stopped before the first step: still at its checkpoint (or at 0)
            message = f"stopped before the first step; the run is still at step {self._resume_step}"
            return RunResult("stopped", self._resume_step, -1, self.output_dir, None, message)
        step = int(status.get("step", 0))
        metrics = None
        evaluations = [r for r in self.records(kind="eval") if r.get("step") == step]
        if state == "finished" and evaluations:
            metrics = {k: v for k, v in evaluations[-1].items() if k not in _EVAL_BOOKKEEPING}
        total = int(status.get("total_steps", -1))
        return RunResult(state, step, total, self.output_dir, metrics, str(status.get("message", "")))

    def _send(self, number: int, *, group: bool) -> bool:
        """Signal the child (``group``: its whole process group, data-loading workers included) while it runs."""
        process = self._process
        if process is None or process.returncode is not None or self._ended.is_set():
            return False
        try:
            if group:
                os.killpg(process.pid, number)
            else:
                process.send_signal(number)
        except ProcessLookupError:
            return False
        return True

    def stop(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """SIGTERM: the run stops after the step in progress and saves a checkpoint at that step (before its first
        step it ends at once, writing nothing). Sent once: a second SIGTERM would abort the run without saving."""
        with self._lock:
            if not self._stop_sent:
                self._stop_sent = self._send(signal.SIGTERM, group=False)
        if wait:
            self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the child and its data-loading workers: ends it now, losing the steps since its last
        checkpoint; ``state`` becomes failed. Returns at once (``wait()`` to see it end)."""
        with self._lock:
            self._kill_sent = self._send(signal.SIGKILL, group=True) or self._kill_sent

    def stop_then_kill(self, grace: float) -> str:
        """``stop()``, then ``kill()`` if the run has not ended after ``grace`` seconds; returns the final state."""
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or grace < 0:
            raise ValueError(f"grace must be a finite number of seconds >= 0, got {grace!r}")
        self.stop()
        if not self._ended.wait(grace):
            self.kill()
            self._ended.wait(_REAP_TIMEOUT)
        return self.state

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """Block until the child ends (or ``timeout`` seconds); its result, None if still running or failed."""
        if self._process is not None:
            self._ended.wait(timeout)
        return self.result

    # ------------------------------------------------------------------------------------------------------------
    # What it wrote

    def records(self, *, kind: str | None = None) -> list[Record]:
        """The run's metrics records so far (optionally only ``train``, ``eval`` or ``status``); reads only what
        the child appended since the last call."""
        with self._metrics_lock:
            records = self._metrics.read() if self._metrics is not None else []
            return [r for r in records if kind is None or r.get("type") == kind]

    def stream(self, *, poll: float = 1.0, timeout: float | None = None) -> Iterator[Record]:
        """Yield each record as it is written until the run ends (or ``timeout`` seconds pass), checking the file
        every ``poll`` seconds."""
        if not poll > 0:
            raise ValueError(f"poll must be a positive number of seconds, got {poll!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        position = 0
        while True:
            finished = self.done  # read before the records: the last read then sees everything the run wrote
            current = self.records()
            if position < len(current):
                yield from current[position:]
                position = len(current)
            if finished:
                return
            remaining = poll if deadline is None else min(poll, deadline - time.monotonic())
            if remaining <= 0:
                return
            self._ended.wait(remaining)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log (``train.log``, all processes of this run folder)."""
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise ValueError(f"lines must be a non-negative integer, got {lines!r}")
        return "\n".join(_read_tail(self.log_path, lines))


def _lower_priority(pid: int, niceness: int) -> None:
    """Lower the child's CPU priority before it starts its compute threads (they inherit it), so that a server
    training in the background keeps answering first. The child leads a session of its own, and Linux schedules
    each session as one group ("autogroup") whose share a process's nice value does not change: the group's nice
    value is set too, where the kernel has one."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, niceness)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(niceness))


def start_process_run(
    config: TrainConfig,
    *,
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    niceness: int = 0,
) -> ProcessRun:
    """Start ``config`` in a child process and return its handle. ``threads``: the child's torch CPU threads
    (resume with the same number for a bit-exact resume on CPU); ``env``: variables set for the child, over this
    process's environment (e.g. ``CUDA_VISIBLE_DEVICES``); ``niceness``: how much lower its CPU priority is (0-19,
    like ``nice``). ValueError for a run folder that holds another run, or with nothing to resume."""
    return ProcessRun(config, threads=threads, env=env, niceness=niceness).start()
