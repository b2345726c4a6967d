"""Judge a 64 x 64 image against a shapes-v1 caption by pixel rules.

`read_attributes` measures the picture: background = nearest background colour to the median of
the border; the object = the 8-connected foreground region around its most solid point; its
colour = nearest palette colour to the median of its interior; then a coverage map `alpha`
(0 = background, 1 = object colour) gives the bounding box (alpha >= 0.5), the size (box extent),
the position (box centre) and the shape (where the mass lies and how much of the box it fills).

Every threshold sits halfway between the values the ideal renderings give, so images from a
diffusion model (noise, blur, slight colour shifts, a pixel or two of misplacement) are judged
by the nearest ideal rather than by exact pixel values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from ldm.data.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
)

_BORDER = 2  # px; the ideal shape never covers the outer pixel ring, blur may bleed one px in
# A pixel is foreground when it is further (Euclidean RGB) from the background than half the
# smallest object-to-background distance (purple on gray, 108): Gaussian noise of std 10 moves a
# pixel ~17 on average, so only extreme noise crosses this.
_FOREGROUND_DISTANCE = 0.5 * min(
    float(np.linalg.norm(np.subtract(c, b)))
    for c, b in product(COLORS.values(), BACKGROUNDS.values())
)
_MIN_OBJECT_PIXELS = 24  # the smallest ideal object (small triangle) covers ~130 px
_SIZE_THRESHOLD = (min(SIZES.values()) + max(SIZES.values())) / 2  # 24 px
# Height of the mass centroid within the box, as a fraction from the top: a triangle with apex up
# gives 2/3, a circle or square 1/2; the threshold is halfway.
_TRIANGLE_CENTROID = (2 / 3 + 1 / 2) / 2
# Mean coverage of the box: square 1, circle pi/4; halfway. Blur lowers both alike.
_SQUARE_FILL = (1 + np.pi / 4) / 2


def _one_of(values) -> str:
    return "|".join(values)


_CAPTION_PATTERN = re.compile(
    rf"a(?: (?P<size>{_one_of(SIZES)}))? (?P<color>{_one_of(COLORS)}) (?P<shape>{_one_of(SHAPES)})"
    rf"(?: in the (?P<position>{_one_of(POSITIONS)}))?"
    rf"(?: on a (?P<background>{_one_of(BACKGROUNDS)}) background)?"
)


@dataclass(frozen=True)
class Measurements:
    """What `measure` sees; lengths in px at 64 x 64. Object fields are None when none is found."""

    background_rgb: tuple[float, float, float]
    object_rgb: tuple[float, float, float] | None = None
    bbox: tuple[int, int, int, int] | None = None  # left, top, right, bottom (exclusive)
    fill: float | None = None  # mean coverage of the bounding box
    centroid: float | None = None  # mass centroid height within the box, 0 = top, 1 = bottom


def parse_caption(caption: str) -> dict[str, str]:
    """Attributes a shapes-v1 caption names, e.g. {"color": "red", "shape": "circle"}."""
    text = " ".join(caption.lower().split()).rstrip(".")
    match = _CAPTION_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{caption!r} is not a shapes-v1 caption; write e.g. "
            "'a small red circle in the top left on a black background' or 'a red circle'"
        )
    return {name: value for name, value in match.groupdict().items() if value is not None}


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        # Positions and sizes are in 64 x 64 pixels; a box filter keeps colours unbiased.
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _neighbourhood(mask: np.ndarray, reduce) -> np.ndarray:
    padded = np.pad(mask, 1, mode="constant", constant_values=reduce is np.logical_and)
    size = mask.shape[0]
    shifted = [padded[y : y + size, x : x + size] for y in range(3) for x in range(3)]
    return reduce.reduce(shifted)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _neighbourhood(mask, np.logical_or)


def _erode(mask: np.ndarray) -> np.ndarray:
    return _neighbourhood(mask, np.logical_and)


def _grow(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 8-connected part of `mask` that touches `seed`."""
    region = seed & mask
    while True:
        grown = _dilate(region) & mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _most_solid_pixel(mask: np.ndarray) -> np.ndarray:
    # The pixel with the most foreground in its 5 x 5 window lies deep inside the largest blob,
    # never on a stray speck of noise.
    counts = np.zeros(mask.shape)
    padded = np.pad(mask.astype(np.float64), 2)
    size = mask.shape[0]
    for y, x in product(range(5), range(5)):
        counts += padded[y : y + size, x : x + size]
    seed = np.zeros_like(mask)
    seed[np.unravel_index(np.argmax(counts), mask.shape)] = True
    return seed


def _nearest(table: dict[str, tuple[float, ...]], value) -> str:
    return min(table, key=lambda name: float(np.linalg.norm(np.subtract(table[name], value))))


def measure(image: Image.Image | np.ndarray) -> Measurements:
    """Measure background, object colour, box and mass layout of a (64, 64, 3) RGB image."""
    rgb = _to_array(image)
    border = np.ones(rgb.shape[:2], dtype=bool)
    border[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    background = np.median(rgb[border], axis=0)
    foreground = np.linalg.norm(rgb - background, axis=-1) > _FOREGROUND_DISTANCE
    if foreground.sum() < _MIN_OBJECT_PIXELS:
        return Measurements(background_rgb=tuple(background))
    seed = _most_solid_pixel(foreground)
    region = _grow(seed, foreground)
    # The interior avoids the anti-aliased rim, whose colours are blends with the background.
    interior = _erode(region)
    object_rgb = np.median(rgb[interior if interior.any() else region], axis=0)

    direction = object_rgb - background
    alpha = (rgb - background) @ direction / (direction @ direction)
    solid = _grow(seed, alpha >= 0.5)
    if not solid.any():  # the seed itself is closer to the background than to the median colour
        return Measurements(background_rgb=tuple(background))
    rows, cols = np.nonzero(solid)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = np.clip(alpha[top:bottom, left:right], 0.0, 1.0)
    row_heights = np.arange(bottom - top) + 0.5
    centroid = float((box.sum(axis=1) @ row_heights) / box.sum() / (bottom - top))
    return Measurements(
        background_rgb=tuple(background),
        object_rgb=tuple(object_rgb),
        bbox=(int(left), int(top), int(right), int(bottom)),
        fill=float(box.mean()),
        centroid=centroid,
    )


def read_attributes(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """Infer color, shape, size, position and background; object attributes None if no object."""
    found = measure(image)
    attributes: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    attributes["background"] = _nearest(BACKGROUNDS, found.background_rgb)
    if found.bbox is None:
        return attributes
    left, top, right, bottom = found.bbox
    attributes["color"] = _nearest(COLORS, found.object_rgb)
    attributes["size"] = "large" if max(right - left, bottom - top) > _SIZE_THRESHOLD else "small"
    attributes["position"] = _nearest(POSITIONS, ((left + right) / 2, (top + bottom) / 2))
    if found.centroid > _TRIANGLE_CENTROID:
        attributes["shape"] = "triangle"
    else:
        attributes["shape"] = "square" if found.fill > _SQUARE_FILL else "circle"
    return attributes


def check(image: Image.Image | np.ndarray, requested: dict[str, str]) -> dict[str, bool]:
    """For each requested attribute (e.g. from `parse_caption`), whether the image shows it."""
    unknown = set(requested) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; use names from {ATTRIBUTES}")
    found = read_attributes(image)
    return {name: found[name] == value for name, value in requested.items()}
