"""Tiled decode and encode: exact where tiles cannot matter, close and seamless on a real (tiny) autoencoder."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.errors import InputError
from ldm.tiling import axis_tiles, ramp, tiled_decode, tiled_encode
from tests.conftest import randomize_, tiny_spec


@pytest.mark.parametrize(("size", "tile_size", "overlap"),
                         [(10, 16, 4), (16, 16, 4), (17, 16, 4), (40, 16, 4), (41, 16, 8), (48, 24, 0), (100, 7, 3)])
def test_tiles_cover_the_axis_with_the_overlap(size, tile_size, overlap):
    tiles = axis_tiles(size, tile_size, overlap)
    covered = torch.zeros(size, dtype=torch.int64)
    for start, end, _, _ in tiles:
        assert end - start == min(tile_size, size)
        covered[start:end] += 1
    assert covered.min() >= 1 and tiles[0][0] == 0 and tiles[-1][1] == size
    for previous, following in itertools.pairwise(tiles):
        shared = previous[1] - following[0]
        assert following[0] > previous[0] and shared >= overlap
        assert previous[3] == following[2] == shared
    assert tiles[0][2] == 0 and tiles[-1][3] == 0


def test_neighbouring_ramps_sum_to_one():
    # Tile A ends with a 6-pixel fall, tile B starts with a 6-pixel rise over the same pixels.
    a, b = ramp(20, 0, 6), ramp(16, 6, 0)
    torch.testing.assert_close(a[-6:] + b[:6], torch.ones(6))
    assert torch.equal(a[:-6], torch.ones(14)) and torch.equal(b[6:], torch.ones(10))
    assert (a > 0).all() and (b > 0).all()


class PixelwiseAutoencoder(nn.Module):
    """An f=8 stand-in whose every latent pixel maps to its own 8 x 8 image block and back: a tile boundary
    on the latent grid cannot change any value, so tiled results must equal untiled ones exactly."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(downsampling_factor=8)
        generator = torch.Generator().manual_seed(0)
        self.to_pixels = nn.Parameter(torch.randn(3 * 64, 4, 1, 1, generator=generator))
        self.to_moments = nn.Parameter(torch.randn(8, 3 * 64, 1, 1, generator=generator) / 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(F.conv2d(z, self.to_pixels), 8)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(F.conv2d(F.pixel_unshuffle(images, 8), self.to_moments))


@pytest.mark.parametrize(("tile_size", "overlap"), [(4, 2), (5, 2), (6, 0), (7, 3), (64, 16)])
def test_tiling_is_exact_when_tiles_cannot_matter(tile_size, overlap):
    autoencoder = PixelwiseAutoencoder()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 9, 14, generator=generator)  # not a multiple of any stride
    with torch.no_grad():
        torch.testing.assert_close(tiled_decode(autoencoder, latents, tile_size, overlap),
                                   autoencoder.decode(latents), rtol=1e-5, atol=1e-5)
        images = torch.rand(2, 3, 72, 112, generator=generator) * 2 - 1
        tiled = tiled_encode(autoencoder, images, 8 * tile_size, 8 * overlap)
        full = autoencoder.encode(images)
    torch.testing.assert_close(tiled.mean, full.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled.logvar, full.logvar, rtol=1e-5, atol=1e-5)


def seam_ratio(tiled: torch.Tensor, full: torch.Tensor, dim: int, cuts: list[int]) -> float:
    """How much the tiled-minus-full error jumps between neighbouring pixels at tile borders along `dim`,
    relative to its median jump: a seam is a step in the error that the full decode does not have."""
    error = tiled - full
    jumps = error.diff(dim=dim).abs().mean(dim=[d for d in range(4) if d != dim % 4])
    return (jumps[cuts].max() / jumps.median()).item()


def tile_borders(size: int, tile_size: int, overlap: int, factor: int) -> list[int]:
    """Indices of `diff` (pixel p to p + 1) where a tile starts or ends, in output pixels."""
    tiles = axis_tiles(size, tile_size, overlap)
    return sorted({factor * start - 1 for start, *_ in tiles[1:]} | {factor * end - 1 for _, end, *_ in tiles[:-1]})


def test_tiled_decode_is_close_to_the_full_decode_and_has_no_seams():
    torch.manual_seed(0)
    autoencoder = randomize_(AutoencoderKL(tiny_spec().autoencoder), seed=5).eval()
    latents = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = autoencoder.decode(latents)
        tiled = tiled_decode(autoencoder, latents, tile_size=24, overlap=8)  # 2 x 3 tiles
        hard_cut = tiled_decode(autoencoder, latents, tile_size=24, overlap=0)
    # Random weights are a harsh case: the decoder sees about 14 latent pixels around each pixel, so
    # with 24-pixel tiles nearly every output pixel feels the tile's zero padding and its own GroupNorm
    # statistics. The bounds hold with a margin of about 1.5; a misplaced tile has errors of order std(full).
    error = (tiled - full).abs()
    assert error.mean() <= 0.15 * full.std()
    assert error.max() <= 0.35 * full.abs().max()
    for dim, size in ((-1, 48), (-2, 32)):
        assert seam_ratio(tiled, full, dim, tile_borders(size, 24, 8, factor=8)) <= 2.0
    # Tiles that abut without blending (the two columns of tiles at overlap 0) show a seam to the same
    # measure, so it is not blind to one. (Rows still overlap: the last row of tiles is moved back to fit.)
    assert seam_ratio(hard_cut, full, -1, tile_borders(48, 24, 0, factor=8)) >= 4.0


def test_tiled_encode_is_close_to_the_full_encode():
    torch.manual_seed(0)
    autoencoder = randomize_(AutoencoderKL(tiny_spec().autoencoder), seed=7).eval()
    images = torch.rand(1, 3, 256, 384, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        full = autoencoder.encode(images)
        tiled = tiled_encode(autoencoder, images, tile_size=192, overlap=64)
    assert tiled.mean.shape == full.mean.shape == (1, 4, 32, 48)
    assert (tiled.mean - full.mean).abs().mean() <= 0.1 * full.mean.std()


@pytest.mark.parametrize(("tile_size", "overlap", "match"), [
    (0, 0, "tile size"), (16, 9, "overlap"), (16, -1, "overlap"),
])
def test_bad_tiles_are_input_errors(tile_size, overlap, match):
    with pytest.raises(InputError, match=match):
        tiled_decode(PixelwiseAutoencoder(), torch.zeros(1, 4, 8, 8), tile_size, overlap)


def test_encode_tiles_must_align_with_the_latent_grid():
    autoencoder = PixelwiseAutoencoder()
    with pytest.raises(InputError, match="multiple of 8"):
        tiled_encode(autoencoder, torch.zeros(1, 3, 64, 64), tile_size=60, overlap=16)
    with pytest.raises(InputError, match="height must be a multiple of 8"):
        tiled_encode(autoencoder, torch.zeros(1, 3, 60, 64), tile_size=64, overlap=16)


def test_pipeline_tiling_decodes_and_encodes_through_the_tiles(monkeypatch):
    from ldm import pipeline as pipeline_module
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_spec(tiny_spec())
    calls = []
    monkeypatch.setattr(pipeline_module, "tiled_decode", lambda ae, z, size, overlap: calls.append((size, overlap))
                        or torch.zeros(z.shape[0], 3, 8 * z.shape[2], 8 * z.shape[3]))
    monkeypatch.setattr(pipeline_module, "tiled_encode", lambda ae, x, size, overlap: calls.append((size, overlap))
                        or ae.encode(x))
    pipe.enable_tiling(4, 1)
    pipe.decode(torch.zeros(1, 4, 8, 8))
    pipe.encode(torch.zeros(1, 3, 64, 64))
    assert calls == [(4, 1), (32, 8)]  # latent pixels for decoding, image pixels for encoding
