"""Print the max |ours - transformers| of logits and boxes per variant and checkpoint format.

python -m tests.parity_report

A report, not a test: nothing here is collected by a plain ``pytest`` run (no ``test_`` prefix). ``main`` runs
this file under pytest, so that the models come from the shared fixtures in ``tests/conftest.py`` (the same
transformers oracle the parity tests use) rather than from a second copy of their builders.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ddetr import DeformableDetrForObjectDetection


def max_errors(reference, ours, pixel_values, pixel_mask) -> tuple[float, float]:
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, pixel_mask=pixel_mask)
        actual = ours(pixel_values, pixel_mask)
    return (
        (expected.logits - actual.logits).abs().max().item(),
        (expected.pred_boxes - actual.pred_boxes).abs().max().item(),
    )


def report_variant(transformers_variant, transformers_model, batch_of_two, perturb_, parity_rows) -> None:
    """One variant's rows; collected (once per variant) only by ``main``."""
    import transformers

    pixel_values, pixel_mask = batch_of_two(seed=11, sizes=((160, 224), (128, 96)))
    reference = transformers_model(transformers_variant, seed=11)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(Path(directory) / "theirs")
        ours = DeformableDetrForObjectDetection.from_pretrained(Path(directory) / "theirs")
        rows = [("transformers save -> ddetr load", *max_errors(reference, ours, pixel_values, pixel_mask))]
        perturb_(ours, seed=12)
        ours.save_pretrained(Path(directory) / "ours")
        back = transformers.DeformableDetrForObjectDetection.from_pretrained(Path(directory) / "ours").eval()
        rows.append(("ddetr save -> transformers load", *max_errors(back, ours, pixel_values, pixel_mask)))
    parity_rows.extend((transformers_variant, *row) for row in rows)


class _Report:
    """A pytest plugin: hands ``report_variant`` its list of rows and prints them as a table at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, float]] = []

    @pytest.fixture
    def parity_rows(self) -> list[tuple[str, str, float, float]]:
        return self.rows

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(f"{'variant':<14} {'direction':<34} {'max |dlogits|':>14} {'max |dboxes|':>14}")
        for variant, direction, logits_error, boxes_error in self.rows:
            terminalreporter.write_line(f"{variant:<14} {direction:<34} {logits_error:>14.3g} {boxes_error:>14.3g}")


def main() -> int:
    arguments = [__file__, "-q", "-p", "no:cacheprovider", "-o", "python_functions=report_", "-o", "addopts="]
    arguments += ["-o", f"python_files={Path(__file__).name}"]
    return pytest.main(arguments, plugins=[_Report()])


if __name__ == "__main__":
    sys.exit(main())
