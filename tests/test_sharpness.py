"""The corner-seeing sharpness measures: near the ideal on the dataset's renderings, off it where a shape goes soft."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from ldm.shapes.dataset import render, sample_attributes
from ldm.shapes.evaluation import autoencoder_sharpness, sharpness_by_group
from ldm.shapes.sharpness import sharpness

SAMPLES = [sample_attributes("val", index)[0] for index in range(120)]


def by_shape(images, samples) -> dict[str, float]:
    return {group: values["median"] for group, values in sharpness_by_group(images, samples).items()}


def test_renderings_read_near_the_ideal_and_blur_rounds_corners_and_widens_tips():
    rendered = by_shape([render(sample) for sample in SAMPLES], SAMPLES)
    assert set(rendered) == {f"{size} {shape}" for size in ("small", "large") for shape in ("circle", "square",
                                                                                              "triangle")}
    ideal_tip = math.degrees(2 * math.atan(0.5))  # 53.1: apex up in a square box
    for size in ("small", "large"):
        assert rendered[f"{size} square"] > 0.99 and 0.9 < rendered[f"{size} circle"] < 1.0
        assert ideal_tip <= rendered[f"{size} triangle"] < ideal_tip + 3
    blurred = by_shape([render(sample).filter(ImageFilter.GaussianBlur(1.5)) for sample in SAMPLES], SAMPLES)
    for size in ("small", "large"):
        assert blurred[f"{size} square"] < rendered[f"{size} square"] - 0.05
        assert blurred[f"{size} triangle"] > rendered[f"{size} triangle"] + 3


def test_roundness_tells_a_disc_from_a_square():
    def drawn(square: bool) -> Image.Image:
        image = Image.new("RGB", (256, 256), (240, 240, 240))
        draw = ImageDraw.Draw(image)
        (draw.rectangle if square else draw.ellipse)((64, 64, 191, 191), fill=(30, 70, 220))
        return image.resize((64, 64), Image.Resampling.BOX)

    assert sharpness(drawn(square=False), "circle") > 0.92
    assert sharpness(drawn(square=True), "circle") == pytest.approx(math.pi / 4, abs=0.03)
    assert sharpness(drawn(square=True), "square") > 0.99


def test_groups_count_only_images_read_with_the_asked_shape_and_size():
    circle = next(sample for sample in SAMPLES if sample.shape == "circle")
    square = next(sample for sample in SAMPLES if sample.shape == "square" and sample.size == circle.size)
    result = sharpness_by_group([render(square), render(circle)], [circle, circle])
    assert result == {f"{circle.size} circle": {"median": sharpness(render(circle), "circle"), "n": 1}}
    assert sharpness(Image.new("RGB", (64, 64), (20, 20, 20)), "square") is None
    with pytest.raises(ValueError, match="unknown shape"):
        sharpness(render(circle), "star")


class Identity(torch.nn.Module):
    """An autoencoder stand-in whose reconstructions are its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def encode(self, images: torch.Tensor):
        return type("Posterior", (), {"mean": images})()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def test_autoencoder_sharpness_compares_reconstructions_with_renderings():
    result = autoencoder_sharpness(Identity(), num_samples=60, batch_size=25)
    assert result["decoded"].keys() == result["rendered"].keys()
    for group, values in result["rendered"].items():
        assert np.isclose(result["decoded"][group]["median"], values["median"], rtol=0.02), group
        assert result["decoded"][group]["n"] == values["n"]
