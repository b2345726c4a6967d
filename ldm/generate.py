"""Writing generated images: never overwriting, never half-written, each PNG carrying how it was made."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import InputError
from ldm.files import atomic_write

# The checkpoint txt2img uses when no --ckpt is given (shipped inside the package).
BUNDLED_CHECKPOINT = Path(__file__).parent / "weights" / "shapes-v1.safetensors"


def prepare_outdir(outdir: str | Path) -> Path:
    """Create `outdir` if needed and check that files can be written there, before any slow work."""
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=outdir, prefix=".write-check-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write to output folder {outdir}: {e.strerror or e} "
                         "(pass a writable --outdir)") from None
    return outdir


def next_index(outdir: Path, prefix: str = "") -> int:
    """One past the highest `{prefix}NNNNN.png` number in `outdir`, so earlier images are kept."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.png$")
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := pattern.fullmatch(p.name))]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, outdir: Path, metadata: dict[str, object], prefix: str = "") -> Path:
    """Write `image` as the next free `{prefix}NNNNN.png` with `metadata` in PNG text chunks.

    The file is written under a temporary name and then hard-linked to its final name, which
    fails instead of replacing a file that appeared meanwhile: no partial file, no overwrite.
    """
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    fd, tmp = tempfile.mkstemp(dir=outdir, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        index = next_index(outdir, prefix)
        while True:
            path = outdir / f"{prefix}{index:05d}.png"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                index += 1
    finally:
        os.unlink(tmp)


def make_grid(images: list[Image.Image], num_columns: int) -> Image.Image:
    """Tile equally sized images row by row."""
    w, h = images[0].size
    num_rows = -(-len(images) // num_columns)
    grid = Image.new("RGB", (num_columns * w, num_rows * h))
    for k, image in enumerate(images):
        grid.paste(image, ((k % num_columns) * w, (k // num_columns) * h))
    return grid


def save_grid(images: list[Image.Image], num_columns: int, path: Path) -> None:
    """`make_grid` written to `path` whole or not at all (the sample grids of training runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        make_grid(images, num_columns).save(tmp, format="PNG")
