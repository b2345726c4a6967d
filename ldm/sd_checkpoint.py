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
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.autoencoder import AutoencoderConfig
from ldm.config import config_dict, config_kwargs
from ldm.errors import InputError, with_article
from ldm.files import atomic_write
from ldm.text_encoder import PRESETS, TextEncoderConfig, hf_clip_text_to_open_clip
from ldm.unet import UNetConfig

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."
# Present in released checkpoints but not needed for inference: the autoencoder's training loss
# (LPIPS + discriminator), EMA copies, and the diffusion schedule buffers (read separately).
TRAINING_ONLY_PREFIXES = ("first_stage_model.loss.", "model_ema.", "cond_stage_model.model.visual.")
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
        return cls(family=d["family"], unet=UNetConfig.from_dict(d["unet"]),
                   autoencoder=AutoencoderConfig.from_dict(d["autoencoder"]),
                   text_encoder=TextEncoderConfig(**config_kwargs(TextEncoderConfig, d["text_encoder"])),
                   parameterization=d["parameterization"], schedule=dict(d["schedule"]),
                   image_size=int(d["image_size"]))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors or .ckpt file, on the CPU.

    `.ckpt` files are pickles: they are read with `weights_only=True`, which refuses any object
    that is not plain tensors and containers, so a malicious file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path} (pass an existing .ckpt or .safetensors file)")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"cannot read {path}: {e} (is the file truncated or corrupt? download it again)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or unsafe pickles
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read {path}: {reason[:300]} (truncated, corrupt or not a plain-tensor "
                         f"checkpoint; convert trusted files to .safetensors)") from None
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict):
        raise InputError(f"{path} holds no state dict (expected a dict of tensors)")
    metadata = {}
    if isinstance(obj, dict) and isinstance(obj.get("global_step"), int):
        metadata["global_step"] = str(obj["global_step"])
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}, metadata


def spec_from_yaml(path: str | Path) -> dict:
    """Parameters of an original SD inference YAML (`v1-inference.yaml`, `v2-inference(-v).yaml`).

    Only values are read; `target:` import paths are treated as plain strings.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())["model"]["params"]
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
        spec = ModelSpec.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
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


def join_state_dicts(unet: dict, autoencoder: dict, text_encoder: dict) -> dict[str, torch.Tensor]:
    """The inverse of `split_state_dict` for our own checkpoints (open_clip layout for the text)."""
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({AUTOENCODER_PREFIX + k: v for k, v in autoencoder.items()})
    out.update({OPEN_CLIP_TEXT_PREFIX + k: v for k, v in text_encoder.items()})
    return out


def write_checkpoint(path: str | Path, spec: ModelSpec, unet: dict, autoencoder: dict, text_encoder: dict,
                     metadata: dict[str, str] | None = None) -> Path:
    """Save a pipeline's weights as .safetensors in the original layout, with the spec in the metadata.

    Written to a temporary file and renamed, so an interrupted save never leaves a partial file.
    """
    tensors = join_state_dicts(unet, autoencoder, text_encoder)
    return save_atomic(path, tensors, {**(metadata or {}), CONFIG_METADATA_KEY: json.dumps(spec.to_dict())})


def save_module(path: str | Path, module: torch.nn.Module, kind: str, config: dict,
                metadata: dict[str, str] | None = None) -> Path:
    """Save one stage (e.g. a trained autoencoder) as .safetensors with its config, atomically."""
    metadata = {**(metadata or {}), "ldm_module": kind, "config": json.dumps(config)}
    return save_atomic(path, module.state_dict(), metadata)


def load_module_file(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """Weights, config and metadata of a file written by `save_module` for stage `kind`."""
    state_dict, metadata = read_checkpoint(path)
    if metadata.get("ldm_module") != kind:
        raise InputError(f"{path} is not {with_article(kind)} file written by this project "
                         f"(found {metadata.get('ldm_module') or 'no stage tag'}); pass the {kind} .safetensors "
                         "that its training run exported")
    return state_dict, json.loads(metadata["config"]), metadata


def convert_to_safetensors(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a .safetensors copy of a checkpoint (e.g. a pickled .ckpt), keeping its metadata;
    with `dtype` (e.g. torch.float16, half the size) its floating-point tensors are cast.

    The source is read with `read_checkpoint`, so a pickle that tries to run code is refused.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise InputError(f"the converted file must end in .safetensors, got {dst}")
    state_dict, metadata = read_checkpoint(src)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    return save_atomic(dst, state_dict, metadata)


def save_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write .safetensors through a temporary file and a rename: a failed or interrupted save (disk full,
    kill) leaves no partial file, and whatever was at `path` before stays intact."""
    path = Path(path)
    try:
        with atomic_write(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as e:
        raise InputError(f"could not write {path}: {e}") from None
    return path
