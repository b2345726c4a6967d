"""Autoencoder: original key layout, shapes, the posterior and its KL, a round trip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ldm.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, ResnetBlock
from tests.conftest import tiny_spec


def test_sd_config_has_the_original_key_layout():
    with torch.device("meta"):
        vae = AutoencoderKL(AutoencoderConfig())
    keys = vae.state_dict()
    assert round(sum(p.numel() for p in vae.parameters()) / 1e4) == 8365  # 83.65M, as released
    assert len(keys) == 248
    assert keys["encoder.down.0.block.0.conv1.weight"].shape == (128, 128, 3, 3)
    assert keys["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert keys["encoder.down.2.downsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in keys
    assert keys["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert keys["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert keys["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert keys["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert keys["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert keys["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert keys["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in keys


def test_shapes_follow_the_downsampling_factor():
    vae = AutoencoderKL(tiny_spec().autoencoder).eval()
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    posterior = vae.encode(images)
    assert posterior.mean.shape == (2, 4, 8, 6)
    assert vae.decode(posterior.mode()).shape == (2, 3, 64, 48)


def test_kl_matches_torch_distributions_and_is_nonnegative():
    moments = torch.randn(3, 8, 4, 4)
    posterior = DiagonalGaussian(moments)
    reference = kl_divergence(Normal(posterior.mean, posterior.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(posterior.kl(), reference, rtol=1e-5)
    assert (posterior.kl() >= 0).all()
    standard = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert standard.kl().item() == 0.0


def test_sampling_uses_the_generator_and_the_posterior_scale():
    log_var = 2 * torch.log(torch.tensor(0.5))
    moments = torch.cat([torch.full((1, 4, 64, 64), 2.0), torch.full((1, 4, 64, 64), log_var)], 1)
    posterior = DiagonalGaussian(moments)
    a = posterior.sample(torch.Generator().manual_seed(0))
    b = posterior.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 2.0) < 0.02 and abs(a.std().item() - 0.5) < 0.02


def test_round_trip_learns_to_reconstruct():
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_spec().autoencoder)
    images = torch.zeros(1, 3, 16, 16)
    images[:, 0, 4:12, 4:12] = 1.0  # a red square on black, in [-1, 1] after the shift below
    images = images * 2 - 1
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)

    def error() -> float:
        with torch.no_grad():
            return (vae.decode(vae.encode(images).mode()) - images).abs().mean().item()

    before = error()
    for _ in range(25):
        optimizer.zero_grad()
        recon, _ = vae(images, sample_posterior=False)
        (recon - images).abs().mean().backward()
        optimizer.step()
    assert error() < 0.5 * before


def test_resnet_block_in_place_activations_keep_outputs_and_gradients():
    # ResnetBlock applies SiLU in place to save memory; written out without in-place ops and with the
    # same weights, the block must give the same outputs and gradients (weights and input).
    torch.manual_seed(0)
    block = ResnetBlock(8, 16, dropout=0.0, num_groups=4)
    for norm in (block.norm1, block.norm2):  # away from the identity initialization
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)

    def plain(x: torch.Tensor) -> torch.Tensor:
        h = block.conv1(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, block.norm1.eps)))
        h = block.conv2(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, block.norm2.eps)))
        return block.nin_shortcut(x) + h

    weights = [x, *block.parameters()]
    out = block(x)
    grads = torch.autograd.grad((out * out.detach().sin()).sum(), weights)
    reference = plain(x)
    reference_grads = torch.autograd.grad((reference * reference.detach().sin()).sum(), weights)
    torch.testing.assert_close(out, reference)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad)
