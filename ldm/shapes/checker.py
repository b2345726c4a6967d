"""Judge a 64 x 64 image against a shapes-v1 caption by pixel rules.

`read_attributes` measures the picture: background = nearest background colour to the median of
the border; the object = the 8-connected foreground region around its most solid point; its
colour = nearest palette colour to the median of its interior; then a coverage map `alpha`
(0 = background, 1 = object colour) gives the bounding box (3 x 3 mean of alpha >= 0.5), the size
(box extent), the position (box centre) and the shape: a triangle (apex up) has its mass low in
the box, a square fills the corners of its box and a circle leaves them mostly empty.

Images from a diffusion model are noisy, blurred, slightly off in colour and placement, so each
rule picks the nearest ideal value rather than asking for exact pixels. Colour, background,
size and position thresholds sit halfway between the ideal values; the two shape thresholds
sit where blur and noise leave the widest margin (see their comments)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from ldm.shapes.dataset import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SIZES,
    VOCABULARY,
)

_BORDER = 2  # px; the ideal shape never covers the outer pixel ring, blur may bleed one px in
# A pixel is foreground when its 3 x 3 mean is further (Euclidean RGB) from the background than
# half the smallest object-to-background distance (purple on gray, 108). The mean divides noise
# by 3, so even Gaussian noise of std 20 (~35 in RGB distance) stays below the threshold.
_FOREGROUND_DISTANCE = 0.5 * min(
    float(np.linalg.norm(np.subtract(color, background)))
    for color, background in product(COLORS.values(), BACKGROUNDS.values())
)
_MIN_OBJECT_PIXELS = 24  # the smallest ideal object (small triangle) covers ~130 px
_SIZE_THRESHOLD = (min(SIZES.values()) + max(SIZES.values())) / 2  # 24 px
# Mass in the top quarter of the box over mass in the top and bottom quarters: an ideal apex-up
# triangle gives 1/8 (0.16-0.19 as rendered, the faint apex row falling outside the box), a
# circle or square 1/2. Blur erodes the apex and so lifts a triangle's share (to ~0.34 at blur
# sigma 1.5 px plus noise std 10) while a circle's stays symmetric about 1/2 (>= 0.46 there).
_TRIANGLE_TOP_SHARE = 0.4
# Mean coverage of the four corner patches (a quarter of the box side each): a square gives 1,
# a circle 0.315 (the part of a corner patch inside the inscribed circle). Blur lowers a
# square's corners far more than it raises a circle's (to >= 0.74 and <= 0.41 at blur sigma
# 1.5 px plus noise std 10), so the threshold sits below the ideal midpoint of 0.66.
_SQUARE_CORNER_FILL = 0.55


def _one_of(attribute: str) -> str:
    return "|".join(re.escape(value) for value in VOCABULARY[attribute])


_CAPTION_PATTERN = re.compile(
    rf"a(?: (?P<size>{_one_of('size')}))? (?P<color>{_one_of('color')}) "
    rf"(?P<shape>{_one_of('shape')})"
    rf"(?: in the (?P<position>{_one_of('position')}))?"
    rf"(?: on a (?P<background>{_one_of('background')}) background)?"
)


@dataclass(frozen=True, eq=False)
class Measurements:
    """What `measure` sees; lengths in px at 64 x 64. Object fields are None when none is found."""

    background_rgb: tuple[float, float, float]
    object_rgb: tuple[float, float, float] | None = None
    bbox: tuple[int, int, int, int] | None = None  # left, top, right, bottom (exclusive)
    top_share: float | None = None  # top-quarter mass / (top- + bottom-quarter mass)
    corner_fill: float | None = None  # mean coverage of the four corner patches of the box
    # (64, 64) coverage in [0, 1] near the object (its region grown by 2 px), 0 elsewhere
    coverage: np.ndarray | None = None


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


def _box_mean(values: np.ndarray, mode: str = "edge") -> np.ndarray:
    """3 x 3 mean over the first two axes; `mode` is how `np.pad` fills beyond the edges."""
    padded = np.pad(values, [(1, 1), (1, 1)] + [(0, 0)] * (values.ndim - 2), mode=mode)
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return (rows[:-2] + rows[1:-1] + rows[2:]) / 9


def _spread(mask: np.ndarray, combine: np.ufunc) -> np.ndarray:
    """3 x 3 dilation (combine=logical_or) or erosion (logical_and); beyond the edge is neutral."""
    rows = mask.copy()
    rows[:, 1:] = combine(rows[:, 1:], mask[:, :-1])
    rows[:, :-1] = combine(rows[:, :-1], mask[:, 1:])
    out = rows.copy()
    out[1:] = combine(out[1:], rows[:-1])
    out[:-1] = combine(out[:-1], rows[1:])
    return out


def _grow(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The 8-connected part of `mask` that touches `seed`."""
    region = seed & mask
    while True:
        grown = _spread(region, np.logical_or) & mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _nearest(table: dict[str, tuple[float, ...]], value) -> str:
    return min(table, key=lambda name: float(np.linalg.norm(np.subtract(table[name], value))))


def corner_patches(height: int, width: int) -> np.ndarray:
    """(height, width) mask of a box's four corner patches, a quarter of its side each, by pixel centres."""
    y = (np.arange(height) + 0.5) / height
    x = (np.arange(width) + 0.5) / width
    return np.outer(np.abs(y - 0.5) > 0.25, np.abs(x - 0.5) > 0.25)


def measure(image: Image.Image | np.ndarray) -> Measurements:
    """Measure background, object colour, box and mass layout of a (64, 64, 3) RGB image."""
    rgb = _to_array(image)
    border = np.ones(rgb.shape[:2], dtype=bool)
    border[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    background = np.median(rgb[border], axis=0)
    distance = np.linalg.norm(_box_mean(rgb) - background, axis=-1)
    foreground = distance > _FOREGROUND_DISTANCE
    if foreground.sum() < _MIN_OBJECT_PIXELS:
        return Measurements(background_rgb=tuple(background))
    # The pixel with the most foreground around it lies deep inside the largest blob, never on
    # a stray speck; zero padding keeps it off the image edge, where the 3 x 3 mean smears.
    solidity = _box_mean(_box_mean(foreground.astype(np.float64), "constant"), "constant")
    seed = np.zeros_like(foreground)
    seed[np.unravel_index(np.argmax(solidity), seed.shape)] = True
    region = _grow(seed, foreground)
    # The interior avoids the anti-aliased rim, whose colours are blends with the background.
    interior = _spread(region, np.logical_and)
    object_rgb = np.median(rgb[interior if interior.any() else region], axis=0)

    direction = object_rgb - background
    alpha = (rgb - background) @ direction / (direction @ direction)
    # The 3 x 3 mean divides noise by 3 and leaves the 0.5 level of a straight edge in place.
    solid = _grow(seed, _box_mean(alpha) >= 0.5)
    if not solid.any():  # the seed itself is closer to the background than to the median colour
        return Measurements(background_rgb=tuple(background))
    # A row or column joins the box only with two solid pixels: one is often a noise speck.
    rows = np.nonzero(solid.sum(axis=1) >= 2)[0]
    cols = np.nonzero(solid.sum(axis=0) >= 2)[0]
    if rows.size == 0 or cols.size == 0:
        return Measurements(background_rgb=tuple(background))
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = np.clip(alpha[top:bottom, left:right], 0.0, 1.0)
    # Rows and columns by where their centres fall, as fractions of the box.
    y = (np.arange(bottom - top) + 0.5) / (bottom - top)
    top_mass, bottom_mass = box[y < 0.25].sum(), box[y > 0.75].sum()
    corners = corner_patches(bottom - top, right - left)
    near = _spread(_spread(region, np.logical_or), np.logical_or)
    return Measurements(
        background_rgb=tuple(background),
        object_rgb=tuple(object_rgb),
        bbox=(int(left), int(top), int(right), int(bottom)),
        top_share=float(top_mass / max(top_mass + bottom_mass, 1e-9)),
        corner_fill=float(box[corners].mean()),
        coverage=np.where(near, np.clip(alpha, 0.0, 1.0), 0.0),
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
    if found.top_share < _TRIANGLE_TOP_SHARE:
        attributes["shape"] = "triangle"
    elif found.corner_fill > _SQUARE_CORNER_FILL:
        attributes["shape"] = "square"
    else:
        attributes["shape"] = "circle"
    return attributes


def check(image: Image.Image | np.ndarray, requested: dict[str, str]) -> dict[str, bool]:
    """For each requested attribute (e.g. from `parse_caption`), whether the image shows it."""
    for name, value in requested.items():
        if name not in VOCABULARY:
            raise ValueError(f"unknown attribute {name!r}; use names from {ATTRIBUTES}")
        if value not in VOCABULARY[name]:
            raise ValueError(f"{name}={value!r} is not one of {list(VOCABULARY[name])}")
    found = read_attributes(image)
    return {name: found[name] == value for name, value in requested.items()}
