"""A folder of captioned images -> WebDataset tar shards that `ldm.data.loader.image_text_dataset` reads.

Captions follow one of two conventions, chosen per folder:

- a same-name `.txt` beside each image (`cat.png` + `cat.txt`), in the folder or any subfolder, as
  kohya's sd-scripts and AUTOMATIC1111 read them;
- a `metadata.jsonl` or `metadata.csv` at the top of the folder, the Hugging Face `imagefolder`
  convention: one row per image, `file_name` (its path relative to the folder) and the caption under
  `text` or `caption`. Images the file does not list have no caption; `.txt` files are not read.

Each image is turned upright by its EXIF orientation, converted to 8-bit RGB (`loader.to_rgb`:
transparency over white, 16-bit grey scaled, palette and CMYK converted) and, with `max_side`,
downscaled so that its longer side is at most `max_side` pixels: never upscaled and never cropped,
since fine-tuning buckets images by aspect ratio. Sample `KEY` is stored as `KEY.png` (or `KEY.jpg`),
`KEY.txt` (the caption) and `KEY.json` (`caption`, `file_name`, `width` / `height` as stored, which
fine-tuning buckets by without decoding, and `original_width` / `original_height`: the upright size in
pixels before downscaling). Keys come from the relative paths,
so an image keeps its key when others are added; samples go in sorted path order, `shard_size` per
shard, into `OUT/shard-000000.tar`, `OUT/shard-000001.tar`, ...

Images that do not decode and images without a caption are skipped and reported with the reason.
Every shard is written under a temporary name and all are renamed together at the end, so a run that
fails or is interrupted leaves the output folder's shards as they were.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps
from tqdm import tqdm

from ldm.data.loader import to_rgb
from ldm.errors import InputError
from ldm.files import add_tar_member, atomic_write, check_output_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # matched case-insensitively
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")  # Hugging Face datasets use either; the first present is read
TEXT_ENCODING = "utf-8-sig"  # UTF-8 that drops the byte order mark Windows editors may start a file with
FORMATS = ("png", "jpg")
DEFAULT_SHARD_SIZE = 1000  # samples per shard
SHARD_GLOB = "shard-" + "[0-9]" * 6 + ".tar"  # the names shard_name gives
NEEDS_CAPTIONS = ("put a same-name .txt beside each image (cat.png, cat.txt), or a metadata.jsonl / metadata.csv "
                  "with file_name and text (or caption) columns")


def shard_name(index: int) -> str:
    """The file name of shard number `index`."""
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class Source:
    """One captioned image: `relative` is its POSIX path in the input folder."""

    relative: str
    path: Path
    caption: str


@dataclass
class ShardReport:
    """What a run wrote (`shards`, `num_samples`) and what it skipped: (relative path, reason), in path order."""

    shards: list[Path]
    num_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def urls(self) -> str:
        """The shards as one brace pattern, as `image_text_dataset` and `data.urls` take them."""
        if len(self.shards) == 1:
            return str(self.shards[0])
        return str(self.shards[0].parent / f"shard-{{000000..{len(self.shards) - 1:06d}}}.tar")

    def summary(self) -> str:
        """The report as printed at the end of a run: what was written, then each skipped file and why."""
        lines = [f"wrote {self.num_samples} sample(s) in {len(self.shards)} shard(s): {self.urls}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines += [f"  {relative}: {reason}" for relative, reason in self.skipped]
        return "\n".join(lines)


def sample_key(relative: str) -> str:
    """The sample key of the image at POSIX path `relative`: the path with every character but ASCII letters,
    digits, `_` and `-` replaced by `_` (webdataset ends a key at the first dot of a member's name), then 8 hex
    digits of its sha1, which keep apart the paths that the replacement merges (`a.png`, `a.jpg`, `a_png`)."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", relative)
    return f"{readable}-{hashlib.sha1(relative.encode()).hexdigest()[:8]}"


def _image_files(folder: Path) -> dict[str, Path]:
    # Hidden files and folders are left out: tools keep copies there (.ipynb_checkpoints), and macOS
    # writes "._cat.png" metadata files that are not images.
    found = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not any(
                part.startswith(".") for part in relative.parts):
            found[relative.as_posix()] = path
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _metadata_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each row of a metadata.jsonl or metadata.csv; InputError for a malformed file."""
    text = _read_text(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if "file_name" not in columns or not any(column in columns for column in CAPTION_COLUMNS):
            raise InputError(f"{path} has columns {columns}; it needs file_name and a caption column, text or "
                             "caption")
        for row in reader:
            yield reader.line_num, row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {number} is not valid JSON ({e.msg}); write one JSON object per "
                             "line") from None
        if not isinstance(row, dict) or "file_name" not in row or not any(key in row for key in CAPTION_COLUMNS):
            raise InputError(f"{path} line {number} lacks file_name or a caption (text or caption); every line "
                             'needs both, e.g. {"file_name": "cat.png", "text": "a cat"}')
        yield number, row


def _metadata_captions(path: Path) -> dict[str, str]:
    """Relative POSIX path -> caption (stripped, maybe empty) from a metadata file."""
    captions: dict[str, str] = {}
    for number, row in _metadata_rows(path):
        relative = PurePosixPath(str(row["file_name"])).as_posix()  # "./cat.png" and "cat.png" are one file
        if relative in captions:
            raise InputError(f"{path} lists {relative} twice (again at line {number}); give each image one row")
        caption = next((row[key] for key in CAPTION_COLUMNS if row.get(key) is not None), "")
        captions[relative] = str(caption).strip()
    return captions


def _txt_caption(image: Path) -> tuple[str, str]:
    """The caption in the same-name .txt beside `image`, and "", or "" and why it has none."""
    caption_file = image.with_suffix(".txt")
    try:
        caption = caption_file.read_text(encoding=TEXT_ENCODING).strip()
    except FileNotFoundError:
        return "", f"no caption: {caption_file.name} not found"
    except UnicodeDecodeError as e:  # one caption file in another encoding costs its image, not the run
        return "", f"{caption_file.name} is not UTF-8 text ({e.reason} at byte {e.start})"
    return caption, "" if caption else f"empty caption in {caption_file.name}"


def find_sources(folder: str | Path) -> tuple[list[Source], list[tuple[str, str]]]:
    """The captioned images in `folder`, sorted by relative path, and the images skipped for want of a
    caption, with the reason. InputError when the folder is missing, holds no image, no image has a
    caption, or a metadata file is malformed."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder} not found; give the folder that holds the images")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the folder that holds the images")
    metadata = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(metadata) > 1:
        raise InputError(f"{folder} holds both {METADATA_FILES[0]} and {METADATA_FILES[1]}; keep one")
    images = _image_files(folder)
    sources, skipped = [], []
    if metadata:
        captions = _metadata_captions(metadata[0])
        for relative in sorted(images.keys() | captions.keys()):
            if relative not in images and not (folder / relative).is_file():
                skipped.append((relative, f"listed in {metadata[0].name} but not found"))
            elif relative not in captions:
                skipped.append((relative, f"no caption: not listed in {metadata[0].name}"))
            elif not captions[relative]:
                skipped.append((relative, f"empty caption in {metadata[0].name}"))
            else:
                sources.append(Source(relative, folder / relative, captions[relative]))
    else:
        for relative, path in sorted(images.items()):
            caption, problem = _txt_caption(path)
            if problem:
                skipped.append((relative, problem))
            else:
                sources.append(Source(relative, path, caption))
    if not images and not sources:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    if not sources:
        raise InputError(f"none of the {len(images)} images in {folder} has a caption: {NEEDS_CAPTIONS}")
    return sources, skipped


def load_upright_rgb(path: Path, max_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """The image at `path` turned upright by its EXIF orientation, as 8-bit RGB, downscaled (Lanczos) so that
    its longer side is at most `max_side` pixels; and its upright (width, height) before downscaling."""
    with Image.open(path) as image:
        rgb = to_rgb(ImageOps.exif_transpose(image))
    # The pixels are stored and read as they are: a source's ICC profile (a CMYK one, say) would describe
    # other pixels, and a transparency key would hide some.
    rgb.info = {}
    original = rgb.size
    if max_side is not None and max(original) > max_side:
        scale = max_side / max(original)
        target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    return rgb, original


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _samples(sources: list[Source], max_side: int | None, fmt: str, quality: int, skipped: list[tuple[str, str]],
             progress: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each source that decodes; the others are appended to `skipped`."""
    for source in tqdm(sources, unit="img", desc="shards", disable=not progress):
        try:
            image, (width, height) = load_upright_rgb(source.path, max_side)
        except Exception as e:  # PIL reports bad data through many exception types
            skipped.append((source.relative, f"does not decode ({type(e).__name__}: {e})"))
            continue
        meta = {"caption": source.caption, "file_name": source.relative, "original_width": width,
                "original_height": height, "width": image.width, "height": image.height}
        yield sample_key(source.relative), {
            fmt: _encode(image, fmt, quality),
            "txt": source.caption.encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }


def make_shards(
    folder: str | Path,
    out: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int | None = None,
    fmt: str = "png",
    quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardReport:
    """Write the captioned images of `folder` as shards `out/shard-000000.tar`, ... (see the module docstring).

    `shard_size`: samples per shard; `max_side`: longest side in pixels (None keeps the size); `fmt`: png
    (lossless) or jpg at `quality` (1-100). An `out` that holds anything is refused unless `overwrite`,
    which replaces the shards there and removes the old ones this run does not write; other files stay.
    InputError, with nothing written, for bad options, a bad folder (`find_sources`), or when no image
    decodes.
    """
    if shard_size < 1:
        raise InputError(f"--shard_size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise InputError(f"--max_side must be >= 1, got {max_side}")
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise InputError(f"--quality must be in [1, 100], got {quality}")
    sources, skipped = find_sources(folder)
    out = check_output_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} is not empty; pass --overwrite to replace its shards, or choose another "
                         "folder")

    samples = _samples(sources, max_side, fmt, quality, skipped, progress)
    shards: list[Path] = []
    num_samples = 0
    # Each shard's temporary file is renamed only when the stack closes after the last one: all or nothing.
    with contextlib.ExitStack() as renames:
        for first in samples:  # each pass takes the next sample and up to shard_size - 1 more
            out.mkdir(parents=True, exist_ok=True)  # only now: a run where no image decodes creates nothing
            shards.append(out / shard_name(len(shards)))
            with tarfile.open(renames.enter_context(atomic_write(shards[-1])), "w") as tar:
                for key, members in itertools.chain([first], itertools.islice(samples, shard_size - 1)):
                    for extension, data in members.items():
                        add_tar_member(tar, f"{key}.{extension}", data)
                    num_samples += 1
    skipped.sort()
    if not shards:
        relative, reason = skipped[0]
        raise InputError(f"none of the images in {folder} could be read ({len(skipped)} skipped, e.g. {relative}: "
                         f"{reason}); nothing written")
    for old in out.glob(SHARD_GLOB):
        if old not in shards:
            old.unlink()
    return ShardReport(shards, num_samples, skipped)
