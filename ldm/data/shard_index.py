"""Random access to the samples of WebDataset tar shards: fine-tuning data sets that fit an index.

Fine-tuning sets are small (a dozen to some thousands of images), so instead of streaming the shards
the run lists them once: for every sample, where its image bytes lie in which tar, its caption and its
size (from the `.json` that scripts/make_shards.py writes, else from the image header). A batch is then
any list of sample numbers, drawn from the step's seed, which makes a resumed run read exactly what an
uninterrupted one would, and lets each batch come from one aspect-ratio bucket.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from ldm.data.loader import IMAGE_EXTENSIONS, _caption, _expand_urls, _open_rgb
from ldm.errors import InputError


@dataclass(frozen=True)
class IndexedSample:
    """One sample: its image's bytes at `offset` (`length` bytes) in `shard`, caption and size in pixels."""

    shard: str
    offset: int
    length: int
    caption: str
    width: int
    height: int


class ShardIndex:
    """Indexed samples, read with `image`: those of tar shards (`read`), or of image files (`of_files`)."""

    def __init__(self, samples: list[IndexedSample], shards: list[str], num_skipped: int = 0) -> None:
        self.samples, self.shards, self.num_skipped = samples, shards, num_skipped

    @classmethod
    def read(cls, urls: str | list[str]) -> ShardIndex:
        """The usable samples of `urls` (local tar paths, globs or brace patterns), in shard and member order.

        A sample without an image or a caption, or whose image does not open, is skipped and counted in
        `num_skipped`; shards with no usable sample at all are an InputError.
        """
        patterns = [urls] if isinstance(urls, str) else list(urls)
        shards = _expand_urls([path for pattern in patterns for path in sorted(glob.glob(pattern)) or [pattern]])
        if remote := [url for url in shards if url.startswith("pipe:") or "://" in url]:
            raise InputError(f"fine-tuning reads local shards, not {remote[0]}; copy them to a local folder")
        index = cls([], shards)
        for shard in shards:
            index._add_shard(shard)
        if not index.samples:
            raise InputError(f"no usable sample in {len(shards)} shard(s) ({shards[0]}): "
                             f"{index.num_skipped} skipped (no image, no caption or an image that does not open); "
                             "write shards with scripts/make_shards.py")
        return index

    @classmethod
    def of_files(cls, paths: list[Path], caption: str) -> ShardIndex:
        """Image files, all with `caption` (an image file is a "shard" of one sample at offset 0)."""
        samples = []
        for path in paths:
            with Image.open(path) as image:
                samples.append(IndexedSample(str(path), 0, path.stat().st_size, caption, *image.size))
        return cls(samples, [str(path) for path in paths])

    def with_caption(self, caption: str) -> ShardIndex:
        """The same samples, every one captioned `caption` (DreamBooth's instance prompt)."""
        return ShardIndex([replace(sample, caption=caption) for sample in self.samples], self.shards,
                          self.num_skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def _add_shard(self, shard: str) -> None:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard) as tar:
                for info in tar:
                    if info.isfile():
                        folder, _, name = info.name.rpartition("/")
                        stem, _, extension = name.partition(".")
                        members.setdefault(f"{folder}/{stem}", {})[extension.lower()] = info
                texts = {(key, ext): tar.extractfile(info).read()
                         for key, parts in members.items() for ext, info in parts.items() if ext in ("txt", "json")}
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"cannot read shard {shard}: {e}") from None
        with open(shard, "rb") as file:
            for key, parts in members.items():
                sample = self._sample(shard, file, key, parts, texts)
                if sample is None:
                    self.num_skipped += 1
                else:
                    self.samples.append(sample)

    @staticmethod
    def _sample(shard: str, file: io.BufferedReader, key: str, parts: dict[str, tarfile.TarInfo],
                texts: dict[tuple[str, str], bytes]) -> IndexedSample | None:
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if extension is None:
            return None
        raw = {ext: texts[key, ext] for ext in ("txt", "json") if (key, ext) in texts}
        try:
            caption = _caption(raw)
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not caption:
            return None
        info = parts[extension]
        size = (meta.get("width"), meta.get("height")) if isinstance(meta, dict) else (None, None)
        if not all(isinstance(side, int) and side > 0 for side in size):
            file.seek(info.offset_data)
            try:
                with Image.open(io.BytesIO(file.read(info.size))) as image:
                    size = image.size
            except Exception:  # PIL reports bad data through many exception types
                return None
        return IndexedSample(shard, info.offset_data, info.size, caption, *size)

    def image(self, index: int) -> Image.Image:
        """Sample `index`'s image as 8-bit RGB, at its full size."""
        sample = self.samples[index]
        with open(sample.shard, "rb") as file:
            file.seek(sample.offset)
            data = file.read(sample.length)
        return _open_rgb(data, max(sample.width, sample.height))
