"""Training data path: WebDataset shards and streamed shapes-v1, checked against the generator and closed forms."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ldm.data.loader import image_text_dataset, make_loader, shapes_dataset
from ldm.shapes import dataset as shapes
from tests.conftest import write_tar

NUM_SHAPES = 12
PER_SHARD = 3  # -> 4 shards


def reference_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB -> (3, H, W) in [-1, 1], written out independently of the loader."""
    return torch.tensor(np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 127.5 - 1, dtype=torch.float32)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def keys(dataset) -> list[str]:
    return [sample["__key__"] for sample in dataset]


@pytest.fixture(scope="module")
def shape_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    shapes.write_shards("train", NUM_SHAPES, folder, samples_per_shard=PER_SHARD)
    return folder


def brace(folder: Path) -> str:
    return str(folder / "shapes-v1-train-{000000..000003}.tar")


def mixed_members(prefix: str = "") -> list[tuple[str, bytes]]:
    """Three good samples (jpg + json caption, webp + json text, transparent png + txt) and two bad ones."""
    red = Image.new("RGB", (40, 40), (220, 30, 30))
    blue = Image.new("RGB", (50, 30), (30, 70, 220))
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    return [
        (f"{prefix}a.jpg", encode(red, "JPEG", quality=95)),
        (f"{prefix}a.json", json.dumps({"caption": "red square", "width": 40}).encode()),
        (f"{prefix}b.webp", encode(blue, "WEBP", lossless=True)),
        (f"{prefix}b.json", json.dumps({"text": "blue"}).encode()),
        (f"{prefix}c.png", encode(clear, "PNG")),
        (f"{prefix}c.txt", b"clear\n"),
        (f"{prefix}d.jpg", encode(red, "JPEG")[:20] + b"garbage"),  # undecodable image
        (f"{prefix}d.txt", b"broken"),
        (f"{prefix}e.png", encode(red, "PNG")),
        (f"{prefix}e.json", json.dumps({"url": "http://example.com/e.png"}).encode()),  # no caption
    ]


def test_shapes_shards_match_generator(shape_shards):
    dataset = image_text_dataset(brace(shape_shards), size=64, shuffle_buffer=0, repeat=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [shapes.sample_key("train", i) for i in range(NUM_SHAPES)]
    for index, sample in enumerate(samples):
        image, caption, _ = shapes.sample("train", index)
        assert sample["images"].shape == (3, 64, 64) and sample["images"].dtype == torch.float32
        torch.testing.assert_close(sample["images"], reference_tensor(image), rtol=0, atol=1e-6)
        assert sample["captions"] == caption
    assert dataset.num_skipped == 0


def test_list_and_pipe_urls_read_the_same_samples(shape_shards):
    paths = sorted(str(p) for p in shape_shards.glob("*.tar"))
    expected = keys(image_text_dataset(brace(shape_shards), size=16, shuffle_buffer=0, repeat=False))
    assert keys(image_text_dataset(paths, size=16, shuffle_buffer=0, repeat=False)) == expected
    piped = [f"pipe:cat {p}" for p in paths]
    assert keys(image_text_dataset(piped, size=16, shuffle_buffer=0, repeat=False)) == expected


def test_formats_captions_and_corrupt_samples_counted(tmp_path, caplog):
    shard = write_tar(tmp_path / "mixed.tar", mixed_members())
    dataset = image_text_dataset(str(shard), size=16, shuffle_buffer=0, repeat=False)
    with caplog.at_level(logging.WARNING, logger="ldm.data.loader"):
        samples = {s["captions"]: s["images"] for s in dataset}
    assert sorted(samples) == ["blue", "clear", "red square"]
    assert dataset.num_skipped == 2
    assert "d" in caplog.text and "does not decode" in caplog.text
    for caption, rgb in [("red square", (220, 30, 30)), ("blue", (30, 70, 220)), ("clear", (255, 255, 255))]:
        expected = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 16, 16) / 127.5 - 1
        assert samples[caption].shape == (3, 16, 16)
        torch.testing.assert_close(samples[caption], expected, rtol=0, atol=0.05)  # JPEG is lossy


def test_skips_counted_across_dataloader_workers(tmp_path):
    shards = [str(write_tar(tmp_path / f"mixed-{i}.tar", mixed_members(f"s{i}-"))) for i in range(2)]
    dataset = image_text_dataset(shards, size=8, shuffle_buffer=0, repeat=False)
    batches = list(make_loader(dataset, batch_size=2, num_workers=2))
    assert sorted(c for b in batches for c in b["captions"]) == sorted(["blue", "clear", "red square"] * 2)
    assert dataset.num_skipped == 4  # read in the parent, counted in the workers


def test_truncated_shard_is_skipped_not_fatal(tmp_path, shape_shards):
    whole = shape_shards / shapes.shard_name("train", 0)
    with tarfile.open(whole) as tar:
        second_png = tar.getmember(shapes.sample_key("train", 1) + ".png")
    cut = tmp_path / "cut.tar"  # ends halfway through the second sample's image
    cut.write_bytes(whole.read_bytes()[: second_png.offset_data + second_png.size // 2])
    good = str(shape_shards / shapes.shard_name("train", 1))
    dataset = image_text_dataset([str(cut), good], size=16, shuffle_buffer=0, repeat=False)
    assert keys(dataset) == [shapes.sample_key("train", i) for i in (0, 3, 4, 5)]
    assert dataset.num_skipped >= 1


def test_ranks_read_disjoint_shards(shape_shards, monkeypatch):
    per_rank = [set(keys(image_text_dataset(brace(shape_shards), 16, shuffle_buffer=8, repeat=False,
                                            rank=rank, world_size=2))) for rank in range(2)]
    for rank in range(2):  # shard i goes to rank i % 2
        shard_ids = range(rank, NUM_SHAPES // PER_SHARD, 2)
        assert per_rank[rank] == {shapes.sample_key("train", s * PER_SHARD + j) for s in shard_ids
                                  for j in range(PER_SHARD)}
    monkeypatch.setenv("RANK", "1")  # what torchrun / accelerate launch set
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert set(keys(image_text_dataset(brace(shape_shards), 16, shuffle_buffer=0, repeat=False))) == per_rank[1]


def test_dataloader_workers_split_shards(shape_shards):
    dataset = image_text_dataset(brace(shape_shards), 16, shuffle_buffer=4, repeat=False)
    batches = list(make_loader(dataset, batch_size=3, num_workers=2))
    assert all(b["images"].shape == (3, 3, 16, 16) and isinstance(b["captions"], list) for b in batches)
    assert sorted(k for b in batches for k in b["__key__"]) == [shapes.sample_key("train", i) for i in range(12)]


def test_shuffle_repeat_deterministic(shape_shards):
    def stream(seed: int) -> list[str]:
        dataset = image_text_dataset(brace(shape_shards), 8, shuffle_buffer=5, seed=seed, repeat=True)
        return [s["__key__"] for s in itertools.islice(dataset, 3 * NUM_SHAPES)]

    first = stream(seed=3)
    assert first == stream(seed=3)
    every_key = sorted(shapes.sample_key("train", i) for i in range(NUM_SHAPES))
    epochs = [first[e * NUM_SHAPES: (e + 1) * NUM_SHAPES] for e in range(3)]
    assert all(sorted(epoch) == every_key for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != every_key


def test_bad_inputs_raise(tmp_path, shape_shards):
    with pytest.raises(ValueError, match="not found"):
        image_text_dataset(str(tmp_path / "missing-{0..1}.tar"), 16)
    with pytest.raises(ValueError, match="shard"):
        image_text_dataset(str(shape_shards / shapes.shard_name("train", 0)), 16, rank=0, world_size=2)
    with pytest.raises(ValueError, match="both"):
        image_text_dataset(brace(shape_shards), 16, rank=1)
    with pytest.raises(ValueError, match="split"):
        shapes_dataset("test")
    with pytest.raises(ValueError, match="rank"):
        shapes_dataset(rank=2, world_size=2)


def wide_pattern() -> Image.Image:
    """120 x 60: red | (white over black) | blue, in columns of 30, 60, 30 px."""
    image = Image.new("RGB", (120, 60), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 30, 60))
    image.paste((0, 0, 0), (30, 30, 90, 60))
    image.paste((0, 0, 255), (90, 0, 120, 60))
    return image


def test_resize_then_centre_crop_geometry(tmp_path):
    wide = wide_pattern()
    tall = wide.transpose(Image.Transpose.TRANSPOSE)
    shard = write_tar(tmp_path / "geometry.tar", [("wide.png", encode(wide, "PNG")), ("wide.txt", b"wide"),
                                                  ("tall.png", encode(tall, "PNG")), ("tall.txt", b"tall")])
    got = {s["captions"]: s["images"] for s in image_text_dataset(str(shard), 30, shuffle_buffer=0, repeat=False)}
    # Reference: torchvision's resize of the shorter side, then its centre crop.
    reference = TF.center_crop(TF.resize(wide, 30, InterpolationMode.BICUBIC, antialias=True), [30, 30])
    torch.testing.assert_close(got["wide"], reference_tensor(reference), rtol=0, atol=2 / 127.5)
    # Closed form: the middle 60 x 60 survives, white on top of black, no red or blue inside.
    white, black = torch.ones(3, 13, 24), -torch.ones(3, 13, 24)
    torch.testing.assert_close(got["wide"][:, :13, 3:27], white, rtol=0, atol=0.02)
    torch.testing.assert_close(got["wide"][:, 17:, 3:27], black, rtol=0, atol=0.02)
    torch.testing.assert_close(got["tall"], got["wide"].transpose(1, 2), rtol=0, atol=1e-6)


def test_random_crop_moves_along_the_long_side(tmp_path):
    shard = write_tar(tmp_path / "one.tar", [("wide.png", encode(wide_pattern(), "PNG")), ("wide.txt", b"wide")])

    def crops(seed: int) -> list[torch.Tensor]:
        dataset = image_text_dataset(str(shard), 30, shuffle_buffer=0, seed=seed, random_crop=True)
        return [s["images"] for s in itertools.islice(dataset, 16)]

    first = crops(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, crops(seed=1), strict=True))
    # A 60 px window of the 120 px row holds red (offset < 30) or blue (offset > 30), never both.
    has_red = [bool(((img[0] > 0.8) & (img[2] < -0.8)).any()) for img in first]
    has_blue = [bool(((img[2] > 0.8) & (img[0] < -0.8)).any()) for img in first]
    assert not any(r and b for r, b in zip(has_red, has_blue, strict=True))
    assert any(has_red) and any(has_blue)


def test_shapes_dataset_matches_generator():
    train = list(itertools.islice(shapes_dataset("train", 64, start=5), 3))
    for offset, sample in enumerate(train):
        image, caption, attrs = shapes.sample("train", 5 + offset)
        torch.testing.assert_close(sample["images"], reference_tensor(image), rtol=0, atol=1e-6)
        assert sample["captions"] == caption and sample["indices"] == 5 + offset
        assert sample["canonical_captions"] == shapes.canonical_caption(attrs)
    val = list(shapes_dataset("val", 32, rank=1, world_size=2, stop=6))
    assert [s["indices"] for s in val] == [1, 3, 5]
    assert all(s["captions"] == s["canonical_captions"] for s in val)
    assert val[0]["images"].shape == (3, 32, 32)


def test_shapes_ranks_and_workers_disjoint_and_resumable():
    def read(rank: int, start: int) -> list[int]:
        loader = make_loader(shapes_dataset("train", 16, rank=rank, world_size=2, start=start), 2, num_workers=2)
        return [i for batch in itertools.islice(loader, 4) for i in batch["indices"].tolist()]

    # Reader rank * 2 + worker of 4 takes start + reader + 4k; batches alternate between workers.
    assert read(0, 0) == [0, 4, 1, 5, 8, 12, 9, 13]
    first = [read(rank, 0) for rank in range(2)]
    assert sorted(first[0] + first[1]) == list(range(16))
    resumed = [read(rank, 16) for rank in range(2)]
    assert sorted(resumed[0] + resumed[1]) == list(range(16, 32))
    assert read(1, 0) == first[1]
