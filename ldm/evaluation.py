"""How well a shapes-v1 model follows prompts, judged by the pixel-rule attribute checker."""

from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm

from ldm.data.shape_checker import check, parse_caption
from ldm.data.shapes import canonical_caption, sample_attributes
from ldm.pipeline import Pipeline


def canonical_captions(split: str, num_samples: int) -> list[str]:
    """The canonical captions of samples 0 .. num_samples - 1 of `split` (no rendering)."""
    return [canonical_caption(sample_attributes(split, i)[0]) for i in range(num_samples)]


def prompt_following(pipe: Pipeline, captions: list[str], num_steps: int = 50, guidance_scale: float = 5.0,
                     batch_size: int = 50, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Share of images with every requested attribute right (`all`), and per attribute.

    Image k is generated with seed `seed + k`, so the figure is reproducible.
    """
    correct: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for start in tqdm(range(0, len(captions), batch_size), desc="prompt following", disable=not progress):
        batch = captions[start : start + batch_size]
        images = pipe(batch, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed + start, progress=False)
        for caption, image in zip(batch, images, strict=True):
            result = check(image, parse_caption(caption))
            for name, ok in result.items():
                correct[name] += ok
                counts[name] += 1
            correct["all"] += all(result.values())
            counts["all"] += 1
    return {name: correct[name] / counts[name] for name in sorted(counts)}
