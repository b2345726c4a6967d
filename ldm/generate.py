"""Writing generated images: never overwriting, never half-written, each PNG carrying how it was made."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.errors import InputError
from ldm.files import atomic_write, check_output_folder
from ldm.images import UNREADABLE, reason
from ldm.infotext import format_infotext, read_infotext
from ldm.settings import FIELDS, GenerationSettings, from_text

# The checkpoint txt2img uses when no --ckpt is given (shipped inside the package).
BUNDLED_CHECKPOINT = Path(__file__).parent / "weights" / "shapes-v1.safetensors"


def prepare_outdir(outdir: str | Path) -> Path:
    """Check that files can be written to `outdir`, before any slow work; it is created by the first
    `save_png`, so a run that fails leaves no empty folder behind."""
    outdir = Path(outdir)
    try:
        if outdir.is_dir():
            with tempfile.NamedTemporaryFile(dir=outdir, prefix=".write-check-"):
                pass
        else:
            check_output_folder(outdir, "--outdir")
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
    outdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=outdir, prefix=".tmp-", suffix=".png")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; images follow the umask
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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def image_text(settings: GenerationSettings, index: int, image: Image.Image, model: str,
               model_file: str, model_text: dict[str, str] | None = None, model_hash: str = "",
               extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The PNG text of image `index` of a batch made with `settings`: its settings, its size and the model
    (`model_text`: what changed its weights, e.g. `Pipeline.model_text()`'s LoRA hashes), and the same as
    A1111 infotext (`parameters`, with `model_hash`, the start of the checkpoint's sha256, and `extra` pairs)."""
    model_text = model_text or {}
    extra = {"Lora hashes": model_text.get("lora_hashes"), "TI hashes": model_text.get("embeddings"), **(extra or {})}
    return {**settings.to_text(index), "height": str(image.height), "width": str(image.width), "model": model,
            "model_file": model_file, **model_text, "batch_index": str(index),
            "parameters": format_infotext(settings, index, image.width, image.height, model, model_hash, extra)}


def read_image_text(png: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """What `image_text` wrote into `png`, or where only that is there, its A1111 infotext: the settings that
    remake its whole batch, and the other text (model, model_file or model_hash, batch_index, ...)."""
    try:
        with Image.open(png) as image:
            text = dict(getattr(image, "text", {}))
    except UNREADABLE as e:
        raise InputError(f"cannot read {png} to replay it: {reason(e)} (pass a PNG written by txt2img)") from None
    own = "prompt" in text and "seed" in text
    if not own and "parameters" not in text:
        raise InputError(f"{png} has no generation metadata (prompt, seed, ...); pass a PNG written by txt2img "
                         "or A1111, not a grid")
    try:
        if own:
            settings, other = from_text(text), {key: value for key, value in text.items() if key not in FIELDS}
        else:  # only A1111's infotext, e.g. an image made by A1111 or by our server
            settings, other = read_infotext(text["parameters"])
        batch_index = int(other.get("batch_index", 0))
    except (InputError, ValueError) as e:
        raise InputError(f"{png}: {e}") from None
    # Row k of a batch can differ from the same image made alone in the last bit (batched kernels round
    # differently), so the whole batch is made again, from its first seed, and row k kept.
    settings["seed"] -= batch_index
    return settings, other


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
