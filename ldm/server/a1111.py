"""AUTOMATIC1111's web API bodies -> jobs for the pipeline, and results -> A1111's responses.

Field names, defaults and shapes are A1111's (`/sdapi/v1/txt2img`, `/img2img`). A body maps onto
`GenerationSettings`, which checks every value once, as for the command line; its messages name the
request fields (`cfg_scale must be >= 0`). Only what is not a setting is checked here: the server's
limits, the images (base64 of a PNG or JPEG), and A1111 features this engine does not have, which are
refused by name rather than ignored. Deliberate differences from A1111: width and height default to the
model's size (512 for SD 1.x, as in A1111; 64 for the bundled model); img2img takes one init image; a mask
must have the init image's size; the whole image is inpainted (no `inpaint_full_res` crop).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image, ImageFilter, ImageOps
from PIL.PngImagePlugin import PngInfo

from ldm.errors import InputError
from ldm.infotext import parse_sampler, read_infotext, sampler_name, schedule_label
from ldm.samplers import get_sampler
from ldm.settings import GenerationSettings, SettingError

# GenerationSettings field -> the request field that sets it, for messages.
API_NAMES = {"prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
             "sampler": "sampler_name", "karras": "scheduler", "scale": "cfg_scale",
             "guidance_rescale": "guidance_rescale", "eta": "eta", "height": "height", "width": "width",
             "batch_size": "batch_size", "init_img": "init_images", "strength": "denoising_strength", "mask": "mask",
             "lora": "lora", "clip_skip": "CLIP_stop_at_last_layers",
             # SDXL: A1111's refiner fields (the checkpoint by name, found by the engine), and this server's
             # micro-conditioning fields, which A1111 has only as global options.
             "refiner": "refiner_checkpoint", "refiner_switch": "refiner_switch_at",
             **{name: name for name in ("original_size", "crop_coords", "target_size", "aesthetic_score",
                                        "negative_aesthetic_score")}}
# Request fields that set one setting as they are (the sampler, scheduler and images take more).
_PLAIN_FIELDS = {api: ours for ours, api in API_NAMES.items()
                 if api not in ("sampler_name", "scheduler", "init_images", "mask", "lora", "CLIP_stop_at_last_layers")}

TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "seed": -1, "steps": 50, "cfg_scale": 7.0, "width": None, "height": None,
    "batch_size": 1, "n_iter": 1, "sampler_name": None, "sampler_index": "Euler", "scheduler": None, "eta": None,
    "guidance_rescale": 0.0, "send_images": True, "save_images": False, "override_settings": {}, "infotext": None,
}
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **TXT2IMG_DEFAULTS, "init_images": None, "mask": None, "denoising_strength": 0.75, "mask_blur": 4,
    "inpainting_mask_invert": 0, "resize_mode": 0, "include_init_images": False,
}
# A1111 features that change the image and that this engine does not have: refused unless off.
UNSUPPORTED = ("enable_hr", "restore_faces", "tiling", "subseed_strength", "styles", "script_name", "alwayson_scripts")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server, below what GenerationSettings allows any caller."""

    max_side: int = 2048  # pixels, for the output and for uploaded images
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter


@dataclass(frozen=True)
class Job:
    """A request made ready to run: `n_iter` batches from `settings`, on `checkpoint` (None: the current
    one); `extra`: infotext pairs that are no setting; `parameters`: the request as A1111 echoes it."""

    settings: GenerationSettings
    n_iter: int
    send_images: bool
    checkpoint: str | None
    extra: dict[str, object]
    parameters: dict[str, Any]

    def batches(self) -> list[GenerationSettings]:
        """Batch n starts at seed + n * batch_size, so that image k of the request has seed + k."""
        size = self.settings.batch_size
        return [replace(self.settings, seed=self.settings.seed + n * size) for n in range(self.n_iter)]


def parse_job(body: object, kind: str, limits: Limits) -> Job:
    """The job a txt2img or img2img (`kind`) request body asks for; InputError with a one-line reason."""
    if not isinstance(body, dict):
        raise InputError(f"the body must be a JSON object of A1111 fields, got {type(body).__name__}")
    defaults = TXT2IMG_DEFAULTS if kind == "txt2img" else IMG2IMG_DEFAULTS
    request = {**defaults, **body}
    for name in UNSUPPORTED:
        if request.get(name):
            raise InputError(f"{name} is not supported by this server; leave it out or set it to false")
    if not isinstance(request["infotext"], (str, type(None))):
        raise InputError(f"infotext must be text, got {request['infotext']!r}")
    values = _settings_values(defaults)
    if request["infotext"]:  # A1111: the infotext fills what the body does not set
        values.update(read_infotext(request["infotext"])[0])
    elif "prompt" not in body:
        raise InputError("prompt is required (the text to draw; \"\" for none)")
    values.update(_settings_values(body))
    if values.get("eta") is None or not get_sampler(values["sampler"]).takes_eta:
        values.pop("eta", None)  # A1111 clients send an eta for every sampler; only DDIM's is ours
    n_iter = _whole("n_iter", request["n_iter"], 1, limits.max_images)
    for name in ("send_images", "include_init_images", "inpainting_mask_invert"):
        if name in request and request[name] not in (True, False):  # 0 and 1 are A1111's spelling of two
            raise InputError(f"{name} must be true or false, got {request[name]!r}")
    overrides = request["override_settings"] or {}
    checkpoint = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
    if not isinstance(overrides, dict) or not isinstance(checkpoint, (str, type(None))):
        raise InputError(f"override_settings must map option names to values, got {overrides!r}")
    if "CLIP_stop_at_last_layers" in overrides:  # A1111's clip skip
        values["clip_skip"] = overrides["CLIP_stop_at_last_layers"]

    extra: dict[str, object] = {}
    if kind == "img2img":
        values["init_img"], values["mask"], extra = _init_images(request, limits)
    else:
        values.pop("strength", None)  # txt2img's denoising_strength is A1111's hires fix, which is refused
    try:
        settings = GenerationSettings(**values)
    except SettingError as e:
        raise InputError(e.render(API_NAMES)) from None
    _check_limits(settings, n_iter, limits)
    if kind == "img2img":
        settings = _resize(settings)
    parameters = dict(request)
    if not request.get("include_init_images", True):
        parameters["init_images"] = parameters["mask"] = None
    return Job(settings, n_iter, request["send_images"], checkpoint, extra, parameters)


def _settings_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The GenerationSettings values that the A1111 `fields` given set (LoRAs come as <lora:...> tags in
    the prompt, as in A1111)."""
    values = {ours: fields[name] for name, ours in _PLAIN_FIELDS.items() if name in fields}
    sampler = fields.get("sampler_name") or fields.get("sampler_index")
    if sampler is not None or fields.get("scheduler") is not None:
        values["sampler"], karras = parse_sampler(sampler or TXT2IMG_DEFAULTS["sampler_index"], fields.get("scheduler"))
        values["karras"] = karras
    return values


def _whole(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return value


def _check_limits(settings: GenerationSettings, n_iter: int, limits: Limits) -> None:
    if settings.steps > limits.max_steps:
        raise InputError(f"steps must be at most {limits.max_steps} on this server, got {settings.steps}")
    for name in ("width", "height"):
        if (value := getattr(settings, name)) is not None and value > limits.max_side:
            raise InputError(f"{name} must be at most {limits.max_side} on this server, got {value}")
    if (count := settings.batch_size * n_iter) > limits.max_images:
        raise InputError(f"batch_size * n_iter must be at most {limits.max_images} on this server, got {count}")


def decode_image(data: object, name: str, max_side: int) -> Image.Image:
    """A base64 PNG or JPEG (optionally a `data:image/...;base64,` URL) as a loaded PIL image."""
    if not isinstance(data, str):
        raise InputError(f"{name} must be a base64 image, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{name} is not valid base64 ({e})") from None
    unreadable = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(raw))
    except unreadable as e:
        raise InputError(f"{name} is not a readable image ({e}); send a base64 PNG or JPEG") from None
    if max(image.size) > max_side:  # before decoding the pixels
        raise InputError(f"{name} is {image.width}x{image.height}; sides must be at most {max_side} on this server")
    try:
        image.load()
    except unreadable as e:
        raise InputError(f"{name} is not a readable image ({e}); send a base64 PNG or JPEG") from None
    return image


def _init_images(request: Mapping[str, Any], limits: Limits) -> tuple[Image.Image, Image.Image | None,
                                                                      dict[str, object]]:
    """The init image, the mask (blurred and inverted as asked) and the infotext pairs they add."""
    images = request["init_images"]
    if not isinstance(images, list) or len(images) != 1:
        raise InputError("init_images must be a list of one base64 image, got "
                         f"{len(images) if isinstance(images, list) else repr(images)[:40]}")
    if request["resize_mode"] != 0:
        raise InputError(f"resize_mode {request['resize_mode']!r} is not supported; send 0 (just resize)")
    image = decode_image(images[0], "init_images[0]", limits.max_side).convert("RGB")
    if request["mask"] is None:
        return image, None, {}
    mask = decode_image(request["mask"], "mask", limits.max_side).convert("L")
    if mask.size != image.size:
        raise InputError(f"the mask is {mask.width}x{mask.height} but init_images[0] is {image.width}x{image.height}; "
                         "send a mask of the image's size")
    blur = _whole("mask_blur", request["mask_blur"], 0, 64)
    if request["inpainting_mask_invert"]:
        mask = ImageOps.invert(mask)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return image, mask, {"Mask blur": blur}


def _resize(settings: GenerationSettings) -> GenerationSettings:
    """A1111's resize_mode 0: the init image (and mask) stretched to the width and height asked for."""
    image, mask = settings.init_img, settings.mask
    size = (settings.width or image.width, settings.height or image.height)
    if size == image.size:
        return settings
    return replace(settings, init_img=image.resize(size, Image.LANCZOS),
                   mask=None if mask is None else mask.resize(size, Image.LANCZOS))


def encode_png(image: Image.Image, text: Mapping[str, str]) -> str:
    """`image` as a base64 PNG with `text` in its text chunks."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def response(job: Job, images: list[str], infotexts: list[str], batches: list[GenerationSettings],
             size: tuple[int, int], model: str, model_hash: str) -> dict[str, Any]:
    """A1111's txt2img / img2img response: base64 PNGs, the echoed request, and `info`, a JSON string with
    every image's prompt, seed and infotext. `batches` are the batches that ran (fewer if interrupted)."""
    s = job.settings
    prompts = [p for b in batches for p in b.prompts()]
    negatives = [p for b in batches for p in b.negative_prompts()]
    seeds = [seed for b in batches for seed in b.seeds()]
    info = {
        "prompt": s.prompts()[0], "all_prompts": prompts, "negative_prompt": s.negative_prompts()[0],
        "all_negative_prompts": negatives, "seed": s.seed, "all_seeds": seeds, "subseed": -1,
        "all_subseeds": [-1] * len(seeds), "subseed_strength": 0, "width": size[0], "height": size[1],
        "sampler_name": sampler_name(s.sampler), "cfg_scale": s.scale, "steps": s.steps,
        "batch_size": s.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model, "sd_model_hash": model_hash, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": s.strength, "extra_generation_params": {
            key: value for key, value in {"Schedule type": schedule_label(s.sampler, s.karras), **job.extra}.items()
            if value is not None},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
    }
    return {"images": images if job.send_images else [], "parameters": job.parameters, "info": json.dumps(info)}
