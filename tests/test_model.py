"""Model behaviour that needs no oracle: the paper's initialisation, head sharing, freezing, training, errors."""

from __future__ import annotations

import math

import pytest
import torch

from ddetr import DeformableDetrForObjectDetection, DeformableDetrModel

PRIOR_BIAS = -math.log(0.99 / 0.01)
LABELS = [
    {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.4, 0.3]])},
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
]


def test_paper_initialisation_and_shared_heads(tiny_config):
    model = DeformableDetrForObjectDetection(tiny_config())
    assert all(head is model.class_embed[0] for head in model.class_embed)
    assert all(head is model.bbox_embed[0] for head in model.bbox_embed)
    assert model.model.decoder.bbox_embed is None
    assert torch.allclose(model.class_embed[0].bias, torch.full((3,), PRIOR_BIAS))
    last = model.bbox_embed[0].layers[-1]
    assert torch.count_nonzero(last.weight) == 0
    assert last.bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    attention = model.model.encoder.layers[0].self_attn
    offsets = attention.sampling_offsets.bias.view(4, 4, 4, 2)  # heads, levels, points, xy
    assert offsets[0, 0].tolist() == [[1, 0], [2, 0], [3, 0], [4, 0]]
    assert torch.allclose(offsets[1, 2], torch.tensor([[0.0, 1.0], [0, 2], [0, 3], [0, 4]]), atol=1e-6)  # 90 degrees
    decoder_offsets = model.model.decoder.layers[0].encoder_attn.sampling_offsets.bias.view(4, 4, 4, 2)
    assert torch.allclose(decoder_offsets[2, 0, 0], torch.tensor([-1.0, 0.0]), atol=1e-6)
    assert torch.count_nonzero(attention.attention_weights.weight) == 0
    assert torch.count_nonzero(model.model.input_proj[0][0].bias) == 0


def test_refinement_heads_are_independent_and_owned_by_the_decoder(tiny_config):
    model = DeformableDetrForObjectDetection(tiny_config(with_box_refine=True))
    assert model.bbox_embed is model.model.decoder.bbox_embed
    assert model.class_embed[0] is not model.class_embed[1]
    assert model.bbox_embed[0].layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    assert model.bbox_embed[1].layers[-1].bias.tolist() == [0.0, 0.0, 0.0, 0.0]
    two_stage = DeformableDetrForObjectDetection(tiny_config(with_box_refine=True, two_stage=True))
    assert two_stage.class_embed is two_stage.model.decoder.class_embed and len(two_stage.class_embed) == 4
    assert all(head.layers[-1].bias.abs().sum() == 0 for head in two_stage.bbox_embed)


def test_stem_and_layer1_are_frozen_and_batchnorm_has_no_parameters(tiny_config):
    resnet = DeformableDetrForObjectDetection(tiny_config()).model.backbone.conv_encoder.model
    assert not resnet.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in resnet.layer1.parameters())
    assert all(p.requires_grad for p in resnet.layer2.parameters())
    assert not any("bn" in name for name, _ in resnet.named_parameters())


@pytest.mark.parametrize("fields", [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}])
def test_training_step_gives_finite_gradients(fields, tiny_config, batch_of_two):
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(tiny_config(**fields)).train()
    pixel_values, pixel_mask = batch_of_two()
    outputs = model(pixel_values, pixel_mask, labels=LABELS)
    assert outputs.loss.isfinite() and outputs.loss.dim() == 0
    assert len(outputs.auxiliary_outputs) == 2 and "loss_giou_1" in outputs.loss_dict
    outputs.loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    without_gradient = [name for name, p in trainable if p.grad is None]
    assert without_gradient == []
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    if fields.get("two_stage"):
        # The paper's encoder loss trains the proposal head (transformers 5.x leaves it without gradient).
        assert "loss_ce_enc" in outputs.loss_dict
        assert model.class_embed[-1].weight.grad.abs().sum() > 0


def test_base_model_runs_two_stage_on_its_own(tiny_config, batch_of_two):
    model = DeformableDetrModel(tiny_config(with_box_refine=True, two_stage=True)).eval()
    pixel_values, pixel_mask = batch_of_two()
    with torch.no_grad():
        outputs = model(pixel_values, pixel_mask, output_hidden_states=True)
    assert outputs.last_hidden_state.shape == (2, 10, 64)
    assert outputs.init_reference_points.shape == (2, 10, 4)
    assert outputs.intermediate_reference_points.shape == (2, 3, 10, 4)
    assert outputs.enc_outputs_class.shape[:2] == outputs.encoder_last_hidden_state.shape[:2]
    assert len(outputs.encoder_hidden_states) == 2 and len(outputs.decoder_hidden_states) == 4
    assert outputs["last_hidden_state"] is outputs.last_hidden_state and "enc_outputs_class" in outputs


def test_padding_does_not_change_a_single_image_much(tiny_config, batch_of_two, perturb_):
    """The mask, valid ratios and sine embedding make padded and unpadded inputs agree away from borders."""
    torch.manual_seed(0)
    model = perturb_(DeformableDetrForObjectDetection(tiny_config())).eval()
    pixel_values, pixel_mask = batch_of_two(sizes=((128, 128), (64, 64)))
    with torch.no_grad():
        padded = model(pixel_values, pixel_mask)
        alone = model(pixel_values[1:, :, :64, :64], pixel_mask[1:, :64, :64])
        nomask = model(pixel_values[1:], None)
    padded_error = (padded.logits[1] - alone.logits[0]).abs().mean()
    unmasked_error = (nomask.logits[0] - alone.logits[0]).abs().mean()
    assert padded_error < 0.8 * unmasked_error  # ignoring the mask would make them equal


def test_bad_inputs_raise_value_errors(tiny_config):
    model = DeformableDetrForObjectDetection(tiny_config()).eval()
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="pixel_mask"):
        model(torch.zeros(1, 3, 64, 64), torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match=r"box\(es\) are non-finite"):
        model(
            torch.zeros(1, 3, 64, 64),
            labels=[{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}],
        )


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_config, batch_of_two, perturb_):
    torch.manual_seed(0)
    model = perturb_(DeformableDetrForObjectDetection(tiny_config(decoder_layers=2, num_queries=8))).eval()
    pixel_values, pixel_mask = batch_of_two(sizes=((64, 96), (48, 80)))
    with torch.no_grad():
        eager = model(pixel_values, pixel_mask)
        compiled = torch.compile(model)(pixel_values, pixel_mask)
    assert torch.allclose(compiled.logits, eager.logits, atol=1e-4)
    assert torch.allclose(compiled.pred_boxes, eager.pred_boxes, atol=1e-4)


def test_bf16_autocast_stays_close_to_float32(tiny_config, batch_of_two, perturb_):
    torch.manual_seed(0)
    model = perturb_(DeformableDetrForObjectDetection(tiny_config())).eval()
    pixel_values, pixel_mask = batch_of_two()
    with torch.no_grad():
        full = model(pixel_values, pixel_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(pixel_values, pixel_mask)
    assert half.pred_boxes.dtype == torch.float32  # boxes come out of a float32 sigmoid of refined references
    assert (half.pred_boxes - full.pred_boxes).abs().max() < 0.05
    agreement = torch.corrcoef(torch.stack([half.logits.float().flatten(), full.logits.flatten()]))[0, 1]
    assert agreement > 0.99


@pytest.mark.parametrize("coordinates", [2, 4])
def test_fused_sampling_locations_equal_the_plain_formula(coordinates):
    from ddetr.model.deformable_attention import MultiscaleDeformableAttention, sampling_locations

    torch.manual_seed(0)
    attention = MultiscaleDeformableAttention(d_model=64, levels=3, heads=4, points=2).double()
    torch.nn.init.normal_(attention.sampling_offsets.weight)
    shapes = [(8, 10), (4, 5), (2, 3)]
    query = torch.randn(2, 7, 64, dtype=torch.float64)
    reference = torch.rand(2, 7, 3, coordinates, dtype=torch.float64)
    offsets = attention.sampling_offsets(query).view(2, 7, 4, 3, 2, 2)
    expected = sampling_locations(reference, offsets, shapes)
    assert torch.allclose(attention._sampling_locations(query, reference, shapes), expected, atol=1e-12)
