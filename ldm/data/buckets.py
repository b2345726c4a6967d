"""Aspect-ratio bucketing (as kohya's sd-scripts does it): train on whole photos, not centre squares.

The buckets are the (width, height) pairs in `step`-pixel steps whose area stays within `max_area`, with
sides from `min_side` to `max_side`. Each image goes to the bucket whose aspect ratio is nearest its own,
is scaled to cover it and cropped to it (centred, or at a random offset), and every batch is drawn from
one bucket, so a batch stacks into one tensor.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(max_area: int, step: int, min_side: int, max_side: int) -> list[Bucket]:
    """Every bucket, sorted: for each width in `step`s, the tallest height in `step`s within `max_area` and
    `max_side`, and the same transposed. Square images get the largest square within `max_area`."""
    buckets = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's, compared in log space so that 2:1 and 1:2 are
    equally far from 1:1; ties go to the larger bucket (less upscaling)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_and_crop(image: Image.Image, bucket: Bucket, generator: torch.Generator | None = None) -> Image.Image:
    """Scale `image` (bicubic, antialiased) to cover `bucket` and cut the bucket out of it: centred, or at
    a uniform offset along the overhanging side when `generator` is given. The crop box is taken in the
    source image and resized in one step, with no rounded intermediate size."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    box_width, box_height = width / scale, height / scale
    slack_x, slack_y = image.width - box_width, image.height - box_height
    if generator is None:
        left, top = slack_x / 2, slack_y / 2
    else:
        left, top = (slack * torch.rand((), generator=generator, dtype=torch.float64).item()
                     for slack in (slack_x, slack_y))
    return image.resize(bucket, Image.Resampling.BICUBIC, box=(left, top, left + box_width, top + box_height))
