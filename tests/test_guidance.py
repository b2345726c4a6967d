from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm.guidance import ClassifierFreeGuidance
from ldm.schedule import NoiseSchedule
from ldm.timestep_samplers import sample_ddim


class RecordingUNet:
    """Per-sample toy U-Net (no cross-sample mixing, so batching cannot change its outputs)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.randn(8, 4, generator=gen)
        self.batch_sizes: list[int] = []

    def __call__(self, x_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        assert x_t.shape[0] == t.shape[0] == context.shape[0]
        self.batch_sizes.append(x_t.shape[0])
        shift = (context.mean(dim=1) @ self.proj).view(-1, 4, 1, 1)
        return torch.tanh(x_t) * torch.cos(t.float() / 50).view(-1, 1, 1, 1) + shift


def _inputs(batch_size: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(batch_size, 4, 6, 6, generator=gen)
    t = torch.randint(0, 1000, (batch_size,), generator=gen)
    context = torch.randn(batch_size, 7, 8, generator=gen)
    uncond_context = torch.randn(batch_size, 7, 8, generator=gen)
    return x_t, t, context, uncond_context


def test_scale_one_is_the_conditional_call_alone() -> None:
    x_t, t, context, _ = _inputs()
    unet = RecordingUNet()
    guided = ClassifierFreeGuidance(unet, context, None, guidance_scale=1.0)(x_t, t)
    assert unet.batch_sizes == [3]
    torch.testing.assert_close(guided, unet(x_t, t, context), rtol=0, atol=0)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0, 7.5])
def test_batched_guidance_equals_separate_calls(guidance_scale: float) -> None:
    x_t, t, context, uncond_context = _inputs()
    unet = RecordingUNet()
    guided = ClassifierFreeGuidance(unet, context, uncond_context, guidance_scale)(x_t, t)
    assert unet.batch_sizes == [6]
    cond, uncond = unet(x_t, t, context), unet(x_t, t, uncond_context)
    torch.testing.assert_close(guided, uncond + guidance_scale * (cond - uncond))


def test_one_unet_call_per_sampler_step_with_double_batch() -> None:
    x_t, _, context, uncond_context = _inputs(batch_size=2)
    unet = RecordingUNet()
    denoiser = ClassifierFreeGuidance(unet, context, uncond_context, guidance_scale=7.5)
    sample_ddim(denoiser, x_t, NoiseSchedule(), 6, progress=False)
    assert unet.batch_sizes == [4] * 6


def test_missing_or_mismatched_uncond_context_raises() -> None:
    _, _, context, uncond_context = _inputs()
    with pytest.raises(ValueError, match="uncond_context"):
        ClassifierFreeGuidance(RecordingUNet(), context, None, guidance_scale=7.5)
    with pytest.raises(ValueError, match="uncond_context"):
        ClassifierFreeGuidance(RecordingUNet(), context, uncond_context[:, :5], guidance_scale=7.5)
