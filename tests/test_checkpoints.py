"""Checkpoint formats that need no oracle: the published hub names, 4.x configs, paper .pth files, the hub cache."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from ddetr import CheckpointNotFoundError, DeformableDetrConfig, DeformableDetrForObjectDetection
from ddetr.checkpoint.weights import state_for_saving

HUB_KEYS = Path(__file__).parent / "data" / "hub-keys"

# config.json fields of the SenseTime checkpoints as transformers 4.x wrote them (no backbone_config).
LEGACY_CONFIG = {
    "model_type": "deformable_detr",
    "architectures": ["DeformableDetrForObjectDetection"],
    "backbone": "resnet50",
    "backbone_config": None,
    "use_timm_backbone": True,
    "use_pretrained_backbone": True,
    "backbone_kwargs": {"in_chans": 3, "out_indices": [2, 3, 4]},
    "transformers_version": "4.32.0.dev0",
    "id2label": {str(i): f"class {i}" for i in range(91)},
    "label2id": {f"class {i}": i for i in range(91)},
}
HUB_VARIANTS = {
    "deformable-detr": {},
    "deformable-detr-single-scale": {"num_feature_levels": 1, "backbone_kwargs": {"out_indices": [4]}},
    "deformable-detr-single-scale-dc5": {
        "num_feature_levels": 1,
        "dilation": True,
        "backbone_kwargs": {"out_indices": [4]},
    },
    "deformable-detr-with-box-refine": {"with_box_refine": True},
    "deformable-detr-with-box-refine-two-stage": {"with_box_refine": True, "two_stage": True},
}


def hub_listing(variant: str) -> dict[str, tuple[int, ...]]:
    listing = {}
    for line in (HUB_KEYS / f"{variant}.txt").read_text().splitlines():
        name, shape = line.split("\t")
        listing[name] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return listing


@pytest.mark.parametrize("variant", list(HUB_VARIANTS))
def test_saved_names_and_shapes_are_the_published_ones(variant):
    config = DeformableDetrConfig.from_dict({**LEGACY_CONFIG, **HUB_VARIANTS[variant]})
    assert config.backbone_spec.layout == "timm" and config.use_pretrained_backbone is False
    model = DeformableDetrForObjectDetection(config)
    state = state_for_saving(
        model, with_box_refine=config.with_box_refine, two_stage=config.two_stage, hf_resnet_layout=False
    )
    ours = {key: tuple(value.shape) for key, value in state.items()}
    published = hub_listing(variant)
    extra = set(ours) - set(published)
    if config.with_box_refine and not config.two_stage:
        # Per-layer class heads are independent in the paper code (transformers 5.x ties them at random init).
        assert extra == {f"class_embed.{i}.{p}" for i in range(1, 6) for p in ("weight", "bias")}
    else:
        assert extra == set()
    assert set(published) - set(ours) == set()
    assert {key: ours[key] for key in published} == published


def test_dc5_dilates_only_the_last_stage():
    config = DeformableDetrConfig.from_dict({**LEGACY_CONFIG, **HUB_VARIANTS["deformable-detr-single-scale-dc5"]})
    resnet = DeformableDetrForObjectDetection(config).model.backbone.conv_encoder.model
    assert resnet.layer4[0].conv2.stride == (1, 1) and resnet.layer4[0].conv2.dilation == (1, 1)
    assert resnet.layer4[0].downsample[0].stride == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in resnet.layer4[1:])
    assert resnet.layer3[0].conv2.stride == (2, 2)
    with torch.no_grad():
        features = resnet(torch.zeros(1, 3, 64, 96))
    assert len(features) == 1 and features[0].shape[-2:] == (4, 6)  # stride 16


def legacy_hub_file(model: DeformableDetrForObjectDetection) -> dict[str, torch.Tensor]:
    """What transformers 4.x wrote: every tied copy, plus BatchNorm step counters."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for key in list(state):
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return state


@pytest.mark.parametrize("variant", ["deformable-detr", "deformable-detr-with-box-refine-two-stage"])
def test_legacy_timm_hub_directory_round_trip(variant, tmp_path, batch_of_two, perturb_):
    fields = {**LEGACY_CONFIG, **HUB_VARIANTS[variant], "backbone": "resnet18", "d_model": 64}
    fields.update(num_queries=20, two_stage_num_proposals=20, encoder_layers=1, decoder_layers=2)
    config = DeformableDetrConfig.from_dict(fields)
    model = perturb_(DeformableDetrForObjectDetection(config)).eval()
    torch.save(legacy_hub_file(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(fields))
    loaded = DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    pixel_values, pixel_mask = batch_of_two()
    with torch.no_grad():
        expected, actual = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    assert torch.equal(expected.logits, actual.logits) and torch.equal(expected.pred_boxes, actual.pred_boxes)


def to_paper_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (hub) names to the fundamentalvision/Deformable-DETR names, written independently of
    ddetr.checkpoint.weights."""
    encoder = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "fc1": "linear1", "fc2": "linear2"}
    decoder = {
        "encoder_attn_layer_norm": "norm1",
        "self_attn_layer_norm": "norm2",
        "final_layer_norm": "norm3",
        "fc1": "linear1",
        "fc2": "linear2",
        "encoder_attn": "cross_attn",
    }
    paper: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("model.backbone.conv_encoder.model."):
            paper["backbone.0.body." + key.split("model.backbone.conv_encoder.model.")[1]] = value
        elif key.startswith("model.query_position_embeddings."):
            paper["query_embed." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.input_proj."):
            paper[key[len("model.") :]] = value
        elif key.startswith("model."):
            rest = key[len("model.") :]
            match = re.match(r"(encoder|decoder)\.layers\.(\d+)\.([a-z_0-9]+)\.(.*)", rest)
            if match:
                part, index, module, tail = match.groups()
                if part == "decoder" and module == "self_attn" and tail.split(".")[0] in ("q_proj", "k_proj", "v_proj"):
                    projection, kind = tail.split(".")
                    fused.setdefault(f"transformer.decoder.layers.{index}.self_attn.in_proj_{kind}", {})[projection] = (
                        value
                    )
                    continue
                renames = encoder if part == "encoder" else decoder
                rest = f"{part}.layers.{index}.{renames.get(module, module)}.{tail}"
            paper["transformer." + rest] = value
        else:
            paper[key] = value
    for key, parts in fused.items():
        paper[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], 0)
    return paper


def test_paper_repository_pth_with_args(tmp_path, batch_of_two, perturb_):
    arguments = argparse.Namespace(
        backbone="resnet18", dilation=False, position_embedding="sine", num_feature_levels=4, hidden_dim=64,
        nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=96, dec_n_points=2, enc_n_points=3, num_queries=15,
        dropout=0.1, with_box_refine=True, two_stage=True, lr=2e-4,
    )  # fmt: skip
    config = DeformableDetrConfig(
        backbone="resnet18", d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=96, decoder_ffn_dim=96, decoder_n_points=2, encoder_n_points=3,
        two_stage_num_proposals=15, with_box_refine=True, two_stage=True, num_labels=91,
    )  # fmt: skip
    model = perturb_(DeformableDetrForObjectDetection(config)).eval()
    paper_state = to_paper_names(model.state_dict())
    assert "transformer.decoder.layers.0.self_attn.in_proj_weight" in paper_state
    torch.save({"model": paper_state, "args": arguments, "epoch": 49}, tmp_path / "checkpoint0049.pth")
    loaded = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "checkpoint0049.pth")
    assert loaded.config.two_stage and loaded.config.num_labels == 91 and loaded.config.encoder_n_points == 3
    pixel_values, pixel_mask = batch_of_two()
    with torch.no_grad():
        expected, actual = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    assert torch.equal(expected.logits, actual.logits) and torch.equal(expected.pred_boxes, actual.pred_boxes)


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "hook": print}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        DeformableDetrForObjectDetection.from_pretrained(tmp_path / "evil.pth")


def test_hub_repo_id_loads_from_the_cache_offline(tmp_path, monkeypatch, tiny_config):
    import huggingface_hub.constants as constants

    model = DeformableDetrForObjectDetection(tiny_config()).eval()
    snapshot = tmp_path / "hub" / "models--SenseTime--deformable-detr" / "snapshots" / "0123abcd"
    model.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--SenseTime--deformable-detr" / "refs").mkdir()
    (tmp_path / "hub" / "models--SenseTime--deformable-detr" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = DeformableDetrForObjectDetection.from_pretrained("SenseTime/deformable-detr")
    assert torch.equal(loaded.class_embed[0].weight, model.class_embed[0].weight)

    with pytest.raises(CheckpointNotFoundError, match="SenseTime/deformable-detr-with-box-refine") as error:
        DeformableDetrForObjectDetection.from_pretrained("SenseTime/deformable-detr-with-box-refine")
    assert "local directory" in str(error.value)


def test_missing_files_are_clear_errors(tmp_path, tiny_config):
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json"):
        DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"model\.safetensors"):
        DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="neither a local directory nor a hub repo id"):
        DeformableDetrForObjectDetection.from_pretrained(tmp_path / "no" / "such" / "dir")
