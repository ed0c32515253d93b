"""``python -m finetune.run.child RUN_DIR --parent-pid PID``: the child process of ``finetune.run.process``.

It trains the ``TrainConfig`` that the parent wrote to ``RUN_DIR/process_config.json`` with ``run_training`` (the
engine of ``python -m finetune``: SIGTERM stops it after the current step with a checkpoint at that step), and
reports an exception as ``"Type: message"`` in ``RUN_DIR/process_error.json`` (exit code 1).

It never outlives the parent. On Linux ``PR_SET_PDEATHSIG`` has the kernel signal it the moment the parent dies,
without a thread or a hook in the training loop. The kernel sends that signal again each time the child is handed
to another of the dying parent's threads, and the engine takes a second SIGTERM as "abort now", so the death
signal is SIGHUP, whose handler turns the first one into the engine's SIGTERM (a graceful stop with a checkpoint)
and ignores the rest. The request takes effect only once this module runs, so the child then compares
``os.getppid()`` with the parent's pid and ends at once if the parent is already gone. Without prctl (not Linux) a
thread polls ``os.getppid()`` every second and sends the SIGHUP itself.

With several CUDA GPUs (device ``auto`` or ``cuda``) the child supervises torchrun, which starts this module once
per GPU: it passes one SIGTERM on (a stop, or the parent's death), and shares its process group, so ``kill()``
reaches it. The workers get SIGKILL when torchrun dies: torchrun stops them itself (SIGTERM, then a wait) on any
orderly exit, so its sudden death means the run was killed.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.run.files import write_json
from finetune.run.process import PROCESS_CONFIG, PROCESS_ERROR

logger = logging.getLogger("finetune.run.child")
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
DEATH_SIGNAL = signal.SIGHUP  # no terminal sends it: the child has its own session
EXIT_FAILED = 1
# How long torchrun waits for its workers' graceful stop (a step and a checkpoint) before it kills them.
TORCHRUN_SHUTDOWN_SECONDS = "600"


def die_with_parent(number: int) -> bool:
    """Ask the kernel to send signal ``number`` when the parent dies (Linux); False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(number), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent: int, interval: float = 1.0) -> None:
    """Send this process the death signal once ``parent`` is gone (it is re-parented then); in a daemon thread."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), DEATH_SIGNAL)

    threading.Thread(target=watch, name="finetune-parent-watch", daemon=True).start()


class _OneStop:
    """A signal handler that sends ``target`` (a pid; this process by default) one SIGTERM, whatever number of
    signals it receives; until ``target`` is known a signal is remembered and sent with ``arm``."""

    def __init__(self) -> None:
        self.target: int | None = None
        self.requested = False
        self.sent = False

    def __call__(self, _signum: int, _frame: Any) -> None:
        self.requested = True
        self._send()

    def arm(self, target: int) -> None:
        self.target = target
        self._send()

    def _send(self) -> None:
        if self.requested and not self.sent and self.target is not None:
            self.sent = True
            os.kill(self.target, signal.SIGTERM)


def gpu_processes(config: TrainConfig) -> int:
    """How many processes to train with: one per CUDA GPU when there are several and the device lets them all in."""
    if config.device not in ("auto", "cuda"):
        return 1
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def _under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _supervise_torchrun(run_dir: Path, processes: int, stop: _OneStop) -> int:
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_SHUTDOWN_SECONDS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command += ["-m", "finetune.run.child", str(run_dir)]
    logger.info("%d CUDA GPUs: training under torchrun, one process each", processes)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, stop)  # stop(): one SIGTERM to torchrun, which stops its workers gracefully
    agent = subprocess.Popen(command)  # the same process group and log as this process
    stop.arm(agent.pid)
    returncode = agent.wait()
    if returncode < 0:  # died of a signal: so do we, so that the parent reads the same
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


def _report_failure(run_dir: Path, error: BaseException, rank: int) -> None:
    summary = f"{type(error).__name__}: {error}"
    if isinstance(error, (ValueError, FileNotFoundError)):
        logger.error("%s", summary)  # bad settings or data: the message says it all
    else:
        logger.error("training failed\n%s", "".join(traceback.format_exception(error)))
    if rank == 0:
        write_json(run_dir / PROCESS_ERROR, {"error": summary, "time": time.time()})


def _train(run_dir: Path, config: TrainConfig, rank: int, parent: int | None) -> int:
    from finetune.run.launch import run_training

    if rank == 0:
        action = "resuming" if config.resume else "starting"
        threads = config.threads if config.threads is not None else "torch's default"
        logger.info("process %d (parent %s): %s %s, %s CPU threads", os.getpid(), parent, action, run_dir, threads)
    try:
        result = run_training(config)
    except Exception as error:
        _report_failure(run_dir, error, rank)
        return EXIT_FAILED
    if rank == 0:
        logger.info("%s", result.message)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.run.child", description="a ProcessRun's child")
    parser.add_argument("run_dir", type=Path, help=f"run folder holding {PROCESS_CONFIG}")
    parser.add_argument("--parent-pid", type=int, default=None, help="the starting process (absent under torchrun)")
    arguments = parser.parse_args(argv)
    run_dir: Path = arguments.run_dir
    parent: int | None = arguments.parent_pid
    worker = _under_torchrun()
    rank = int(os.environ.get("RANK", "0"))
    stop = _OneStop()
    if worker:
        die_with_parent(signal.SIGKILL)
    else:
        signal.signal(DEATH_SIGNAL, stop)  # before asking for it: its default action would end the process
        watched = die_with_parent(DEATH_SIGNAL)
        if parent is not None and os.getppid() != parent:
            return 0  # the parent died before it could be watched: nothing was started, nobody is waiting
        if not watched and parent is not None:
            watch_parent(parent)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = TrainConfig.load(run_dir / PROCESS_CONFIG)  # ValueError for a missing or unreadable file
    except ValueError as error:
        _report_failure(run_dir, error, rank)
        return EXIT_FAILED
    if not worker and (processes := gpu_processes(config)) > 1:
        return _supervise_torchrun(run_dir, processes, stop)
    stop.arm(os.getpid())  # the parent's death: the engine's own SIGTERM, once
    return _train(run_dir, config, rank, parent)


if __name__ == "__main__":
    sys.exit(main())
