"""scripts/txt2img.py end to end on a tiny checkpoint written by the test, and its bad-input paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm import generate
from ldm.cli import run_main
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
    # Image 1 of the first run (seed 8) is regenerated alone by its recorded seed.
    assert Image.open(outdir / "00002.png").tobytes() == Image.open(outdir / "00001.png").tobytes()


def test_from_file_and_n_iter(tiny_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code, err = run(["--from-file", str(prompts), "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "o"),
                     "--steps", "1", "--n_iter", "2", "--skip_grid", "--device", "cpu"], capsys)
    assert code == 0, err
    texts = [Image.open(p).text for p in sorted((tmp_path / "o").glob("*.png"))]
    assert [t["prompt"] for t in texts] == ["a red circle", "a blue square"] * 2
    assert [t["seed"] for t in texts] == ["42", "43", "44", "45"]


def test_long_prompt_warns_in_one_line(tiny_ckpt, tmp_path, capsys):
    code, err = run(["--prompt", "red " * 100, "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path),
                     "--steps", "1", "--device", "cpu", "--scale", "1"], capsys)
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "cut" in warning[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--H", "65"], "height must be a positive multiple of 8"),
    (["--scale", "-2"], "--scale must be >= 0"),
    (["--ckpt", "/nonexistent/model.ckpt"], "checkpoint not found"),
    (["--from-file", "/nonexistent/prompts.txt"], "give exactly one of"),
])
def test_bad_input_is_one_line_without_output(tiny_ckpt, tmp_path, capsys, extra, message):
    argv = ["--prompt", "a red circle", "--ckpt", str(tiny_ckpt), "--outdir", str(tmp_path / "o"), "--steps", "1",
            "--device", "cpu", *extra]
    code, err = run(argv, capsys)
    assert code == 1
    assert err.strip().startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.png"))


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
