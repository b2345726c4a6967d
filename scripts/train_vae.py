"""Train the KL autoencoder (stage 1): L1 + LPIPS + KL + PatchGAN discriminator.

    python scripts/train_vae.py --config configs/shapes/autoencoder.yaml
    python scripts/train_vae.py --config ... --perceptual_weight 0     # without LPIPS' VGG weights
    accelerate launch --multi_gpu --num_processes 8 scripts/train_vae.py --config ...
"""

from __future__ import annotations

import sys

from ldm.cli import report_training, run_main, training_parser
from ldm.training.autoencoder import train_autoencoder
from ldm.training.config import load_config


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, "autoencoder, loss, autoencoder_training, data, train")
    p.add_argument("--perceptual_weight", type=float, default=None,
                   help="weight of the LPIPS term (0 trains without it, when VGG weights are unavailable)")
    args = p.parse_args(argv)
    overrides = list(args.set)
    if args.perceptual_weight is not None:
        overrides.append(f"loss.perceptual_weight={args.perceptual_weight}")
    report_training(train_autoencoder(load_config(args.config, overrides), resume=args.resume))


if __name__ == "__main__":
    sys.exit(run_main(main))
