"""DeformableDetrConfig: transformers' fields and defaults, both config.json dialects, clear errors."""

from __future__ import annotations

import json

import pytest

from ddetr import DeformableDetrConfig

transformers = pytest.importorskip("transformers")


def test_every_transformers_field_with_the_same_default():
    reference = transformers.DeformableDetrConfig()
    ours = DeformableDetrConfig()
    skipped = {"backbone_config", "transformers_version", "architectures", "dtype", "output_attentions"}
    reference_fields = {
        name: value for name, value in reference.to_dict().items() if name not in skipped and not name.startswith("_")
    }
    missing = [name for name in reference_fields if not hasattr(ours, name)]
    generic = {
        "return_dict", "output_hidden_states", "chunk_size_feed_forward", "problem_type", "is_decoder",
        "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "pruned_heads",
        "tf_legacy_loss", "use_bfloat16", "torchscript", "task_specific_params", "finetuning_task",
        "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
        "decoder_start_token_id",
    }  # fmt: skip
    assert [name for name in missing if name not in generic] == []
    for name, value in reference_fields.items():
        if hasattr(ours, name) and name not in ("id2label", "label2id"):
            assert getattr(ours, name) == value, name
    assert ours.num_labels == reference.num_labels == 2
    assert ours.backbone_config["backbone"] == reference.backbone_config.backbone == "resnet50"
    assert ours.backbone_config["out_indices"] == list(reference.backbone_config.out_indices)
    assert ours.backbone_spec.out_stages == (2, 3, 4) and ours.backbone_spec.layer_type == "bottleneck"


def test_legacy_4x_config_never_downloads_and_builds_resnet50():
    config = DeformableDetrConfig.from_dict(
        {"model_type": "deformable_detr", "use_timm_backbone": True, "backbone": "resnet50", "backbone_config": None,
         "use_pretrained_backbone": True, "num_feature_levels": 1, "dilation": True, "transformers_version": "4.26.0"}
    )  # fmt: skip
    assert config.use_pretrained_backbone is False
    spec = config.backbone_spec
    assert (spec.layout, spec.out_stages, spec.dilation, spec.depths) == ("timm", (4,), True, (3, 4, 6, 3))
    assert config.backbone_config["output_stride"] == 16


def test_5x_resnet_backbone_config_and_json_round_trip(tmp_path):
    reference = transformers.DeformableDetrConfig(
        backbone_config=transformers.ResNetConfig(out_features=["stage2", "stage3", "stage4"], depths=[2, 2, 2, 2],
                                                   layer_type="basic", hidden_sizes=[64, 128, 256, 512]),
        num_labels=7, with_box_refine=True,
    )  # fmt: skip
    reference.save_pretrained(tmp_path)
    ours = DeformableDetrConfig.from_pretrained(tmp_path)
    spec = ours.backbone_spec
    assert spec.layout == "hf_resnet" and spec.depths == (2, 2, 2, 2) and spec.out_channels == (128, 256, 512)
    assert ours.num_labels == 7 and ours.with_box_refine
    ours.save_pretrained(tmp_path / "again")
    assert DeformableDetrConfig.from_pretrained(tmp_path / "again") == ours
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "deformable_detr"


def test_transformers_default_without_timm_is_c5_only():
    config = DeformableDetrConfig(use_timm_backbone=False)
    assert config.backbone_spec.out_stages == (4,) and config.backbone_spec.layout == "hf_resnet"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"two_stage": True}, "two_stage"),
        ({"d_model": 250}, "d_model"),
        ({"backbone": "vgg16"}, "backbone"),
        ({"encoder_attention_heads": 7}, "encoder_attention_heads"),
        ({"position_embedding_type": "rope"}, "position_embedding_type"),
        ({"num_feature_levels": 2}, "num_feature_levels"),
        ({"backbone_config": {"model_type": "swin"}}, "model_type"),
        ({"num_queries": 0}, "num_queries"),
    ],
)
def test_invalid_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        DeformableDetrConfig(**fields)


def test_num_labels_override_and_label_maps():
    config = DeformableDetrConfig(id2label={"0": "cat", "1": "dog"})
    assert config.id2label == {0: "cat", 1: "dog"} and config.label2id == {"cat": 0, "dog": 1}
    relabelled = DeformableDetrConfig.from_dict(config.to_dict(), num_labels=4)
    assert relabelled.num_labels == 4
    with pytest.raises(ValueError, match="num_labels"):
        DeformableDetrConfig(num_labels=3, id2label={0: "a"})
    with pytest.raises(ValueError, match="model_type"):
        DeformableDetrConfig.from_dict({"model_type": "detr"})
