"""KL-regularised autoencoder (f=8 in Stable Diffusion): images <-> latents.

Module and parameter names follow the original `ldm` `AutoencoderKL` (`encoder.down.0.block.0.conv1`,
`quant_conv`, ...) so that a checkpoint's `first_stage_model.*` weights load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import DEFAULT_SLICE_SIZE, attention
from ldm.config import config_dict, config_kwargs
from ldm.nn import Upsample

# Keys of the original `first_stage_config.params` that do not shape the network.
ORIGINAL_ONLY_KEYS = {"monitor", "lossconfig", "ckpt_path", "ignore_keys", "image_key"}


@dataclass
class AutoencoderConfig:
    """`ddconfig` of the original YAMLs (same names), plus `embed_dim` and the latent `scale_factor`.

    `scale_factor` is 1 / std of the latents on training data (0.18215 for Stable Diffusion): the
    diffusion model works on `latents * scale_factor`, which has roughly unit variance.
    """

    embed_dim: int = 4
    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    scale_factor: float = 0.18215
    # GroupNorm groups (32 in SD). With few channels per group the norm erases what a flat image
    # is made of (32 groups of a 32-wide layer normalize every channel alone), so thin models use fewer.
    norm_num_groups: int = 32

    @classmethod
    def from_dict(cls, params: dict) -> AutoencoderConfig:
        """From a flat mapping or the original `{embed_dim, ddconfig: {...}}` nesting."""
        params = dict(params)
        params.update(params.pop("ddconfig", {}))
        return cls(**config_kwargs(cls, params, ORIGINAL_ONLY_KEYS))

    def to_dict(self) -> dict:
        return config_dict(self)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int, num_groups: int) -> nn.GroupNorm:  # noqa: N802 - reads as a layer, like nn.GroupNorm
    return nn.GroupNorm(num_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = Normalize(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Activations in place (a normalization's output is not needed for its backward), and h rebound
        # only to the normalized tensor: besides x, at most two activations are alive at any time.
        # At the decoder's full resolution each is 64 MiB for a 256 x 256 SD decode.
        h = self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True)))
        h = self.conv2(self.dropout(F.silu(h, inplace=True)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = Normalize(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        # One head as wide as the layer (512 in SD): where no fused kernel takes that width, a large
        # image's score matrix alone is huge, so this layer follows ldm.attention.set_attention_backend.
        self.attention_backend = "sdpa"
        self.attention_slice_size = DEFAULT_SLICE_SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, self.attention_backend, self.attention_slice_size)  # (B, 1, h*w, C)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class PaddedDownsample(nn.Module):
    """Stride-2 3x3 convolution with the original autoencoder's asymmetric padding (right and bottom only);
    the U-Net's `ldm.nn.Downsample` pads all sides."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, optional attention, resampling."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
                 cfg: AutoencoderConfig):
        super().__init__()
        groups = cfg.norm_num_groups
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, cfg.dropout, groups)
            for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(num_blocks if attention else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: AutoencoderConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_num_groups)
        self.attn_1 = AttnBlock(channels, cfg.norm_num_groups)
        self.block_2 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """images (B, 3, H, W) -> (B, 2 * z_channels, H / f, W / f): the posterior's mean and log-variance
    (z_channels alone with double_z=False)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution, block_in = cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = Level(block_in, cfg.ch * mult, cfg.num_res_blocks, resolution in cfg.attn_resolutions, cfg)
            block_in = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = PaddedDownsample(block_in)
                resolution //= 2
            self.down.append(level)
        self.mid = MidBlock(block_in, cfg)
        self.norm_out = Normalize(block_in, cfg.norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> images (B, 3, f h, f w), unbounded (about [-1, 1])."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // cfg.downsampling_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, cfg)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = Level(block_in, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1,
                          resolution in cfg.attn_resolutions, cfg)
            block_in = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
                resolution *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from the coarsest
        self.norm_out = Normalize(block_in, cfg.norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        # As in ResnetBlock: the last level's output is freed once normalized.
        h = self.norm_out(h)
        return self.conv_out(F.silu(h, inplace=True))


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from encoder moments (B, 2C, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) summed over latent dimensions: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """encode: images (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, 4, H/8, W/8);
    decode: unscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1]."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z = config.z_channels
        self.quant_conv = nn.Conv2d(2 * z if config.double_z else z, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, z, 1)

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
