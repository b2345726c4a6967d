"""Training objective of the KL autoencoder: the latent-diffusion paper's `LPIPSWithDiscriminator`.

Generator (autoencoder) step, for images x and reconstructions x_rec, both (B, C, H, W) in [-1, 1]:

    rec  = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)      per pixel, (B, C, H, W)
           + edge_weight * (|dx(x) - dx(x_rec)| + |dy(x) - dy(x_rec)|)   (ours; 0 in the original)
    nll  = sum over C, H, W of (rec / exp(logvar) + logvar), averaged over the batch
    kl   = posterior.kl() (summed over latent dimensions), averaged over the batch
    loss = nll + kl_weight * kl + d_weight * disc_factor * (-mean(D(x_rec)))

with a learned scalar `logvar` and the adaptive weight
`d_weight = disc_weight * clamp(|grad nll| / (|grad g_loss| + 1e-4), 0, 1e4)`, both gradients taken with
respect to the decoder's last layer. Discriminator step: `disc_factor * hinge(D(x), D(x_rec))`.
`disc_factor` is 0 before step `disc_start`, so the autoencoder first trains on the reconstruction alone;
the discriminator may start `disc_warmup` steps earlier (ours; 0 in the original).

Parameter names (`logvar`, `discriminator.main.*`) follow the original's `loss.*` checkpoint keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder import DiagonalGaussian
from ldm.config import config_dict, config_kwargs
from ldm.errors import InputError

# File name under which torchvision caches the ImageNet VGG16 weights that LPIPS is built on.
VGG16_FILE = "vgg16-397923af.pth"

# `lossconfig.params` keys of the original that change nothing: it stores `pixelloss_weight` but never uses it.
ORIGINAL_ONLY_KEYS = {"pixelloss_weight"}


@dataclass
class AutoencoderLossConfig:
    """`lossconfig.params` of the original YAMLs (same names); defaults are Stable Diffusion's f=8 autoencoder's."""

    disc_start: int = 50001
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    perceptual_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    logvar_init: float = 0.0
    disc_factor: float = 1.0
    # Not in the original: L1 between the images' horizontal and vertical pixel differences. It weighs
    # outlines, which the plain L1 term barely sees on small objects; a stand-in for LPIPS without VGG.
    # Measured on shapes-v1 for decoder fine-tuning; from scratch on crops (weight 3) the autoencoder
    # learned to draw the background alone.
    edge_weight: float = 0.0
    # Not in the original: steps before `disc_start` in which the discriminator trains alone, so that a fresh
    # one has learnt something by the time the decoder follows its gradients (fine-tuning a decoder that
    # already reconstructs well, where it starts out unable to tell the two apart).
    disc_warmup: int = 0

    @classmethod
    def from_dict(cls, params: dict) -> AutoencoderLossConfig:
        return cls(**config_kwargs(cls, params, ORIGINAL_ONLY_KEYS))

    def to_dict(self) -> dict:
        return config_dict(self)


def edge_difference(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """|dx(images) - dx(reconstructions)| + |dy(...) - dy(...)| per pixel, (B, C, H, W): differences to the
    right and lower neighbour, 0 in the last column and row."""
    error = images - reconstructions  # the differences of the error are the errors of the differences
    dx = F.pad((error[..., :, 1:] - error[..., :, :-1]).abs(), (0, 1))
    dy = F.pad((error[..., 1:, :] - error[..., :-1, :]).abs(), (0, 0, 0, 1))
    return dx + dy


def _init_weights(module: nn.Module) -> None:
    """pix2pix initialisation: convolution weights N(0, 0.02), batch-norm scales N(1, 0.02) and zero shifts."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: images (B, in_channels, H, W) -> one real/fake logit per patch.

    `num_layers` stride-2 4x4 convolutions (the first without normalisation), then two stride-1 ones, so
    256 x 256 images give (B, 1, 30, 30) logits with `num_layers=3`. Width doubles per layer up to 8 * ndf.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, num_layers + 1):
            out_channels = ndf * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            # No bias: the batch norm right after it has its own shift.
            layers += [nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2, True)]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lpips_vgg() -> nn.Module:
    """LPIPS with a VGG16 trunk, from local weights only: (B, 3, H, W) x 2 in [-1, 1] -> (B, 1, 1, 1)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    # lpips would download the trunk on construction: check first so that nothing is fetched.
    if not path.is_file():
        raise InputError(f"the perceptual loss needs the VGG16 ImageNet weights {path}, which are missing; "
                         "put them there or pass --perceptual_weight 0 to train without the perceptual term")
    try:
        import lpips  # an optional training dependency
    except ModuleNotFoundError:
        raise InputError("the perceptual loss needs the lpips package: pip install lpips, "
                         "or pass --perceptual_weight 0 to train without the perceptual term") from None
    return lpips.LPIPS(net="vgg", pretrained=True, verbose=False)


class AutoencoderLoss(nn.Module):
    """Reconstruction NLL + KL + adaptive-weight PatchGAN loss of the KL autoencoder (see the module docstring).

    `perceptual` replaces LPIPS-VGG (any module mapping two (B, C, H, W) batches to something broadcastable
    to (B, C, H, W), usually (B, 1, 1, 1)); it is used only when `perceptual_weight > 0`, and is frozen and
    kept in eval mode. `logvar` is a parameter of this module: the original's optimisers leave it out, so it
    stays at `logvar_init` unless the training script adds it to the autoencoder's optimiser.
    """

    def __init__(self, config: AutoencoderLossConfig, perceptual: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.logvar = nn.Parameter(torch.tensor(float(config.logvar_init)))
        self.discriminator = NLayerDiscriminator(config.disc_in_channels, num_layers=config.disc_num_layers)
        if perceptual is None and config.perceptual_weight > 0:
            perceptual = lpips_vgg()
        self.perceptual_loss = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False)
            perceptual.eval()

    def train(self, mode: bool = True) -> AutoencoderLoss:
        super().train(mode)
        # A fixed metric: LPIPS's dropout layers must stay off while the rest trains.
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def disc_factor(self, step: int, discriminator: bool = False) -> float:
        """Weight of the generator's adversarial loss at training step `step` (of the discriminator's with
        `discriminator`): 0 before `disc_start` (`disc_start - disc_warmup`)."""
        start = self.config.disc_start - (self.config.disc_warmup if discriminator else 0)
        return self.config.disc_factor if step >= start else 0.0

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """disc_weight * ||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, 1e4];
        a detached scalar, so that the balance itself is not optimised."""
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        ratio = nll_grads.norm() / (g_grads.norm() + 1e-4)
        return ratio.clamp(0.0, 1e4).detach() * self.config.disc_weight

    def generator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor, posterior: DiagonalGaussian,
                       step: int, last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder loss (scalar) and detached scalar logs.

        images, reconstructions: (B, C, H, W) in [-1, 1]; posterior: the encoder's output for `images`;
        last_layer: the decoder's final weight (`decoder.conv_out.weight`), for the adaptive weight.
        Before `disc_start` the discriminator is not run and `g_loss`, `d_weight` are logged as 0; under
        `torch.no_grad` (validation) `d_weight` is 0, as in the original.
        """
        batch_size = images.shape[0]
        rec = (images - reconstructions).abs()
        if self.config.perceptual_weight > 0:
            rec = rec + self.config.perceptual_weight * self.perceptual_loss(images, reconstructions)
        if self.config.edge_weight > 0:
            rec = rec + self.config.edge_weight * edge_difference(images, reconstructions)
        nll = (rec / self.logvar.exp() + self.logvar).sum() / batch_size
        kl = posterior.kl().sum() / batch_size
        loss = nll + self.config.kl_weight * kl

        disc_factor = self.disc_factor(step)
        g_loss = d_weight = loss.new_zeros(())
        if disc_factor > 0:
            # Detached weights: this step trains the autoencoder only and leaves no gradient on the discriminator.
            weights = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            logits_fake = torch.func.functional_call(self.discriminator, weights, (reconstructions,))
            g_loss = -logits_fake.mean()
            if nll.requires_grad:
                d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss

        logs = {
            "total_loss": loss.detach(),
            "logvar": self.logvar.detach(),
            "kl_loss": kl.detach(),
            "nll_loss": nll.detach(),
            "rec_loss": rec.detach().mean(),
            "d_weight": d_weight.detach(),
            "disc_factor": loss.new_tensor(disc_factor),
            "g_loss": g_loss.detach(),
        }
        return loss, logs

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of the discriminator (scalar, gradients reach the discriminator only) and scalar logs.

        images, reconstructions: (B, C, H, W); real and fake batches go through separately, so that each
        gets its own batch-norm statistics. Before `disc_start - disc_warmup` the loss is 0 (still
        differentiable).
        """
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        disc_factor = self.disc_factor(step, discriminator=True)
        loss = disc_factor * hinge_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs
