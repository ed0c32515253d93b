"""Matcher and set criterion: against brute force / hand-written float64 formulas, and against transformers 5.23."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from ddetr.loss.criterion import SetCriterion, build_criterion
from ddetr.loss.matcher import HungarianMatcher, NonFinitePredictionError

ALPHA, GAMMA = 0.25, 2.0
COSTS = {"class": 1.0, "bbox": 5.0, "giou": 2.0}
WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


# ----------------------------------------------------------------------------------------------------------------------
# Random inputs


def random_layer(batch: int, queries: int, classes: int, generator: torch.Generator, dtype=torch.float64) -> dict:
    logits = 2 * torch.randn(batch, queries, classes, generator=generator, dtype=dtype)
    centres = 0.2 + 0.6 * torch.rand(batch, queries, 2, generator=generator, dtype=dtype)
    sizes = 0.05 + 0.4 * torch.rand(batch, queries, 2, generator=generator, dtype=dtype)
    return {"logits": logits, "pred_boxes": torch.cat([centres, sizes], -1)}


def random_targets(counts: list[int], classes: int, generator: torch.Generator, dtype=torch.float64) -> list[dict]:
    targets = []
    for count in counts:
        centres = 0.2 + 0.6 * torch.rand(count, 2, generator=generator, dtype=dtype)
        sizes = 0.05 + 0.4 * torch.rand(count, 2, generator=generator, dtype=dtype)
        labels = torch.randint(0, classes, (count,), generator=generator)
        targets.append({"class_labels": labels, "boxes": torch.cat([centres, sizes], -1)})
    return targets


def random_outputs(batch, queries, classes, layers, generator, dtype=torch.float64, sequence=None) -> dict:
    """Last-layer outputs plus ``layers - 1`` auxiliary layers and, when ``sequence`` is set, encoder proposals."""
    outputs = random_layer(batch, queries, classes, generator, dtype)
    outputs["auxiliary_outputs"] = [random_layer(batch, queries, classes, generator, dtype) for _ in range(layers - 1)]
    if sequence is not None:
        outputs["enc_outputs"] = random_layer(batch, sequence, classes, generator, dtype)
    return outputs


# ----------------------------------------------------------------------------------------------------------------------
# Independent float64 formulas in plain Python


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def to_corners(box) -> tuple[float, float, float, float]:
    cx, cy, w, h = (float(v) for v in box)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def hand_giou(box_a, box_b) -> float:
    ax0, ay0, ax1, ay1 = to_corners(box_a)
    bx0, by0, bx1, by1 = to_corners(box_b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def hand_pair_cost(logit_row, box, label: int, target_box) -> float:
    p = sigmoid(float(logit_row[label]))
    positive = ALPHA * (1 - p) ** GAMMA * -math.log(p + 1e-8)
    negative = (1 - ALPHA) * p**GAMMA * -math.log(1 - p + 1e-8)
    l1 = sum(abs(float(a) - float(b)) for a, b in zip(box, target_box))
    return COSTS["class"] * (positive - negative) + COSTS["bbox"] * l1 - COSTS["giou"] * hand_giou(box, target_box)


def brute_force_match(logits, boxes, labels, target_boxes) -> set[tuple[int, int]]:
    """Minimum-cost (query, target) pairs of one image by trying every assignment."""
    queries, count = logits.shape[0], len(labels)
    cost = [[hand_pair_cost(logits[q], boxes[q], int(labels[t]), target_boxes[t]) for t in range(count)]
            for q in range(queries)]  # fmt: skip
    if count <= queries:
        candidates = [set(zip(perm, range(count))) for perm in itertools.permutations(range(queries), count)]
    else:
        candidates = [set(zip(range(queries), perm)) for perm in itertools.permutations(range(count), queries)]
    return min(candidates, key=lambda pairs: sum(cost[q][t] for q, t in pairs))


def hand_focal(x: float, t: float) -> float:
    p = sigmoid(x)
    cross_entropy = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (ALPHA * t + (1 - ALPHA) * (1 - t)) * cross_entropy * (1 - p_t) ** GAMMA


def hand_layer_losses(logits, boxes, targets, binary: bool = False) -> dict[str, float]:
    """The four terms of one layer, from brute-force matching and loops."""
    batch, queries, classes = logits.shape
    num_boxes = max(sum(len(t["class_labels"]) for t in targets), 1)
    ce = bbox = giou = cardinality = 0.0
    for b, target in enumerate(targets):
        labels = [0 if binary else int(v) for v in target["class_labels"]]
        pairs = brute_force_match(logits[b], boxes[b], labels, target["boxes"]) if labels else set()
        matched_label = {q: labels[t] for q, t in pairs}
        for q in range(queries):
            for c in range(classes):
                ce += hand_focal(float(logits[b, q, c]), 1.0 if matched_label.get(q) == c else 0.0)
        for q, t in pairs:
            bbox += sum(abs(float(a) - float(v)) for a, v in zip(boxes[b, q], target["boxes"][t]))
            giou += 1 - hand_giou(boxes[b, q], target["boxes"][t])
        predicted = sum(max(sigmoid(float(x)) for x in logits[b, q]) > 0.5 for q in range(queries))
        cardinality += abs(predicted - len(labels)) / batch
    return {"loss_ce": ce / num_boxes, "loss_bbox": bbox / num_boxes, "loss_giou": giou / num_boxes,
            "cardinality_error": cardinality}  # fmt: skip


def make_criterion(num_labels: int, layers: int = 6, auxiliary_loss: bool = True) -> SetCriterion:
    return SetCriterion(
        num_labels=num_labels, matcher=HungarianMatcher(), auxiliary_loss=auxiliary_loss, num_decoder_layers=layers
    )


# ----------------------------------------------------------------------------------------------------------------------
# Matcher


@pytest.mark.parametrize("queries,counts", [(4, [2, 4, 1]), (3, [3, 5]), (4, [0, 3])])
def test_matcher_equals_brute_force(queries, counts):
    generator = torch.Generator().manual_seed(queries + sum(counts))
    layer = random_layer(len(counts), queries, 3, generator)
    targets = random_targets(counts, 3, generator)
    indices = HungarianMatcher()(layer["logits"], layer["pred_boxes"], targets)
    for b, (query_index, target_index) in enumerate(indices):
        assert query_index.dtype == target_index.dtype == torch.int64
        assert len(query_index) == len(target_index) == min(queries, counts[b])
        expected = brute_force_match(
            layer["logits"][b], layer["pred_boxes"][b], targets[b]["class_labels"], targets[b]["boxes"]
        ) if counts[b] else set()  # fmt: skip
        assert set(zip(query_index.tolist(), target_index.tolist())) == expected


def test_matcher_batched_equals_per_image():
    generator = torch.Generator().manual_seed(1)
    counts = [5, 0, 12, 1]
    layer = random_layer(len(counts), 20, 6, generator, torch.float32)
    targets = random_targets(counts, 6, generator, torch.float32)
    matcher = HungarianMatcher()
    batched = matcher(layer["logits"], layer["pred_boxes"], targets)
    for b in range(len(counts)):
        single = matcher(layer["logits"][b : b + 1], layer["pred_boxes"][b : b + 1], targets[b : b + 1])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])


def test_matcher_empty_targets():
    generator = torch.Generator().manual_seed(2)
    layer = random_layer(2, 5, 3, generator)
    indices = HungarianMatcher()(layer["logits"], layer["pred_boxes"], random_targets([0, 0], 3, generator))
    assert [(len(q), len(t), q.dtype, t.dtype) for q, t in indices] == [(0, 0, torch.int64, torch.int64)] * 2


# ----------------------------------------------------------------------------------------------------------------------
# Criterion against hand computation


def test_loss_terms_equal_hand_computation():
    generator = torch.Generator().manual_seed(3)
    counts = [2, 0, 4]
    outputs = random_outputs(len(counts), 4, 3, layers=3, generator=generator, sequence=4)
    targets = random_targets(counts, 3, generator)
    total, losses = make_criterion(3, layers=3)(outputs, targets)

    layers = {"": outputs, "_0": outputs["auxiliary_outputs"][0], "_1": outputs["auxiliary_outputs"][1]}
    expected = {}
    for suffix, layer in layers.items():
        hand = hand_layer_losses(layer["logits"], layer["pred_boxes"], targets)
        expected.update({key + suffix: value for key, value in hand.items()})
    # Two-stage proposals: same terms with every target relabelled as class 0.
    hand = hand_layer_losses(outputs["enc_outputs"]["logits"], outputs["enc_outputs"]["pred_boxes"], targets, True)
    expected.update({key + "_enc": value for key, value in hand.items()})

    assert sorted(losses) == sorted(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # "loss_bbox_enc" -> "loss_bbox"
    expected_total = sum(
        WEIGHTS["_".join(key.split("_")[:2])] * value for key, value in expected.items() if key.startswith("loss")
    )
    assert total.item() == pytest.approx(expected_total, rel=1e-9)


def test_total_is_weighted_sum_and_weight_dict():
    generator = torch.Generator().manual_seed(4)
    criterion = SetCriterion(
        num_labels=4,
        matcher=HungarianMatcher(),
        class_loss_coefficient=1.5,
        bbox_loss_coefficient=3.0,
        giou_loss_coefficient=0.5,
        num_decoder_layers=3,
    )
    assert set(criterion.weight_dict) == {
        term + suffix for term in WEIGHTS for suffix in ("", "_0", "_1", "_enc")
    }  # fmt: skip
    outputs = random_outputs(2, 6, 4, layers=3, generator=generator, sequence=8)
    total, losses = criterion(outputs, random_targets([3, 2], 4, generator))
    weighted = sum(criterion.weight_dict[key] * value for key, value in losses.items() if key in criterion.weight_dict)
    assert torch.allclose(total, weighted)
    assert not any(key.startswith("cardinality") for key in criterion.weight_dict)


def test_auxiliary_loss_off_ignores_auxiliary_outputs():
    generator = torch.Generator().manual_seed(5)
    outputs = random_outputs(2, 6, 4, layers=4, generator=generator)
    _, losses = make_criterion(4, layers=4, auxiliary_loss=False)(outputs, random_targets([3, 1], 4, generator))
    assert sorted(losses) == sorted(["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"])


def test_batched_loss_equals_per_image_sums():
    """With each call normalising by its own target count, ``term * max(num_boxes, 1)`` is the unnormalised sum over
    the batch's images, so it adds up across images; cardinality is a per-image mean."""
    generator = torch.Generator().manual_seed(6)
    counts = [3, 0, 5]
    outputs = random_outputs(len(counts), 10, 4, layers=3, generator=generator, sequence=16)
    targets = random_targets(counts, 4, generator)
    criterion = make_criterion(4, layers=3)
    _, batched = criterion(outputs, targets)

    def image_slice(layer: dict, b: int) -> dict:
        return {key: layer[key][b : b + 1] for key in ("logits", "pred_boxes")}

    per_image = []
    for b in range(len(counts)):
        single = image_slice(outputs, b)
        single["auxiliary_outputs"] = [image_slice(layer, b) for layer in outputs["auxiliary_outputs"]]
        single["enc_outputs"] = image_slice(outputs["enc_outputs"], b)
        per_image.append(criterion(single, targets[b : b + 1])[1])
    for key, value in batched.items():
        if key.startswith("cardinality"):
            expected = sum(losses[key] for losses in per_image) / len(counts)
            assert torch.allclose(value, expected), key
        else:
            expected = sum(losses[key] * max(count, 1) for losses, count in zip(per_image, counts))
            assert torch.allclose(value * max(sum(counts), 1), expected, rtol=1e-10), key


def test_num_boxes_is_averaged_over_processes(monkeypatch):
    generator = torch.Generator().manual_seed(7)
    outputs = random_layer(2, 6, 3, generator)
    targets = random_targets([1, 2], 3, generator)
    criterion = make_criterion(3)
    _, local = criterion(outputs, targets)

    # Simulate a second process holding 5 targets: SUM gives 3 + 5, divided by a world size of 2.
    def all_reduce(tensor, op=None):
        tensor += 5

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    _, distributed = criterion(outputs, targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert torch.allclose(distributed[key] * 4, local[key] * 3), key
    assert torch.equal(distributed["cardinality_error"], local["cardinality_error"])


def test_no_targets_and_gradients_are_finite():
    generator = torch.Generator().manual_seed(8)
    for counts in ([0, 0], [2, 3]):
        outputs = random_outputs(2, 7, 3, layers=2, generator=generator, sequence=9)
        leaves = [outputs, outputs["auxiliary_outputs"][0], outputs["enc_outputs"]]
        for layer in leaves:
            for key in ("logits", "pred_boxes"):
                layer[key].requires_grad_(True)
        total, losses = make_criterion(3, layers=2)(outputs, random_targets(counts, 3, generator))
        if not sum(counts):
            assert losses["loss_bbox"].item() == losses["loss_giou"].item() == 0.0
        total.backward()
        for layer in leaves:
            for key in ("logits", "pred_boxes"):
                assert layer[key].grad is not None and torch.isfinite(layer[key].grad).all(), key
        assert leaves[0]["logits"].grad.abs().sum() > 0


def test_half_precision_inputs_are_scored_in_float32():
    generator = torch.Generator().manual_seed(9)
    outputs = random_layer(2, 8, 3, generator, torch.float32)
    outputs["logits"] = outputs["logits"] * 8  # large logits: a float16 focal loss would lose them
    targets = random_targets([2, 3], 3, generator, torch.float32)
    half = {key: value.half() for key, value in outputs.items()}
    upcast = {key: value.float() for key, value in half.items()}
    criterion = make_criterion(3)
    total_half, losses_half = criterion(half, targets)
    _, losses_float = criterion(upcast, targets)
    assert total_half.dtype == torch.float32 and torch.isfinite(total_half)
    for key, value in losses_float.items():
        assert torch.allclose(losses_half[key], value), key


def test_build_criterion_reads_config_fields():
    config = SimpleNamespace(
        num_labels=7, class_cost=2.0, bbox_cost=4.0, giou_cost=1.0, focal_alpha=0.3,
        bbox_loss_coefficient=6.0, giou_loss_coefficient=3.0, auxiliary_loss=True, decoder_layers=3,
    )  # fmt: skip
    criterion = build_criterion(config)
    assert criterion.num_labels == 7 and criterion.focal_alpha == 0.3 and criterion.focal_gamma == 2.0
    matcher = criterion.matcher
    assert (matcher.class_cost, matcher.bbox_cost, matcher.giou_cost) == (2.0, 4.0, 1.0)
    # The matching cost keeps the paper's fixed focal parameters.
    assert (matcher.focal_alpha, matcher.focal_gamma) == (0.25, 2.0)
    assert criterion.weight_dict["loss_ce_1"] == 1.0
    assert criterion.weight_dict["loss_bbox_enc"] == 6.0
    assert criterion.weight_dict["loss_giou"] == 3.0
    assert "loss_ce_2" not in criterion.weight_dict


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs


def _valid_case():
    generator = torch.Generator().manual_seed(10)
    return random_layer(2, 5, 3, generator), random_targets([2, 1], 3, generator)


@pytest.mark.parametrize(
    "corrupt,message,non_finite_prediction",
    [
        (lambda o, t: o["pred_boxes"][1, 3].fill_(float("nan")), r"image 1 .*queries \[3\]", True),
        (lambda o, t: o["pred_boxes"][0, 2, 3].fill_(-0.1), "image 0", True),
        (lambda o, t: o["logits"][1, 4, 0].fill_(float("nan")), r"image 1 .*queries \[4\]", True),
        (lambda o, t: o["logits"][0, 0, 2].fill_(float("-inf")), "non-finite logits", True),
        (lambda o, t: t[1]["boxes"][0, 2].fill_(0.0), "target 1: 1 box", False),
        # A bad target is bad data, not a diverging model, even though its message says "non-finite".
        (lambda o, t: t[0]["boxes"][1, 0].fill_(float("inf")), "target 0: 1 box.* non-finite", False),
        (lambda o, t: t[0]["class_labels"].fill_(3), r"class labels \[3, 3\] are outside \[0, 3\)", False),
        (lambda o, t: t[1]["class_labels"].fill_(-1), r"class labels \[-1\]", False),
        (lambda o, t: t.pop(), "1 target dicts for a batch of 2", False),
        (lambda o, t: t[0].update(class_labels=t[0]["class_labels"].float()), "integer", False),
        (lambda o, t: t[0].update(boxes=t[0]["boxes"].tolist()), "must be tensors", False),
    ],
)
def test_bad_inputs_raise_value_error(corrupt, message, non_finite_prediction):
    outputs, targets = _valid_case()
    corrupt(outputs, targets)
    with pytest.raises(ValueError, match=message) as raised:
        HungarianMatcher()(outputs["logits"], outputs["pred_boxes"], targets)
    # Non-finite predictions (a diverging model, which training skips) have their own type; the rest does not.
    assert isinstance(raised.value, NonFinitePredictionError) == non_finite_prediction
    with pytest.raises(ValueError, match=message) as raised:
        make_criterion(3)(outputs, targets)
    # The criterion names the layer and chains the matcher's error, type included.
    assert isinstance(raised.value.__cause__, NonFinitePredictionError) == non_finite_prediction


def test_overflowing_cost_raises_value_error():
    """Finite but absurd boxes overflow the cost (area = inf); scipy must never see it."""
    outputs, targets = _valid_case()
    outputs["pred_boxes"][0, 1] = 1e308
    with pytest.raises(NonFinitePredictionError, match=r"matching cost of image 0 is non-finite for queries \[1\]"):
        HungarianMatcher()(outputs["logits"], outputs["pred_boxes"], targets)


def test_criterion_names_the_bad_layer():
    generator = torch.Generator().manual_seed(11)
    outputs = random_outputs(2, 5, 3, layers=3, generator=generator, sequence=6)
    targets = random_targets([2, 1], 3, generator)
    outputs["auxiliary_outputs"][1]["pred_boxes"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"auxiliary decoder layer 1: .*image 0"):
        make_criterion(3, layers=3)(outputs, targets)
    outputs["auxiliary_outputs"][1]["pred_boxes"][0, 0, 0] = 0.5
    outputs["enc_outputs"]["logits"][1, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"two-stage encoder proposals: .*image 1"):
        make_criterion(3, layers=3)(outputs, targets)


def test_criterion_rejects_wrong_shapes():
    outputs, targets = _valid_case()
    with pytest.raises(ValueError, match="num_labels=4"):
        make_criterion(4)(outputs, targets)
    outputs["auxiliary_outputs"] = [dict(outputs)] * 3
    with pytest.raises(ValueError, match="at most 2"):
        make_criterion(3, layers=3)(outputs, targets)


# ----------------------------------------------------------------------------------------------------------------------
# Parity with transformers 5.23


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_parity_with_transformers(dtype, tolerance):
    from transformers import DeformableDetrConfig
    from transformers.loss.loss_deformable_detr import (
        DeformableDetrForObjectDetectionLoss,
        DeformableDetrHungarianMatcher,
    )

    layers, num_labels, counts = 4, 5, [4, 0, 7]
    config = DeformableDetrConfig(
        num_labels=num_labels, auxiliary_loss=True, decoder_layers=layers, focal_alpha=0.3, bbox_loss_coefficient=4
    )
    generator = torch.Generator().manual_seed(12)
    outputs = random_outputs(len(counts), 30, num_labels, layers=layers, generator=generator, dtype=dtype)
    targets = random_targets(counts, num_labels, generator, dtype)
    per_layer = [*outputs["auxiliary_outputs"], outputs]
    # (layers, batch, queries, classes) and (layers, batch, queries, 4), last decoder layer last.
    outputs_class = torch.stack([layer["logits"] for layer in per_layer])
    outputs_coord = torch.stack([layer["pred_boxes"] for layer in per_layer])
    reference_total, reference, _ = DeformableDetrForObjectDetectionLoss(
        logits=outputs["logits"], labels=targets, device=torch.device("cpu"), pred_boxes=outputs["pred_boxes"],
        config=config, outputs_class=outputs_class, outputs_coord=outputs_coord,
    )  # fmt: skip

    total, losses = build_criterion(config)(outputs, targets)
    assert sorted(losses) == sorted(reference)
    differences = {key: abs(losses[key].item() - float(reference[key])) / max(1.0, abs(float(reference[key])))
                   for key in reference}  # fmt: skip
    # transformers always rounds the cardinality error (a mean of integer counts) to float32; ours keeps the dtype.
    cardinality = {key: value for key, value in differences.items() if key.startswith("cardinality")}
    weighted = {key: value for key, value in differences.items() if key not in cardinality}
    assert max(weighted.values()) < tolerance, weighted
    assert max(cardinality.values()) < 1e-7, cardinality
    assert abs(total.item() - reference_total.item()) < tolerance * max(1.0, abs(reference_total.item()))

    reference_matcher = DeformableDetrHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    expected = reference_matcher({"logits": outputs["logits"], "pred_boxes": outputs["pred_boxes"]}, targets)
    ours = HungarianMatcher()(outputs["logits"], outputs["pred_boxes"], targets)
    for (query, target), (ref_query, ref_target) in zip(ours, expected):
        assert torch.equal(query, ref_query) and torch.equal(target, ref_target)
