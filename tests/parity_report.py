"""Print the max |ours - transformers| of logits and boxes per variant and checkpoint format.

python -m tests.parity_report
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ddetr import DeformableDetrForObjectDetection
from tests.reference_models import VARIANTS, batch_of_two, perturb_, transformers_model


def max_errors(reference, ours, pixel_values, pixel_mask) -> tuple[float, float]:
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, pixel_mask=pixel_mask)
        actual = ours(pixel_values, pixel_mask)
    return (
        (expected.logits - actual.logits).abs().max().item(),
        (expected.pred_boxes - actual.pred_boxes).abs().max().item(),
    )


def main() -> None:
    import transformers

    pixel_values, pixel_mask = batch_of_two(seed=11, sizes=((160, 224), (128, 96)))
    print(f"{'variant':<14} {'direction':<34} {'max |dlogits|':>14} {'max |dboxes|':>14}")
    for variant in VARIANTS:
        reference = transformers_model(variant, seed=11)
        with tempfile.TemporaryDirectory() as directory:
            reference.save_pretrained(Path(directory) / "theirs")
            ours = DeformableDetrForObjectDetection.from_pretrained(Path(directory) / "theirs")
            rows = [("transformers save -> ddetr load", *max_errors(reference, ours, pixel_values, pixel_mask))]
            perturb_(ours, seed=12)
            ours.save_pretrained(Path(directory) / "ours")
            back = transformers.DeformableDetrForObjectDetection.from_pretrained(Path(directory) / "ours").eval()
            rows.append(("ddetr save -> transformers load", *max_errors(back, ours, pixel_values, pixel_mask)))
        for direction, logits_error, boxes_error in rows:
            print(f"{variant:<14} {direction:<34} {logits_error:>14.3g} {boxes_error:>14.3g}")


if __name__ == "__main__":
    main()
