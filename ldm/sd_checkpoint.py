"""Reading Stable Diffusion checkpoints (.ckpt / .safetensors) in the original key layout.

A checkpoint is one flat state dict whose prefixes name the stages:

    model.diffusion_model.*          U-Net
    first_stage_model.*              autoencoder
    cond_stage_model.transformer.*   SD 1.x text encoder (Hugging Face CLIPTextModel layout)
    cond_stage_model.model.*         SD 2.x text encoder (open_clip layout); also ours
    conditioner.embedders.N.*        SDXL text towers: `transformer.*` Hugging Face layout, `model.*` open_clip

The family is detected from keys and shapes, so no YAML is needed; the original inference YAMLs
are read for their parameters when given. Checkpoints written by this project carry their full
config in the safetensors metadata (key `ldm_config`).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from ldm.autoencoder import AutoencoderConfig
from ldm.conditioner import BASE_MICRO_CONDITIONING, REFINER_MICRO_CONDITIONING, check_vector_width
from ldm.config import config_dict, config_kwargs
from ldm.errors import InputError
from ldm.text_encoder import PRESETS, TextEncoderConfig, hf_clip_text_to_open_clip, open_clip_to_hf_clip_text
from ldm.unet import UNetConfig
from ldm.weights_io import read_checkpoint, save_atomic

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
HF_TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_TEXT_PREFIX = "cond_stage_model.model."
CONDITIONER_PREFIX = "conditioner.embedders."
# An SDXL embedder's keys: its index, then `transformer.` (Hugging Face CLIP) or `model.` (open_clip).
_EMBEDDER_KEY = re.compile(r"conditioner\.embedders\.(\d+)\.(transformer|model)\.(.+)")
# Present in released checkpoints but not needed for inference: the autoencoder's training loss
# (LPIPS + discriminator), EMA copies, and the diffusion schedule buffers (read separately).
EMA_PREFIX = "model_ema."
TRAINING_ONLY_PREFIXES = ("first_stage_model.loss.", EMA_PREFIX, "cond_stage_model.model.visual.")
SDXL_SCALE_FACTOR = 0.13025
SDXL_FAMILIES = {"sdxl": BASE_MICRO_CONDITIONING, "sdxl_refiner": REFINER_MICRO_CONDITIONING}
CONFIG_METADATA_KEY = "ldm_config"
# SD 2.0-base (512, epsilon) was released at this step; the 2.x-v releases predict v.
SD2_BASE_GLOBAL_STEP = 875000


@dataclass
class ModelSpec:
    """Everything needed to build and run a pipeline: the three configs plus the noise schedule."""

    family: str  # "sd1", "sd2", "sdxl", "sdxl_refiner" or "custom"
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    text_encoder: TextEncoderConfig | tuple[TextEncoderConfig, ...]  # a tuple: SDXL's `Conditioner` towers
    parameterization: str = "eps"  # what the U-Net predicts: "eps" or "v"
    schedule: dict = field(default_factory=lambda: {"num_timesteps": 1000, "linear_start": 0.00085,
                                                     "linear_end": 0.012})
    image_size: int = 512  # default output height and width in pixels

    def to_dict(self) -> dict:
        text = self.text_encoder
        text = [config_dict(c) for c in text] if isinstance(text, tuple) else config_dict(text)
        return {"family": self.family, "unet": self.unet.to_dict(), "autoencoder": self.autoencoder.to_dict(),
                "text_encoder": text, "parameterization": self.parameterization,
                "schedule": dict(self.schedule), "image_size": self.image_size}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        if d["parameterization"] not in ("eps", "v"):
            raise ValueError(f"parameterization {d['parameterization']!r} is not 'eps' or 'v'")
        text = d["text_encoder"]
        text = (tuple(map(_text_encoder_config, text)) if isinstance(text, list) else _text_encoder_config(text))
        return cls(family=d["family"], unet=UNetConfig.from_dict(d["unet"]),
                   autoencoder=AutoencoderConfig.from_dict(d["autoencoder"]), text_encoder=text,
                   parameterization=d["parameterization"], schedule=dict(d["schedule"]),
                   image_size=int(d["image_size"]))


def _text_encoder_config(params: dict) -> TextEncoderConfig:
    return TextEncoderConfig(**config_kwargs(TextEncoderConfig, params))


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
    if any(key.startswith(CONDITIONER_PREFIX) for key in state_dict):
        return _detect_sdxl(state_dict, prediction)
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


def _detect_sdxl(state_dict: dict[str, torch.Tensor], prediction: str | None) -> ModelSpec:
    """SDXL base (CLIP ViT-L + bigG) or refiner (bigG alone), every width and depth read from the shapes.

    Attention heads leave no trace in the weights: they are 64 channels wide, as in SDXL's U-Net and
    both its CLIP towers.
    """
    towers: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if (match := _EMBEDDER_KEY.fullmatch(key)) is not None:
            index, layout, name = match.groups()
            towers.setdefault(int(index), (layout, {}))[1][name] = value
    layouts = {i: layout for i, (layout, _) in towers.items()}
    if layouts == {0: "transformer", 1: "model"}:
        family = "sdxl"
    elif layouts == {0: "model"}:
        family = "sdxl_refiner"
    else:
        found = ", ".join(f"{i}: {'Hugging Face CLIP' if towers[i][0] == 'transformer' else 'open_clip'}"
                          for i in sorted(towers)) or "none"
        raise InputError(f"an SDXL checkpoint has text encoders conditioner.embedders.0 (CLIP ViT-L, Hugging Face "
                         "keys) and .1 (OpenCLIP bigG), or a refiner .0 (bigG) alone; this file has "
                         f"{found}: it is incomplete")
    text = tuple(_tower_config(*towers[i]) for i in sorted(towers))
    unet = _unet_config_from_shapes({k[len(UNET_PREFIX):]: v for k, v in state_dict.items()
                                     if k.startswith(UNET_PREFIX)})
    if unet.adm_in_channels is None or text[-1].output_dim is None:
        raise InputError("an SDXL checkpoint needs the U-Net's vector input (label_emb) and bigG's text_projection; "
                         "this file lacks one")
    check_vector_width(unet.adm_in_channels, text[-1].output_dim, SDXL_FAMILIES[family])
    if unet.context_dim != sum(t.width for t in text):
        raise InputError(f"the U-Net attends to a context {unet.context_dim} wide, but the text encoders give "
                         f"{sum(t.width for t in text)}")
    autoencoder = _autoencoder_config_from_shapes({k[len(AUTOENCODER_PREFIX):]: v for k, v in state_dict.items()
                                                   if k.startswith(AUTOENCODER_PREFIX)})
    return ModelSpec(family=family, unet=unet, autoencoder=autoencoder, text_encoder=text,
                     parameterization=prediction or "eps", image_size=1024)


def _tower_config(layout: str, weights: dict[str, torch.Tensor]) -> TextEncoderConfig:
    """An SDXL text tower from its weights' shapes: Hugging Face keys are OpenAI's CLIP (quick GELU, padded
    with end-of-text), open_clip keys OpenCLIP (GELU, padded with 0, projection head)."""
    hf = layout == "transformer"
    prefix = "text_model.encoder.layers." if hf else "transformer.resblocks."
    embedding = weights["text_model.embeddings.token_embedding.weight" if hf else "token_embedding.weight"]
    positions = weights["text_model.embeddings.position_embedding.weight" if hf else "positional_embedding"]
    layers = len({key[len(prefix):].split(".")[0] for key in weights if key.startswith(prefix)})
    width = embedding.shape[1]
    projection = weights.get("text_projection")
    return TextEncoderConfig(width=width, layers=layers, heads=max(1, width // 64), vocab_size=embedding.shape[0],
                             context_length=positions.shape[0], act="quick_gelu" if hf else "gelu",
                             layer="penultimate", pad_with_eot=hf, final_norm=False,
                             output_dim=None if projection is None else projection.shape[1])


def _unet_config_from_shapes(weights: dict[str, torch.Tensor]) -> UNetConfig:
    """An SDXL-style U-Net (64-channel heads, linear projections) from its weights' shapes."""
    mc = weights["input_blocks.0.0.weight"].shape[0]
    blocks: dict[int, set[str]] = {}  # input block index -> its layers' indices
    for key in weights:
        if key.startswith("input_blocks."):
            index, layer = key.split(".")[1:3]
            blocks.setdefault(int(index), set()).add(layer)
    levels: list[list[int]] = [[]]  # input block indices of the res blocks of each level
    for index in sorted(blocks)[1:]:
        if f"input_blocks.{index}.0.op.weight" in weights:
            levels.append([])
        else:
            levels[-1].append(index)

    def depth(prefix: str) -> int:
        return len({key[len(prefix):].split(".")[0] for key in weights if key.startswith(prefix)})

    channel_mult, attention_resolutions, depths = [], [], []
    for level, indices in enumerate(levels):
        channel_mult.append(weights[f"input_blocks.{indices[0]}.0.out_layers.3.weight"].shape[0] // mc)
        attention = f"input_blocks.{indices[0]}.1.transformer_blocks."
        has_attention = any(key.startswith(attention) for key in weights)
        if has_attention:
            attention_resolutions.append(2**level)
        depths.append(depth(attention) if has_attention else 1)
    # Spelled as the released YAMLs spell them: one depth if every attention level has it, and the middle
    # block's only where it differs from the last level's.
    attention_depths = {d for level, d in enumerate(depths) if 2**level in attention_resolutions}
    transformer_depth = attention_depths.pop() if len(attention_depths) == 1 else tuple(depths)
    middle = depth("middle_block.1.transformer_blocks.")
    last = transformer_depth if isinstance(transformer_depth, int) else transformer_depth[-1]
    probe = next(k for k in weights if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in weights if k.endswith("proj_in.weight"))
    label = weights.get("label_emb.0.0.weight")
    return UNetConfig(in_channels=weights["input_blocks.0.0.weight"].shape[1],
                      out_channels=weights["out.2.weight"].shape[0], model_channels=mc,
                      attention_resolutions=tuple(reversed(attention_resolutions)), num_res_blocks=len(levels[0]),
                      channel_mult=tuple(channel_mult), num_heads=-1, num_head_channels=64,
                      transformer_depth=transformer_depth, transformer_depth_middle=None if middle == last else middle,
                      context_dim=weights[probe].shape[1], use_linear_in_transformer=weights[proj_in].ndim == 2,
                      adm_in_channels=None if label is None else label.shape[1])


def _autoencoder_config_from_shapes(weights: dict[str, torch.Tensor]) -> AutoencoderConfig:
    """SD's KL autoencoder layout (as SDXL ships it) at the widths and depths its weights' shapes say."""
    if "encoder.conv_in.weight" not in weights:
        raise InputError("the checkpoint has no autoencoder (first_stage_model.encoder.*); pass a complete checkpoint")
    ch = weights["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(key.split(".")[2]) for key in weights if key.startswith("encoder.down.")})
    ch_mult = tuple(weights[f"encoder.down.{level}.block.0.conv2.weight"].shape[0] // ch for level in levels)
    blocks = {key.split(".")[4] for key in weights if key.startswith("encoder.down.0.block.")}
    attention = tuple(256 // 2**level for level in levels if f"encoder.down.{level}.attn.0.q.weight" in weights)
    return AutoencoderConfig(embed_dim=weights["quant_conv.weight"].shape[0] // 2,
                             z_channels=weights["decoder.conv_in.weight"].shape[1], ch=ch, ch_mult=ch_mult,
                             num_res_blocks=len(blocks), attn_resolutions=attention, scale_factor=SDXL_SCALE_FACTOR)


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
    towers: dict[str, dict[str, torch.Tensor]] = {}  # SDXL: the Conditioner's `embedders.N.`
    for key, tensor in state_dict.items():
        if (match := _EMBEDDER_KEY.fullmatch(key)) is not None:
            index, layout, name = match.groups()
            towers.setdefault(f"embedders.{index}.", {})[f"{layout}.{name}"] = tensor
    for prefix, weights in towers.items():
        hf = {k[len("transformer."):]: v for k, v in weights.items() if k.startswith("transformer.")}
        tower = hf_clip_text_to_open_clip(hf) if hf else {k[len("model."):]: v for k, v in weights.items()}
        parts["text_encoder"].update({prefix + k: v for k, v in tower.items()})
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


def replace_autoencoder(state_dict: dict[str, torch.Tensor], vae: str | Path) -> dict[str, torch.Tensor]:
    """A whole checkpoint with its autoencoder replaced by the VAE file `vae` (A1111's "bake in VAE"): every
    first_stage_model.* tensor, key for key and shape for shape, so that the file still loads strictly."""
    weights = autoencoder_file(read_checkpoint(vae)[0], vae)
    replacement = {AUTOENCODER_PREFIX + key: value for key, value in weights.items()}
    current = {key for key in state_dict
               if key.startswith(AUTOENCODER_PREFIX) and not key.startswith(AUTOENCODER_PREFIX + "loss.")}
    if not current:
        raise InputError("the checkpoint has no autoencoder (first_stage_model.*) to replace; pass a whole checkpoint")
    wrong = sorted(current ^ replacement.keys()) or sorted(
        key for key in current if state_dict[key].shape != replacement[key].shape)
    if wrong:
        raise InputError(f"{vae} does not fit the checkpoint's autoencoder ({len(wrong)} keys differ, e.g. "
                         f"{wrong[0]}); pass a VAE of the same architecture")
    kept = {key: value for key, value in state_dict.items() if not key.startswith(AUTOENCODER_PREFIX)}
    return {**kept, **replacement}


def join_state_dicts(unet: dict, autoencoder: dict, text_encoder: dict,
                     hf_text: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of `split_state_dict`: the text encoder in the open_clip layout (ours, SD 2.x), or with
    `hf_text` in SD 1.x's Hugging Face layout under `cond_stage_model.transformer.`."""
    out = {UNET_PREFIX + k: v for k, v in unet.items()}
    out.update({AUTOENCODER_PREFIX + k: v for k, v in autoencoder.items()})
    out.update(_text_tensors(text_encoder, hf_text))
    return out


def _text_tensors(text_encoder: dict[str, torch.Tensor], hf_text: bool) -> dict[str, torch.Tensor]:
    """Our text encoder's weights under their checkpoint keys. An SDXL Conditioner's towers (`embedders.N.*`)
    go back under `conditioner.embedders.N.`: CLIP ViT-L (the tower without a projection head) in the Hugging
    Face layout, bigG in open_clip's, as generative-models saves them."""
    towers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in text_encoder.items():
        if key.startswith("embedders."):
            index, rest = key[len("embedders."):].split(".", 1)
            towers.setdefault(index, {})[rest] = value
    if not towers:
        if hf_text:
            return {HF_TEXT_PREFIX + k: v for k, v in open_clip_to_hf_clip_text(text_encoder).items()}
        return {OPEN_CLIP_TEXT_PREFIX + k: v for k, v in text_encoder.items()}
    out = {}
    for index, tower in towers.items():
        if "text_projection" in tower:
            out.update({f"{CONDITIONER_PREFIX}{index}.model.{k}": v for k, v in tower.items()})
        else:
            out.update({f"{CONDITIONER_PREFIX}{index}.transformer.{k}": v
                        for k, v in open_clip_to_hf_clip_text(tower).items()})
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
