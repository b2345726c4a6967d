"""Checkpoints from strangers: pickles never run code, and can be converted to .safetensors."""

from __future__ import annotations

import os
import pickle
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open

from ldm import weights_io
from ldm.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.cli import run_main
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from ldm.weights_io import convert_to_safetensors, read_checkpoint, save_atomic
from tests.conftest import randomize_, tiny_spec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import convert_checkpoint  # noqa: E402


class RunsACommand:
    """Unpickling this calls os.system, as a malicious checkpoint would."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path, marker) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": RunsACommand(str(marker))}, path)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    write_malicious(ckpt, marker)
    assert zipfile.is_zipfile(ckpt)
    # The payload really is live: an unrestricted unpickler runs it.
    with zipfile.ZipFile(ckpt) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"system" in data
    with pytest.raises(InputError, match="cannot read"):
        read_checkpoint(ckpt)
    assert not marker.exists()

    legacy = tmp_path / "evil-legacy.ckpt"
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": RunsACommand(str(marker))}, f)
    with pytest.raises(InputError, match="cannot read"):
        read_checkpoint(legacy)
    assert not marker.exists()


def test_convert_keeps_tensors_and_global_step(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    tensors = {"model.diffusion_model.a": torch.randn(3, 4), "first_stage_model.b": torch.arange(5.0)}
    torch.save({"state_dict": tensors, "global_step": 875000}, ckpt)
    assert run_main(convert_checkpoint.main, [str(ckpt)]) == 0
    out = tmp_path / "model.safetensors"
    assert capsys.readouterr().out.strip() == str(out)
    converted, metadata = read_checkpoint(out)
    assert converted.keys() == tensors.keys()
    assert all(torch.equal(converted[k], tensors[k]) for k in tensors)
    assert metadata == {"global_step": "875000"}
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"global_step": "875000"}


def test_convert_to_half_precision_casts_only_floats(tmp_path):
    src, dst = tmp_path / "model.safetensors", tmp_path / "half.safetensors"
    tensors = {"w": torch.randn(4, 5, dtype=torch.float64).float(), "ids": torch.arange(3)}
    save_atomic(src, tensors, {"config": "{}"})
    assert run_main(convert_checkpoint.main, [str(src), str(dst), "--dtype", "fp16"]) == 0
    converted, metadata = read_checkpoint(dst)
    assert converted["w"].dtype == torch.float16 and torch.equal(converted["w"], tensors["w"].half())
    assert torch.equal(converted["ids"], tensors["ids"]) and metadata == {"config": "{}"}
    assert dst.stat().st_size < src.stat().st_size


def test_convert_bakes_a_vae_into_the_checkpoint(tmp_path, capsys):
    """--vae replaces every first_stage_model.* tensor and nothing else; the result loads without --vae."""
    src, vae, dst = tmp_path / "model.safetensors", tmp_path / "vae.safetensors", tmp_path / "baked.safetensors"
    Pipeline.from_spec(tiny_spec()).save(src)
    other = randomize_(Pipeline.from_spec(tiny_spec()).autoencoder, seed=3)
    save_atomic(vae, other.state_dict(), {})
    assert run_main(convert_checkpoint.main, [str(src), str(dst), "--vae", str(vae)]) == 0
    before, baked = read_checkpoint(src)[0], read_checkpoint(dst)[0]
    assert before.keys() == baked.keys()
    for key, value in baked.items():
        expected = other.state_dict()[key.removeprefix("first_stage_model.")] if key.startswith(
            "first_stage_model.") else before[key]
        assert torch.equal(value, expected), key
    pipe = Pipeline.from_checkpoint(dst)
    assert all(torch.equal(a, b) for a, b in zip(pipe.autoencoder.state_dict().values(),
                                                  other.state_dict().values(), strict=True))

    other_shape = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=64)
    save_atomic(vae, AutoencoderKL(other_shape).state_dict(), {})
    capsys.readouterr()
    assert run_main(convert_checkpoint.main, [str(src), str(tmp_path / "bad.safetensors"), "--vae", str(vae)]) == 1
    err = capsys.readouterr().err.strip()
    assert "does not fit the checkpoint's autoencoder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()


def test_convert_refuses_bad_input_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    write_malicious(evil, marker)
    assert run_main(convert_checkpoint.main, [str(evil)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read") and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(InputError, match="must end in .safetensors"):
        convert_to_safetensors(evil, tmp_path / "out.bin")


def test_failed_write_leaves_the_previous_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_atomic(path, {"w": torch.ones(2)}, {})

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights_io, "save_file", disk_full)
    with pytest.raises(InputError, match="No space left"):
        save_atomic(path, {"w": torch.zeros(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert torch.equal(read_checkpoint(path)[0]["w"], torch.ones(2))
