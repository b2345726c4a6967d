"""Fidelity against the reference implementation: identical weights, fp32, CPU.

Our U-Net, autoencoder and SD 2.x text encoder are built at the real Stable Diffusion sizes with
random weights. Their state dicts, put under the original checkpoint prefixes, are converted by
diffusers' own single-file code (configured from the public inference YAMLs below) into diffusers /
transformers models, which are the reference. A key that strays from the original layout therefore
fails the reference's strict load, and any numerical difference shows in the outputs. Errors are
reported as max|ours - ref| / max|ref| (printed with `pytest -s`).

The SD 1.x text encoder is compared with transformers' CLIPTextModel in tests/test_text_encoder.py.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import transformers
import yaml
from diffusers import AutoencoderKL as ReferenceAutoencoderKL
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from safetensors.torch import save_file

from ldm.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.pipeline import Pipeline
from ldm.sd_checkpoint import (
    HF_TEXT_PREFIX,
    OPEN_CLIP_TEXT_PREFIX,
    UNET_PREFIX,
    ModelSpec,
    detect_spec,
    join_state_dicts,
    spec_from_yaml,
)
from ldm.text_encoder import TextEncoder, hf_clip_text_to_open_clip, sd2
from ldm.unet import UNetConfig, UNetModel
from ldm.weights_io import read_checkpoint

# The public inference configs of Stable Diffusion, as released (CompVis/stable-diffusion
# configs/stable-diffusion/v1-inference.yaml, Stability-AI/stablediffusion configs/stable-diffusion/).
V1_INFERENCE_YAML = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

V2_INFERENCE_YAML = """\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""

# v2-inference-v.yaml is v2-inference.yaml with one more line.
V2_INFERENCE_V_YAML = V2_INFERENCE_YAML.replace(
    "  params:\n    linear_start", '  params:\n    parameterization: "v"\n    linear_start', 1
)
assert V2_INFERENCE_V_YAML != V2_INFERENCE_YAML

YAMLS = {"sd1": V1_INFERENCE_YAML, "sd2": V2_INFERENCE_YAML, "sd2-v": V2_INFERENCE_V_YAML}
MAX_RELATIVE_ERROR = 1e-4
# Latents of 16 x 8: non-square catches swapped height and width, and the deepest level (2 x 1)
# still has two tokens, so a wrong head split in the middle block's self-attention shows.
LATENT_SHAPE = (2, 4, 16, 8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The CPU is shared by several jobs; two OpenMP threads there ran the full U-Net 6x slower than one.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()


def original_config(name: str) -> dict:
    """The parsed inference YAML: "sd1", "sd2" or "sd2-v"."""
    return yaml.safe_load(YAMLS[name])


def unet_params(config: dict) -> dict:
    return config["model"]["params"]["unet_config"]["params"]


def first_stage_params(config: dict) -> dict:
    return config["model"]["params"]["first_stage_config"]["params"]


def write_yaml(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def randomize_(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Give every parameter random values (the module may be on the meta device); return its state dict.

    Weights are N(0, 1 / fan_in), which keeps activations near unit scale through the full-depth
    networks; norm scales are 1 + N(0, 0.1^2), biases and other vectors N(0, 0.1^2). Nothing is zero,
    so the zero-initialised output layers (`proj_out`, `out_layers.3`, `out.2`) take part too.
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, tensor in module.state_dict().items():
        value = torch.randn(tensor.shape, generator=generator)
        if tensor.ndim >= 2:
            value.mul_(tensor[0].numel() ** -0.5)
        elif name.endswith("weight"):
            value.mul_(0.1).add_(1.0)
        else:
            value.mul_(0.1)
        state_dict[name] = value
    module.load_state_dict(state_dict, strict=True, assign=True)
    return state_dict


def relative_error(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    error = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"\n{name}: max|ours - ref| / max|ref| = {error:.2e} (max|ref| = {ref.abs().max().item():.3g})")
    return error


def reference_unet(config: dict, checkpoint: dict[str, torch.Tensor], num_keys: int) -> UNet2DConditionModel:
    """diffusers' U-Net from an original-layout checkpoint, converted by diffusers' own code.

    It shares the checkpoint's tensors (built on the meta device and assigned), so no memory is copied.
    """
    reference_config = create_unet_diffusers_config_from_ldm(config, checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, reference_config)
    assert len(converted) == num_keys  # the conversion silently skips keys it does not know
    with torch.device("meta"):
        reference = UNet2DConditionModel(**reference_config)
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def our_unet(config: dict, seed: int) -> tuple[UNetModel, dict[str, torch.Tensor]]:
    """Our U-Net as the YAML describes it, with random weights, and its original-layout checkpoint."""
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_dict(unet_params(config)))
    state_dict = randomize_(unet, seed)
    return unet.eval(), join_state_dicts(state_dict, {}, {})


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_matches_diffusers(family):
    # SD 2.x-v has the SD 2.x U-Net; only the sampler reads its output differently (see the DDIM test).
    config = original_config(family)
    unet, checkpoint = our_unet(config, seed=0)
    reference = reference_unet(config, checkpoint, num_keys=len(checkpoint))

    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(LATENT_SHAPE, generator=generator)
    t = torch.tensor([981, 1])  # two different timesteps, so rows mixed up in the batch show
    context = torch.randn(2, 77, unet.config.context_dim, generator=generator)
    with torch.no_grad():
        ours = unet(x_t, t, context)
        ref = reference(x_t, t, encoder_hidden_states=context).sample
    assert relative_error(f"{family} U-Net (860M, real config)", ours, ref) <= MAX_RELATIVE_ERROR


def test_autoencoder_matches_diffusers():
    config = original_config("sd1")
    # One case covers both families: their autoencoders are the same.
    for other in ("sd2", "sd2-v"):
        assert first_stage_params(original_config(other)) == first_stage_params(config)
    with torch.device("meta"):
        autoencoder = AutoencoderKL(AutoencoderConfig.from_dict(first_stage_params(config)))
    state_dict = randomize_(autoencoder, seed=2)
    autoencoder.eval()
    checkpoint = join_state_dicts({}, state_dict, {})
    reference_config = create_vae_diffusers_config_from_ldm(config, checkpoint)
    converted = convert_ldm_vae_checkpoint(checkpoint, reference_config)
    assert len(converted) == len(state_dict)
    with torch.device("meta"):
        reference = ReferenceAutoencoderKL(**reference_config)
    reference.load_state_dict(converted, strict=True, assign=True)
    reference.eval()
    assert reference.config.scaling_factor == autoencoder.scale_factor

    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 64, 48, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 8, 6, generator=generator)
    with torch.no_grad():
        posterior = autoencoder.encode(images)
        ref_posterior = reference.encode(images).latent_dist
        decoded = autoencoder.decode(latents)
        ref_decoded = reference.decode(latents).sample
    ours = torch.cat([posterior.mean, posterior.logvar], dim=1)
    ref = torch.cat([ref_posterior.mean, ref_posterior.logvar], dim=1)
    errors = [relative_error("autoencoder encoder (mean, logvar)", ours, ref),
              relative_error("autoencoder decoder", decoded, ref_decoded)]
    assert max(errors) <= MAX_RELATIVE_ERROR


def test_sd2_text_encoder_matches_transformers_clip():
    # The real SD 2.x width and heads with fewer layers, to stay fast.
    config = dataclasses.replace(sd2(), layers=3)
    encoder = TextEncoder(config)
    checkpoint = join_state_dicts({}, {}, randomize_(encoder, seed=4))
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.context_length, hidden_act="gelu",
    ))
    converted = convert_open_clip_checkpoint(reference, checkpoint)
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level (the conversion leaves out the CLIP head).
    text_model = getattr(reference, "text_model", reference)
    if text_model is reference:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    reference.load_state_dict(converted, strict=True)
    reference.eval()

    tokens = encoder.tokenize(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        ours = encoder.encode_tokens(tokens)
        hidden_states = reference(input_ids=tokens, output_hidden_states=True).hidden_states
        ref = text_model.final_layer_norm(hidden_states[-2])
    assert relative_error("sd2 text encoder (width 1024, 3 layers), penultimate", ours, ref) <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize(("name", "prediction_type"),
                         [("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2-v", "v_prediction")])
def test_guided_ddim_matches_diffusers_scheduler(name, prediction_type, tmp_path):
    # The family's layout at a reduced width; our side runs the whole Pipeline.__call__ path
    # (text encoder, ClassifierFreeGuidance, sample_ddim with the YAML's parameterization).
    config = original_config(name)
    unet_params(config).update(model_channels=32)
    if "num_head_channels" in unet_params(config):
        unet_params(config)["num_head_channels"] = 16
    spec = spec_from_yaml(write_yaml(config, tmp_path / f"{name}.yaml"))
    spec["text_encoder"] = dataclasses.replace(spec["text_encoder"], layers=2)
    spec["autoencoder"] = AutoencoderConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)  # unused here
    torch.manual_seed(5)
    pipe = Pipeline.from_spec(ModelSpec(**spec))
    checkpoint = join_state_dicts(randomize_(pipe.unet, seed=6), {}, {})
    pipe.unet.eval()
    reference = reference_unet(config, checkpoint, num_keys=len(checkpoint))

    prompts = ["a red circle", "a blue square on a black background"]
    x_T = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(7))
    factor = spec["autoencoder"].downsampling_factor
    ours = pipe(prompts, num_steps=10, guidance_scale=7.5, height=factor * x_T.shape[2], width=factor * x_T.shape[3],
                latents=x_T, output_type="latent", progress=False)

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    with torch.no_grad():
        contexts = torch.cat([pipe.text_encoder(["", ""]), pipe.text_encoder(prompts)])
        x_t = x_T
        for t in scheduler.timesteps:
            uncond, cond = reference(torch.cat([x_t, x_t]), t, encoder_hidden_states=contexts).sample.chunk(2)
            x_t = scheduler.step(uncond + 7.5 * (cond - uncond), t, x_t, eta=0.0).prev_sample
    error = relative_error(f"10-step DDIM, guidance 7.5, {name} ({prediction_type})", ours, x_t)
    assert error <= MAX_RELATIVE_ERROR


# Checkpoint loading.

_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
_ALPHAS_CUMPROD = torch.cumprod(1 - _BETAS, dim=0)
# Schedule buffers and EMA bookkeeping that released checkpoints carry besides the weights, and the
# position ids older transformers saved with the SD 1.x text model: loading must accept and skip them.
STRAY_TENSORS = {
    "betas": _BETAS.float(),
    "alphas_cumprod": _ALPHAS_CUMPROD.float(),
    "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), _ALPHAS_CUMPROD[:-1]]).float(),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
    HF_TEXT_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None],
}


def text_encoder_shapes(name: str) -> dict[str, torch.Size]:
    """Text encoder keys and shapes as SD checkpoints store them, from the reference libraries."""
    with torch.device("meta"):
        if name == "sd1":  # openai/clip-vit-large-patch14's text model, in transformers 4.x naming
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
            return {HF_TEXT_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k: v.shape
                    for k, v in model.state_dict().items()}
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    # SD 2.x saved the CLIP model without its vision tower.
    return {OPEN_CLIP_TEXT_PREFIX + k: v.shape for k, v in model.state_dict().items() if not k.startswith("visual.")}


def full_size_checkpoint(name: str) -> dict[str, torch.Tensor]:
    """A full-size original-layout checkpoint in fp16, every weight filled with a constant of its own.

    U-Net and autoencoder key names are our modules' (the parity tests above show they are the
    original ones); the stray entries of `STRAY_TENSORS` are added.
    """
    config = original_config(name)
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_dict(unet_params(config)))
        autoencoder = AutoencoderKL(AutoencoderConfig.from_dict(first_stage_params(config)))
    shapes = {UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()}
    shapes.update({"first_stage_model." + k: v.shape for k, v in autoencoder.state_dict().items()})
    shapes.update(text_encoder_shapes(name))
    # k / 2048 for k < 2048 is exact in fp16, so every key's value is distinct and survives the round trip.
    checkpoint = {key: torch.full(shape, (i % 2047 + 1) / 2048, dtype=torch.float16)
                  for i, (key, shape) in enumerate(shapes.items())}
    assert len(checkpoint) < 2047
    return {**checkpoint, **STRAY_TENSORS}


def same_ends(loaded: torch.Tensor, stored: torch.Tensor) -> bool:
    """Same shape and dtype, and the same first and last elements (cheap for billions of weights)."""
    return (loaded.shape == stored.shape and loaded.dtype == stored.dtype
            and torch.equal(loaded.flatten()[[0, -1]], stored.flatten()[[0, -1]]))


def unet_layout(config: UNetConfig) -> dict:
    """The fields that shape the network, with heads as (heads, head width) per level however they were given."""
    layout = config.to_dict()
    del layout["num_heads"], layout["num_head_channels"]
    layout["heads"] = [config.heads_and_dim(config.model_channels * mult) for mult in config.channel_mult]
    return layout


@pytest.mark.parametrize(("name", "global_step", "image_size"), [
    ("sd1", None, 512),
    ("sd1", 840000, 512),
    ("sd2", 875000, 512),  # SD 2.0-base was released at this step: eps-prediction
    ("sd2-v", 140000, 768),  # any other SD 2.x step: v-prediction
])
def test_family_detected_from_keys_and_global_step(name, global_step, image_size, tmp_path):
    config = original_config(name)
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_dict(unet_params(config)))
    probes = ("input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    shapes = unet.state_dict()
    path = tmp_path / f"{name}.ckpt"
    obj = {"state_dict": {UNET_PREFIX + k: torch.zeros(shapes[k].shape) for k in probes}}
    if global_step is not None:
        obj["global_step"] = global_step
    torch.save(obj, path)

    spec = detect_spec(*read_checkpoint(path))
    expected = ModelSpec(**spec_from_yaml(write_yaml(config, tmp_path / f"{name}.yaml")))
    assert (spec.family, spec.parameterization) == (expected.family, expected.parameterization)
    assert unet_layout(spec.unet) == unet_layout(expected.unet)
    assert spec.autoencoder == expected.autoencoder
    assert spec.text_encoder == expected.text_encoder
    assert spec.schedule == expected.schedule
    assert spec.image_size == image_size
    # 64 x 64 latents (`model.params.image_size`; the U-Net's 32 is unused), but 768 px for the v models.
    assert expected.image_size == (768 if name == "sd2-v" else 512)


@pytest.mark.parametrize(("name", "suffix", "global_step", "use_yaml", "parameterization", "image_size"), [
    ("sd1", ".safetensors", None, False, "eps", 512),
    ("sd1", ".ckpt", 840000, False, "eps", 512),
    ("sd2", ".ckpt", 875000, False, "eps", 512),
    ("sd2-v", ".safetensors", None, True, "v", 768),  # safetensors hold no step: the YAML says v
])
def test_full_size_checkpoint_loads_strictly(name, suffix, global_step, use_yaml, parameterization, image_size,
                                             tmp_path):
    checkpoint = full_size_checkpoint(name)
    path = tmp_path / f"{name}{suffix}"
    try:
        if suffix == ".safetensors":
            save_file(checkpoint, str(path))
        else:
            torch.save({"state_dict": checkpoint, "global_step": global_step, "epoch": 5}, path)
        yaml_path = write_yaml(original_config(name), tmp_path / f"{name}.yaml") if use_yaml else None
        # fp16 as stored: checking the values needs no fp32 copy of 1.3 billion weights.
        pipe = Pipeline.from_checkpoint(path, config=yaml_path, dtype=torch.float16)
    finally:
        path.unlink(missing_ok=True)

    assert (pipe.spec.family, pipe.spec.parameterization, pipe.spec.image_size) == (
        "sd1" if name == "sd1" else "sd2", parameterization, image_size)
    assert unet_layout(pipe.spec.unet) == unet_layout(UNetConfig.from_dict(unet_params(original_config(name))))
    # Every stored tensor is one constant of its own, so its first and last elements tell where it landed.
    for prefix, module in ((UNET_PREFIX, pipe.unet), ("first_stage_model.", pipe.autoencoder)):
        for key, value in module.state_dict().items():
            assert same_ends(value, checkpoint[prefix + key]), key
    if name == "sd1":
        hf_keys = {k.removeprefix(HF_TEXT_PREFIX): v for k, v in checkpoint.items() if k.startswith(HF_TEXT_PREFIX)}
        text = hf_clip_text_to_open_clip(hf_keys)  # q, k and v end up in one tensor: its ends are q's and v's
    else:
        text = {k.removeprefix(OPEN_CLIP_TEXT_PREFIX): v for k, v in checkpoint.items()
                if k.startswith(OPEN_CLIP_TEXT_PREFIX)}
    loaded = pipe.text_encoder.state_dict()
    assert loaded.keys() == text.keys()
    for key, value in loaded.items():
        assert same_ends(value, text[key]), key


def test_sd2_without_global_step_assumes_v_and_says_so(tmp_path):
    config = original_config("sd2-v")
    with torch.device("meta"):
        unet = UNetModel(UNetConfig.from_dict(unet_params(config)))
    shapes = unet.state_dict()
    probes = ("input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    state_dict = {UNET_PREFIX + k: torch.zeros(shapes[k].shape) for k in probes}
    with pytest.warns(UserWarning, match="assuming v-prediction"):
        spec = detect_spec(state_dict, {})
    assert (spec.parameterization, spec.image_size) == ("v", 768)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = detect_spec(state_dict, {}, prediction="eps")
    assert (spec.parameterization, spec.image_size) == ("eps", 512)
