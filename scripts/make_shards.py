"""Turn a folder of captioned images into WebDataset tar shards for training and fine-tuning.

    python scripts/make_shards.py photos/ --out data/photos --max_side 1024

Captions: a same-name .txt beside each image (cat.png, cat.txt; subfolders too), or a metadata.jsonl /
metadata.csv in the folder with file_name and text (or caption) columns. Images that do not decode or
have no caption are skipped and listed at the end. docs/finetuning.md has the details.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.cli import ScriptParser, run_main
from ldm.data.make_shards import DEFAULT_SHARD_SIZE, FORMATS, make_shards


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of images and captions")
    parser.add_argument("--out", type=Path, required=True, help="folder for shard-000000.tar, ...")
    parser.add_argument("--max_side", type=int, default=None,
                        help="downscale so that the longer side is at most this many pixels (never upscales)")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    parser.add_argument("--format", choices=FORMATS, default="png", help="png (lossless) or jpg")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (with --format jpg)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder that is not empty, replacing the shards there")
    args = parser.parse_args(argv)
    report = make_shards(args.folder, args.out, shard_size=args.shard_size, max_side=args.max_side,
                         fmt=args.format, quality=args.quality, overwrite=args.overwrite)
    print(report.summary())


if __name__ == "__main__":
    sys.exit(run_main(main))
