"""``python -m finetune``: the command line of the training engine (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ddetr.runtime.precision import PRECISIONS
from finetune.api import resume_config
from finetune.config import SCHEDULES, TrainConfig
from finetune.data.augment import AUGMENT_MODES
from finetune.data.formats import DATASET_FORMATS
from finetune.hub_commit import HubPushError, check_push_target
from finetune.presets import PRESETS
from finetune.run.hub_model import push_model
from finetune.run.launch import run_training
from finetune.run.trainer import RunResult

EXIT_DIVERGED = 3
EXIT_BAD_INPUT = 2
EXIT_PUSH_FAILED = 4  # the run finished and its model is saved, but the Hub push failed

_EPILOG = """\
dataset SRC: shapes[:train=N,validation=N,test=N,size=PX] (synthetic); a dataset folder or .zip in COCO (also Roboflow's
  and COCO 2017's layouts), YOLO (data.yaml; Ultralytics or Roboflow layout), Pascal VOC, Label Studio JSON or CVAT
  for images 1.1 format, detected from its layout (--dataset-format names it instead); a COCO or Label Studio JSON
  file, a YOLO data.yaml or a CVAT annotations.xml; a folder written by save_to_disk; an image folder with
  metadata.jsonl; or a Hugging Face hub id. Files the dataset names must lie inside its folder (a hub dataset's: the
  datasets cache); --allow-outside-files lifts this for your own dataset that points at your own files elsewhere.
model SRC: a preset ({presets}) trained from scratch, or a checkpoint folder / hub id to fine-tune (class heads are
  re-initialised when the dataset's classes differ).

examples:
  python -m finetune --dataset shapes --model small --output-dir runs/shapes --epochs 30 --batch-size 8
  python -m finetune --resume --output-dir runs/shapes
  hf auth login   # once (or set HF_TOKEN); then the model is pushed private when the run finishes:
  python -m finetune --dataset shapes --model small --output-dir runs/shapes --push-to-hub you/ddetr-shapes
  torchrun --nproc_per_node=2 -m finetune --dataset cppe5_dir --model r50 --output-dir runs/cppe5
"""


def build_parser() -> argparse.ArgumentParser:
    # The declared defaults (lr_backbone's None: derived from --lr, which its help says).
    field_defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    presets = ", ".join(f"{name} ({preset.description})" for name, preset in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Train or fine-tune Deformable DETR on a detection dataset, with COCO evaluation and exact resume.",
        epilog=_EPILOG.format(presets=presets),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )

    def add(group: Any, flag: str, field: str, help: str, **kwargs: Any) -> None:
        default = field_defaults[field]
        shown = default is not None and not isinstance(default, bool) and field not in ("dataset", "output_dir")
        suffix = f" (default: {default})" if shown else ""
        group.add_argument(flag, dest=field, help=help + suffix, **kwargs)

    group = parser.add_argument_group("what to train")
    add(group, "--dataset", "dataset", "dataset source (see below)", metavar="SRC")
    add(
        group,
        "--dataset-format",
        "dataset_format",
        "format of --dataset; auto detects it from the folder's layout",
        choices=DATASET_FORMATS,
    )
    add(group, "--model", "model", "preset name, checkpoint folder or hub id", metavar="SRC")
    add(group, "--output-dir", "output_dir", "run folder: metrics, plots, checkpoints, final model", metavar="DIR")
    add(
        group,
        "--resume",
        "resume",
        "continue the run in --output-dir from its latest complete checkpoint",
        action="store_true",
    )
    add(group, "--strict", "strict", "treat any dataset problem as an error naming the record", action="store_true")
    add(
        group,
        "--allow-outside-files",
        "allow_outside_files",
        "read files the dataset names outside its own folder (absolute or ../ image paths, symlinks leading out, "
        "save_to_disk files); refused by default. Only for your own dataset pointing at your own files",
        action="store_true",
    )
    add(
        group,
        "--validation-fraction",
        "validation_fraction",
        "share of train held out when there is no validation split",
        type=float,
    )

    group = parser.add_argument_group("length and batches")
    add(group, "--epochs", "epochs", "epochs to train", type=int)
    add(group, "--max-steps", "max_steps", "optimizer steps to train (overrides --epochs)", type=int)
    add(group, "--batch-size", "batch_size", "images per process and step", type=int)
    add(group, "--grad-accum-steps", "grad_accum_steps", "batches accumulated per optimizer step", type=int)
    add(group, "--image-size", "image_size", "short side in pixels at evaluation (default: the model's)", type=int)
    add(group, "--max-size", "max_size", "long side cap in pixels (default: 1333/800 of --image-size)", type=int)
    add(group, "--augment", "augment", "augmentation recipe", choices=AUGMENT_MODES)
    add(group, "--seed", "seed", "random seed", type=int)
    add(group, "--dropout", "dropout", "transformer dropout (default: the model's)", type=float)

    group = parser.add_argument_group("optimisation (paper recipe by default)")
    add(group, "--lr", "lr", "learning rate", type=float)
    add(group, "--lr-backbone", "lr_backbone", "backbone learning rate (default: --lr / 10)", type=float)
    add(group, "--weight-decay", "weight_decay", "AdamW weight decay", type=float)
    add(group, "--clip-grad-norm", "clip_grad_norm", "gradient norm clip (0: off)", type=float)
    add(group, "--lr-schedule", "lr_schedule", "LR schedule", choices=SCHEDULES)
    add(
        group,
        "--lr-drop",
        "lr_drop",
        "fraction of training after which the step schedule multiplies the LR by 0.1",
        type=float,
    )
    add(group, "--warmup-steps", "warmup_steps", "linear LR warm-up steps", type=int)
    add(
        group,
        "--precision",
        "precision",
        "numeric precision (auto: bf16 where native, i.e. GPUs and CPUs with AMX or AVX512-BF16; fp16 on GPUs "
        "without bf16; else fp32)",
        choices=PRECISIONS,
    )
    add(
        group,
        "--ema",
        "ema",
        "keep an exponential moving average of the weights (evaluated and exported)",
        action="store_true",
    )
    add(group, "--ema-decay", "ema_decay", "EMA decay", type=float)

    group = parser.add_argument_group("checkpoints, evaluation and logging")
    add(group, "--save-every", "save_every", "checkpoint every N steps (0: only on stop and at the end)", type=int)
    add(group, "--keep-checkpoints", "keep_checkpoints", "complete checkpoints kept", type=int)
    add(
        group,
        "--eval-every",
        "eval_every",
        "evaluate the validation split every N epochs (0: only at the end)",
        type=int,
    )
    add(
        group,
        "--eval-batch-size",
        "eval_batch_size",
        "images per process when evaluating (default: --batch-size)",
        type=int,
    )
    add(group, "--log-every", "log_every", "write a metrics record every N steps", type=int)
    add(group, "--device", "device", "auto, cpu, cuda or cuda:N", metavar="DEVICE")
    add(group, "--num-workers", "num_workers", "data loading worker processes", type=int)
    add(
        group,
        "--threads",
        "threads",
        "CPU threads per process (default: torch's; 1 is often fastest on a busy CPU)",
        type=int,
    )
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")

    group = parser.add_argument_group("keeping the model on the Hugging Face Hub")
    group.add_argument(
        "--push-to-hub",
        dest="push_to_hub",
        metavar="REPO",
        help="when the run finishes, push model/ (weights and configs), the training curves and a generated model "
        "card (metrics, data, settings, usage) to the Hub model repo REPO (owner/name) in one commit; a stopped or "
        "diverged run is not pushed. The token comes from HF_TOKEN or the login of `hf auth login`, never from "
        "the command line (other users could read it with ps). A finished run is pushed later with --resume "
        "--output-dir DIR --push-to-hub REPO",
    )
    group.add_argument(
        "--hub-public", dest="hub_public", action="store_true", help="create REPO public (default: private)"
    )
    # Refused with a message of its own: argparse's "unrecognized arguments" would echo the token.
    group.add_argument("--hub-token", dest="hub_token", nargs="?", help=argparse.SUPPRESS)
    return parser


def config_from_arguments(arguments: dict[str, Any]) -> TrainConfig:
    """A new run's settings, or the saved ones of the run being resumed (with the allowed overrides)."""
    if arguments.get("resume"):
        if "output_dir" not in arguments:
            raise ValueError("--resume needs --output-dir, the folder of the run to continue")
        overrides = {key: value for key, value in arguments.items() if key not in ("output_dir", "resume")}
        return resume_config(arguments["output_dir"], **overrides)
    missing = [flag for flag, key in (("--dataset", "dataset"), ("--output-dir", "output_dir")) if key not in arguments]
    if missing:
        raise ValueError(f"{' and '.join(missing)} required (or --resume with --output-dir)")
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in arguments.items() if key in known})


def hub_token(repo_id: str) -> str:
    """The token for ``--push-to-hub``: ``HF_TOKEN`` or the stored login. Checked, with the repo id, before
    training starts, so that a typo does not surface only after hours of training."""
    import huggingface_hub

    token = huggingface_hub.get_token()
    if not token:
        raise HubPushError(
            "--push-to-hub needs a Hugging Face token with write access (huggingface.co/settings/tokens): set "
            "HF_TOKEN or log in once with `hf auth login`"
        )
    return check_push_target(repo_id, token)


def _push(result: RunResult, repo_id: str, token: str, public: bool) -> int:
    """Push a finished run's model (exit status 0) or say why not (the run's own status, or EXIT_PUSH_FAILED)."""
    again = f"python -m finetune --resume --output-dir {result.output_dir} --push-to-hub {repo_id}"
    again += " --hub-public" if public else ""
    if result.state != "finished":
        print(
            f"not pushed to {repo_id}: the run {result.state} before the end; resume it with: {again}",
            file=sys.stderr,
        )
        return EXIT_DIVERGED if result.state == "diverged" else 0
    try:
        url = push_model(result.output_dir, repo_id, token=token, private=not public)
    except HubPushError as error:
        print(
            f"error: not pushed to {repo_id}: {error}. The model stays in the run folder; retry: {again}",
            file=sys.stderr,
        )
        return EXIT_PUSH_FAILED
    print(f"pushed the model to {url} ({'public' if public else 'private'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = vars(parser.parse_args(argv))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    repo_id, public = arguments.pop("push_to_hub", None), arguments.pop("hub_public", False)
    if "hub_token" in arguments:
        refusal = (
            "error: --hub-token is not accepted: a token on the command line is visible to other users (ps). Set "
            "HF_TOKEN or log in once with `hf auth login`"
        )
        print(refusal, file=sys.stderr)
        return EXIT_BAD_INPUT
    token = None
    try:
        if repo_id is not None:
            token = hub_token(repo_id)
        config = config_from_arguments(arguments)
        result = run_training(config)
    except (ValueError, FileNotFoundError) as error:
        # Bad settings, data or model sources: a message, not a traceback (a missing checkpoint is FileNotFound).
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if rank != 0:
        return EXIT_DIVERGED if result.state == "diverged" else 0
    print(result.message)
    if repo_id is not None and token is not None:
        return _push(result, repo_id, token, public)
    return EXIT_DIVERGED if result.state == "diverged" else 0
