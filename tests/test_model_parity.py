"""Our model against transformers 5.23 (the reference oracle) on the same weights, in every checkpoint format.

The oracle models come from conftest.py; a test taking ``transformers_variant`` runs once per model variant
(multi-scale, single-scale, box-refine, two-stage).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from ddetr import CheckpointError, DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrModel

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def outputs_of(model, pixel_values, pixel_mask):
    with torch.no_grad():
        try:
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        except TypeError:
            return model(pixel_values, pixel_mask)


def assert_same_detections(reference, ours, pixel_values, pixel_mask):
    expected = outputs_of(reference, pixel_values, pixel_mask)
    actual = outputs_of(ours, pixel_values, pixel_mask)
    logits_error = (expected.logits - actual.logits).abs().max().item()
    boxes_error = (expected.pred_boxes - actual.pred_boxes).abs().max().item()
    assert logits_error < TOLERANCE, f"logits differ by {logits_error}"
    assert boxes_error < TOLERANCE, f"pred_boxes differ by {boxes_error}"
    for name in ("init_reference_points", "intermediate_reference_points", "enc_outputs_class"):
        if getattr(expected, name, None) is not None:
            assert torch.allclose(getattr(expected, name), getattr(actual, name), atol=TOLERANCE), name
    return logits_error, boxes_error


def transformers_file_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x in-memory names to the 4.x file names (written independently of ddetr.checkpoint.weights)."""
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        key = key.replace("self_attn.o_proj", "self_attn.out_proj")
        key = re.sub(r"\.mlp\.(fc[12])\.", r".\1.", key)
        renamed[key] = value.clone()
    return renamed


def test_loads_transformers_safetensors_and_matches(transformers_variant, tmp_path, transformers_model, batch_of_two):
    reference = transformers_model(transformers_variant)
    reference.save_pretrained(tmp_path)
    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    assert not ours.training
    pixel_values, pixel_mask = batch_of_two()
    assert_same_detections(reference, ours, pixel_values, pixel_mask)


def test_loads_legacy_bin_with_every_tied_copy(transformers_variant, tmp_path, transformers_model, batch_of_two):
    """A 4.x-era hub directory: pytorch_model.bin holding every head copy, distinct per-layer heads with refine."""
    reference = transformers_model(transformers_variant)
    state = transformers_file_names(reference.state_dict())
    config = reference.config
    layers = config.decoder_layers + (1 if config.two_stage else 0)
    generator = torch.Generator().manual_seed(7)
    if config.with_box_refine:
        # The 4.x refine files carry independent class heads; make them differ as trained ones do.
        for index in range(layers):
            for suffix in ("weight", "bias"):
                key = f"class_embed.{index}.{suffix}"
                state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=generator)
    for index in range(layers):
        for kind in ("class_embed", "bbox_embed"):
            source = {k: v for k, v in state.items() if k.startswith(f"{kind}.{index}.")}
            for key, value in source.items():
                if (kind == "bbox_embed" and config.with_box_refine) or (kind == "class_embed" and config.two_stage):
                    state[f"model.decoder.{key}"] = value
    for key in list(state):
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    torch.save(state, tmp_path / "pytorch_model.bin")
    config_dict = config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config_dict))

    reference_legacy = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path).eval()
    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    pixel_values, pixel_mask = batch_of_two(seed=1)
    assert_same_detections(reference_legacy, ours, pixel_values, pixel_mask)
    if config.with_box_refine:
        assert not torch.equal(ours.class_embed[0].weight, ours.class_embed[1].weight)


def test_save_pretrained_loads_in_transformers(
    transformers_variant, tmp_path, transformers_model, batch_of_two, perturb_
):
    reference = transformers_model(transformers_variant)
    reference.save_pretrained(tmp_path / "reference")
    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "reference")
    perturb_(ours, seed=3)  # new values, so equality below proves they were written and read back
    ours.save_pretrained(tmp_path / "ours")
    reloaded, info = transformers.DeformableDetrForObjectDetection.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    pixel_values, pixel_mask = batch_of_two(seed=2)
    assert_same_detections(reloaded.eval(), ours, pixel_values, pixel_mask)
    # and our own loader reads our files back
    again = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "ours")
    assert_same_detections(ours, again, pixel_values, pixel_mask)


def test_bottleneck_backbone_and_base_model(tmp_path, transformers_model, batch_of_two):
    reference = transformers_model("multi-scale", layer_type="bottleneck")
    reference.save_pretrained(tmp_path)
    pixel_values, pixel_mask = batch_of_two(seed=4)
    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    assert_same_detections(reference, ours, pixel_values, pixel_mask)
    base = DeformableDetrModel.from_pretrained(tmp_path)
    expected = outputs_of(reference.model, pixel_values, pixel_mask).last_hidden_state
    actual = outputs_of(base, pixel_values, pixel_mask).last_hidden_state
    assert (expected - actual).abs().max().item() < TOLERANCE


def dilate_last_stage_(reference) -> None:
    """Turn transformers' ResNet into DC5 by hand (stride 1, dilation 2 after the first block): the oracle for the
    DC5 variant, which transformers only builds through timm."""
    stage = reference.model.backbone.model.encoder.stages[3]
    for index, block in enumerate(stage.layers):
        if index == 0:
            block.layer[1].convolution.stride = (1, 1)
            block.shortcut.convolution.stride = (1, 1)
        else:
            block.layer[1].convolution.dilation = (2, 2)
            block.layer[1].convolution.padding = (2, 2)


def test_single_scale_dc5_matches_dilated_reference(tmp_path, tiny_transformers_config, perturb_, batch_of_two):
    config = tiny_transformers_config("single-scale", layer_type="bottleneck")
    config.backbone_config.depths = [1, 1, 1, 3]  # two blocks after the first use dilation 2
    reference = perturb_(transformers.DeformableDetrForObjectDetection(config), seed=5).eval()
    reference.save_pretrained(tmp_path)
    dilate_last_stage_(reference)
    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path, dilation=True)
    pixel_values, pixel_mask = batch_of_two(seed=5)
    with torch.no_grad():
        features = ours.model.backbone(pixel_values, pixel_mask)
    assert features[-1][0].shape[-1] == -(-pixel_values.shape[-1] // 16)  # stride 16 instead of 32
    assert_same_detections(reference, ours, pixel_values, pixel_mask)


@pytest.mark.parametrize("variant", ["multi-scale", "two-stage"])
def test_loss_matches_transformers(variant, tmp_path, transformers_model, batch_of_two):
    reference = transformers_model(variant)
    reference.save_pretrained(tmp_path)
    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    pixel_values, pixel_mask = batch_of_two(seed=6)
    labels = [
        {"class_labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.6]])},
    ]
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        actual = ours(pixel_values, pixel_mask, labels=labels)
    for key, value in expected.loss_dict.items():
        assert torch.allclose(actual.loss_dict[key], value, rtol=1e-4, atol=1e-4), key
    if variant == "two-stage":
        # transformers drops the paper's encoder-proposal loss; we keep it (transformers-behaviour.md §7).
        assert "loss_ce_enc" in actual.loss_dict and "loss_ce_enc" not in expected.loss_dict
    else:
        assert torch.allclose(actual.loss, expected.loss, rtol=1e-4)


def test_relabel_reinitialises_class_heads(tmp_path, transformers_model):
    reference = transformers_model("box-refine")
    reference.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="class heads re-initialised"):
        ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path, id2label={0: "cat", 1: "dog", 2: "bird"})
    assert ours.config.num_labels == 3 and ours.config.label2id["dog"] == 1
    assert ours.class_embed[0].weight.shape == (3, 64)
    assert torch.allclose(ours.class_embed[0].bias, torch.full((3,), -4.59511985), atol=1e-6)
    reference_boxes = reference.model.decoder.bbox_embed[1].layers[0].weight
    assert torch.equal(ours.bbox_embed[1].layers[0].weight, reference_boxes)


def test_partial_checkpoint_is_an_error_unless_asked(tmp_path, transformers_model):
    reference = transformers_model("multi-scale")
    reference.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    del state["model.level_embed"]
    state["model.not_a_weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.level_embed") as error:
        DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    assert "model.not_a_weight" in str(error.value)
    model = DeformableDetrForObjectDetection.from_pretrained(tmp_path, strict=False)
    assert torch.equal(model.model.input_proj[0][0].weight, reference.model.input_proj[0][0].weight)


def test_shape_mismatch_and_corrupt_files_raise_clear_errors(tmp_path, transformers_model):
    reference = transformers_model("multi-scale")
    reference.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shapes differ"):
        DeformableDetrForObjectDetection.from_pretrained(tmp_path, d_model=128)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        DeformableDetrForObjectDetection.from_pretrained(tmp_path)


def test_our_config_json_loads_in_transformers(tmp_path, tiny_transformers_config):
    config = DeformableDetrConfig.from_dict(tiny_transformers_config("two-stage").to_dict())
    config.save_pretrained(tmp_path)
    loaded = transformers.DeformableDetrConfig.from_pretrained(tmp_path)
    for name in ("d_model", "two_stage", "with_box_refine", "num_queries", "encoder_n_points", "num_labels"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.backbone_config.hidden_sizes == config.backbone_config["hidden_sizes"]
