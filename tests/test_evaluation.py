"""Evaluation: prompt following judged by the checker, FID's Fréchet distance, PSNR."""

from __future__ import annotations

import pytest
import torch

from ldm.data.shape_checker import parse_caption
from ldm.data.shapes import ShapeSample, render
from ldm.errors import InputError
from ldm.evaluation import canonical_captions, inception_features_model, prompt_following
from ldm.metrics import frechet_distance, psnr


class DrawingPipeline:
    """Stands in for a model: draws exactly what the caption asks, except that it paints every
    `wrong_every`-th image blue, so the expected scores are known in advance."""

    def __init__(self, wrong_every: int):
        self.wrong_every = wrong_every
        self.count = 0

    def __call__(self, captions, num_steps, guidance_scale, seed, progress):
        images = []
        for caption in captions:
            attrs = parse_caption(caption)
            if self.count % self.wrong_every == 0:
                attrs["color"] = "blue" if attrs["color"] != "blue" else "red"
            images.append(render(ShapeSample(**attrs)))
            self.count += 1
        return images


def test_prompt_following_counts_attributes():
    captions = canonical_captions("val", 40)
    scores = prompt_following(DrawingPipeline(wrong_every=4), captions, batch_size=16, progress=False)
    assert scores["all"] == pytest.approx(0.75) and scores["color"] == pytest.approx(0.75)
    assert scores["shape"] == scores["size"] == scores["position"] == scores["background"] == 1.0


def test_frechet_distance_closed_form():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=generator)
    b = torch.randn(4000, 8, generator=generator) * 2 + 1
    # N(0, I) vs N(1, 4I) in 8 dims: ||mu||^2 + tr(I + 4I - 2 * 2I) = 8 + 8.
    assert frechet_distance(a, b) == pytest.approx(16.0, rel=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_psnr_of_a_known_error():
    images = torch.zeros(2, 3, 8, 8)
    shifted = images + 10 / 127.5  # 10 levels of 255 everywhere
    assert torch.allclose(psnr(images, shifted), torch.full((2,), 10 * torch.log10(torch.tensor(255.0**2 / 100))))


def test_fid_without_inception_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InputError, match="inception_v3_google"):
        inception_features_model()
