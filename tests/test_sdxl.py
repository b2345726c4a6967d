"""SDXL base and refiner against diffusers / transformers on the same random weights, fp32, CPU.

Tiny files are written in the original single-file layout (generative-models' key names: CLIP ViT-L in
the Hugging Face layout under `conditioner.embedders.0.transformer.`, bigG in the open_clip layout under
`conditioner.embedders.N.model.`), read by our `Pipeline.from_checkpoint` with no config, and converted
to the reference models by diffusers' own single-file code. Widths are reduced, the layout is SDXL's
(64-channel heads, linear projections, no attention at the first level, per-level depths, label_emb).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import open_clip
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as ReferenceAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from PIL import Image
from safetensors.torch import save_file

from ldm.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.conditioner import BASE_MICRO_CONDITIONING, micro_conditioning
from ldm.errors import InputError
from ldm.pipeline import Pipeline
from ldm.samplers import SAMPLERS
from ldm.sd_checkpoint import AUTOENCODER_PREFIX, UNET_PREFIX, detect_spec, split_state_dict
from ldm.text_encoder import TextEncoder, TextEncoderConfig, sdxl_bigg, sdxl_clip_l
from ldm.unet import UNetConfig, UNetModel
from ldm.weights_io import load_strict
from tests.test_parity import MAX_RELATIVE_ERROR, randomize_, relative_error, unet_layout

ROOT = Path(__file__).resolve().parents[1]
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
# The released configs' network parameters (generative-models configs/inference/sd_xl_base.yaml and
# sd_xl_refiner.yaml), for the full-size layout check.
SDXL_BASE_NETWORK = {"adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
                     "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2,
                     "channel_mult": [1, 2, 4], "num_head_channels": 64, "use_spatial_transformer": True,
                     "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10], "context_dim": 2048,
                     "spatial_transformer_attn_type": "softmax-xformers", "legacy": False}
SDXL_REFINER_NETWORK = {"adm_in_channels": 2560, "num_classes": "sequential", "use_checkpoint": True,
                        "in_channels": 4, "out_channels": 4, "model_channels": 384, "attention_resolutions": [4, 2],
                        "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
                        "use_linear_in_transformer": True, "transformer_depth": 4, "context_dim": [1280] * 4,
                        "spatial_transformer_attn_type": "softmax-xformers"}
FIRST_STAGE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                            "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                            "attn_resolutions": [], "dropout": 0.0}}
# Reduced: 64-wide towers (one 64-channel head) with a 32-wide projection, U-Nets of 64 and 128 channels.
TOWER_WIDTH, POOLED_WIDTH = 64, 32
TINY_BASE_NETWORK = {**SDXL_BASE_NETWORK, "adm_in_channels": POOLED_WIDTH + 6 * 256, "model_channels": 64,
                     "attention_resolutions": [2], "channel_mult": [1, 2], "transformer_depth": [1, 2],
                     "context_dim": 2 * TOWER_WIDTH}
TINY_REFINER_NETWORK = {**SDXL_REFINER_NETWORK, "adm_in_channels": POOLED_WIDTH + 5 * 256, "model_channels": 64,
                        "attention_resolutions": [2], "channel_mult": [1, 2, 2], "transformer_depth": 1,
                        "context_dim": [TOWER_WIDTH] * 3}
TINY_FIRST_STAGE = {"embed_dim": 4, "ddconfig": {**FIRST_STAGE["ddconfig"], "ch": 32, "ch_mult": [1, 1, 2, 2],
                                                 "num_res_blocks": 1}}
PROMPTS = ["a red circle on a blue square", "a photograph of an astronaut riding a horse"]
LATENT_SHAPE = (2, 4, 16, 8)  # 128 x 64 pixels: non-square, so swapped sizes show


def layout(config: UNetConfig) -> dict:
    """What shapes the network, however it was spelled: heads per level, depths of the attention levels and
    of the middle block (a level without attention has no depth, whatever a YAML says)."""
    fields = unet_layout(config)
    del fields["transformer_depth"], fields["transformer_depth_middle"]
    levels = [level for level in range(len(config.channel_mult)) if 2**level in config.attention_resolutions]
    fields["depths"] = [config.depth(level) for level in [*levels, None]]
    return fields


def original_config(network: dict, first_stage: dict) -> dict:
    return {"model": {"params": {"scale_factor": 0.13025, "network_config": {"params": network},
                                 "first_stage_config": {"params": first_stage}}}}


def clip_l_reference(layers: int = 3, width: int = TOWER_WIDTH) -> transformers.CLIPTextModel:
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=77, hidden_act="quick_gelu"))


def hf_keys(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's state dict as SD checkpoints store it (transformers 4.x names, `text_model.` first)."""
    return {CLIP_L_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in model.state_dict().items()}


def bigg_config() -> TextEncoderConfig:
    return dataclasses.replace(sdxl_bigg(), width=TOWER_WIDTH, layers=3, heads=1, output_dim=POOLED_WIDTH)


def our_stages(network: dict, seed: int) -> dict[str, torch.Tensor]:
    """Our U-Net, autoencoder and a bigG-layout tower with random weights, in the original key layout (the
    tower under `conditioner.embedders.N.model.` with N = 1 for the base, 0 for the refiner)."""
    unet = UNetModel(UNetConfig.from_dict(network))
    autoencoder = AutoencoderKL(AutoencoderConfig.from_dict(TINY_FIRST_STAGE))
    tower = TextEncoder(bigg_config())
    index = 1 if network["adm_in_channels"] == TINY_BASE_NETWORK["adm_in_channels"] else 0
    checkpoint = {UNET_PREFIX + k: v for k, v in randomize_(unet, seed).items()}
    checkpoint.update({AUTOENCODER_PREFIX + k: v for k, v in randomize_(autoencoder, seed + 1).items()})
    checkpoint.update({f"conditioner.embedders.{index}.model.{k}": v for k, v in randomize_(tower, seed + 2).items()})
    return checkpoint


def reference_unet(network: dict, checkpoint: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    config = create_unet_diffusers_config_from_ldm(original_config(network, TINY_FIRST_STAGE), checkpoint)
    # diffusers recognises SDXL's vector input by the released context widths (2048, 1280) only.
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    assert len(converted) == sum(k.startswith(UNET_PREFIX) for k in checkpoint)
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(converted, strict=True)
    return reference.eval()


def reference_bigg(checkpoint: dict[str, torch.Tensor], prefix: str) -> transformers.CLIPTextModelWithProjection:
    config = bigg_config()
    reference = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=config.output_dim))
    converted = convert_open_clip_checkpoint(reference, checkpoint, prefix=prefix)
    reference.load_state_dict(converted, strict=True)
    return reference.eval()


def reference_vae(checkpoint: dict[str, torch.Tensor]) -> ReferenceAutoencoderKL:
    config = create_vae_diffusers_config_from_ldm(original_config(TINY_BASE_NETWORK, TINY_FIRST_STAGE), checkpoint)
    reference = ReferenceAutoencoderKL(**config)
    reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return reference.eval()


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def reference_base(sdxl: dict) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline over the reference models (no tokenizers: it is given embeddings)."""
    return StableDiffusionXLPipeline(vae=sdxl["vae"], text_encoder=sdxl["clip_l"], text_encoder_2=sdxl["bigg"],
                                     tokenizer=None, tokenizer_2=None, unet=sdxl["unet"], scheduler=scheduler(),
                                     add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Tiny SDXL base and refiner files, and the reference models built from them."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sdxl")
    clip_l = clip_l_reference()
    randomize_(clip_l, seed=10)
    base = {**our_stages(TINY_BASE_NETWORK, seed=11), **hf_keys(clip_l)}
    refiner = our_stages(TINY_REFINER_NETWORK, seed=21)
    save_file(base, str(folder / "base.safetensors"))
    save_file(refiner, str(folder / "refiner.safetensors"))
    return {
        "base": folder / "base.safetensors", "refiner": folder / "refiner.safetensors",
        "clip_l": clip_l.eval(), "bigg": reference_bigg(base, "conditioner.embedders.1.model."),
        "refiner_bigg": reference_bigg(refiner, "conditioner.embedders.0.model."),
        "unet": reference_unet(TINY_BASE_NETWORK, base), "refiner_unet": reference_unet(TINY_REFINER_NETWORK, refiner),
        "vae": reference_vae(base),
    }


@pytest.fixture(scope="module")
def pipe(sdxl) -> Pipeline:
    return Pipeline.from_checkpoint(sdxl["base"])


def reference_text(sdxl: dict, pipe: Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference towers' context (penultimate hidden states side by side) and pooled text, on our tokens."""
    clip_l, bigg = pipe.text_encoder.embedders
    with torch.no_grad():
        hidden_l = sdxl["clip_l"](clip_l.tokenize(prompts), output_hidden_states=True).hidden_states[-2]
        out = sdxl["bigg"](bigg.tokenize(prompts), output_hidden_states=True)
    return torch.cat([hidden_l, out.hidden_states[-2]], dim=-1), out.text_embeds


def test_layout_is_detected_from_shapes(pipe, sdxl):
    spec = pipe.spec
    assert (spec.family, spec.image_size, spec.parameterization) == ("sdxl", 1024, "eps")
    assert layout(spec.unet) == layout(UNetConfig.from_dict(TINY_BASE_NETWORK))
    assert spec.unet.depth(1) == 2 and spec.unet.depth(None) == 2 and spec.unet.heads_and_dim(128) == (2, 64)
    assert spec.text_encoder == (dataclasses.replace(sdxl_clip_l(), width=64, layers=3, heads=1), bigg_config())
    assert spec.autoencoder == AutoencoderConfig.from_dict({**TINY_FIRST_STAGE, "scale_factor": 0.13025})
    refiner = Pipeline.from_checkpoint(sdxl["refiner"]).spec
    assert refiner.family == "sdxl_refiner" and refiner.text_encoder == (bigg_config(),)
    assert layout(refiner.unet) == layout(UNetConfig.from_dict(TINY_REFINER_NETWORK))


def test_text_encoders_match_transformers(pipe, sdxl):
    prompts = [*PROMPTS, ""]
    (context, pooled), _ = pipe.text_encoder.encode(prompts, None)
    ref_context, ref_pooled = reference_text(sdxl, pipe, prompts)
    assert relative_error("SDXL context (CLIP-L + bigG penultimate)", context, ref_context) <= MAX_RELATIVE_ERROR
    assert relative_error("SDXL pooled text (bigG)", pooled, ref_pooled) <= MAX_RELATIVE_ERROR
    # The first tower's half is CLIP-L's, and neither has the final LayerNorm (its mean would be ~0).
    assert context[..., :TOWER_WIDTH].mean(-1).abs().max() > 0.01


def test_unet_with_micro_conditioning_matches_diffusers(pipe, sdxl):
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(LATENT_SHAPE, generator=generator)
    t = torch.tensor([981, 1])
    context = torch.randn(2, 77, 2 * TOWER_WIDTH, generator=generator)
    pooled = torch.randn(2, POOLED_WIDTH, generator=generator)
    values = {"original_size": (1024, 768), "crop_coords": (16, 0), "target_size": (128, 64)}
    time_ids = torch.tensor([[1024, 768, 16, 0, 128, 64]] * 2, dtype=torch.float32)
    vector = torch.cat([pooled, micro_conditioning(BASE_MICRO_CONDITIONING, values, 2)], dim=-1)
    with torch.no_grad():
        ours = pipe.unet(x_t, t, context, vector=vector)
        ref = sdxl["unet"](x_t, t, encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        without = pipe.unet(x_t, t, context, vector=torch.zeros_like(vector))
    assert relative_error("SDXL U-Net with label_emb", ours, ref) <= MAX_RELATIVE_ERROR
    assert (ours - without).abs().max() > 0.01 * ours.abs().max()  # the vector matters


def test_guided_ddim_run_matches_diffusers_pipeline(pipe, sdxl):
    # Our whole path (both towers, zeroed empty negative prompt, micro-conditioning, guidance, DDIM, decode)
    # against StableDiffusionXLPipeline given the reference towers' embeddings of our tokens.
    x_T = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(7))
    height, width = 8 * LATENT_SHAPE[2], 8 * LATENT_SHAPE[3]
    ours = pipe(PROMPTS, num_steps=10, guidance_scale=7.5, height=height, width=width, latents=x_T,
                output_type="tensor", progress=False)
    context, pooled = reference_text(sdxl, pipe, PROMPTS)
    reference = reference_base(sdxl)
    with torch.no_grad():
        ref = reference(prompt_embeds=context, pooled_prompt_embeds=pooled, num_inference_steps=10,
                        guidance_scale=7.5, height=height, width=width, latents=x_T, output_type="pt").images
    assert relative_error("SDXL 10-step DDIM, guidance 7.5, decoded", (ours + 1) / 2, ref.clamp(0, 1)) \
        <= MAX_RELATIVE_ERROR


def test_base_and_refiner_hand_off_matches_diffusers(pipe, sdxl):
    x_T = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(8))
    height, width = 8 * LATENT_SHAPE[2], 8 * LATENT_SHAPE[3]
    ours = pipe(PROMPTS, num_steps=10, guidance_scale=7.5, height=height, width=width, latents=x_T,
                refiner=sdxl["refiner"], refiner_switch=0.8, output_type="latent", progress=False)
    base_only = pipe(PROMPTS, num_steps=10, guidance_scale=7.5, height=height, width=width, latents=x_T,
                     output_type="latent", progress=False)

    context, pooled = reference_text(sdxl, pipe, PROMPTS)
    base = reference_base(sdxl)
    refiner = StableDiffusionXLImg2ImgPipeline(vae=sdxl["vae"], text_encoder=None,
                                               text_encoder_2=sdxl["refiner_bigg"], tokenizer=None, tokenizer_2=None,
                                               unet=sdxl["refiner_unet"], scheduler=scheduler(),
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                               add_watermarker=False)
    tower = pipe._load_refiner(sdxl["refiner"]).text_encoder.embedders[0]
    with torch.no_grad():
        out = sdxl["refiner_bigg"](tower.tokenize(PROMPTS), output_hidden_states=True)
        negative = sdxl["refiner_bigg"](tower.tokenize(["", ""]), output_hidden_states=True)
        handed_over = base(prompt_embeds=context, pooled_prompt_embeds=pooled, num_inference_steps=10,
                           guidance_scale=7.5, height=height, width=width, latents=x_T, denoising_end=0.8,
                           output_type="latent").images
        ref = refiner(prompt_embeds=out.hidden_states[-2], pooled_prompt_embeds=out.text_embeds,
                      negative_prompt_embeds=negative.hidden_states[-2],
                      negative_pooled_prompt_embeds=negative.text_embeds, image=handed_over, num_inference_steps=10,
                      denoising_start=0.8, guidance_scale=7.5, output_type="latent").images
    assert relative_error("SDXL base + refiner at 0.8, 10-step DDIM", ours, ref) <= MAX_RELATIVE_ERROR
    assert (ours - base_only).abs().max() > 0.01 * base_only.abs().max()  # the refiner ran


def test_refiner_alone_refines_an_image(sdxl, tmp_path):
    refiner = Pipeline.from_checkpoint(sdxl["refiner"])
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    light = refiner("a red circle", init_images=image, strength=0.2, num_steps=10, aesthetic_score=7.0,
                    output_type="latent", progress=False)
    start = refiner.encode(image)
    strong = refiner("a red circle", init_images=image, strength=0.9, num_steps=10, output_type="latent",
                     progress=False)
    assert (light - start).abs().mean() < (strong - start).abs().mean()
    with pytest.raises(InputError, match="is an SDXL refiner: it refines an image"):
        refiner("a red circle", num_steps=2, progress=False)


def test_saved_sdxl_pipeline_reloads_with_the_same_output(pipe, tmp_path):
    path = pipe.save(tmp_path / "ours.safetensors")
    again = Pipeline.from_checkpoint(path)
    settings = {"num_steps": 2, "height": 64, "width": 64, "output_type": "latent", "progress": False}
    assert torch.equal(pipe(PROMPTS, **settings), again(PROMPTS, **settings))


def test_autoencoder_stays_float32_in_a_float16_pipeline(pipe):
    half = copy.deepcopy(pipe).to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.autoencoder_dtype == torch.float32
    images = half("a red circle", num_steps=2, height=64, width=64, output_type="tensor", progress=False)
    assert images.isfinite().all()
    half.autoencoder.half()  # forced by hand: an overflow is said so, not returned as black images
    half.autoencoder.decoder.conv_out.bias.data.fill_(float("inf"))
    with pytest.raises(InputError, match="overflowed in float16"):
        half.decode(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize(("settings", "message"), [
    ({"original_size": (0, 64)}, "original size must be >= 1"),
    ({"crop_coords": (1, 2, 3)}, "crop coords must be two whole numbers"),
    ({"target_size": (64.5, 64)}, "target size must be a whole number"),
    ({"refiner_switch": 0.5}, "refiner switch needs refiner"),
    ({"height": 60}, "height must be a positive multiple of 8"),
])
def test_bad_sdxl_settings_are_refused(pipe, settings, message):
    with pytest.raises(InputError, match=message):
        pipe("a", num_steps=2, progress=False, **settings)


def test_sdxl_settings_on_another_model_are_refused(tiny_pipeline):
    with pytest.raises(InputError, match="original_size, refiner apply to SDXL models only"):
        tiny_pipeline("a", original_size=(64, 64), refiner="x.safetensors", num_steps=2, progress=False)


def test_incomplete_sdxl_files_are_refused(sdxl, tmp_path):
    from safetensors.torch import load_file

    base = load_file(str(sdxl["base"]))
    path = tmp_path / "no_clip_l.safetensors"
    save_file({k: v for k, v in base.items() if not k.startswith(CLIP_L_PREFIX)}, str(path))
    with pytest.raises(InputError, match="this file has 1: open_clip: it is incomplete"):
        Pipeline.from_checkpoint(path)
    with pytest.raises(InputError, match="is not an SDXL refiner"):
        Pipeline.from_checkpoint(sdxl["base"])("a", refiner=sdxl["base"], num_steps=2, progress=False)


def full_size_layout(network: dict, clip_l: bool) -> dict[str, torch.Tensor]:
    """A full-size SDXL file's keys and shapes as meta tensors: CLIP ViT-L from transformers, bigG from
    open_clip's ViT-bigG-14 config (without its vision tower, as SDXL saved it), U-Net and autoencoder ours
    (the U-Net's names are checked against diffusers' conversion below)."""
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_dict(network))
        autoencoder = AutoencoderKL(AutoencoderConfig.from_dict(FIRST_STAGE))
        bigg = open_clip.CLIP(**open_clip.get_model_config("ViT-bigG-14"))
        layout = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
        layout.update({AUTOENCODER_PREFIX + k: v for k, v in autoencoder.state_dict().items()})
        index = 1 if clip_l else 0
        layout.update({f"conditioner.embedders.{index}.model.{k}": v for k, v in bigg.state_dict().items()
                       if not k.startswith("visual.")})
        if clip_l:
            layout.update(hf_keys(clip_l_reference(layers=12, width=768)))
    return layout


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_full_size_layout_loads_strictly(name):
    network = SDXL_BASE_NETWORK if name == "base" else SDXL_REFINER_NETWORK
    checkpoint = full_size_layout(network, clip_l=name == "base")
    spec = detect_spec(checkpoint)
    assert spec.family == ("sdxl" if name == "base" else "sdxl_refiner")
    assert layout(spec.unet) == layout(UNetConfig.from_dict(network))
    assert spec.text_encoder == ((sdxl_clip_l(), sdxl_bigg()) if name == "base" else (sdxl_bigg(),))
    assert spec.autoencoder == AutoencoderConfig.from_dict({**FIRST_STAGE, "scale_factor": 0.13025})
    # diffusers' converter takes every U-Net key of the released layout into its SDXL U-Net.
    config = create_unet_diffusers_config_from_ldm(original_config(network, FIRST_STAGE), checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    reference.load_state_dict(converted, strict=True, assign=True)
    assert config["addition_embed_type"] == "text_time" and len(converted) == len(reference.state_dict())
    parts = split_state_dict(checkpoint)
    with torch.device("meta"):
        pipe = Pipeline.from_spec(spec)
    for part, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("autoencoder", pipe.autoencoder)):
        load_strict(module, parts[part], part, name)


def kohya_sdxl_lora(pipe: Pipeline, seed: int, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A kohya SDXL LoRA + LoCon: every linear and convolution of the U-Net's blocks under the original
    (sgm) names, every linear of both towers under Hugging Face names, `lora_te1_` CLIP-L, `lora_te2_` bigG."""
    generator, tensors, layers = torch.Generator().manual_seed(seed), {}, []
    for name, module in pipe.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.startswith(
                ("input_blocks", "middle_block", "output_blocks")) and name != "input_blocks.0.0":
            layers.append((f"lora_unet_{name.replace('.', '_')}", module.weight))
    for prefix, tower in zip(("lora_te1", "lora_te2"), pipe.text_encoder.embedders, strict=True):
        width = tower.config.width
        for block in range(tower.config.layers):
            ours, theirs = f"transformer.resblocks.{block}", f"{prefix}_text_model_encoder_layers_{block}"
            fused = tower.get_parameter(f"{ours}.attn.in_proj_weight")
            layers += [(f"{theirs}_self_attn_{p}_proj", fused[k * width:(k + 1) * width]) for k, p in enumerate("qkv")]
            layers += [(f"{theirs}_{hf}", tower.get_parameter(f"{ours}.{name}.weight"))
                       for hf, name in (("self_attn_out_proj", "attn.out_proj"), ("mlp_fc1", "mlp.c_fc"),
                                        ("mlp_fc2", "mlp.c_proj"))]
    for key, weight in layers:
        down = 0.2 * torch.randn(rank, *weight.shape[1:], generator=generator)
        up = 0.2 * torch.randn(weight.shape[0], rank, *[1] * (weight.ndim - 2), generator=generator)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    return tensors


def test_kohya_sdxl_lora_matches_diffusers(pipe, sdxl, tmp_path):
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(kohya_sdxl_lora(pipe, seed=30), str(path))
    reference = reference_base({**sdxl, **{k: copy.deepcopy(sdxl[k]) for k in ("clip_l", "bigg", "unet")}})
    reference.load_lora_weights(str(path))
    generator = torch.Generator().manual_seed(31)
    x_t = torch.randn(LATENT_SHAPE, generator=generator)
    t = torch.tensor([700, 30])
    context = torch.randn(2, 77, 2 * TOWER_WIDTH, generator=generator)
    pooled = torch.randn(2, POOLED_WIDTH, generator=generator)
    time_ids = torch.tensor([[128, 64, 0, 0, 128, 64]] * 2, dtype=torch.float32)
    vector = torch.cat([pooled, micro_conditioning(BASE_MICRO_CONDITIONING, {
        "original_size": (128, 64), "crop_coords": (0, 0), "target_size": (128, 64)}, 2)], dim=-1)
    with torch.no_grad():
        before = pipe.unet(x_t, t, context, vector=vector)
        pipe.load_lora(path)
        try:
            ours = pipe.unet(x_t, t, context, vector=vector)
            (ours_context, ours_pooled), _ = pipe.text_encoder.encode(PROMPTS, None)
        finally:
            pipe.unload_lora()
        ref = reference.unet(x_t, t, encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    towers = {"clip_l": reference.text_encoder, "bigg": reference.text_encoder_2}
    ref_context, ref_pooled = reference_text(towers, pipe, PROMPTS)
    assert relative_error("SDXL U-Net with a kohya LoRA", ours, ref) <= MAX_RELATIVE_ERROR
    assert (ours - before).abs().max() > 0.05 * before.abs().max()
    assert relative_error("SDXL context with te1 / te2 LoRA", ours_context, ref_context) <= MAX_RELATIVE_ERROR
    assert relative_error("SDXL pooled text with te2 LoRA", ours_pooled, ref_pooled) <= MAX_RELATIVE_ERROR


def test_sdxl_embedding_stands_for_its_vectors_in_both_towers(pipe, tmp_path):
    # An embedding whose vectors are each tower's token vectors of "red circle" makes "thing" encode as it.
    towers = pipe.embedding_towers()
    assert set(towers) == {"clip_l", "clip_g"}
    vectors = {key: tower.token_embedding.weight[tower.tokenizer.encode("red circle")].clone()
               for key, tower in towers.items()}
    save_file(vectors, str(tmp_path / "thing.safetensors"))
    save_file({"emb_params": torch.zeros(1, 64)}, str(tmp_path / "sd1_only.safetensors"))  # one tower: skipped
    try:
        with pytest.warns(UserWarning, match="skipped 1 embeddings"):
            pipe.load_embeddings(tmp_path)
        (context, pooled), _ = pipe.text_encoder.encode(["a thing on white"], None)
        (expected, expected_pooled), _ = pipe.text_encoder.encode(["a red circle on white"], None)
        (other, _), _ = pipe.text_encoder.encode(["a square on white"], None)
    finally:
        for tower in towers.values():
            tower.set_embeddings({})
        pipe.embedding_files = {}
    assert torch.equal(context, expected) and torch.equal(pooled, expected_pooled)
    assert not torch.equal(context, other)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_img2img_and_inpainting_run_on_sdxl(pipe, sampler):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(40)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1  # repaint the left half
    settings = {"num_steps": 3, "sampler": sampler, "seed": 4, "output_type": "latent", "progress": False}
    txt2img = pipe("a red circle", height=64, width=64, **settings)
    refined = pipe("a red circle", init_images=image, strength=0.7, **settings)
    inpainted = pipe("a red circle", init_images=image, mask=mask, **settings)
    assert txt2img.isfinite().all() and refined.isfinite().all()
    start = pipe.encode(image)
    assert torch.allclose(inpainted[..., 4:], start[..., 4:], atol=1e-5)  # the kept half is the image's
    assert not torch.allclose(inpainted[..., :4], start[..., :4], atol=1e-2)


def test_txt2img_with_refiner_replays_from_the_png(sdxl, tmp_path, capsys):
    import sys

    from ldm.cli import run_main

    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img

    flags = ["--ckpt", str(sdxl["base"]), "--refiner", str(sdxl["refiner"]), "--refiner_switch", "0.6",
             "--original_size", "512,256", "--crop_coords", "8,0", "--H", "64", "--W", "32", "--steps", "3",
             "--skip_grid"]
    assert run_main(txt2img.main, ["--prompt", "a red circle", "--outdir", str(tmp_path / "a"), *flags]) == 0
    original = tmp_path / "a" / "00000.png"
    info = Image.open(original).text
    assert (info["refiner"], info["refiner_switch"]) == (str(sdxl["refiner"].resolve()), "0.6")
    assert (info["original_size"], info["crop_coords"]) == ("(512, 256)", "(8, 0)")
    assert run_main(txt2img.main, ["--replay", str(original), "--outdir", str(tmp_path / "b"), "--ckpt",
                                   str(sdxl["base"])]) == 0
    assert Image.open(tmp_path / "b" / "00000.png").tobytes() == Image.open(original).tobytes()
    assert run_main(txt2img.main, ["--prompt", "a", "--outdir", str(tmp_path / "c"), *flags[:2], "--target_size",
                                   "64"]) == 1
    assert "invalid pair value: '64'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
