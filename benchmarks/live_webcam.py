"""Live webcam throughput and latency of the demo app, in a real browser with a fake camera, printed, not asserted.

    python -m benchmarks.live_webcam                   # 20 s of streaming with the bundled shapes model
    python -m benchmarks.live_webcam --seconds 60 --stream-every 0.1 --json live.json

The app is launched in this process and Debian's Chromium (Playwright, ``CHROMIUM_PATH`` overrides) plays a
generated Y4M of moving shapes as its camera. The Detect tab's Webcam mode is started as a visitor would (Record)
and measured three ways: the fps the page itself shows (``#live-stats``), how often the annotated image's ``src``
changes in the browser, and latency, both inside the server (``LiveTab.stream_frame``, timed by wrapping the method
before launch) and in the browser (from the chunk POST whose frame the server used to that answer's image loading).
The browser runs on the same CPUs as the server here, which a real visitor's does not: figures are pessimistic.
Targets: ≥ 12 fps shown, p95 latency ≤ 250 ms.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app import AppConfig, launch, threads_argument
from app_support.live_tab import LiveSettings, LiveTab
from benchmarks.clips import write_y4m
from ddetr.runtime.threads import ADAPTIVE, configure_threads

BUNDLED = Path(__file__).resolve().parents[1] / "ddetr" / "bundled" / "ddetr-shapes"
TARGET_FPS = 12.0
TARGET_P95_MS = 250.0
TIMEOUT_MS = 120_000

# Installed before any page script runs, so the Gradio client's fetch goes through the wrapper. Times are epoch
# milliseconds (timeOrigin + now) so they compare with the server's time.time() on this same machine.
BROWSER_PROBE = r"""
(() => {
  const bench = (window.__bench = { posts: [], srcs: [], loads: [], stats: [] });
  const now = () => performance.timeOrigin + performance.now();
  const chunk = /\/stream\/[^/?]+(\?|$)/;  // POST /stream/{event_id}; /stream/{event_id}/close ends the stream
  const originalFetch = window.fetch;
  window.fetch = function (input, init) {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    const method = ((init && init.method) || (input && input.method) || "GET").toUpperCase();
    if (method === "POST" && chunk.test(url)) bench.posts.push(now());
    return originalFetch.apply(this, arguments);
  };
  let lastSrc = null, lastStats = null;
  const check = () => {
    const image = document.querySelector("#live-output img");
    if (image && image.src && image.src !== lastSrc) {
      lastSrc = image.src;
      bench.srcs.push([now(), image.src]);
    }
    const stats = document.querySelector("#live-stats");
    const text = stats ? stats.innerText : null;
    if (text && text !== lastStats) {
      lastStats = text;
      bench.stats.push([now(), text]);
    }
  };
  document.addEventListener("DOMContentLoaded", () => {
    new MutationObserver(check).observe(document.body, {
      subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ["src"],
    });
  });
  // "load" does not bubble: listen in the capture phase for the moment each answer is decoded and shown.
  document.addEventListener("load", (event) => {
    const target = event.target;
    if (target instanceof HTMLImageElement && target.closest("#live-output")) bench.loads.push([now(), target.src]);
  }, true);
})();
"""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live_webcam", description=__doc__.split("\n\n")[0])
    defaults = LiveSettings()
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of streaming measured (default 20)")
    parser.add_argument(
        "--stream-every",
        type=float,
        default=defaults.stream_every,
        help=f"seconds between frames the browser captures (default {defaults.stream_every}, the app's)",
    )
    parser.add_argument("--precision", default="auto", help="the app's --precision (default auto)")
    parser.add_argument("--threads", type=threads_argument, default=ADAPTIVE,
                        help="the app's --threads: a count, or adaptive (default, the app's)")  # fmt: skip
    parser.add_argument("--headed", action="store_true", help="show the browser window (needs a display)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def chromium_path() -> str | None:
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class ServerTimer:
    """Wraps ``LiveTab.stream_frame`` on the class (before the app binds it) to log each call's start and end."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float, float]] = []  # (epoch start, epoch end, perf_counter seconds)
        self._original = LiveTab.stream_frame

    def install(self) -> None:
        original = self._original

        @functools.wraps(original)
        def timed(tab: LiveTab, frame: Any, *args: Any, **kwargs: Any) -> Any:
            started, wall = time.perf_counter(), time.time()
            try:
                return original(tab, frame, *args, **kwargs)
            finally:
                if frame is not None:  # "waiting for the camera" calls do no work
                    self.calls.append((wall, time.time(), time.perf_counter() - started))  # list.append is atomic

        LiveTab.stream_frame = timed  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        LiveTab.stream_frame = self._original  # type: ignore[method-assign]


def machine_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores, /proc/stat), None where there is no /proc."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def descendants_cpu_seconds(root: int) -> float | None:
    """CPU seconds used so far by the live descendants of process ``root`` (Playwright's driver and Chromium),
    None where there is no /proc."""
    if not Path("/proc/self/stat").is_file():
        return None
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces: the fields that follow start after its closing ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    total = 0.0
    for pid in used:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor not in (0, 1, root):
            ancestor = parents.get(ancestor)
        if ancestor == root:
            total += used[pid]
    return total


class CpuShare:
    """Cores' worth of CPU used between ``start`` and ``stop`` by this process (the server), by its children (the
    browser: here it shares the server's cores, which a real visitor's does not) and by everything else."""

    def _sample(self) -> tuple[float, float, float | None, float | None]:
        return time.perf_counter(), time.process_time(), descendants_cpu_seconds(os.getpid()), machine_cpu_seconds()

    def start(self) -> None:
        self._begin = self._sample()

    def stop(self) -> dict[str, float | None]:
        end = self._sample()
        wall = end[0] - self._begin[0]
        server = (end[1] - self._begin[1]) / wall
        browser = None if end[2] is None or self._begin[2] is None else (end[2] - self._begin[2]) / wall
        machine = None if end[3] is None or self._begin[3] is None else (end[3] - self._begin[3]) / wall
        others = None if machine is None or browser is None else max(0.0, machine - server - browser)
        return {"server_cores": server, "browser_cores": browser, "others_cores": others}


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None, "count": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "max": float(array.max()), "count": len(values)}  # fmt: skip


def shown_fps(stats: list[list[Any]], start: float) -> list[float]:
    """The "<x> fps" figures #live-stats showed after ``start`` (epoch ms)."""
    found = []
    for when, text in stats:
        match = re.search(r"(\d+(?:\.\d+)?) fps", text)
        if match and when >= start:
            found.append(float(match.group(1)))
    return found


def analyse(
    browser: dict[str, Any], calls: list[tuple[float, float, float]], window: tuple[float, float], warmup_ms: float
) -> dict[str, Any]:
    """Rates over ``window`` (epoch ms: first answer shown → end of streaming) and the latencies."""
    begin, end = window
    span = (end - begin) / 1000
    posts = sorted(browser["posts"])
    srcs = [(when, src) for when, src in browser["srcs"] if begin <= when <= end]
    loads = sorted(when for when, _ in browser["loads"])
    # The server's calls in ms, within the window.
    server = [(1000 * start, 1000 * finish, took) for start, finish, took in calls if begin <= 1000 * start <= end]
    # Browser-side latency of each server call: from the POST of the newest chunk that had been sent when the call
    # started (the frame the server processed: it keeps only the newest) to the first answer image loaded after
    # the call ended. Dropped chunks have no latency: they were never answered.
    latencies = []
    for start, finish, _ in server:
        used = bisect_right(posts, start) - 1
        shown = bisect_left(loads, finish)
        if used >= 0 and shown < len(loads):
            latencies.append(loads[shown] - posts[used])
    # What the brief calls the simple measure: each chunk POST to the next change of the answer's src.
    src_times = [when for when, _ in browser["srcs"]]
    naive = []
    for post in (p for p in posts if begin <= p <= end):
        following = bisect_left(src_times, post)
        if following < len(src_times):
            naive.append(src_times[following] - post)
    fps_shown = shown_fps(browser["stats"], begin + warmup_ms)
    posts_in_window = sum(begin <= p <= end for p in posts)
    return {
        "window_s": span,
        "capture_posts_per_s": posts_in_window / span,
        "server_calls_per_s": len(server) / span,
        "output_src_changes_per_s": len(srcs) / span,
        "output_loads_per_s": sum(begin <= when <= end for when in loads) / span,
        "chunks_dropped_percent": 100 * (1 - len(server) / posts_in_window) if posts_in_window else None,
        "shown_fps_median": float(np.median(fps_shown)) if fps_shown else None,
        "shown_fps_last": fps_shown[-1] if fps_shown else None,
        "server_stream_frame_ms": percentiles([1000 * seconds for _, _, seconds in server]),
        "browser_latency_ms": percentiles(latencies),
        "post_to_next_src_ms": percentiles(naive),
        "last_stats": browser["stats"][-1][1] if browser["stats"] else None,
    }


def print_table(results: dict[str, Any]) -> None:
    def figure(value: float | None, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def latency_row(name: str, row: dict[str, Any], target: bool = False) -> None:
        mark = ""
        if target and row["p95"] is not None:
            mark = f"   (target p95 ≤ {TARGET_P95_MS:g}: {'met' if row['p95'] <= TARGET_P95_MS else 'NOT met'})"
        print(f"  {name:<48} p50 {figure(row['p50']):>7}  p95 {figure(row['p95']):>7}  max {figure(row['max']):>7} "
              f"ms  (n={row['count']}){mark}")  # fmt: skip

    shown = results["shown_fps_median"]
    verdict = "" if shown is None else f"   (target ≥ {TARGET_FPS:g}: {'met' if shown >= TARGET_FPS else 'NOT met'})"
    print(f"\n== live webcam, {results['window_s']:.1f} s measured")
    last = figure(results["shown_fps_last"])
    print(f"  {'fps shown in #live-stats (median, last)':<48} {figure(shown):>7}  {last:>7}{verdict}")
    for key, label in (("output_src_changes_per_s", "#live-output src changes per s"),
                       ("output_loads_per_s", "#live-output images loaded per s"),
                       ("server_calls_per_s", "server stream_frame calls per s"),
                       ("capture_posts_per_s", "browser chunk POSTs per s (captures)")):  # fmt: skip
        print(f"  {label:<48} {figure(results[key]):>7}")
    print(f"  {'chunks dropped by the server (newest wins)':<48} {figure(results['chunks_dropped_percent']):>7} %")
    latency_row("server: LiveTab.stream_frame", results["server_stream_frame_ms"])
    latency_row("browser: chunk POST used → its answer loaded", results["browser_latency_ms"], target=True)
    latency_row("browser: any chunk POST → next src change", results["post_to_next_src_ms"])
    cpu = results.get("cpu_cores_used", {})
    print(f"  {'CPU cores used: server, browser, other processes':<48} {figure(cpu.get('server_cores'), 2):>7}  "
          f"{figure(cpu.get('browser_cores'), 2):>7}  {figure(cpu.get('others_cores'), 2):>7}")  # fmt: skip
    print(f"  last #live-stats: {results['last_stats']!r}")


def stream(
    args: argparse.Namespace, url: str, camera: Path, executable: str
) -> tuple[dict[str, Any], float, dict[str, float | None]]:
    """Drive the Webcam mode for ``args.seconds`` after the first answer; the browser's log, its start (epoch ms)
    and the CPU shares over that time."""
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
             f"--use-file-for-fake-video-capture={camera}"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=flags, headless=not args.headed)
        context = browser.new_context(viewport={"width": 1400, "height": 1100}, permissions=["camera"])
        context.add_init_script(BROWSER_PROBE)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#model-info :text('classes')")
        page.get_by_role("tab", name="Webcam").click()
        access = page.get_by_text("Click to Access Webcam")
        if access.count():
            access.first.click()
        record = page.locator("#live-input").get_by_label("capture photo")
        record.click()
        page.wait_for_selector("#live-output img")
        first = page.evaluate("() => window.__bench.srcs.length ? window.__bench.srcs[0][0] : Date.now()")
        share = CpuShare()
        share.start()
        page.wait_for_timeout(1000 * args.seconds)
        cpu = share.stop()
        log = page.evaluate("() => window.__bench")
        log["end"] = page.evaluate("() => performance.timeOrigin + performance.now()")
        record.click()  # Stop, as a visitor would
        page.wait_for_timeout(500)
        context.close()
        browser.close()
    return log, float(first), cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    executable = chromium_path()
    if executable is None:
        print("no Chromium found (apt-get install -y chromium, or set CHROMIUM_PATH)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model only: nothing to download
    configure_threads(args.threads if isinstance(args.threads, int) else None)  # what app.py's main does

    timer = ServerTimer()
    timer.install()
    with tempfile.TemporaryDirectory(prefix="ddetr-live-bench-") as directory:
        root = Path(directory)
        camera = write_y4m(root / "camera.y4m", 60)  # 4 s at 15 fps, looped by Chromium; 28 MB of raw frames
        config = AppConfig(model=str(BUNDLED), models_dir=root / "models", runs_dir=root / "runs",
                           precision=args.precision, threads=args.threads,
                           live=LiveSettings(stream_every=args.stream_every))  # fmt: skip
        launched = launch(config, host="127.0.0.1", block=False)
        url = launched.url
        try:
            print(f"app at {url}; Chromium {executable}; stream_every {args.stream_every} s; "
                  f"torch threads {torch.get_num_threads()} ({args.threads}); "
                  f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
            log, first, cpu = stream(args, url, camera, executable)
        finally:
            launched.close()
            timer.uninstall()
    results = analyse(log, timer.calls, (first, log["end"]), warmup_ms=2000)
    results["cpu_cores_used"] = cpu
    results["setup"] = {"seconds": args.seconds, "stream_every": args.stream_every, "precision": args.precision,
                        "torch_threads": torch.get_num_threads(), "threads": args.threads,
                        "camera": "640x480 y4m at 15 fps, looped",
                        "targets": {"fps": TARGET_FPS, "p95_ms": TARGET_P95_MS}}  # fmt: skip
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
