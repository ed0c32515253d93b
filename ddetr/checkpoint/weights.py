"""Weight-name conversion between our modules and every checkpoint layout in circulation.

Our in-memory names are the on-disk names of the published checkpoints (transformers 4.x names, which 5.x still
writes), so most files load as they are. Conversions handled here:

* transformers 5.x in-memory names (``backbone.model``, ``o_proj``, ``mlp.fc1``), e.g. from a raw state_dict;
* transformers' own ResNet backbone layout (``embedder.embedder``, ``encoder.stages``) in place of timm's;
* the paper repository's ``.pth`` names (``backbone.0.body``, ``transformer.*``, a fused ``in_proj_weight``);
* tied copies of the per-layer heads: files may hold every copy (4.x), only the first (5.x, shared heads), or only
  the ``model.decoder.*`` copy (5.x, refinement / two-stage).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

BACKBONE_PREFIX = "model.backbone.conv_encoder.model."


class CheckpointError(ValueError):
    """A checkpoint's tensors do not fit the model: missing, unexpected, mis-shaped or inconsistent tensors."""


# --------------------------------------------------------------------------------------------------------------------
# transformers 5.x in-memory names -> file names
def from_transformers_memory_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state_dict.items():
        key = re.sub(r"^model\.backbone\.model\.", BACKBONE_PREFIX, key)
        key = key.replace(".self_attn.o_proj.", ".self_attn.out_proj.")
        key = re.sub(r"layers\.(\d+)\.mlp\.fc([12])\.", r"layers.\1.fc\2.", key)
        key = re.sub(r"^model\.backbone\.position_embedding\.", "model.position_embedding.", key)
        converted[key] = value
    return converted


# --------------------------------------------------------------------------------------------------------------------
# transformers ResNetBackbone layout <-> timm layout (below BACKBONE_PREFIX)
_HF_TO_TIMM = [
    (re.compile(r"^embedder\.embedder\.convolution\."), lambda m: "conv1."),
    (re.compile(r"^embedder\.embedder\.normalization\."), lambda m: "bn1."),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\."),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\."),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\."),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.",
    ),
    (
        re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\."),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.",
    ),
]
_TIMM_TO_HF = [
    (re.compile(r"^conv1\."), lambda m: "embedder.embedder.convolution."),
    (re.compile(r"^bn1\."), lambda m: "embedder.embedder.normalization."),
    (
        re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\."),
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.",
    ),
    (
        re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\."),
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.",
    ),
    (
        re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\."),
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.",
    ),
    (
        re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\."),
        lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.",
    ),
]


def _rename_backbone(state_dict: dict[str, torch.Tensor], rules: list) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(BACKBONE_PREFIX):
            rest = key[len(BACKBONE_PREFIX) :]
            for pattern, replacement in rules:
                match = pattern.match(rest)
                if match:
                    rest = replacement(match) + rest[match.end() :]
                    break
            key = BACKBONE_PREFIX + rest
        converted[key] = value
    return converted


def is_hf_resnet_layout(keys: Iterable[str]) -> bool:
    return any(key.startswith(BACKBONE_PREFIX + "embedder.") for key in keys)


def hf_resnet_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename_backbone(state_dict, _HF_TO_TIMM)


def timm_to_hf_resnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename_backbone(state_dict, _TIMM_TO_HF)


# --------------------------------------------------------------------------------------------------------------------
# The paper repository (fundamentalvision/Deformable-DETR) checkpoints
def is_paper_layout(keys: Iterable[str]) -> bool:
    return any(key.startswith(("backbone.0.body.", "transformer.")) for key in keys)


_PAPER_ENCODER_RENAMES = {
    "norm1": "self_attn_layer_norm",
    "norm2": "final_layer_norm",
    "linear1": "fc1",
    "linear2": "fc2",
}
_PAPER_DECODER_RENAMES = {
    "norm1": "encoder_attn_layer_norm",
    "norm2": "self_attn_layer_norm",
    "norm3": "final_layer_norm",
    "linear1": "fc1",
    "linear2": "fc2",
    "cross_attn": "encoder_attn",
}


def from_paper_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone.0.body."):
            converted[BACKBONE_PREFIX + key[len("backbone.0.body.") :]] = value
            continue
        if key.startswith("query_embed."):
            converted["model.query_position_embeddings." + key[len("query_embed.") :]] = value
            continue
        if key.startswith("input_proj."):
            converted["model." + key] = value
            continue
        if key.startswith(("class_embed.", "bbox_embed.")):
            converted[key] = value
            continue
        if not key.startswith("transformer."):
            converted[key] = value  # reported later as unexpected
            continue
        rest = key[len("transformer.") :]
        match = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.([a-z_0-9]+)\.(.*)$", rest)
        if match:
            part, index, module, tail = match.groups()
            renames = _PAPER_ENCODER_RENAMES if part == "encoder" else _PAPER_DECODER_RENAMES
            prefix = f"model.{part}.layers.{index}."
            if part == "decoder" and module == "self_attn" and tail.startswith("in_proj_"):
                # nn.MultiheadAttention fuses q, k, v projections row-wise.
                kind = tail[len("in_proj_") :]
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}self_attn.{name}.{kind}"] = chunk
                continue
            converted[f"{prefix}{renames.get(module, module)}.{tail}"] = value
            continue
        converted["model." + rest] = value
    return converted


# --------------------------------------------------------------------------------------------------------------------
# Tied head copies
def head_aliases(key: str) -> list[str]:
    """Other names under which a file may store the same head tensor, most specific first."""
    match = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
    if match:
        kind, index, tail = match.groups()
        aliases = [f"model.decoder.{kind}.{index}.{tail}"]
        if index != "0":
            # transformers 5.x writes only the first of heads tied across layers.
            aliases += [f"{kind}.0.{tail}", f"model.decoder.{kind}.0.{tail}"]
        return aliases
    match = re.match(r"^model\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.*)$", key)
    if match:
        kind, index, tail = match.groups()
        return [f"{kind}.{index}.{tail}"]
    return []


def fill_tied_copies(file_state: dict[str, torch.Tensor], expected_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Add the expected head keys a file omits because they are tied to a key it does hold."""
    filled = dict(file_state)
    for key in expected_keys:
        if key in filled:
            continue
        for alias in head_aliases(key):
            if alias in file_state:
                filled[key] = file_state[alias]
                break
    return filled


def shared_groups(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state-dict keys that name the same tensor in ``model`` (shared or aliased heads)."""
    by_tensor: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), []).append(key)
    return [keys for keys in by_tensor.values() if len(keys) > 1]


def check_shared_consistency(file_state: dict[str, torch.Tensor], groups: list[list[str]]) -> None:
    """Tensors our model shares must be equal in the file: differing copies would load ambiguously."""
    for keys in groups:
        present = [key for key in keys if key in file_state]
        for key in present[1:]:
            first = file_state[present[0]]
            if first.shape == file_state[key].shape and not torch.equal(first, file_state[key]):
                raise CheckpointError(
                    f"{present[0]} and {key} differ in the checkpoint but are one shared tensor in this model "
                    "configuration; check with_box_refine / two_stage in config.json"
                )


def normalise_file_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout to our names (shared-head expansion happens against the model, later)."""
    if is_paper_layout(state_dict):
        state_dict = from_paper_names(state_dict)
    state_dict = from_transformers_memory_names(state_dict)
    if is_hf_resnet_layout(state_dict):
        state_dict = hf_resnet_to_timm(state_dict)
    return {key: value for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}


def state_for_saving(
    model: torch.nn.Module, *, with_box_refine: bool, two_stage: bool, hf_resnet_layout: bool
) -> dict[str, torch.Tensor]:
    """The state dict as transformers 5.x writes it: tied duplicates omitted, contiguous independent tensors."""
    state = model.state_dict()
    keep: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^(class_embed|bbox_embed)\.(\d+)\.", key)
        if match:
            kind, index = match.groups()
            if kind == "bbox_embed" and with_box_refine:
                continue  # stored as model.decoder.bbox_embed
            if kind == "class_embed" and two_stage:
                continue  # stored as model.decoder.class_embed
            if index != "0" and not (kind == "class_embed" and with_box_refine):
                continue  # shared across layers: one copy
        keep[key] = value.detach().clone().contiguous()
    if hf_resnet_layout:
        keep = timm_to_hf_resnet(keep)
    return keep
