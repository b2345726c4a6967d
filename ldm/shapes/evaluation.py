"""Evaluations that read shapes-v1 images with the pixel-rule checker: the prompt-following plug-in
(`check_caption`), colours under a negative prompt, what img2img and the autoencoder keep, how sharp
shapes come out."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.autoencoder import AutoencoderKL
from ldm.data.loader import to_tensor
from ldm.errors import InputError
from ldm.images import to_pil
from ldm.pipeline import Pipeline
from ldm.shapes.checker import check, parse_caption, read_attributes
from ldm.shapes.dataset import ATTRIBUTES, VOCABULARY, ShapeSample, canonical_caption, render, sample_attributes
from ldm.shapes.sharpness import sharpness

Images = Sequence[Image.Image | np.ndarray]


def check_caption(image: Image.Image | np.ndarray, caption: str) -> dict[str, bool]:
    """The shapes-v1 `Checker` for `ldm.evaluation.prompt_following`: each attribute `caption` names, read
    from the pixels of `image`."""
    return check(image, parse_caption(caption))


def canonical_captions(split: str, num_samples: int) -> list[str]:
    """The canonical captions of samples 0 .. num_samples - 1 of `split` (no rendering)."""
    return [canonical_caption(sample_attributes(split, i)[0]) for i in range(num_samples)]


def color_shares(images: Images) -> dict[str, float]:
    """Share of `images` (64 x 64 RGB) whose object the checker reads as each colour of shapes-v1, and under
    "none" the share in which it finds no object."""
    if not images:
        raise InputError("no images to count colours in")
    colors = [read_attributes(image)["color"] or "none" for image in images]
    return {color: colors.count(color) / len(images) for color in (*VOCABULARY["color"], "none")}


def negative_prompt_effect(pipe: Pipeline, prompt: str = "a circle", negative_prompt: str | None = None,
                           num_samples: int = 200, num_steps: int = 50, guidance_scale: float = 5.0,
                           batch_size: int = 100, seed: int = 0,
                           progress: bool = True) -> dict[str, str | dict[str, float]]:
    """`color_shares` of `num_samples` images of `prompt` (image k from seed `seed + k`), without (`"without"`)
    and with (`"with"`) `negative_prompt` in place of the empty unconditional prompt, and under
    `"negative_prompt"` the one used: by default the colour drawn most often without it, so that the check
    measures something on any model (a colour the model never draws for `prompt` cannot fall)."""

    def shares(negative: str, key: str) -> dict[str, float]:
        images = []
        for start in tqdm(range(0, num_samples, batch_size), desc=f"{key} negative prompt", disable=not progress):
            num = min(batch_size, num_samples - start)
            images += pipe([prompt] * num, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed + start,
                           negative_prompts=negative, progress=False)
        return color_shares(images)

    without = shares("", "without")
    negative_prompt = most_drawn_color(without, prompt) if negative_prompt is None else negative_prompt
    return {"negative_prompt": negative_prompt, "without": without, "with": shares(negative_prompt, "with")}


def most_drawn_color(shares: dict[str, float], prompt: str) -> str:
    """The shapes-v1 colour with the largest share in `color_shares` output (the first in vocabulary order on
    a tie); InputError if no image of `prompt` had a colour the checker reads."""
    color = max(VOCABULARY["color"], key=lambda c: shares[c])
    if shares[color] == 0:
        raise InputError(f"no image of {prompt!r} has an object of a colour the checker reads; name the negative "
                         "prompt yourself")
    return color


def attributes_kept(inputs: Images, outputs: Images) -> dict[str, float]:
    """Share of (input, output) pairs in which the checker reads the same value of each attribute in the output
    as in the input, and of all five at once (`all`). No object found in one of them counts as a change."""
    if len(inputs) != len(outputs) or not inputs:
        raise InputError(f"need as many outputs as inputs, at least one, got {len(inputs)} and {len(outputs)}")
    kept: dict[str, int] = defaultdict(int)
    for before, after in zip(inputs, outputs, strict=True):
        read_before, read_after = read_attributes(before), read_attributes(after)
        same = {name: read_before[name] is not None and read_before[name] == read_after[name] for name in ATTRIBUTES}
        for name, ok in same.items():
            kept[name] += ok
        kept["all"] += all(same.values())
    return {name: kept[name] / len(inputs) for name in ("all", *ATTRIBUTES)}


def rendered_images(split: str, num_samples: int) -> list[Image.Image]:
    """Samples 0 .. num_samples - 1 of `split` as rendered 64 x 64 RGB images."""
    return [render(sample_attributes(split, index)[0]) for index in range(num_samples)]


@torch.no_grad()
def autoencoder_keep_rates(pipe: Pipeline, num_samples: int = 100, batch_size: int = 100,
                           split: str = "val") -> dict[str, float]:
    """`attributes_kept` by encoding and decoding alone, on the images `img2img_keep_rates` starts from: what
    img2img could keep at the smallest strength."""
    inputs = rendered_images(split, num_samples)
    outputs = []
    for start in range(0, num_samples, batch_size):
        images = torch.stack([to_tensor(image) for image in inputs[start : start + batch_size]])
        outputs += to_pil(pipe.decode(pipe.encode(images.to(pipe.device, pipe.dtype))))
    return attributes_kept(inputs, outputs)


def _samples(split: str, start: int, stop: int) -> list[ShapeSample]:
    return [sample_attributes(split, k)[0] for k in range(start, stop)]


@torch.no_grad()
def _reconstructions(autoencoder: AutoencoderKL, samples: Sequence[ShapeSample]) -> list[Image.Image]:
    """Renderings of `samples` encoded (posterior mean) and decoded."""
    parameter = next(autoencoder.parameters())
    images = torch.stack([to_tensor(render(sample)) for sample in samples]).to(parameter)
    return to_pil(autoencoder.decode(autoencoder.encode(images).mean))


def erased_shares(autoencoder: AutoencoderKL, num_samples: int = 500, batch_size: int = 100,
                  split: str = "val") -> dict[str, float]:
    """Per "<colour> on <background>" group of the first `num_samples` images of `split`, the share that comes
    back from encoding (posterior mean) and decoding with no object the checker can read. A stage-1 autoencoder
    can map a whole group onto its plain background (ldm/weights/MODEL_CARD.md, on the training seeds)."""
    erased: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for start in range(0, num_samples, batch_size):
        samples = _samples(split, start, min(start + batch_size, num_samples))
        for sample, image in zip(samples, _reconstructions(autoencoder, samples), strict=True):
            group = f"{sample.color} on {sample.background}"
            total[group] += 1
            erased[group] += read_attributes(image)["color"] is None
    return {group: erased[group] / total[group] for group in sorted(total)}


def sharpness_by_group(images: Images, samples: Sequence[ShapeSample]) -> dict[str, dict[str, float]]:
    """Median `ldm.shapes.sharpness.sharpness` per "<size> <shape>" group of `samples` (the attributes each image
    should show), over the images the checker reads with that shape and size (`n` of them): a circle drawn
    square is a prompt-following miss, not a blunt circle."""
    values: dict[str, list[float]] = defaultdict(list)
    for image, sample in zip(images, samples, strict=True):
        found = read_attributes(image)
        if found["shape"] == sample.shape and found["size"] == sample.size:
            value = sharpness(image, sample.shape)
            if value is not None:
                values[f"{sample.size} {sample.shape}"].append(value)
    return {group: {"median": float(np.median(values[group])), "n": len(values[group])} for group in sorted(values)}


def autoencoder_sharpness(autoencoder: AutoencoderKL, num_samples: int = 500, batch_size: int = 100,
                          split: str = "val") -> dict[str, dict[str, dict[str, float]]]:
    """`sharpness_by_group` of the first `num_samples` renderings of `split` (`rendered`) and of their
    reconstructions (`decoded`)."""
    samples = _samples(split, 0, num_samples)
    decoded = [image for start in range(0, num_samples, batch_size)
               for image in _reconstructions(autoencoder, samples[start : start + batch_size])]
    return {"rendered": sharpness_by_group([render(sample) for sample in samples], samples),
            "decoded": sharpness_by_group(decoded, samples)}


def img2img_keep_rates(pipe: Pipeline, num_samples: int = 100, strengths: Sequence[float] = (0.3, 0.6, 0.9),
                       num_steps: int = 50, guidance_scale: float = 5.0, batch_size: int = 100, seed: int = 0,
                       split: str = "val", progress: bool = True) -> dict[str, dict[str, float]]:
    """img2img of the first `num_samples` rendered images of `split`, each prompted with its own canonical
    caption: `attributes_kept` between input and output, per strength (keyed by e.g. "0.3")."""
    inputs = rendered_images(split, num_samples)
    captions = canonical_captions(split, num_samples)
    results = {}
    for strength in strengths:
        outputs = []
        for start in tqdm(range(0, num_samples, batch_size), desc=f"img2img {strength:g}", disable=not progress):
            init_images = torch.stack([to_tensor(image) for image in inputs[start : start + batch_size]])
            outputs += pipe(captions[start : start + batch_size], num_steps=num_steps, guidance_scale=guidance_scale,
                            seed=seed + start, init_images=init_images, strength=strength, progress=False)
        results[f"{strength:g}"] = attributes_kept(inputs, outputs)
    return results



def img2img_against_the_prompt(pipe: Pipeline, init: Image.Image, prompt: str, strengths: Sequence[float],
                               num_seeds: int = 20, num_steps: int = 50, guidance_scale: float = 7.5
                               ) -> dict[str, dict[str, float]]:
    """img2img of one image with a prompt that contradicts it, `num_seeds` seeds per strength: the share of
    outputs whose object the checker reads with each colour, size and position, and as none ("none")."""
    results = {}
    init_images = to_tensor(init)[None].expand(num_seeds, -1, -1, -1)
    for strength in strengths:
        outputs = pipe([prompt] * num_seeds, num_steps=num_steps, guidance_scale=guidance_scale, seed=0,
                       init_images=init_images, strength=strength, progress=False)
        counts: dict[str, float] = defaultdict(float)
        for image in outputs:
            attributes = read_attributes(image)
            if attributes["color"] is None:
                counts["none"] += 1 / num_seeds
                continue
            for name in ("color", "size", "position"):
                counts[attributes[name]] += 1 / num_seeds
        results[f"{strength:g}"] = dict(counts)
    return results
