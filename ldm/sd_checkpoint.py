"""Reading Stable Diffusion checkpoints (.ckpt / .safetensors) in the original key layout.

A checkpoint is one flat state dict whose prefixes name the stages:

    model.diffusion_model.*          U-Net
    first_stage_model.*              autoencoder
    cond_stage_model.transformer.*   SD 1.x text encoder (Hugging Face CLIPTextModel layout)
    cond_stage_model.model.*         SD 2.x text encoder (open_clip layout); also ours

The family is detected from keys and shapes, so no YAML is needed; the original inference YAMLs
are read for their parameters when given. Checkpoints written by this project carry their full
config in the safetensors metadata (key `ldm_config`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from ldm.autoencoder import AutoencoderConfig
from ldm.config import config_dict, config_kwargs
from ldm.errors import InputError
from ldm.text_encoder import PRESETS, TextEncoderConfig, hf_clip_text_to_open_clip, open_clip_to_hf_clip_text
from ldm.unet import UNetConfig
from ldm.weights_io import save_atomic

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."
# Present in released checkpoints but not needed for inference: the autoencoder's training loss
# (LPIPS + discriminator), EMA copies, and the diffusion schedule buffers (read separately).
EMA_PREFIX = "model_ema."
TRAINING_ONLY_PREFIXES = ("first_stage_model.loss.", EMA_PREFIX, "cond_stage_model.model.visual.")
CONFIG_METADATA_KEY = "ldm_config"
# SD 2.0-base (512, epsilon) was released at this step; the 2.x-v releases predict v.
SD2_BASE_GLOBAL_STEP = 875000


@dataclass
class ModelSpec:
    """Everything needed to build and run a pipeline: the three configs plus the noise schedule."""

    family: str  # "sd1", "sd2" or "custom"
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    text_encoder: TextEncoderConfig
    parameterization: str = "eps"  # what the U-Net predicts: "eps" or "v"
    schedule: dict = field(default_factory=lambda: {"num_timesteps": 1000, "linear_start": 0.00085,
                                                     "linear_end": 0.012})
    image_size: int = 512  # default output height and width in pixels

    def to_dict(self) -> dict:
        return {"family": self.family, "unet": self.unet.to_dict(), "autoencoder": self.autoencoder.to_dict(),
                "text_encoder": config_dict(self.text_encoder), "parameterization": self.parameterization,
                "schedule": dict(self.schedule), "image_size": self.image_size}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        if d["parameterization"] not in ("eps", "v"):
            raise ValueError(f"parameterization {d['parameterization']!r} is not 'eps' or 'v'")
        return cls(family=d["family"], unet=UNetConfig.from_dict(d["unet"]),
                   autoencoder=AutoencoderConfig.from_dict(d["autoencoder"]),
                   text_encoder=TextEncoderConfig(**config_kwargs(TextEncoderConfig, d["text_encoder"])),
                   parameterization=d["parameterization"], schedule=dict(d["schedule"]),
                   image_size=int(d["image_size"]))


def spec_from_yaml(path: str | Path) -> dict:
    """Parameters of an original SD inference YAML (`v1-inference.yaml`, `v2-inference(-v).yaml`).

    Only values are read; `target:` import paths are treated as plain strings.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a Stable Diffusion inference config (not UTF-8 text; pass the .yaml "
                         "file)") from None
    try:
        params = yaml.safe_load(text)["model"]["params"]
        unet = params["unet_config"]["params"]
        first_stage = params["first_stage_config"]["params"]
        cond_stage = params["cond_stage_config"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a Stable Diffusion inference config (missing {e})") from None
    open_clip = "OpenCLIP" in str(cond_stage.get("target", ""))
    text = PRESETS["sd2" if open_clip else "sd1"]()
    layer = (cond_stage.get("params") or {}).get("layer")
    try:
        if layer:
            text = replace(text, layer=layer)  # validated: "last" or "penultimate"
        unet_config = UNetConfig.from_dict(unet)
        autoencoder_config = AutoencoderConfig.from_dict({**first_stage, "scale_factor": params.get("scale_factor",
                                                                                                   0.18215)})
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None
    return {
        "family": "sd2" if open_clip else "sd1",
        "unet": unet_config,
        "autoencoder": autoencoder_config,
        "text_encoder": text,
        "parameterization": params.get("parameterization", "eps"),
        "schedule": {"num_timesteps": params.get("timesteps", 1000),
                     "linear_start": params.get("linear_start", 0.00085),
                     "linear_end": params.get("linear_end", 0.012)},
        # The v YAML says 64 latents too, but the 2.x-v models were trained at 768 px (96 latents).
        "image_size": 768 if params.get("parameterization") == "v" else 8 * int(params.get("image_size", 64)),
    }


def detect_spec(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                prediction: str | None = None, config: str | Path | None = None) -> ModelSpec:
    """The model family and configs: from an SD inference YAML when given, else from this project's
    metadata, else from keys and shapes. `prediction` ("eps" or "v") overrides what they imply."""
    metadata = metadata or {}
    prediction = None if prediction is None else _check_prediction(prediction)
    if config is not None:
        spec = ModelSpec(**spec_from_yaml(config))
    elif CONFIG_METADATA_KEY in metadata:
        try:
            spec = ModelSpec.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"the file's {CONFIG_METADATA_KEY} metadata is not a model config ({type(e).__name__}: "
                             f"{str(e)[:120]}); pass a checkpoint written by this project, or --config YAML") from None
    else:
        return _detect_sd_family(state_dict, metadata, prediction)
    spec.parameterization = prediction or spec.parameterization
    return spec


def _check_prediction(prediction: str) -> str:
    aliases = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
    if prediction not in aliases:
        raise InputError(f"unknown prediction type {prediction!r}; use 'eps' or 'v'")
    return aliases[prediction]


def _detect_sd_family(state_dict: dict[str, torch.Tensor], metadata: dict[str, str],
                      prediction: str | None) -> ModelSpec:
    probe = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if probe not in state_dict or conv_in not in state_dict:
        raise InputError("unknown checkpoint family: no Stable Diffusion 1.x/2.x U-Net keys "
                         f"('{probe}'); pass a SD 1.x/2.x checkpoint or one written by this project")
    context_dim = state_dict[probe].shape[1]
    linear_proj = state_dict[UNET_PREFIX + "input_blocks.1.1.proj_in.weight"].ndim == 2
    in_channels = state_dict[conv_in].shape[1]
    if context_dim == 768 and not linear_proj:
        family = "sd1"
        unet = UNetConfig(in_channels=in_channels, context_dim=768)
        parameterization, image_size = prediction or "eps", 512
    elif context_dim == 1024 and linear_proj:
        family = "sd2"
        unet = UNetConfig(in_channels=in_channels, context_dim=1024, num_heads=-1, num_head_channels=64,
                          use_linear_in_transformer=True)
        step = metadata.get("global_step")
        # SD 2's inpainting model (9 input channels) continues 512-base and predicts eps (its YAML,
        # v2-inpainting-inference.yaml, sets no parameterization); its keys alone say so.
        inpainting = in_channels == 9
        base = inpainting or (step is not None and int(step) == SD2_BASE_GLOBAL_STEP)
        parameterization = prediction or ("eps" if base else "v")
        if prediction is None and step is None and not inpainting:
            # Same guess as diffusers: 2.x-v (768) is the common release, and its keys equal 2.x-base's.
            warnings.warn("SD 2.x checkpoint that does not say what it predicts: assuming v-prediction at 768 px "
                          "(SD 2.x 768-v); pass --prediction eps for a 512-base model", stacklevel=3)
        image_size = 512 if parameterization == "eps" else 768
    else:
        raise InputError(f"unknown checkpoint family: context width {context_dim} with "
                         f"{'linear' if linear_proj else 'conv'} transformer projections matches neither "
                         "SD 1.x (768, conv) nor SD 2.x (1024, linear)")
    return ModelSpec(family=family, unet=unet, autoencoder=AutoencoderConfig(),
                     text_encoder=PRESETS[family](), parameterization=parameterization,
                     image_size=image_size)


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-stage state dicts in our modules' key layout: `unet`, `autoencoder`, `text_encoder`.

    Keys outside the three stages (schedule buffers, EMA copies, training losses) are left out:
    the schedule buffers of released checkpoints equal the ones `NoiseSchedule` computes.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "autoencoder": {}, "text_encoder": {}, "hf_text": {}}
    prefixes = {UNET_PREFIX: "unet", AUTOENCODER_PREFIX: "autoencoder", OPEN_CLIP_TEXT_PREFIX: "text_encoder",
                HF_TEXT_PREFIX: "hf_text"}
    for key, tensor in state_dict.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        for prefix, part in prefixes.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = tensor
                break
    hf_text = parts.pop("hf_text")
    if hf_text:
        parts["text_encoder"].update(hf_clip_text_to_open_clip(hf_text))
    return parts


def ema_unet(state_dict: dict[str, torch.Tensor], unet: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The EMA copy of the U-Net weights that ldm training saved (`model_ema.*`), in the layout of `unet`
    (our keys); None when the checkpoint has none. ldm's LitEma names each copy after the parameter's path
    under `model.` with the dots removed: `model_ema.diffusion_modelinput_blocks00weight`."""
    ema = {key[len(EMA_PREFIX):]: value for key, value in state_dict.items() if key.startswith(EMA_PREFIX)}
    if not any(key.startswith("diffusion_model") for key in ema):
        return None
    names = {key: ("diffusion_model." + key).replace(".", "") for key in unet}
    if missing := [key for key, name in names.items() if name not in ema]:
        raise InputError(f"the EMA weights lack {len(missing)} U-Net weights (first: {missing[0]}); "
                         "leave out --use_ema")
    return {key: ema[name] for key, name in names.items()}


def autoencoder_file(state_dict: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """A VAE file (e.g. SD's ft-MSE VAE) -> autoencoder weights in our layout: the original ldm keys
    (`encoder.*`, `decoder.*`, `quant_conv.*`), bare or under `first_stage_model.` (then only those are
    read, so a whole checkpoint lends its autoencoder); the training loss and EMA copies are dropped."""
    if any(key.startswith(AUTOENCODER_PREFIX) for key in state_dict):
        state_dict = {key[len(AUTOENCODER_PREFIX):]: value for key, value in state_dict.items()
                      if key.startswith(AUTOENCODER_PREFIX)}
    weights = {key: value for key, value in state_dict.items() if not key.startswith(("loss.", EMA_PREFIX))}
    if any(".down_blocks." in key or ".mid_block." in key for key in weights):
        raise InputError(f"{path} is a VAE in diffusers' layout (encoder.down_blocks...); pass the original-layout "
                         "file (.safetensors / .ckpt as released for SD, keys encoder.down.N...)")
    if not any(key.startswith("decoder.") for key in weights):
        raise InputError(f"{path} holds no autoencoder (no decoder.* keys); pass a VAE file")
    return weights


def join_state_dicts(unet: dict, autoencoder: dict, text_encoder: dict,
                     hf_text: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of `split_state_dict`: the text encoder in the open_clip layout (ours, SD 2.x), or with
    `hf_text` in SD 1.x's Hugging Face layout under `cond_stage_model.transformer.`."""
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({AUTOENCODER_PREFIX + k: v for k, v in autoencoder.items()})
    if hf_text:
        out.update({HF_TEXT_PREFIX + k: v for k, v in open_clip_to_hf_clip_text(text_encoder).items()})
    else:
        out.update({OPEN_CLIP_TEXT_PREFIX + k: v for k, v in text_encoder.items()})
    return out


def write_checkpoint(path: str | Path, spec: ModelSpec, unet: dict, autoencoder: dict, text_encoder: dict,
                     metadata: dict[str, str] | None = None) -> Path:
    """Save a pipeline's weights as .safetensors in the original layout of its family (an SD 1.x text
    encoder in the Hugging Face layout that other tools' single-file loaders expect), with the spec in the
    metadata.

    Written to a temporary file and renamed, so an interrupted save never leaves a partial file.
    """
    tensors = join_state_dicts(unet, autoencoder, text_encoder, hf_text=spec.family == "sd1")
    return save_atomic(path, tensors, {**(metadata or {}), CONFIG_METADATA_KEY: json.dumps(spec.to_dict())})
