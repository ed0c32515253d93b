"""Does bf16-autocast training converge like float32? The same shapes run from scratch twice, once per precision.

    python -m benchmarks.bf16_training --output-dir runs/bf16-check            # 2000 steps each (the check)
    python -m benchmarks.bf16_training --output-dir /tmp/quick --steps 60      # a smoke run

Both runs use the same data, seed and recipe (the bundled model's first phase: ``small`` preset, 256 px, batch 4);
each evaluates its validation split every epoch while it trains (in its own precision), and at the end both final
models are evaluated on the held-out test split in float32, so the comparison is about the trained weights. An
interrupted check resumes (``--resume`` is passed to a run that has a checkpoint). Prints both validation curves and
the held-out mAPs; ``--json`` writes them. The two runs train side by side, one thread each, unless ``--sequential``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="one run folder per precision inside it")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (default 2000)")
    parser.add_argument("--train-images", type=int, default=2000, help="shapes training images (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequential", action="store_true", help="one run after the other, all threads each")
    parser.add_argument("--json", type=Path, default=None, help="write the curves and mAPs here")
    return parser.parse_args(argv)


def dataset_spec(train_images: int) -> str:
    return f"shapes:train={train_images},validation=200,test=300,size=256"


def training_command(args: argparse.Namespace, precision: str) -> list[str]:
    folder = args.output_dir / precision
    command = [sys.executable, "-m", "finetune", "--dataset", dataset_spec(args.train_images), "--model", "small",
               "--image-size", "256", "--max-steps", str(args.steps), "--batch-size", "4", "--lr", "2e-4",
               "--lr-backbone", "2e-4", "--lr-drop", "0.8", "--eval-every", "1", "--save-every", "250",
               "--log-every", "20", "--seed", str(args.seed), "--precision", precision, "--no-progress",
               "--output-dir", str(folder)]  # fmt: skip
    if not args.sequential:
        command += ["--threads", "1"]
    if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()):
        command.append("--resume")
    return command


def records(folder: Path, kind: str) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [record for record in map(json.loads, filter(None, lines)) if record.get("type") == kind]


def held_out_map(args: argparse.Namespace, precision: str) -> float:
    """mAP@[.5:.95] of the run's final model on the test split, evaluated in float32."""
    command = [sys.executable, "-m", "finetune.evaluate", "--model", str(args.output_dir / precision / "model"),
               "--dataset", dataset_spec(args.train_images), "--split", "test", "--image-size", "256",
               "--batch-size", "8", "--precision", "fp32"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["map"])


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    commands = {precision: training_command(args, precision) for precision in PRECISIONS}
    with contextlib.ExitStack() as stack:
        logs = {p: stack.enter_context(open(args.output_dir / f"{p}.log", "a")) for p in PRECISIONS}
        if args.sequential:
            for precision, command in commands.items():
                subprocess.run(command, stdout=logs[precision], stderr=subprocess.STDOUT, check=True)
        else:
            running = {p: subprocess.Popen(c, stdout=logs[p], stderr=subprocess.STDOUT) for p, c in commands.items()}
            failed = [precision for precision, process in running.items() if process.wait() != 0]
            if failed:
                print(f"training failed for {failed}; see {args.output_dir}/<precision>.log", file=sys.stderr)
                return 1
    results: dict[str, Any] = {"steps": args.steps, "seed": args.seed, "dataset": dataset_spec(args.train_images)}
    print(f"bf16 vs fp32 training, shapes from scratch, {args.steps} steps, batch 4, 256 px")
    print(f"{'step':>6} {'fp32 val mAP':>13} {'bf16 val mAP':>13} {'fp32 loss':>10} {'bf16 loss':>10}")
    evaluations = {p: {r["step"]: r["map"] for r in records(args.output_dir / p, "eval")} for p in PRECISIONS}
    losses = {p: {r["step"]: r["loss"] for r in records(args.output_dir / p, "train")} for p in PRECISIONS}
    for step in sorted(set(evaluations["fp32"]) | set(evaluations["bf16"])):
        cells = [evaluations[p].get(step, float("nan")) for p in PRECISIONS]
        loss = [losses[p].get(step, float("nan")) for p in PRECISIONS]
        print(f"{step:>6} {cells[0]:>13.4f} {cells[1]:>13.4f} {loss[0]:>10.3f} {loss[1]:>10.3f}")
    held_out = {precision: held_out_map(args, precision) for precision in PRECISIONS}
    difference = held_out["bf16"] - held_out["fp32"]
    print(f"held-out test mAP (evaluated in fp32): fp32-trained {held_out['fp32']:.4f}, "
          f"bf16-trained {held_out['bf16']:.4f}, difference {difference:+.4f} (criterion: within 0.02)")  # fmt: skip
    results |= {"validation_map": evaluations, "loss": losses, "test_map": held_out, "difference": difference}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
