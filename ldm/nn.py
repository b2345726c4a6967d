"""Building blocks shared by the U-Net: normalization, CPU-fast Conv2d and Linear, timestep embedding, ResBlock,
resampling.

Parameter names follow the original `ldm` code (`in_layers`, `emb_layers`, `op`, ...) so that
Stable Diffusion checkpoints load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics: float16 input normalizes in float32 and casts back, as its
    statistics overflow; float32 and bfloat16 run as they are (torch accumulates bfloat16 in float32:
    the same numbers as upcasting, several times faster).

    The affine parameters go to float32 with the input: torch's group_norm takes a float32 input only
    with float32 parameters, and a pipeline cast to fp16 casts them too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16 and (self.weight is None or self.weight.dtype == x.dtype):
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def _onednn_linear_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes this build and CPU run through oneDNN's matmul: none without it, bfloat16 only where
    oneDNN has bf16 kernels for the CPU (AVX512 or AMX; elsewhere torch keeps its own)."""
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018  (the op inductor's CPU freezing uses)
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return ()
    if not torch.backends.mkldnn.is_available():
        return ()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


ONEDNN_LINEAR_DTYPES = _onednn_linear_dtypes()
# Narrower layers (the bundled model's 64 and 128) run faster on MKL: oneDNN's per-call cost dominates there.
ONEDNN_MIN_FEATURES = 256


class Linear(nn.Linear):
    """nn.Linear (same parameters, same numbers to rounding) whose CPU inference runs on oneDNN's matmul.

    Eager torch sends a float32 linear to MKL's GEMM, which on the CPU measured took 1.1-1.4x the time of
    oneDNN's matmul on U-Net shapes (docs/benchmarks.md). The oneDNN op has no backward, so anything
    that needs a gradient, autocast, torch.compile (inductor packs its own weights), layers narrower than
    ONEDNN_MIN_FEATURES and dtypes outside ONEDNN_LINEAR_DTYPES take nn.Linear's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_onednn(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)

    def uses_onednn(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs on oneDNN's matmul (then its post-ops may be fused into it too)."""
        tensors = [t for t in (x, self.weight, self.bias) if t is not None]
        # A quantized weight (a tensor subclass) keeps its own kernels.
        return (x.device.type == "cpu" and x.dtype in ONEDNN_LINEAR_DTYPES
                and min(self.in_features, self.out_features) >= ONEDNN_MIN_FEATURES
                and type(self.weight) in (nn.Parameter, torch.Tensor) and x.numel() > 0
                and all(t.dtype == x.dtype for t in tensors)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


# A CPU convolution runs as im2col + one matrix product when its output has at most SMALL_MAP_PIXELS pixels
# per image and it reads at least SMALL_MAP_MIN_CHANNELS channels. oneDNN's direct kernels slow down sharply
# from about 1024 input channels on small maps (a 3x3 conv of 1280 channels at 4 x 4 runs at about a third
# of the matrix product's speed); from 16 x 16 up, or below 1024 channels, they are the faster
# (docs/benchmarks.md).
SMALL_MAP_PIXELS = 64
SMALL_MAP_MIN_CHANNELS = 1024


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same numbers to rounding) that computes small CPU feature maps as a
    matrix product of the weight (O, C*kh*kw) with the unfolded input (B, C*kh*kw, h_out*w_out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self._small_output_size(x)
        if size is None:
            return super().forward(x)
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out = torch.matmul(self.weight.flatten(1), columns)  # (B, O, h_out * w_out)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.unflatten(-1, size)

    def _small_output_size(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(h_out, w_out) when x takes the matrix-product path, else None."""
        # 1x1 convolutions are matrix products in oneDNN already; NHWC weights or input (to_channels_last)
        # stay with oneDNN, whose output keeps that layout.
        if (x.device.type != "cpu" or x.ndim != 4 or not (x.is_contiguous() and self.weight.is_contiguous())
                or self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or self.kernel_size == (1, 1) or self.in_channels < SMALL_MAP_MIN_CHANNELS):
            return None
        h_out, w_out = (
            (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for size, pad, dil, k, stride in zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size,
                                                 self.stride, strict=True)
        )
        return (h_out, w_out) if h_out * w_out <= SMALL_MAP_PIXELS else None


def normalization(channels: int, num_groups: int = 32) -> GroupNorm32:
    """The U-Net's normalization: 32 groups in SD."""
    return GroupNorm32(num_groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so that a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (B,) -> (B, dim), cosines first as in the original code."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding: (B, C, h, w), (B, E) -> (B, C_out, h, w)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 num_groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels, num_groups), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, num_groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving height and width."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling followed by a 3x3 convolution.

    `size` lets the U-Net match an odd-sized skip connection instead of doubling blindly.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
