"""Write shapes-v1 samples as WebDataset tar shards.

    python scripts/make_shapes.py --split train --num 100000 --outdir data/shapes-v1

All or nothing: a folder that already holds shards of the split is refused, and a run that fails
or is interrupted removes the shards (and folders) it made.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from ldm.cli import ScriptParser, run_main
from ldm.errors import InputError
from ldm.files import check_output_folder
from ldm.shapes.dataset import DATASET_NAME, DEFAULT_SAMPLES_PER_SHARD, SPLITS, shard_name, write_shards


def first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--num", type=int, required=True, help="samples 0 .. num-1 of the split")
    parser.add_argument("--outdir", type=Path, required=True, help="folder for shapes-v1-{split}-*.tar")
    parser.add_argument("--per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    args = parser.parse_args(argv)
    if args.num < 1 or args.per_shard < 1:
        raise InputError(f"--num and --per-shard must be >= 1, got {args.num} and {args.per_shard}")
    outdir = check_output_folder(args.outdir, "--outdir")
    existing = sorted(outdir.glob(f"{DATASET_NAME}-{args.split}-*.tar"))
    if existing:
        raise InputError(f"--outdir {outdir} already holds {len(existing)} {args.split} shard(s) "
                         f"({existing[0].name}, ...); remove them or choose another folder")
    created = first_missing(outdir)
    try:
        with tqdm(total=args.num, unit="img", desc=f"shapes-v1 {args.split}") as bar:
            paths = write_shards(args.split, args.num, outdir, args.per_shard, bar.update)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for shard in range(math.ceil(args.num / args.per_shard)):
                (outdir / shard_name(args.split, shard)).unlink(missing_ok=True)
        raise
    print(f"wrote {len(paths)} shards to {outdir}")


if __name__ == "__main__":
    sys.exit(run_main(main))
