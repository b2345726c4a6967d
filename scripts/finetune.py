"""Fine-tune a checkpoint on your own images (WebDataset shards) as a LoRA or in full.

    python scripts/make_shards.py photos/ --out shards/
    python scripts/finetune.py --ckpt model.safetensors --data 'shards/*.tar' --method lora --out runs/mine
    python scripts/txt2img.py --ckpt model.safetensors --lora runs/mine/lora.safetensors:1 --prompt "..."

The flags set finetune.base, data.urls, finetune.method and train.output_dir of the config (default
configs/finetune/lora.yaml); --set changes any other key. Details: docs/finetuning.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.cli import report_training, run_main, training_parser
from ldm.training.config import load_config
from ldm.training.finetune import METHODS, train_finetune

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "lora.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__, "finetune, lora, buckets, dreambooth, data, train", str(DEFAULT_CONFIG))
    parser.add_argument("--ckpt", help="the checkpoint to start from (finetune.base)")
    parser.add_argument("--data", help="tar shards: a path, a glob or a brace pattern (data.urls)")
    parser.add_argument("--method", choices=METHODS, help="finetune.method")
    parser.add_argument("--out", help="the run folder (train.output_dir)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    for section, key, value in (("finetune", "base", args.ckpt), ("finetune", "method", args.method),
                                ("data", "urls", args.data), ("train", "output_dir", args.out)):
        if value is not None:
            config.setdefault(section, {})[key] = value
    report_training(train_finetune(config, resume=args.resume))


if __name__ == "__main__":
    sys.exit(run_main(main))
