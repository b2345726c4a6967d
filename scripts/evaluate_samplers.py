"""Measure samplers and generation features on a shapes-v1 model (default: the bundled one).

    python scripts/evaluate_samplers.py --out sampler_report.json
    python scripts/evaluate_samplers.py --num_quality 10 --num_prompts 30 --num_negative 20 --num_img2img 10
    python scripts/evaluate_samplers.py --samplers ddim heun --num_negative 0 --num_img2img 0

1. Quality per step: latent RMSE of deterministic samplers to a 1000-step DDIM run from the same noise.
2. Prompt following of every sampler at its default step count (ldm.samplers.DEFAULT_STEPS), same seeds.
3. Negative prompt: colours of "a circle", without and with a colour (--negative_color; by default the one
   the model draws most for it) as the negative prompt.
4. img2img: share of val images whose checker-read attributes survive img2img with their own caption, and
   (the most img2img can keep) encoding and decoding alone.
Parts 1 and 2 cover the --samplers given (default: all). All at guidance scale 5 on canonical shapes-v1
val captions; a --num_* of 0 skips that part. Prints a
markdown table per part as soon as it is done (and rewrites --out after each part).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ldm.cli import ScriptParser, resolve_device, run_main
from ldm.errors import InputError
from ldm.evaluation import QUALITY_SETTINGS, check_json_path, prompt_following_by_sampler, sampler_quality
from ldm.files import write_json
from ldm.generate import BUNDLED_CHECKPOINT
from ldm.pipeline import Pipeline
from ldm.samplers import DEFAULT_STEPS, DETERMINISTIC_SAMPLERS, KARRAS_BY_DEFAULT, SAMPLERS
from ldm.shapes.dataset import ATTRIBUTES, VOCABULARY
from ldm.shapes.evaluation import (
    autoencoder_keep_rates,
    canonical_captions,
    check_caption,
    img2img_keep_rates,
    negative_prompt_effect,
)

# The checks: a prompt that leaves the colour open, with a colour as negative prompt, and img2img
# strengths around the asked-for 0.3.
PROMPT = "a circle"
IMG2IMG_STRENGTHS = (0.3, 0.6, 0.9)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the (long) evaluation starts."""
    for flag in ("num_quality", "num_prompts", "num_negative", "num_img2img"):
        if getattr(args, flag) < 0:
            raise InputError(f"--{flag} must be >= 0 (0 skips that part), got {getattr(args, flag)}")
    for flag in ("reference_steps", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.scale < 0:
        raise InputError(f"--scale must be >= 0, got {args.scale}")
    if args.negative_color not in (*VOCABULARY["color"], "auto"):
        raise InputError(f"--negative_color must be a shapes-v1 colour ({', '.join(VOCABULARY['color'])}) or "
                         f"auto, got {args.negative_color!r}")
    if args.num_quality and not set(args.samplers) & set(DETERMINISTIC_SAMPLERS):
        raise InputError(f"quality per step compares deterministic samplers, and --samplers names none; add one of "
                         f"{', '.join(DETERMINISTIC_SAMPLERS)} or pass --num_quality 0")
    if args.out is not None:
        check_json_path(args.out)
    if not args.ckpt.is_file():
        raise InputError(f"checkpoint not found: {args.ckpt} (pass one with --ckpt PATH)")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table; floats with three decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def sampler_label(name: str, karras: bool) -> str:
    """The sampler as txt2img's flags pick it: `--karras` / `--no-karras` only where not its default."""
    if karras == (name in KARRAS_BY_DEFAULT):
        return name
    return f"{name} --karras" if karras else f"{name} --no-karras"


def report(results: dict[str, dict]) -> str:
    """The results of `main` as markdown: one table per part that ran."""
    parts = []
    if "quality" in results:
        quality = results["quality"]
        rows = [[sampler_label(r["sampler"], r["karras"]), r["steps"], r["evaluations"], r["rmse"]]
                for r in quality["rows"]]
        parts.append(f"Latent RMSE to DDIM {quality['reference_steps']} steps ({quality['num_images']} images)\n\n"
                     + markdown_table(["sampler", "steps", "evaluations", "RMSE"], rows))
        rmse = {(r["sampler"], r["karras"], r["steps"]): r["rmse"] for r in quality["rows"]}
        for karras in (False, True):  # the check
            if ("dpmpp_2m", karras, 20) in rmse and ("ddim", False, 50) in rmse:
                dpm, ddim = rmse[("dpmpp_2m", karras, 20)], rmse[("ddim", False, 50)]
                verdict = "closer" if dpm < ddim else "not closer"
                levels = "Karras" if karras else "evenly spaced"
                parts.append(f"DPM++ 2M at 20 steps on {levels} noise levels (RMSE {dpm:.4f}) lands {verdict} to "
                             f"the reference than DDIM at 50 (RMSE {ddim:.4f}).")
    if "prompt_following" in results:
        following = results["prompt_following"]
        rows = [[sampler_label(name, r["karras"]), r["steps"], r["evaluations"], r["all"], *(r[a] for a in ATTRIBUTES)]
                for name, r in following["by_sampler"].items()]
        parts.append(f"Prompt following ({following['num_captions']} val captions), share right\n\n"
                     + markdown_table(["sampler", "steps", "evaluations", "all", *ATTRIBUTES], rows))
    if "negative_prompt" in results:
        negative = results["negative_prompt"]
        colors = list(negative["without"])
        rows = [[label, *negative[key].values()]
                for label, key in (("(none)", "without"), (f'"{negative["negative_prompt"]}"', "with"))]
        parts.append(f'Negative prompt: "{negative["prompt"]}", {negative["num_images"]} seeds, share of each colour '
                     "the checker reads\n\n" + markdown_table(["negative prompt", *colors], rows))
    if "img2img" in results:
        img2img = results["img2img"]
        rows = [["autoencoder only", *(img2img["autoencoder"][a] for a in ("all", *ATTRIBUTES))]]
        rows += [[strength, r["all"], *(r[a] for a in ATTRIBUTES)] for strength, r in img2img["by_strength"].items()]
        parts.append(f"img2img of {img2img['num_images']} val images with their captions, share kept\n\n"
                     + markdown_table(["strength", "all", *ATTRIBUTES], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=BUNDLED_CHECKPOINT, help="pipeline checkpoint (default: the "
                   "bundled shapes-v1 model)")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS),
                   help="samplers of quality per step and prompt following (default: all)")
    p.add_argument("--num_quality", type=int, default=100, help="val captions and seeds for quality per step")
    p.add_argument("--reference_steps", type=int, default=1000, help="DDIM steps of the quality reference")
    p.add_argument("--num_prompts", type=int, default=300, help="val captions for prompt following per sampler")
    p.add_argument("--num_negative", type=int, default=200, help="seeds for the negative-prompt check")
    p.add_argument("--negative_color", default="auto", help="the colour that is the negative prompt (auto: the "
                   "one the model draws most often for the prompt without it)")
    p.add_argument("--num_img2img", type=int, default=100, help="val images for the img2img check")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS["ddim"], help="DDIM steps of the negative-prompt "
                   "and img2img checks")
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here (replacing the file)")
    args = p.parse_args(argv)
    check_args(args)

    pipe = Pipeline.from_checkpoint(args.ckpt, device=resolve_device(args.device))
    common = {"guidance_scale": args.scale, "batch_size": args.batch_size, "seed": args.seed}
    seconds: dict[str, float] = {}
    results: dict[str, object] = {"checkpoint": str(args.ckpt), "guidance_scale": args.scale, "seed": args.seed,
                                  "seconds": seconds}
    clock = time.perf_counter()

    def finish(part: str, value: dict) -> None:
        # Each part is printed and saved as soon as it is done: a long run stopped early keeps what it measured.
        nonlocal clock
        results[part] = value
        seconds[part] = time.perf_counter() - clock
        if args.out is not None:
            write_json(args.out, results)
        print(report({part: value}), end="\n\n", flush=True)
        clock = time.perf_counter()

    if args.num_quality:
        settings = [s for s in QUALITY_SETTINGS if s.sampler in args.samplers]
        rows = sampler_quality(pipe, canonical_captions("val", args.num_quality), settings,
                               reference_steps=args.reference_steps, **common)
        finish("quality", {"reference_steps": args.reference_steps, "num_images": args.num_quality, "rows": rows})
    if args.num_prompts:
        steps = {name: n for name, n in DEFAULT_STEPS.items() if name in args.samplers}
        captions = canonical_captions("val", args.num_prompts)
        by_sampler = prompt_following_by_sampler(pipe, captions, check_caption, steps, **common)
        finish("prompt_following", {"num_captions": args.num_prompts, "by_sampler": by_sampler})
    if args.num_negative:
        negative = None if args.negative_color == "auto" else args.negative_color
        effect = negative_prompt_effect(pipe, PROMPT, negative, num_samples=args.num_negative, num_steps=args.steps,
                                        **common)
        finish("negative_prompt", {"prompt": PROMPT, "num_images": args.num_negative, "steps": args.steps, **effect})
    if args.num_img2img:
        by_strength = img2img_keep_rates(pipe, args.num_img2img, IMG2IMG_STRENGTHS, num_steps=args.steps, **common)
        autoencoder = autoencoder_keep_rates(pipe, args.num_img2img, args.batch_size)
        finish("img2img", {"num_images": args.num_img2img, "steps": args.steps, "autoencoder": autoencoder,
                           "by_strength": by_strength})

if __name__ == "__main__":
    sys.exit(run_main(main))
