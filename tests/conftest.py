"""Tiny model configs shared by the tests: every stage at a size that runs in milliseconds on a CPU; tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from ldm.autoencoder import AutoencoderConfig
from ldm.pipeline import Pipeline
from ldm.sd_checkpoint import ModelSpec
from ldm.text_encoder import TextEncoderConfig
from ldm.unet import UNetConfig


@pytest.fixture(autouse=True, scope="session")
def _own_compile_cache(tmp_path_factory):
    """txt2img and the server look up compiled programs by default (--compile auto): never in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LDM_COMPILE_CACHE", str(tmp_path_factory.mktemp("compile-cache")))
    yield
    mp.undo()


def tiny_spec(parameterization: str = "eps") -> ModelSpec:
    """64 x 64 images, f=8 autoencoder (8 x 8 x 4 latents), 2-layer text encoder of width 64."""
    return ModelSpec(
        family="custom",
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                        num_heads=4, context_dim=64),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, resolution=64),
        text_encoder=TextEncoderConfig(width=64, layers=2, heads=4),
        parameterization=parameterization,
        image_size=64,
    )


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values, including the zero-initialised output layers, so that
    tests comparing two implementations cannot pass on all-zero branches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight")):
                p.copy_(1 + std * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(std * torch.randn(p.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint whose U-Net output is not zero, so that prompts, seeds and settings show in the pixels."""
    pipe = Pipeline.from_spec(tiny_spec(), name="tiny")
    randomize_(pipe.unet, seed=1)
    return pipe.save(tmp_path_factory.mktemp("random") / "tiny.safetensors")


@pytest.fixture
def tiny_pipeline() -> Pipeline:
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(tiny_spec(), name="tiny")
    randomize_(pipe.unet, seed=1)
    return pipe


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file of (name, bytes) members, as a WebDataset shard."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
