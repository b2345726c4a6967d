"""shapes-v1: the built-in procedurally generated text-image dataset.

Implements /work/shared/specs/shapes-v1.md. Every sample is a 64 x 64 RGB image of one filled
shape on a solid background plus a caption; sample `index` of `split` is a pure function of
(split, index).

Per sample, a dedicated `numpy.random.Generator` is seeded with
`SeedSequence([crc32("shapes-v1"), crc32(split), index])` and draws, in this order:
  1. colour then shape, each uniform; in `train` and `val` both are drawn again until the pair
     is not held out (so the result is uniform over the 22 allowed pairs); in `heldout` one of
     the two held-out pairs is picked uniformly instead;
  2. size, position, background, jitter dx, jitter dy, each uniform;
  3. the training caption: canonical with probability 1/2, else one of `PARTIAL_FORMS`, uniform.

Captions by split: `train` uses the training caption; `val` and `heldout` are for evaluation and
use the canonical caption. Both captions are always available in the sample's metadata.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ldm.files import add_tar_member, atomic_write

DATASET_NAME = "shapes-v1"
IMAGE_SIZE = 64  # px, output images are IMAGE_SIZE x IMAGE_SIZE
RENDER_SCALE = 4  # drawn at 4x then box-downsampled, which anti-aliases the edges

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 16, "large": 32}  # bounding-box side in px at 64 x 64
POSITIONS: dict[str, tuple[int, int]] = {  # bounding-box centre (x, y) in px at 64 x 64
    "center": (32, 32),
    "top left": (20, 20),
    "top right": (44, 20),
    "bottom left": (20, 44),
    "bottom right": (44, 44),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
MAX_JITTER = 3  # px, each centre coordinate moves by a uniform integer in [-3, 3]
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("orange", "square"))
SPLITS: tuple[str, ...] = ("train", "val", "heldout")
# Attribute name -> its values, in caption order.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
ATTRIBUTES: tuple[str, ...] = tuple(VOCABULARY)

CANONICAL_FORM = "a {size} {color} {shape} in the {position} on a {background} background"
# Every way of leaving out some of size, position and background (colour and shape stay named).
PARTIAL_FORMS: tuple[str, ...] = (
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} in the {position}",
    "a {color} {shape} on a {background} background",
    "a {size} {color} {shape} in the {position}",
    "a {size} {color} {shape} on a {background} background",
    "a {color} {shape} in the {position} on a {background} background",
)
CANONICAL_CAPTION_PROB = 0.5
DEFAULT_SAMPLES_PER_SHARD = 1000


@dataclass(frozen=True)
class ShapeSample:
    """Attributes of one sample; `dx`, `dy` are the centre jitter in px at 64 x 64."""

    color: str
    shape: str
    size: str
    position: str
    background: str
    dx: int = 0
    dy: int = 0

    def __post_init__(self) -> None:
        for name, allowed in VOCABULARY.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        for name in ("dx", "dy"):
            if abs(getattr(self, name)) > MAX_JITTER:
                raise ValueError(
                    f"{name}={getattr(self, name)} must lie in [-{MAX_JITTER}, {MAX_JITTER}]"
                )

    @property
    def center(self) -> tuple[int, int]:
        """Bounding-box centre (x, y) in px at 64 x 64, jitter included."""
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy

    def bbox(self) -> tuple[int, int, int, int]:
        """Bounding box (left, top, right, bottom) in px at 64 x 64; right and bottom exclusive."""
        x, y = self.center
        half = SIZES[self.size] // 2
        return x - half, y - half, x + half, y + half


def render(attrs: ShapeSample) -> Image.Image:
    """Draw one sample as a 64 x 64 RGB image."""
    scale = RENDER_SCALE
    canvas = Image.new("RGB", (IMAGE_SIZE * scale,) * 2, BACKGROUNDS[attrs.background])
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = (v * scale for v in attrs.bbox())
    fill = COLORS[attrs.color]
    # PIL boxes and polygons include their last row and column, hence the -1.
    if attrs.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif attrs.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:
        # A two-pixel apex (half a pixel after downsampling) keeps the triangle mirror-symmetric;
        # PIL would round a single apex at a half-pixel coordinate to one side.
        mid = (left + right) // 2
        apex_and_base = [(mid - 1, top), (mid, top), (right - 1, bottom - 1), (left, bottom - 1)]
        draw.polygon(apex_and_base, fill=fill)
    return canvas.reduce(scale)


def format_caption(attrs: ShapeSample, form: str = CANONICAL_FORM) -> str:
    """Fill a caption template (`CANONICAL_FORM` or one of `PARTIAL_FORMS`) with `attrs`."""
    return form.format(**asdict(attrs))


def canonical_caption(attrs: ShapeSample) -> str:
    """The evaluation caption, naming all five attributes."""
    return format_caption(attrs, CANONICAL_FORM)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; use one of {list(SPLITS)}")


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise ValueError(f"sample index must be a non-negative integer, got {index!r}")


def _rng(split: str, index: int) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process.
    entropy = [zlib.crc32(DATASET_NAME.encode()), zlib.crc32(split.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _choice(rng: np.random.Generator, options: tuple | dict) -> str:
    keys = list(options)
    return keys[int(rng.integers(len(keys)))]


def sample_attributes(split: str, index: int) -> tuple[ShapeSample, str]:
    """Draw the attributes and the training caption of sample `index` of `split`, no rendering."""
    _check_split(split)
    _check_index(index)
    rng = _rng(split, index)
    if split == "heldout":
        color, shape = HELDOUT_PAIRS[int(rng.integers(len(HELDOUT_PAIRS)))]
    else:
        while True:
            color, shape = _choice(rng, COLORS), _choice(rng, SHAPES)
            if (color, shape) not in HELDOUT_PAIRS:
                break
    attrs = ShapeSample(
        color=color,
        shape=shape,
        size=_choice(rng, SIZES),
        position=_choice(rng, POSITIONS),
        background=_choice(rng, BACKGROUNDS),
        dx=int(rng.integers(-MAX_JITTER, MAX_JITTER + 1)),
        dy=int(rng.integers(-MAX_JITTER, MAX_JITTER + 1)),
    )
    if rng.random() < CANONICAL_CAPTION_PROB:
        form = CANONICAL_FORM
    else:
        form = _choice(rng, PARTIAL_FORMS)
    return attrs, format_caption(attrs, form)


def sample(split: str, index: int) -> tuple[Image.Image, str, ShapeSample]:
    """Sample `index` of `split` as (64 x 64 RGB image, caption, attributes).

    The caption is the training caption for `train` and the canonical one for `val`/`heldout`.
    """
    attrs, training_caption = sample_attributes(split, index)
    caption = training_caption if split == "train" else canonical_caption(attrs)
    return render(attrs), caption, attrs


def sample_key(split: str, index: int) -> str:
    """WebDataset key of a sample (no dots, unique across splits)."""
    return f"{split}-{index:08d}"


def iterate(split: str, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Stream samples `start` .. `stop - 1` (endless if `stop` is None) without touching disk.

    Yields dicts with `key`, `index`, `image` (PIL, 64 x 64 RGB), `caption` (as in `sample`),
    `canonical_caption`, `training_caption` and `attrs` (`ShapeSample`).
    """
    _check_split(split)
    _check_index(start)
    if stop is not None and stop < start:
        raise ValueError(f"stop ({stop}) must be >= start ({start}) or None")
    indices = itertools.count(start) if stop is None else range(start, stop)
    for index in indices:
        attrs, training_caption = sample_attributes(split, index)
        canonical = canonical_caption(attrs)
        yield {
            "key": sample_key(split, index),
            "index": index,
            "image": render(attrs),
            "caption": training_caption if split == "train" else canonical,
            "canonical_caption": canonical,
            "training_caption": training_caption,
            "attrs": attrs,
        }


def shard_name(split: str, shard: int) -> str:
    """File name of shard number `shard` of `split`."""
    return f"{DATASET_NAME}-{split}-{shard:06d}.tar"


def _write_shard(
    path: Path, split: str, indices: range, progress: Callable[[int], object] | None
) -> None:
    with atomic_write(path) as tmp, tmp.open("wb") as file, tarfile.open(fileobj=file, mode="w") as tar:
        for item in iterate(split, indices.start, indices.stop):
            png = io.BytesIO()
            item["image"].save(png, format="PNG")
            meta = {
                **asdict(item["attrs"]),
                "split": split,
                "index": item["index"],
                "canonical_caption": item["canonical_caption"],
                "training_caption": item["training_caption"],
            }
            key = item["key"]
            add_tar_member(tar, f"{key}.png", png.getvalue())
            add_tar_member(tar, f"{key}.txt", item["caption"].encode())
            add_tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            if progress is not None:
                progress(1)


def write_shards(
    split: str,
    num_samples: int,
    outdir: str | os.PathLike,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    progress: Callable[[int], object] | None = None,
) -> list[Path]:
    """Write samples 0 .. num_samples - 1 of `split` as WebDataset tar shards in `outdir`.

    Each sample becomes `{key}.png`, `{key}.txt` (caption) and `{key}.json` (attributes, split,
    index, canonical and training captions). `progress(1)` is called after each sample written
    (e.g. a tqdm bar's `update`). Returns the shard paths in order.
    """
    _check_split(split)
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("num_samples and samples_per_shard must be positive integers")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        path = outdir / shard_name(split, shard)
        stop = min(start + samples_per_shard, num_samples)
        _write_shard(path, split, range(start, stop), progress)
        paths.append(path)
    return paths
