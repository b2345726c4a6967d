"""scripts/txt2img.py end to end on a tiny checkpoint written by the test, and its bad-input paths."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm import generate
from ldm.cli import run_main
from ldm.errors import InputError
from tests.conftest import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from ldm.pipeline import Pipeline

    return Pipeline.from_spec(tiny_spec(), name="tiny").save(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = run_main(txt2img.main, argv)
    return code, capsys.readouterr().err


def test_cli_writes_pngs_with_metadata_and_never_overwrites(tiny_ckpt, tmp_path):
    outdir = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--prompt", "a red circle", "--ckpt", str(tiny_ckpt),
           "--outdir", str(outdir), "--steps", "2", "--scale", "3", "--n_samples", "2", "--seed", "7",
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "DDIM" in result.stderr  # the progress bar
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["00000.png", "00001.png", "grid-00000.png"]
    info = Image.open(outdir / "00001.png").text
    assert info["prompt"] == "a red circle" and info["seed"] == "8" and info["steps"] == "2"
    assert info["scale"] == "3.0" and info["sampler"] == "ddim" and info["model"] == "tiny"
    assert Image.open(outdir / "grid-00000.png").size == (128, 64)

    result = subprocess.run([*cmd, "--n_samples", "1", "--seed", "8", "--skip_grid"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in outdir.iterdir()) == ["00000.png", "00001.png", "00002.png", "grid-00000.png"]
    # Image 1 of the first run (seed 8) is regenerated alone by its recorded seed, up to the last bit:
    # batched CPU kernels may round differently from a batch of one (--replay, which reruns the
    # recorded batch, is bit-exact: see the replay tests).
    alone, batched = (np.asarray(Image.open(outdir / name), dtype=np.int16) for name in ("00002.png", "00001.png"))
    assert np.abs(alone - batched).max() <= 1


def test_from_file_and_n_iter(tiny_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code, err = run(["--from-file", str(prompts), "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "o"),
                     "--steps", "1", "--n_iter", "2", "--skip_grid", "--device", "cpu"], capsys)
    assert code == 0, err
    texts = [Image.open(p).text for p in sorted((tmp_path / "o").glob("*.png"))]
    assert [t["prompt"] for t in texts] == ["a red circle", "a blue square"] * 2
    assert [t["seed"] for t in texts] == ["42", "43", "44", "45"]


def test_long_prompt_is_encoded_whole_without_warning(random_ckpt, tmp_path, capsys):
    argv = ["--ckpt", str(random_ckpt), "--steps", "1", "--device", "cpu", "--scale", "1"]
    for name, prompt in (("long", "red blue " * 50), ("first", "red blue " * 37 + "red")):  # 100 and 75 tokens
        code, err = run(["--prompt", prompt, "--outdir", str(tmp_path / name), *argv], capsys)
        assert code == 0 and "warning" not in err
    # Nothing was cut: the tokens after the first 75 change the image.
    long, first = (Image.open(tmp_path / name / "00000.png").tobytes() for name in ("long", "first"))
    assert long != first


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--H", "65"], "height must be a positive multiple of 8"),
    (["--scale", "-2"], "--scale must be >= 0"),
    (["--ckpt", "/nonexistent/model.ckpt"], "checkpoint not found"),
    (["--from-file", "/nonexistent/prompts.txt"], "give exactly one of"),
    (["--vae_tile_size", "-4"], "--vae_tile_size must be 0 (off) or a positive multiple of 4"),
    (["--scale", "nan"], "--scale must be a finite number"),
    (["--ddim_eta", "inf"], "--ddim_eta must be a finite number"),
    (["--seed", "1180591620717411303424"], "--seed must be at most"),
    (["--H", "100000"], "--H must be at most 8192"),
    (["--device", "meta"], "device 'meta' is not usable here (meta tensors hold no values)"),
])
def test_bad_input_is_one_line_without_output(tiny_ckpt, tmp_path, capsys, extra, message):
    argv = ["--prompt", "a red circle", "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "o"), "--steps", "1",
            "--device", "cpu", *extra]
    code, err = run(argv, capsys)
    assert code == 1
    assert err.strip().startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--sampler", "lms"], "argument --sampler: invalid choice: 'lms'"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt"], "argument --prompt: expected one argument"),
])
def test_flag_errors_are_one_line_pointing_to_help(tmp_path, capsys, flags, message):
    # Not argparse's usage block and exit code 2: one line and exit code 1, like every other bad input.
    code, err = run(["--prompt", "a red circle", "--outdir", str(tmp_path / "o"), *flags], capsys)
    assert code == 1
    assert err.strip().startswith("error:") and message in err and err.strip().endswith("(see --help)")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_empty_prompt_file_and_unwritable_outdir(tiny_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, err = run(["--from-file", str(empty), "--ckpt", str(tiny_ckpt)], capsys)
    assert code == 1 and "has no prompts" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run(["--prompt", "x", "--ckpt", str(tiny_ckpt), "--outdir", str(blocker / "sub")], capsys)
    assert code == 1 and "cannot write to output folder" in err


def test_without_ckpt_it_names_the_missing_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(txt2img, "BUNDLED_CHECKPOINT", tmp_path / "absent.safetensors")
    code, err = run(["--prompt", "a red circle", "--outdir", str(tmp_path)], capsys)
    assert code == 1 and "--ckpt" in err


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        generate.save_png(Image.new("RGB", (8, 8)), tmp_path, {"prompt": "x"})
    assert list(tmp_path.iterdir()) == []


def write_bomb_png(path: Path) -> Path:
    """A small PNG whose header claims 30000 x 30000 pixels: more than Pillow opens (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width, height; then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _write_init_images(folder: Path) -> tuple[Path, Path]:
    """A 64 x 64 RGB gradient and a mask whose right half (white) is repainted."""
    folder.mkdir(exist_ok=True)
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
    Image.fromarray(rgb).save(folder / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


@pytest.mark.parametrize("extra", [
    ["--negative_prompt", "blue", "--guidance_rescale", "0.5", "--ddim_eta", "0.5"],
    ["--sampler", "euler", "--karras"],
    ["--init-img", "INIT", "--strength", "0.5"],
    ["--init-img", "INIT", "--mask", "MASK"],
    ["--init-img", "INIT", "--mask", "MASK", "--sampler", "dpmpp_2m", "--karras"],
    ["--init-img", "INIT", "--strength", "0.5", "--sampler", "euler_a"],
    ["--sampler", "heun", "--no-karras"],  # recorded off, against heun's default
])
def test_replay_regenerates_the_same_pixels(random_ckpt, tmp_path, capsys, extra):
    init, mask = _write_init_images(tmp_path / "inputs")
    extra = [{"INIT": str(init), "MASK": str(mask)}.get(arg, arg) for arg in extra]
    code, err = run(["--prompt", "a (red:1.3) circle", "--ckpt", str(random_ckpt), "--outdir", str(tmp_path / "a"),
                     "--steps", "3", "--scale", "3", "--seed", "5", "--n_samples", "2", "--skip_grid",
                     "--device", "cpu", *extra], capsys)
    assert code == 0, err
    original = tmp_path / "a" / "00001.png"
    info = Image.open(original).text
    assert info["seed"] == "6" and info["model_file"] == "tiny.safetensors" and info["prompt"] == "a (red:1.3) circle"
    if "--init-img" in extra:
        assert info["init_img"] == str(init.resolve()) and info["strength"] == ("0.5" if "--strength" in extra else
                                                                                "1.0")
    code, err = run(["--replay", str(original), "--ckpt", str(random_ckpt), "--outdir", str(tmp_path / "b"),
                     "--device", "cpu"], capsys)
    assert code == 0, err
    (replayed,) = (tmp_path / "b").glob("*.png")
    assert Image.open(replayed).tobytes() == Image.open(original).tobytes()
    assert Image.open(replayed).text == info
    # A recorded setting changed on the command line is taken: the image changes.
    code, err = run(["--replay", str(original), "--ckpt", str(random_ckpt), "--outdir", str(tmp_path / "c"),
                     "--device", "cpu", "--seed", "7"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "c" / "00000.png").tobytes() != Image.open(original).tobytes()


@pytest.mark.parametrize(("flags", "karras"), [
    ([], False), (["--sampler", "heun"], True), (["--sampler", "dpmpp_2m"], True), (["--sampler", "euler"], False),
    (["--sampler", "euler", "--karras"], True), (["--sampler", "dpmpp_2m", "--no-karras"], False),
])
def test_karras_defaults_to_the_samplers_choice(flags, karras):
    assert txt2img.parse_args(["--prompt", "a red circle", *flags]).settings.karras is karras


def test_plms_flag_of_the_original_scripts_picks_plms():
    args = txt2img.parse_args(["--prompt", "a red circle", "--plms"]).settings
    assert (args.sampler, args.steps, args.karras) == ("plms", 50, False)
    assert txt2img.parse_args(["--prompt", "a red circle"]).settings.sampler == "ddim"
    with pytest.raises(InputError, match="--sampler: not allowed with argument --plms"):
        txt2img.parse_args(["--prompt", "a red circle", "--plms", "--sampler", "heun"])


def test_replay_keeps_recorded_noise_levels_for_the_recorded_sampler_only(random_ckpt, tmp_path, capsys):
    code, err = run(["--prompt", "a red circle", "--ckpt", str(random_ckpt), "--outdir", str(tmp_path), "--steps", "1",
                     "--sampler", "heun", "--no-karras", "--skip_grid", "--device", "cpu"], capsys)
    assert code == 0, err
    png = str(tmp_path / "00000.png")
    assert Image.open(png).text["karras"] == "False"
    for flags, karras in [([], False), (["--karras"], True), (["--sampler", "dpmpp_2m"], True),
                          (["--sampler", "euler"], False), (["--sampler", "dpmpp_2m", "--no-karras"], False)]:
        assert txt2img.parse_args(["--replay", png, *flags]).settings.karras is karras, flags


def test_replay_names_the_model_it_needs(random_ckpt, tmp_path, capsys):
    code, err = run(["--prompt", "a red circle", "--ckpt", str(random_ckpt), "--outdir", str(tmp_path), "--steps", "1",
                     "--device", "cpu"], capsys)
    assert code == 0, err
    code, err = run(["--replay", str(tmp_path / "00000.png"), "--outdir", str(tmp_path)], capsys)
    assert code == 1 and "made with the model tiny.safetensors; pass that file with --ckpt" in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--init-img", "INIT", "--strength", "0"], r"--strength must be in (0, 1]"),
    (["--init-img", "INIT", "--strength", "1.5"], r"--strength must be in (0, 1]"),
    (["--init-img", "INIT", "--strength", "0.01"], "runs no step"),
    (["--mask", "MASK"], "--mask needs --init-img"),
    (["--strength", "0.5"], "--strength needs --init-img"),
    (["--init-img", "INIT", "--mask", "SMALL"], "give a mask of the image's size"),
    (["--init-img", "TEXT"], "cannot read image"),
    (["--init-img", "MISSING"], "image not found"),
    (["--init-img", "ODD"], "multiples of 8"),
    (["--init-img", "INIT", "--H", "128"], "was asked for"),
    (["--guidance_rescale", "2"], "--guidance_rescale must be in [0, 1]"),
    (["--karras"], "karras sigmas work only"),
    (["--prompt", "a (red:1.3 circle"], "unclosed '('"),
    (["--replay", "TEXT"], "cannot read"),
    (["--replay", "INIT"], "has no generation metadata"),
    (["--init-img", "BOMB"], "cannot read image"),  # Pillow's DecompressionBombError, not an OSError
    (["--replay", "BOMB"], "exceeds limit of 178956970 pixels"),
    (["--init-img", "WIDE"], "the image is 8200x8; its sides must be at most 8192"),
    (["--from-file", "INIT"], "is not UTF-8 text (one prompt per line)"),
    (["--config", "INIT"], "is not a Stable Diffusion inference config (not UTF-8 text"),
])
def test_generation_flags_reject_bad_input_in_one_line(random_ckpt, tmp_path, capsys, extra, message):
    init, mask = _write_init_images(tmp_path / "inputs")
    Image.new("L", (32, 32)).save(tmp_path / "inputs" / "small.png")
    Image.new("RGB", (60, 64)).save(tmp_path / "inputs" / "odd.png")
    (tmp_path / "inputs" / "text.png").write_text("not an image")
    Image.new("RGB", (8200, 8)).save(tmp_path / "inputs" / "wide.png")
    files = {"INIT": init, "MASK": mask, "SMALL": tmp_path / "inputs" / "small.png",
             "TEXT": tmp_path / "inputs" / "text.png", "MISSING": tmp_path / "inputs" / "missing.png",
             "ODD": tmp_path / "inputs" / "odd.png", "WIDE": tmp_path / "inputs" / "wide.png",
             "BOMB": write_bomb_png(tmp_path / "inputs" / "bomb.png")}
    extra = [str(files.get(arg, arg)) for arg in extra]
    argv = ["--ckpt", str(random_ckpt), "--outdir", str(tmp_path / "o"), "--steps", "10", "--device", "cpu", *extra]
    if not {"--prompt", "--replay", "--from-file"} & set(extra):
        argv += ["--prompt", "a red circle"]
    code, err = run(argv, capsys)
    assert code == 1, err
    assert err.strip().startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "o").glob("*.png"))


def test_channels_last_flag_gives_the_same_image(random_ckpt, tmp_path, capsys):
    images = []
    for name, extra in (("nchw", []), ("nhwc", ["--channels_last"])):
        code, err = run(["--prompt", "a red circle", "--ckpt", str(random_ckpt), "--outdir", str(tmp_path / name),
                         "--steps", "3", "--scale", "3", "--device", "cpu", *extra], capsys)
        assert code == 0, err
        images.append(np.asarray(Image.open(tmp_path / name / "00000.png"), dtype=np.int16))
    assert images[0].std() > 5  # a picture, not a flat field
    assert np.abs(images[0] - images[1]).max() <= 1  # 8-bit rounding of float differences in the last bits


def _checkpoint_with_config(tiny_ckpt: Path, folder: Path, config: str) -> Path:
    from safetensors.torch import load_file, save_file

    path = folder / "odd.safetensors"
    save_file(load_file(str(tiny_ckpt)), str(path), metadata={"ldm_config": config})
    return path


@pytest.mark.parametrize("extra, message", [
    (["--scale", "nan"], "--scale must be a finite number, got nan"),
    (["--scale", "inf"], "--scale must be a finite number, got inf"),
    (["--ddim_eta", "nan"], "--ddim_eta must be a finite number, got nan"),
    (["--seed", "1180591620717411303424"], "--seed must be at most"),
    (["config:not json"], "metadata is not a model config (JSONDecodeError"),
    (["config:{}"], "metadata is not a model config (KeyError"),
    (['config:{"family": 1, "unet": 2}'], "metadata is not a model config"),
    (["config:x0"], "parameterization 'x0' is not 'eps' or 'v'"),
    (["ckpt:folder"], "is a folder; pass the checkpoint file"),
])
def test_bad_values_and_files_fail_in_one_line_leaving_no_folder(tiny_ckpt, tmp_path, capsys, extra, message):
    """Issue 26 items 8, 10, 11: one line, exit 1, and the output folder is not even created."""
    ckpt = tiny_ckpt
    if extra[0].startswith("config:"):
        config = extra[0].removeprefix("config:")
        if config == "x0":
            import json

            from safetensors import safe_open

            with safe_open(str(tiny_ckpt), "pt") as f:
                spec = json.loads(f.metadata()["ldm_config"])
            config = json.dumps({**spec, "parameterization": "x0"})
        ckpt, extra = _checkpoint_with_config(tiny_ckpt, tmp_path, config), []
    elif extra == ["ckpt:folder"]:
        ckpt, extra = tmp_path, []
    out = tmp_path / "out"
    code, err = run(["--ckpt", str(ckpt), "--outdir", str(out), "--prompt", "a", "--steps", "1", *extra], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_pngs_follow_the_umask(tiny_ckpt, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, err = run(["--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path), "--prompt", "a", "--steps", "1"], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.glob("*.png")} == {oct(0o640)}


def _png_with_text(path: Path, text: dict[str, str]) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(("recorded", "message"), [
    ({"height": "100000", "width": "100000"}, "--H must be at most 8192, got 100000"),
    ({"batch_size": "1000000"}, "--n_samples must be at most 64, got 1000000"),
    ({"height": "8192", "width": "8192", "batch_size": "64"}, "a batch of 64 8192x8192 images needs about 2192.0 GiB "
     "for decoding, more than the 1.0 GiB free on cpu"),
    ({"height": "1024", "width": "1024", "batch_size": "2"}, "needs about 1.1 GiB"),
])
def test_replay_of_a_batch_too_large_for_memory_is_refused_at_once(tiny_ckpt, tmp_path, capsys, monkeypatch,
                                                                   recorded, message):
    """Issue 26 item 9: with 1 GiB free, a recorded size or batch that cannot fit never starts allocating."""
    from ldm import pipeline

    monkeypatch.setattr(pipeline, "available_memory", lambda device: 2**30)
    monkeypatch.setattr(pipeline, "randn", lambda *args: pytest.fail("allocated the noise of a refused batch"))
    png = _png_with_text(tmp_path / "huge.png", {"prompt": "a", "seed": "1", "steps": "1", **recorded,
                                                 "model_file": "tiny.safetensors"})
    code, err = run(["--replay", str(png), "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "o")], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_max_memory_overrides_the_free_memory_figure(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from ldm import pipeline

    monkeypatch.setattr(pipeline, "available_memory", lambda device: 2**20)
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", "a", "--steps", "1", "--outdir", str(tmp_path)]
    code, err = run(argv, capsys)
    assert code == 1 and "more than the 1.0 MiB free on cpu" in err and "--max_memory GIB" in err
    code, err = run([*argv, "--max_memory", "0.001"], capsys)
    assert code == 1 and "more than the 1.0 MiB set as max_memory" in err
    for bad in ("0", "-1", "nan"):
        code, err = run([*argv, "--max_memory", bad], capsys)
        assert code == 1 and f"--max_memory must be a positive number of GiB (inf: no check), got {float(bad)}" in err
    for limit in ("1", "inf"):
        code, err = run([*argv, "--max_memory", limit], capsys)
        assert code == 0, err
    assert len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--n_iter", "1000000000"], "--n_iter 1000000000 x --n_samples 1 x 1 prompt(s) makes 1000000000 images, more "
     "than --max_images 1000; lower --n_iter, or raise --max_images if you mean it"),
    (["--n_iter", "2", "--n_samples", "2", "--from-file", "PROMPTS", "--max_images", "7"],
     "--n_iter 2 x --n_samples 2 x 2 prompt(s) makes 8 images, more than --max_images 7"),
    (["--max_images", "0"], "--max_images must be >= 1, got 0"),
    (["--seed", str(2**64 - 1), "--n_iter", "2"], f"--seed {2**64 - 1} with 2 images counts past the largest seed"),
])
def test_runs_of_too_many_images_are_refused_before_loading(tiny_ckpt, tmp_path, capsys, monkeypatch, extra, message):
    """Issue 26: --n_iter had no upper bound (10^9 ran for days), and seeds counting past 2^64 - 1 failed
    after the first batch was written. Both are refused before the model is loaded."""
    monkeypatch.setattr(txt2img.Pipeline, "from_checkpoint", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    extra = [str(tmp_path / "prompts.txt") if arg == "PROMPTS" else arg for arg in extra]
    prompt = [] if "--from-file" in extra else ["--prompt", "a"]
    code, err = run(["--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "o"), *prompt, "--steps", "1", *extra],
                    capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_max_images_allows_the_run_it_names(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    code, err = run(["--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "o"), "--from-file",
                     str(tmp_path / "prompts.txt"), "--n_iter", "2", "--n_samples", "2", "--steps", "1",
                     "--max_images", "8"], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "o").glob("0*.png"))) == 8 and len(list((tmp_path / "o").glob("grid-*.png"))) == 1


def test_a_grid_larger_than_pillow_opens_is_left_out_with_a_warning(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Many images kept in memory for one grid that Pillow would refuse to open: a warning line instead."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2 * 64 * 64)
    code, err = run(["--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path), "--prompt", "a", "--steps", "1",
                     "--n_iter", "3"], capsys)
    assert code == 0, err
    assert "warning: no grid: 3 images of 64x64 make 12288 pixels, more than Pillow opens (8192)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png", "00001.png", "00002.png"]
