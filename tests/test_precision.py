"""Precision names -> stage dtypes: `auto` picks bf16 only for large models on CPUs with bf16 matrix instructions."""

import pytest
import torch

from ldm import precision
from ldm.errors import InputError
from ldm.generate import BUNDLED_CHECKPOINT
from ldm.pipeline import Pipeline
from ldm.settings import GenerationSettings

CPU, GPU = torch.device("cpu"), torch.device("cuda")
SD15_UNET_PARAMETERS = 859_520_964


@pytest.mark.parametrize("bf16_matmul", [True, False])
def test_fixed_names_mean_their_dtype_on_every_device(monkeypatch, bf16_matmul):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: bf16_matmul)
    for device in (CPU, GPU):
        for size in (10**6, SD15_UNET_PARAMETERS):
            for name, dtype in (("full", torch.float32), ("fp32", torch.float32), ("fp16", torch.float16),
                                ("bf16", torch.bfloat16),
                                ("autocast", torch.float32 if device == CPU else torch.float16)):
                assert precision.stage_dtypes(name, device, size) == every_stage(dtype, dtype)


def every_stage(dtype: torch.dtype, text_dtype: torch.dtype) -> dict[str, torch.dtype]:
    return {"unet": dtype, "text_encoder": text_dtype, "autoencoder": dtype}


def test_auto_is_bf16_for_large_unets_on_cpus_that_multiply_bf16(monkeypatch):
    bf16, fp32, fp16 = torch.bfloat16, torch.float32, torch.float16
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    assert precision.stage_dtypes("auto", CPU, SD15_UNET_PARAMETERS) == every_stage(bf16, fp32)
    assert precision.stage_dtypes("auto", CPU, 4_283_012) == every_stage(fp32, fp32)  # the bundled model's U-Net
    assert precision.stage_dtypes("auto", GPU, 4_283_012) == every_stage(fp16, fp16)
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    assert precision.stage_dtypes("auto", CPU, SD15_UNET_PARAMETERS) == every_stage(fp32, fp32)
    assert precision.stage_dtypes("auto", GPU, SD15_UNET_PARAMETERS) == every_stage(fp16, fp16)


def test_an_unknown_name_is_one_line():
    with pytest.raises(InputError, match="unknown precision 'half'; choose one of auto, autocast, full"):
        precision.stage_dtypes("half", CPU, 1)


def test_from_checkpoint_resolves_a_name_for_the_model_it_loads(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    assert Pipeline.from_checkpoint(BUNDLED_CHECKPOINT, dtype="auto").dtype == torch.float32
    settings = GenerationSettings(prompt="a large red circle", steps=4, seed=1)
    expected = Pipeline.from_checkpoint(BUNDLED_CHECKPOINT).generate(settings, output_type="tensor", progress=False)
    monkeypatch.setattr(precision, "AUTO_BF16_MIN_PARAMETERS", 10**6)  # the bundled U-Net counts as large
    pipe = Pipeline.from_checkpoint(BUNDLED_CHECKPOINT, dtype="auto")
    for module, dtype in ((pipe.unet, torch.bfloat16), (pipe.autoencoder, torch.bfloat16),
                          (pipe.text_encoder, torch.float32)):
        assert {p.dtype for p in module.parameters()} == {dtype}
    images = pipe.generate(settings, output_type="tensor", progress=False).float()
    # bf16 rounding (8 bits of mantissa) through 4 steps and the decoder: a few 8-bit levels on average (a
    # shape's edge pixels may flip), not equal.
    error = (images - expected).abs().mean()
    assert 0 < error < 0.03
