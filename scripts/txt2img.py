"""Generate images from text prompts: python scripts/txt2img.py --prompt "a red circle".

img2img: add --init-img IMAGE [--strength 0.75]; inpainting: also --mask MASK (white = repaint).
--replay IMAGE.png regenerates an image from the settings in its PNG metadata.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from PIL import Image

from ldm import settings as generation
from ldm.attention import ATTENTION_BACKENDS
from ldm.cli import COMPILE_MODES, ScriptParser, resolve_device, run_main
from ldm.errors import InputError
from ldm.generate import BUNDLED_CHECKPOINT, image_text, make_grid, prepare_outdir, read_image_text, save_png
from ldm.infotext import model_hash
from ldm.memory import GIB
from ldm.pipeline import Pipeline
from ldm.precision import PRECISION_NAMES
from ldm.quantize import QUANTIZE_MODES

# Images one run generates (--n_iter x --n_samples x prompts) unless --max_images says more: a typed or
# pasted --n_iter 1000000000 is refused at once instead of running for days. 1000 is about an hour of
# SD 1.5 at 512 px on a current GPU, and seconds per image of the bundled model on a CPU.
MAX_IMAGES = 1000


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generation.add_arguments(p)  # --prompt, --seed, --steps, --sampler, ...: one per GenerationSettings field
    p.add_argument("--from-file", "--from_file", dest="from_file", type=Path,
                   help="a text file with one prompt per line (instead of --prompt)")
    p.add_argument("--replay", type=Path, help="regenerate a PNG written by this script from its metadata "
                   "(flags given as well override the recorded settings)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/txt2img-samples"))
    p.add_argument("--n_iter", type=int, default=1, help="how many times to repeat the batches")
    p.add_argument("--max_images", type=int, default=MAX_IMAGES, help="refuse runs that would generate more "
                   f"images than this (--n_iter x --n_samples x prompts; default {MAX_IMAGES})")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (.ckpt or .safetensors); "
                   "default: the bundled shapes-v1 model")
    p.add_argument("--config", type=Path, default=None, help="optional original SD inference YAML")
    p.add_argument("--vae", type=Path, default=None, help="a VAE file that replaces the checkpoint's autoencoder "
                   "(e.g. SD's ft-MSE VAE, original key layout)")
    p.add_argument("--use_ema", action="store_true", help="generate with the U-Net's EMA weights (model_ema.*), "
                   "which full training checkpoints carry")
    p.add_argument("--embeddings_dir", type=Path, default=None, help="folder of textual-inversion embeddings "
                   "(.pt, .safetensors), each triggered by its file name in a prompt")
    p.add_argument("--lora_dir", type=Path, default=None, help="folder where <lora:NAME:WEIGHT> tags in prompts "
                   "find NAME.safetensors (or .pt), searched with its subfolders")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="what the U-Net predicts, when the checkpoint does not say (SD 2.x 768-v: v)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="auto",
                   help="auto = fp16 on GPU; on a CPU bf16 for large models where it has bf16 matrix instructions, "
                   "else fp32; autocast = fp16 on GPU, fp32 on CPU")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="off", help="int8 Linear weights in the U-Net "
                   "through torchao (pip install torchao; docs/generation.md): int8-weight, or int8-dynamic (int8 "
                   "activations too); off (default): as loaded")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa", help="attention kernels: sdpa, "
                   "xformers (CUDA, if installed), sliced (low memory), math")
    p.add_argument("--vae_tile_size", type=int, default=0, help="decode (and encode) in overlapping tiles of this "
                   "many latent pixels, for large images on small machines (0 = whole image; 64 = 512 px)")
    p.add_argument("--max_memory", type=float, default=None, metavar="GIB", help="refuse batches whose activations "
                   "need more than this many GiB (default: what the device has free; inf: no check)")
    p.add_argument("--compile", nargs="?", const="cache", default="auto", choices=[*COMPILE_MODES, "jit"],
                   help="compiled U-Net (docs/generation.md): cache (the flag alone) compiles each new image shape "
                   "once, minutes, into the compile cache, which later runs reuse; auto (default) uses what the cache "
                   "has, eager otherwise; jit: torch.compile in this process only; off: eager")
    p.add_argument("--compile_cache", type=Path, default=None, metavar="DIR", help="where compiled programs are "
                   "kept (default: $LDM_COMPILE_CACHE, else $XDG_CACHE_HOME/ldm/compiled or ~/.cache/ldm/compiled)")
    p.add_argument("--channels_last", action="store_true", help="NHWC convolutions in the U-Net and autoencoder "
                   "(the layout GPU tensor cores want; same images)")
    p.add_argument("--skip_grid", action="store_true", help="do not write a grid of all images")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags; `settings` holds the generation settings (with --replay: the recorded ones, overridden
    by the flags given), `recorded` the replayed PNG's other text (model_file, batch_index)."""
    args = build_parser().parse_args(argv)
    recorded, args.recorded = {}, {}
    if args.replay is not None:
        recorded, args.recorded = read_image_text(args.replay)
    args.settings = generation.from_arguments(args, recorded)
    return args


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--ckpt, else the bundled model; a replay names the model its image was made with: its file, or in
    A1111 infotext its name (the file's stem)."""
    recorded = args.recorded.get("model_file") or args.recorded.get("model")

    def made_with(path: Path) -> bool:
        return recorded in (path.name, path.stem)

    if args.ckpt is not None:
        if recorded is not None and not made_with(args.ckpt):
            warnings.warn(f"{args.replay} was made with {recorded}, not {args.ckpt.name}: the pixels will differ",
                          stacklevel=2)
        return args.ckpt
    if recorded is not None and not made_with(BUNDLED_CHECKPOINT):
        raise InputError(f"{args.replay} was made with the model {recorded}; pass that file with --ckpt PATH")
    if not BUNDLED_CHECKPOINT.is_file():
        raise InputError("no bundled model in this install yet: pass a checkpoint with --ckpt PATH "
                         "(a Stable Diffusion 1.x/2.x .ckpt/.safetensors or one trained with this project)")
    return BUNDLED_CHECKPOINT


def vae_path(args: argparse.Namespace) -> Path | None:
    """--vae; a replay of an image made with a replaced VAE needs that file."""
    recorded = args.recorded.get("vae")
    if args.vae is None and recorded is not None:
        raise InputError(f"{args.replay} was made with the VAE {recorded}; pass that file with --vae PATH")
    if args.vae is not None and not args.vae.is_file():
        raise InputError(f"VAE not found: {args.vae} (pass an existing .safetensors or .ckpt file)")
    return args.vae


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (or the replayed one) or the lines of --from-file."""
    has_prompt = hasattr(args, "prompt") or args.replay is not None
    if has_prompt == (args.from_file is not None):
        raise InputError("give exactly one of --prompt TEXT or --from-file FILE")
    if args.from_file is None:
        return [args.settings.prompt]
    if not args.from_file.is_file():
        raise InputError(f"prompt file not found: {args.from_file}")
    try:
        text = args.from_file.read_text()
    except UnicodeDecodeError:
        raise InputError(f"prompt file {args.from_file} is not UTF-8 text (one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {args.from_file} has no prompts (one per line)")
    return prompts


def check_image_count(args: argparse.Namespace, settings: generation.GenerationSettings, num_prompts: int) -> None:
    """--n_iter and --max_images: the run's images within the limit, and their seeds (one per image, counting
    up from --seed) within the range of seeds."""
    if args.n_iter < 1:
        raise InputError(f"--n_iter must be >= 1, got {args.n_iter}")
    if args.max_images < 1:
        raise InputError(f"--max_images must be >= 1, got {args.max_images}")
    count = args.n_iter * settings.batch_size * num_prompts
    if count > args.max_images:
        raise InputError(f"--n_iter {args.n_iter} x --n_samples {settings.batch_size} x {num_prompts} prompt(s) "
                         f"makes {count} images, more than --max_images {args.max_images}; lower --n_iter, or "
                         "raise --max_images if you mean it")
    if isinstance(settings.seed, int) and settings.seed + count - 1 > generation.MAX_SEED:
        raise InputError(f"--seed {settings.seed} with {count} images counts past the largest seed "
                         f"{generation.MAX_SEED} (image k takes seed + k); lower --seed")


def keeps_grid(num_images: int, image: Image.Image) -> bool:
    """Whether a grid of `num_images` images like `image` is worth keeping them for: more than one, and
    no more pixels than Pillow opens without a decompression-bomb warning (else: a warning, no grid)."""
    pixels = num_images * image.width * image.height
    if num_images > 1 and pixels > Image.MAX_IMAGE_PIXELS:
        warnings.warn(f"no grid: {num_images} images of {image.width}x{image.height} make {pixels} pixels, more "
                      f"than Pillow opens ({Image.MAX_IMAGE_PIXELS}); the images are written one by one",
                      stacklevel=2)
        return False
    return num_images > 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = args.settings
    batches = [replace(settings, prompt=prompt) for prompt in read_prompts(args)]  # all checked before loading
    check_image_count(args, settings, len(batches))
    if args.vae_tile_size < 0 or args.vae_tile_size % 4:
        raise InputError(f"--vae_tile_size must be 0 (off) or a positive multiple of 4, got {args.vae_tile_size}")
    if args.max_memory is not None and not args.max_memory > 0:
        raise InputError(f"--max_memory must be a positive number of GiB (inf: no check), got {args.max_memory}")
    keep = args.recorded.get("batch_index")  # with --replay, only the replayed row of each batch is written
    keep = None if keep is None else int(keep)
    if keep is not None and not 0 <= keep < settings.batch_size:
        raise InputError(f"{args.replay} is image {keep + 1} of its batch: keep --n_samples at least {keep + 1}")
    ckpt, vae = checkpoint_path(args), vae_path(args)
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise InputError(f"--lora_dir {args.lora_dir} is not a folder")
    outdir = prepare_outdir(args.outdir)
    device = resolve_device(args.device)
    pipe = Pipeline.from_checkpoint(ckpt, config=args.config, prediction=args.prediction, device=device,
                                    dtype=args.precision, vae=vae,
                                    use_ema=args.use_ema or args.recorded.get("use_ema") == "True")
    pipe.set_attention_backend(args.attention)
    pipe.lora_dir = args.lora_dir
    pipe.max_memory = None if args.max_memory is None else args.max_memory * GIB
    if args.embeddings_dir is not None:
        pipe.load_embeddings(args.embeddings_dir)
    recorded = [entry.rpartition(": ")[0] for entry in args.recorded.get("embeddings", "").split(", ") if entry]
    if missing := [word for word in recorded if word not in pipe.embedding_files]:
        raise InputError(f"{args.replay} was made with the embedding {missing[0]}; pass the folder that holds "
                         f"{missing[0]}.pt or .safetensors with --embeddings_dir")
    if args.vae_tile_size:
        pipe.enable_tiling(args.vae_tile_size, args.vae_tile_size // 4)
    if args.channels_last:
        pipe.to_channels_last()
    pipe.quantize_unet(args.quantize)  # before compiling: the compiled graph takes the int8 weights
    pipe.compile_unet(args.compile, args.compile_cache)

    seed, images, checkpoint_hash = settings.seed, [], model_hash(ckpt)
    num_written = args.n_iter * len(batches) * (settings.batch_size if keep is None else 1)
    grid = None  # whether the images are kept for a grid, known from the first one
    for _ in range(args.n_iter):
        for batch in batches:
            batch = replace(batch, seed=seed)
            for k, image in enumerate(pipe.generate(batch)):
                if keep is None or k == keep:
                    print(save_png(image, outdir, image_text(batch, k, image, pipe.name, ckpt.name,
                                                               pipe.model_text(), checkpoint_hash)))
                    if grid is None:
                        grid = not args.skip_grid and keeps_grid(num_written, image)
                    if grid:
                        images.append(image)
            seed += batch.batch_size
    if grid:
        num_columns = settings.batch_size if keep is None else 1
        prompts = " | ".join(batch.prompt for batch in batches)
        print(save_png(make_grid(images, num_columns), outdir, {"prompts": prompts}, "grid-"))


if __name__ == "__main__":
    sys.exit(run_main(main))
