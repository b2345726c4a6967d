"""Evaluating a trained pipeline: prompt following on shapes-v1 (pixel-rule checker), FID features."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ldm.data.shape_checker import check, parse_caption
from ldm.data.shapes import canonical_caption, sample_attributes
from ldm.errors import InputError
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


# torchvision's ImageNet Inception v3 weights, the network FID is defined with.
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"


def inception_features_model(device: torch.device | str = "cpu") -> torch.nn.Module:
    """Inception v3 returning 2048-d pool features, from the local torch hub cache only (never downloads)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise InputError(f"FID needs Inception v3 weights at {path} (torchvision's {INCEPTION_FILE}); "
                         "copy them there or leave out --fid")
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    return model.eval().to(device)


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> (B, 2048), resized to 299 and normalised as torchvision expects."""
    x = F.interpolate((images.float() + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
    return model((x - mean) / std)
