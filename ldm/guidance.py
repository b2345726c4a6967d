"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser for ``ldm.samplers``, with the
optional guidance rescale of Lin et al. 2023."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# unet(x_t, t, context) -> output; a U-Net with vector conditioning (SDXL) also takes `vector=`.
UNet = Callable[..., Tensor]


class ClassifierFreeGuidance:
    """Denoiser ``(x_t, t) -> uncond + guidance_scale * (cond - uncond)``.

    Args:
        unet: ``unet(x_t, t, context) -> output`` with ``x_t`` (B, C, h, w), ``t`` (B,) long,
            ``context`` (B, L, D).
        context: text embeddings of the prompts, (B, L, D).
        uncond_context: embeddings of the empty / negative prompts, (B, L, D); may be None when
            ``guidance_scale`` is 1.
        guidance_scale: 1 means the conditional prediction alone (the unconditional half is
            then skipped); SD commonly uses 7.5.
        guidance_rescale: phi of ``rescale_guidance``, in [0, 1]; 0 leaves the guided output as is.
        vector, uncond_vector: the vector conditioning (B, V) of a U-Net that takes one (SDXL's pooled
            text and sizes) for each side; None for other U-Nets.

    Conditional and unconditional predictions come from one U-Net call on a batch of 2B.
    """

    def __init__(
        self,
        unet: UNet,
        context: Tensor,
        uncond_context: Tensor | None,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        vector: Tensor | None = None,
        uncond_vector: Tensor | None = None,
    ) -> None:
        if not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.unet = unet
        self.context = context
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self._both_contexts: Tensor | None = None
        self.vector = vector
        self._both_vectors = vector
        if guidance_scale != 1.0:
            if uncond_context is None or uncond_context.shape != context.shape:
                shape = None if uncond_context is None else tuple(uncond_context.shape)
                raise ValueError(
                    f"uncond_context must have the shape of context {tuple(context.shape)} "
                    f"when guidance_scale != 1, got {shape}"
                )
            # Built once: the sampler calls this every step with the same contexts.
            self._both_contexts = torch.cat([uncond_context, context])
            if vector is not None:
                if uncond_vector is None or uncond_vector.shape != vector.shape:
                    raise ValueError(f"uncond_vector must have the shape of vector {tuple(vector.shape)}")
                self._both_vectors = torch.cat([uncond_vector, vector])

    @property
    def stiffness(self) -> float:
        """About the largest ``sqrt(1 - a) |d eps / d x_t|`` of the guided eps, for samplers whose stability
        depends on it (PLMS). An exact eps model has 1 away from the data. Where the prompt rules out what
        the unconditional model allows, the conditional eps has 1 and the unconditional one 0, so guidance
        scale w > 1 makes it w (measured values: docs/samplers.md, "PLMS with guidance")."""
        return max(1.0, self.guidance_scale)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``x_t`` (B, C, h, w), ``t`` (B,) long -> guided output (B, C, h, w) in ``x_t``'s dtype.

        The U-Net runs in the context's dtype (e.g. fp16) while the sampler may keep ``x_t`` in
        float32, where small per-step updates do not round away.
        """
        dtype = self.context.dtype
        if self._both_contexts is None:
            return self._unet(x_t.to(dtype), t, self.context, self.vector).to(x_t.dtype)
        uncond, cond = self._unet(
            torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), self._both_contexts, self._both_vectors
        ).to(x_t.dtype).chunk(2)
        guided = uncond + self.guidance_scale * (cond - uncond)
        if self.guidance_rescale == 0:
            return guided
        return rescale_guidance(guided, cond, self.guidance_rescale)


    def _unet(self, x_t: Tensor, t: Tensor, context: Tensor, vector: Tensor | None) -> Tensor:
        if vector is None:
            return self.unet(x_t, t, context)
        return self.unet(x_t, t, context, vector=vector)


def rescale_guidance(guided: Tensor, cond: Tensor, guidance_rescale: float) -> Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), eq. 15-16.

    ``guided`` and ``cond`` are (B, C, h, w). Each sample of ``guided`` is scaled to the standard
    deviation of its conditional prediction, which large guidance scales inflate (over-exposure),
    and the result is mixed with ``guided`` by ``guidance_rescale`` (phi): 0 returns ``guided``,
    1 the fully rescaled output.
    """
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return torch.lerp(guided, rescaled, guidance_rescale)
