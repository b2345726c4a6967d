"""The training data path: image-text samples as `{"images": (3, size, size) in [-1, 1], "captions": str}`.

Two sources give the same sample format, so every trainer takes either:

- `image_text_dataset`: LAION-style WebDataset tar shards (local paths, brace patterns, `pipe:` URLs),
  such as `ldm.data.make_shards` writes from a folder of captioned images;
- `shapes_dataset`: the built-in shapes-v1 set, generated on the fly (no disk).

`make_loader` batches them into `{"images": (B, 3, size, size), "captions": list[str], ...}`, and
`Batches` turns those into the endless stream a training run reads.

Distribution. Each process reads its own part of the data: shard `i` goes to rank `i % world_size`,
and within a rank to DataLoader worker `(i // world_size) % num_workers`; shapes-v1 interleaves
sample indices the same way. Do not pass these loaders through `accelerator.prepare`: for an
iterable dataset accelerate would either read everything on rank 0 and dispatch it, or keep only
every `world_size`-th batch of each rank; move batches to the device yourself.

Corrupt data. A sample whose image does not decode, or that lacks an image or a caption, is
skipped and counted; so is a shard that cannot be opened or read to its end (once per failure).
`dataset.num_skipped` is the total for this process and all its DataLoader workers (the counts
live in shared memory); training logs it as `skipped_samples` and prints the total over ranks at the
end. Each worker also logs its first skip and then every `log_every`-th, with the reason. Data that
yields no usable sample at all is an InputError when `Batches` reads its first batch.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.errors import InputError
from ldm.shapes import dataset as shapes

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # looked up in this order; the first present is used
CAPTION_JSON_KEYS = ("caption", "text")  # LAION metadata names the caption either way


class CorruptSampleError(ValueError):
    """A sample that cannot be used: undecodable image, no image, or no caption."""


class SkipCounter:
    """Counts what was skipped as corrupt, for one process and its DataLoader workers.

    One shared-memory slot per worker (slot 0: the process itself when it reads without workers),
    so each slot has a single writer and needs no lock, and the parent process sees the workers'
    counts. Use the bound methods `sample_error` and `shard_error` as webdataset handlers.
    """

    def __init__(self, log_every: int = 100, max_workers: int = 64) -> None:
        self.log_every = log_every
        self.max_workers = max_workers
        self._counts = torch.zeros(max_workers + 1, dtype=torch.int64).share_memory_()

    @property
    def num_skipped(self) -> int:
        """Samples and shard failures skipped so far by this process and its workers."""
        return int(self._counts.sum())

    def _add(self) -> int:
        info = get_worker_info()
        # More workers than slots would share a slot; a lost increment there is the only cost.
        slot = 0 if info is None else 1 + info.id % self.max_workers
        self._counts[slot] += 1
        return int(self._counts[slot])

    def sample_error(self, exn: Exception) -> bool:
        """Handler for the per-sample stage: count and skip a `CorruptSampleError`, re-raise anything else."""
        if not isinstance(exn, CorruptSampleError):
            raise exn
        count = self._add()
        if count == 1 or count % self.log_every == 0:
            logger.warning("skipped corrupt sample: %s (%d skipped by this worker so far)", exn, count)
        return True

    def shard_error(self, exn: Exception) -> bool:
        """Handler for opening and reading shards: a broken shard is logged every time, counted and skipped."""
        count = self._add()
        logger.warning("skipped the rest of a shard: %r (%d skipped by this worker so far)", exn, count)
        return True


def _square_box(width: int, height: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    # The largest square: centred, or at a uniform offset along the long side when a generator is given.
    side = min(width, height)
    slack_x, slack_y = width - side, height - side
    if generator is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        left = int(torch.randint(slack_x + 1, (), generator=generator))
        top = int(torch.randint(slack_y + 1, (), generator=generator))
    return left, top, left + side, top + side


def resize_and_crop(image: Image.Image, size: int, generator: torch.Generator | None = None) -> Image.Image:
    """Scale the shorter side to `size` (bicubic, antialiased) and cut a `size` x `size` square.

    The square is centred, or placed uniformly at random along the long side when `generator` is given.
    Cropping the source box and resizing it in one step gives the same geometry as resize-then-crop
    without rounding the intermediate size.
    """
    box = _square_box(image.width, image.height, generator)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))
    return (pixels / 127.5 - 1).permute(2, 0, 1).contiguous()


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": how Pillow opens some 16-bit grey files


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparent pixels composited over white, 16-bit grey scaled to 8 bits
    (65535 -> 255), greyscale, palette and CMYK converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        # convert() clips these values at 255 instead of scaling them, which turns most pixels white.
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257), 0, 255)
        image = Image.fromarray(grey.astype(np.uint8))  # mode L
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels carry arbitrary (often black) colour; show them on white as a viewer would.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _open_rgb(data: bytes, size: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    # JPEGs can decode at 1/2, 1/4 or 1/8 scale for free; the draft stays at least `size` on both sides.
    image.draft("RGB", (size, size))
    return to_rgb(image)


def _caption(sample: dict[str, Any]) -> str:
    text = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    if not text and "json" in sample:
        meta = json.loads(sample["json"])
        values = [meta.get(key) for key in CAPTION_JSON_KEYS] if isinstance(meta, dict) else []
        text = next((value.strip() for value in values if isinstance(value, str) and value.strip()), "")
    return text


class _ShardSampleDecoder:
    """Raw webdataset sample (bytes by extension) -> `{"images", "captions"}`; raises `CorruptSampleError`."""

    def __init__(self, size: int, random_crop: bool, seed: int, rank: int) -> None:
        self.size = size
        self.random_crop = random_crop
        self.seed = seed
        self.rank = rank
        self._generator: torch.Generator | None = None
        self._pid = -1

    def _crop_generator(self) -> torch.Generator | None:
        if not self.random_crop:
            return None
        # Created in the process that uses it, so forked workers never share a copied generator state.
        if self._pid != os.getpid():
            info = get_worker_info()
            worker = 0 if info is None else info.id
            entropy = np.random.SeedSequence([self.seed, self.rank, worker]).generate_state(1)[0]
            self._generator = torch.Generator().manual_seed(int(entropy))
            self._pid = os.getpid()
        return self._generator

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            raise CorruptSampleError(f"{where}: no image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        try:
            caption = _caption(sample)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptSampleError(f"{where}: unreadable caption ({e})") from e
        if not caption:
            raise CorruptSampleError(f"{where}: no caption (txt, or json with {' / '.join(CAPTION_JSON_KEYS)})")
        try:
            image = _open_rgb(sample[extension], self.size)
        except Exception as e:  # PIL reports bad data through many exception types
            raise CorruptSampleError(f"{where}: {extension} does not decode ({type(e).__name__}: {e})") from e
        image = resize_and_crop(image, self.size, self._crop_generator())
        return {"images": to_tensor(image), "captions": caption}


def _split_by_rank(src: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    yield from itertools.islice(src, rank, None, world_size)


def _expand_urls(urls: str | list[str]) -> list[str]:
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]
    if not expanded:
        raise InputError("no shards given: pass a path, a brace pattern like shards-{000000..000009}.tar, or a list")
    missing = [url for url in expanded if not url.startswith("pipe:") and "://" not in url and not Path(url).is_file()]
    if missing:
        raise InputError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}; check the path or brace pattern")
    return expanded


class ImageTextDataset(IterableDataset):
    """Samples `{"images": (3, size, size) in [-1, 1], "captions": str, "__key__": str}` from image-text shards.

    Built by `image_text_dataset`; webdataset adds `__key__`, the sample's name in its shard. `shards`
    lists all shards (every rank's); `num_skipped` counts the corrupt samples and shard failures
    skipped by this process and its DataLoader workers.
    """

    def __init__(self, pipeline: IterableDataset, shards: list[str], skips: SkipCounter) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.shards = shards
        self.skips = skips

    @property
    def num_skipped(self) -> int:
        return self.skips.num_skipped

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.pipeline)


def image_text_dataset(
    urls: str | list[str],
    size: int,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    repeat: bool = True,
    random_crop: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    log_every: int = 100,
) -> ImageTextDataset:
    """Stream `{"images": (3, size, size) in [-1, 1], "captions": str}` from LAION-style WebDataset shards.

    A sample is an image (`jpg`, `jpeg`, `png` or `webp`) with a caption from `txt` or from `json`
    (`caption` or `text` key). `urls`: a path, a brace pattern (`shards-{000000..000009}.tar`), a
    `pipe:COMMAND` URL, or a list of these. Images are resized (shorter side to `size`, bicubic,
    antialiased) and centre-cropped, or cropped at a random offset when `random_crop`.

    Shards are split over ranks, then over DataLoader workers. `rank`/`world_size` default to the
    launcher's (RANK / WORLD_SIZE, else torch.distributed), read here in the main process because
    DataLoader workers may not see an initialised process group. `seed` fixes shard order, sample
    shuffling (buffer of `shuffle_buffer` samples; 0 keeps shard order) and random crops; vary it
    (e.g. with the step) when resuming. `repeat` cycles over this rank's shards forever. Corrupt
    samples are skipped and counted in `num_skipped` (see the module docstring).
    """
    if size <= 0 or shuffle_buffer < 0 or log_every <= 0:
        raise InputError(f"size and log_every must be positive and shuffle_buffer >= 0, got {size}, "
                         f"{log_every}, {shuffle_buffer}")
    if (rank is None) != (world_size is None):
        raise InputError("give both rank and world_size, or neither to read them from the launcher")
    if rank is None or world_size is None:
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if not 0 <= rank < world_size:
        raise InputError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    shards = _expand_urls(urls)
    if len(shards) < world_size:
        # A rank without shards would stop early and leave the others waiting in the next collective.
        raise InputError(f"{len(shards)} shard(s) for {world_size} processes: write at least one shard per process")

    skips = SkipCounter(log_every=log_every)
    pipeline = wds.WebDataset(
        shards,
        handler=skips.shard_error,
        shardshuffle=len(shards) if shuffle_buffer > 0 else False,
        detshuffle=True,  # each worker's shard order is a function of (seed, epoch)
        seed=seed,
        nodesplitter=functools.partial(_split_by_rank, rank=rank, world_size=world_size),
        workersplitter=wds.split_by_worker,
        empty_check=False,  # a worker left without shards simply ends; the others go on
    )
    if shuffle_buffer > 0:
        pipeline = pipeline.compose(wds.detshuffle(shuffle_buffer, seed=seed))
    pipeline = pipeline.map(_ShardSampleDecoder(size, random_crop, seed, rank), handler=skips.sample_error)
    if repeat:
        pipeline = pipeline.repeat()
    return ImageTextDataset(pipeline, shards, skips)


class ShapesDataset(IterableDataset):
    """shapes-v1 samples of one rank, generated on the fly; built by `shapes_dataset`."""

    num_skipped = 0  # generated samples are never corrupt; kept for the same interface as ImageTextDataset

    def __init__(self, split: str, size: int, rank: int, world_size: int, start: int, stop: int | None) -> None:
        super().__init__()
        self.split = split
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.stop = stop

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Rounds of world_size * num_workers consecutive indices: after n rounds every reader has
        # consumed the same number of samples and together they cover start .. start + n * stride - 1.
        stride = self.world_size * num_workers
        first = self.start + self.rank * num_workers + worker
        indices = itertools.count(first, stride) if self.stop is None else range(first, self.stop, stride)
        for index in indices:
            image, caption, attrs = shapes.sample(self.split, index)
            yield {
                "images": to_tensor(resize_and_crop(image, self.size)),
                "captions": caption,
                "canonical_captions": shapes.canonical_caption(attrs),
                "indices": index,
            }


def shapes_dataset(
    split: str = "train",
    size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    stop: int | None = None,
) -> ShapesDataset:
    """Stream shapes-v1 `split` without disk, as `{"images", "captions", "canonical_captions", "indices"}`.

    `images`: (3, size, size) in [-1, 1] (64 x 64 renders, resized if `size` != 64); `captions`: the
    training caption for `train`, the canonical one for `val`/`heldout`; `canonical_captions`: always
    the canonical one; `indices`: the sample index. Reader `rank * num_workers + worker` (of
    `world_size * num_workers`) takes indices `start + reader + k * world_size * num_workers`, so
    all readers are disjoint and together read `start, start + 1, ...`. Endless unless `stop`
    (exclusive) is given. To resume, pass `start` = samples consumed by all ranks together
    (exact when the number of batches drawn per rank is a multiple of num_workers).
    """
    if split not in shapes.SPLITS:
        raise InputError(f"split {split!r} is unknown; use one of {list(shapes.SPLITS)}")
    if size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise InputError(f"need size > 0 and 0 <= rank < world_size, got size={size}, rank={rank}, "
                         f"world_size={world_size}")
    if start < 0 or (stop is not None and stop < start):
        raise InputError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    return ShapesDataset(split, size, rank, world_size, start, stop)


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors into (B, ...), turn ints into a (B,) int64 tensor, keep anything else (captions) as a list."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    return batch


def make_loader(dataset: IterableDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches `{"images": (B, 3, size, size), "captions": list[str], ...}` from either dataset.

    Each batch comes from one worker. Use it as is, not through `accelerator.prepare` (see the module docstring).
    """
    if batch_size <= 0 or num_workers < 0:
        raise InputError(f"need batch_size > 0 and num_workers >= 0, got {batch_size} and {num_workers}")
    # Persistent workers keep their place (and shuffle epoch) when a finite dataset is iterated again.
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples,
                      persistent_workers=num_workers > 0)


class Batches:
    """The batches of `loader` (over `dataset`) as the endless iterator a training run reads. The first is
    read at once, so data without a usable sample fails before a run writes anything; an end of the data
    (a repeated stream ends only when a whole pass yields nothing) is an InputError that counts the skips."""

    def __init__(self, loader: Iterable[dict[str, Any]], dataset: IterableDataset) -> None:
        self._batches = iter(loader)
        self._dataset = dataset
        self._first: dict[str, Any] | None = self._read()

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        batch, self._first = self._first, None
        return self._read() if batch is None else batch

    def _read(self) -> dict[str, Any]:
        try:
            return next(self._batches)
        except StopIteration:
            shards = getattr(self._dataset, "shards", [])
            where = f"{len(shards)} shard(s) ({shards[0]}{', ...' if len(shards) > 1 else ''})" if shards else "data"
            raise InputError(f"no usable sample in {where}: {getattr(self._dataset, 'num_skipped', 0)} skipped as "
                             "corrupt, the warnings say why; check the data") from None
