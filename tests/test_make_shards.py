"""scripts/make_shards.py and ldm/data/make_shards.py: a folder of every odd image file into shards that the
project's own loader reads, checked pixel by pixel; bad input refused in one line with nothing written."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from ldm.cli import run_main
from ldm.data import make_shards as shards_module
from ldm.data.loader import image_text_dataset
from ldm.data.make_shards import make_shards, sample_key

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE, GREEN = (220, 30, 30), (30, 70, 220), (0, 128, 0)


def load_script():
    spec = importlib.util.spec_from_file_location("script_make_shards", ROOT / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = load_script()


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def halves(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def write(folder: Path, relative: str, data: bytes, caption: str | None = None) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    """Every odd file: 8 good samples, 5 to skip, 1 hidden file to ignore."""
    folder = tmp_path / "images"
    # Stored 40 x 20, red left and blue right; orientation 6 says "rotate 90 degrees clockwise to view",
    # which puts red on top of a 20 x 40 image.
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    halves((40, 20), RED, BLUE).save(rotated, format="JPEG", quality=95, exif=exif.tobytes())
    write(folder, "rotated.jpg", rotated.getvalue(), "a rotated photo")
    write(folder, "gray.png", png_bytes(halves((10, 6), 40, 200, mode="L")), "grey")
    palette = Image.new("P", (8, 4), 0)
    palette.putpalette([0, 0, 0, *GREEN])
    palette.paste(1, (4, 0, 8, 4))
    write(folder, "palette.png", png_bytes(palette, transparency=0), "palette\n")  # index 0 transparent
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 128), (0, 0, 0, 0), (10, 20, 30, 255)])
    write(folder, "rgba.png", png_bytes(rgba), "  half red, clear, opaque  ")
    deep = Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    write(folder, "deep.png", png_bytes(deep), "sixteen bits")
    cmyk = io.BytesIO()
    # With a colour profile, which describes CMYK pixels and must not travel with the RGB ones.
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk, format="JPEG", quality=100, icc_profile=profile)
    write(folder, "cmyk.jpg", cmyk.getvalue(), "cmyk red")
    write(folder, "big.png", png_bytes(halves((100, 60), RED, BLUE)), "big")
    write(folder, "sub/dir/nested.png", png_bytes(Image.new("RGB", (6, 6), BLUE)), "nested blue")
    good = png_bytes(Image.new("RGB", (16, 16), RED))
    write(folder, "truncated.png", good[: len(good) // 2], "cut in half")
    write(folder, "notes.png", b"this is a text file, not a PNG", "not an image")
    write(folder, "uncaptioned.png", good)
    write(folder, "blank.png", good, "  \n")
    write(folder, "latin1.png", good)
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write(folder, "._ghost.png", b"macOS metadata", "hidden")
    return folder


GOOD = {  # relative path -> (caption, stored size, original size)
    "big.png": ("big", (50, 30), (100, 60)),
    "cmyk.jpg": ("cmyk red", (8, 8), (8, 8)),
    "deep.png": ("sixteen bits", (3, 1), (3, 1)),
    "gray.png": ("grey", (10, 6), (10, 6)),
    "palette.png": ("palette", (8, 4), (8, 4)),
    "rgba.png": ("half red, clear, opaque", (3, 1), (3, 1)),
    "rotated.jpg": ("a rotated photo", (20, 40), (20, 40)),
    "sub/dir/nested.png": ("nested blue", (6, 6), (6, 6)),
}


def read_shards(paths: list[Path]) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return list(samples.items())


def pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and not {"transparency", "icc_profile", "exif"} & image.info.keys()
    return np.asarray(image).astype(int)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_main(script.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_odd_folder_gives_exactly_the_good_samples(odd_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    code, stdout, err = run([odd_folder, "--out", out, "--shard_size", "3", "--max_side", "50"], capsys)
    assert code == 0, err
    paths = sorted(out.iterdir())
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = read_shards(paths)
    assert [key for key, _ in samples] == [sample_key(relative) for relative in sorted(GOOD)]

    by_file = {}
    for _, members in samples:
        assert sorted(members) == ["json", "png", "txt"]
        meta = json.loads(members["json"])
        caption, size, original = GOOD[meta["file_name"]]
        assert members["txt"].decode() == meta["caption"] == caption
        assert (meta["original_width"], meta["original_height"]) == original
        image = pixels(members["png"])
        assert (image.shape[1], image.shape[0]) == size == (meta["width"], meta["height"])
        by_file[meta["file_name"]] = image

    rotated = by_file["rotated.jpg"]  # JPEG: within a few levels, away from the edge between the halves
    np.testing.assert_allclose(rotated[5, 10], RED, atol=12)
    np.testing.assert_allclose(rotated[34, 10], BLUE, atol=12)
    np.testing.assert_array_equal(by_file["gray.png"][3, [2, 7]], [[40] * 3, [200] * 3])
    np.testing.assert_array_equal(by_file["palette.png"][2, [1, 6]], [[255] * 3, GREEN])
    # 50% red over white, a fully transparent pixel, an opaque one.
    np.testing.assert_allclose(by_file["rgba.png"][0], [[255, 127, 127], [255, 255, 255], [10, 20, 30]], atol=1)
    np.testing.assert_array_equal(by_file["deep.png"][0], [[0] * 3, [100] * 3, [255] * 3])
    np.testing.assert_allclose(by_file["cmyk.jpg"][4, 4], [255, 0, 0], atol=3)
    big = by_file["big.png"]  # downscaled, aspect ratio kept, not cropped: still red left, blue right
    np.testing.assert_array_equal(big[15, [5, 45]], [RED, BLUE])
    np.testing.assert_array_equal(by_file["sub/dir/nested.png"][3, 3], BLUE)

    lines = stdout.splitlines()
    assert lines[0] == f"wrote 8 sample(s) in 3 shard(s): {out}/shard-{{000000..000002}}.tar"
    assert lines[1] == "skipped 5 file(s):"
    reasons = dict(line.strip().split(": ", 1) for line in lines[2:])
    assert sorted(reasons) == ["blank.png", "latin1.png", "notes.png", "truncated.png", "uncaptioned.png"]
    assert reasons["blank.png"] == "empty caption in blank.txt"
    assert reasons["latin1.png"] == "latin1.txt is not UTF-8 text (unexpected end of data at byte 3)"
    assert reasons["uncaptioned.png"] == "no caption: uncaptioned.txt not found"
    assert reasons["notes.png"].startswith("does not decode (UnidentifiedImageError")
    assert reasons["truncated.png"].startswith("does not decode (OSError: image file is truncated")

    # The trainer's reader takes the shards as written, captions from .txt, nothing skipped.
    dataset = image_text_dataset(lines[0].rsplit(": ", 1)[1], size=8, shuffle_buffer=0, repeat=False)
    read = [(sample["__key__"], sample["captions"], tuple(sample["images"].shape)) for sample in dataset]
    assert read == [(sample_key(relative), GOOD[relative][0], (3, 8, 8)) for relative in sorted(GOOD)]
    assert dataset.num_skipped == 0

    again = tmp_path / "again"
    assert run([odd_folder, "--out", again, "--shard_size", "3", "--max_side", "50"], capsys)[0] == 0
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in sorted(again.iterdir())]


def test_jpg_format_and_one_shard(odd_folder, tmp_path):
    report = make_shards(odd_folder, tmp_path / "jpg", fmt="jpg", quality=90, progress=False)
    assert report.urls == str(tmp_path / "jpg" / "shard-000000.tar") and report.num_samples == len(GOOD)
    (key, members), *_ = read_shards(report.shards)
    assert key == sample_key("big.png") and sorted(members) == ["jpg", "json", "txt"]
    np.testing.assert_allclose(pixels(members["jpg"])[30, [20, 80]], [RED, BLUE], atol=8)


def test_sample_keys_stay_apart():
    keys = [sample_key(relative) for relative in ("a.png", "a.jpg", "a_png", "sub/a.png", "sub_a.png")]
    assert len(set(keys)) == len(keys)
    assert all("." not in key and "/" not in key for key in keys)
    assert sample_key("sub/a.png").startswith("sub_a_png-")


def test_metadata_jsonl(tmp_path):
    folder = tmp_path / "images"
    write(folder, "a.png", png_bytes(Image.new("RGB", (4, 4), RED)), "the .txt is not read")
    write(folder, "b/c.png", png_bytes(Image.new("RGB", (4, 2), BLUE)))
    write(folder, "unlisted.png", png_bytes(Image.new("RGB", (4, 4), RED)))
    rows = [{"file_name": "a.png", "text": "alpha"}, {"file_name": "./b/c.png", "caption": "gamma"},
            {"file_name": "missing.png", "text": "gone"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    report = make_shards(folder, tmp_path / "out", progress=False)
    samples = read_shards(report.shards)
    assert [(key, m["txt"].decode(), json.loads(m["json"])["file_name"]) for key, m in samples] == [
        (sample_key("a.png"), "alpha", "a.png"), (sample_key("b/c.png"), "gamma", "b/c.png")]
    np.testing.assert_array_equal(pixels(samples[1][1]["png"])[1, 3], BLUE)
    assert report.skipped == [("missing.png", "listed in metadata.jsonl but not found"),
                              ("unlisted.png", "no caption: not listed in metadata.jsonl")]


def test_metadata_csv(tmp_path):
    folder = tmp_path / "images"
    write(folder, "x.png", png_bytes(Image.new("RGB", (4, 4), GREEN)))
    write(folder, "y.png", png_bytes(Image.new("RGB", (4, 4), RED)))
    (folder / "metadata.csv").write_text('file_name,caption\nx.png,"green, on a\nsecond line"\ny.png,\n',
                                         encoding="utf-8-sig")
    report = make_shards(folder, tmp_path / "out", progress=False)
    [(key, members)] = read_shards(report.shards)
    assert key == sample_key("x.png") and members["txt"].decode() == "green, on a\nsecond line"
    assert report.skipped == [("y.png", "empty caption in metadata.csv")]


def test_overwrite_replaces_only_the_shards(odd_folder, tmp_path):
    out = tmp_path / "out"
    make_shards(odd_folder, out, shard_size=1, progress=False)
    (out / "notes.md").write_text("mine")
    report = make_shards(odd_folder, out, shard_size=5, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "shard-000000.tar", "shard-000001.tar"]
    assert [key for key, _ in read_shards(report.shards)] == [sample_key(relative) for relative in sorted(GOOD)]


def test_an_interrupted_run_leaves_the_folder_as_it_was(odd_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_shards(odd_folder, out, shard_size=2, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    encode = shards_module._encode

    def interrupt_at_the_fifth(*args):
        calls.append(1)
        if len(calls) == 5:  # two shards are complete by now
            raise KeyboardInterrupt
        return encode(*args)

    monkeypatch.setattr(shards_module, "_encode", interrupt_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        make_shards(odd_folder, out, shard_size=1, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file either


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def bad_folder(tmp_path: Path, case: str) -> Path:
    """A folder for each bad-input case, under tmp_path / "in"."""
    folder = tmp_path / "in"
    image = png_bytes(Image.new("RGB", (4, 4), RED))
    if case == "file":
        folder.write_text("not a folder")
    elif case == "empty":
        folder.mkdir()
        (folder / "caption.txt").write_text("a caption without an image")
    elif case == "no captions":
        write(folder, "a.png", image)
        write(folder, "sub/b.jpg", image)
    elif case == "csv columns":
        write(folder, "a.png", image)
        (folder / "metadata.csv").write_text("file_name,description\na.png,red\n")
    elif case == "jsonl columns":
        write(folder, "a.png", image)
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n{"text": "blue"}\n')
    elif case == "jsonl syntax":
        write(folder, "a.png", image)
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"\n')
    elif case == "two metadata files":
        write(folder, "a.png", image)
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n')
        (folder / "metadata.csv").write_text("file_name,text\na.png,red\n")
    elif case == "listed twice":
        write(folder, "a.png", image)
        (folder / "metadata.csv").write_text("file_name,text\na.png,red\n./a.png,blue\n")
    elif case == "not utf-8":
        write(folder, "a.png", image)
        (folder / "metadata.csv").write_bytes("file_name,text\na.png,caf\xe9\n".encode("latin-1"))
    elif case == "none decodes":
        write(folder, "a.png", b"not an image", "red")
    elif case in ("not empty", "options"):
        write(folder, "a.png", image, "red")
    return folder


BAD_INPUT = [
    ("missing", [], "in not found; give the folder that holds the images"),
    ("file", [], "in is not a folder"),
    ("empty", [], "holds no images (.png, .jpg"),
    ("no captions", [], "none of the 2 images in "),
    ("csv columns", [], "metadata.csv has columns ['file_name', 'description']; it needs file_name and a caption"),
    ("jsonl columns", [], "metadata.jsonl line 2 lacks file_name or a caption"),
    ("jsonl syntax", [], "metadata.jsonl line 1 is not valid JSON"),
    ("two metadata files", [], "holds both metadata.jsonl and metadata.csv; keep one"),
    ("listed twice", [], "metadata.csv lists a.png twice (again at line 3)"),
    ("not utf-8", [], "metadata.csv is not UTF-8 text"),
    ("none decodes", [], "none of the images in "),
    ("not empty", ["--out", "@in"], "is not empty; pass --overwrite"),
    ("options", ["--out", "@in/a.png"], "--out: cannot write to output folder"),
    ("options", ["--out", "@in/a.png/shards"], "--out: cannot write to output folder"),
    ("options", ["--shard_size", "0"], "--shard_size must be >= 1, got 0"),
    ("options", ["--max_side", "0"], "--max_side must be >= 1, got 0"),
    ("options", ["--quality", "101"], "--quality must be in [1, 100], got 101"),
    ("options", ["--format", "webp"], "argument --format: invalid choice: 'webp'"),
    ("options", ["--shard_size", "many"], "argument --shard_size: invalid int value: 'many'"),
]


@pytest.mark.parametrize(("case", "extra", "phrase"), BAD_INPUT)
def test_bad_input_is_one_line_and_writes_nothing(case, extra, phrase, tmp_path, capsys):
    folder = bad_folder(tmp_path, case)
    before = snapshot(tmp_path)
    argv = [folder, *[arg.replace("@in", str(folder)) for arg in extra]]
    if "--out" not in extra:
        argv += ["--out", tmp_path / "out"]
    code, _, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert phrase in lines[0]
    assert snapshot(tmp_path) == before


def test_missing_arguments(capsys):
    code, _, err = run([], capsys)
    assert code == 1 and err == "error: the following arguments are required: folder, --out (see --help)\n"
