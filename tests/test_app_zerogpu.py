"""The app's GPU calls: plain functions off ZeroGPU, ``spaces.GPU`` functions on it, with picklable arguments and
results (ZeroGPU runs them in forked children) and time boxes sized from the input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import app_support.detector_cache as detector_cache
from app_support.detector_cache import DetectorCache, load_detector
from app_support.model_choices import ModelChoice
from app_support.paths import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "shapes" / "shapes_0.jpg"


def test_off_zerogpu_the_forward_pass_is_a_plain_call_and_its_parts_pickle(tiny_model_dir: Path):
    assert "spaces" not in sys.modules or not detector_cache.on_zerogpu()
    cache = DetectorCache(loader=lambda source: load_detector(source, precision="fp32"))
    choice = ModelChoice("cli", "tiny", str(tiny_model_dir), "cli")
    (candidates,) = cache.candidates(choice, [str(EXAMPLE)], size=128)
    expected = cache.get(choice).candidates([str(EXAMPLE)], size=128)[0]
    assert candidates.names == expected.names and (candidates.boxes == expected.boxes).all()
    # What a ZeroGPU call would carry: the cache's number, the choice, the images; back: the candidates.
    arguments = (cache.cache_id, choice, [str(EXAMPLE)], 128)
    assert pickle.loads(pickle.dumps(arguments)) == arguments
    returned = pickle.loads(pickle.dumps(candidates))
    assert returned.names == candidates.names and (returned.scores == candidates.scores).all()
    assert detector_cache.cache_by_id(cache.cache_id) is cache


# Run on "ZeroGPU" in a fresh interpreter: the decorators apply at import, and the test process must keep its own
# (plain) modules. ``spaces`` there is a stand-in whose GPU records what it is given (no ZeroGPU machinery).
ZEROGPU_PROBE = """
import json, sys, types
handed = {}
def GPU(*, duration):
    def decorate(function):
        handed[function.__name__] = duration
        return function
    return decorate
sys.modules["spaces"] = types.SimpleNamespace(GPU=GPU)
import app_support.detector_cache as cache
import app_support.video_tab as video
import ddetr
settings = video.VideoSettings()
job = video.VideoJob(sys.argv[1], "/unused", video.DetectionSettings(), 4, 1, settings.limits())
every_third = video.VideoJob(sys.argv[1], "/unused", video.DetectionSettings(), 4, 3, settings.limits())
ddetr.pipeline = lambda **kwargs: kwargs
print(json.dumps({
    "forward": handed["_forward"],
    "video_is_sized_by_the_input": handed["_annotate_on_gpu"] is video.video_gpu_seconds,
    "video_seconds": video.video_gpu_seconds(0, None, job),
    "video_seconds_every_third": video.video_gpu_seconds(0, None, every_third),
    "setup": video.GPU_SETUP_SECONDS, "per_frame": video.GPU_SECONDS_PER_FRAME, "image": cache.IMAGE_GPU_SECONDS,
    "device": cache.load_detector("some/model")["device"],
}))
"""


def test_on_zerogpu_images_and_videos_are_gpu_calls_sized_from_their_input(moving_shapes_clip: Any):
    environment = {**os.environ, "SPACES_ZERO_GPU": "true"}
    probe = [sys.executable, "-c", ZEROGPU_PROBE, str(moving_shapes_clip.path)]
    done = subprocess.run(probe, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["forward"] == seen["image"] == 30
    assert seen["video_is_sized_by_the_input"]
    frames = len(moving_shapes_clip.truth)  # 30
    assert seen["video_seconds"] == int(seen["setup"] + frames * seen["per_frame"])
    assert seen["video_seconds_every_third"] == int(seen["setup"] + 10 * seen["per_frame"])
    assert seen["device"] == "cuda"  # models are placed on the GPU at load, in the main process


def test_a_video_cancel_crosses_the_process_boundary_and_locks_survive_a_fork(tmp_path: Path):
    from app_support.video_tab import CancelFlag

    flag = CancelFlag(str(tmp_path / "cancel"))
    copy = pickle.loads(pickle.dumps(flag))  # what a ZeroGPU call receives
    assert not copy.is_set()
    flag.set()
    assert copy.is_set()
    flag.clear()
    assert not copy.is_set()

    # A GPU call is a forked child: a lock another thread held at the fork must not be held there.
    cache = DetectorCache()
    cache.inference_lock.acquire()
    try:
        child = os.fork()
        if child == 0:  # the child: exit 0 only if the lock is free
            os._exit(0 if cache.inference_lock.acquire(timeout=2) else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        cache.inference_lock.release()
