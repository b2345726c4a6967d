"""Convert a pickled .ckpt to .safetensors, so the pickle can be left behind.

    python scripts/convert_checkpoint.py v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors
    python scripts/convert_checkpoint.py model.safetensors model-fp16.safetensors --dtype fp16
    python scripts/convert_checkpoint.py model.safetensors model-vae.safetensors --vae vae-ft-mse.safetensors

The .ckpt is read with torch.load(weights_only=True): a file that would run code when unpickled
is refused instead of executed. An existing output file is kept unless --force is given. --vae bakes a
VAE file into the checkpoint (A1111's "bake in VAE"), so that it needs no --vae when it is used.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

from ldm.cli import ScriptParser, run_main
from ldm.errors import InputError
from ldm.files import check_output_folder
from ldm.sd_checkpoint import replace_autoencoder
from ldm.weights_io import convert_to_safetensors

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_paths(src: Path, dst: Path, force: bool) -> None:
    """Refuse, before reading a possibly large checkpoint, an output that cannot or must not be written."""
    if not src.is_file():
        raise InputError(f"checkpoint not found: {src} (pass an existing .ckpt or .safetensors file)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"the output {dst} is the input file itself; give another output path")
    if dst.is_dir():
        raise InputError(f"the output {dst} is a folder; give the path of the .safetensors file to write")
    if dst.exists() and not force:
        raise InputError(f"{dst} already exists; pass --force to replace it, or give another output path")
    check_output_folder(dst.parent, "output")


def main(argv: list[str] | None = None) -> None:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="checkpoint to convert (.ckpt, .pt or .safetensors)")
    p.add_argument("dst", type=Path, nargs="?", help="output .safetensors (default: next to src)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast floating-point weights (fp16: half the size; loaders cast back as asked)")
    p.add_argument("--vae", type=Path, default=None, help="replace the checkpoint's autoencoder with this VAE file "
                   "(original layout, same architecture)")
    args = p.parse_args(argv)
    dst = args.dst or args.src.with_suffix(".safetensors")
    check_paths(args.src, dst, args.force)
    if args.vae is not None and not args.vae.is_file():
        raise InputError(f"VAE file not found: {args.vae} (pass an existing .safetensors or .ckpt)")
    edit = None if args.vae is None else partial(replace_autoencoder, vae=args.vae)
    print(convert_to_safetensors(args.src, dst, DTYPES.get(args.dtype), edit))


if __name__ == "__main__":
    sys.exit(run_main(main))
