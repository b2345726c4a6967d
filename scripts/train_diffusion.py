"""Train the latent diffusion U-Net (stage 2) on a frozen autoencoder and text encoder.

    python scripts/train_diffusion.py --config configs/shapes/diffusion.yaml
    python scripts/train_diffusion.py --config ... --set train.max_steps=100 train.batch_size=16 --resume
    accelerate launch --num_processes 8 scripts/train_diffusion.py --config ...
"""

from __future__ import annotations

import argparse
import sys

from ldm.cli import run_main
from ldm.training.common import load_config
from ldm.training.diffusion import train_diffusion


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (sections unet, diffusion, data, train)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    args = p.parse_args(argv)
    path = train_diffusion(load_config(args.config, args.set), resume=args.resume)
    if path is not None:
        print(path)


if __name__ == "__main__":
    sys.exit(run_main(main))
