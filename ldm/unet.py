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
from ldm.nn import Downsample, ResBlock, Upsample, normalization, timestep_embedding, zero_module

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
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    dropout: float = 0.0
    # GroupNorm groups (32 in SD, where every group has 10+ channels); narrow models need fewer so
    # that a group still carries what the features are, not only how they vary.
    norm_num_groups: int = 32

    @classmethod
    def from_dict(cls, params: dict) -> UNetConfig:
        """Build from a YAML `params` mapping, skipping keys that only steer the original code."""
        return cls(**config_kwargs(cls, params, ORIGINAL_ONLY_KEYS))

    def to_dict(self) -> dict:
        return config_dict(self)

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """Attention heads and head width at a level with `channels` features."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


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
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

        def attention(channels: int) -> SpatialTransformer:
            heads, dim_head = config.heads_and_dim(channels)
            return SpatialTransformer(channels, heads, dim_head, config.context_dim, config.transformer_depth,
                                      config.use_linear_in_transformer, config.dropout, config.norm_num_groups)

        def resblock(channels: int, out_channels: int) -> ResBlock:
            return ResBlock(channels, emb_channels, out_channels, config.dropout, config.norm_num_groups)

        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in config.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(
            resblock(ch, ch),
            attention(ch),
            resblock(ch, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in config.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, config.norm_num_groups), nn.SiLU(),
            zero_module(nn.Conv2d(mc, config.out_channels, 3, padding=1)),
        )

    def _run(self, block: TimestepSequential, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x_t.dtype))
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
