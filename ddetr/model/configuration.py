"""`DeformableDetrConfig`: every field of transformers' config, with the same names and defaults.

config.json is read in both dialects found in the wild:

* transformers 4.x (the published SenseTime checkpoints): ``use_timm_backbone: true``, ``backbone: "resnet50"``,
  ``backbone_config: null``, ``use_pretrained_backbone: true``. Pretrained backbone weights are never downloaded:
  they come from the checkpoint itself.
* transformers 5.x: a ``backbone_config`` dict of model_type ``timm_backbone`` or ``resnet``.

The backbone description is normalised once into a :class:`BackboneSpec` that the model builders read.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ddetr.checkpoint.hub import resolve_file

CONFIG_NAME = "config.json"

# ResNet presets known by name (timm / torchvision naming): block type and blocks per stage.
RESNET_PRESETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


@dataclass(frozen=True)
class BackboneSpec:
    """What the model builders need to know about the ResNet backbone.

    ``layout`` names the on-disk weight layout: ``"timm"`` (conv1/layer1..layer4, also torchvision and the paper
    code) or ``"hf_resnet"`` (transformers' ResNetBackbone: embedder/encoder.stages).
    ``out_stages`` are 1-based ResNet stages (2, 3, 4 = C3, C4, C5).
    """

    layout: str
    layer_type: str
    depths: tuple[int, ...]
    stem_width: int
    stage_widths: tuple[int, ...]
    out_stages: tuple[int, ...]
    dilation: bool
    num_channels: int

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.stage_widths[stage - 1] for stage in self.out_stages)


def _stage_widths(layer_type: str, stem_width: int) -> tuple[int, ...]:
    expansion = 4 if layer_type == "bottleneck" else 1
    return tuple(stem_width * (2**stage) * expansion for stage in range(4))


@dataclass
class DeformableDetrConfig:
    """Configuration of a Deformable DETR model (field names and defaults follow transformers 5.x)."""

    backbone_config: dict[str, Any] | None = None
    num_channels: int = 3
    num_queries: int = 300
    max_position_embeddings: int = 1024
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    encoder_attention_heads: int = 8
    decoder_layers: int = 6
    decoder_ffn_dim: int = 1024
    decoder_attention_heads: int = 8
    encoder_layerdrop: float = 0.0
    is_encoder_decoder: bool = True
    activation_function: str = "relu"
    d_model: int = 256
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    return_intermediate: bool = True
    auxiliary_loss: bool = False
    position_embedding_type: str = "sine"
    dilation: bool = False
    num_feature_levels: int = 4
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    two_stage: bool = False
    two_stage_num_proposals: int = 300
    with_box_refine: bool = False
    class_cost: float = 1
    bbox_cost: float = 5
    giou_cost: float = 2
    mask_loss_coefficient: float = 1
    dice_loss_coefficient: float = 1
    bbox_loss_coefficient: float = 5
    giou_loss_coefficient: float = 2
    eos_coefficient: float = 0.1
    focal_alpha: float = 0.25
    disable_custom_kernels: bool = False
    tie_word_embeddings: bool = True
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    label2id: dict[str, int] = field(default_factory=dict)
    # Legacy (transformers 4.x) backbone fields; folded into backbone_config by __post_init__.
    use_timm_backbone: bool = True
    backbone: str | None = None
    use_pretrained_backbone: bool = False
    backbone_kwargs: dict[str, Any] | None = None

    model_type = "deformable_detr"

    def __init__(self, num_labels: int | None = None, **kwargs: Any) -> None:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - known)
        for f in fields(self):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, f.name, value)
        # Generic transformers fields (architectures, dtype, transformers_version, ...) are kept for round trips.
        self.extra = {key: kwargs[key] for key in unknown}
        if num_labels is not None:
            if "id2label" in kwargs and len(kwargs["id2label"]) != num_labels:
                raise ValueError(f"num_labels={num_labels} disagrees with id2label of {len(kwargs['id2label'])}")
            if "id2label" not in kwargs:
                self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        self.__post_init__()

    def __post_init__(self) -> None:
        self.id2label = {int(key): str(value) for key, value in self.id2label.items()}
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(f"id2label keys must be 0..num_labels-1, got {sorted(self.id2label)}")
        self.label2id = {name: index for index, name in self.id2label.items()}
        if self.backbone_config is None:
            self.backbone_config = self._legacy_backbone_config()
        self.use_pretrained_backbone = False
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != self.num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}
            self.label2id = {name: index for index, name in self.id2label.items()}

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.encoder_attention_heads

    def _legacy_backbone_config(self) -> dict[str, Any]:
        if self.use_timm_backbone:
            out_indices = (self.backbone_kwargs or {}).get("out_indices")
            if out_indices is None:
                out_indices = [2, 3, 4] if self.num_feature_levels > 1 else [4]
            config: dict[str, Any] = {
                "model_type": "timm_backbone",
                "backbone": self.backbone or "resnet50",
                "num_channels": self.num_channels,
                "features_only": True,
                "use_pretrained_backbone": False,
                "out_indices": list(out_indices),
            }
            if self.dilation:
                config["output_stride"] = 16
            return config
        # transformers' default when the timm backbone is switched off: a ResNet-50 exposing only C5.
        return {"model_type": "resnet", "out_features": ["stage4"]}

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The normalised backbone description; raises ValueError for backbones we cannot build."""
        config = self.backbone_config or {}
        model_type = config.get("model_type")
        depths: tuple[int, ...]
        if model_type == "timm_backbone":
            name = config.get("backbone", "resnet50")
            if name not in RESNET_PRESETS:
                raise ValueError(
                    f"backbone_config.backbone={name!r} is not supported; use one of {list(RESNET_PRESETS)}"
                )
            layer_type, depths = RESNET_PRESETS[name]
            out_indices = tuple(int(i) for i in config.get("out_indices", (2, 3, 4)))
            dilation = bool(self.dilation or config.get("output_stride") == 16)
            stem_width = 64
            layout = "timm"
            stage_widths = _stage_widths(layer_type, stem_width)
        elif model_type == "resnet":
            layer_type = config.get("layer_type", "bottleneck")
            if layer_type not in ("basic", "bottleneck"):
                raise ValueError(f"backbone_config.layer_type={layer_type!r} must be 'basic' or 'bottleneck'")
            if config.get("downsample_in_bottleneck", False) or config.get("downsample_in_first_stage", False):
                raise ValueError(
                    "backbone_config: downsample_in_bottleneck / downsample_in_first_stage are unsupported"
                )
            if config.get("hidden_act", "relu") != "relu":
                raise ValueError(f"backbone_config.hidden_act={config.get('hidden_act')!r} is unsupported; use relu")
            depths = tuple(int(d) for d in config.get("depths", (3, 4, 6, 3)))
            stem_width = int(config.get("embedding_size", 64))
            stage_widths = tuple(int(w) for w in config.get("hidden_sizes", (256, 512, 1024, 2048)))
            out_features = config.get("out_features") or ["stage4"]
            try:
                out_indices = tuple(int(name.removeprefix("stage")) for name in out_features)
            except ValueError:
                raise ValueError(f"backbone_config.out_features={out_features!r} must name stage1..stage4") from None
            dilation = bool(self.dilation)
            layout = "hf_resnet"
        else:
            raise ValueError(
                f"backbone_config.model_type={model_type!r} is not supported; use 'timm_backbone' or 'resnet'"
            )
        if len(depths) != 4 or len(stage_widths) != 4:
            raise ValueError(f"backbone_config must describe 4 ResNet stages, got depths={depths}")
        if (
            not out_indices
            or any(i not in (1, 2, 3, 4) for i in out_indices)
            or list(out_indices) != sorted(out_indices)
        ):
            raise ValueError(f"backbone_config: output stages {out_indices} must be increasing values in 1..4")
        return BackboneSpec(
            layout=layout,
            layer_type=layer_type,
            depths=depths,
            stem_width=stem_width,
            stage_widths=stage_widths,
            out_stages=out_indices,
            dilation=dilation,
            num_channels=int(config.get("num_channels", self.num_channels)),
        )

    def validate(self) -> None:
        """Raise ValueError naming the field for combinations the model cannot build."""
        if self.two_stage and not self.with_box_refine:
            raise ValueError(
                "two_stage=True requires with_box_refine=True (the paper's two-stage variant refines boxes)"
            )
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, name)
            if heads <= 0 or self.d_model % heads != 0:
                raise ValueError(f"d_model={self.d_model} must be divisible by {name}={heads}")
        positive = (
            "d_model",
            "num_feature_levels",
            "encoder_n_points",
            "decoder_n_points",
            "num_queries",
            "two_stage_num_proposals",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
        )
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.decoder_layers <= 0 or self.encoder_layers < 0:
            raise ValueError("decoder_layers must be positive and encoder_layers non-negative")
        if self.position_embedding_type not in ("sine", "learned"):
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r} must be 'sine' or 'learned'")
        if self.activation_function not in ("relu", "gelu", "silu"):
            raise ValueError(f"activation_function={self.activation_function!r} must be relu, gelu or silu")
        if self.d_model % 32 != 0:
            raise ValueError(f"d_model={self.d_model} must be a multiple of 32 (GroupNorm with 32 groups)")
        spec = self.backbone_spec
        if len(spec.out_stages) > self.num_feature_levels:
            raise ValueError(
                f"num_feature_levels={self.num_feature_levels} is smaller than the {len(spec.out_stages)} "
                "backbone outputs"
            )

    # ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as transformers 5.x writes it to config.json."""
        output: dict[str, Any] = dict(copy.deepcopy(self.extra))
        for f in fields(self):
            if f.name in ("use_timm_backbone", "backbone", "use_pretrained_backbone", "backbone_kwargs"):
                continue
            output[f.name] = copy.deepcopy(getattr(self, f.name))
        output["id2label"] = {str(key): value for key, value in self.id2label.items()}
        output["label2id"] = dict(self.label2id)
        output["model_type"] = self.model_type
        output.setdefault("architectures", ["DeformableDetrForObjectDetection"])
        return output

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> DeformableDetrConfig:
        merged = {**config_dict, **overrides}
        model_type = merged.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config model_type={model_type!r} is not {cls.model_type!r}")
        if "num_labels" in overrides and "id2label" not in overrides:
            merged.pop("id2label", None)
            merged.pop("label2id", None)
        for derived in ("hidden_size", "num_attention_heads"):
            merged.pop(derived, None)
        return cls(**merged)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(self.to_json_string())
        os.replace(temporary, path)
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **overrides: Any) -> DeformableDetrConfig:
        """Read config.json from a directory, a file path, or a hub repo id (cache first, offline friendly)."""
        path = Path(path_or_repo_id)
        if path.is_file():
            config_path = path
        else:
            config_path = resolve_file(path_or_repo_id, CONFIG_NAME, revision=overrides.pop("revision", None))
        try:
            config_dict = json.loads(Path(config_path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
        return cls.from_dict(config_dict, **overrides)

    def __repr__(self) -> str:
        return f"DeformableDetrConfig {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeformableDetrConfig) and self.to_dict() == other.to_dict()
