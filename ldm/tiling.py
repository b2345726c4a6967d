"""Tiled autoencoder decode and encode: large images in memory bounded by the tile size.

The input is cut into overlapping tiles, each tile goes through the autoencoder alone, and the
outputs are blended with weights that ramp linearly across each overlap (feathering), so that one
tile fades into the next without a seam.

Tiles are an approximation: the full pass normalizes (GroupNorm) and attends (the mid-block
self-attention) over the whole image, a tile only over itself. The result therefore differs from
the untiled one by a smooth amount that grows as tiles shrink; docs/benchmarks.md has measurements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.errors import InputError


def tiled_decode(autoencoder: AutoencoderKL, latents: torch.Tensor, tile_size: int = 64,
                 overlap: int = 16) -> torch.Tensor:
    """Unscaled latents (B, z, h, w) -> images (B, 3, f h, f w), as `autoencoder.decode`, in tiles of
    `tile_size` x `tile_size` latent pixels that overlap their neighbours by `overlap` latent pixels."""
    _check_tiles(latents, tile_size, overlap, multiple_of=1)
    factor = autoencoder.config.downsampling_factor
    return _blend_tiles(autoencoder.decode, latents, tile_size, overlap, factor)


def tiled_encode(autoencoder: AutoencoderKL, images: torch.Tensor, tile_size: int = 512,
                 overlap: int = 128) -> DiagonalGaussian:
    """Images (B, 3, H, W) -> posterior over latents (B, z, H / f, W / f), as `autoencoder.encode`, in tiles
    of `tile_size` pixels overlapping by `overlap` pixels (both multiples of the downsampling factor f).

    The posterior's mean and log-variance are blended, so sampling stays one draw per latent pixel.
    """
    factor = autoencoder.config.downsampling_factor
    _check_tiles(images, tile_size, overlap, multiple_of=factor)

    def moments(tile: torch.Tensor) -> torch.Tensor:
        posterior = autoencoder.encode(tile)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    return DiagonalGaussian(_blend_tiles(moments, images, tile_size, overlap, 1 / factor))


def _check_tiles(x: torch.Tensor, tile_size: int, overlap: int, multiple_of: int) -> None:
    if x.ndim != 4:
        raise InputError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if tile_size < 1 or not 0 <= overlap <= tile_size // 2:
        raise InputError(f"tile size must be >= 1 and overlap between 0 and half the tile size, "
                         f"got tile size {tile_size}, overlap {overlap}")
    sizes = {"tile size": tile_size, "overlap": overlap, "height": x.shape[-2], "width": x.shape[-1]}
    for name, value in sizes.items():
        if value % multiple_of:
            raise InputError(f"{name} must be a multiple of {multiple_of} (the downsampling factor), got {value}")


def axis_tiles(size: int, tile_size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles covering [0, size) along one axis: (start, end, overlap with the previous tile, overlap with
    the next). Neighbours overlap by `overlap`, except that the last tile is moved back to end at `size`."""
    if size <= tile_size:
        return [(0, size, 0, 0)]
    starts = [*range(0, size - tile_size, tile_size - overlap), size - tile_size]
    tiles = []
    for i, start in enumerate(starts):
        rise = starts[i - 1] + tile_size - start if i > 0 else 0
        fall = start + tile_size - starts[i + 1] if i + 1 < len(starts) else 0
        tiles.append((start, start + tile_size, rise, fall))
    return tiles


def ramp(length: int, rise: int, fall: int) -> torch.Tensor:
    """Blend weights (length,) along one axis of a tile: rising linearly across the first `rise` pixels,
    falling across the last `fall`, 1 in between. Two tiles' ramps over a shared stretch sum to 1."""
    position = torch.arange(length, dtype=torch.float32) + 0.5  # pixel centres: no weight is exactly 0
    weights = torch.ones(length)
    if rise:
        weights = weights * (position / rise).clamp(max=1)
    if fall:
        weights = weights * ((length - position) / fall).clamp(max=1)
    return weights


def _blend_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_size: int, overlap: int,
                 scale: float) -> torch.Tensor:
    """fn applied tile by tile to x (B, C, H, W), where fn maps (B, C, h, w) to (B, C', h scale, w scale);
    the outputs are blended into (B, C', H scale, W scale) in x's dtype."""
    out = total_weight = None
    for top, bottom, rise_y, fall_y in axis_tiles(x.shape[-2], tile_size, overlap):
        for left, right, rise_x, fall_x in axis_tiles(x.shape[-1], tile_size, overlap):
            y = fn(x[..., top:bottom, left:right]).float()  # float32 sums: fp16 tiles lose nothing in blending
            if out is None:
                out_size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
                out = y.new_zeros(*y.shape[:2], *out_size)
                total_weight = y.new_zeros(out_size)
            height, width = y.shape[-2:]
            weight = torch.outer(ramp(height, round(rise_y * scale), round(fall_y * scale)),
                                 ramp(width, round(rise_x * scale), round(fall_x * scale))).to(y.device)
            rows = slice(round(top * scale), round(top * scale) + height)
            cols = slice(round(left * scale), round(left * scale) + width)
            out[..., rows, cols] += y * weight
            total_weight[rows, cols] += weight
    return (out / total_weight).to(x.dtype)
