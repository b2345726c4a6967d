"""Check a trained autoencoder for groups of shapes-v1 images it erases.

    python scripts/check_autoencoder.py runs/shapes-autoencoder/autoencoder.safetensors

Encodes and decodes the first `val` images and prints, per "<colour> on <background>" group, the share that
comes back with no object the pixel-rule checker can read (`ldm.shapes.evaluation.erased_shares`). Ends with an
error when a group's share is above --max_erased: `scripts/train_shapes_model.sh` runs it after stage 1, so
that an autoencoder that maps a whole group onto its background stops the recipe before the hour of
training built on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldm.cli import ScriptParser, run_main
from ldm.errors import InputError
from ldm.shapes.evaluation import erased_shares
from ldm.training.common import load_stage


def main(argv: list[str] | None = None) -> None:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("autoencoder", type=Path, help="autoencoder exported by train_vae.py (.safetensors)")
    p.add_argument("--num_samples", type=int, default=500, help="val images to encode and decode")
    p.add_argument("--max_erased", type=float, default=0.5, help="largest share of a group allowed to vanish")
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise InputError(f"--num_samples must be >= 1, got {args.num_samples}")
    if not 0 <= args.max_erased <= 1:
        raise InputError(f"--max_erased must be in [0, 1], got {args.max_erased}")
    autoencoder = load_stage(args.autoencoder, "autoencoder")
    shares = erased_shares(autoencoder, args.num_samples)
    print(json.dumps(shares, indent=2))
    erasing = [f"{group} ({share:.0%})" for group, share in shares.items() if share > args.max_erased]
    if erasing:
        raise InputError(f"{args.autoencoder} erases the shape in more than {args.max_erased:.0%} of the images of "
                         f"{', '.join(erasing)}; retrain it (e.g. another train.seed) before training on its latents")


if __name__ == "__main__":
    sys.exit(run_main(main))
