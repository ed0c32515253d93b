"""``python -m benchmarks.shared_load``: how a shared server answers ``/detect`` while a fine-tuning job trains and
one session floods it (40 ``/finetune_stream`` joins and 4 threads calling ``/finetune_status``).

It launches the app on 127.0.0.1 (offline, the bundled model, fp32, a throw-away runs folder), times ``/detect``
through ``gradio_client`` idle, while a job trains, and while it trains under the flood, then times Stop. Medians of
``--calls`` calls; every loop is bounded and everything it started is stopped at the end. Figures depend on the CPU
and on what else runs: compare the three columns of one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes" / "shapes_0.jpg"
TINY_JOB = {"kind": "shapes", "shapes_train": 16, "shapes_validation": 4, "shapes_size": 128, "hub_id": "",
            "folder": "", "upload": None, "base_model": "preset:tiny", "epochs": 200, "batch_size": 4,
            "save_every": 1000}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=8, help="/detect calls per measurement (default 8)")
    parser.add_argument("--joins", type=int, default=40, help="stream joins from the flooding session (default 40)")
    parser.add_argument("--flooders", type=int, default=4, help="threads calling /finetune_status (default 4)")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds the job trains before timing (default 8)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from gradio_client import Client, handle_file

    from app import AppConfig, launch

    root = Path(tempfile.mkdtemp(prefix="ddetr-shared-load-"))
    launched = launch(AppConfig(models_dir=root / "models", runs_dir=root / "runs", precision="fp32"),
                      host="127.0.0.1", block=False)  # fmt: skip
    client = Client(launched.url, verbose=False)
    try:

        def detect_ms() -> float:
            times = []
            for _ in range(args.calls):
                started = time.perf_counter()
                client.predict(handle_file(str(EXAMPLE)), 0.5, api_name="/detect")
                times.append((time.perf_counter() - started) * 1000)
            return statistics.median(times)

        detect_ms()  # the model loads on the first calls
        figures: dict[str, Any] = {"detect_ms_idle": detect_ms()}
        job = client.predict(**TINY_JOB, api_name="/finetune_start")
        time.sleep(args.warmup)
        figures["detect_ms_training"] = detect_ms()
        joins = [client.submit(job["token"], api_name="/finetune_stream") for _ in range(args.joins)]
        flooding = [True]

        def flood() -> tuple[int, int]:
            answered = refused = 0
            while flooding[0]:
                try:
                    client.predict(api_name="/finetune_status")
                    answered += 1
                except Exception:  # the rate limit's refusal: counted
                    refused += 1
            return answered, refused

        with concurrent.futures.ThreadPoolExecutor(args.flooders) as pool:
            flooders = [pool.submit(flood) for _ in range(args.flooders)]
            time.sleep(1.0)
            figures["detect_ms_training_flooded"] = detect_ms()
            started = time.perf_counter()
            client.predict(job["token"], api_name="/finetune_stop")
            figures["stop_ms_flooded"] = (time.perf_counter() - started) * 1000
            flooding[0] = False
            counts = [future.result(timeout=60) for future in flooders]
        figures["status_answered"] = sum(answered for answered, _ in counts)
        figures["status_refused"] = sum(refused for _, refused in counts)
        for handle in joins:
            handle.cancel()
    finally:
        client.close()
        launched.close(grace=30)
    idle, training, flooded = (figures[key] for key in ("detect_ms_idle", "detect_ms_training",
                                                         "detect_ms_training_flooded"))  # fmt: skip
    print(f"/detect median over {args.calls} calls (ms): idle {idle:.0f} | while training {training:.0f} "
          f"({training / idle:.2f}x) | training + {args.joins} stream joins + {args.flooders}-thread status flood "
          f"{flooded:.0f} ({flooded / idle:.2f}x)")  # fmt: skip
    print(
        f"Stop under the flood: {figures['stop_ms_flooded']:.0f} ms; status calls answered "
        f"{figures['status_answered']}, refused by the rate limit {figures['status_refused']}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
