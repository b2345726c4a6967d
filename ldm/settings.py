"""GenerationSettings: everything that decides an image, validated once.

It is the only list of those settings. txt2img's flags are derived from its fields' metadata, the
pipeline generates from it, the PNG text chunks are written from it and read back into it (replay).
What is wrong for every model is checked here; what depends on the model (a size that is not a
multiple of its autoencoder's factor, an inpainting U-Net without a mask) is checked by the pipeline.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ldm.errors import InputError
from ldm.img2img import default_strength, start_step
from ldm.lora import parse_lora_spec, split_lora_tags
from ldm.prompts import parse_weights
from ldm.samplers import DEFAULT_STEPS, KARRAS_BY_DEFAULT, SAMPLERS, check_options, get_sampler

# Bounds that hold for any model: beyond them a request is a typo or an attack, not an image.
MAX_SIDE = 8192  # pixels
MAX_BATCH_SIZE = 64
MAX_STEPS = 1000  # the training timesteps of every SD model
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
RANDOM_SEED = -1  # AUTOMATIC1111's "pick one": replaced by a drawn seed, which the PNG then records

def pair(text: str) -> tuple[int, int]:
    """A flag or PNG text value "A,B" (or "(A, B)", as a tuple prints) -> (A, B) whole numbers."""
    parts = text.strip().strip("()").split(",")
    if len(parts) != 2:
        raise ValueError(f"expected two whole numbers A,B, got {text!r}")
    return int(parts[0]), int(parts[1])


# An init image or mask: a file, a PIL image, or a tensor (1 or B, C, H, W) (see `Pipeline.generate`).
ImageSource = str | Path | Image.Image | torch.Tensor


def setting(default: Any, *flags: str, help: str, label: str = "", type: type = str,
            choices: Sequence[str] | None = None, alias: tuple[str, str, str] | None = None,
            compare: bool = True, repeat: bool = False) -> Any:
    """A settings field. `flags`: its txt2img flags (the first names it in errors); `label`: its name in
    messages to library callers (default: the field name, underscores as spaces); `type`: how a flag or a
    PNG text value is parsed; `alias`: (flag, value, help) of a flag that sets one value; `compare`: part
    of equality (not for images, which may be tensors); `repeat`: a tuple, its flag given once per item
    (its PNG text one item per line)."""
    metadata = {"flags": flags, "help": help, "label": label, "type": type, "choices": choices, "alias": alias,
                "repeat": repeat}
    return field(default=default, metadata=metadata, compare=compare)


class SettingError(InputError):
    """A bad setting. Its template names settings as `{field}`, filled in with the caller's names: labels
    for library callers, flags for the command line (`render`)."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.render(LABELS))

    def render(self, names: Mapping[str, str]) -> str:
        return self.template.format_map(names)


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """One batch of images. Image k gets `prompts()[k]`, `negative_prompts()[k]` and `seeds()[k]`; a
    single prompt, negative prompt or seed stands for the whole batch (seed + k for image k).

    `None` means the default that depends on another setting: the sampler's steps and noise levels,
    the model's size (or the init image's), strength 0.75 for img2img and 1 for inpainting. They are
    filled in when the settings are made, so what is recorded is what ran.
    """

    prompt: str | tuple[str, ...] = setting("", "--prompt", help="the prompt to render; (text:1.3) weights "
                                            "text, \\( is a literal (")
    negative_prompt: str | tuple[str, ...] = setting("", "--negative_prompt", help="what to steer away from "
                                                     "(replaces the empty unconditional prompt of guidance)")
    seed: int | tuple[int, ...] = setting(42, "--seed", type=int, help="seed of the first image; image k uses "
                                          "seed + k; -1 draws one")
    steps: int | None = setting(None, "--steps", "--ddim_steps", type=int, help="sampling steps (default: the "
                                f"sampler's: {', '.join(f'{n} {s}' for n, s in DEFAULT_STEPS.items())})")
    sampler: str = setting("ddim", "--sampler", choices=SAMPLERS, help="the sampler",
                           alias=("--plms", "plms", "--sampler plms, as the original SD scripts spell it"))
    karras: bool | None = setting(None, "--karras", type=bool, help="Karras et al. noise levels (sigma samplers "
                                  f"only; default: on for {', '.join(sorted(KARRAS_BY_DEFAULT))})")
    scale: float = setting(7.5, "--scale", type=float, label="guidance scale",
                           help="classifier-free guidance scale (1 = no guidance)")
    guidance_rescale: float = setting(0.0, "--guidance_rescale", type=float, help="guidance rescale phi in [0, 1] "
                                      "of Lin et al. 2023 (0 = off; 0.7 against over-exposure at high scales)")
    eta: float = setting(0.0, "--ddim_eta", "--eta", type=float, help="DDIM eta (0 = deterministic)")
    height: int | None = setting(None, "--H", type=int, help="image height in pixels (default: the model's)")
    width: int | None = setting(None, "--W", type=int, help="image width in pixels (default: the model's)")
    batch_size: int = setting(1, "--n_samples", type=int, help="images per prompt in one batch")
    init_img: ImageSource | None = setting(None, "--init-img", "--init_img", type=Path, label="an init image",
                                           compare=False, help="img2img: start from this image (its size is the "
                                           "output size, sides multiples of 8)")
    strength: float | None = setting(None, "--strength", type=float, help="img2img: how much of the schedule "
                                     "reruns, in (0, 1] (1 = repaint fully); default 0.75, with a mask 1")
    mask: ImageSource | None = setting(None, "--mask", type=Path, label="a mask", compare=False,
                                       help="inpainting: an image of the init image's size, white where to repaint "
                                       "(needs an init image)")
    lora: tuple[str, ...] = setting((), "--lora", repeat=True, label="LoRA", help="merge a LoRA / LyCORIS file, "
                                    "FILE or FILE:WEIGHT (repeatable); <lora:NAME:WEIGHT> in the prompt finds "
                                    "NAME in --lora_dir")
    clip_skip: int | None = setting(None, "--clip_skip", type=int, help="context from the text encoder's N-th "
                                    "layer from the end (1 = last, 2 = penultimate; default: the model's, "
                                    "SD 1.x 1, SD 2.x 2)")
    original_size: tuple[int, int] | None = setting(None, "--original_size", type=pair, help="SDXL: the size "
                                                    "HEIGHT,WIDTH the model is told its training image had "
                                                    "(default: the output size)")
    crop_coords: tuple[int, int] | None = setting(None, "--crop_coords", type=pair, help="SDXL: the top-left "
                                                  "corner TOP,LEFT of the crop it is told was cut (default 0,0)")
    target_size: tuple[int, int] | None = setting(None, "--target_size", type=pair, help="SDXL base: the size "
                                                  "HEIGHT,WIDTH it is told to aim for (default: the output size)")
    aesthetic_score: float | None = setting(None, "--aesthetic_score", type=float, help="SDXL refiner: the "
                                            "aesthetic score it is told the image has (default 6)")
    negative_aesthetic_score: float | None = setting(None, "--negative_aesthetic_score", type=float,
                                                     help="SDXL refiner: the score of the unconditional side "
                                                     "of guidance (default 2.5)")
    refiner: str | Path | None = setting(None, "--refiner", type=Path, help="SDXL: a refiner checkpoint that "
                                         "takes over the base's run at --refiner_switch")
    refiner_switch: float | None = setting(None, "--refiner_switch", type=float, help="SDXL: the share of the "
                                           "noise schedule the base runs before the refiner, in (0, 1) "
                                           "(default 0.8)")

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt", "seed", "lora"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_batch(self)
        _check_sampling(self)
        _check_images(self)
        _check_text_encoding(self)
        _check_sdxl(self)
        if self.seed == RANDOM_SEED:
            object.__setattr__(self, "seed", random.randrange(2**32))

    def prompts(self) -> list[str]:
        return _per_image(self.prompt, self.batch_size)

    def negative_prompts(self) -> list[str]:
        return _per_image(self.negative_prompt, self.batch_size)

    def seeds(self) -> list[int]:
        if isinstance(self.seed, int):
            return [self.seed + k for k in range(self.batch_size)]
        return list(self.seed)

    def image(self, index: int) -> GenerationSettings:
        """The settings with image `index`'s own prompt, negative prompt and seed."""
        return replace(self, prompt=self.prompts()[index], negative_prompt=self.negative_prompts()[index],
                       seed=self.seeds()[index])

    def to_text(self, index: int) -> dict[str, str]:
        """PNG text chunks of image `index`: every setting that is set, files as absolute paths. Images
        given as pixels are not recorded, so settings that used them cannot be replayed from the text."""
        image, text = self.image(index), {}
        for f in fields(image):
            value = getattr(image, f.name)
            if isinstance(value, (str, Path)) and f.metadata["type"] is Path:
                value = Path(value).resolve()
            elif value is None or value == () or isinstance(value, (Image.Image, torch.Tensor)):
                continue
            elif f.name == "lora":  # files as absolute paths, so a replay finds them from anywhere
                value = "\n".join(f"{path.resolve()}:{weight:g}" for path, weight in map(parse_lora_spec, value))
            text[f.name] = str(value)
        return text


FIELDS = {f.name: f for f in fields(GenerationSettings)}
LABELS = {name: f.metadata["label"] or name.replace("_", " ") for name, f in FIELDS.items()}
FLAGS = {name: f.metadata["flags"][0] for name, f in FIELDS.items()}


def _per_image(value: str | tuple[str, ...], batch_size: int) -> list[str]:
    return [value] * batch_size if isinstance(value, str) else list(value)


def _integer(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingError(f"{{{name}}} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise SettingError(f"{{{name}}} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise SettingError(f"{{{name}}} must be at most {high}, got {value}")


def _number(name: str, value: object, low: float, high: float = math.inf, interval: str = "",
            low_open: bool = False) -> None:
    """`value` is a finite number in [low, high] ((low, high] if `low_open`); `interval` is how a
    message spells the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingError(f"{{{name}}} must be a finite number, got {value!r}")
    if not low <= value <= high or (low_open and value == low):
        raise SettingError(f"{{{name}}} must be {interval or f'>= {low:g}'}, got {value}")


def _check_batch(s: GenerationSettings) -> None:
    """Batch size, prompts and seeds: one each for the batch or one per image."""
    _integer("batch_size", s.batch_size, 1, MAX_BATCH_SIZE)
    for name in ("prompt", "negative_prompt"):
        value = getattr(s, name)
        if isinstance(value, tuple):
            if not value:
                raise InputError("no prompts given")
            if len(value) != s.batch_size:
                wanted = f"{s.batch_size} prompts" if name == "negative_prompt" else f"a batch size of {s.batch_size}"
                raise InputError(f"got {len(value)} {LABELS[name]}s for {wanted}")
        for text in value if isinstance(value, tuple) else [value]:
            if not isinstance(text, str):
                raise SettingError(f"{{{name}}} must be text, got {text!r}")
            parse_weights(text)  # a syntax error stops the run before any model work
            split_lora_tags(text)
    if isinstance(s.seed, tuple):
        if len(s.seed) != s.batch_size:
            raise InputError(f"got {len(s.seed)} seeds for {s.batch_size} prompts")
        for seed in s.seed:
            _integer("seed", seed, 0, MAX_SEED)
    elif s.seed != RANDOM_SEED:
        _integer("seed", s.seed, 0, MAX_SEED - (s.batch_size - 1))


def _check_sampling(s: GenerationSettings) -> None:
    """Sampler, steps, guidance; the sampler's defaults fill in steps and noise levels."""
    if not isinstance(s.sampler, str):
        raise SettingError(f"{{sampler}} must be a name, got {s.sampler!r}")
    sampler = get_sampler(s.sampler)
    if s.steps is None:
        object.__setattr__(s, "steps", sampler.default_steps)
    if s.karras is None:
        object.__setattr__(s, "karras", sampler.karras_by_default)
    if not isinstance(s.karras, bool):
        raise SettingError(f"{{karras}} must be true or false, got {s.karras!r}")
    _integer("steps", s.steps, 1, MAX_STEPS)
    _number("scale", s.scale, 0)
    _number("guidance_rescale", s.guidance_rescale, 0, 1, "in [0, 1]")
    _number("eta", s.eta, 0)
    check_options(s.sampler, s.karras, s.eta)
    for name in ("height", "width"):  # positive multiples of the model's factor: checked by the pipeline
        if getattr(s, name) is not None:
            _integer(name, getattr(s, name), high=MAX_SIDE)


def _check_images(s: GenerationSettings) -> None:
    """img2img and inpainting: a mask or a strength needs an init image; strength defaults by task."""
    if s.init_img is None:
        for name in ("mask", "strength"):
            if getattr(s, name) is not None:
                raise SettingError(f"{{{name}}} needs {{init_img}}")
        return
    if s.strength is None:
        object.__setattr__(s, "strength", default_strength(s.mask is not None))
    _number("strength", s.strength, 0, 1, "in (0, 1] (1 = repaint fully)", low_open=True)
    start_step(s.steps, s.strength)  # a strength too small to run one step


def _check_text_encoding(s: GenerationSettings) -> None:
    """LoRA files as FILE or FILE:WEIGHT; clip skip counts layers from the end (checked against the
    model's depth by the text encoder)."""
    if not isinstance(s.lora, tuple) or not all(isinstance(spec, (str, Path)) for spec in s.lora):
        raise SettingError(f"{{lora}} must be a list of files (FILE or FILE:WEIGHT), got {s.lora!r}")
    for spec in s.lora:
        parse_lora_spec(str(spec))
    if s.clip_skip is not None:
        _integer("clip_skip", s.clip_skip, 1)


def _check_sdxl(s: GenerationSettings) -> None:
    """Micro-conditioning: sizes are two positive whole numbers, crop corners two non-negative ones; the
    refiner switch is a share of the schedule, 0.8 by default when a refiner is given. Whether the model
    takes them is the pipeline's to say."""
    for name, low in (("original_size", 1), ("crop_coords", 0), ("target_size", 1)):
        value = getattr(s, name)
        if value is None:
            continue
        if isinstance(value, list):
            object.__setattr__(s, name, value := tuple(value))
        if not isinstance(value, tuple) or len(value) != 2:
            raise SettingError(f"{{{name}}} must be two whole numbers, got {value!r}")
        for number in value:
            _integer(name, number, low, MAX_SIDE)
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if getattr(s, name) is not None:
            _number(name, getattr(s, name), -math.inf)
    if s.refiner is None:
        if s.refiner_switch is not None:
            raise SettingError("{refiner_switch} needs {refiner}")
        return
    if s.refiner_switch is None:
        object.__setattr__(s, "refiner_switch", 0.8)
    _number("refiner_switch", s.refiner_switch, 0, 1, "in (0, 1)", low_open=True)
    if s.refiner_switch == 1:
        raise SettingError(f"{{refiner_switch}} must be in (0, 1), got {s.refiner_switch}")


def from_text(text: Mapping[str, str]) -> dict[str, Any]:
    """The settings recorded in PNG text chunks (`GenerationSettings.to_text`), parsed by field type;
    other keys are ignored. InputError names an unreadable value."""
    values = {}
    for name, value in text.items():
        if name in FIELDS:
            convert = FIELDS[name].metadata["type"]
            try:
                if FIELDS[name].metadata["repeat"]:
                    values[name] = tuple(convert(line) for line in value.splitlines() if line)
                    continue
                values[name] = _parse_flag(value) if convert is bool else convert(value)
            except ValueError:
                raise InputError(f"unreadable {name} {value!r} in the metadata") from None
    return values


def _parse_flag(text: str) -> bool:
    if text not in ("True", "False"):
        raise ValueError(text)
    return text == "True"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (and its alias). Flags not given are absent from the parsed namespace, so
    `from_arguments` can tell them from recorded or default values."""
    for name, f in FIELDS.items():
        meta, default = f.metadata, f.default
        help = meta["help"] + ("" if default in (None, "", ()) else f" (default: {default})")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help}
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["repeat"]:
            kwargs.update(action="append", type=meta["type"])
        else:
            kwargs.update(type=meta["type"], choices=meta["choices"])
        group = parser
        if meta["alias"] is not None:
            group = parser.add_mutually_exclusive_group()
            flag, value, alias_help = meta["alias"]
            group.add_argument(flag, dest=name, action="store_const", const=value, default=argparse.SUPPRESS,
                               help=alias_help)
        group.add_argument(*meta["flags"], **kwargs)


def from_arguments(args: argparse.Namespace, recorded: Mapping[str, Any] | None = None) -> GenerationSettings:
    """Settings from the flags given, over `recorded` ones (a replay), over the defaults. Recorded noise
    levels belong to the recorded sampler: another sampler gets its own default. Errors name flags."""
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    values = dict(recorded or {})
    if "sampler" in given and given["sampler"] != values.get("sampler", FIELDS["sampler"].default):
        values.pop("karras", None)
    try:
        return GenerationSettings(**{**values, **given})
    except SettingError as e:
        raise InputError(e.render(FLAGS)) from None
