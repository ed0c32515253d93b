"""The encoder-geometry cache: reused for repeated unpadded sizes, never for padded batches, never stale."""

from __future__ import annotations

import pytest
import torch

from ddetr import DeformableDetrForObjectDetection
from ddetr.model.encoder import encoder_reference_points
from ddetr.model.geometry import GeometryCache, encoder_geometry
from ddetr.model.position_encoding import SinePositionEmbedding


@pytest.fixture
def model(tiny_config):
    """``model(**fields)``: a seeded detector of conftest's ``tiny_config(**fields)``, in eval mode."""

    def build(**fields) -> DeformableDetrForObjectDetection:
        torch.manual_seed(0)
        return DeformableDetrForObjectDetection(tiny_config(**fields)).eval()

    return build


def test_repeated_sizes_reuse_one_entry_and_give_the_same_outputs(model) -> None:
    detector = model()
    cache = detector.model.geometry_cache
    images = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        first = detector(pixel_values=images)
        assert len(cache) == 1
        entry = next(iter(cache._entries.values()))
        second = detector(pixel_values=images)
        assert len(cache) == 1 and next(iter(cache._entries.values())) is entry
        detector(pixel_values=torch.randn(1, 3, 96, 64))
        assert len(cache) == 2
        cache.clear()
        uncached = detector(pixel_values=images)
    torch.testing.assert_close(second.logits, first.logits, rtol=0, atol=0)
    torch.testing.assert_close(uncached.logits, first.logits, rtol=0, atol=0)
    torch.testing.assert_close(uncached.pred_boxes, first.pred_boxes, rtol=0, atol=0)


def test_batched_images_share_the_geometry_of_one_image(model) -> None:
    detector = model()
    images = torch.randn(3, 3, 64, 80)
    with torch.inference_mode():
        batched = detector(pixel_values=images)
        detector.model.geometry_cache.clear()
        single = detector(pixel_values=images[1:2])
    torch.testing.assert_close(batched.logits[1:2], single.logits, rtol=1e-5, atol=1e-5)


def test_cached_geometry_equals_the_formula_for_a_batch() -> None:
    masks = [torch.ones(2, height, width, dtype=torch.bool) for height, width in [(8, 12), (4, 6), (2, 3)]]
    embedding = SinePositionEmbedding(num_features=16)
    one = encoder_geometry([mask[:1] for mask in masks], embedding, torch.float32).expand(2)
    full = encoder_geometry(masks, embedding, torch.float32)
    for name in ("positions", "valid_ratios", "reference_points"):
        torch.testing.assert_close(getattr(one, name), getattr(full, name), rtol=0, atol=0)
    assert full.positions.shape == (2, 8 * 12 + 4 * 6 + 2 * 3, 32)
    expected_points = encoder_reference_points([(8, 12), (4, 6), (2, 3)], torch.ones(2, 3, 2))
    torch.testing.assert_close(full.reference_points, expected_points)


def test_padded_batches_are_not_cached(model, batch_of_two) -> None:
    detector = model()
    pixel_values, pixel_mask = batch_of_two()
    with torch.inference_mode():
        detector(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert len(detector.model.geometry_cache) == 0


def test_learned_position_embeddings_are_not_cached(model) -> None:
    detector = model(position_embedding_type="learned")
    with torch.inference_mode():
        detector(pixel_values=torch.randn(2, 3, 64, 64))
    assert len(detector.model.geometry_cache) == 0


def test_an_inference_mode_entry_does_not_break_training(model) -> None:
    detector = model()
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        detector(pixel_values=images)
    detector.train()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    detector(pixel_values=images, labels=labels).loss.backward()
    assert len(detector.model.geometry_cache) == 2
    gradient = detector.model.input_proj[0][0].weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


def test_dtype_and_size_changes_get_their_own_entries_and_old_ones_are_evicted() -> None:
    cache = GeometryCache(max_entries=2)
    embedding = SinePositionEmbedding(num_features=4)
    builds = []

    def get(height: int, dtype: torch.dtype):
        def build():
            builds.append((height, dtype))
            return encoder_geometry([torch.ones(1, height, 4, dtype=torch.bool)], embedding, dtype)

        return cache.get([(height, 4)], torch.device("cpu"), dtype, build)

    assert get(4, torch.float32).positions.dtype == torch.float32
    assert get(4, torch.float64).positions.dtype == torch.float64
    get(4, torch.float32)
    get(6, torch.float32)  # evicts the float64 entry, the least recently used
    get(4, torch.float64)
    assert builds == [(4, torch.float32), (4, torch.float64), (6, torch.float32), (4, torch.float64)]
    with pytest.raises(ValueError, match="max_entries"):
        GeometryCache(max_entries=0)
