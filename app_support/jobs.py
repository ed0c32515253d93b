"""The server's training jobs: owned, queued one at a time, each trained in a child process.

A job belongs to whoever started it (an ``owners.Owner``) and to whoever holds its token (API clients). Its folder
is ``runs/<owner key>/<run name>/`` with ``job.json`` beside the run's own files: the owner's key and the token's
hash, so ownership survives a server restart and a token read from disk controls nothing.

One job trains at a time, in a child process running the same engine as ``python -m finetune``
(``finetune.api.start_process_run``): a crash or an out-of-memory kill there leaves the server serving, and the job
shows as failed with the reason and the end of its log, resumable from its last complete checkpoint. Others wait
in line (each owner at most one waiting) and start in order; a watcher thread starts the next when one ends.

Everything a page polls is served from a snapshot cached for ``SNAPSHOT_TTL_S``, so any number of polling pages
cost one read of the run's files per interval.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import PIL.Image

from app_support.errors import UserFacingError
from app_support.owners import Owner, new_job_token, token_hash, token_matches
from finetune.api import read_run, resume_config, start_process_run
from finetune.config import TrainConfig
from finetune.run.checkpoints import latest_checkpoint
from finetune.run.files import CHECKPOINTS, MODEL_DIR, TRAIN_CONFIG

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
SNAPSHOT_TTL_S = 1.0
WATCH_INTERVAL_S = 0.5
STOP_GRACE_S = 120.0
MAX_WAITING = 8  # jobs in line, over all owners (API clients are a new owner per job: the line needs a cap)
KEEP_ENDED = 32  # ended jobs kept in memory (with their preview images) for their owners' pages
# Training runs at a lower CPU priority than the server: a visitor's Detect comes first on shared cores.
TRAINING_NICENESS = 10  # a stopped job's time to save its checkpoint before it is killed
ACTIVE_STATES = ("queued", "pending", "running")
_RUN_NAME = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")


class JobBusyError(UserFacingError):
    """The owner already has a job waiting, or the run asked for is already training."""


class NotYourJobError(UserFacingError):
    """The request does not own the job it names (no token, a wrong token, or another visitor's run)."""


class RunHandle(Protocol):
    """What a running job is to this module (``finetune.api.ProcessRun``)."""

    @property
    def state(self) -> str: ...
    @property
    def done(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
    def records(self, *, kind: str | None = None) -> list[dict[str, Any]]: ...
    def stop(self, *, wait: bool = False, timeout: float | None = None) -> None: ...
    def stop_then_kill(self, grace: float) -> object: ...
    def wait(self, timeout: float | None = None) -> Any: ...
    def log_tail(self, lines: int = 20) -> str: ...


Launcher = Callable[[TrainConfig], RunHandle]


def default_threads() -> int:
    """The child's torch threads: all CPUs but one, so that the server keeps one for Detect."""
    return max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else 1


def process_launcher(threads: int | None = None) -> Launcher:
    count = threads if threads is not None else default_threads()
    return lambda config: start_process_run(config, threads=count, niceness=TRAINING_NICENESS)


@dataclass
class JobSnapshot:
    """What the owner's page shows about one job; ``version`` changes whenever anything in it does."""

    run_name: str | None
    state: str  # idle, queued, pending, running, finished, stopped, diverged, failed
    step: int = 0
    total_steps: int = 0
    message: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    model_dir: Path | None = None
    place_in_line: int = 0  # 1: next to start; 0: not waiting
    slices: int = 0  # on ZeroGPU: GPU calls made, and the GPU time they took (charged to the owner's quota)
    gpu_seconds: float = 0.0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def version(self) -> tuple[Any, ...]:
        return (self.run_name, self.state, len(self.records), self.step, self.place_in_line)

    def eta_seconds(self) -> float | None:
        train = [r for r in self.records if r.get("type") == "train"]
        speed = train[-1].get("steps_per_second") if train else None
        if not self.active or not isinstance(speed, (int, float)) or speed <= 0:
            return None
        return max(0.0, (self.total_steps - self.step) / speed)


@dataclass
class Job:
    name: str
    owner_key: str
    token_hash: str
    config: TrainConfig
    description: str
    validation_images: list[PIL.Image.Image] = field(default_factory=list)
    run: RunHandle | None = None
    cached: tuple[float, JobSnapshot] | None = None
    stopping: bool = False  # a stop was asked for (one stop thread per run, however often Stop is pressed)

    @property
    def directory(self) -> Path:
        return Path(self.config.output_dir)

    def allows(self, owner: Owner | None, token: str | None) -> bool:
        return (owner is not None and owner.key == self.owner_key) or token_matches(token, self.token_hash)


def write_job_file(directory: Path, *, owner_key: str, hashed_token: str, description: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    record = {"owner": owner_key, "token_sha256": hashed_token, "description": description}
    partial = directory / f".{JOB_FILE}.partial"
    partial.write_text(json.dumps(record))
    partial.replace(directory / JOB_FILE)


def read_job_file(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


class TrainingJobs:
    """Owned training jobs under ``runs_root``: ``max_running`` train at a time (one: a CPU server's cores are
    shared; on ZeroGPU each call gets its own GPU), the rest wait in line."""

    def __init__(self, runs_root: Path, *, launcher: Launcher | None = None, max_running: int = 1) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        self.runs_root = Path(runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self._launch = launcher if launcher is not None else process_launcher()
        self.max_running = max_running
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}  # every job this server has queued or run, by run name
        self._queue: list[str] = []
        self._running: list[str] = []  # started, oldest first (kept until they end)
        self._closed = False
        self._wake = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="training-jobs", daemon=True)
        self._watcher.start()

    # -- submitting --------------------------------------------------------------------------------------------- #

    def new_run_dir(self, owner: Owner) -> Path:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        return self.runs_root / owner.key / name

    def submit(
        self,
        owner: Owner,
        config: TrainConfig,
        *,
        description: str,
        validation_images: list[PIL.Image.Image] | None = None,
        token: str | None = None,
    ) -> tuple[Job, str]:
        """Queue ``config`` (its ``output_dir`` from ``new_run_dir``) for ``owner``; returns the job and its token
        (``token``, else a new one), the only copy of which goes back to the caller."""
        with self._lock:
            self.check_can_queue(owner.key)
            token = token or new_job_token()
            job = Job(
                name=Path(config.output_dir).name,
                owner_key=owner.key,
                token_hash=token_hash(token),
                config=config,
                description=description,
                validation_images=list(validation_images or []),
            )
            write_job_file(job.directory, owner_key=owner.key, hashed_token=job.token_hash, description=description)
            self._enqueue(job)
            return job, token

    def resume(
        self, run_name: str, owner: Owner | None, token: str | None, *, validation_images: list | None = None
    ) -> Job:
        """Queue the stopped (or failed) run ``run_name`` again, for whoever owns it."""
        with self._lock:
            directory = self._find_run(run_name)
            record = (read_job_file(directory) or {}) if directory is not None else {}
            allowed = (owner is not None and owner.key == record.get("owner")) or token_matches(
                token, record.get("token_sha256")
            )
            if directory is None or not allowed:  # one answer: a stranger learns nothing of which runs exist
                raise NotYourJobError(f"run {run_name!r} is not yours to resume (no such run, or a wrong token)")
            existing = self._jobs.get(run_name)
            if existing is not None and self._is_active(existing):
                raise JobBusyError(f"run {run_name} is already training or waiting to")
            if run_name not in self.resumable_runs(record.get("owner", "")):
                raise ValueError(f"run {run_name!r} cannot be resumed (finished, or without a checkpoint)")
            self.check_can_queue(str(record.get("owner")))
            job = Job(
                name=run_name,
                owner_key=str(record.get("owner")),
                token_hash=str(record.get("token_sha256")),
                config=resume_config(directory),
                description=str(record.get("description", run_name)),
                validation_images=list(validation_images or (existing.validation_images if existing else [])),
            )
            self._enqueue(job)
            return job

    def check_can_queue(self, owner_key: str) -> None:
        """JobBusyError when ``owner_key`` may not queue a job now (one waiting already, or shutting down)."""
        if self._closed:
            raise JobBusyError("the server is shutting down; try again in a minute")
        if len(self._queue) >= MAX_WAITING:
            raise JobBusyError(f"{len(self._queue)} jobs are waiting to train, the most this server takes; try later")
        waiting = [name for name in self._queue if self._jobs[name].owner_key == owner_key]
        if waiting:
            raise JobBusyError(
                f"you already have a job waiting to train ({waiting[0]}); stop it or wait until it starts"
            )

    def _enqueue(self, job: Job) -> None:
        ended = [name for name, known in self._jobs.items() if not self._is_active(known)]
        for name in ended[: max(0, len(ended) - KEEP_ENDED)]:  # oldest first: dicts keep insertion order
            del self._jobs[name]
        self._jobs.pop(job.name, None)  # a resumed run is new again: it goes to the end
        self._jobs[job.name] = job
        self._queue.append(job.name)
        self._wake.set()
        self._start_next()

    def _find_run(self, run_name: str) -> Path | None:
        if not isinstance(run_name, str) or not _RUN_NAME.fullmatch(run_name):
            raise ValueError(f"{run_name!r} is not a run name")
        for directory in self.runs_root.glob(f"*/{run_name}"):
            if (directory / JOB_FILE).is_file():
                return directory
        return None

    # -- running ------------------------------------------------------------------------------------------------ #

    def _is_active(self, job: Job) -> bool:
        return job.name in self._queue or (job.run is not None and not job.run.done)

    def _start_next(self) -> None:
        with self._lock:
            self._running = [name for name in self._running if self._is_running(self._jobs[name])]
            while not self._closed and self._queue and len(self._running) < self.max_running:
                job = self._jobs[self._queue.pop(0)]
                self._running.append(job.name)
                job.cached = None
                try:
                    job.run = self._launch(job.config)
                except Exception as error:  # the launcher failed to start it: the job fails, the server stays
                    logger.exception("could not start training run %s", job.name)
                    job.run = _FailedToStart(f"{type(error).__name__}: {error}")

    @staticmethod
    def _is_running(job: Job) -> bool:
        return job.run is not None and not job.run.done

    def _newest_running(self) -> Job | None:
        with self._lock:
            running = [self._jobs[name] for name in self._running if self._is_running(self._jobs[name])]
        return running[-1] if running else None

    def _watch(self) -> None:
        while not self._closed:
            self._wake.wait(WATCH_INTERVAL_S)
            self._wake.clear()
            try:
                self._start_next()
            except Exception:  # the watcher must outlive any one bad job
                logger.exception("starting the next training job failed")

    # -- control ------------------------------------------------------------------------------------------------ #

    def job(self, run_name: str | None) -> Job | None:
        return self._jobs.get(run_name) if run_name else None

    def latest_job(self, owner: Owner | None, token: str | None = None) -> Job | None:
        """The requester's (by login/browser or token) job that trains or waits, else their newest one."""
        with self._lock:
            mine = [job for job in self._jobs.values() if job.allows(owner, token)]
            active = [job for job in mine if self._is_active(job)]
        found = active or mine
        return found[-1] if found else None

    def stop(self, owner: Owner | None, token: str | None, *, admin: bool = False) -> str | None:
        """Stop the requester's active job (any active job for the admin): a waiting one leaves the line, a
        training one stops after its current step with a checkpoint (killed if it has not ended ``STOP_GRACE_S``
        later). Returns the run's name, None if none was
        active; NotYourJobError when a token was given that controls no active job."""
        with self._lock:
            candidates = [self._jobs[name] for name in [*self._running, *self._queue]]
            active = [job for job in candidates if self._is_active(job)]
            mine = [job for job in active if job.allows(owner, token)]
            if admin and not mine:  # the admin's own job first; else the one training (the oldest)
                mine = active[:1]
            if not mine:
                if token and not admin and active:
                    raise NotYourJobError("that token does not control the running job")
                return None
            job = mine[0]
            if job.name in self._queue:
                self._drop_waiting(job)
            elif job.run is not None and not job.stopping:
                # Graceful first (a checkpoint at the current step); a child that does not end in time is killed.
                job.stopping = True
                run = job.run
                threading.Thread(
                    target=run.stop_then_kill, args=(STOP_GRACE_S,), name=f"stop:{job.name}", daemon=True
                ).start()
            return job.name

    def active_datasets(self) -> list[Path]:
        """The datasets of the jobs that train or wait (their uploads must stay)."""
        with self._lock:
            return [Path(job.config.dataset) for job in self._jobs.values() if self._is_active(job)]

    def wait(self, timeout: float | None = None) -> None:
        """Until no job trains or waits (or ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                busy = bool(self._queue) or any(self._is_running(job) for job in self._jobs.values())
                newest = self._newest_running()
                running = newest.run if newest is not None else None
            if not busy:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            if running is not None and not running.done:
                running.wait(min(remaining, 1.0) if remaining is not None else 1.0)
            else:
                self._start_next()
                time.sleep(0.05)

    def shutdown(self, grace: float = 60.0) -> None:
        """Stop taking jobs, drop the waiting ones, and stop the training one with a checkpoint (killed after
        ``grace`` seconds): for server exit."""
        with self._lock:
            self._closed = True
            for name in list(self._queue):
                self._drop_waiting(self._jobs[name])
            running = [job.run for job in self._jobs.values() if job.run is not None and not job.run.done]
        for run in running:
            run.stop_then_kill(grace)
        self._wake.set()

    # -- listing ------------------------------------------------------------------------------------------------ #

    def _owner_dirs(self, owner_key: str | None) -> list[Path]:
        if not owner_key or "/" in owner_key or owner_key.startswith("."):
            return []
        folder = self.runs_root / owner_key
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_dir() and (p / TRAIN_CONFIG).is_file())

    def resumable_runs(self, owner_key: str | None) -> list[str]:
        """The owner's runs that stopped (or failed) with a checkpoint to continue from, newest first."""
        names = []
        for directory in self._owner_dirs(owner_key):
            job = self._jobs.get(directory.name)
            if job is not None and self._is_active(job):
                continue
            status = read_run(directory)["status"] or {}
            if status.get("state") != "finished" and latest_checkpoint(directory / CHECKPOINTS):
                names.append(directory.name)
        return sorted(names, reverse=True)

    def finished_models(self, owner_key: str | None) -> list[tuple[str, Path]]:
        """(run name, model folder) of the owner's runs that exported a model, newest first."""
        found = []
        for directory in self._owner_dirs(owner_key):
            model_dir = directory / MODEL_DIR
            if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
                found.append((directory.name, model_dir))
        return sorted(found, reverse=True)

    # -- reporting ---------------------------------------------------------------------------------------------- #

    def snapshot(self, job: Job | None) -> JobSnapshot:
        """``job``'s progress (cached for ``SNAPSHOT_TTL_S``); the idle snapshot for None."""
        if job is None:
            return JobSnapshot(run_name=None, state="idle")
        cached = job.cached
        if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_TTL_S:
            return cached[1]
        snapshot = self._read_snapshot(job)
        job.cached = (time.monotonic(), snapshot)
        return snapshot

    def _read_snapshot(self, job: Job) -> JobSnapshot:
        with self._lock:
            place = self._queue.index(job.name) + 1 if job.name in self._queue else 0
            run = job.run
        if run is None:
            return JobSnapshot(job.name, "queued", place_in_line=place)
        records = run.records()
        status = read_run(job.directory)["status"] or {}
        train = [r for r in records if r.get("type") == "train"]
        step = int(train[-1]["step"]) if train else int(status.get("step", 0) or 0)
        total = int(status.get("total_steps", 0) or 0)
        state = run.state
        message = ""
        if state == "failed":
            tail = run.log_tail(8).strip()
            message = (run.error or "the training process failed") + (f"\n{tail}" if tail else "")
        elif state == "waiting":
            message = run.log_tail(1)
        model_dir = job.directory / MODEL_DIR if state == "finished" else None
        slices, gpu_seconds = int(getattr(run, "slices", 0)), float(getattr(run, "gpu_seconds", 0.0))
        return JobSnapshot(job.name, state, step, max(total, step), message, records, model_dir, 0, slices, gpu_seconds)

    def public_summary(self) -> dict[str, Any]:
        """What anyone may know: whether the server trains, how far and how long, how many wait. No names, paths,
        images or metrics."""
        with self._lock:
            current = self._newest_running()
            waiting = len(self._queue)
        snapshot = self.snapshot(current) if current is not None else JobSnapshot(None, "idle")
        busy = snapshot.state in ("pending", "running")
        eta = snapshot.eta_seconds()
        return {
            "busy": busy,
            "state": snapshot.state if busy else "idle",
            "step": snapshot.step if busy else 0,
            "total_steps": snapshot.total_steps if busy else 0,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "waiting": waiting,
        }

    def checkpoint_dir(self, job: Job | None) -> tuple[tuple[str, int], Path] | None:
        """(run name, step) and folder of ``job``'s latest complete checkpoint; None before the first."""
        if job is None:
            return None
        checkpoint = latest_checkpoint(job.directory / CHECKPOINTS)
        return None if checkpoint is None else ((job.name, checkpoint.step), checkpoint.path)

    def _drop_waiting(self, job: Job) -> None:
        """Take a waiting job out of the line and forget it; a new run's folder (only ``job.json``) goes too, a
        resumed run's stays as it was."""
        self._queue.remove(job.name)
        del self._jobs[job.name]
        if not (job.directory / TRAIN_CONFIG).exists():
            shutil.rmtree(job.directory, ignore_errors=True)


class _FailedToStart:
    """The handle of a job whose child process could not be started."""

    state = "failed"
    done = True

    def __init__(self, error: str) -> None:
        self.error = error

    def records(self, *, kind: str | None = None) -> list[dict[str, Any]]:
        return []

    def stop(self, *, wait: bool = False, timeout: float | None = None) -> None:
        return None

    def stop_then_kill(self, grace: float) -> str:
        return self.state

    def wait(self, timeout: float | None = None) -> Any:
        return None

    def log_tail(self, lines: int = 20) -> str:
        return ""
