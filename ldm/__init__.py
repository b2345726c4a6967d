"""A compact latent text-to-image diffusion library that runs Stable Diffusion 1.x/2.x checkpoints.

    from ldm import Pipeline
    pipe = Pipeline.from_checkpoint("v1-5-pruned-emaonly.safetensors")
    images = pipe(["a photo of an astronaut riding a horse"], num_steps=50, guidance_scale=7.5, seed=42)
"""

from __future__ import annotations

from typing import Any

__all__ = ["GenerationSettings", "ModelSpec", "Pipeline"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import ldm.shapes.dataset` does not pay for torch and open_clip.
    if name == "Pipeline":
        from ldm.pipeline import Pipeline

        return Pipeline
    if name == "GenerationSettings":
        from ldm.settings import GenerationSettings

        return GenerationSettings
    if name == "ModelSpec":
        from ldm.sd_checkpoint import ModelSpec

        return ModelSpec
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
