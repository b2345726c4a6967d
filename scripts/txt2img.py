"""Generate images from text prompts: python scripts/txt2img.py --prompt "a red circle".

img2img: add --init-img IMAGE [--strength 0.75]; inpainting: also --mask MASK (white = repaint).
--replay IMAGE.png regenerates an image from the settings in its PNG metadata.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.attention import ATTENTION_BACKENDS
from ldm.cli import ScriptParser, resolve_device, resolve_dtype, run_main
from ldm.errors import InputError
from ldm.generate import BUNDLED_CHECKPOINT, make_grid, prepare_outdir, save_png
from ldm.img2img import default_strength
from ldm.pipeline import Pipeline
from ldm.prompts import parse_weights
from ldm.samplers import DEFAULT_STEPS, KARRAS_BY_DEFAULT, SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=str, help="the prompt to render; (text:1.3) weights text, \\( is a literal (")
    p.add_argument("--negative_prompt", type=str, default="", help="what to steer away from (replaces the empty "
                   "unconditional prompt of guidance)")
    p.add_argument("--from-file", "--from_file", dest="from_file", type=Path,
                   help="a text file with one prompt per line (instead of --prompt)")
    p.add_argument("--replay", type=Path, help="regenerate a PNG written by this script from its metadata "
                   "(flags given as well override the recorded settings)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img-samples"))
    default_steps = ", ".join(f"{name} {steps}" for name, steps in DEFAULT_STEPS.items())
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=None,
                   help=f"sampling steps (default: the sampler's: {default_steps})")
    sampler = p.add_mutually_exclusive_group()
    sampler.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="the sampler")
    sampler.add_argument("--plms", dest="sampler", action="store_const", const="plms",
                         help="--sampler plms, as the original SD scripts spell it")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help="Karras et al. noise levels (euler, euler_a, heun, dpmpp_2m; default: on for "
                   f"{', '.join(sorted(KARRAS_BY_DEFAULT))})")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 = no guidance)")
    p.add_argument("--guidance_rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] of Lin et "
                   "al. 2023 (0 = off; 0.7 against over-exposure at high scales)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--init-img", "--init_img", dest="init_img", type=Path, help="img2img: start from this image "
                   "(its size is the output size, sides multiples of 8)")
    p.add_argument("--strength", type=float, default=None, help="img2img: how much of the schedule reruns, in "
                   "(0, 1] (1 = repaint fully); default 0.75, with --mask 1")
    p.add_argument("--mask", type=Path, help="inpainting: an image of the init image's size, white where to "
                   "repaint (needs --init-img)")
    p.add_argument("--n_samples", type=int, default=1, help="images per prompt in one batch")
    p.add_argument("--n_iter", type=int, default=1, help="how many times to repeat the batches")
    p.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (.ckpt or .safetensors); "
                   "default: the bundled shapes-v1 model")
    p.add_argument("--config", type=Path, default=None, help="optional original SD inference YAML")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="what the U-Net predicts, when the checkpoint does not say (SD 2.x 768-v: v)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto")
    p.add_argument("--precision", choices=["full", "autocast", "fp32", "fp16", "bf16"], default="autocast",
                   help="autocast = fp16 on GPU, fp32 on CPU")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa", help="attention kernels: sdpa, "
                   "xformers (CUDA, if installed), sliced (low memory), math")
    p.add_argument("--vae_tile_size", type=int, default=0, help="decode (and encode) in overlapping tiles of this "
                   "many latent pixels, for large images on small machines (0 = whole image; 64 = 512 px)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (a slow first image, then faster)")
    p.add_argument("--channels_last", action="store_true", help="NHWC convolutions in the U-Net and autoencoder "
                   "(the layout GPU tensor cores want; same images)")
    p.add_argument("--skip_grid", action="store_true", help="do not write a grid of all images")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replay is not None:
        # The recorded settings become the defaults, so flags on the command line still win. The recorded
        # noise levels belong to the recorded sampler: another --sampler gets its own default.
        recorded = replay_settings(args.replay)
        karras = recorded.pop("karras", None)
        parser.set_defaults(**recorded)
        args = parser.parse_args(argv)
        if args.karras is None and args.sampler == recorded.get("sampler", "ddim"):
            args.karras = karras
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.sampler]
    if args.karras is None:
        args.karras = args.sampler in KARRAS_BY_DEFAULT
    return args


def _flag(text: str) -> bool:
    if text not in ("True", "False"):
        raise ValueError(text)
    return text == "True"


# PNG text key -> (argument, type) of the settings that determine an image.
REPLAYED = {"prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "seed": ("seed", int),
            "steps": ("steps", int), "scale": ("scale", float), "sampler": ("sampler", str),
            "karras": ("karras", _flag), "eta": ("ddim_eta", float), "height": ("H", int), "width": ("W", int),
            "guidance_rescale": ("guidance_rescale", float), "init_img": ("init_img", Path),
            "strength": ("strength", float), "mask": ("mask", Path), "model_file": ("replay_model_file", str),
            "batch_size": ("n_samples", int), "batch_index": ("replay_index", int)}


def replay_settings(png: Path) -> dict[str, object]:
    """Argument defaults from the metadata `save_png` wrote into `png`."""
    try:
        with Image.open(png) as image:
            text = dict(getattr(image, "text", {}))
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot read {png} to replay it: {e.strerror or e} (pass a PNG written by txt2img)") from None
    if "prompt" not in text or "seed" not in text:
        raise InputError(f"{png} has no generation metadata (prompt, seed, ...); pass a PNG written by txt2img, "
                         "not a grid")
    settings = {}
    for key, (dest, convert) in REPLAYED.items():
        if key in text:
            try:
                settings[dest] = convert(text[key])
            except ValueError:
                raise InputError(f"{png}: unreadable {key} {text[key]!r} in its metadata") from None
    # Row k of a batch can differ from the same image made alone in the last bit (batched kernels round
    # differently), so the whole batch is made again, from its first seed, and row k kept.
    settings["seed"] -= settings.get("replay_index", 0)
    if settings.get("sampler", "ddim") not in SAMPLERS:
        raise InputError(f"{png} was made with the sampler {settings['sampler']!r}, which this version does not "
                         f"have ({', '.join(SAMPLERS)})")
    return settings


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--ckpt, else the bundled model; a replay names the file its image was made with."""
    recorded = getattr(args, "replay_model_file", None)
    if args.ckpt is not None:
        if recorded is not None and args.ckpt.name != recorded:
            warnings.warn(f"{args.replay} was made with {recorded}, not {args.ckpt.name}: the pixels will differ",
                          stacklevel=2)
        return args.ckpt
    if recorded is not None and recorded != BUNDLED_CHECKPOINT.name:
        raise InputError(f"{args.replay} was made with the model {recorded}; pass that file with --ckpt PATH")
    if not BUNDLED_CHECKPOINT.is_file():
        raise InputError("no bundled model in this install yet: pass a checkpoint with --ckpt PATH "
                         "(a Stable Diffusion 1.x/2.x .ckpt/.safetensors or one trained with this project)")
    return BUNDLED_CHECKPOINT


def read_image(path: Path, mode: str) -> torch.Tensor:
    """An image file as (1, C, H, W) float32 in [0, 1]; `mode` "RGB" or "L" (a mask)."""
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode), dtype=np.float32) / 255
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot read image {path}: {e.strerror or e} (pass a PNG or JPEG file)") from None
    tensor = torch.from_numpy(array)
    return (tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)).unsqueeze(0)


def read_init_images(args: argparse.Namespace) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """--init-img as (1, 3, H, W) in [-1, 1] and --mask as (1, 1, H, W) in [0, 1], either None if not given."""
    if args.init_img is None:
        for flag, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise InputError(f"{flag} needs --init-img IMAGE")
        return None, None
    if args.strength is not None and not 0 < args.strength <= 1:
        raise InputError(f"--strength must be in (0, 1] (1 = repaint fully), got {args.strength}")
    image = read_image(args.init_img, "RGB") * 2 - 1
    if args.mask is None:
        return image, None
    mask = read_image(args.mask, "L")
    if mask.shape[-2:] != image.shape[-2:]:
        raise InputError(f"the mask {args.mask} is {mask.shape[-1]}x{mask.shape[-2]} but the init image "
                         f"{args.init_img} is {image.shape[-1]}x{image.shape[-2]}; give a mask of the image's size")
    return image, mask


def read_prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.from_file is None):
        raise InputError("give exactly one of --prompt TEXT or --from-file FILE")
    if args.prompt is not None:
        return [args.prompt]
    if not args.from_file.is_file():
        raise InputError(f"prompt file not found: {args.from_file}")
    prompts = [line.strip() for line in args.from_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {args.from_file} has no prompts (one per line)")
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    for flag, value in (("--steps", args.steps), ("--n_samples", args.n_samples), ("--n_iter", args.n_iter)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if args.scale < 0:
        raise InputError(f"--scale must be >= 0, got {args.scale}")
    if args.ddim_eta < 0:
        raise InputError(f"--ddim_eta must be >= 0, got {args.ddim_eta}")
    if not 0 <= args.guidance_rescale <= 1:
        raise InputError(f"--guidance_rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.vae_tile_size < 0 or args.vae_tile_size % 4:
        raise InputError(f"--vae_tile_size must be 0 (off) or a positive multiple of 4, got {args.vae_tile_size}")
    for prompt in [*prompts, args.negative_prompt]:
        parse_weights(prompt)  # a syntax error stops the run before the model loads
    keep = getattr(args, "replay_index", None)  # with --replay, only the replayed row of each batch is written
    if keep is not None and not 0 <= keep < args.n_samples:
        raise InputError(f"{args.replay} is image {keep + 1} of its batch: keep --n_samples at least {keep + 1}")
    init_image, mask = read_init_images(args)
    ckpt = checkpoint_path(args)
    outdir = prepare_outdir(args.outdir)
    device = resolve_device(args.device)
    pipe = Pipeline.from_checkpoint(ckpt, config=args.config, prediction=args.prediction, device=device,
                                    dtype=resolve_dtype(args.precision, device))
    pipe.set_attention_backend(args.attention)
    if args.vae_tile_size:
        pipe.enable_tiling(args.vae_tile_size, args.vae_tile_size // 4)
    if args.channels_last:
        pipe.to_channels_last()
    if args.compile:
        pipe.compile_unet()

    settings = {"steps": args.steps, "scale": args.scale, "sampler": args.sampler, "karras": args.karras,
                "eta": args.ddim_eta, "guidance_rescale": args.guidance_rescale, "model": pipe.name,
                "model_file": ckpt.name, "negative_prompt": args.negative_prompt}
    strength = args.strength
    if init_image is not None:
        strength = default_strength(mask is not None) if strength is None else strength
        settings.update({"init_img": args.init_img.resolve(), "strength": strength})
        if mask is not None:
            settings["mask"] = args.mask.resolve()
    seed, images = args.seed, []
    for _ in range(args.n_iter):
        for prompt in prompts:
            batch = pipe([prompt] * args.n_samples, num_steps=args.steps, guidance_scale=args.scale,
                         eta=args.ddim_eta, seed=seed, height=args.H, width=args.W,
                         negative_prompts=args.negative_prompt, sampler=args.sampler, karras=args.karras,
                         guidance_rescale=args.guidance_rescale, init_images=init_image, masks=mask,
                         strength=strength)
            for k, image in enumerate(batch):
                if keep is not None and k != keep:
                    continue
                metadata = {"prompt": prompt, "seed": seed + k, **settings, "height": image.height,
                            "width": image.width, "batch_size": args.n_samples, "batch_index": k}
                print(save_png(image, outdir, metadata))
                images.append(image)
            seed += args.n_samples
    if len(images) > 1 and not args.skip_grid:
        num_columns = args.n_samples if keep is None else 1
        print(save_png(make_grid(images, num_columns), outdir, {"prompts": " | ".join(prompts)}, "grid-"))


if __name__ == "__main__":
    sys.exit(run_main(main))
