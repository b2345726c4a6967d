"""Attention backends: each computes softmax(q k^T / sqrt(d)) v, and switching a model changes nothing but speed."""

from __future__ import annotations

import pytest
import torch

import ldm.attention
from ldm.attention import CrossAttention, attention, set_attention_backend
from ldm.autoencoder import AutoencoderKL
from ldm.errors import InputError
from ldm.unet import UNetModel
from tests.conftest import randomize_, tiny_spec

# The backends every install has; xformers needs a CUDA device.
CPU_BACKENDS = ("sdpa", "sliced", "math")
MAX_RELATIVE_ERROR = 1e-5


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The definition, in float64, one head at a time."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            weights = torch.softmax(q[b, h] @ k[b, h].T / q.shape[-1] ** 0.5, dim=-1)
            out[b, h] = weights @ v[b, h]
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_compute_attention(backend):
    generator = torch.Generator().manual_seed(0)
    # 10 queries over 7 keys (cross-attention shapes); slices of 3 leave a remainder of one query.
    q = torch.randn(2, 3, 10, 8, generator=generator)
    k, v = torch.randn(2, 2, 3, 7, 8, generator=generator).mul(2).unbind(0)
    out = attention(q, k, v, backend, slice_size=3)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, reference_attention(q, k, v).float()) <= MAX_RELATIVE_ERROR


def test_half_precision_logits_do_not_overflow():
    # q k^T = 32 * 32 * 64 = 65536 is past the float16 maximum (65504): computed in float16 it is inf,
    # and the softmax of inf logits is NaN. All logits are equal, so the answer is the mean of v.
    q = torch.full((1, 1, 2, 64), 32.0, dtype=torch.float16)
    k = torch.full((1, 1, 3, 64), 32.0, dtype=torch.float16)
    v = torch.arange(3 * 64, dtype=torch.float16).reshape(1, 1, 3, 64) / 100
    for backend in ("sliced", "math"):
        out = attention(q, k, v, backend, slice_size=1)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out), rtol=1e-3, atol=1e-3)


def tiny_unet() -> UNetModel:
    return randomize_(UNetModel(tiny_spec().unet), seed=3).eval()


def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    # 8 x 8 latents: 64 tokens at the first level and 16 at the second, so slices of 5 leave remainders.
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([999, 3]),
            torch.randn(2, 11, 64, generator=generator))


def test_unet_gives_the_same_numbers_with_every_backend():
    unet = tiny_unet()
    x_t, t, context = tiny_inputs()
    outputs = {}
    with torch.no_grad():
        for backend in CPU_BACKENDS:
            set_attention_backend(unet, backend, slice_size=5)
            outputs[backend] = unet(x_t, t, context)
    for backend in ("sliced", "math"):
        assert relative_error(outputs[backend], outputs["sdpa"]) <= MAX_RELATIVE_ERROR, backend


def test_autoencoder_attention_follows_the_switch():
    autoencoder = AutoencoderKL(tiny_spec().autoencoder)
    randomize_(autoencoder, seed=5)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    outputs = {}
    with torch.no_grad():
        for backend in CPU_BACKENDS:
            # The encoder's and the decoder's mid-block attention; slices of 5 over 64 pixels.
            assert set_attention_backend(autoencoder, backend, slice_size=5) == 2
            outputs[backend] = autoencoder.decode(autoencoder.encode(images).mode())
    for backend in ("sliced", "math"):
        assert relative_error(outputs[backend], outputs["sdpa"]) <= MAX_RELATIVE_ERROR, backend


def test_sliced_attention_trains_like_sdpa():
    x_t, t, context = tiny_inputs()
    grads = {}
    for backend in ("sdpa", "sliced"):
        unet = tiny_unet().train()
        set_attention_backend(unet, backend, slice_size=5)
        unet(x_t, t, context).square().mean().backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in unet.parameters()])
    assert relative_error(grads["sliced"], grads["sdpa"]) <= MAX_RELATIVE_ERROR


def test_switch_reaches_every_attention_layer(monkeypatch):
    unet = tiny_unet()
    num_layers = sum(isinstance(m, CrossAttention) for m in unet.modules())
    assert num_layers == 2 * 7  # self- and cross-attention in 2 input, 1 middle and 4 output transformers
    calls = []
    original = ldm.attention.math_attention
    monkeypatch.setattr(ldm.attention, "math_attention", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        assert set_attention_backend(unet, "math") == num_layers
        unet(*tiny_inputs())
        assert len(calls) == num_layers
        assert set_attention_backend(unet, "sdpa") == num_layers
        unet(*tiny_inputs())
        assert len(calls) == num_layers


def test_bad_backend_requests_are_input_errors():
    unet = tiny_unet()
    with pytest.raises(InputError, match="unknown attention backend 'flash'"):
        set_attention_backend(unet, "flash")
    with pytest.raises(InputError, match="slice size"):
        set_attention_backend(unet, "sliced", slice_size=0)
    # Not installed here, or installed but the model is on the CPU: either way a one-line error.
    with pytest.raises(InputError, match="xformers"):
        set_attention_backend(unet, "xformers")
    assert {m.attention_backend for m in unet.modules() if isinstance(m, CrossAttention)} == {"sdpa"}
