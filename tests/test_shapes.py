"""shapes-v1 generator, shard writer and pixel-rule checker, against the spec's own numbers."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import string
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.shapes import checker as shape_checker
from ldm.shapes import dataset as shapes

REPO = Path(__file__).resolve().parents[1]

# The table of /work/shared/specs/shapes-v1.md, written out again so the module is checked
# against the spec rather than against itself.
SPEC_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 190),
}
SPEC_SHAPES = ("circle", "square", "triangle")
SPEC_SIZES = {"small": 16, "large": 32}
SPEC_POSITIONS = {
    "center": (32, 32),
    "top left": (20, 20),
    "top right": (44, 20),
    "bottom left": (20, 44),
    "bottom right": (44, 44),
}
SPEC_BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
SPEC_HELDOUT = {("purple", "triangle"), ("orange", "square")}
SPEC_CANONICAL = "a {size} {color} {shape} in the {position} on a {background} background"
SPEC_VALUES = {
    "color": SPEC_COLORS,
    "shape": SPEC_SHAPES,
    "size": SPEC_SIZES,
    "position": SPEC_POSITIONS,
    "background": SPEC_BACKGROUNDS,
}

# Chi-square 0.999 quantiles by degrees of freedom (standard tables). The data are fixed, so
# these tests are deterministic; a fair generator would exceed one with probability 0.1% for a
# random choice of seeds, while a real defect (a value never drawn, a jitter range off by one, a
# 10% bias on one value of 2000 draws) gives a statistic in the tens to hundreds.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 6: 22.46, 7: 24.32}
NUM_MARGINAL_SAMPLES = 2000


def chi_square(counts: Counter, expected_prob: dict) -> float:
    total = sum(counts.values())
    assert set(counts) <= set(expected_prob), (
        f"unexpected values {set(counts) - set(expected_prob)}"
    )
    return sum((counts[k] - total * p) ** 2 / (total * p) for k, p in expected_prob.items())


def uniform(values) -> dict:
    return {v: 1 / len(values) for v in values}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


# --- constants ---------------------------------------------------------------------------------


def test_constants_match_spec():
    assert shapes.COLORS == SPEC_COLORS
    assert tuple(shapes.SHAPES) == SPEC_SHAPES
    assert shapes.SIZES == SPEC_SIZES
    assert shapes.POSITIONS == SPEC_POSITIONS
    assert shapes.BACKGROUNDS == SPEC_BACKGROUNDS
    assert set(shapes.HELDOUT_PAIRS) == SPEC_HELDOUT
    assert shapes.MAX_JITTER == 3
    assert shapes.IMAGE_SIZE == 64
    assert shapes.CANONICAL_FORM == SPEC_CANONICAL


# --- determinism -------------------------------------------------------------------------------


def test_sample_is_a_pure_function_of_split_and_index():
    first = [shapes.sample("train", i) for i in (0, 7, 123456)]
    # Other samples in between and a reseeded global RNG must not change anything.
    np.random.seed(1)
    for i in range(20):
        shapes.sample("val", i)
    np.random.seed(2)
    again = [shapes.sample("train", i) for i in (123456, 7, 0)][::-1]
    for a, b in zip(first, again, strict=True):
        assert png_bytes(a[0]) == png_bytes(b[0])
        assert a[1:] == b[1:]  # caption and attributes

    np.random.seed(1)
    expected_state = np.random.get_state()[1].copy()
    shapes.sample("train", 3)
    assert np.array_equal(np.random.get_state()[1], expected_state), "global RNG was used"


# Loads shapes.py by path: `import ldm` would also import torch, and this is about one module.
DIGEST_SCRIPT = """
import hashlib, importlib.util, io, sys
spec = importlib.util.spec_from_file_location("shapes", sys.argv[1])
shapes = sys.modules["shapes"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shapes)
digest = hashlib.sha256()
for i in range(10):
    image, caption, _ = shapes.sample("train", i)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    digest.update(buffer.getvalue() + caption.encode())
print(digest.hexdigest())
"""


def test_sample_does_not_depend_on_python_hash_seed():
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT, shapes.__file__],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    digest = hashlib.sha256()
    for i in range(10):
        image, caption, _ = shapes.sample("train", i)
        digest.update(png_bytes(image) + caption.encode())
    assert out.stdout.strip() == digest.hexdigest()


def test_splits_differ():
    draws = {s: [shapes.sample_attributes(s, i) for i in range(50)] for s in shapes.SPLITS}
    assert draws["train"] != draws["val"]
    # Same index, different split: images should mostly differ (identical attributes and jitter
    # by chance has probability well under 1e-3 per index).
    same = sum(
        png_bytes(shapes.sample("train", i)[0]) == png_bytes(shapes.sample("val", i)[0])
        for i in range(50)
    )
    assert same <= 1


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="split"):
        shapes.sample("test", 0)
    with pytest.raises(ValueError, match="non-negative"):
        shapes.sample("train", -1)
    with pytest.raises(ValueError, match="color"):
        shapes.ShapeSample("magenta", "circle", "small", "center", "white")
    with pytest.raises(ValueError, match="dx"):
        shapes.ShapeSample("red", "circle", "small", "center", "white", dx=4)
    with pytest.raises(ValueError, match="positive"):
        shapes.write_shards("train", 0, "unused")


# --- distribution ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_heldout_pairs_never_in_train_or_val(split):
    draws = [shapes.sample_attributes(split, i)[0] for i in range(3000)]
    pairs = {(a.color, a.shape) for a in draws}
    assert not pairs & SPEC_HELDOUT
    allowed = set(itertools.product(SPEC_COLORS, SPEC_SHAPES)) - SPEC_HELDOUT
    assert pairs == allowed  # and every allowed pair shows up


def test_heldout_split_has_only_heldout_pairs():
    draws = [shapes.sample_attributes("heldout", i)[0] for i in range(500)]
    assert {(a.color, a.shape) for a in draws} == SPEC_HELDOUT


def _marginals(split: str) -> tuple[dict[str, Counter], list[str], list]:
    draws = [shapes.sample_attributes(split, i) for i in range(NUM_MARGINAL_SAMPLES)]
    counts = {name: Counter(getattr(a, name) for a, _ in draws) for name in SPEC_VALUES}
    counts["pair"] = Counter((a.color, a.shape) for a, _ in draws)
    counts["dx"] = Counter(a.dx for a, _ in draws)
    counts["dy"] = Counter(a.dy for a, _ in draws)
    return counts, [c for _, c in draws], [a for a, _ in draws]


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_and_val_marginals_are_uniform_over_allowed_pairs(split):
    counts, captions, attrs = _marginals(split)
    allowed = sorted(set(itertools.product(SPEC_COLORS, SPEC_SHAPES)) - SPEC_HELDOUT)
    # Uniform over the 22 allowed pairs: purple and orange have 2 shapes, the others 3.
    color_prob = {c: sum(p[0] == c for p in allowed) / len(allowed) for c in SPEC_COLORS}
    shape_prob = {s: sum(p[1] == s for p in allowed) / len(allowed) for s in SPEC_SHAPES}
    jitter = uniform(range(-3, 4))
    tests = {
        "color": color_prob,
        "shape": shape_prob,
        "size": uniform(SPEC_SIZES),
        "position": uniform(SPEC_POSITIONS),
        "background": uniform(SPEC_BACKGROUNDS),
        "dx": jitter,
        "dy": jitter,
    }
    for name, prob in tests.items():
        stat = chi_square(counts[name], prob)
        assert stat < CHI2_999[len(prob) - 1], (name, stat, counts[name])
    # 22 pairs -> 21 degrees of freedom; 0.999 quantile 46.80.
    assert chi_square(counts["pair"], uniform(allowed)) < 46.80


def test_heldout_marginals_are_uniform():
    counts, _, _ = _marginals("heldout")
    assert chi_square(counts["pair"], uniform(SPEC_HELDOUT)) < CHI2_999[1]
    for name in ("size", "position", "background"):
        assert (
            chi_square(counts[name], uniform(SPEC_VALUES[name]))
            < CHI2_999[len(SPEC_VALUES[name]) - 1]
        )


def _named_attributes(form: str) -> frozenset[str]:
    return frozenset(field for _, field, _, _ in string.Formatter().parse(form) if field)


def test_caption_forms_cover_every_omission_and_half_are_canonical():
    forms = [shapes.CANONICAL_FORM, *shapes.PARTIAL_FORMS]
    named = [_named_attributes(f) for f in forms]
    optional = ("size", "position", "background")
    every_subset = {
        frozenset({"color", "shape", *chosen})
        for k in range(len(optional) + 1)
        for chosen in itertools.combinations(optional, k)
    }
    assert set(named) == every_subset and len(named) == len(every_subset)

    counts, captions, attrs = _marginals("train")
    canonical = sum(
        c == SPEC_CANONICAL.format(**vars(a)) for c, a in zip(captions, attrs, strict=True)
    )
    # Binomial(2000, 1/2): std 22.4; 4.5 std either side.
    assert abs(canonical - NUM_MARGINAL_SAMPLES / 2) < 100
    by_form = Counter(frozenset(shape_checker.parse_caption(c)) for c in captions)
    prob = {s: 1 / 14 for s in every_subset} | {frozenset(SPEC_VALUES): 1 / 2}
    assert chi_square(by_form, prob) < CHI2_999[7]
    # The spec's examples are among the forms.
    examples = {
        "a red circle",
        "a large blue square on a white background",
        "a green triangle in the bottom right",
    }
    everything = {
        form.format(size=sz, color=c, shape=sh, position=p, background=b)
        for form in forms
        for sz, c, sh, p, b in itertools.product(
            SPEC_SIZES, ["red", "blue", "green"], SPEC_SHAPES, SPEC_POSITIONS, SPEC_BACKGROUNDS
        )
    }
    assert examples <= everything


def test_val_and_heldout_use_canonical_captions_train_uses_training_captions():
    for i in range(20):
        for split in ("val", "heldout"):
            _, caption, attrs = shapes.sample(split, i)
            assert caption == SPEC_CANONICAL.format(**vars(attrs))
        _, caption, _ = shapes.sample("train", i)
        assert caption == shapes.sample_attributes("train", i)[1]
    item = next(shapes.iterate("val", 5, 6))
    assert item["training_caption"] == shapes.sample_attributes("val", 5)[1]
    assert item["canonical_caption"] == item["caption"]


def test_iterate_streams_the_same_samples():
    endless = list(itertools.islice(shapes.iterate("train"), 3))
    ranged = list(shapes.iterate("train", 1, 3))
    assert [item["index"] for item in endless] == [0, 1, 2]
    assert [item["key"] for item in ranged] == ["train-00000001", "train-00000002"]
    for item in endless + ranged:
        image, caption, attrs = shapes.sample("train", item["index"])
        assert png_bytes(item["image"]) == png_bytes(image)
        assert (item["caption"], item["attrs"]) == (caption, attrs)


# --- rendering ---------------------------------------------------------------------------------


def _object_box(pixels: np.ndarray, background) -> tuple[int, int, int, int]:
    differs = np.any(pixels != np.array(background), axis=-1)
    rows, cols = np.nonzero(differs)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


@pytest.fixture(scope="module")
def val_items():
    return list(shapes.iterate("val", 0, 500))


def test_render_pixels_follow_the_spec(val_items):
    seen = set()
    for item in val_items[:300]:
        a = item["attrs"]
        pixels = as_array(item["image"])
        assert pixels.shape == (64, 64, 3) and item["image"].mode == "RGB"
        bg, fg = np.array(SPEC_BACKGROUNDS[a.background]), np.array(SPEC_COLORS[a.color])
        for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
            assert tuple(pixels[y, x]) == tuple(bg)

        side = SPEC_SIZES[a.size]
        left, top, right, bottom = _object_box(pixels, bg)
        assert abs((right - left) - side) <= 1 and abs((bottom - top) - side) <= 1
        nominal_x, nominal_y = SPEC_POSITIONS[a.position]
        cx, cy = (left + right) / 2, (top + bottom) / 2
        assert abs(cx - nominal_x) <= 3 and abs(cy - nominal_y) <= 3
        assert (cx, cy) == (nominal_x + a.dx, nominal_y + a.dy)

        # The pixel at the box centre is fully inside every shape.
        assert tuple(pixels[int(cy), int(cx)]) == tuple(fg)

        # No noise, texture or outline: every pixel blends background and object colour
        # (anti-aliasing), within 8-bit rounding.
        t = np.clip((pixels - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg)), 0, 1)
        assert np.abs(pixels - (bg + t[..., None] * (fg - bg))).max() <= 1.5

        # Area from coverage against the ideal shape; edges may sit 1/8 px (half a pixel at
        # the 4x drawing scale) off the ideal outline.
        area, perimeter = {
            "circle": (math.pi * side**2 / 4, math.pi * side),
            "square": (side**2, 4 * side),
            "triangle": (side**2 / 2, side + 2 * math.hypot(side / 2, side)),
        }[a.shape]
        assert abs(t.sum() - area) <= perimeter / 8, (a, t.sum(), area)

        # Mirror symmetric about the vertical through the box centre.
        crop = pixels[top:bottom, left:right]
        assert np.array_equal(crop, crop[:, ::-1])
        seen.add((a.shape, a.size))
    assert len(seen) == 6


def test_triangle_apex_up():
    for size in SPEC_SIZES:
        attrs = shapes.ShapeSample("red", "triangle", size, "center", "black", dx=1, dy=-2)
        pixels = as_array(shapes.render(attrs))
        differs = np.any(pixels != np.array(SPEC_BACKGROUNDS["black"]), axis=-1)
        rows = np.nonzero(differs.any(axis=1))[0]
        widths = differs[rows].sum(axis=1)
        assert widths[0] <= 2  # the apex
        assert widths[-1] == SPEC_SIZES[size]  # the base spans the box
        assert np.all(np.diff(widths) >= 0)  # widening downwards
        # The apex straddles the vertical through the box centre (x = 32 + dx = 33).
        apex_cols = np.nonzero(differs[rows[0]])[0]
        assert apex_cols.mean() + 0.5 == 33


# --- checker -----------------------------------------------------------------------------------


def _accuracy(items, degrade) -> dict[str, float]:
    hits = Counter()
    for item in items:
        found = shape_checker.read_attributes(degrade(item["image"]))
        for name in SPEC_VALUES:
            hits[name] += found[name] == getattr(item["attrs"], name)
    return {name: hits[name] / len(items) for name in SPEC_VALUES}


def test_checker_reads_every_attribute_of_clean_images(val_items):
    items = val_items + list(shapes.iterate("heldout", 0, 50))
    accuracy = _accuracy(items, lambda image: image)
    assert accuracy == dict.fromkeys(SPEC_VALUES, 1.0)


def test_checker_reads_every_attribute_of_noisy_blurred_images(val_items):
    rng = np.random.default_rng(0)

    def degrade(image: Image.Image) -> np.ndarray:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=1.0)), dtype=np.float64)
        noisy = blurred + rng.normal(0.0, 10.0, blurred.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)

    accuracy = _accuracy(val_items, degrade)
    assert accuracy == dict.fromkeys(SPEC_VALUES, 1.0)


def test_check_flags_wrong_attributes_and_empty_images():
    attrs = shapes.ShapeSample("purple", "triangle", "large", "bottom left", "gray")
    image = shapes.render(attrs)
    requested = {"color": "purple", "shape": "triangle", "size": "large"}
    assert shape_checker.check(image, requested) == dict.fromkeys(requested, True)
    wrong = {"color": "blue", "shape": "circle", "size": "small", "position": "top right"}
    assert shape_checker.check(image, wrong) == dict.fromkeys(wrong, False)
    empty = Image.new("RGB", (64, 64), SPEC_BACKGROUNDS["white"])
    assert shape_checker.check(empty, {"color": "red", "background": "white"}) == {
        "color": False,
        "background": True,
    }
    with pytest.raises(ValueError, match="unknown attribute"):
        shape_checker.check(image, {"hue": "red"})
    with pytest.raises(ValueError, match="not one of"):
        shape_checker.check(image, {"color": "magenta"})


def test_parse_caption_round_trips_every_form():
    forms = [shapes.CANONICAL_FORM, *shapes.PARTIAL_FORMS]
    for values in itertools.product(*SPEC_VALUES.values()):
        attrs = dict(zip(SPEC_VALUES, values, strict=True))
        for form in forms:
            expected = {k: attrs[k] for k in _named_attributes(form)}
            assert shape_checker.parse_caption(form.format(**attrs)) == expected
    assert shape_checker.parse_caption("a red circle") == {"color": "red", "shape": "circle"}
    assert shape_checker.parse_caption("A green triangle in the bottom right.") == {
        "color": "green",
        "shape": "triangle",
        "position": "bottom right",
    }
    with pytest.raises(ValueError, match="shapes-v1 caption"):
        shape_checker.parse_caption("a red")
    with pytest.raises(ValueError):
        shape_checker.parse_caption("a magenta circle")


# --- shards ------------------------------------------------------------------------------------


def _read_shard(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_write_shards_members_and_content(tmp_path):
    paths = shapes.write_shards("val", 25, tmp_path, samples_per_shard=10)
    names = [f"shapes-v1-val-{i:06d}.tar" for i in range(3)]
    assert [p.name for p in paths] == names
    assert sorted(os.listdir(tmp_path)) == names  # no temp files left behind
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in paths)  # readable by all, like a copy
    index = 0
    for path, count in zip(paths, (10, 10, 5), strict=True):
        members = _read_shard(path)
        assert len(members) == 3 * count
        for (png_name, png), (txt_name, txt), (json_name, meta) in zip(
            *[iter(members)] * 3, strict=True
        ):
            image, caption, attrs = shapes.sample("val", index)
            key = png_name.removesuffix(".png")
            assert "." not in key and (txt_name, json_name) == (f"{key}.txt", f"{key}.json")
            decoded = Image.open(io.BytesIO(png))
            assert decoded.size == (64, 64) and decoded.mode == "RGB"
            assert np.array_equal(np.asarray(decoded), np.asarray(image))
            assert txt.decode() == caption
            meta = json.loads(meta)
            assert {k: meta[k] for k in vars(attrs)} == vars(attrs)
            assert meta["canonical_caption"] == SPEC_CANONICAL.format(**vars(attrs))
            assert (meta["split"], meta["index"]) == ("val", index)
            index += 1
    assert index == 25
    # Shards are byte-for-byte reproducible.
    again = shapes.write_shards("val", 25, tmp_path / "again", samples_per_shard=10)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_write_shards_leaves_no_partial_shard(tmp_path, monkeypatch):
    calls = Counter()
    real_render = shapes.render

    def failing_render(attrs):
        calls["n"] += 1
        if calls["n"] == 15:
            raise RuntimeError("disk full")
        return real_render(attrs)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        shapes.write_shards("train", 30, tmp_path, samples_per_shard=10)
    assert os.listdir(tmp_path) == ["shapes-v1-train-000000.tar"]


def test_make_shapes_cli(tmp_path):
    spec = importlib.util.spec_from_file_location("make_shapes", REPO / "scripts/make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--split", "heldout", "--num", "3", "--outdir", str(tmp_path), "--per-shard", "2"])
    assert sorted(os.listdir(tmp_path)) == [f"shapes-v1-heldout-{i:06d}.tar" for i in range(2)]


def test_shards_read_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    shapes.write_shards("train", 6, tmp_path, samples_per_shard=4)
    urls = [str(p) for p in sorted(tmp_path.glob("*.tar"))]
    rows = list(
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "txt", "json")
    )
    assert len(rows) == 6
    for index, (image, caption, meta) in enumerate(rows):
        expected_image, expected_caption, _ = shapes.sample("train", index)
        assert np.array_equal(np.asarray(image), np.asarray(expected_image))
        assert caption == expected_caption and meta["index"] == index
