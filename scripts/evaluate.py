"""Evaluate a trained pipeline: autoencoder PSNR, keep rate and sharpness, prompt following, sharpness and
CLIP score of generated images, FID.

    python scripts/evaluate.py --ckpt runs/shapes-diffusion/model.safetensors --clip runs/shapes-clip/clip.safetensors
    python scripts/evaluate.py --ckpt ... --fid          # needs Inception v3 weights in the torch hub cache
    python scripts/evaluate.py --ckpt ... --vae runs/shapes-decoder-gan/autoencoder.safetensors

Prompt following and CLIP score use the canonical captions of shapes-v1 `val` (and the held-out
colour-shape pairs); images are judged by the pixel-rule attribute checker. Sharpness is
`ldm.shapes.sharpness` per size and shape (corner fill, tip angle, roundness; medians), on the
renderings and the autoencoder's reconstructions of them, and on the val images generated at the first
scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.cli import ScriptParser, resolve_device, run_main
from ldm.clip import clip_score, load_clip
from ldm.data.loader import make_loader, shapes_dataset
from ldm.errors import InputError
from ldm.evaluation import (
    attribute_scores,
    check_json_path,
    inception_features,
    inception_features_model,
    prompt_following,
)
from ldm.files import write_json
from ldm.images import to_pil
from ldm.metrics import frechet_distance, psnr
from ldm.pipeline import Pipeline
from ldm.quantize import QUANTIZE_MODES
from ldm.shapes.dataset import sample_attributes
from ldm.shapes.evaluation import (
    autoencoder_keep_rates,
    autoencoder_sharpness,
    canonical_captions,
    check_caption,
    sharpness_by_group,
)


def batches_of(split: str, num: int, batch_size: int, size: int):
    """(images, canonical captions) of the first `num` samples of a shapes-v1 split, in batches."""
    for batch in make_loader(shapes_dataset(split, size=size, stop=num), batch_size):
        yield batch["images"], batch["canonical_captions"]


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the (long) evaluation starts."""
    for flag in ("num_psnr", "num_prompts", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.num_heldout < 0:
        raise InputError(f"--num_heldout must be >= 0 (0 skips the held-out pairs), got {args.num_heldout}")
    if any(scale < 0 for scale in args.scales):
        raise InputError(f"--scales must be >= 0, got {args.scales}")
    if args.vae is not None and not args.vae.is_file():
        raise InputError(f"VAE not found: {args.vae} (pass an existing .safetensors or .ckpt file)")
    if args.out is not None:
        check_json_path(args.out)


def main(argv: list[str] | None = None) -> None:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="pipeline checkpoint (.safetensors)")
    p.add_argument("--vae", type=Path, default=None, help="evaluate with this VAE file in place of the "
                   "checkpoint's autoencoder (e.g. a fine-tuned decoder), as txt2img's --vae")
    p.add_argument("--clip", type=Path, default=None, help="CLIP exported by train_clip.py, for the CLIP score")
    p.add_argument("--num_psnr", type=int, default=500, help="val images for the autoencoder PSNR")
    p.add_argument("--num_prompts", type=int, default=300, help="val captions for prompt following")
    p.add_argument("--num_heldout", type=int, default=100, help="held-out-pair captions for prompt following")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scales", type=float, nargs="+", default=[5.0, 1.0], help="guidance scales to compare")
    p.add_argument("--fid", action="store_true", help="also compute FID against val images")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="off", help="int8 Linear weights in the U-Net "
                   "(txt2img's --quantize; needs torchao), to measure what they cost")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (replacing the file)")
    args = p.parse_args(argv)
    check_args(args)

    device = resolve_device(args.device)
    # Loaded before the pipeline runs, so that a missing file stops the evaluation at once, not at its end.
    clip = load_clip(args.clip) if args.clip is not None else None
    inception = inception_features_model(device) if args.fid else None
    pipe = Pipeline.from_checkpoint(args.ckpt, device=device, vae=args.vae).quantize_unet(args.quantize)
    size = pipe.spec.image_size
    results: dict[str, object] = {"checkpoint": str(args.ckpt), "vae": None if args.vae is None else str(args.vae),
                                  "steps": args.steps, "quantize": args.quantize}

    with torch.no_grad():
        values = [psnr(images, pipe.decode(pipe.encode(images.to(device))).cpu())
                  for images, _ in batches_of("val", args.num_psnr, args.batch_size, size)]
    results[f"autoencoder_psnr_val_{args.num_psnr}"] = torch.cat(values).mean().item()
    results[f"autoencoder_keep_rate_val_{args.num_psnr}"] = autoencoder_keep_rates(pipe, args.num_psnr,
                                                                                  args.batch_size)["all"]
    results[f"autoencoder_sharpness_val_{args.num_psnr}"] = autoencoder_sharpness(pipe.autoencoder, args.num_psnr,
                                                                                 args.batch_size)
    print(json.dumps(results), flush=True)

    # The val images at the first scale are kept: prompt following, sharpness, CLIP score and FID read them.
    captions = canonical_captions("val", args.num_prompts)
    generated = torch.cat([pipe(captions[i : i + args.batch_size], num_steps=args.steps,
                                guidance_scale=args.scales[0], seed=i, output_type="tensor", progress=False)
                           for i in tqdm(range(0, len(captions), args.batch_size), desc="val images")]).cpu()
    generated_images = to_pil(generated)
    for scale in args.scales:
        for split, num in (("val", args.num_prompts), ("heldout", args.num_heldout)):
            if num == 0:
                continue
            if split == "val" and scale == args.scales[0]:
                scores = attribute_scores(check_caption(image, caption)
                                          for image, caption in zip(generated_images, captions, strict=True))
            else:
                scores = prompt_following(pipe, canonical_captions(split, num), check_caption, num_steps=args.steps,
                                          guidance_scale=scale, batch_size=args.batch_size)
            results[f"prompt_following_{split}_{num}_scale_{scale:g}"] = scores
            print(json.dumps({f"{split} scale {scale:g}": scores}), flush=True)
    samples = [sample_attributes("val", index)[0] for index in range(args.num_prompts)]
    sharpness = sharpness_by_group(generated_images, samples)
    results[f"sharpness_val_{args.num_prompts}_scale_{args.scales[0]:g}"] = sharpness
    if clip is not None or inception is not None:
        if clip is not None:
            real = torch.cat([images for images, _ in batches_of("val", args.num_prompts, args.batch_size, size)])
            results["clip_score_generated"] = clip_score(clip, generated, captions).mean().item()
            results["clip_score_real"] = clip_score(clip, real, captions).mean().item()
        if inception is not None:
            real = torch.cat([inception_features(inception, images.to(device)).cpu()
                              for images, _ in batches_of("val", args.num_prompts, args.batch_size, size)])
            fake = torch.cat([inception_features(inception, generated[i : i + args.batch_size].to(device)).cpu()
                              for i in range(0, len(generated), args.batch_size)])
            results[f"fid_val_{args.num_prompts}"] = frechet_distance(real, fake)

    print(json.dumps(results, indent=2))
    if args.out is not None:
        write_json(args.out, results)


if __name__ == "__main__":
    sys.exit(run_main(main))
