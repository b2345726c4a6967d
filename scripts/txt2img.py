"""Generate images from text prompts: python scripts/txt2img.py --prompt "a red circle"."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.cli import resolve_device, resolve_dtype, run_main
from ldm.errors import InputError
from ldm.generate import BUNDLED_CHECKPOINT, make_grid, prepare_outdir, save_png
from ldm.pipeline import Pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", type=str, help="the prompt to render")
    p.add_argument("--negative_prompt", type=str, default="", help="what to steer away from (replaces the empty "
                   "unconditional prompt of guidance)")
    p.add_argument("--from-file", "--from_file", dest="from_file", type=Path,
                   help="a text file with one prompt per line (instead of --prompt)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img-samples"))
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=50, help="DDIM sampling steps")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (1 = no guidance)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
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
    p.add_argument("--skip_grid", action="store_true", help="do not write a grid of all images")
    return p.parse_args(argv)


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
    ckpt = args.ckpt or BUNDLED_CHECKPOINT
    if args.ckpt is None and not BUNDLED_CHECKPOINT.is_file():
        raise InputError("no bundled model in this install yet: pass a checkpoint with --ckpt PATH "
                         "(a Stable Diffusion 1.x/2.x .ckpt/.safetensors or one trained with this project)")
    outdir = prepare_outdir(args.outdir)
    device = resolve_device(args.device)
    pipe = Pipeline.from_checkpoint(ckpt, config=args.config, prediction=args.prediction, device=device,
                                    dtype=resolve_dtype(args.precision, device))

    seed, images = args.seed, []
    for _ in range(args.n_iter):
        for prompt in prompts:
            batch = pipe([prompt] * args.n_samples, num_steps=args.steps, guidance_scale=args.scale,
                         eta=args.ddim_eta, seed=seed, height=args.H, width=args.W,
                         negative_prompts=args.negative_prompt)
            for k, image in enumerate(batch):
                metadata = {"prompt": prompt, "seed": seed + k, "steps": args.steps, "scale": args.scale,
                            "sampler": "ddim", "eta": args.ddim_eta, "model": pipe.name,
                            "height": image.height, "width": image.width, "negative_prompt": args.negative_prompt}
                print(save_png(image, outdir, metadata))
            seed += args.n_samples
            images.extend(batch)
    if len(images) > 1 and not args.skip_grid:
        print(save_png(make_grid(images, args.n_samples), outdir, {"prompts": " | ".join(prompts)}, "grid-"))


if __name__ == "__main__":
    sys.exit(run_main(main))
