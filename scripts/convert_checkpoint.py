"""Convert a pickled .ckpt to .safetensors, so the pickle can be left behind.

    python scripts/convert_checkpoint.py v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors

The .ckpt is read with torch.load(weights_only=True): a file that would run code when unpickled
is refused instead of executed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.cli import run_main
from ldm.sd_checkpoint import convert_to_safetensors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="checkpoint to convert (.ckpt, .pt or .safetensors)")
    p.add_argument("dst", type=Path, nargs="?", help="output .safetensors (default: next to src)")
    args = p.parse_args(argv)
    print(convert_to_safetensors(args.src, args.dst or args.src.with_suffix(".safetensors")))


if __name__ == "__main__":
    sys.exit(run_main(main))
