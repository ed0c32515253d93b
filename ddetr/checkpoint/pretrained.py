"""`from_pretrained` / `save_pretrained` shared by the model classes."""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from ddetr.checkpoint.hub import CheckpointNotFoundError, resolve_file
from ddetr.checkpoint.weights import (
    CheckpointError,
    check_shared_consistency,
    fill_tied_copies,
    normalise_file_state,
    shared_groups,
    state_for_saving,
)
from ddetr.model.configuration import CONFIG_NAME, DeformableDetrConfig

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
CLASS_HEAD_PATTERN = re.compile(r"^(model\.)?(decoder\.)?class_embed\.\d+\.")

Model = TypeVar("Model", bound="PretrainedMixin")


def load_checkpoint_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of a .safetensors / .bin / .pth file, and any training arguments stored beside them (paper .pth)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path)), {}
        # Never unpickle arbitrary objects; the paper checkpoints also pickle an argparse.Namespace of their args.
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    arguments: dict[str, Any] = {}
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        namespace = payload.get("args")
        if isinstance(namespace, argparse.Namespace):
            arguments = vars(namespace)
        payload = payload["model"]
    if not isinstance(payload, dict) or not all(isinstance(value, torch.Tensor) for value in payload.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return payload, arguments


def config_from_paper_checkpoint(state: dict[str, torch.Tensor], arguments: dict[str, Any]) -> DeformableDetrConfig:
    """Infer the architecture of a paper-repository checkpoint from its training args and tensor shapes."""
    levels = len({key.split(".")[1] for key in state if key.startswith("input_proj.")})
    num_labels = state["class_embed.0.bias"].shape[0] if "class_embed.0.bias" in state else 91
    two_stage = any(key.startswith("transformer.enc_output.") for key in state)
    refine = any(key.startswith("transformer.decoder.bbox_embed.") for key in state)
    query_embed = state.get("query_embed.weight")
    encoder_layers = len({key.split(".")[3] for key in state if key.startswith("transformer.encoder.layers.")})
    decoder_layers = len({key.split(".")[3] for key in state if key.startswith("transformer.decoder.layers.")})
    d_model = state["transformer.level_embed"].shape[1]
    fields: dict[str, Any] = {
        "num_feature_levels": levels,
        "two_stage": two_stage,
        "with_box_refine": refine,
        "d_model": d_model,
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "num_queries": query_embed.shape[0] if query_embed is not None else arguments.get("num_queries", 300),
        "dilation": bool(arguments.get("dilation", False)),
        "backbone": arguments.get("backbone", "resnet50"),
        "id2label": {i: f"LABEL_{i}" for i in range(num_labels)},
    }
    for ours, theirs in (
        ("encoder_ffn_dim", "dim_feedforward"),
        ("decoder_ffn_dim", "dim_feedforward"),
        ("encoder_attention_heads", "nheads"),
        ("decoder_attention_heads", "nheads"),
        ("encoder_n_points", "enc_n_points"),
        ("decoder_n_points", "dec_n_points"),
        ("two_stage_num_proposals", "num_queries"),
        ("dropout", "dropout"),
        ("position_embedding_type", "position_embedding"),
    ):
        if theirs in arguments:
            fields[ours] = arguments[theirs]
    if fields.get("position_embedding_type") == "v2":
        fields["position_embedding_type"] = "sine"
    return DeformableDetrConfig(**fields)


class PretrainedMixin(torch.nn.Module):
    """Loading and saving in the hub's format; mixed into the nn.Module model classes (whose constructors take
    the config alone)."""

    config: DeformableDetrConfig
    # Prefix of this class's tensors inside a full detection checkpoint ("model." for the headless body).
    checkpoint_prefix = ""

    @classmethod
    def from_pretrained(
        cls: type[Model],
        path_or_repo_id: str | os.PathLike,
        *,
        config: DeformableDetrConfig | None = None,
        revision: str | None = None,
        strict: bool = True,
        **config_overrides: Any,
    ) -> Model:
        """Load a checkpoint directory, hub repo id, or a paper-repository ``.pth`` file.

        ``config_overrides`` change config fields; a different ``num_labels`` / ``id2label`` re-initialises the
        class heads (with a warning). Missing or unexpected tensors raise CheckpointError naming them unless
        ``strict=False``, which loads what fits and logs the rest.
        """
        path = Path(path_or_repo_id)
        arguments: dict[str, Any] = {}
        if path.is_file():
            state, arguments = load_checkpoint_file(path)
            if config is None:
                sibling = path.with_name(CONFIG_NAME)
                if sibling.is_file():
                    config = DeformableDetrConfig.from_pretrained(sibling)
                elif any(key.startswith("transformer.") for key in state):
                    config = config_from_paper_checkpoint(state, arguments)
                else:
                    raise CheckpointNotFoundError(f"{path} has no config.json beside it; pass config=")
        else:
            # config.json first: for a hub repo its failure carries the clearest offline message.
            if config is None:
                config = DeformableDetrConfig.from_pretrained(path_or_repo_id, revision=revision)
            weights = resolve_file(path_or_repo_id, SAFETENSORS_NAME, revision=revision, required=False)
            if weights is None:
                weights = resolve_file(path_or_repo_id, PYTORCH_NAME, revision=revision, required=False)
            if weights is None:
                raise CheckpointNotFoundError(
                    f"{path_or_repo_id!s} provides neither {SAFETENSORS_NAME} nor {PYTORCH_NAME}: pass a local "
                    "directory holding config.json and model.safetensors, or download the hub repo where the hub "
                    "is reachable"
                )
            state, _ = load_checkpoint_file(weights)

        checkpoint_labels = config.num_labels
        if config_overrides:
            config = DeformableDetrConfig.from_dict(config.to_dict(), **config_overrides)
        model = cls(config)
        relabel = config.num_labels != checkpoint_labels or "id2label" in config_overrides
        model._load_checkpoint_state(state, relabel=relabel, strict=strict)
        model.eval()
        return model

    def _load_checkpoint_state(self, state: dict[str, torch.Tensor], *, relabel: bool, strict: bool) -> None:
        if not any(key.startswith(("model.", "class_embed.", "bbox_embed.")) for key in state) and not any(
            key.startswith(("backbone.0.body.", "transformer.")) for key in state
        ):
            state = {f"model.{key}": value for key, value in state.items()}  # a base-model checkpoint
        state = normalise_file_state(state)
        if relabel:
            dropped = [key for key in state if CLASS_HEAD_PATTERN.match(key)]
            state = {key: value for key, value in state.items() if key not in dropped}
            warnings.warn(
                f"class heads re-initialised for the new label set ({self.config.num_labels} labels); "
                "fine-tune before use",
                UserWarning,
                stacklevel=3,
            )
        if self.checkpoint_prefix:
            prefix = self.checkpoint_prefix
            state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        own_state = self.state_dict()
        state = fill_tied_copies(state, own_state.keys())
        check_shared_consistency(state, shared_groups(self))

        missing = [key for key in own_state if key not in state]
        if relabel:
            missing = [key for key in missing if not CLASS_HEAD_PATTERN.match(key)]
        unexpected = [key for key in state if key not in own_state]
        mismatched = [
            f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own_state[key].shape)}"
            for key in state
            if key in own_state and state[key].shape != own_state[key].shape
        ]
        if mismatched:
            raise CheckpointError("tensor shapes differ from the config:\n  " + "\n  ".join(mismatched[:20]))
        if (missing or unexpected) and strict:
            raise CheckpointError(
                f"checkpoint does not fit the model: {len(missing)} missing {missing[:10]}, "
                f"{len(unexpected)} unexpected {unexpected[:10]} (pass strict=False to load what fits)"
            )
        if missing or unexpected:
            logger.warning("partial load: missing %s, unexpected %s", missing, unexpected)
        loadable = {key: value for key, value in state.items() if key in own_state}
        with torch.no_grad():
            for key, value in loadable.items():
                own_state[key].copy_(value.to(own_state[key].dtype))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors with the hub's tensor names (loadable by transformers 5.x).

        Files are written aside and renamed into place, so an interrupted save never leaves a truncated file.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_for_saving(
            self,
            with_box_refine=self.config.with_box_refine,
            two_stage=self.config.two_stage,
            hf_resnet_layout=self.config.backbone_spec.layout == "hf_resnet",
        )
        handle, temporary = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
        os.close(handle)
        try:
            save_file(state, temporary, metadata={"format": "pt"})
            os.replace(temporary, directory / SAFETENSORS_NAME)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        self.config.save_pretrained(directory)
        return directory
