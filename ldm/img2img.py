"""Starting from an image: img2img strength and inpainting, as pieces the pipeline chains.

img2img (SDEdit, Meng et al. 2022): the image's latents are noised to the noise level of the
sampler step that matches `strength` and only the last `int(strength * num_steps)` steps of the
sampler's schedule run (`ldm.samplers.sample` with a `StartPoint`).
Inpainting keeps the unmasked region of the image: a plain U-Net (4 input channels) through
`LatentBlend`; a Stable Diffusion 2 inpainting U-Net (9 input channels) sees the mask and the
masked image's latents at every step through `InpaintingUNet`. Masks are 1 where to repaint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.errors import InputError
from ldm.guidance import UNet


def default_strength(inpainting: bool) -> float:
    """0.75 for img2img (the original SD script's default); 1 for inpainting, which repaints the
    masked region from (almost) pure noise."""
    return 1.0 if inpainting else 0.75


def start_step(num_steps: int, strength: float) -> int:
    """Index of the first of `num_steps` sampler steps that img2img runs: `strength` 1 runs all,
    0.5 the second half. The count is truncated, as in ldm's img2img.py, diffusers' img2img pipeline
    and AUTOMATIC1111 (0.75 of 10 steps runs 7), so a strength starts where theirs do."""
    if not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1] (1 = repaint fully), got {strength}")
    num_run = int(strength * num_steps)
    if num_run == 0:
        raise InputError(f"strength {strength} of {num_steps} steps runs no step; raise the strength or the steps")
    return num_steps - num_run


def latent_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks (B, 1, H, W) in [0, 1], 1 = repaint -> binary masks (B, 1, h, w) at the latent size.

    Binarised at 0.5 and downsampled by nearest neighbour, as SD 2's inpainting was trained.
    """
    return F.interpolate((masks >= 0.5).to(masks.dtype), size=size, mode="nearest")


def masked_images(images: Tensor, masks: Tensor) -> Tensor:
    """Images (B, 3, H, W) with the region to repaint (mask >= 0.5) set to 0 (mid grey), as SD 2's
    inpainting U-Net sees them."""
    return images * (masks < 0.5).to(images.dtype)


class InpaintingUNet:
    """An SD 2 inpainting U-Net (in_channels 9) called like a plain one on latents (B, 4, h, w).

    Each call concatenates, along channels and in this order, x_t, the latent mask (B, 1, h, w)
    and the masked image's latents (B, 4, h, w). A batch of k * B rows (classifier-free guidance
    runs 2B) gets the conditioning repeated k times.
    """

    def __init__(self, unet: UNet, masks: Tensor, masked_latents: Tensor) -> None:
        self.unet = unet
        self.conditioning = torch.cat([masks, masked_latents], dim=1)

    def __call__(self, x_t: Tensor, t: Tensor, context: Tensor, **kwargs: Tensor) -> Tensor:
        conditioning = self.conditioning.to(x_t.device, x_t.dtype)
        conditioning = conditioning.repeat(x_t.shape[0] // conditioning.shape[0], 1, 1, 1)
        return self.unet(torch.cat([x_t, conditioning], dim=1), t, context, **kwargs)


class LatentBlend:
    """The sampler's ``x0_transform`` for a plain U-Net: every prediction of x0 becomes the original
    latents outside the mask.

    The sampler re-derives eps from the edited x0 at its own noise level, so the unmasked region
    of x_t stays on the noising path of the original: for the deterministic samplers, x_t there
    is at every step the original noised with the initial noise to that step's level, which is
    the same as replacing that region of x_t after each step. DDIM and PLMS end at the small noise
    level ``alphas_cumprod[0]``, the others on the original up to rounding, so the caller applies
    the blend once more to the result.

    Args:
        latents: the original's latents (B, C, h, w).
        masks: (B, 1, h, w), 1 where to repaint, 0 where to keep the original.
    """

    def __init__(self, latents: Tensor, masks: Tensor) -> None:
        self.latents = latents
        self.masks = masks

    def __call__(self, x0: Tensor) -> Tensor:
        """``x0`` (B, C, h, w) with the original's latents outside the mask."""
        return torch.where(self.masks.to(x0.device) > 0.5, x0, self.latents.to(x0))
