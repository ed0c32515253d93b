"""The work the benchmark times, the same for both implementations: inference and one training step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddetr.runtime.precision import FP32, Precision


def load_model(implementation: str, directory: Path, device: torch.device) -> Any:
    if implementation == "ours":
        from ddetr.model.object_detection import DeformableDetrForObjectDetection

        return DeformableDetrForObjectDetection.from_pretrained(directory).to(device).eval()
    import transformers

    return transformers.DeformableDetrForObjectDetection.from_pretrained(directory).to(device).eval()


def random_batch(batch: int, height: int, width: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator).to(device)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=device)
    return pixel_values, pixel_mask


def random_labels(batch: int, device: torch.device, objects: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for _ in range(batch):
        centres = 0.2 + 0.6 * torch.rand(objects, 2, generator=generator)
        sizes = 0.05 + 0.3 * torch.rand(objects, 2, generator=generator)
        labels.append(
            {
                "class_labels": torch.randint(0, 80, (objects,), generator=generator).to(device),
                "boxes": torch.cat([centres, sizes], 1).to(device),
            }
        )
    return labels


def forward_workload(model: Any, batch: int, height: int, width: int, device: torch.device) -> Callable[[], Any]:
    pixel_values, pixel_mask = random_batch(batch, height, width, device)

    def run() -> Any:
        with torch.inference_mode():
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    return run


def training_workload(
    model: Any, batch: int, height: int, width: int, device: torch.device, precision: Precision = FP32
) -> Callable[[], Any]:
    """forward with labels (under ``precision``'s autocast) + backward + AdamW step (the optimizer state exists
    after the first call)."""
    pixel_values, pixel_mask = random_batch(batch, height, width, device, seed=1)
    labels = random_labels(batch, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device):
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        outputs.loss.backward()
        optimizer.step()
        return float(outputs.loss.detach())

    return run
