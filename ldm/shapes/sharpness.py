"""How crisply an image draws its shapes-v1 shape: one measure per shape that sees corners, not only PSNR.

Each is read from the checker's coverage map (`ldm.shapes.checker.measure`), counted from 0.25
to 0.75 (`solid`): blur spreads a corner or a tip into faint pixels, which then drop out, while an
anti-aliased edge keeps its sub-pixel place. Compare outputs with the renderings of the same samples:

- square: corner fill, the mean of the four corner patches of its box (as the checker's
  `corner_fill`, a quarter of the side each); rounded corners lower it.
- triangle: tip angle in degrees (`tip_angle`; 53.1 for the ideal apex-up triangle of a square box);
  a blunt or rounded tip widens it.
- circle: roundness, the isoperimetric quotient 4 pi area / perimeter^2 (a square gives pi / 4),
  with the area the sum of coverage and the perimeter the sum of its gradient's length, which for
  a blurred outline is still its length; a circle drawn as a rounded square lowers it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ldm.shapes.checker import Measurements, corner_patches, measure

MEASURES = {"square": "corner fill", "triangle": "tip angle", "circle": "roundness"}


def solid(found: Measurements) -> np.ndarray:
    """The coverage map ramped from 0 at coverage 0.25 to 1 at 0.75, padded by 2 px of background."""
    return np.pad(np.clip((found.coverage - 0.25) / 0.5, 0.0, 1.0), 2)


def tip_angle(found: Measurements) -> float | None:
    """The apex angle (degrees) of an apex-up triangle, read from the mass of its top half.

    Above depth d below the apex a triangle of apex angle theta holds d^2 tan(theta / 2), so the square
    root of the mass above each row boundary grows linearly with depth, with slope sqrt(tan(theta / 2)).
    Fitting that line over the top half (the first quarter of the mass) needs no apex position, which
    blur and rounding move. A blunt or rounded tip widens the top and so the angle. None if no fit."""
    mass_above = np.concatenate([[0.0], np.cumsum(solid(found).sum(axis=1))])  # at each row boundary
    top = (mass_above > 0) & (mass_above <= mass_above[-1] / 4)
    if top.sum() < 2:
        return None
    slope = np.polyfit(np.nonzero(top)[0], np.sqrt(mass_above[top]), 1)[0]
    return float(np.degrees(2 * np.arctan(slope**2)))


def roundness(found: Measurements) -> float:
    """4 pi area / perimeter^2 of the coverage map: 1 for a disc, pi / 4 for a square."""
    coverage = solid(found)
    gy, gx = np.gradient(coverage)
    perimeter = np.hypot(gx, gy).sum()
    return float(4 * math.pi * coverage.sum() / max(perimeter, 1e-9) ** 2)


def sharpness(image: Image.Image | np.ndarray, shape: str) -> float | None:
    """The measure of `shape` ("square", "triangle", "circle"; see `MEASURES`) on a 64 x 64 RGB image;
    None when the checker finds no object."""
    found = measure(image)
    if found.bbox is None:
        return None
    if shape == "square":
        left, top, right, bottom = found.bbox
        box = solid(found)[top + 2 : bottom + 2, left + 2 : right + 2]
        return float(box[corner_patches(bottom - top, right - left)].mean())
    if shape == "triangle":
        return tip_angle(found)
    if shape == "circle":
        return roundness(found)
    raise ValueError(f"unknown shape {shape!r}; use one of {list(MEASURES)}")
