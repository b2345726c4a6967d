"""Files that replace part of a checkpoint's weights: a stand-alone VAE, and the EMA copy of the U-Net."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.autoencoder import AutoencoderKL
from ldm.cli import run_main
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from ldm.sd_checkpoint import CONFIG_METADATA_KEY, join_state_dicts
from tests.conftest import randomize_, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import txt2img  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(tiny_spec(), name="tiny")
    randomize_(pipe.unet, seed=1)
    vae = randomize_(AutoencoderKL(tiny_spec().autoencoder), seed=2)
    unet = pipe.unet.state_dict()
    ema = {"model_ema." + ("diffusion_model." + k).replace(".", ""): 2 * v for k, v in unet.items()}
    tensors = join_state_dicts(unet, pipe.autoencoder.state_dict(), pipe.text_encoder.state_dict())
    save_file({**tensors, **ema, "model_ema.decay": torch.tensor(0.9999)}, str(folder / "ema.safetensors"),
              metadata={CONFIG_METADATA_KEY: json.dumps(pipe.spec.to_dict())})
    save_file({**vae.state_dict(), "loss.logvar": torch.zeros(())}, str(folder / "vae.safetensors"))
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in vae.state_dict().items()}}, folder / "vae.ckpt")
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(folder / "diffusers.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(folder / "lora.safetensors"))
    return {"plain": pipe.save(folder / "plain.safetensors"), "ema": folder / "ema.safetensors",
            "vae": folder / "vae.safetensors", "vae_ckpt": folder / "vae.ckpt",
            "diffusers_vae": folder / "diffusers.safetensors", "lora": folder / "lora.safetensors"}


@pytest.mark.parametrize("vae", ["vae", "vae_ckpt"])
def test_vae_file_replaces_the_autoencoder(files, vae):
    file_weights = randomize_(AutoencoderKL(tiny_spec().autoencoder), seed=2).state_dict()
    pipe = Pipeline.from_checkpoint(files["plain"], vae=files[vae])
    assert all(torch.equal(v, file_weights[k]) for k, v in pipe.autoencoder.state_dict().items())
    assert pipe.weights_text == {"vae": files[vae].name}
    plain = Pipeline.from_checkpoint(files["plain"])
    assert all(torch.equal(v, plain.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    assert not torch.equal(pipe.autoencoder.decoder.conv_out.weight, plain.autoencoder.decoder.conv_out.weight)


def test_ema_weights_are_used_when_asked_and_announced_otherwise(files):
    raw = Pipeline.from_checkpoint(files["plain"]).unet.state_dict()
    with pytest.warns(UserWarning, match="also holds EMA weights of the U-Net; --use_ema"):
        plain = Pipeline.from_checkpoint(files["ema"])
    assert all(torch.equal(v, raw[k]) for k, v in plain.unet.state_dict().items())
    ema = Pipeline.from_checkpoint(files["ema"], use_ema=True)
    assert all(torch.equal(v, 2 * raw[k]) for k, v in ema.unet.state_dict().items())
    assert ema.weights_text == {"use_ema": "True"}


@pytest.mark.parametrize("kwargs, message", [
    ({"use_ema": True}, "has no EMA weights"),
    ({"vae": "diffusers_vae"}, "is a VAE in diffusers' layout"),
    ({"vae": "lora"}, "holds no autoencoder"),
])
def test_bad_model_files_are_refused_in_one_line(files, kwargs, message):
    kwargs = {k: files[v] if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(InputError, match=message):
        Pipeline.from_checkpoint(files["plain"], **kwargs)


def test_txt2img_records_the_vae_and_its_replay_needs_it(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--ckpt", str(files["plain"]), "--outdir", str(out), "--steps", "1", "--skip_grid"]
    assert run_main(txt2img.main, [*argv, "--prompt", "a circle", "--vae", str(files["vae"])]) == 0
    png = capsys.readouterr().out.split()[0]
    assert run_main(txt2img.main, [*argv, "--replay", png]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {png} was made with the VAE vae.safetensors; pass that file "
                                               "with --vae PATH")
    assert run_main(txt2img.main, [*argv, "--prompt", "a", "--vae", str(tmp_path / "gone.safetensors")]) == 1
    assert "VAE not found" in capsys.readouterr().err
