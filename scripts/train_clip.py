"""Train the small CLIP (stage 0) whose text tower becomes the diffusion model's text encoder.

    python scripts/train_clip.py --config configs/shapes/clip.yaml
    python scripts/train_clip.py --config ... --set train.max_steps=100 train.batch_size=64 --resume
    accelerate launch --num_processes 8 scripts/train_clip.py --config ...
"""

from __future__ import annotations

import argparse
import sys

from ldm.cli import run_main
from ldm.training.clip import train_clip
from ldm.training.common import load_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (sections clip, clip_training, data, train)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    args = p.parse_args(argv)
    print(train_clip(load_config(args.config, args.set), resume=args.resume))


if __name__ == "__main__":
    sys.exit(run_main(main))
