"""Write shapes-v1 samples as WebDataset tar shards.

python scripts/make_shapes.py --split train --num 100000 --outdir data/shapes-v1
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ldm.data.shapes import DEFAULT_SAMPLES_PER_SHARD, SPLITS, write_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write shapes-v1 samples as WebDataset shards.")
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--num", type=int, required=True, help="samples 0 .. num-1 of the split")
    parser.add_argument("--outdir", required=True, help="folder for shapes-v1-{split}-*.tar")
    parser.add_argument("--per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    args = parser.parse_args(argv)
    if args.num <= 0 or args.per_shard <= 0:
        parser.error("--num and --per-shard must be positive")
    with tqdm(total=args.num, unit="img", desc=f"shapes-v1 {args.split}") as bar:
        paths = write_shards(args.split, args.num, args.outdir, args.per_shard, bar.update)
    print(f"wrote {len(paths)} shards to {args.outdir}")


if __name__ == "__main__":
    main()
