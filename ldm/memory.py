"""What a generation request needs in memory and what the device has free, so that a request that
cannot fit is refused in one line before anything is allocated (`Pipeline.generate`).

The estimate counts activations only (the weights are loaded already, and the free memory is read
after loading): the larger of sampling's U-Net peak and the autoencoder decode's peak, which never
coexist. Each is linear in pixels, with factors measured on a CPU in float32 at SD 1.5's config
(docs/benchmarks.md: the U-Net, 129 MiB for 2 rows of 32 x 32 latents, 52 elements per latent pixel and
channel of its first level; the decode, 225 MiB at 256 x 256, 3.5 elements per pixel and channel of its
widest full-resolution layer), rounded up. It assumes memory-efficient attention (sdpa, the default,
or sliced); the math backend's score matrices grow with the square of the pixels and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.autoencoder import AutoencoderConfig
from ldm.unet import UNetConfig

UNET_ELEMENTS = 64  # per U-Net row (2 per image with guidance), latent pixel and first-level channel
DECODER_ELEMENTS = 4  # per image, pixel and channel of the decoder's widest full-resolution layer
IMAGE_BYTES = 3 * 4 * 3  # per image and pixel: float32 RGB, three copies (decoded, clamped, tile sums)
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak activation bytes of sampling (`unet`) and of decoding the batch to images (`decode`)."""

    unet: int
    decode: int

    @property
    def peak(self) -> int:
        return max(self.unet, self.decode)


def estimate_memory(unet: UNetConfig, autoencoder: AutoencoderConfig, batch_size: int, height: int, width: int,
                    guidance: bool, element_size: int, tile_size: int | None = None) -> MemoryEstimate:
    """The activation memory of generating `batch_size` images of `height` x `width` pixels with weights of
    `element_size` bytes; `tile_size` (latent pixels) bounds the decoded area at a time."""
    factor = autoencoder.downsampling_factor
    rows = batch_size * (2 if guidance else 1)
    unet_bytes = UNET_ELEMENTS * unet.model_channels * unet.channel_mult[0] * rows * element_size
    unet_bytes *= (height // factor) * (width // factor)
    # The decoder's last level reads the upsampled output of the level before it, at full resolution.
    channels = autoencoder.ch * max(autoencoder.ch_mult[:2])
    area = height * width if tile_size is None else min(height, tile_size * factor) * min(width, tile_size * factor)
    decode_bytes = batch_size * (DECODER_ELEMENTS * channels * area * element_size + IMAGE_BYTES * height * width)
    return MemoryEstimate(unet_bytes, decode_bytes)


def format_bytes(n: float) -> str:
    """`n` bytes as GiB, or MiB below 1 GiB, for messages."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes that `device` can still allocate: on an accelerator whose torch module reports it (CUDA, XPU)
    the free memory plus what torch's allocator holds unused; on a CPU the system's available memory
    (psutil's figure where it is installed, else MemAvailable of /proc/meminfo); None where it is not
    known (then nothing is checked)."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "mem_get_info"):
        free, _ = backend.mem_get_info(device)
        return free + backend.memory_reserved(device) - backend.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return psutil.virtual_memory().available


def _meminfo_available() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # in kB
    return None
