"""Train the latent diffusion U-Net (stage 2) on a frozen autoencoder and text encoder.

    python scripts/train_diffusion.py --config configs/shapes/diffusion.yaml
    python scripts/train_diffusion.py --config ... --set train.max_steps=100 train.batch_size=16 --resume
    accelerate launch --multi_gpu --num_processes 8 scripts/train_diffusion.py --config ...
"""

from __future__ import annotations

import sys

from ldm.cli import report_training, run_main, training_parser
from ldm.training.config import load_config
from ldm.training.diffusion import train_diffusion


def main(argv: list[str] | None = None) -> None:
    args = training_parser(__doc__, "unet, diffusion, data, train").parse_args(argv)
    report_training(train_diffusion(load_config(args.config, args.set), resume=args.resume))


if __name__ == "__main__":
    sys.exit(run_main(main))
