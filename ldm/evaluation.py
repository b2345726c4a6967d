"""Evaluating a trained pipeline on any image-text data: prompt following as judged by a checker that
a dataset plugs in (the shapes dataset's pixel rules: `ldm.shapes.evaluation`), samplers against a
long DDIM run, FID features."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ldm.errors import InputError
from ldm.files import check_output_folder
from ldm.pipeline import Pipeline
from ldm.samplers import DETERMINISTIC_SAMPLERS, KARRAS_BY_DEFAULT

# Reads an image and the caption it was generated from: whether each attribute the caption asks for is
# drawn, by attribute name.
Checker = Callable[[Image.Image, str], dict[str, bool]]


def prompt_following(pipe: Pipeline, captions: list[str], checker: Checker, num_steps: int = 50,
                     guidance_scale: float = 5.0, batch_size: int = 50, seed: int = 0, progress: bool = True,
                     sampler: str = "ddim", karras: bool | None = None) -> dict[str, float]:
    """`attribute_scores` of images generated from `captions`, as `checker` reads them.

    Image k is generated with seed `seed + k`, so the figure is reproducible and the same for every sampler.
    """
    results = []
    for start in tqdm(range(0, len(captions), batch_size), desc="prompt following", disable=not progress):
        batch = captions[start : start + batch_size]
        images = pipe(batch, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed + start, progress=False,
                      sampler=sampler, karras=karras)
        results += [checker(image, caption) for caption, image in zip(batch, images, strict=True)]
    return attribute_scores(results)


def attribute_scores(results: Iterable[dict[str, bool]]) -> dict[str, float]:
    """Share of checker results with every requested attribute right (`all`), and per attribute."""
    correct: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for result in results:
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


def prompt_following_by_sampler(pipe: Pipeline, captions: list[str], checker: Checker, steps: dict[str, int],
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
            scores = prompt_following(pipe, captions, checker, num_steps=num_steps, guidance_scale=guidance_scale,
                                      batch_size=batch_size, seed=seed, progress=progress, sampler=name,
                                      karras=karras)
        results[name] = {"steps": num_steps, "karras": karras, "evaluations": counter.count // num_batches,
                         **scores}
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
