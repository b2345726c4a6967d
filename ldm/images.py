"""Images in and out of the models' range: PIL images and files <-> tensors (B, C, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.errors import InputError
from ldm.metrics import to_uint8
from ldm.settings import MAX_SIDE


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arrays = to_uint8(images).to(torch.uint8)
    return [Image.fromarray(a) for a in arrays.permute(0, 2, 3, 1).cpu().numpy()]


def load_image(source: str | Path | Image.Image, mode: str) -> torch.Tensor:
    """An image file or PIL image as (1, C, H, W) float32 in [0, 1]; `mode` "RGB" or "L" (a mask)."""
    if isinstance(source, Image.Image):
        return _to_tensor(source, mode)
    path = Path(source)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return _to_tensor(image, mode)
    except UNREADABLE as e:
        raise InputError(f"cannot read image {path}: {reason(e)} (pass a PNG or JPEG file)") from None


# What opening an image file raises for a file that is not one, or (DecompressionBombError) whose header
# claims more pixels than Pillow's limit, which it refuses before reading them.
UNREADABLE = (OSError, UnidentifiedImageError, Image.DecompressionBombError)


def reason(e: Exception) -> str:
    """Why an image file could not be read, for a one-line message."""
    return getattr(e, "strerror", None) or str(e)


def _to_tensor(image: Image.Image, mode: str) -> torch.Tensor:
    if max(image.size) > MAX_SIDE:  # refused before its pixels are read and converted to float32
        raise InputError(f"the image is {image.width}x{image.height}; its sides must be at most {MAX_SIDE} "
                         "(resize it)")
    array = torch.from_numpy(np.asarray(image.convert(mode), dtype=np.float32) / 255)
    return (array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)).unsqueeze(0)
