"""Other engines for `scripts/benchmark.py --engines`, each run as its own docs recommend on the same weights.

- openvino: the diffusers reference's text encoder, U-Net and decoder converted with `openvino.convert_model`
  and saved as IR files (what optimum-intel's export does; weights fp16-compressed, its default, except in
  fp32 runs), reshaped to static shapes and compiled from the files for the CPU with the run's precision
  as the inference precision hint, one stream, latency hint; the DDIM loop with classifier-free guidance
  is diffusers' scheduler around them, as in optimum-intel's OVStableDiffusionPipeline.
- sdcpp: stable-diffusion.cpp through its Python binding, reading the original-layout .safetensors file
  itself, its weights f32 in fp32 runs and f16 otherwise, DDIM ("ddim_trailing") with guidance;
  sdcpp-q8 the same with its 8-bit q8_0 weights.

Each `*_txt2img` returns a call that makes the images, (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ldm.errors import InputError

Run = Callable[[], torch.Tensor]


class _UNetCall(torch.nn.Module):
    """diffusers' U-Net with positional inputs and a plain tensor output, for tracing."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=context).sample


class _DecoderCall(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def _import(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"the {extra} engine needs the `{module}` package: pip install -e '.[bench]'") from None


def openvino_txt2img(reference, text_embeddings: torch.nn.Module, tokens: torch.Tensor,
                     negative_tokens: torch.Tensor, x_T: torch.Tensor, steps: int, guidance_scale: float,
                     precision: str, workdir: Path) -> Run:
    """`reference`: a float32 diffusers StableDiffusionPipeline; `text_embeddings`: token ids (B, 77) ->
    the U-Net's context (B, 77, C); `x_T`: the initial noise (B, 4, h, w); the IR files go to `workdir`."""
    ov = _import("openvino", "openvino")
    batch, _, height, width = x_T.shape
    context = text_embeddings(tokens)
    examples = {
        "text": (text_embeddings, (tokens,), [tokens.shape]),
        "unet": (_UNetCall(reference.unet), (x_T.repeat(2, 1, 1, 1), torch.tensor(999), context.repeat(2, 1, 1)),
                 [(2 * batch, x_T.shape[1], height, width), (), (2 * batch, *context.shape[1:])]),
        "decoder": (_DecoderCall(reference.vae), (x_T,), [x_T.shape]),
    }
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision],
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    compiled = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on diffusers' Python branches
        for name, (module, inputs, shapes) in examples.items():
            model = ov.convert_model(module, example_input=inputs)
            model.reshape({model.inputs[i]: list(shape) for i, shape in enumerate(shapes)})
            ov.save_model(model, workdir / f"openvino_{name}.xml", compress_to_fp16=precision != "fp32")
            del model
            compiled[name] = core.compile_model(workdir / f"openvino_{name}.xml", "CPU", config)
    scheduler = copy.deepcopy(reference.scheduler)
    scaling = reference.vae.config.scaling_factor

    def infer(name: str, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(compiled[name]([x.numpy() for x in inputs])[0]))

    def run() -> torch.Tensor:
        context = torch.cat([infer("text", negative_tokens), infer("text", tokens)])
        scheduler.set_timesteps(steps)
        latents = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            noise = infer("unet", torch.cat([latents] * 2), t.to(torch.int64), context)
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
        return (infer("decoder", latents / scaling) / 2 + 0.5).clamp(0, 1)
    return run


# bf16 runs use sd.cpp's f16 weights, the half type its docs name (its bf16 weights took 2x longer per step here).
SDCPP_WEIGHT_TYPES = {"fp32": "f32", "fp16": "f16", "bf16": "f16"}


def sdcpp_txt2img(checkpoint: Path, prompt: str, batch: int, size: int, steps: int, guidance_scale: float,
                  weight_type: str, seed: int = 0) -> Run:
    """stable-diffusion.cpp on `checkpoint` (an original-layout SD 1.x file) with its weights in
    `weight_type` (f32, f16, q8_0, ...: sd.cpp's names)."""
    _import("stable_diffusion_cpp", "sdcpp")
    from stable_diffusion_cpp import StableDiffusion

    engine = StableDiffusion(model_path=str(checkpoint), n_threads=torch.get_num_threads(),
                             wtype=weight_type, verbose=False)

    def run() -> torch.Tensor:
        images = engine.generate_image(prompt=prompt, negative_prompt="", cfg_scale=guidance_scale,
                                       width=size, height=size, sample_method="ddim_trailing",
                                       sample_steps=steps, seed=seed, batch_count=batch)
        return torch.stack([torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
                            for image in images])
    return run
