"""Evaluating a trained pipeline on shapes-v1: prompt following (pixel-rule checker), samplers against a
long DDIM run, negative prompts, img2img; FID features."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ldm.autoencoder import AutoencoderKL
from ldm.data.loader import to_tensor
from ldm.errors import InputError
from ldm.files import check_output_folder
from ldm.images import to_pil
from ldm.pipeline import Pipeline
from ldm.samplers import DETERMINISTIC_SAMPLERS, KARRAS_BY_DEFAULT
from ldm.shapes.checker import check, parse_caption, read_attributes
from ldm.shapes.dataset import ATTRIBUTES, VOCABULARY, canonical_caption, render, sample_attributes

Images = Sequence[Image.Image | np.ndarray]


def canonical_captions(split: str, num_samples: int) -> list[str]:
    """The canonical captions of samples 0 .. num_samples - 1 of `split` (no rendering)."""
    return [canonical_caption(sample_attributes(split, i)[0]) for i in range(num_samples)]


def prompt_following(pipe: Pipeline, captions: list[str], num_steps: int = 50, guidance_scale: float = 5.0,
                     batch_size: int = 50, seed: int = 0, progress: bool = True, sampler: str = "ddim",
                     karras: bool | None = None) -> dict[str, float]:
    """Share of images with every requested attribute right (`all`), and per attribute.

    Image k is generated with seed `seed + k`, so the figure is reproducible and the same for every sampler.
    """
    correct: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for start in tqdm(range(0, len(captions), batch_size), desc="prompt following", disable=not progress):
        batch = captions[start : start + batch_size]
        images = pipe(batch, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed + start, progress=False,
                      sampler=sampler, karras=karras)
        for caption, image in zip(batch, images, strict=True):
            result = check(image, parse_caption(caption))
            for name, ok in result.items():
                correct[name] += ok
                counts[name] += 1
            correct["all"] += all(result.values())
            counts["all"] += 1
    return {name: correct[name] / counts[name] for name in sorted(counts)}


class CallCounter:
    """Counts a module's forward calls inside a `with` block (`count`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.count = 0

    def __enter__(self) -> CallCounter:
        self._handle = self.module.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.count += 1


@dataclass(frozen=True)
class SamplerSetting:
    """One sampler configuration to compare: `sampler` (one of `ldm.samplers.SAMPLERS`), steps, Karras sigmas."""

    sampler: str
    num_steps: int
    karras: bool = False


# The grid of deterministic samplers and step counts for `sampler_quality`.
QUALITY_SETTINGS: tuple[SamplerSetting, ...] = (
    *(SamplerSetting("ddim", n) for n in (10, 20, 50)),
    *(SamplerSetting("dpmpp_2m", n, karras) for karras in (False, True) for n in (10, 20)),
    *(SamplerSetting(name, n) for name in ("euler", "heun", "plms") for n in (20, 50)),
)


@torch.no_grad()
def sampler_quality(pipe: Pipeline, captions: list[str], settings: Sequence[SamplerSetting] = QUALITY_SETTINGS,
                    reference_steps: int = 1000, guidance_scale: float = 5.0, batch_size: int = 100, seed: int = 0,
                    progress: bool = True) -> list[dict[str, object]]:
    """How close each setting lands to a DDIM (eta 0) run of `reference_steps` steps, from the same noise.

    Image k has caption k and initial noise from seed `seed + k` in every run; every sampler ends at the noise
    level of timestep 0. The error is the latent RMSE, the root of the mean squared difference over all latent
    elements (B, 4, h, w) of all images. Returns one row per setting: sampler, karras, steps, evaluations (the
    sampler's U-Net passes per image, each over the conditional and the unconditional prompt: Heun makes two
    per step but the last, PLMS one extra) and rmse. Only `DETERMINISTIC_SAMPLERS` have one result to compare.
    """
    for setting in settings:
        if setting.sampler not in DETERMINISTIC_SAMPLERS:
            raise InputError(f"sampler {setting.sampler!r} draws noise on every step, so it has no single result to "
                             f"compare; use one of {', '.join(DETERMINISTIC_SAMPLERS)}")
    squared_errors = [0.0] * len(settings)
    evaluations = [0] * len(settings)
    num_elements = 0
    for start in tqdm(range(0, len(captions), batch_size), desc="sampler quality", disable=not progress):
        batch = captions[start : start + batch_size]
        common = {"guidance_scale": guidance_scale, "seed": seed + start, "output_type": "latent", "progress": False}
        reference = pipe(batch, num_steps=reference_steps, sampler="ddim", **common).double()
        num_elements += reference.numel()
        for k, setting in enumerate(settings):
            with CallCounter(pipe.unet) as counter:
                latents = pipe(batch, num_steps=setting.num_steps, sampler=setting.sampler, karras=setting.karras,
                               **common)
            squared_errors[k] += (latents.double() - reference).square().sum().item()
            evaluations[k] = counter.count  # one guided U-Net pass per evaluation, whatever the batch size
    return [{"sampler": setting.sampler, "karras": setting.karras, "steps": setting.num_steps,
             "evaluations": evaluations[k], "rmse": (squared_errors[k] / num_elements) ** 0.5}
            for k, setting in enumerate(settings)]


def prompt_following_by_sampler(pipe: Pipeline, captions: list[str], steps: dict[str, int],
                                guidance_scale: float = 5.0, batch_size: int = 100, seed: int = 0,
                                progress: bool = True) -> dict[str, dict[str, float]]:
    """`prompt_following` for each sampler at its step count in `steps` (e.g. `ldm.samplers.DEFAULT_STEPS`) and
    its default noise levels, from the same seeds. Returns, per sampler, its steps, whether it stepped on
    Karras et al.'s noise levels, evaluations (U-Net passes per image) and the shares."""
    num_batches = -(-len(captions) // batch_size)
    results = {}
    for name, num_steps in steps.items():
        karras = name in KARRAS_BY_DEFAULT
        with CallCounter(pipe.unet) as counter:
            scores = prompt_following(pipe, captions, num_steps=num_steps, guidance_scale=guidance_scale,
                                      batch_size=batch_size, seed=seed, progress=progress, sampler=name,
                                      karras=karras)
        results[name] = {"steps": num_steps, "karras": karras, "evaluations": counter.count // num_batches,
                         **scores}
    return results


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


@torch.no_grad()
def erased_shares(autoencoder: AutoencoderKL, num_samples: int = 500, batch_size: int = 100,
                  split: str = "val") -> dict[str, float]:
    """Per "<colour> on <background>" group of the first `num_samples` images of `split`, the share that comes
    back from encoding (posterior mean) and decoding with no object the checker can read. A stage-1 autoencoder
    can map a whole group onto its plain background (ldm/weights/MODEL_CARD.md, on the training seeds)."""
    parameter = next(autoencoder.parameters())
    erased: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for start in range(0, num_samples, batch_size):
        samples = [sample_attributes(split, k)[0] for k in range(start, min(start + batch_size, num_samples))]
        images = torch.stack([to_tensor(render(sample)) for sample in samples]).to(parameter)
        decoded = to_pil(autoencoder.decode(autoencoder.encode(images).mean))
        for sample, image in zip(samples, decoded, strict=True):
            group = f"{sample.color} on {sample.background}"
            total[group] += 1
            erased[group] += read_attributes(image)["color"] is None
    return {group: erased[group] / total[group] for group in sorted(total)}


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


def check_json_path(path: Path, flag: str = "--out") -> None:
    """Raise InputError when the JSON file `path` (given as `flag`) cannot be written, before any slow work."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give the path of the JSON file to write")
    check_output_folder(path.parent, flag)


# torchvision's port of Google's ImageNet Inception v3. FID as published uses the TF graph of 2015-12-05,
# whose weights differ slightly: values from these are close to published FIDs, not equal to them.
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
    """Images (B, 3, H, W) in [-1, 1] -> (B, 2048), resized to 299 x 299.

    The ported Google weights take pixels in [-1, 1] as they are (torchvision's own loader sets
    `transform_input` to bring ImageNet-normalised input back there; the model here is built without it).
    """
    return model(F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False))
