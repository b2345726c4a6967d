"""Speed and peak memory, ours vs diffusers with the same weights (not part of the test suite).

    python scripts/benchmark.py                     # CPU target: SD 1.5 U-Net, fp32, batch 2, 32 x 32 latents
    python scripts/benchmark.py --cases vae-tiled --latent-size 256 --batch 1    # a 2048 x 2048 decode
    python scripts/benchmark.py --device cuda --dtype fp16 --latent-size 64 --compile

Cases (--cases, comma-separated):
    unet       U-Net forward, SD 1.5 architecture, no grad
    train      U-Net training step: forward, MSE loss, backward, AdamW step (ours fused, as ldm.training;
               diffusers torch's default, as its training examples)
    vae        autoencoder decode of (B, 4, L, L) latents (SD config: ch 128, ch_mult 1 2 4 4)
    vae-tiled  the same, tiled (ldm.tiling.tiled_decode vs diffusers' enable_tiling), same tile and overlap
    txt2img    SD 1.5 text -> image: text encoding, --steps DDIM steps with guidance 7.5, decoding
    shapes     the bundled shapes model (ldm/weights/shapes-v1.safetensors, else random weights of the
               configs/shapes/*.yaml architecture): 64 x 64 images, --steps DDIM steps with guidance
    lora       ours only: reading and merging a kohya LoRA of --lora-rank (fp16 file, every attention,
               feed-forward and projection layer of the U-Net and every text-encoder linear, as kohya's
               default targets): the first merge (fresh buffers for the merged weights), later ones (the
               buffers reused) and unloading; and the U-Net forward before vs after merging (a ratio,
               alternating)
    int8       ours only: the U-Net forward (SD 1.5 architecture, --batch, --latent-size) as each of
               --int8-variants, DTYPE or DTYPE+MODE (ldm.quantize: int8 Linear weights through torchao), all
               built from one set of weights and interleaved: medians, ratios to the first variant and to
               the same dtype unquantized, and the output error against the first variant
    sdxl-unet  SDXL base's U-Net forward with its vector input (pooled text + size embeddings), no grad
    sdxl-file  ours only: a full-size random SDXL base file (fp16, original layout, 6.9 GB, written to a
               temporary folder under --workdir and deleted after) loaded in a fresh process in --dtype,
               then one image at 8 x --latent-size with --steps DDIM steps and guidance: load seconds,
               seconds per step, and the process's peak resident memory after loading and in all

Engines (--engines ours,diffusers,openvino,sdcpp,sdcpp-q8 instead of --cases): SD 1.5 text -> image on each engine
from one set of random weights, interleaved, with the process's peak memory in a fresh process each; the
peers (scripts/peer_engines.py says how each runs) come with the `bench` extra.

Weights are random (N(0, 1/fan_in) matrices, norm scales near 1) unless the shapes checkpoint exists. Our
modules are built first; their state dicts, under the original checkpoint prefixes, go through diffusers'
own single-file conversion into diffusers / transformers models that share the tensors. Each case checks
that both sides compute the same numbers ("check": max|ours - diffusers| / max|diffusers| of the outputs).

Times: one warm-up call each (which also compiles with --compile), then --repeats calls alternating
ours/diffusers (ours first on even repetitions, diffusers first on odd ones); the medians are reported
and "ratio" is ours / diffusers. Peak memory is the rise above the memory in use before one call: on CUDA
from torch.cuda.max_memory_allocated; on CPU from the kernel's resident-set high-water mark (VmHWM,
reset through /proc/self/clear_refs), for each case and side in a fresh subprocess after a warm-up call.
diffusers runs with its default attention (sdpa); --attention and --compile apply to our side only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
import transformers
import yaml
from diffusers import AutoencoderKL as ReferenceAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from ldm.attention import ATTENTION_BACKENDS, set_attention_backend
from ldm.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.cli import ScriptParser, resolve_device, run_main
from ldm.conditioner import BASE_MICRO_CONDITIONING, micro_conditioning
from ldm.config import config_kwargs
from ldm.errors import InputError
from ldm.generate import BUNDLED_CHECKPOINT
from ldm.pipeline import Pipeline, compile_for_inference
from ldm.precision import PRECISIONS
from ldm.quantize import QUANTIZE_MODES, quantize_unet
from ldm.sd_checkpoint import ModelSpec, join_state_dicts
from ldm.settings import GenerationSettings
from ldm.text_encoder import TextEncoder, TextEncoderConfig, sd1, tiny
from ldm.tiling import tiled_decode
from ldm.unet import UNetConfig, UNetModel

ENGINES = ("ours", "diffusers", "openvino", "sdcpp", "sdcpp-q8")
CASES = ("unet", "train", "vae", "vae-tiled", "txt2img", "shapes", "lora", "int8", "sdxl-unet", "sdxl-file")
INT8_VARIANTS = "fp32,fp32+int8-weight,fp32+int8-dynamic,bf16,bf16+int8-weight,bf16+int8-dynamic"
SHAPES_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "shapes"
SD_PROMPT = "a photograph of an astronaut riding a horse"
SHAPES_PROMPT = "a large red circle in the top left on a black background"
GUIDANCE_SCALE = 7.5
Run = Callable[[], torch.Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd1.5", "tiny"], default="sd1.5",
                   help="architecture of the unet, train, vae, vae-tiled and txt2img cases; tiny = SD 1.5's layout "
                        "at a tenth of the width, to check that the script runs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=2, help="images per call")
    p.add_argument("--latent-size", type=int, default=32, help="latent height and width (image = 8x)")
    p.add_argument("--context-len", type=int, default=77, help="context tokens for the unet and train cases")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side (after one warm-up)")
    p.add_argument("--cases", default="unet,train,vae,txt2img,shapes", help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the txt2img and shapes cases")
    p.add_argument("--lora-rank", type=int, default=128, help="lora: rank of the LoRA")
    p.add_argument("--int8-variants", default=INT8_VARIANTS, help="int8: comma-separated U-Nets to time, DTYPE "
                   "(fp32, fp16, bf16) or DTYPE+MODE (int8-weight, int8-dynamic); the first is the reference "
                   f"(default {INT8_VARIANTS})")
    p.add_argument("--tile-size", type=int, default=64, help="vae-tiled: tile size in latent pixels")
    p.add_argument("--tile-overlap", type=int, default=16, help="vae-tiled: overlap in latent pixels")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa", help="our attention backend")
    p.add_argument("--compile", action="store_true", help="torch.compile our U-Net (compiled in the warm-up)")
    p.add_argument("--channels-last", action="store_true", help="our U-Net and autoencoder in NHWC layout "
                   "(Pipeline.to_channels_last)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses on CPU")
    p.add_argument("--workdir", default=None,
                   help="sdxl-file, --engines sdcpp: where their temporary files go (default: the system's)")
    p.add_argument("--engines", default=None, help=f"comma-separated, from {', '.join(ENGINES)}: text -> image on "
                   "each (SD 1.5 weights, --batch, --latent-size, --steps, --dtype; --compile compiles ours and "
                   "diffusers alike) instead of --cases; peers need the bench extra")
    p.add_argument("--memory-probe", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--sdxl-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise InputError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.engines is not None:
        args.engines = list(dict.fromkeys(e.strip() for e in args.engines.split(",") if e.strip()))
        if not args.engines or (unknown := [e for e in args.engines if e not in ENGINES]):
            raise InputError(f"--engines: choose from {', '.join(ENGINES)} (got {', '.join(unknown or ['none'])})")
        if set(args.engines) - {"ours", "diffusers"} and args.device != "cpu":
            raise InputError("--engines openvino and sdcpp run on the CPU here: leave out --device")
    args.int8_variants = [v.strip() for v in args.int8_variants.split(",") if v.strip()]
    for variant in args.int8_variants:
        dtype, _, mode = variant.partition("+")
        if dtype not in PRECISIONS or mode not in ("", *QUANTIZE_MODES):
            raise InputError(f"--int8-variants: {variant!r} is not DTYPE or DTYPE+MODE (fp32+int8-dynamic)")
    for flag in ("batch", "latent_size", "context_len", "repeats", "steps", "tile_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


# Random weights and conversion to diffusers.

def random_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every weight of a (possibly meta-device) module: matrices and kernels N(0, 1/fan_in), so
    activations keep their scale through depth; norm scales 1 + N(0, 0.01); other vectors N(0, 0.01)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, tensor in module.state_dict().items():
        value = torch.randn(tensor.shape, generator=generator)
        if tensor.ndim >= 2:
            value.mul_(tensor[0].numel() ** -0.5)
        else:  # vectors named weight are norm scales here: linear and conv weights have 2+ dimensions
            value.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)
        state_dict[name] = value
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def random_pipeline(spec: ModelSpec) -> Pipeline:
    with torch.device("meta"):
        unet, text_encoder, autoencoder = UNetModel(spec.unet), TextEncoder(spec.text_encoder), AutoencoderKL(
            spec.autoencoder)
    for seed, module in enumerate((unet, text_encoder, autoencoder)):
        random_weights_(module, seed)
    return Pipeline(spec, unet, text_encoder, autoencoder, name=spec.family)


def original_config(unet: UNetConfig, autoencoder: AutoencoderConfig) -> dict:
    """The parts of an original inference YAML that diffusers' single-file conversion reads."""
    unet_params = unet.to_dict()
    # diffusers takes num_heads when it is present, num_head_channels otherwise.
    del unet_params["num_heads" if unet.num_head_channels != -1 else "num_head_channels"]
    if unet.adm_in_channels is not None:
        unet_params["num_classes"] = "sequential"  # SDXL's vector input, as its YAMLs mark it
    return {"model": {"params": {
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"embed_dim": autoencoder.embed_dim, "ddconfig": autoencoder.to_dict()}},
        "scale_factor": autoencoder.scale_factor,
    }}}


def diffusers_unet(unet: UNetModel, autoencoder_config: AutoencoderConfig) -> UNet2DConditionModel:
    checkpoint = join_state_dicts(unet.state_dict(), {}, {})
    config = create_unet_diffusers_config_from_ldm(original_config(unet.config, autoencoder_config), checkpoint)
    config["norm_num_groups"] = unet.config.norm_num_groups
    if unet.config.adm_in_channels is not None:  # diffusers tells SDXL by the released context widths only
        config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    return _load_meta(UNet2DConditionModel, config, convert_ldm_unet_checkpoint(checkpoint, config))


def diffusers_vae(autoencoder: AutoencoderKL, unet_config: UNetConfig) -> ReferenceAutoencoderKL:
    checkpoint = join_state_dicts({}, autoencoder.state_dict(), {})
    config = create_vae_diffusers_config_from_ldm(original_config(unet_config, autoencoder.config), checkpoint)
    config["norm_num_groups"] = autoencoder.config.norm_num_groups
    return _load_meta(ReferenceAutoencoderKL, config, convert_ldm_vae_checkpoint(checkpoint, config))


def diffusers_text_encoder(text_encoder: TextEncoder) -> transformers.CLIPTextModel:
    config = text_encoder.config
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.context_length, hidden_act=config.act))
    converted = convert_open_clip_checkpoint(reference, join_state_dicts({}, {}, text_encoder.state_dict()))
    expected = reference.state_dict()
    # Newer transformers dropped CLIPTextModel's `text_model.` level; the CLIP head has no place in it.
    if not any(k.startswith("text_model.") for k in expected):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    reference.load_state_dict({k: v for k, v in converted.items() if k in expected}, strict=True)
    return reference.eval()


def _load_meta(cls: type, config: dict, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# Cases: each returns {"ours": run, "diffusers": run} for the sides asked for.

def prepare_ours(unet: UNetModel, args: argparse.Namespace) -> UNetModel:
    set_attention_backend(unet, args.attention)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    # Also for the train case: the weights are frozen into graphs traced without gradients only.
    return compile_for_inference(unet) if args.compile else unet


def unet_inputs(args: argparse.Namespace, context_dim: int, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(args.batch, 4, args.latent_size, args.latent_size, generator=generator)
    t = torch.randint(0, 1000, (args.batch,), generator=generator)
    context = torch.randn(args.batch, args.context_len, context_dim, generator=generator)
    return x_t.to(device, dtype), t.to(device), context.to(device, dtype)


def sd_spec(args: argparse.Namespace) -> ModelSpec:
    """SD 1.5 (the configs' defaults are its values), or its layout at a tenth of the width."""
    if args.model == "tiny":
        return ModelSpec(family="sd1", unet=UNetConfig(model_channels=32, num_heads=4, context_dim=64),
                         autoencoder=AutoencoderConfig(ch=32), text_encoder=tiny(), image_size=8 * args.latent_size)
    return ModelSpec(family="sd1", unet=UNetConfig(), autoencoder=AutoencoderConfig(), text_encoder=sd1(),
                     image_size=8 * args.latent_size)


def sd_unet_pair(args: argparse.Namespace) -> tuple[UNetModel, UNet2DConditionModel]:
    spec = sd_spec(args)
    with torch.device("meta"):
        unet = UNetModel(spec.unet)
    random_weights_(unet, seed=0)
    return unet, diffusers_unet(unet, spec.autoencoder)


def unet_case(args, device, dtype, sides) -> dict[str, Run]:
    unet, reference = sd_unet_pair(args)
    x_t, t, context = unet_inputs(args, unet.config.context_dim, device, dtype)
    runs = {}
    if "ours" in sides:
        ours = prepare_ours(unet.to(device, dtype), args)
        runs["ours"] = torch.no_grad()(lambda: ours(x_t, t, context))
    if "diffusers" in sides:
        reference = reference.to(device, dtype)
        runs["diffusers"] = torch.no_grad()(lambda: reference(x_t, t, encoder_hidden_states=context).sample)
    return runs


def sdxl_unet_config(args: argparse.Namespace) -> UNetConfig:
    """SDXL base's U-Net (generative-models' sd_xl_base.yaml), or its layout at a fifth of the width."""
    width, context = (64, 128) if args.model == "tiny" else (320, 2048)
    return UNetConfig(model_channels=width, attention_resolutions=(4, 2), channel_mult=(1, 2, 4), num_heads=-1,
                      num_head_channels=64, transformer_depth=(1, 2, 10), use_linear_in_transformer=True,
                      context_dim=context, adm_in_channels=1280 + 6 * 256)


def sdxl_unet_case(args, device, dtype, sides) -> dict[str, Run]:
    """The U-Net with its vector input: ours takes pooled text + embedded sizes, diffusers the parts."""
    with torch.device("meta"):
        unet = UNetModel(sdxl_unet_config(args))
    random_weights_(unet, seed=0)
    reference = diffusers_unet(unet, AutoencoderConfig())
    x_t, t, context = unet_inputs(args, unet.config.context_dim, device, dtype)
    pooled = torch.randn(args.batch, 1280, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    size = 8 * args.latent_size
    sizes = {"original_size": (size, size), "crop_coords": (0, 0), "target_size": (size, size)}
    vector = torch.cat([pooled, micro_conditioning(BASE_MICRO_CONDITIONING, sizes, args.batch).to(device, dtype)], -1)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * args.batch, device=device, dtype=dtype)
    runs = {}
    if "ours" in sides:
        ours = prepare_ours(unet.to(device, dtype), args)
        runs["ours"] = torch.no_grad()(lambda: ours(x_t, t, context, vector=vector))
    if "diffusers" in sides:
        reference = reference.to(device, dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        runs["diffusers"] = torch.no_grad()(
            lambda: reference(x_t, t, encoder_hidden_states=context, added_cond_kwargs=added).sample)
    return runs


def train_case(args, device, dtype, sides) -> dict[str, Run]:
    unet, reference = sd_unet_pair(args)
    x_t, t, context = unet_inputs(args, unet.config.context_dim, device, dtype)
    target = torch.randn_like(x_t)
    unet, reference = unet.to(device, dtype).train(), reference.to(device, dtype).train()
    # On the CPU both sides hold the same weight tensors: one AdamW (one state) serves both, each side's
    # gradients handed to it, which also keeps an SD-size run within 24 GB. Elsewhere each side gets its
    # own optimizer. Each side updates as its library trains: ours with the fused kernel that
    # ldm.training's optimizers use, diffusers' with torch's default (fused=None, as in its training
    # examples: a loop over the tensors on the CPU, foreach kernels on CUDA).
    shared = {p.data_ptr(): p for p in unet.parameters()}
    optimizers: dict[int, torch.optim.Optimizer] = {}

    def step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], fused: bool | None) -> Run:
        pairs = [(p, shared.get(p.data_ptr(), p)) for p in model.parameters()]
        owners = [owner for _, owner in pairs]
        key = id(owners[0])
        if key not in optimizers:
            optimizers[key] = torch.optim.AdamW(owners, lr=1e-6)
        optimizer = optimizers[key]

        def run() -> torch.Tensor:
            loss = F.mse_loss(forward().float(), target.float())
            loss.backward()
            for param, owner in pairs:
                if owner is not param:
                    owner.grad, param.grad = param.grad, None
            optimizer.param_groups[0]["fused"] = fused  # AdamW reads it at every step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        return run

    runs = {}
    if "ours" in sides:
        ours = prepare_ours(unet, args)
        runs["ours"] = step(ours, lambda: ours(x_t, t, context), fused=True)
    if "diffusers" in sides:
        runs["diffusers"] = step(reference, lambda: reference(x_t, t, encoder_hidden_states=context).sample,
                                 fused=None)
    return runs


def vae_case(args, device, dtype, sides, tiled: bool = False) -> dict[str, Run]:
    spec = sd_spec(args)
    with torch.device("meta"):
        autoencoder = AutoencoderKL(spec.autoencoder)
    random_weights_(autoencoder, seed=2)
    reference = diffusers_vae(autoencoder, spec.unet)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(args.batch, 4, args.latent_size, args.latent_size, generator=generator).to(device, dtype)
    runs = {}
    if "ours" in sides:
        ours_latents = latents.contiguous(memory_format=torch.channels_last)  # as Pipeline.decode does
        ours = autoencoder.to(device, dtype)
        if args.channels_last:
            ours.to(memory_format=torch.channels_last)
        if tiled:
            runs["ours"] = torch.no_grad()(lambda: tiled_decode(ours, ours_latents, args.tile_size, args.tile_overlap))
        else:
            runs["ours"] = torch.no_grad()(lambda: ours.decode(ours_latents))
    if "diffusers" in sides:
        reference = reference.to(device, dtype)
        if tiled:
            reference.enable_tiling()
            reference.tile_latent_min_size = args.tile_size
            reference.tile_sample_min_size = 8 * args.tile_size
            reference.tile_overlap_factor = args.tile_overlap / args.tile_size
        runs["diffusers"] = torch.no_grad()(lambda: reference.decode(latents).sample)
    return runs


def initial_noise(pipe: Pipeline, batch: int, image_size: int) -> torch.Tensor:
    factor = pipe.autoencoder.config.downsampling_factor
    shape = (batch, pipe.unet.config.out_channels, image_size // factor, image_size // factor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(4))


def pipeline_case(pipe: Pipeline, prompt: str, args, device, dtype, sides, image_size: int,
                  compile_reference: bool = False) -> dict[str, Run]:
    """Full text -> image with the same initial noise on both sides; images compared in [0, 1]."""
    prompts = [prompt] * args.batch
    x_T = initial_noise(pipe, args.batch, image_size)
    runs = {}
    if "diffusers" in sides:
        runs["diffusers"] = diffusers_txt2img(pipe, prompts, x_T, args, device, dtype, image_size, compile_reference)
    if "ours" in sides:
        pipe.to(device, dtype)
        if args.channels_last:
            pipe.to_channels_last()
        prepare_ours(pipe.unet, args)
        runs["ours"] = lambda: (pipe(prompts, num_steps=args.steps, guidance_scale=GUIDANCE_SCALE, height=image_size,
                                     width=image_size, latents=x_T, output_type="tensor", progress=False) + 1) / 2
    return runs


class TextEmbeddings(torch.nn.Module):
    """A transformers CLIP text model as SD reads it: token ids (B, 77) -> context (B, 77, C), the last
    layer's hidden states or, for penultimate-layer models, the one before through the final norm."""

    def __init__(self, text_encoder: transformers.CLIPTextModel, penultimate: bool):
        super().__init__()
        self.text_encoder, self.penultimate = text_encoder, penultimate

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.penultimate:
            return self.text_encoder(input_ids=tokens).last_hidden_state
        hidden = self.text_encoder(input_ids=tokens, output_hidden_states=True).hidden_states[-2]
        return getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm(hidden)


def diffusers_reference(pipe: Pipeline) -> tuple[StableDiffusionPipeline, TextEmbeddings]:
    """diffusers' SD pipeline on `pipe`'s weights (float32, CPU) and its text encoder as SD reads it."""
    text_encoder = diffusers_text_encoder(pipe.text_encoder)
    schedule = pipe.spec.schedule
    scheduler = DDIMScheduler(num_train_timesteps=schedule["num_timesteps"], beta_start=schedule["linear_start"],
                              beta_end=schedule["linear_end"], beta_schedule="scaled_linear",
                              timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                              prediction_type="v_prediction" if pipe.spec.parameterization == "v" else "epsilon")
    reference = StableDiffusionPipeline(
        vae=diffusers_vae(pipe.autoencoder, pipe.unet.config), text_encoder=text_encoder, tokenizer=None,
        unet=diffusers_unet(pipe.unet, pipe.autoencoder.config), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return reference, TextEmbeddings(text_encoder, pipe.text_encoder.config.layer == "penultimate")


def diffusers_txt2img(pipe: Pipeline, prompts: list[str], x_T: torch.Tensor, args, device, dtype,
                      image_size: int, compile_unet: bool = False) -> Run:
    reference, text_embeddings = diffusers_reference(pipe)
    reference.to(device, dtype)
    if compile_unet:
        compile_for_inference(reference.unet)
    # The same BPE ids as ours (transformers' tokenizer would need vocabulary files from the hub).
    tokens, negative_tokens = (pipe.text_encoder.tokenize(texts).to(device) for texts in (prompts, [""] * len(prompts)))

    @torch.no_grad()
    def run() -> torch.Tensor:
        return reference(prompt_embeds=text_embeddings(tokens), negative_prompt_embeds=text_embeddings(negative_tokens),
                         height=image_size, width=image_size, num_inference_steps=args.steps,
                         guidance_scale=GUIDANCE_SCALE, latents=x_T.to(device, dtype), output_type="pt").images
    return run


def txt2img_case(args, device, dtype, sides) -> dict[str, Run]:
    return pipeline_case(random_pipeline(sd_spec(args)), SD_PROMPT, args, device, dtype, sides, 8 * args.latent_size)


def shapes_case(args, device, dtype, sides) -> dict[str, Run]:
    if BUNDLED_CHECKPOINT.is_file():
        pipe = Pipeline.from_checkpoint(BUNDLED_CHECKPOINT)
    else:
        print(f"shapes: {BUNDLED_CHECKPOINT} not found, random weights of the configs/shapes architecture")
        pipe = random_pipeline(shapes_spec())
    return pipeline_case(pipe, SHAPES_PROMPT, args, device, dtype, sides, pipe.spec.image_size)


def shapes_spec() -> ModelSpec:
    def read(name: str) -> dict:
        return yaml.safe_load((SHAPES_CONFIGS / f"{name}.yaml").read_text())

    diffusion, autoencoder = read("diffusion"), read("autoencoder")
    text = read("clip")["clip"]["text"]
    return ModelSpec(family="custom", unet=UNetConfig.from_dict(diffusion["unet"]),
                     autoencoder=AutoencoderConfig.from_dict(autoencoder["autoencoder"]),
                     text_encoder=TextEncoderConfig(**config_kwargs(TextEncoderConfig, text)),
                     parameterization=diffusion["diffusion"]["parameterization"],
                     image_size=int(diffusion["data"]["size"]))


BUILDERS = {
    "unet": unet_case, "train": train_case, "vae": vae_case,
    "vae-tiled": lambda args, device, dtype, sides: vae_case(args, device, dtype, sides, tiled=True),
    "txt2img": txt2img_case, "shapes": shapes_case, "sdxl-unet": sdxl_unet_case,
}


# Measuring.

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Run, device: torch.device) -> tuple[float, int | None, torch.Tensor]:
    """Seconds of one call, its peak CUDA memory above what was allocated before (None on CPU), its output."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    out = run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    return seconds, peak, out


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def probe_memory(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Child process: one side of one case; prints the rise of the RSS high-water mark during one call."""
    if args.engines:
        folder = tempfile.TemporaryDirectory(dir=args.workdir)  # removed when this process ends
        run = engine_runs(args, device, dtype, {args.memory_probe}, Path(folder.name))[args.memory_probe]
    else:
        run = BUILDERS[args.cases[0]](args, device, dtype, {args.memory_probe})[args.memory_probe]
    run()  # warm-up: one-time allocations (optimizer state, kernel caches) are not per call
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _proc_status_bytes("VmRSS")
    run()
    print(json.dumps({"peak_rise": _proc_status_bytes("VmHWM") - before, "peak": _proc_status_bytes("VmHWM")}))


def cpu_peak_memory(argv: list[str], case: str, side: str) -> dict[str, int] | None:
    """Run `probe_memory` in a fresh process; large blocks are mmap'ed there so freeing returns them to the OS."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, *argv, "--cases", case, "--memory-probe", side]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"memory probe {case}/{side} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def benchmark_case(case: str, args: argparse.Namespace, argv: list[str], device: torch.device,
                   dtype: torch.dtype) -> dict[str, str]:
    runs = BUILDERS[case](args, device, dtype, {"ours", "diffusers"})
    first, outputs = {}, {}
    for side in ("ours", "diffusers"):
        first[side], _, outputs[side] = timed(runs[side], device)
    seconds = {"ours": [], "diffusers": []}
    peaks = {"ours": [], "diffusers": []}
    for repeat in range(args.repeats):
        for side in ("ours", "diffusers") if repeat % 2 == 0 else ("diffusers", "ours"):
            elapsed, peak, _ = timed(runs[side], device)
            seconds[side].append(elapsed)
            peaks[side].append(peak)
    del runs
    gc.collect()
    median = {side: statistics.median(values) for side, values in seconds.items()}
    row = {"case": case, "ours ms": f"{1e3 * median['ours']:.1f}", "diffusers ms": f"{1e3 * median['diffusers']:.1f}",
           "ratio": f"{median['ours'] / median['diffusers']:.2f}", "ours 1st ms": f"{1e3 * first['ours']:.0f}"}
    if device.type == "cuda":
        row.update({f"{side} peak MiB": mib(max(peaks[side])) for side in peaks})
    elif not args.no_memory:
        for side in ("ours", "diffusers"):
            probe = cpu_peak_memory(argv, case, side)
            row[f"{side} peak MiB"] = mib(probe and probe["peak_rise"])
    comparable = case not in ("train", "vae-tiled")  # different updates / tiling schemes
    row["check"] = f"{relative_error(outputs['ours'], outputs['diffusers']):.1e}" if comparable else "-"
    return row


def lora_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Load + merge time of a LoRA file, and the U-Net forward before / after merging (alternating)."""
    from safetensors.torch import save_file

    from ldm.layer_names import diffusers_unet_names, flat, text_encoder_layers

    pipe = random_pipeline(sd_spec(args)).to(device, dtype)
    generator, tensors = torch.Generator().manual_seed(1), {}
    names = diffusers_unet_names(pipe.unet)
    layers = [(f"lora_unet_{flat(names[n])}", m.weight) for n, m in pipe.unet.named_modules()
              if ".attentions." in names.get(n, "") and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    text = {f"lora_te_{name}": pipe.text_encoder.get_parameter(layer.weight)[layer.rows or slice(None)]
            for name, layer in text_encoder_layers(pipe.text_encoder).items() if name.startswith("text_model_")}
    for key, weight in [*layers, *text.items()]:
        rank = args.lora_rank
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, *weight.shape[1:], generator=generator).half()
        tensors[f"{key}.lora_up.weight"] = (1e-4 * torch.randn(weight.shape[0], rank, *[1] * (weight.ndim - 2),
                                                               generator=generator)).half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    x_t, t, context = unet_inputs(args, pipe.unet.config.context_dim, device, dtype)
    forward = torch.no_grad()(lambda: pipe.unet(x_t, t, context))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        save_file(tensors, str(path))
        size = path.stat().st_size
        del tensors
        timed(forward, device)  # warm-up
        before, after, merges, unloads = [], [], [], []
        for repeat in range(args.repeats):
            pipe.unload_lora()  # the inner loop may end merged
            merges.append(timed(lambda: pipe.load_lora(path), device)[0])
            unloads.append(timed(pipe.unload_lora, device)[0])
            for merged in (True, False) if repeat % 2 == 0 else (False, True):
                pipe.load_lora(path) if merged else pipe.unload_lora()
                timed(forward, device)  # untimed: the first call after gigabytes of weight copies pays for them
                (after if merged else before).append(timed(forward, device)[0])
    median = {name: statistics.median(values) for name, values in
              (("merge", merges[1:] or merges), ("unload", unloads), ("before", before), ("after", after))}
    return {"case": f"lora (rank {args.lora_rank}, {len(layers) + len(text)} layers, {size / 2**20:.0f} MiB)",
            "first load+merge ms": f"{1e3 * merges[0]:.0f}", "load+merge ms": f"{1e3 * median['merge']:.0f}",
            "unload ms": f"{1e3 * median['unload']:.0f}", "step before ms": f"{1e3 * median['before']:.1f}",
            "step after ms": f"{1e3 * median['after']:.1f}", "ratio": f"{median['after'] / median['before']:.2f}"}


def int8_case(args: argparse.Namespace, device: torch.device) -> list[dict[str, str]]:
    """The U-Net forward as each of --int8-variants, from one set of weights, alternating; a row per variant."""
    import copy

    base, _ = sd_unet_pair(args)
    runs, first, outputs = {}, {}, {}
    for variant in args.int8_variants:
        name, _, mode = variant.partition("+")
        dtype = PRECISIONS[name]
        unet = quantize_unet(copy.deepcopy(base).to(device, dtype), mode or "off")  # before compiling
        unet = prepare_ours(unet, args)
        inputs = unet_inputs(args, base.config.context_dim, device, dtype)
        runs[variant] = torch.no_grad()(lambda unet=unet, inputs=inputs: unet(*inputs))
        first[variant], _, outputs[variant] = timed(runs[variant], device)  # warm-up; compiles with --compile
    del base
    seconds = {variant: [] for variant in runs}
    for repeat in range(args.repeats):
        for variant in list(runs)[:: 1 if repeat % 2 == 0 else -1]:
            seconds[variant].append(timed(runs[variant], device)[0])
    median = {variant: statistics.median(values) for variant, values in seconds.items()}
    reference = args.int8_variants[0]
    rows = []
    for variant in runs:
        unquantized = variant.partition("+")[0]
        rows.append({"case": f"int8: {variant}", "ms": f"{1e3 * median[variant]:.0f}",
                     f"/ {reference}": f"{median[variant] / median[reference]:.2f}",
                     "/ unquantized": f"{median[variant] / median[unquantized]:.2f}" if unquantized in median else "-",
                     "1st ms": f"{1e3 * first[variant]:.0f}",
                     "error": f"{relative_error(outputs[variant], outputs[reference]):.1e}"})
    return rows


def engine_runs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, engines: set[str],
                workdir: Path) -> dict[str, Run]:
    """SD 1.5 text -> image on each engine from one set of random weights: --batch images of 8 x
    --latent-size px, --steps DDIM steps, guidance 7.5, the same initial noise (sdcpp draws its own, from
    an original-layout file in `workdir`; openvino's IR files go there too). With --compile, ours and
    diffusers' U-Nets are compiled alike (static shapes, inductor freezing); openvino always compiles."""
    from peer_engines import SDCPP_WEIGHT_TYPES, openvino_txt2img, sdcpp_txt2img

    pipe = random_pipeline(sd_spec(args))
    size, prompts = 8 * args.latent_size, [SD_PROMPT] * args.batch
    runs = {}
    if "openvino" in engines:  # converted from the float32 weights, before ours are cast
        reference, text_embeddings = diffusers_reference(pipe)
        tokens, negative_tokens = (pipe.text_encoder.tokenize(texts) for texts in (prompts, [""] * args.batch))
        runs["openvino"] = openvino_txt2img(reference, text_embeddings, tokens, negative_tokens,
                                            initial_noise(pipe, args.batch, size), args.steps, GUIDANCE_SCALE,
                                            args.dtype, workdir)
        del reference, text_embeddings
    weight_types = {"sdcpp": SDCPP_WEIGHT_TYPES[args.dtype], "sdcpp-q8": "q8_0"}  # sd.cpp's own names
    if sdcpp := sorted(weight_types.keys() & engines):
        path = pipe.save(workdir / "sd15_random.safetensors")
        for engine in sdcpp:
            runs[engine] = sdcpp_txt2img(path, SD_PROMPT, args.batch, size, args.steps, GUIDANCE_SCALE,
                                         weight_types[engine])
    runs.update(pipeline_case(pipe, SD_PROMPT, args, device, dtype, engines & {"ours", "diffusers"}, size,
                              compile_reference=args.compile))
    return runs


def engines_case(args: argparse.Namespace, argv: list[str], device: torch.device, dtype: torch.dtype,
                 workdir: Path) -> list[dict[str, str]]:
    """A row per engine: median seconds per call over --repeats calls interleaved (the order rotating),
    the ratio to ours, the first call, the process's peak memory through one call in a fresh process, and
    the image's largest difference from diffusers' ([0, 1] scale; sdcpp draws other noise)."""
    engines = args.engines
    runs = engine_runs(args, device, dtype, set(engines), workdir)
    first, outputs = {}, {}
    for engine in engines:
        first[engine], _, outputs[engine] = timed(runs[engine], device)
    seconds = {engine: [] for engine in engines}
    for repeat in range(args.repeats):
        shift = repeat % len(engines)
        for engine in engines[shift:] + engines[:shift]:
            seconds[engine].append(timed(runs[engine], device)[0])
    del runs
    gc.collect()
    median = {engine: statistics.median(values) for engine, values in seconds.items()}
    rows = []
    for engine in engines:
        row = {"engine": engine, "s/call": f"{median[engine]:.2f}", "1st s": f"{first[engine]:.1f}"}
        if "ours" in median:
            row["/ ours"] = f"{median[engine] / median['ours']:.2f}"
        if not args.no_memory:
            probe = cpu_peak_memory(argv, "txt2img", engine)
            row["peak MiB"] = mib(probe and probe["peak"])
        comparable = "diffusers" in outputs and not engine.startswith("sdcpp")
        row["vs diffusers"] = (f"{(outputs[engine] - outputs['diffusers']).abs().max().item():.1e}"
                               if comparable else "-")
        rows.append(row)
    return rows


def write_random_sdxl(path: Path) -> None:
    """A full-size SDXL base file in the original layout with random fp16 weights: our U-Net's and autoencoder's
    keys (the layout tests/test_sdxl.py checks against diffusers), CLIP ViT-L as transformers names it, bigG as
    open_clip does. Written tensor by tensor from meta shapes, so one copy exists."""
    from safetensors.torch import save_file

    from ldm.conditioner import Conditioner
    from ldm.text_encoder import sdxl_bigg

    with torch.device("meta"):
        unet = UNetModel(sdxl_unet_config(argparse.Namespace(model="sd1.5")))
        autoencoder = AutoencoderKL(AutoencoderConfig(scale_factor=0.13025))
        bigg = Conditioner([sdxl_bigg()])
        clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu"))
    shapes = {"model.diffusion_model." + k: v.shape for k, v in unet.state_dict().items()}
    shapes.update({"first_stage_model." + k: v.shape for k, v in autoencoder.state_dict().items()})
    shapes.update({"conditioner.embedders.1.model." + k.removeprefix("embedders.0."): v.shape
                   for k, v in bigg.state_dict().items()})
    shapes.update({"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k:
                   v.shape for k, v in clip_l.state_dict().items()})
    generator, tensors = torch.Generator().manual_seed(0), {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator)
        scale = shape[1:].numel() ** -0.5 if len(shape) >= 2 else 0.1
        tensors[key] = (value * scale + (1.0 if len(shape) == 1 and key.endswith("weight") else 0.0)).half()
    save_file(tensors, str(path))


def sdxl_file_case(args: argparse.Namespace, argv: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        path = Path(folder) / "sdxl_base_random.safetensors"
        write_random_sdxl(path)
        command = [sys.executable, __file__, *argv, "--cases", "sdxl-file", "--sdxl-probe", str(path)]
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        size = path.stat().st_size
    if result.returncode != 0:
        raise InputError(f"the sdxl-file run failed: {result.stderr.strip().splitlines()[-1:]}")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    return {"case": "sdxl-file", "file MiB": mib(size), "load s": f"{probe['load']:.1f}",
            "s/step": f"{probe['per_step']:.2f}", "loaded peak MiB": mib(probe["loaded_peak"]),
            "peak MiB": mib(probe["peak"])}


def sdxl_probe(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Child process of sdxl-file: load, then one image, timing each DDIM step by the callback."""
    start = time.perf_counter()
    pipe = Pipeline.from_checkpoint(args.sdxl_probe, device=device, dtype=dtype)
    load = time.perf_counter() - start
    loaded_peak = _proc_status_bytes("VmHWM")
    times: list[float] = []
    size = 8 * args.latent_size
    settings = GenerationSettings(prompt=SD_PROMPT, steps=args.steps, scale=GUIDANCE_SCALE, height=size, width=size)
    pipe.generate(settings, progress=False, callback=lambda i, x: times.append(time.perf_counter()))
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    print(json.dumps({"load": load, "per_step": per_step, "loaded_peak": loaded_peak,
                      "peak": _proc_status_bytes("VmHWM")}))


def print_table(rows: list[dict[str, str]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(row.get(c, "")) for row in rows)) for c in columns}
    for row in [dict(zip(columns, columns, strict=True)), *rows]:
        print("  ".join(row.get(c, "").ljust(widths[c]) for c in columns))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device, dtype = resolve_device(args.device), PRECISIONS[args.dtype]
    diffusers.utils.logging.set_verbosity_error()  # its advice on from_pretrained dtypes does not apply here
    torch.manual_seed(0)
    if args.memory_probe:
        probe_memory(args, device, dtype)
        return
    if args.sdxl_probe:
        sdxl_probe(args, device, dtype)
        return
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, latents {args.latent_size}, "
          f"context {args.context_len}, attention {args.attention}, compile {args.compile}, "
          f"channels_last {args.channels_last}, steps {args.steps}, "
          f"repeats {args.repeats}", flush=True)
    rows = []
    if args.engines:
        with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
            rows = engines_case(args, argv, device, dtype, Path(folder))
        args.cases = []
    for case in args.cases:
        if case == "int8":
            rows.extend(int8_case(args, device))
            print("\n".join(" ".join(f"{k}={v}" for k, v in row.items()) for row in rows[-len(args.int8_variants):]),
                  flush=True)
            continue
        if case in ("lora", "sdxl-file"):
            rows.append(lora_case(args, device, dtype) if case == "lora" else sdxl_file_case(args, argv))
        else:
            rows.append(benchmark_case(case, args, argv, device, dtype))
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    print()
    print_table(rows)


if __name__ == "__main__":
    sys.exit(run_main(main))
