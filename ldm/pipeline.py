"""Text -> latents -> images: the three stages chained by DDIM with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ldm.autoencoder import AutoencoderKL
from ldm.errors import InputError
from ldm.guidance import ClassifierFreeGuidance
from ldm.samplers import randn, sample_ddim
from ldm.schedule import NoiseSchedule
from ldm.sd_checkpoint import ModelSpec, detect_spec, read_checkpoint, split_state_dict, write_checkpoint
from ldm.text_encoder import TextEncoder
from ldm.unet import UNetModel


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arrays.permute(0, 2, 3, 1).cpu().numpy()]


def check_size(height: int, width: int, factor: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            raise InputError(f"{name} must be a positive multiple of {factor}, got {value} "
                             f"(try {max(factor, round(value / factor) * factor)})")


class Pipeline:
    """A loaded text-to-image model: `unet`, `text_encoder`, `autoencoder`, `schedule`, `spec`.

    Each stage can be driven on its own: `text_encoder(prompts)` -> context (B, 77, D),
    `unet(x_t, t, context)` -> prediction, `encode(images)` / `decode(latents)` for the
    autoencoder with the latent scale factor applied.
    """

    def __init__(self, spec: ModelSpec, unet: UNetModel, text_encoder: TextEncoder, autoencoder: AutoencoderKL,
                 name: str = ""):
        self.spec = spec
        self.unet = unet.eval()
        self.text_encoder = text_encoder.eval()
        self.autoencoder = autoencoder.eval()
        self.schedule = NoiseSchedule(**spec.schedule)
        self.name = name or spec.family

    @classmethod
    def from_spec(cls, spec: ModelSpec, name: str = "") -> Pipeline:
        """A pipeline with freshly initialised weights (for training and tests)."""
        return cls(spec, UNetModel(spec.unet), TextEncoder(spec.text_encoder), AutoencoderKL(spec.autoencoder), name)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: str | Path | None = None, prediction: str | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Pipeline:
        """Load an original SD 1.x/2.x checkpoint or one of ours; `config` is an optional SD inference YAML,
        `prediction` ("eps" or "v") overrides what the checkpoint implies."""
        state_dict, metadata = read_checkpoint(path)
        spec = detect_spec(state_dict, metadata, prediction, config)
        parts = split_state_dict(state_dict)
        with torch.device("meta"):  # no random init: every weight comes from the file
            modules = UNetModel(spec.unet), TextEncoder(spec.text_encoder), AutoencoderKL(spec.autoencoder)
        pipe = cls(spec, *modules, name=Path(path).stem)
        for part, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                             ("autoencoder", pipe.autoencoder)):
            load_strict(module, parts[part], part, path)
        return pipe.to(device, dtype)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write all weights and the spec to one .safetensors file that `from_checkpoint` reads alone."""
        return write_checkpoint(path, self.spec, self.unet.state_dict(), self.autoencoder.state_dict(),
                                self.text_encoder.state_dict(), metadata)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        for module in (self.unet, self.text_encoder, self.autoencoder):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8) (posterior mean)."""
        return self.autoencoder.encode(images).mode() * self.autoencoder.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        return self.autoencoder.decode(latents / self.autoencoder.scale_factor).clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], num_steps: int = 50, guidance_scale: float = 7.5,
                 eta: float = 0.0, seed: int | Sequence[int] = 0, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None,
                 negative_prompts: str | Sequence[str] = "", output_type: str = "pil",
                 progress: bool = True) -> list[Image.Image] | torch.Tensor:
        """Generate one image per prompt.

        `seed` is the seed of the first image; image k uses seed + k (or pass one seed per prompt).
        `latents` (B, 4, h, w), if given, replace the seeded initial noise. `negative_prompts` (one for
        all, or one per prompt) replace the empty unconditional prompt of guidance. Returns PIL images, or
        with `output_type="tensor"` images (B, 3, H, W) in [-1, 1], or with "latent" the latents.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        factor = self.autoencoder.config.downsampling_factor
        height = self.spec.image_size if height is None else height
        width = self.spec.image_size if width is None else width
        check_size(height, width, factor)
        if num_steps < 1:
            raise InputError(f"steps must be >= 1, got {num_steps}")
        if guidance_scale < 0:
            raise InputError(f"guidance scale must be >= 0, got {guidance_scale}")
        seeds = [seed + k for k in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise InputError(f"got {len(seeds)} seeds for {len(prompts)} prompts")

        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise InputError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")

        # 1. Prompts -> context; the negative (by default empty) prompt is the unconditional context.
        context = self.text_encoder(prompts).to(self.dtype)
        uncond_context = self.text_encoder(list(negative_prompts)).to(self.dtype) if guidance_scale != 1 else None
        # 2. Initial noise x_T in float32 from one CPU generator per image, which then also draws
        #    that image's sampler noise (eta > 0): image k is reproducible alone, on any device.
        shape = (len(prompts), self.unet.config.in_channels, height // factor, width // factor)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if latents is None:
            x_T = randn(shape, generators, self.device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise InputError(f"initial latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            x_T = latents.to(self.device, torch.float32)
        # 3. Denoise with guidance.
        denoiser = ClassifierFreeGuidance(self.unet, context, uncond_context, guidance_scale)
        z = sample_ddim(denoiser, x_T, self.schedule, num_steps, eta=eta, generator=generators,
                        parameterization=self.spec.parameterization, progress=progress)
        if output_type == "latent":
            return z
        # 4. Latents -> images.
        images = self.decode(z.to(self.dtype))
        return images if output_type == "tensor" else to_pil(images)


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], part: str, path: str | Path) -> None:
    """Load with strict key matching; on mismatch, one line naming the first missing and unexpected keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        details = "; ".join(f"{what} {keys[0]}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong_shape)) if keys)
        raise InputError(f"{path}: the {part} weights do not match the detected config: {details} "
                         "(pass --config for a model of another shape)")
    module.load_state_dict(state_dict, strict=True, assign=True)

