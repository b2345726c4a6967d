"""The denoising U-Net with cross-attention: unet(x_t, t, context) -> prediction.

It knows nothing of noise schedules or samplers. Module and parameter names follow the
original `ldm` `UNetModel` (`input_blocks`, `middle_block`, `output_blocks`, `out`), so a
Stable Diffusion checkpoint's `model.diffusion_model.*` weights load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.attention import SpatialTransformer
from ldm.config import config_dict, config_kwargs
from ldm.nn import Conv2d, Downsample, Linear, ResBlock, Upsample, normalization, timestep_embedding, zero_module

# Original `unet_config` parameters that steer memory or legacy behaviour, not the network's weights.
ORIGINAL_ONLY_KEYS = {"image_size", "use_checkpoint", "use_fp16", "legacy", "use_spatial_transformer"}


@dataclass
class UNetConfig:
    """Parameters under `unet_config.params` in the original SD YAMLs (same names)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1
    # Transformer blocks per attention layer: one number, or one per level (SDXL: 1, 2, 10).
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None  # None: the last level's depth
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    # Width of the vector conditioning added to the timestep embedding through `label_emb` (SDXL's
    # pooled text and size embeddings, the original `num_classes: sequential`); None: no such input.
    adm_in_channels: int | None = None
    dropout: float = 0.0
    # GroupNorm groups (32 in SD, where every group has 10+ channels); narrow models need fewer so
    # that a group still carries what the features are, not only how they vary.
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.transformer_depth, tuple) and len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(f"transformer_depth {list(self.transformer_depth)} needs one entry per level of "
                             f"channel_mult {list(self.channel_mult)}")

    @classmethod
    def from_dict(cls, params: dict) -> UNetConfig:
        """Build from a YAML `params` mapping, skipping keys that only steer the original code.

        SDXL's YAMLs give `context_dim` once per level and mark the vector input `num_classes: sequential`.
        """
        params = dict(params)
        if isinstance(params.get("context_dim"), list):
            if len(set(params["context_dim"])) != 1:
                raise ValueError(f"context_dim {params['context_dim']} differs between levels")
            params["context_dim"] = params["context_dim"][0]
        num_classes = params.pop("num_classes", None)
        if num_classes not in (None, "sequential") or (num_classes and params.get("adm_in_channels") is None):
            raise ValueError(f"num_classes {num_classes!r} with adm_in_channels {params.get('adm_in_channels')}: only "
                             "num_classes: sequential with adm_in_channels (SDXL's vector input) is supported")
        return cls(**config_kwargs(cls, params, ORIGINAL_ONLY_KEYS | {"spatial_transformer_attn_type"}))

    def to_dict(self) -> dict:
        return config_dict(self)

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """Attention heads and head width at a level with `channels` features."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    def depth(self, level: int | None) -> int:
        """Transformer blocks of each attention layer at `level` (None: the middle block)."""
        depths = self.transformer_depth
        depths = depths if isinstance(depths, tuple) else (depths,) * len(self.channel_mult)
        if level is None:
            return depths[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle
        return depths[level]


class TimestepSequential(nn.Sequential):
    """A U-Net stage: hands each layer the inputs it takes (embedding, context or target size)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Noise (or v) predictor: x_t (B, C, h, w), t (B,), context (B, M, D) -> (B, C_out, h, w)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        mc = config.model_channels
        emb_channels = 4 * mc
        self.time_embed = nn.Sequential(Linear(mc, emb_channels), nn.SiLU(), Linear(emb_channels, emb_channels))
        if config.adm_in_channels is not None:
            # Nested as in the original, whose other `num_classes` kinds put other modules here.
            self.label_emb = nn.Sequential(nn.Sequential(Linear(config.adm_in_channels, emb_channels), nn.SiLU(),
                                                         Linear(emb_channels, emb_channels)))

        def attention(channels: int, level: int | None) -> SpatialTransformer:
            heads, dim_head = config.heads_and_dim(channels)
            return SpatialTransformer(channels, heads, dim_head, config.context_dim, config.depth(level),
                                      config.use_linear_in_transformer, config.dropout, config.norm_num_groups)

        def resblock(channels: int, out_channels: int) -> ResBlock:
            return ResBlock(channels, emb_channels, out_channels, config.dropout, config.norm_num_groups)

        self.input_blocks = nn.ModuleList([TimestepSequential(Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(attention(ch, level))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            resblock(ch, ch),
            attention(ch, None),
            resblock(ch, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers.append(attention(ch, level))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, config.norm_num_groups), nn.SiLU(),
            zero_module(Conv2d(mc, config.out_channels, 3, padding=1)),
        )

    def _run(self, block: TimestepSequential, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                vector: torch.Tensor | None = None) -> torch.Tensor:
        """`vector` (B, adm_in_channels): the vector conditioning of a U-Net with `label_emb` (SDXL)."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x_t.dtype))
        if (vector is None) != (self.config.adm_in_channels is None):
            raise ValueError(f"this U-Net takes {'a' if vector is None else 'no'} vector conditioning "
                             f"(adm_in_channels {self.config.adm_in_channels})")
        if vector is not None:
            emb = emb + self.label_emb(vector.to(emb.dtype))
        h = x_t
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = skips[-1].shape[-2:] if skips else None  # the next skip's size, for odd latent sizes
            h = self._run(block, h, emb, context, size)
        return self.out(h)
