"""`DeformableDetrModel`: backbone, multi-scale input projections, deformable encoder and decoder (no heads)."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ddetr.checkpoint.pretrained import PretrainedMixin
from ddetr.model.backbone import Backbone, ConvEncoder, ResNet, resize_mask
from ddetr.model.configuration import DeformableDetrConfig
from ddetr.model.decoder import DeformableDecoder, DeformableDecoderLayer
from ddetr.model.deformable_attention import MultiscaleDeformableAttention
from ddetr.model.encoder import DeformableEncoder, DeformableEncoderLayer
from ddetr.model.geometry import EncoderGeometry, GeometryCache, encoder_geometry, spatial_size
from ddetr.model.heads import build_box_heads, build_class_heads
from ddetr.model.outputs import DeformableDetrModelOutput
from ddetr.model.position_encoding import LearnedPositionEmbedding, SinePositionEmbedding
from ddetr.model.two_stage import encoder_proposals, proposal_position_embedding
from ddetr.ops.linear import Linear
from ddetr.runtime.precision import at_least_float32, float32_region


def build_backbone(config: DeformableDetrConfig) -> Backbone:
    spec = config.backbone_spec
    resnet = ResNet(
        layer_type=spec.layer_type,
        depths=spec.depths,
        stem_width=spec.stem_width,
        stage_widths=spec.stage_widths,
        out_stages=spec.out_stages,
        dilation=spec.dilation,
        num_channels=spec.num_channels,
    )
    return Backbone(conv_encoder=ConvEncoder(resnet=resnet))


def build_input_projections(in_channels: tuple[int, ...], d_model: int, levels: int) -> nn.ModuleList:
    """1x1 conv + GroupNorm per backbone level; extra levels come from stride-2 3x3 convs (first on raw C5)."""
    projections = [
        nn.Sequential(nn.Conv2d(channels, d_model, 1), nn.GroupNorm(32, d_model)) for channels in in_channels
    ]
    previous = in_channels[-1]
    for _ in range(levels - len(in_channels)):
        projections.append(
            nn.Sequential(nn.Conv2d(previous, d_model, 3, stride=2, padding=1), nn.GroupNorm(32, d_model))
        )
        previous = d_model
    for projection in projections:
        conv = cast(nn.Conv2d, projection[0])
        assert conv.bias is not None  # built with the default bias=True
        nn.init.xavier_uniform_(conv.weight, gain=1)
        nn.init.zeros_(conv.bias)
    return nn.ModuleList(projections)


class DeformableDetrModel(PretrainedMixin, nn.Module):
    """The Deformable DETR body. Built from a config, like transformers' class; its parts take explicit arguments."""

    checkpoint_prefix = "model."

    def __init__(self, config: DeformableDetrConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d_model = config.d_model
        self.backbone = build_backbone(config)
        if config.position_embedding_type == "sine":
            self.position_embedding: nn.Module = SinePositionEmbedding(num_features=d_model // 2)
        else:
            self.position_embedding = LearnedPositionEmbedding(num_features=d_model // 2)
        self.input_proj = build_input_projections(
            self.backbone.conv_encoder.out_channels, d_model, config.num_feature_levels
        )
        if not config.two_stage:
            self.query_position_embeddings = nn.Embedding(config.num_queries, 2 * d_model)
        self.encoder = DeformableEncoder(
            layers=[
                DeformableEncoderLayer(
                    d_model=d_model,
                    ffn_dim=config.encoder_ffn_dim,
                    heads=config.encoder_attention_heads,
                    levels=config.num_feature_levels,
                    points=config.encoder_n_points,
                    dropout=config.dropout,
                    activation=config.activation_function,
                    activation_dropout=config.activation_dropout,
                )
                for _ in range(config.encoder_layers)
            ]
        )
        # Heads the decoder itself needs: one box head per stage for refinement (+1 scoring proposals when
        # two-stage) and, for two-stage, the class heads whose last one scores proposals.
        predictions = config.decoder_layers + (1 if config.two_stage else 0)
        self.decoder = DeformableDecoder(
            layers=[
                DeformableDecoderLayer(
                    d_model=d_model,
                    ffn_dim=config.decoder_ffn_dim,
                    heads=config.decoder_attention_heads,
                    levels=config.num_feature_levels,
                    points=config.decoder_n_points,
                    dropout=config.dropout,
                    attention_dropout=config.attention_dropout,
                    activation=config.activation_function,
                    activation_dropout=config.activation_dropout,
                )
                for _ in range(config.decoder_layers)
            ],
            bbox_embed=build_box_heads(d_model, predictions, shared=False, two_stage=config.two_stage)
            if config.with_box_refine
            else None,
            class_embed=build_class_heads(d_model, config.num_labels, predictions, shared=False)
            if config.two_stage
            else None,
        )
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, d_model))
        # Position embeddings and reference points of recent input sizes (not parameters, not saved).
        self.geometry_cache = GeometryCache()
        if config.two_stage:
            self.enc_output = Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.reference_points = Linear(d_model, 2)
        self._reset_transformer_parameters()

    @torch.no_grad()
    def _reset_transformer_parameters(self) -> None:
        """The paper code's initialisation of the transformer (heads initialise themselves)."""
        transformer_parts: list[nn.Module] = [self.encoder, *self.decoder.layers]
        if self.config.two_stage:
            transformer_parts += [self.enc_output, self.pos_trans]
        for part in transformer_parts:
            for parameter in part.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MultiscaleDeformableAttention):
                module.reset_parameters()
        if not self.config.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def freeze_backbone(self) -> None:
        self.backbone.requires_grad_(False)

    def unfreeze_backbone(self) -> None:
        self.backbone.requires_grad_(True)

    def _multi_scale_sources(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Projected feature maps (batch, d_model, H_l, W_l) and their (batch, H_l, W_l) masks per level."""
        features = self.backbone(pixel_values, pixel_mask)
        sources: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for level in range(self.config.num_feature_levels):
            if level < len(features):
                feature, mask = features[level]
                source = self.input_proj[level](feature)
            else:
                previous = features[-1][0] if level == len(features) else sources[-1]
                source = self.input_proj[level](previous)
                mask = resize_mask(pixel_mask, source.shape[-2:])
            sources.append(source)
            masks.append(mask)
        return sources, masks

    def _encoder_geometry(
        self, masks: list[torch.Tensor], spatial_shapes: list[tuple[int, int]], padded: bool, dtype: torch.dtype
    ) -> EncoderGeometry:
        # Learned embeddings change as they train; padded masks differ from image to image. (Under torch.compile
        # the caller passes padded=True: the graph computes the geometry instead of consulting a Python dict.)
        if padded or not isinstance(self.position_embedding, SinePositionEmbedding):
            return encoder_geometry(masks, self.position_embedding, dtype)

        # Without padding every image of the batch has the same geometry: keep one image's and share it.
        def build() -> EncoderGeometry:
            return encoder_geometry([mask[:1] for mask in masks], self.position_embedding, dtype)

        return self.geometry_cache.get(spatial_shapes, masks[0].device, dtype, build).expand(masks[0].shape[0])

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> DeformableDetrModelOutput:
        """
        pixel_values  (batch, channels, height, width) normalised images, padded bottom/right
        pixel_mask    (batch, height, width) 1 on image pixels, 0 on padding (all ones when None)
        """
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got {tuple(pixel_values.shape)}")
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)
        elif pixel_mask.shape != (batch, height, width):
            raise ValueError(
                f"pixel_mask {tuple(pixel_mask.shape)} does not match pixel_values {tuple(pixel_values.shape)}"
            )
        sources, masks = self._multi_scale_sources(pixel_values, pixel_mask)

        spatial_shapes = [spatial_size(source) for source in sources]
        # (batch, sequence, d_model)
        source_flat = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], 1)
        # (batch, sequence)
        mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
        # A compiled or traced graph must not depend on this input's padding: it takes the general path.
        padded = torch.compiler.is_compiling() or torch.jit.is_tracing() or not bool(mask_flat.all())
        geometry = self._encoder_geometry(masks, spatial_shapes, padded, source_flat.dtype)
        valid_ratios = geometry.valid_ratios
        # (sequence, d_model): the embedding of each token's level
        level_embedding = torch.cat(
            [self.level_embed[level].expand(height * width, -1) for level, (height, width) in enumerate(spatial_shapes)]
        )
        # (batch, sequence, d_model)
        position_flat = geometry.positions + level_embedding
        # Without padding there is nothing to mask: skip a pass over the values in every attention layer.
        value_mask = mask_flat if padded else None
        memory, encoder_states = self.encoder(
            source_flat, position_flat, value_mask, spatial_shapes, geometry.reference_points, output_hidden_states
        )

        d_model = self.config.d_model
        enc_outputs_class = enc_outputs_coord_logits = None
        if self.config.two_stage:
            class_heads, box_heads = self.decoder.class_embed, self.decoder.bbox_embed
            # Both are built for two-stage (validate() makes two_stage imply with_box_refine).
            assert class_heads is not None and box_heads is not None
            with float32_region(memory.device.type):
                proposals, proposal_memory, _ = encoder_proposals(at_least_float32(memory), mask_flat, spatial_shapes)
                # (batch, sequence, d_model)
                object_queries = self.enc_output_norm(self.enc_output(proposal_memory))
                enc_outputs_class = class_heads[-1](object_queries)
                enc_outputs_coord_logits = box_heads[-1](object_queries) + proposals
            # The paper ranks proposals by the first class channel (binary "object" score during training).
            top = torch.topk(enc_outputs_class[..., 0], self.config.two_stage_num_proposals, dim=1).indices
            top_logits = torch.gather(enc_outputs_coord_logits, 1, top[..., None].expand(-1, -1, 4)).detach()
            reference_points = top_logits.sigmoid()
            query_embeddings = self.pos_trans_norm(
                self.pos_trans(proposal_position_embedding(top_logits, d_model // 2))
            )
            query_position, target = query_embeddings.split(d_model, dim=2)
        else:
            query_position, target = self.query_position_embeddings.weight.split(d_model, dim=1)
            query_position = query_position[None].expand(batch, -1, -1)
            target = target[None].expand(batch, -1, -1)
            with float32_region(query_position.device.type):
                reference_points = self.reference_points(at_least_float32(query_position)).sigmoid()

        hidden_states, intermediate_points, decoder_states = self.decoder(
            target,
            query_position,
            reference_points,
            memory,
            value_mask,
            spatial_shapes,
            valid_ratios,
            output_hidden_states,
        )
        return DeformableDetrModelOutput(
            last_hidden_state=hidden_states[:, -1],
            init_reference_points=reference_points,
            intermediate_hidden_states=hidden_states,
            intermediate_reference_points=intermediate_points,
            decoder_hidden_states=decoder_states,
            encoder_last_hidden_state=memory,
            encoder_hidden_states=encoder_states,
            enc_outputs_class=enc_outputs_class,
            enc_outputs_coord_logits=enc_outputs_coord_logits,
        )
