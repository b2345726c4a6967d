"""Train the small CLIP (stage 0) whose text tower becomes the diffusion model's text encoder.

    python scripts/train_clip.py --config configs/shapes/clip.yaml
    python scripts/train_clip.py --config ... --set train.max_steps=100 train.batch_size=64 --resume
    accelerate launch --multi_gpu --num_processes 8 scripts/train_clip.py --config ...
"""

from __future__ import annotations

import sys

from ldm.cli import report_training, run_main, training_parser
from ldm.training.clip import train_clip
from ldm.training.config import load_config


def main(argv: list[str] | None = None) -> None:
    args = training_parser(__doc__, "clip, clip_training, data, train").parse_args(argv)
    report_training(train_clip(load_config(args.config, args.set), resume=args.resume))


if __name__ == "__main__":
    sys.exit(run_main(main))
