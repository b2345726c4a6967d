"""Image quality numbers used by the training runs and scripts/evaluate.py."""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> 8-bit values, as they would be saved."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, on 8-bit quantised pixels: (B, 3, H, W) x2 -> (B,)."""
    mse = (to_uint8(images) - to_uint8(reconstructions)).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))
