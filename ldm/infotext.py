"""AUTOMATIC1111's infotext: the `parameters` PNG text chunk that A1111, ComfyUI exporters and image sites
read and write, and A1111's spelling of our samplers and noise-level schedules.

The format is the prompt, a `Negative prompt: ...` line, then one line of `Key: value` pairs
(`Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1, Size: 512x512, ...`);
a value holding a comma, a colon or a line break is written as a JSON string. `Seed` is the image's own
seed and `Batch pos` its row in the batch, as in our own chunks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldm.errors import InputError
from ldm.files import sha256_file
from ldm.samplers import SAMPLERS, get_sampler
from ldm.settings import GenerationSettings

# Our sampler -> (A1111's name, its aliases). A1111 has no DDPM; "DDPM" is how other A1111-API servers
# spell it. The table covers the whole registry (tested), so every sampler has an A1111 name.
A1111_SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ddim": ("DDIM", ("ddim",)),
    "ddpm": ("DDPM", ("ddpm",)),
    "plms": ("PLMS", ("plms",)),
    "euler": ("Euler", ("k_euler",)),
    "euler_a": ("Euler a", ("k_euler_a", "k_euler_ancestral")),
    "heun": ("Heun", ("k_heun",)),
    "dpmpp_2m": ("DPM++ 2M", ("k_dpmpp_2m",)),
}
# A1111's schedule types that we have: name -> (label, karras). "automatic" is the sampler's default.
SCHEDULERS: dict[str, tuple[str, bool | None]] = {
    "automatic": ("Automatic", None),
    "uniform": ("Uniform", False),
    "karras": ("Karras", True),
}
_BY_NAME = {spelling.lower(): ours for ours, (name, aliases) in A1111_SAMPLERS.items()
            for spelling in (name, ours, *aliases)}

_PARAM = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"(\d+)x(\d+)")


def sampler_name(sampler: str) -> str:
    """A1111's name of our sampler `sampler`."""
    return A1111_SAMPLERS[sampler][0]


def schedule_label(sampler: str, karras: bool) -> str | None:
    """A1111's schedule type of a run: Karras or Uniform for the sigma samplers, none for the others."""
    if not get_sampler(sampler).sigma_space:
        return None
    return SCHEDULERS["karras" if karras else "uniform"][0]


def parse_sampler(name: str, scheduler: str | None = None) -> tuple[str, bool | None]:
    """(our sampler, karras) from an A1111 sampler name or alias (or ours) and schedule type. Names of
    A1111 before 1.9, like "DPM++ 2M Karras", carry the schedule; karras None means the sampler's default.
    InputError names the choices."""
    if not isinstance(name, str) or (scheduler is not None and not isinstance(scheduler, str)):
        raise InputError(f"a sampler and a scheduler are names, got {name!r} and {scheduler!r}")
    karras = None
    if scheduler is not None:
        label = scheduler.strip().lower()
        if label not in SCHEDULERS:
            raise InputError(f"unknown scheduler {scheduler!r}; choose one of "
                             f"{', '.join(label for label, _ in SCHEDULERS.values())}")
        karras = SCHEDULERS[label][1]
    spelling = name.strip().lower()
    if spelling.endswith(" karras") and spelling[:-7] in _BY_NAME:
        spelling, karras = spelling[:-7], True
    if spelling not in _BY_NAME:
        raise InputError(f"unknown sampler {name!r}; choose one of "
                         f"{', '.join(sampler_name(s) for s in SAMPLERS)}")
    return _BY_NAME[spelling], karras


def model_hash(checkpoint: str | Path) -> str:
    """A1111's "Model hash" of a checkpoint file: the first 10 hex digits of its sha256."""
    return sha256_file(checkpoint)[:10]


def quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_infotext(settings: GenerationSettings, index: int, width: int, height: int, model: str,
                    model_hash: str = "", extra: Mapping[str, object] | None = None) -> str:
    """The infotext of image `index` of a batch made with `settings` at `width` x `height` by `model`
    (its name: the checkpoint's file stem) whose file's sha256 starts with `model_hash`; `extra` are
    further pairs (e.g. the server's `Mask blur`). Pairs whose value is None are left out."""
    s = settings.image(index)
    batched = s.batch_size > 1
    params: dict[str, object] = {
        "Steps": s.steps, "Sampler": sampler_name(s.sampler), "Schedule type": schedule_label(s.sampler, s.karras),
        "CFG scale": float(s.scale), "Seed": s.seed, "Size": f"{width}x{height}", "Model hash": model_hash or None,
        "Model": model or None, "Batch size": s.batch_size if batched else None,
        "Batch pos": index if batched else None,
        "Denoising strength": s.strength if s.init_img is not None else None,
        "Clip skip": s.clip_skip, "Eta DDIM": s.eta or None, "Guidance rescale": s.guidance_rescale or None,
        "Refiner": None if s.refiner is None else Path(s.refiner).stem, "Refiner switch at": s.refiner_switch,
        **(extra or {}),
    }
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\nNegative prompt: {s.negative_prompt}" if s.negative_prompt else ""
    return f"{s.prompt}{negative}\n{pairs}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """The fields of an infotext as A1111's /png-info lists them: "Prompt", "Negative prompt" and every
    `Key: value` pair, a `Size` also as "Size-1" (width) and "Size-2" (height)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameter line: all of it is prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        fields[key] = value
        if size := _SIZE.fullmatch(value):
            fields[f"{key}-1"], fields[f"{key}-2"] = size.groups()
    return fields


def read_infotext(text: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings an infotext records, as `GenerationSettings` fields (the image's own seed), and the
    rest we know: model, model_hash, batch_index. InputError names an unreadable or foreign value."""
    fields = parse_infotext(text)
    if missing := [key for key in ("Steps", "Sampler", "Seed") if key not in fields]:
        raise InputError(f"the infotext has no {' and no '.join(missing)}")
    try:
        sampler, karras = parse_sampler(fields["Sampler"], fields.get("Schedule type"))
        if karras is None and "Schedule type" not in fields and get_sampler(sampler).sigma_space:
            karras = False  # before A1111 1.9, a name without " Karras" meant evenly spaced levels
        values: dict[str, Any] = {"prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"],
                                  "sampler": sampler, "karras": karras}
        for key, name, convert in (("Steps", "steps", int), ("Seed", "seed", int), ("CFG scale", "scale", float),
                                   ("Size-1", "width", int), ("Size-2", "height", int),
                                   ("Batch size", "batch_size", int), ("Denoising strength", "strength", float),
                                   ("Guidance rescale", "guidance_rescale", float), ("Clip skip", "clip_skip", int),
                                   ("Refiner switch at", "refiner_switch", float)):
            if key in fields:
                values[name] = convert(fields[key])
        if "Refiner" in fields:  # A1111 writes "NAME [hash]"; a checkpoint name, found as checkpoints are
            values["refiner"] = fields["Refiner"].split(" [")[0]
        if "Eta DDIM" in fields and get_sampler(sampler).takes_eta:
            values["eta"] = float(fields["Eta DDIM"])
        batch_index = int(fields.get("Batch pos", 0))
    except ValueError as e:
        raise InputError(f"unreadable value in the infotext ({e})") from None
    other = {"model": fields.get("Model", ""), "model_hash": fields.get("Model hash", ""),
             "batch_index": str(batch_index)}
    return values, {key: value for key, value in other.items() if value}
