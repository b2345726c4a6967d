"""AutoencoderLoss against closed forms and against gradients taken independently with torch.autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from ldm.errors import InputError
from ldm.losses import VGG16_FILE, AutoencoderLoss, AutoencoderLossConfig, NLayerDiscriminator, edge_difference


def no_perceptual(**overrides) -> AutoencoderLossConfig:
    return AutoencoderLossConfig(perceptual_weight=0.0, **overrides)


def random_batch(seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, DiagonalGaussian]:
    """images, reconstructions (2, 3, size, size) and a posterior over (2, 4, size/8, size/8) latents."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    reconstructions = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    moments = torch.randn(2, 8, size // 8, size // 8, generator=g)
    return images, reconstructions, DiagonalGaussian(moments)


class ChannelLogits(nn.Module):
    """Stub discriminator whose logits are the first channel of its input, so they are known in advance."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :1]


class MeanSquaredPerceptual(nn.Module):
    """Stub perceptual metric: a scaled per-sample mean squared error, (B, 1, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.num_calls = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.num_calls += 1
        return self.scale * (a - b).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def test_kl_term_is_weighted_batch_mean_of_closed_form_kl():
    images, _, posterior = random_batch()
    loss_fn = AutoencoderLoss(no_perceptual(kl_weight=0.25))
    # Perfect reconstruction and logvar 0: the NLL vanishes and only the KL term is left.
    loss, logs = loss_fn.generator_loss(images, images.clone(), posterior, step=0, last_layer=images)

    normal = torch.distributions.Normal(posterior.mean, posterior.std)
    kl_per_sample = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(logs["kl_loss"], kl_per_sample.mean())
    torch.testing.assert_close(loss, 0.25 * kl_per_sample.mean())


def test_loss_before_disc_start_is_l1_nll_plus_kl():
    images, reconstructions, posterior = random_batch(seed=1)
    loss_fn = AutoencoderLoss(no_perceptual(logvar_init=0.7, kl_weight=1e-3, disc_start=10))
    loss, logs = loss_fn.generator_loss(images, reconstructions, posterior, step=9, last_layer=images)

    num_elements = 3 * 16 * 16
    l1_per_sample = (images - reconstructions).abs().sum(dim=(1, 2, 3))
    nll = (l1_per_sample / torch.exp(torch.tensor(0.7)) + num_elements * 0.7).mean()
    kl = (0.5 * (posterior.mean**2 + posterior.std**2 - 1 - torch.log(posterior.std**2))).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(logs["nll_loss"], nll)
    torch.testing.assert_close(loss, nll + 1e-3 * kl)
    assert logs["disc_factor"] == 0 and logs["g_loss"] == 0 and logs["d_weight"] == 0


def test_discriminator_warms_up_alone_before_disc_start():
    images, reconstructions, posterior = random_batch(seed=2)
    loss_fn = AutoencoderLoss(no_perceptual(disc_start=10, disc_warmup=4, disc_num_layers=1))
    for step, generator_on, discriminator_on in ((5, False, False), (6, False, True), (10, True, True)):
        with torch.no_grad():
            _, logs = loss_fn.generator_loss(images, reconstructions, posterior, step=step, last_layer=images)
        d_loss, _ = loss_fn.discriminator_loss(images, reconstructions, step=step)
        assert (logs["disc_factor"] > 0) == generator_on and (d_loss > 0) == discriminator_on, step


def test_edge_term_adds_l1_of_neighbour_differences():
    images, reconstructions, posterior = random_batch(seed=2)
    plain = AutoencoderLoss(no_perceptual(kl_weight=0.0))
    edged = AutoencoderLoss(no_perceptual(kl_weight=0.0, edge_weight=0.5))
    loss, _ = edged.generator_loss(images, reconstructions, posterior, step=0, last_layer=images)
    base, _ = plain.generator_loss(images, reconstructions, posterior, step=0, last_layer=images)
    # Summed over all neighbour pairs, from the two images' own differences (torch.diff), per sample.
    edges = sum((torch.diff(images, dim=d) - torch.diff(reconstructions, dim=d)).abs().sum() for d in (2, 3)) / 2
    torch.testing.assert_close(loss, base + 0.5 * edges)
    # One changed pixel away from the border shows in its own, left and upper neighbours' differences.
    flat = torch.zeros(1, 1, 4, 4)
    spot = flat.clone()
    spot[0, 0, 1, 1] = 1.0
    expected = torch.tensor([[0.0, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(edge_difference(flat, spot)[0, 0], expected)


def test_discriminator_hinge_loss_on_known_logits():
    loss_fn = AutoencoderLoss(no_perceptual(disc_start=5, disc_factor=2.0))
    loss_fn.discriminator = ChannelLogits()
    images = torch.tensor([0.5, 2.0, -1.0, 0.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    reconstructions = torch.tensor([-2.0, 0.5, -0.5, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    # real: relu(1 - [0.5, 2, -1, 0]) = [0.5, 0, 2, 1]; fake: relu(1 + [-2, 0.5, -0.5, 1]) = [0, 1.5, 0.5, 2]
    expected = 2.0 * 0.5 * (3.5 / 4 + 4.0 / 4)

    loss, logs = loss_fn.discriminator_loss(images, reconstructions, step=5)
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(logs["logits_real"], torch.tensor(1.5 / 4))
    loss_before, _ = loss_fn.discriminator_loss(images, reconstructions, step=4)
    assert loss_before == 0


def test_discriminator_is_pix2pix_patchgan():
    disc = NLayerDiscriminator(in_channels=3, ndf=64, num_layers=3)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3
    assert "main.2.weight" in disc.state_dict() and "main.3.running_mean" in disc.state_dict()
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.001


@pytest.fixture
def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32))


def test_adaptive_weight_is_ratio_of_gradient_norms(tiny_autoencoder):
    torch.manual_seed(1)
    loss_fn = AutoencoderLoss(no_perceptual(disc_start=0, disc_weight=0.5, kl_weight=1e-2, logvar_init=0.3))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    reconstructions, posterior = tiny_autoencoder(images, generator=torch.Generator().manual_seed(3))
    last_layer = tiny_autoencoder.decoder.conv_out.weight
    loss, logs = loss_fn.generator_loss(images, reconstructions, posterior, step=0, last_layer=last_layer)

    # Reference: the same terms rebuilt by hand, their gradients taken separately.
    logvar = torch.tensor(0.3)
    nll = ((images - reconstructions).abs() / logvar.exp() + logvar).sum() / 2
    g_loss = -loss_fn.discriminator(reconstructions).mean()  # train-mode batch norm: same logits as inside
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    d_weight = 0.5 * torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4)
    torch.testing.assert_close(logs["d_weight"], d_weight)
    torch.testing.assert_close(logs["g_loss"], g_loss.detach())
    expected = nll + 1e-2 * posterior.kl().mean() + d_weight * g_loss
    torch.testing.assert_close(loss, expected)


def test_gradients_reach_decoder_in_generator_step_and_discriminator_only_in_disc_step(tiny_autoencoder):
    loss_fn = AutoencoderLoss(no_perceptual(disc_start=0))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    reconstructions, posterior = tiny_autoencoder(images, generator=torch.Generator().manual_seed(5))
    last_layer = tiny_autoencoder.decoder.conv_out.weight

    loss, _ = loss_fn.generator_loss(images, reconstructions, posterior, step=0, last_layer=last_layer)
    loss.backward()
    assert last_layer.grad is not None and last_layer.grad.abs().sum() > 0
    assert tiny_autoencoder.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())

    tiny_autoencoder.zero_grad(set_to_none=True)
    d_loss, _ = loss_fn.discriminator_loss(images, reconstructions, step=0)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert loss_fn.discriminator.main[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_autoencoder.parameters())


def test_no_adaptive_weight_under_no_grad(tiny_autoencoder):
    loss_fn = AutoencoderLoss(no_perceptual(disc_start=0))
    images = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        reconstructions, posterior = tiny_autoencoder(images, sample_posterior=False)
        loss, logs = loss_fn.generator_loss(images, reconstructions, posterior, step=0,
                                            last_layer=tiny_autoencoder.decoder.conv_out.weight)
    assert logs["d_weight"] == 0
    torch.testing.assert_close(loss, logs["nll_loss"] + 1e-6 * logs["kl_loss"])


def test_injected_perceptual_module_is_used_weighted_and_frozen():
    images, reconstructions, posterior = random_batch(seed=6)
    perceptual = MeanSquaredPerceptual()
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=2.0, kl_weight=0.0), perceptual=perceptual)
    loss, logs = loss_fn.generator_loss(images, reconstructions, posterior, step=0, last_layer=images)

    p_per_sample = 3.0 * (images - reconstructions).pow(2).mean(dim=(1, 2, 3))
    l1_per_sample = (images - reconstructions).abs().sum(dim=(1, 2, 3))
    # The (B, 1, 1, 1) perceptual distance is added to every pixel before the sum, as in the original.
    expected = (l1_per_sample + 2.0 * 3 * 16 * 16 * p_per_sample).mean()
    torch.testing.assert_close(loss, expected)
    assert perceptual.num_calls == 1
    assert not perceptual.scale.requires_grad
    loss_fn.train()
    assert loss_fn.discriminator.training and not perceptual.training


def test_missing_vgg_weights_raise_input_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InputError) as info:
        AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=1.0))
    message = str(info.value)
    assert VGG16_FILE in message and "--perceptual_weight 0" in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()


def test_cached_vgg_weights_build_pretrained_lpips_vgg(monkeypatch, tmp_path):
    lpips = pytest.importorskip("lpips")  # in the `train` extra, not the `test` one
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / VGG16_FILE).touch()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    calls = []

    def fake_lpips(**kwargs):
        calls.append(kwargs)
        return MeanSquaredPerceptual()

    monkeypatch.setattr(lpips, "LPIPS", fake_lpips)
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(perceptual_weight=1.0))
    assert calls and calls[0]["net"] == "vgg" and calls[0]["pretrained"] is True
    assert isinstance(loss_fn.perceptual_loss, MeanSquaredPerceptual)


def test_config_reads_original_lossconfig_params():
    config = AutoencoderLossConfig.from_dict({"disc_start": 50001, "kl_weight": 0.000001, "disc_weight": 0.5,
                                              "pixelloss_weight": 1.0})
    assert config == AutoencoderLossConfig()
    with pytest.raises(ValueError, match="disc_wieght"):
        AutoencoderLossConfig.from_dict({"disc_start": 1, "disc_wieght": 0.5})
