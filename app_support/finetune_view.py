"""What the Fine-tune tab shows of a job: the loss and mAP plots, the evaluation table and the status line.

The owner's page shows their own job in full; everyone else sees only the public summary (busy or idle, step,
time left, how many wait), never a run's name, data, metrics or predictions.
"""

from __future__ import annotations

import html
import math
from typing import Any

import pandas as pd

from app_support.jobs import JobSnapshot
from app_support.paths import AppPaths
from app_support.slice_jobs import SLICE_SECONDS

LOSS_SERIES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
MAP_SERIES = ("map", "map_50", "map_75")
METRIC_COLUMNS = ("step", "epoch", "map", "map_50", "map_75", "mar_100")
# Explicit column types: the plot fixes its axis types from the first frame it gets, and an empty frame would
# otherwise make every column "nominal" (one tick per distinct loss value, no line).
PLOT_TYPES = {"step": "int64", "value": "float64", "series": "string"}


def loss_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {"step": r["step"], "value": r[name], "series": name}
        for r in records
        if r.get("type") == "train"
        for name in LOSS_SERIES
        if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])
    ]
    return pd.DataFrame(rows, columns=list(PLOT_TYPES)).astype(PLOT_TYPES)


def map_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {"step": r["step"], "value": max(0.0, r[name]), "series": name}
        for r in records
        if r.get("type") == "eval"
        for name in MAP_SERIES
        if isinstance(r.get(name), (int, float))
    ]
    return pd.DataFrame(rows, columns=list(PLOT_TYPES)).astype(PLOT_TYPES)


def metrics_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    def shown(value: Any) -> Any:
        # COCO reports -1 for an area bucket without objects; a table should say n/a.
        return "n/a" if isinstance(value, (int, float)) and value < 0 else value

    return [
        [shown(round(r[c], 4)) if isinstance(r.get(c), float) else r.get(c) for c in METRIC_COLUMNS]
        for r in records
        if r.get("type") == "eval"
    ]


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"about {seconds / 60:.1f} min left"


def status_html(snapshot: JobSnapshot, paths: AppPaths, summary: dict[str, Any]) -> str:
    """The owner's job in full, or (no job of theirs) the server's public summary."""
    if snapshot.run_name is None:
        return public_status_html(summary)
    total = max(snapshot.total_steps, 1)
    train = [r for r in snapshot.records if r.get("type") == "train"]
    speed = train[-1].get("steps_per_second") if train else None
    details = [f"<b>{html.escape(snapshot.state)}</b>"]
    if snapshot.state == "queued":
        details.append(f"place {snapshot.place_in_line} in line (one job trains at a time)")
    else:
        details.append(f"step {snapshot.step} / {snapshot.total_steps or '?'}")
    if train and isinstance(train[-1].get("loss"), float):
        details.append(f"loss {train[-1]['loss']:.3f}")
    if snapshot.active and speed:
        details.append(f"{speed:.2f} steps/s, {_minutes(snapshot.eta_seconds())}")
    if snapshot.slices:
        eta = snapshot.eta_seconds()
        left = f", about {math.ceil(eta / SLICE_SECONDS)} more" if eta else ""
        details.append(
            f"{snapshot.slices} GPU slices{left}; {snapshot.gpu_seconds / 60:.1f} min of your daily GPU quota used"
        )
    if snapshot.message:
        details.append(html.escape(paths.redact(snapshot.message)).replace("\n", "<br>"))
    return (
        f'<div id="finetune-status-text">your run {html.escape(snapshot.run_name)} · {" · ".join(details)}</div>'
        f'<progress value="{snapshot.step}" max="{total}" style="width:100%"></progress>'
    )


def public_status_html(summary: dict[str, Any]) -> str:
    if not summary.get("busy"):
        text = "No training job is running on this server; yours would start at once."
        if summary.get("waiting"):
            text = f"{summary['waiting']} job(s) waiting to start."
    else:
        eta = _minutes(summary.get("eta_seconds"))
        text = f"The server is training another visitor's job: step {summary['step']} / {summary['total_steps']}"
        text += f", {eta}" if eta else ""
        if summary.get("waiting"):
            text += f"; {summary['waiting']} waiting"
        text += ". A job you start waits in line."
    return f'<div id="finetune-status-text">{html.escape(text)}</div>'
